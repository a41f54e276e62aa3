//! Who counts as holding an end of a queue, with real forked processes: more processes
//! than the peer table used to have slots, a child killed before procshare's fork handler
//! could count it, and a fork+exec child (which holds no handle once it has exec'd).
//!
//! Every test runs in its own forked process under a watchdog (see `common`), and every
//! blocking step inside a test is bounded.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use procshare::{Event, RecvTimeoutError, Shared};

use common::{join, spawn};

const LIMIT: Duration = Duration::from_secs(20);
/// How soon the end of the last holder must be noticed.
const NOTICE: Duration = Duration::from_secs(1);

fn main() {
    common::run(
        tests![
            a_hundred_forked_senders_are_all_counted,
            sender_killed_before_the_fork_handler_is_noticed,
            sender_killed_before_the_fork_handler_of_a_raw_fork_is_noticed,
            exec_child_with_its_own_path_holds_no_sender,
            exec_child_with_pre_exec_holds_no_sender,
            a_quiet_forked_sender_keeps_the_queue_connected,
            clone_docs_promise_no_64_process_limit,
        ],
        &[],
    )
}

/// Runs `$body` with `$make(cap)` building an `spsc::<u64>` and then a `channel::<u64>`.
macro_rules! for_both_flavours {
    (|$flavour:ident, $make:ident| $body:block) => {{
        {
            let $flavour = "spsc";
            let $make = |cap: usize| procshare::spsc::<u64>(cap).expect("spsc");
            $body
        }
        {
            let $flavour = "channel";
            let $make = |cap: usize| procshare::channel::<u64>(cap).expect("channel");
            $body
        }
    }};
}

/// Item 9: 100 children inherit a sender (the table used to have 64 slots, and the 65th
/// child was counted nowhere). The parent drops its own sender; the late children must
/// still count as connected, and every message must arrive before `Disconnected`.
fn a_hundred_forked_senders_are_all_counted() {
    const CHILDREN: u64 = 100;
    let (tx, rx) = procshare::channel::<u64>(256).expect("channel");
    let go = Shared::new(Event::new()).unwrap();
    let go_ref: &Event = &go;
    let children: Vec<_> = (0..CHILDREN)
        .map(|i| {
            let tx = tx.clone();
            spawn(move || {
                assert!(go_ref.wait_timeout(LIMIT), "child {i}: no go");
                if i >= 80 {
                    // Give the first 64 (the old table's size) time to leave first.
                    std::thread::sleep(Duration::from_millis(300));
                }
                tx.send(i).expect("send");
            })
        })
        .collect();
    drop(tx);
    go.set();
    let mut got = BTreeSet::new();
    loop {
        match rx.recv_timeout(LIMIT) {
            Ok(i) => assert!(got.insert(i), "message {i} twice"),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("after {} messages: {e:?}", got.len()),
        }
    }
    assert_eq!(
        got.len() as u64,
        CHILDREN,
        "Disconnected after only {} of {CHILDREN} messages; missing: {:?}",
        got.len(),
        (0..CHILDREN)
            .filter(|i| !got.contains(i))
            .collect::<Vec<_>>()
    );
    for child in children {
        join(child, LIMIT);
    }
}

/// Set in the parent right before a fork whose child must die inside `fork` itself,
/// before procshare's child handler runs (child handlers run in registration order).
static KILL_CHILD_IN_FORK: AtomicBool = AtomicBool::new(false);

extern "C" fn maybe_die_in_fork_child() {
    if KILL_CHILD_IN_FORK.load(Ordering::SeqCst) {
        // SAFETY: raise and SIGKILL are async-signal-safe; the child never returns.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

/// Registers the killing child handler before procshare registers its own (it does so
/// when the first queue handle is made, after this).
fn install_killer() {
    // SAFETY: registering a static extern "C" fn that only calls async-signal-safe code.
    let rc = unsafe { libc::pthread_atfork(None, None, Some(maybe_die_in_fork_child)) };
    assert_eq!(rc, 0, "pthread_atfork");
}

/// Forks a child that dies in the fork handler, with `Process::fork` (`raw == false`) or
/// libc's fork directly, and reaps it.
fn fork_a_child_that_dies_in_fork(raw: bool) {
    KILL_CHILD_IN_FORK.store(true, Ordering::SeqCst);
    let killed = if raw {
        // SAFETY: single-threaded test process; the child only calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: leaving the child at once without running the parent's code.
            unsafe { libc::_exit(0) };
        }
        assert!(pid > 0, "fork failed");
        let mut status = 0;
        // SAFETY: `status` is a valid int; pid is our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFSIGNALED(status),
            "the child was meant to die of SIGKILL in fork, status {status:#x}"
        );
        Err(procshare::ProcessError::Signaled(libc::WTERMSIG(status)))
    } else {
        procshare::Process::fork(|| ()).expect("fork").join()
    };
    KILL_CHILD_IN_FORK.store(false, Ordering::SeqCst);
    assert_eq!(
        killed,
        Err(procshare::ProcessError::Signaled(libc::SIGKILL)),
        "the child was meant to die of SIGKILL in fork"
    );
}

