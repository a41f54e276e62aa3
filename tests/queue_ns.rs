//! Queues and pid namespaces, with real processes: a process that inherited a queue by
//! fork but lives in a child pid namespace (a container started from the process holding
//! the queue: `unshare -pf`, `bwrap`, runc's init) is refused with a clear error, never
//! records its identity in the queue, and is never judged dead (nor robbed) by the
//! processes of the queue's namespace. From the adversarial review (findings F01, F02,
//! F03 of `tests/attacks.md` on branch work/review).
//!
//! The tests need root to unshare a pid namespace and print a skip line otherwise. Every
//! test runs in its own forked process under a watchdog (see `common`), and every blocking
//! step inside a test is bounded.

mod common;

use common::ns::*;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use procshare::{ByteQueue, Event, QueueError, RecvTimeoutError, Shared, TryRecvError};

use common::{join, spawn};

const LIMIT: Duration = Duration::from_secs(20);

fn main() {
    common::run(
        tests![
            a_channel_sender_in_a_child_pid_namespace_is_refused_and_never_judged_dead,
            a_channel_sender_in_a_child_pid_namespace_claims_nothing,
            a_byte_queue_reader_in_a_child_pid_namespace_is_refused_and_robs_nobody,
            an_spsc_end_in_a_child_pid_namespace_is_refused,
        ],
        &[],
    )
}

/// The panic message of `f`, which must panic.
fn panic_message(f: impl FnOnce()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(f)).expect_err("refused with a panic");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn assert_says_pid_namespace(message: &str) {
    assert!(
        message.contains("pid namespace") && message.contains("Create the queue inside"),
        "the refusal says what happened and what to do: {message:?}"
    );
}

/// F01: the only sender is pid 2 of a child pid namespace. Its tid means another process
/// in ours, so it must not be judged (dead or alive) by its id: the receiver is never told
/// `Disconnected` while it lives, and its send is refused with a clear message.
fn a_channel_sender_in_a_child_pid_namespace_is_refused_and_never_judged_dead() {
    if !is_root() {
        return skip("f01", "needs root to unshare a pid namespace");
    }
    let (tx, rx) = procshare::channel::<u64>(16).unwrap();
    let outer = spawn(move || {
        // SAFETY: plain syscall; this child owns the namespaces it creates.
        check(
            unsafe { libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS) },
            "unshare",
        );
        // No /proc while it forks (so the fork handlers cannot read the child's outer pid).
        mount_on_proc(c"tmpfs", c"");
        // SAFETY: this process is single-threaded (a forked test child).
        let init = unsafe {
            procshare::Process::fork_unchecked(move || {
                mount_on_proc(c"proc", c"");
                let worker = spawn(move || {
                    // Pid 2 in here: a live sender, quiet for a while, then refused.
                    std::thread::sleep(Duration::from_millis(1500));
                    let message = panic_message(|| {
                        let _ = tx.send_timeout(7, Duration::from_secs(1));
                    });
                    assert_says_pid_namespace(&message);
                    let message = panic_message(|| {
                        let _ = tx.try_send(8);
                    });
                    assert_says_pid_namespace(&message);
                });
                join(worker, LIMIT);
            })
        }
        .unwrap();
        assert!(
            init.join().is_ok(),
            "the sender in the namespace was not refused as it should be (see above)"
        );
    });
    // While the foreign sender lives: connected (it cannot be judged), nothing arrives.
    let start = Instant::now();
    let got = rx.recv_timeout(Duration::from_secs(1));
    assert_eq!(
        got,
        Err(RecvTimeoutError::Timeout),
        "a live sender in a child pid namespace was judged dead after {:?}",
        start.elapsed()
    );
    join(outer, LIMIT);
    // Every sender handle is gone now (dropped in every process): disconnected, and
    // nothing was sent.
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Err(RecvTimeoutError::Disconnected)
    );
}

