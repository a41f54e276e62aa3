//! A tiny test runner for tests that fork real processes.
//!
//! libtest runs every test on its own thread, and forking a multi-threaded process is
//! only safe if the child restricts itself to async-signal-safe calls. This runner stays
//! single-threaded instead: each test runs in a freshly forked child (`Process::fork`, as a
//! daemon leading its own process group), so the test may fork further children freely,
//! and a watchdog in the parent kills the whole group if the test overruns its time limit,
//! and again after every test, so nothing a test started outlives it. A hang therefore
//! fails in seconds and never leaves processes behind; if the runner itself is killed, its
//! daemon test process follows it (`PR_SET_PDEATHSIG`).

#![allow(dead_code)]

pub mod ns;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use procshare::{Child, Process, ProcessError};

/// A test: its name, its time limit, and its body (panics to fail).
pub struct Test {
    pub name: &'static str,
    pub limit: Duration,
    pub body: fn(),
}

/// Builds a [`Test`] with the default 30 s limit.
#[macro_export]
macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        &[$($crate::common::Test {
            name: stringify!($name),
            limit: std::time::Duration::from_secs(30),
            body: $name,
        }),*]
    };
}

/// Runs the selected tests (positional command-line arguments filter by substring) and
/// exits non-zero if any failed. `after_all` runs in the parent once all tests finished.
pub fn run(tests: &[Test], after_all: &[(&'static str, fn())]) -> ! {
    RUN_ID.store(std::process::id(), Ordering::Relaxed);
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected: Vec<&Test> = tests
        .iter()
        .filter(|t| filters.is_empty() || filters.iter().any(|f| t.name.contains(f.as_str())))
        .collect();
    let started = Instant::now();
    println!("\nrunning {} tests", selected.len() + after_all.len());
    let mut failed = Vec::new();
    for test in &selected {
        let t0 = Instant::now();
        let outcome = run_one(test);
        match &outcome {
            Ok(()) => println!("test {} ... ok ({:.2?})", test.name, t0.elapsed()),
            Err(why) => {
                println!(
                    "test {} ... FAILED ({:.2?}): {why}",
                    test.name,
                    t0.elapsed()
                );
                failed.push(test.name);
            }
        }
    }
    for (name, check) in after_all {
        match std::panic::catch_unwind(check) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(name);
            }
        }
    }
    let passed = selected.len() + after_all.len() - failed.len();
    if !failed.is_empty() {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; 0 ignored; 0 measured; {} filtered out; \
         finished in {:.2}s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        tests.len() - selected.len(),
        started.elapsed().as_secs_f64()
    );
    std::process::exit(if failed.is_empty() { 0 } else { 101 })
}

fn run_one(test: &Test) -> Result<(), String> {
    let mut child = Process::builder()
        .name(test.name)
        .daemon(true)
        .process_group(true)
        .fork(test.body)
        .map_err(|e| format!("could not fork the test process: {e}"))?;
    let outcome = child.join_timeout(test.limit);
    // Whatever happened, nothing the test started may outlive it. The test process led the
    // group, so its pid names the group until the last member is gone, even once reaped.
    kill_group(child.pid());
    match outcome {
        // See `succeeded`.
        Ok(()) | Err(ProcessError::Exited(0)) => Ok(()),
        Err(ProcessError::Timeout) => {
            drop(child); // killed with its group above; the drop reaps it
            Err(format!(
                "watchdog: still running after {:?}, killed",
                test.limit
            ))
        }
        Err(e) => Err(format!("test process failed: {e}")),
    }
}

/// SIGKILLs every process in the group `leader` leads (gone already is fine).
pub fn kill_group(leader: u32) {
    // SAFETY: killpg takes plain integers.
    unsafe { libc::killpg(leader as libc::pid_t, libc::SIGKILL) };
}

/// Forks a child running `f`, panicking if fork fails. It is a daemon: dropping its handle
/// unjoined kills it (and reaps it), so a failing test leaves no orphans behind.
pub fn spawn(f: impl FnOnce()) -> Child<()> {
    Process::builder().daemon(true).fork(f).expect("fork")
}

/// Whether a test child succeeded: it returned, or it ended the process itself with exit
/// code 0 (some tests leave with `_exit(0)` on purpose, e.g. without unlocking).
pub fn succeeded(outcome: &Result<(), ProcessError>) -> bool {
    matches!(outcome, Ok(()) | Err(ProcessError::Exited(0)))
}

/// Waits for `child` to succeed (see [`succeeded`]) within `limit`, panicking if it failed
/// or overran.
pub fn join(mut child: Child<()>, limit: Duration) {
    match child.join_timeout(limit) {
        Ok(()) | Err(ProcessError::Exited(0)) => {}
        Err(ProcessError::Timeout) => panic!("child {} still running after {limit:?}", child.pid()),
        Err(e) => panic!("child {} failed: {e}", child.pid()),
    }
}

/// Kills `child` (SIGKILL) and reaps it.
pub fn kill(child: Child<()>) {
    child.kill().expect("kill");
    let _ = child.join();
}

/// Waits up to `limit` for `child` to end; `true` if it ended (whatever its outcome).
pub fn ended_within(child: &mut Child<()>, limit: Duration) -> bool {
    !matches!(child.join_timeout(limit), Err(ProcessError::Timeout))
}

/// Polls `cond` until it holds, panicking after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The runner's pid, inherited by every test process: names made from it are unique to
/// this run and can be checked for leftovers afterwards.
static RUN_ID: AtomicU32 = AtomicU32::new(0);

/// A segment name unique to this test run.
pub fn unique_name(what: &str) -> String {
    format!("{}{what}", run_prefix())
}

/// The prefix of every name [`unique_name`] makes in this run.
pub fn run_prefix() -> String {
    format!("test-{}-", RUN_ID.load(Ordering::Relaxed))
}
