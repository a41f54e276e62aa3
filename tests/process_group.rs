//! `Builder::process_group` and `Child::signal` with real processes, under every start
//! method: the child leads a group of its own, the whole group can be signalled at once,
//! and a child can be stopped and continued through its handle.
//!
//! Every test runs in its own forked process under a watchdog (see `common`). `main` calls
//! `procshare::init()` first, so this binary can be re-executed by `Spawn` and serve as
//! the fork server.

mod common;

use std::time::Duration;

use procshare::{Process, ProcessError, StartMethod, Value};

const LIMIT: Duration = Duration::from_secs(20);
const METHODS: [StartMethod; 3] = [
    StartMethod::Fork,
    StartMethod::Spawn,
    StartMethod::ForkServer,
];

fn main() {
    procshare::init();
    common::run(
        tests![
            process_group_makes_the_child_a_group_leader_under_every_method,
            without_process_group_the_child_stays_in_our_group,
            killing_the_group_reaches_the_grandchildren,
            signal_stops_and_continues_a_child,
            signal_refuses_a_bad_number_and_ignores_a_reaped_child,
        ],
        &[],
    )
}

/// The child's pid and process group, as the kernel sees them.
fn pid_and_group(_: ()) -> (u32, u32) {
    // SAFETY: plain syscalls without arguments.
    unsafe { (libc::getpid() as u32, libc::getpgrp() as u32) }
}

fn our_group() -> u32 {
    // SAFETY: plain syscall.
    unsafe { libc::getpgrp() as u32 }
}

fn process_group_makes_the_child_a_group_leader_under_every_method() {
    for method in METHODS {
        let child = Process::builder()
            .start_method(method)
            .process_group(true)
            .spawn(pid_and_group, ())
            .unwrap();
        let pid = child.pid();
        let (seen_pid, group) = child.join().unwrap();
        assert_eq!(seen_pid, pid, "{method:?}");
        assert_eq!(group, pid, "{method:?}: the child must lead its own group");
        assert_ne!(group, our_group(), "{method:?}");
    }
    // The capturing fork too.
    let child = Process::builder()
        .process_group(true)
        .fork(|| pid_and_group(()))
        .unwrap();
    let pid = child.pid();
    assert_eq!(child.join().unwrap(), (pid, pid));
}

fn without_process_group_the_child_stays_in_our_group() {
    for method in [StartMethod::Fork, StartMethod::Spawn] {
        let child = Process::builder()
            .start_method(method)
            .spawn(pid_and_group, ())
            .unwrap();
        let (_, group) = child.join().unwrap();
        assert_eq!(group, our_group(), "{method:?}");
    }
}

fn killing_the_group_reaches_the_grandchildren() {
    for method in METHODS {
        // The child forks a grandchild that would sleep for a minute, reports its pid, and
        // sleeps too; one signal to the group must end both.
        let grandchild = Value::new(0u32).unwrap();
        let child = Process::builder()
            .start_method(method)
            .process_group(true)
            .spawn(sleep_with_a_grandchild, grandchild.clone())
            .unwrap();
        common::wait_for("the grandchild's pid", LIMIT, || grandchild.get() != 0);
        let g = grandchild.get();
        // SAFETY: plain syscall; the group is the child's own.
        let rc = unsafe { libc::killpg(child.pid() as libc::pid_t, libc::SIGKILL) };
        assert_eq!(rc, 0, "{method:?}");
        assert_eq!(
            child.join(),
            Err(ProcessError::Signaled(libc::SIGKILL)),
            "{method:?}"
        );
        // The grandchild is not ours: it is reparented and reaped by init (or left a
        // zombie for a moment). Either way it no longer runs.
        common::wait_for("the grandchild to die", LIMIT, || gone_or_zombie(g));
    }
}

fn sleep_with_a_grandchild(report: Value<u32>) {
    let grandchild = Process::builder()
        .daemon(false)
        .fork(|| std::thread::sleep(Duration::from_secs(60)))
        .unwrap();
    report.set(grandchild.pid());
    std::mem::forget(grandchild); // never waited for: the group's signal ends it
    std::thread::sleep(Duration::from_secs(60));
}

fn gone_or_zombie(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

fn spin_counter(counter: Value<u64>) {
    loop {
        counter.update(|n| *n += 1);
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn signal_stops_and_continues_a_child() {
    for method in METHODS {
        let counter = Value::new(0u64).unwrap();
        let mut child = Process::builder()
            .start_method(method)
            .spawn(spin_counter, counter.clone())
            .unwrap();
        common::wait_for("the child to count", LIMIT, || counter.get() > 0);
        child.signal(libc::SIGSTOP).unwrap();
        std::thread::sleep(Duration::from_millis(50)); // the stop takes effect
        let stopped_at = counter.get();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            counter.get(),
            stopped_at,
            "{method:?}: counted while stopped"
        );
        assert!(child.is_alive(), "{method:?}: a stopped child is alive");
        child.signal(libc::SIGCONT).unwrap();
        common::wait_for("the child to count again", LIMIT, || {
            counter.get() > stopped_at
        });
        child.signal(libc::SIGTERM).unwrap();
        assert_eq!(
            child.join_timeout(LIMIT),
            Err(ProcessError::Signaled(libc::SIGTERM)),
            "{method:?}"
        );
    }
}

fn signal_refuses_a_bad_number_and_ignores_a_reaped_child() {
    let mut child = Process::fork(|| std::thread::sleep(Duration::from_secs(60))).unwrap();
    let e = child.signal(1000).unwrap_err();
    assert!(e.to_string().contains("signal"), "{e}");
    child.kill().unwrap();
    assert_eq!(
        child.join_timeout(LIMIT),
        Err(ProcessError::Signaled(libc::SIGKILL))
    );
    // Reaped: nothing to signal, and no other process that got its pid is reached.
    child.signal(libc::SIGKILL).unwrap();
}