/// Item 10: a child killed before procshare's fork handler ran must not keep the parent's
/// loan (its copy of the sender) counted forever.
fn killed_in_fork(raw: bool) {
    install_killer();
    for_both_flavours!(|flavour, make| {
        let (tx, rx) = make(4);
        fork_a_child_that_dies_in_fork(raw);
        drop(tx);
        let t0 = Instant::now();
        let r = rx.recv_timeout(Duration::from_secs(3));
        assert_eq!(
            r,
            Err(RecvTimeoutError::Disconnected),
            "{flavour}, raw={raw}"
        );
        assert!(
            t0.elapsed() < NOTICE,
            "{flavour}, raw={raw}: Disconnected took {:?}",
            t0.elapsed()
        );
    });
}

fn sender_killed_before_the_fork_handler_is_noticed() {
    killed_in_fork(false);
}

fn sender_killed_before_the_fork_handler_of_a_raw_fork_is_noticed() {
    killed_in_fork(true);
}

/// Item 11: a child started with fork+exec holds no procshare handle once it has exec'd,
/// so it must not keep the queue connected.
fn exec_child(pre_exec: bool) {
    for_both_flavours!(|flavour, make| {
        let (tx, rx) = make(4);
        let mut cmd = Command::new("sleep");
        cmd.arg("30").stdin(Stdio::null());
        if pre_exec {
            // SAFETY: the closure does nothing, which is async-signal-safe.
            unsafe { cmd.pre_exec(|| Ok(())) };
        } else {
            // A PATH of the child's own makes std fork+exec instead of posix_spawn.
            cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
        }
        let mut sleeper = cmd.spawn().expect("spawn sleep");
        drop(tx);
        let t0 = Instant::now();
        let r = rx.recv_timeout(Duration::from_secs(3));
        let took = t0.elapsed();
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert_eq!(
            r,
            Err(RecvTimeoutError::Disconnected),
            "{flavour}, pre_exec={pre_exec}"
        );
        assert!(
            took < NOTICE,
            "{flavour}, pre_exec={pre_exec}: Disconnected took {took:?}"
        );
    });
}

fn exec_child_with_its_own_path_holds_no_sender() {
    exec_child(false);
}

fn exec_child_with_pre_exec_holds_no_sender() {
    exec_child(true);
}

/// The other side of items 10 and 11: a live forked child that holds a sender and stays
/// quiet (long past the 250 ms for which a "still maps the segment" proof is cached) keeps
/// the queue connected, whether forked by procshare's helper or by libc directly.
fn a_quiet_forked_sender_keeps_the_queue_connected() {
    for raw in [false, true] {
        for_both_flavours!(|flavour, make| {
            let (tx, rx) = make(4);
            let ready = Shared::new(Event::new()).unwrap();
            let ready_ref: &Event = &ready;
            let child_body = move || {
                ready_ref.set();
                std::thread::sleep(Duration::from_millis(900));
                tx.send(7).expect("send");
            };
            let child = if raw {
                // SAFETY: single-threaded test process; the child leaves with _exit.
                match unsafe { libc::fork() } {
                    0 => {
                        child_body();
                        // SAFETY: leaving the child without running the parent's code.
                        unsafe { libc::_exit(0) }
                    }
                    pid => {
                        assert!(pid > 0, "fork failed");
                        drop(child_body); // the parent's copy of the sender
                        pid
                    }
                }
            } else {
                let child = spawn(child_body);
                let pid = child.pid() as libc::pid_t;
                std::mem::forget(child); // reaped below
                pid
            };
            assert!(ready.wait_timeout(LIMIT));
            let r = rx.recv_timeout(Duration::from_millis(600));
            assert_eq!(r, Err(RecvTimeoutError::Timeout), "{flavour}, raw={raw}");
            assert_eq!(rx.recv_timeout(LIMIT), Ok(7), "{flavour}, raw={raw}");
            let mut status = 0;
            // SAFETY: `status` is a valid int; `child` is our unreaped child.
            assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
            assert_eq!(status, 0, "{flavour}, raw={raw}: child failed");
            let t0 = Instant::now();
            assert_eq!(
                rx.recv_timeout(LIMIT),
                Err(RecvTimeoutError::Disconnected),
                "{flavour}, raw={raw}"
            );
            assert!(t0.elapsed() < NOTICE);
        });
    }
}

/// Review finding F07: the peer tables hold 1024 processes and count inherited handles
/// beyond that in `overflow`; the `Clone` docs must not promise a panic above 64.
fn clone_docs_promise_no_64_process_limit() {
    for (file, text) in [
        (
            "src/queue/bytes/mod.rs",
            include_str!("../src/queue/bytes/mod.rs"),
        ),
        ("src/queue/mpmc.rs", include_str!("../src/queue/mpmc.rs")),
        ("src/queue/typed.rs", include_str!("../src/queue/typed.rs")),
        ("src/queue/spsc.rs", include_str!("../src/queue/spsc.rs")),
    ] {
        assert!(
            !text.contains("more than 64 processes"),
            "{file} documents a 64-process limit that the peer tables do not have"
        );
    }
}
