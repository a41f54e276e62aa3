//! Death needs proof: owners that the checker cannot see, that live in another pid
//! namespace, that recycled a dead owner's tid, or whose main thread has exited are alive;
//! owners the kernel says are gone are recovered even where `/proc` is missing.
//!
//! Several tests change namespaces, mounts or user ids inside a forked child; they need
//! root (or the matching capabilities) and print why they were skipped otherwise.

mod common;

use common::ns::*;

use std::time::{Duration, Instant};

use procshare::{Mutex, ProcessError, Queue, QueueError, RawMutex, Segment, Shared, channel};

fn main() {
    common::run(
        tests![
            holder_hidden_by_hidepid_is_not_robbed,
            non_dumpable_holder_hidden_from_its_own_user_is_not_robbed,
            holder_is_not_robbed_where_there_is_no_proc,
            dead_holder_is_recovered_where_there_is_no_proc,
            holder_in_parent_pid_namespace_is_not_robbed,
            holder_in_child_pid_namespace_is_not_robbed,
            stopped_owner_with_a_recycled_tid_is_not_robbed,
            lock_of_an_exited_main_thread_is_recovered_while_its_process_runs,
            sender_whose_main_thread_exited_still_counts,
            sender_hidden_by_hidepid_keeps_the_queue_connected,
            segment_of_a_creator_whose_main_thread_exited_is_not_stale,
        ],
        &[],
    )
}

/// A lock held by this process until the returned child (a waiter set up by `setup`) has
/// checked that it cannot take it within 300 ms, even after several liveness checks.
fn waiter_must_not_take_a_live_lock(setup: fn()) {
    let lock = Shared::new(Mutex::new(0u32)).unwrap();
    let guard = lock.lock().unwrap();
    let waiter = common::spawn(|| {
        setup();
        let start = Instant::now();
        let r = lock.lock_timeout(Duration::from_millis(300));
        assert!(
            matches!(r, Err(std::sync::TryLockError::WouldBlock)),
            "took the lock of a live holder after {:?}",
            start.elapsed()
        );
        // SAFETY: _exit is async-signal-safe; the child must not unlock anything of ours.
        unsafe { libc::_exit(0) }
    });
    common::join(waiter, Duration::from_secs(10));
    assert!(!lock.is_poisoned());
    drop(guard);
    // Had the waiter robbed us, our unlock would have released its lock instead.
    assert!(!lock.raw().is_locked());
}

fn holder_hidden_by_hidepid_is_not_robbed() {
    if !is_root() {
        return skip("hidepid", "needs root to mount /proc and change uid");
    }
    waiter_must_not_take_a_live_lock(|| {
        remount_proc(c"proc", c"hidepid=2");
        become_nobody();
    });
}

fn non_dumpable_holder_hidden_from_its_own_user_is_not_robbed() {
    if !is_root() {
        return skip("non-dumpable", "needs root to mount /proc and change uid");
    }
    let lock = Shared::new(Mutex::new(0u32)).unwrap();
    let ready = Shared::new(procshare::Event::new()).unwrap();
    let done = Shared::new(procshare::Event::new()).unwrap();
    let holder = common::spawn(|| {
        become_nobody();
        // SAFETY: prctl with integer arguments.
        check(
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) },
            "PR_SET_DUMPABLE",
        );
        let _g = lock.lock().unwrap();
        ready.set();
        assert!(done.wait_timeout(Duration::from_secs(10)));
    });
    assert!(ready.wait_timeout(Duration::from_secs(5)));
    let waiter = common::spawn(|| {
        remount_proc(c"proc", c"hidepid=2");
        become_nobody();
        assert!(matches!(
            lock.lock_timeout(Duration::from_millis(300)),
            Err(std::sync::TryLockError::WouldBlock)
        ));
    });
    common::join(waiter, Duration::from_secs(10));
    done.set();
    common::join(holder, Duration::from_secs(10));
    assert!(!lock.is_poisoned());
}

fn holder_is_not_robbed_where_there_is_no_proc() {
    if !is_root() {
        return skip("no /proc", "needs root to mount over /proc");
    }
    waiter_must_not_take_a_live_lock(|| remount_proc(c"tmpfs", c"size=4k"));
}

fn dead_holder_is_recovered_where_there_is_no_proc() {
    if !is_root() {
        return skip("no /proc, dead holder", "needs root to mount over /proc");
    }
    let lock = Shared::new(Mutex::new(7u32)).unwrap();
    let holder = common::spawn(|| {
        std::mem::forget(lock.lock().unwrap());
        std::thread::sleep(Duration::from_secs(60));
    });
    common::wait_for("the holder to lock", Duration::from_secs(5), || {
        lock.raw().is_locked()
    });
    holder.kill().unwrap();
    let _ = holder.join();
    let waiter = common::spawn(|| {
        remount_proc(c"tmpfs", c"size=4k");
        // kill(tid, 0) answers ESRCH: proof enough without /proc.
        let g = lock.lock_timeout(Duration::from_secs(5));
        let g = g.expect_err("the dead holder's lock comes back poisoned");
        match g {
            std::sync::TryLockError::Poisoned(p) => assert_eq!(*p.into_inner(), 7),
            std::sync::TryLockError::WouldBlock => panic!("a dead holder kept the lock"),
        }
    });
    common::join(waiter, Duration::from_secs(10));
}

