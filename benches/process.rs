//! Start + join of a child process that returns a small value, per start method.
//!
//! One iteration starts a child running `fn double(x: u64) -> u64`, joins it and checks
//! the value, so every id pays the whole round trip a user pays: process creation, the
//! function call, sending the value back over the result socket, exit and reaping.
//!
//! * `fork`: `Process::builder().start_method(StartMethod::Fork).spawn(double, 21)`.
//! * `fork_closure`: `Process::fork(move || x * 2)` (the capturing variant).
//! * `spawn`: `StartMethod::Spawn`: an exec of this (release, statically linked Rust)
//!   bench binary, which calls `procshare::init()` first in `main`.
//! * `forkserver`: `StartMethod::ForkServer`: a request to the fork server (started by
//!   the warm-up's first iteration), which forks a child of its small, single-threaded
//!   image; the status comes back from the server.
//! * `command_true`: `std::process::Command::new("/bin/true").status()`, the baseline
//!   for "start a process and wait for it" (fork/exec of a tiny C program, no value).
//!
//! Python's side of the comparison is `benches/python/process_start.py` (stdlib only);
//! run both in one sitting, since these VMs move between days:
//!
//! ```text
//! cargo bench --bench process -- --warm-up-time 1 --measurement-time 3
//! python3 benches/python/process_start.py
//! ```

use std::hint::black_box;

use criterion::Criterion;
use procshare::{Process, StartMethod};

fn double(x: u64) -> u64 {
    x * 2
}

fn start_join(c: &mut Criterion) {
    let mut g = c.benchmark_group("process_start_join");
    g.sample_size(30);
    g.bench_function("fork", |b| {
        b.iter(|| {
            let child = Process::builder()
                .start_method(StartMethod::Fork)
                .spawn(double, black_box(21))
                .unwrap();
            assert_eq!(child.join(), Ok(42));
        })
    });
    g.bench_function("fork_closure", |b| {
        let x = 21u64;
        b.iter(|| {
            let child = Process::fork(move || black_box(x) * 2).unwrap();
            assert_eq!(child.join(), Ok(42));
        })
    });
    g.bench_function("spawn", |b| {
        b.iter(|| {
            let child = Process::builder()
                .start_method(StartMethod::Spawn)
                .spawn(double, black_box(21))
                .unwrap();
            assert_eq!(child.join(), Ok(42));
        })
    });
    g.bench_function("forkserver", |b| {
        b.iter(|| {
            let child = Process::builder()
                .start_method(StartMethod::ForkServer)
                .spawn(double, black_box(21))
                .unwrap();
            assert_eq!(child.join(), Ok(42));
        })
    });
    g.bench_function("command_true", |b| {
        b.iter(|| {
            let status = std::process::Command::new("/bin/true").status().unwrap();
            assert!(status.success());
        })
    });
    g.finish();
}

fn main() {
    // First line of main: a Spawn child of this binary takes over here.
    procshare::init();
    let mut c = Criterion::default().configure_from_args();
    start_join(&mut c);
    c.final_summary();
}