/// F02: a sender in a child pid namespace that would claim a slot and be slow is refused
/// before it claims anything, so nobody "repairs" its claim: nothing is lost, the channel
/// is never corrupted.
fn a_channel_sender_in_a_child_pid_namespace_claims_nothing() {
    if !is_root() {
        return skip("f02", "needs root to unshare a pid namespace");
    }
    let (tx, rx) = procshare::channel::<u64>(16).unwrap();
    let done = Shared::new(Event::new()).unwrap();
    let outer = spawn(|| {
        let ok = in_new_pid_namespace(|| {
            let message = panic_message(|| {
                tx.__send_stalled_after_claim(42, || {
                    std::thread::sleep(Duration::from_millis(800));
                });
            });
            assert_says_pid_namespace(&message);
            let message = panic_message(|| {
                let _ = rx.try_recv();
            });
            assert_says_pid_namespace(&message);
            done.set();
            // Alive a while longer, holding both ends.
            std::thread::sleep(Duration::from_millis(500));
        });
        assert!(ok, "the sender in the child pid namespace was not refused");
    });
    assert!(done.wait_timeout(Duration::from_secs(5)));
    assert_eq!(
        rx.recv_timeout(Duration::from_millis(300)),
        Err(RecvTimeoutError::Timeout),
        "nothing was sent"
    );
    join(outer, LIMIT);
    for i in 100..120 {
        tx.send_timeout(i, Duration::from_secs(1)).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(1)), Ok(i));
    }
    assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
}

fn stall_one_second() {
    std::thread::sleep(Duration::from_millis(1000));
}

/// F03: a reader in a child pid namespace is refused before it claims a record, so no
/// producer frees the room of a "dead" reader while it reads (a data race under a live
/// `&[u8]` before the fix).
fn a_byte_queue_reader_in_a_child_pid_namespace_is_refused_and_robs_nobody() {
    if !is_root() {
        return skip("f03", "needs root to unshare a pid namespace");
    }
    let q = ByteQueue::builder().capacity(4096).bytes().unwrap();
    for b in [0xa1u8, 0xb2, 0xc3] {
        q.send(&[b; 1000]).unwrap();
    }
    let outer = spawn(|| {
        let ok = in_new_pid_namespace(|| {
            // Before the fix this reader claimed the first message and stalled here.
            ByteQueue::__stall_at(
                Some("claim: head advanced, count not decremented"),
                stall_one_second,
            );
            let got = q.recv_with(|b| b.len() == 1000 && b.iter().all(|&x| x == 0xa1));
            assert_eq!(got, Err(QueueError::ForeignPidNamespace));
            assert_says_pid_namespace(&QueueError::ForeignPidNamespace.to_string());
            assert_eq!(
                q.send(&[1; 10]),
                Err(QueueError::ForeignPidNamespace),
                "sends are refused too"
            );
            // Alive and holding its handle a while longer.
            std::thread::sleep(Duration::from_millis(800));
        });
        assert!(ok, "the reader in the child pid namespace was not refused");
    });
    std::thread::sleep(Duration::from_millis(300));
    // 2000 bytes need room the three messages still take.
    let sent = q.send_timeout(&[0xee; 2000], Duration::from_millis(500));
    join(outer, LIMIT);
    assert_eq!(
        sent,
        Err(QueueError::Timeout),
        "a producer took room from messages nobody received"
    );
    for b in [0xa1u8, 0xb2, 0xc3] {
        assert_eq!(
            q.recv_with_timeout(Duration::from_secs(1), <[u8]>::to_vec),
            Ok(vec![b; 1000])
        );
    }
}

/// spsc owner words are process identities: an end used from a child pid namespace is
/// refused before ownership is taken, and the ends keep working here.
fn an_spsc_end_in_a_child_pid_namespace_is_refused() {
    if !is_root() {
        return skip("spsc", "needs root to unshare a pid namespace");
    }
    let (tx, rx) = procshare::spsc::<u64>(8).unwrap();
    tx.send(1).unwrap();
    let outer = spawn(|| {
        let ok = in_new_pid_namespace(|| {
            assert_says_pid_namespace(&panic_message(|| {
                let _ = rx.try_recv();
            }));
            assert_says_pid_namespace(&panic_message(|| {
                let _ = tx.try_send(2);
            }));
        });
        assert!(
            ok,
            "the spsc ends were not refused in the child pid namespace"
        );
    });
    join(outer, LIMIT);
    tx.send(3).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(1)), Ok(1));
    assert_eq!(rx.recv_timeout(Duration::from_secs(1)), Ok(3));
}