fn holder_in_parent_pid_namespace_is_not_robbed() {
    if !is_root() {
        return skip("pid namespace", "needs root to unshare a pid namespace");
    }
    let lock = Shared::new(Mutex::new(0u32)).unwrap();
    let guard = lock.lock().unwrap();
    let outer = common::spawn(|| {
        let ok = in_new_pid_namespace(|| {
            let start = Instant::now();
            let r = lock.lock_timeout(Duration::from_millis(300));
            assert!(
                matches!(r, Err(std::sync::TryLockError::WouldBlock)),
                "a waiter in a child pid namespace took a live holder's lock after {:?}",
                start.elapsed()
            );
        });
        assert!(ok, "the waiter in the new pid namespace failed");
    });
    common::join(outer, Duration::from_secs(10));
    assert!(!lock.is_poisoned());
    drop(guard);
}

fn holder_in_child_pid_namespace_is_not_robbed() {
    if !is_root() {
        return skip("pid namespace", "needs root to unshare a pid namespace");
    }
    let lock = Shared::new(Mutex::new(0u32)).unwrap();
    let ready = Shared::new(procshare::Event::new()).unwrap();
    let done = Shared::new(procshare::Event::new()).unwrap();
    let outer = common::spawn(|| {
        let ok = in_new_pid_namespace(|| {
            // Pid 1 here; seen from outside, "1" is init, which started at another time.
            let _g = lock.lock().unwrap();
            ready.set();
            assert!(done.wait_timeout(Duration::from_secs(10)));
        });
        assert!(ok);
    });
    assert!(ready.wait_timeout(Duration::from_secs(5)));
    let start = Instant::now();
    let r = lock.lock_timeout(Duration::from_millis(300));
    assert!(
        matches!(r, Err(std::sync::TryLockError::WouldBlock)),
        "took the lock of a live holder in a child pid namespace after {:?}",
        start.elapsed()
    );
    done.set();
    common::join(outer, Duration::from_secs(10));
    assert!(!lock.is_poisoned());
}

/// Sets the pid the kernel hands out next to `pid` (root only); false if not possible.
fn next_pid_will_be(pid: u32) -> bool {
    std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1)).is_ok()
}

fn stopped_owner_with_a_recycled_tid_is_not_robbed() {
    if !is_root() {
        return skip("recycled tid", "needs root to write ns_last_pid");
    }
    let lock = Shared::new(RawMutex::new()).unwrap();
    // Other processes on the machine take pids too: retry until both children get the
    // same one.
    for _attempt in 0..20 {
        let target = 30_000 + (std::process::id() % 2000);
        if !next_pid_will_be(target) {
            return skip("recycled tid", "ns_last_pid is not writable");
        }
        // The first owner: locks and unlocks, leaving whatever it leaves behind.
        let first = common::spawn(|| {
            if std::process::id() != target {
                // SAFETY: _exit is always safe to call.
                unsafe { libc::_exit(3) }
            }
            lock.lock();
            // SAFETY: locked just above by this thread.
            unsafe { lock.unlock() };
        });
        if matches!(first.join(), Err(ProcessError::Exited(3))) {
            continue;
        }
        // A later start time (in clock ticks) for the second owner with the same tid.
        std::thread::sleep(Duration::from_millis(30));
        if !next_pid_will_be(target) {
            return skip("recycled tid", "ns_last_pid is not writable");
        }
        let mut second = common::spawn(|| {
            if std::process::id() != target {
                // SAFETY: _exit is always safe to call.
                unsafe { libc::_exit(3) }
            }
            lock.__lock_stalled_before_record(|| {
                // Stopped between the compare-and-swap and the owner record store.
                // SAFETY: raise with a valid signal number.
                unsafe { libc::raise(libc::SIGSTOP) };
            });
            std::thread::sleep(Duration::from_secs(60));
        });
        common::wait_for("the second owner to lock", Duration::from_secs(5), || {
            lock.is_locked()
        });
        if let Some(outcome) = second.try_join() {
            assert!(
                matches!(outcome, Err(ProcessError::Exited(3))),
                "{outcome:?}"
            );
            continue;
        }
        let start = Instant::now();
        let taken = lock.lock_timeout(Duration::from_millis(400));
        let waited = start.elapsed();
        second.kill().unwrap();
        let _ = second.join();
        assert!(
            !taken,
            "robbed a live, stopped owner whose tid was recycled, after {waited:?}"
        );
        // Once it is really dead, the lock comes back (poisoned).
        assert!(lock.lock_timeout(Duration::from_secs(5)));
        assert!(lock.is_poisoned());
        return;
    }
    skip(
        "recycled tid",
        "could not get the same pid twice (busy machine)",
    );
}

fn exit_main_thread_keeping(f: impl FnOnce() + Send + 'static) -> ! {
    std::thread::spawn(f);
    // SAFETY: SYS_exit ends only the calling (main) thread, without unwinding; the process
    // lives on in the spawned thread, which ends the whole process with _exit when done.
    unsafe { libc::syscall(libc::SYS_exit, 0) };
    unreachable!("SYS_exit returned")
}

fn lock_of_an_exited_main_thread_is_recovered_while_its_process_runs() {
    let lock = Shared::new(Mutex::new(1u32)).unwrap();
    let done = Shared::new(procshare::Event::new()).unwrap();
    let holder = common::spawn(|| {
        std::mem::forget(lock.lock().unwrap());
        let done = done.clone();
        exit_main_thread_keeping(move || {
            assert!(done.wait_timeout(Duration::from_secs(20)));
            // SAFETY: _exit is always safe to call.
            unsafe { libc::_exit(0) }
        });
    });
    common::wait_for("the holder to lock", Duration::from_secs(5), || {
        lock.raw().is_locked()
    });
    // The main thread is a zombie now; the thread that held the lock is gone.
    let g = lock.lock_timeout(Duration::from_secs(5));
    match g {
        Err(std::sync::TryLockError::Poisoned(p)) => assert_eq!(*p.into_inner(), 1),
        Err(std::sync::TryLockError::WouldBlock) => {
            panic!("a lock held by an exited main thread was never recovered")
        }
        Ok(_) => panic!("the lock was not held"),
    }
    assert!(holder.is_alive(), "the process must still run");
    done.set();
    let _ = holder.join();
}

fn sender_whose_main_thread_exited_still_counts() {
    let (tx, rx) = channel::<u64>(16).unwrap();
    let go = Shared::new(procshare::Event::new()).unwrap();
    let sender = common::spawn(|| {
        let go = go.clone();
        let tx = tx.clone();
        exit_main_thread_keeping(move || {
            assert!(go.wait_timeout(Duration::from_secs(20)));
            for i in 0..3 {
                tx.send(i).unwrap();
            }
            // SAFETY: _exit is always safe to call.
            unsafe { libc::_exit(0) }
        });
    });
    drop(tx);
    // The sender's main thread is a zombie; its other thread is about to send.
    std::thread::sleep(Duration::from_millis(100));
    match rx.recv_timeout(Duration::from_millis(200)) {
        Err(procshare::RecvTimeoutError::Timeout) => {}
        other => panic!("expected a timeout while the sender lives, got {other:?}"),
    }
    go.set();
    for i in 0..3 {
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), i);
    }
    common::join(sender, Duration::from_secs(10));
}

fn sender_hidden_by_hidepid_keeps_the_queue_connected() {
    if !is_root() {
        return skip("hidepid queue", "needs root to mount /proc and change uid");
    }
    let (tx, rx) = channel::<u32>(8).unwrap();
    let (qtx, qrx) = Queue::<u32>::new().unwrap().split().unwrap();
    let done = Shared::new(procshare::Event::new()).unwrap();
    // The only senders live in a root process that the receiver cannot see in /proc. (A
    // forked child inherits every handle its parent holds, so the senders move into the
    // sender's closure before the receiver is forked.)
    let waiting = done.clone();
    let sender = common::spawn(move || {
        let _keep = (tx, qtx);
        assert!(waiting.wait_timeout(Duration::from_secs(20)));
    });
    let receiver = common::spawn(|| {
        remount_proc(c"proc", c"hidepid=2");
        become_nobody();
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(300)),
            Err(procshare::RecvTimeoutError::Timeout),
            "a channel whose sender lives was reported disconnected"
        );
        assert_eq!(
            qrx.get_timeout(Duration::from_millis(300)),
            Err(QueueError::Timeout),
            "a queue whose sender lives was reported disconnected"
        );
    });
    common::join(receiver, Duration::from_secs(10));
    done.set();
    let _ = sender.join();
    // Control: with the sender gone, the same receivers learn it.
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Err(procshare::RecvTimeoutError::Disconnected)
    );
    assert_eq!(
        qrx.get_timeout(Duration::from_secs(5)),
        Err(QueueError::Disconnected)
    );
}

fn segment_of_a_creator_whose_main_thread_exited_is_not_stale() {
    let name = common::unique_name("zombie-main");
    let ready = Shared::new(procshare::Event::new()).unwrap();
    let done = Shared::new(procshare::Event::new()).unwrap();
    let creator = common::spawn(|| {
        let segment = Segment::create(&name, 64).unwrap();
        let (ready, done) = (ready.clone(), done.clone());
        exit_main_thread_keeping(move || {
            ready.set();
            assert!(done.wait_timeout(Duration::from_secs(20)));
            drop(segment);
            // SAFETY: _exit is always safe to call.
            unsafe { libc::_exit(0) }
        });
    });
    assert!(ready.wait_timeout(Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(50)); // the main thread is a zombie by now
    let info = Segment::list()
        .unwrap()
        .into_iter()
        .find(|i| i.name == name)
        .expect("listed");
    assert_eq!(info.creator_alive, Some(true), "{info:?}");
    let removed = Segment::remove_stale().unwrap();
    assert!(!removed.contains(&name), "removed a live creator's segment");
    assert!(Segment::open(&name).is_ok());
    done.set();
    let _ = creator.join();
}
