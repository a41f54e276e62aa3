//! Adversarial review of the fixes for issues 6, 10 and 11: attacks on the promises the
//! module docs make, with real processes, kept as regression tests. (The findings about
//! queues across pid namespaces and kept partial messages live beside the queue tests.)
//!
//! Every test runs in its own forked process under a watchdog (see `common`), and every
//! blocking step inside a test is bounded.

mod common;

use common::ns::*;

use std::time::{Duration, Instant};

use procshare::{
    ByteQueue, Event, Process, Queue, QueueError, RecvTimeoutError, Shared, TryRecvError,
};

use common::{join, spawn};

const LIMIT: Duration = Duration::from_secs(20);

fn main() {
    common::run(
        tests![
            lock_by_a_thread_whose_process_execd_is_recovered,
            waiter_in_a_child_pid_namespace_without_proc_does_not_rob_a_live_holder,
            holder_without_proc_in_a_child_pid_namespace_is_not_robbed,
            guard_moved_into_a_fork_child_does_not_release_another_holders_lock,
            queue_with_impatient_receivers_in_several_processes_delivers_exactly_once,
            panicking_serialize_in_another_process_leaves_the_queue_usable,
            receive_only_handle_polling_learns_the_killed_sender,
            byte_queue_scribbled_positions_give_errors_never_panics_or_hangs,
            channel_scribbled_tail_behind_head_is_corrupted_for_both_sides,
            event_pulse_releases_every_waiting_process,
            semaphore_permit_woken_for_a_killed_waiter_reaches_another,
            panicking_chunked_fill_and_reader_leave_the_byte_queue_usable,
            spsc_sender_used_after_fork_by_both_processes_is_refused,
            more_than_64_processes_hold_senders,
            huge_timeouts_neither_panic_nor_return_early,
            absurd_sizes_are_errors_not_panics,
            barrier_killed_participant_abort_and_reset_across_processes,
            channel_stopped_reader_claim_blocks_only_within_timeouts,
            try_and_timeout_calls_are_on_time_while_stopped_peers_hold_both_locks,
            daemon_child_forked_into_a_new_pid_namespace_runs,
        ],
        &[],
    )
}

// ---- F01/F02: processes in a child pid namespace ------------------------------------------
//
// `liveness` promises "owner recorded in another pid namespace → alive (cannot tell)", and
// the mutex records the owner's namespace for that reason. The queues do not: the peer
// tables, the channel's claims and the ByteQueue's record owners and keeper store bare
// ids, so a process that inherited the queue by fork and lives in a child pid namespace
// (a container started from the process that holds the queue: `unshare -pf`, `bwrap`,
// runc's init) is judged by whatever has *its* id in *our* namespace (pid 1 = init here),
// whose start time differs: "dead".

// ---- F04: `place` over a memmap2::MmapMut ---------------------------------------------------
//
// `Mapping`'s contract says "no `&[u8]` or `&mut [u8]` over them may be alive while a
// placed value is", and the `MmapMut` impl claims `place` holds the borrow that rules that
// out. But `place` takes `&MmapMut`, and `Deref` for `MmapMut` also needs only `&self`: safe
// code holds `&[u8]` and `&Mutex` over the same bytes at once, and the lock's atomic
// stores change bytes under a live shared borrow without `UnsafeCell` (undefined
// behaviour; from another thread it is a plain data race).

// ---- Queue<Vec<u8>>: timeouts mid-message, several receiving processes -----------------

fn queue_with_impatient_receivers_in_several_processes_delivers_exactly_once() {
    const N: u64 = 40;
    const RECEIVERS: u64 = 3;
    let q: Queue<(u64, Vec<u8>)> = Queue::builder()
        .capacity(4096)
        .max_message(1 << 20)
        .build()
        .unwrap();
    let seen = procshare::Array::<u32>::zeroed(64).unwrap();
    let (tx, rx) = q.split().unwrap();
    let producer = spawn({
        let tx = tx.clone();
        move || {
            for i in 0..N {
                let len = 3000 + (i as usize * 977) % 20_000;
                tx.put_timeout(&(i, vec![i as u8; len]), Duration::from_secs(10))
                    .unwrap();
            }
            for _ in 0..RECEIVERS {
                tx.put_timeout(&(u64::MAX, Vec::new()), Duration::from_secs(10))
                    .unwrap();
            }
        }
    });
    drop(tx);
    let receivers: Vec<_> = (0..RECEIVERS)
        .map(|r| {
            let rx = rx.clone();
            let seen = seen.clone();
            spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(15);
                let mut k = 0u64;
                loop {
                    assert!(Instant::now() < deadline, "receiver {r} never finished");
                    k += 1;
                    let got = match (k + r) % 3 {
                        0 => rx.try_get(),
                        1 => rx.get_timeout(Duration::from_micros(200)),
                        _ => rx.get_timeout(Duration::from_millis(5)),
                    };
                    match got {
                        Ok((u64::MAX, _)) => break,
                        Ok((i, v)) => {
                            let len = 3000 + (i as usize * 977) % 20_000;
                            assert_eq!(v.len(), len, "message {i} has the wrong length");
                            assert!(v.iter().all(|&b| b == i as u8), "message {i} is torn");
                            let mut g = seen.lock().unwrap();
                            g[i as usize] += 1;
                        }
                        Err(QueueError::Empty | QueueError::Timeout) => {}
                        Err(e) => panic!("receiver {r}: {e}"),
                    }
                }
            })
        })
        .collect();
    drop(rx);
    join(producer, LIMIT);
    for r in receivers {
        join(r, LIMIT);
    }
    let g = seen.lock().unwrap();
    for i in 0..N as usize {
        assert_eq!(g[i], 1, "message {i} delivered {} times", g[i]);
    }
}

// ---- a panicking Serialize impl -----------------------------------------------------------

struct Bomb(bool);

impl serde::Serialize for Bomb {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(3))?;
        seq.serialize_element(&1u32)?;
        // Explode after a partial write, however many passes the encoder makes.
        if self.0 {
            panic!("boom in Serialize");
        }
        seq.serialize_element(&2u32)?;
        seq.serialize_element(&3u32)?;
        seq.end()
    }
}

impl<'de> serde::Deserialize<'de> for Bomb {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v: Vec<u32> = serde::Deserialize::deserialize(d)?;
        assert_eq!(v, [1, 2, 3]);
        Ok(Bomb(false))
    }
}

fn panicking_serialize_in_another_process_leaves_the_queue_usable() {
    let q: Queue<Bomb> = Queue::builder().capacity(4096).build().unwrap();
    let child = spawn({
        let q = q.clone();
        move || {
            std::panic::set_hook(Box::new(|_| {}));
            for _ in 0..50 {
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| q.put(&Bomb(true))));
                assert!(r.is_err(), "the bomb did not go off");
                q.put(&Bomb(false)).unwrap();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    for i in 0..50 {
        match q.get_timeout(Duration::from_secs(3)) {
            Ok(_) => {}
            Err(e) => panic!("message {i} after a panicking Serialize: {e}"),
        }
    }
    assert_eq!(q.try_get().err(), Some(QueueError::Empty));
    join(child, LIMIT);
}

// ---- Queue roles and polling ------------------------------------------------------------

fn receive_only_handle_polling_learns_the_killed_sender() {
    let q: Queue<u64> = Queue::new().unwrap();
    let (tx, rx) = q.split().unwrap();
    let keep = rx.clone(); // a second receive-only handle here: must not count
    let sender = spawn(move || {
        tx.put(&1).unwrap();
        std::thread::sleep(Duration::from_secs(60));
    });
    assert_eq!(rx.get_timeout(Duration::from_secs(3)), Ok(1));
    sender.kill().unwrap();
    let _ = sender.join();
    let start = Instant::now();
    loop {
        match rx.try_get() {
            Err(QueueError::Disconnected) => break,
            Err(QueueError::Empty) => {}
            other => panic!("{other:?}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "polling never learned that the only sender was killed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(keep);
}

// ---- corrupted shared words ---------------------------------------------------------------

/// xorshift64*: deterministic pseudo-random words for scribbling.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn byte_queue_scribbled_positions_give_errors_never_panics_or_hangs() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..300 {
        let q = ByteQueue::builder()
            .capacity(4096)
            .max_message(1 << 16)
            .bytes()
            .unwrap();
        let other = q.clone(); // a peer handle: so nothing is Disconnected
        for i in 0..(round % 7) {
            let _ = q.try_send(&vec![i as u8; 100 + 700 * (i as usize % 3)]);
        }
        let base = rng.next() % 10_000;
        let pick = |rng: &mut Rng| match rng.next() % 4 {
            0 => base + rng.next() % 64,
            1 => base.wrapping_sub(rng.next() % 8192),
            2 => rng.next(),
            _ => base + 16 * (rng.next() % 300),
        };
        let (f, h, t) = (pick(&mut rng), pick(&mut rng), pick(&mut rng));
        let mut data = vec![0u8; (rng.next() % 4096) as usize];
        for b in data.iter_mut() {
            *b = rng.next() as u8;
        }
        q.__scribble(f, h, t, &data);
        let ops_start = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for _ in 0..4 {
                let _ = q.try_recv_with(|b| b.len());
                let _ = q.recv_with_timeout(Duration::from_millis(5), |b| b.len());
                let _ = q.try_send(&[1u8; 200]);
                let _ = q.send_timeout(&[2u8; 3000], Duration::from_millis(5));
            }
        }));
        assert!(
            r.is_ok(),
            "round {round}: a panic on scribbled positions free={f} head={h} tail={t}"
        );
        assert!(
            ops_start.elapsed() < Duration::from_secs(2),
            "round {round}: bounded calls took {:?} (free={f} head={h} tail={t})",
            ops_start.elapsed()
        );
        drop(other);
    }
}

fn channel_scribbled_tail_behind_head_is_corrupted_for_both_sides() {
    for f in [
        (|t: u64| t.wrapping_sub(3)) as fn(u64) -> u64,
        |_| u64::MAX,
        |t| t.wrapping_add(1 << 40),
    ] {
        let (tx, rx) = procshare::channel::<u64>(8).unwrap();
        for i in 0..4 {
            tx.send(i).unwrap();
        }
        assert_eq!(rx.recv(), Ok(0));
        tx.__scribble_tail(f);
        let start = Instant::now();
        let mut saw_corrupt = false;
        for _ in 0..20 {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Err(RecvTimeoutError::Corrupted(_)) => {
                    saw_corrupt = true;
                    break;
                }
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(e) => panic!("receiver: {e:?}"),
            }
        }
        assert!(start.elapsed() < Duration::from_secs(3));
        if saw_corrupt {
            assert!(matches!(
                tx.send_timeout(9, Duration::from_millis(50)),
                Err(procshare::SendTimeoutError::Corrupted(9))
            ));
        }
    }
}

// ---- F08: a lock holder that exec'd -------------------------------------------------------
//
// The peer tables treat a process that exec'd as holding no handle ("an exec'd image holds
// no procshare handle"), but the mutex judges only the owner thread's existence and start
// time, which `exec` keeps: a main thread that execs while holding a lock (a re-exec'd
// binary, `CommandExt::exec` in a worker) keeps it for the life of the new program, which
// can never unlock it. Every waiter without a timeout hangs.

fn lock_by_a_thread_whose_process_execd_is_recovered() {
    let lock = Shared::new(procshare::Mutex::new(5u32)).unwrap();
    let holder = spawn(|| {
        std::mem::forget(lock.lock().unwrap());
        use std::os::unix::process::CommandExt;
        let e = std::process::Command::new("sleep").arg("30").exec();
        panic!("exec failed: {e}");
    });
    common::wait_for("the holder to lock", Duration::from_secs(5), || {
        lock.raw().is_locked()
    });
    std::thread::sleep(Duration::from_millis(100)); // exec'd by now
    let start = Instant::now();
    let r = lock.lock_timeout(Duration::from_secs(2));
    let waited = start.elapsed();
    let still_running = holder.is_alive();
    holder.kill().unwrap();
    let _ = holder.join();
    assert!(
        still_running,
        "the exec'd program should still run during the test"
    );
    match r {
        Err(std::sync::TryLockError::Poisoned(p)) => assert_eq!(*p.into_inner(), 5),
        Err(std::sync::TryLockError::WouldBlock) => panic!(
            "a lock whose holder's image was replaced by exec was never recovered ({waited:?})"
        ),
        Ok(_) => panic!("the lock was free"),
    }
}

// ---- F09: a waiter with no /proc in a child pid namespace -----------------------------------
//
// The mutex records its owner's pid namespace and never judges an owner of another one.
// But a waiter that cannot read its own namespace (no `/proc`: a sandbox such as `bwrap`
// without `--proc`) has namespace 0, skips that check, and asks `kill(tid, 0)` about the
// holder's tid *in its own namespace*, where the holder (of the parent namespace) is not
// visible: ESRCH, "dead". The live holder is robbed, and both have `&mut` to the data.

fn waiter_in_a_child_pid_namespace_without_proc_does_not_rob_a_live_holder() {
    if !is_root() {
        return skip("f09", "needs root to unshare a pid namespace");
    }
    let lock = Shared::new(procshare::Mutex::new(0u32)).unwrap();
    let guard = lock.lock().unwrap();
    let outer = spawn(|| {
        let ok = in_new_pid_namespace_with_proc(c"tmpfs", || {
            let start = Instant::now();
            let r = lock.lock_timeout(Duration::from_millis(300));
            assert!(
                matches!(r, Err(std::sync::TryLockError::WouldBlock)),
                "a waiter in a child pid namespace without /proc took a live holder's lock \
                 after {:?}",
                start.elapsed()
            );
            // SAFETY: _exit is async-signal-safe; leave without unlocking anything.
            unsafe { libc::_exit(0) }
        });
        assert!(ok, "the waiter robbed the live holder (see above)");
    });
    join(outer, LIMIT);
    assert!(!lock.is_poisoned());
    drop(guard);
    assert!(
        !lock.raw().is_locked(),
        "our unlock released someone else's lock"
    );
}

/// The other direction: the holder has no `/proc` (so its record carries no namespace and
/// no start time) and sits in a child pid namespace under a tid that names nothing in ours:
/// our `kill(tid, 0)` answers ESRCH, and the live holder is robbed.
fn holder_without_proc_in_a_child_pid_namespace_is_not_robbed() {
    if !is_root() {
        return skip("f09b", "needs root to unshare a pid namespace");
    }
    // A pid that names no task in our namespace.
    // SAFETY: kill with signal 0 only checks existence.
    let target = (31_000..32_000)
        .find(|&p| unsafe { libc::kill(p, 0) } != 0)
        .unwrap();
    let lock = Shared::new(procshare::Mutex::new(0u32)).unwrap();
    let ready = Shared::new(Event::new()).unwrap();
    let done = Shared::new(Event::new()).unwrap();
    let outer = spawn(|| {
        // SAFETY: plain syscall; this child owns the namespaces it creates.
        check(
            unsafe { libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS) },
            "unshare",
        );
        let init = spawn(|| {
            // Pid 1 of the namespace: pick the holder's pid there, then hide /proc.
            mount_on_proc(c"proc", c"");
            std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", target - 1)).unwrap();
            mount_on_proc(c"tmpfs", c"");
            // SAFETY: single-threaded; `Process::fork` needs /proc to count threads.
            let holder = unsafe {
                Process::fork_unchecked(|| {
                    assert_eq!(std::process::id() as i32, target);
                    let _g = lock.lock().unwrap();
                    ready.set();
                    assert!(done.wait_timeout(Duration::from_secs(10)));
                })
            }
            .unwrap();
            assert!(holder.join().is_ok(), "the holder failed");
        });
        join(init, LIMIT);
    });
    assert!(
        ready.wait_timeout(Duration::from_secs(5)),
        "the holder never locked"
    );
    let start = Instant::now();
    let r = lock.lock_timeout(Duration::from_millis(300));
    let waited = start.elapsed();
    let robbed = !matches!(r, Err(std::sync::TryLockError::WouldBlock));
    drop(r);
    done.set();
    join(outer, LIMIT);
    assert!(
        !robbed,
        "took the lock of a live holder (no /proc, child pid namespace) after {waited:?}"
    );
}

// ---- F10: a guard that crossed a fork -----------------------------------------------------
//
// `MutexGuard` is `!Send` ("the owner's identity is the locking thread's"), but
// `Process::fork` takes any `FnOnce` (it must, to let children capture), so a guard can
// be moved into a child. The parent's copy is released when `fork` returns (the closure is
// dropped there), and the child's copy later: `RawMutex::unlock` swaps the word to 0
// without checking who holds it, so the child frees whoever holds the lock by then.
// Safe code, two holders.

fn guard_moved_into_a_fork_child_does_not_release_another_holders_lock() {
    let lock = Shared::new(procshare::Mutex::new(0u32)).unwrap();
    let inside = Shared::new(Event::new()).unwrap();
    let guard = lock.lock().unwrap();
    let child = Process::fork(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(guard); // the child's copy of the parent's guard
    })
    .unwrap();
    // The parent's copy went with the closure: the lock is free; a third process takes it
    // and holds it for a second.
    let holder = spawn(|| {
        let _g = lock.lock_timeout(Duration::from_secs(2)).unwrap();
        inside.set();
        std::thread::sleep(Duration::from_secs(1));
    });
    assert!(inside.wait_timeout(Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(400)); // the child has dropped its copy
    let r = lock.lock_timeout(Duration::from_millis(200));
    let second_holder = r.is_ok();
    drop(r);
    join(child, LIMIT);
    join(holder, LIMIT);
    assert!(
        !second_holder,
        "took a lock another process holds: a guard dropped in a fork child released it"
    );
}

// ---- F07: documentation -------------------------------------------------------------------

// ---- held: Event, Semaphore, loans that unwind, spsc ownership, many processes -------------

fn event_pulse_releases_every_waiting_process() {
    let ev = Shared::new(Event::new()).unwrap();
    let waiting = Shared::new(procshare::Semaphore::new(0)).unwrap();
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let (ev, waiting) = (ev.clone(), waiting.clone());
            spawn(move || {
                waiting.release().unwrap();
                assert!(ev.wait_timeout(Duration::from_secs(5)), "missed the pulse");
            })
        })
        .collect();
    for _ in 0..8 {
        assert!(waiting.acquire_timeout(Duration::from_secs(5)));
    }
    std::thread::sleep(Duration::from_millis(100)); // let them fall asleep
    ev.set();
    ev.clear();
    for w in waiters {
        join(w, LIMIT);
    }
}

fn semaphore_permit_woken_for_a_killed_waiter_reaches_another() {
    for _ in 0..5 {
        let sem = Shared::new(procshare::Semaphore::new(0)).unwrap();
        let first = spawn({
            let sem = sem.clone();
            move || {
                sem.acquire();
                std::thread::sleep(Duration::from_secs(60));
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        // Stop the first waiter so it cannot take the permit it is woken for, then kill it.
        first.signal(libc::SIGSTOP).unwrap();
        let second = spawn({
            let sem = sem.clone();
            move || assert!(sem.acquire_timeout(Duration::from_secs(2)), "permit lost")
        });
        std::thread::sleep(Duration::from_millis(50));
        sem.release().unwrap();
        first.kill().unwrap();
        let _ = first.join();
        join(second, LIMIT);
    }
}

fn panicking_chunked_fill_and_reader_leave_the_byte_queue_usable() {
    let q = ByteQueue::builder().capacity(4096).bytes().unwrap();
    let child = spawn({
        let q = q.clone();
        move || {
            std::panic::set_hook(Box::new(|_| {}));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                q.send_with(100_000, |buf| {
                    buf[..10].fill(7);
                    panic!("fill fails");
                })
            }));
            assert!(r.is_err());
            q.send(&[5u8; 20_000]).unwrap();
            q.send(b"tail").unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    std::panic::set_hook(Box::new(|_| {}));
    // A reader that panics on the chunked message: it counts as consumed.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        q.recv_with_timeout(Duration::from_secs(3), |b| {
            assert_eq!(b.len(), 20_000);
            panic!("reader fails");
        })
    }));
    assert!(r.is_err());
    let _ = std::panic::take_hook();
    assert_eq!(
        q.recv_with_timeout(Duration::from_secs(3), |b| b.to_vec()),
        Ok(b"tail".to_vec())
    );
    join(child, LIMIT);
}

fn spsc_sender_used_after_fork_by_both_processes_is_refused() {
    let (tx, rx) = procshare::spsc::<u64>(64).unwrap();
    tx.send(1).unwrap();
    let child = spawn(|| {
        std::panic::set_hook(Box::new(|_| {}));
        std::thread::sleep(Duration::from_millis(100));
        // The parent used the sender first after the fork: ours must be refused.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tx.send(2)));
        assert!(
            r.is_err(),
            "a second live process used the same spsc sender"
        );
        // SAFETY: _exit is async-signal-safe; skip the handles' destructors.
        unsafe { libc::_exit(0) }
    });
    tx.send(3).unwrap();
    join(child, LIMIT);
    assert_eq!(rx.recv_timeout(Duration::from_secs(1)), Ok(1));
    assert_eq!(rx.recv_timeout(Duration::from_secs(1)), Ok(3));
    assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
}

fn more_than_64_processes_hold_senders() {
    let (tx, rx) = procshare::channel::<u64>(256).unwrap();
    let go = Shared::new(Event::new()).unwrap();
    let children: Vec<_> = (0..100u64)
        .map(|i| {
            let (tx, go) = (tx.clone(), go.clone());
            spawn(move || {
                let mine = tx.clone(); // a handle created in this process: its own slot
                drop(tx);
                assert!(go.wait_timeout(Duration::from_secs(10)));
                mine.send(i).unwrap();
            })
        })
        .collect();
    drop(tx);
    go.set();
    let mut got: Vec<u64> = (0..100)
        .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    for c in children {
        join(c, LIMIT);
    }
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(3)),
        Err(RecvTimeoutError::Disconnected)
    );
}

fn try_and_timeout_calls_are_on_time_while_stopped_peers_hold_both_locks() {
    let q: Queue<Vec<u8>> = Queue::builder().capacity(4096).build().unwrap();
    let producer = spawn({
        let q = q.clone();
        move || q.put(&vec![9u8; 50_000]).unwrap()
    });
    // The producer streams its chunks under the producer lock and waits for room: stop it
    // there. Then a consumer drains the ring under the consumer lock and waits for the
    // rest: stop it there too.
    std::thread::sleep(Duration::from_millis(100));
    producer.signal(libc::SIGSTOP).unwrap();
    let consumer = spawn({
        let q = q.clone();
        move || assert_eq!(q.get().unwrap().len(), 50_000)
    });
    std::thread::sleep(Duration::from_millis(100));
    consumer.signal(libc::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let timed = |what: &str, limit: Duration, f: &dyn Fn() -> Result<(), QueueError>| {
        let start = Instant::now();
        let r = f();
        let took = start.elapsed();
        assert!(r.is_err(), "{what}: {r:?}");
        assert!(took < limit, "{what} took {took:?} ({r:?})");
    };
    timed("try_put", Duration::from_millis(50), &|| {
        q.try_put(&vec![1])
    });
    timed("try_get", Duration::from_millis(50), &|| {
        q.try_get().map(drop)
    });
    timed("put_timeout(100 ms)", Duration::from_millis(300), &|| {
        q.put_timeout(&vec![1; 3000], Duration::from_millis(100))
    });
    timed("get_timeout(100 ms)", Duration::from_millis(300), &|| {
        q.get_timeout(Duration::from_millis(100)).map(drop)
    });
    producer.signal(libc::SIGCONT).unwrap();
    consumer.signal(libc::SIGCONT).unwrap();
    join(producer, LIMIT);
    join(consumer, LIMIT);
}

fn huge_timeouts_neither_panic_nor_return_early() {
    // Beyond i64::MAX seconds from now a timespec goes negative; Duration::MAX overflows.
    for huge in [Duration::from_secs(1 << 63), Duration::MAX] {
        let ev = Shared::new(Event::new()).unwrap();
        let lock = Shared::new(procshare::Mutex::new(0u8)).unwrap();
        let (tx, rx) = procshare::channel::<u8>(4).unwrap();
        let guard = lock.lock().unwrap();
        let t0 = Instant::now(); // CLOCK_MONOTONIC: the same clock in the child
        let child = spawn(|| {
            let ok = ev.wait_timeout(huge);
            let e = t0.elapsed();
            assert!(
                ok && e >= Duration::from_millis(200),
                "Event {huge:?}: {ok} after {e:?}"
            );
            let ok = lock.lock_timeout(huge).is_ok();
            let e = t0.elapsed();
            assert!(
                ok && e >= Duration::from_millis(200),
                "Mutex {huge:?}: {ok} after {e:?}"
            );
            assert_eq!(rx.recv_timeout(huge), Ok(7), "channel {huge:?}");
        });
        std::thread::sleep(Duration::from_millis(200));
        ev.set();
        drop(guard);
        tx.send(7).unwrap();
        join(child, LIMIT);
    }
}

fn absurd_sizes_are_errors_not_panics() {
    let r = std::panic::catch_unwind(|| {
        for cap in [0usize, 1, usize::MAX, usize::MAX / 2 + 2, 1 << 62] {
            let _ = ByteQueue::builder().capacity(cap).bytes();
            let _ = ByteQueue::builder().capacity(4096).max_message(cap).bytes();
            let _ = procshare::channel::<u64>(cap);
            let _ = procshare::spsc::<u64>(cap);
            let _ = procshare::Array::<u64>::zeroed(cap);
            let _ = procshare::Segment::anonymous(cap);
        }
    });
    assert!(
        r.is_ok(),
        "a size argument panicked instead of returning an error"
    );
    // A zero-capacity channel/spsc either is refused or works within its bound.
    if let Ok((tx, rx)) = procshare::channel::<u64>(0) {
        let _ = tx.try_send(1);
        let _ = rx.try_recv();
    }
}

fn barrier_killed_participant_abort_and_reset_across_processes() {
    let b = Shared::new(procshare::Barrier::new(3)).unwrap();
    // One participant arrives and is killed while waiting; another never arrives.
    let doomed = spawn({
        let b = b.clone();
        move || {
            let _ = b.wait();
        }
    });
    common::wait_for("the doomed arrival", Duration::from_secs(5), || {
        b.n_waiting() == 1
    });
    doomed.kill().unwrap();
    let _ = doomed.join();
    // A survivor waits with a timeout, learns nothing came, and aborts for everyone.
    let survivor = spawn({
        let b = b.clone();
        move || match b.wait_timeout(Duration::from_secs(5)) {
            Err(procshare::Error::BarrierBroken) => {}
            other => panic!("survivor: {other:?}"),
        }
    });
    common::wait_for("the survivor", Duration::from_secs(5), || {
        b.n_waiting() == 2
    });
    // The dead arrival still counts (documented): a third caller would complete the round
    // alone, so abort instead.
    b.abort();
    join(survivor, LIMIT);
    assert!(matches!(b.wait(), Err(procshare::Error::BarrierBroken)));
    b.reset();
    assert_eq!(b.n_waiting(), 0);
    // A full, fresh round across processes.
    let others: Vec<_> = (0..2)
        .map(|_| {
            let b = b.clone();
            spawn(move || {
                b.wait_timeout(Duration::from_secs(5)).unwrap();
            })
        })
        .collect();
    b.wait_timeout(Duration::from_secs(5)).unwrap();
    for o in others {
        join(o, LIMIT);
    }
}

fn channel_stopped_reader_claim_blocks_only_within_timeouts() {
    let (tx, rx) = procshare::channel::<u64>(4).unwrap();
    for i in 0..4 {
        tx.send(i).unwrap();
    }
    let reader = spawn({
        let rx = rx.clone();
        move || {
            let v = rx.__recv_stalled_after_claim(|| {
                // SAFETY: raise with a valid signal number.
                unsafe { libc::raise(libc::SIGSTOP) };
            });
            assert_eq!(v, 0);
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    // The stopped reader holds slot 0's claim; the other three are readable.
    for i in 1..4 {
        assert_eq!(rx.recv_timeout(Duration::from_secs(1)), Ok(i));
    }
    // The next position to send maps onto the claimed slot: producers must wait for the
    // live reader, and return on time.
    let start = Instant::now();
    assert!(matches!(
        tx.try_send(99),
        Err(procshare::TrySendError::Full(99))
    ));
    assert!(matches!(
        tx.send_timeout(99, Duration::from_millis(100)),
        Err(procshare::SendTimeoutError::Timeout(99))
    ));
    assert!(start.elapsed() < Duration::from_millis(400));
    // Once the reader is killed (its message lost with it), the slot comes back.
    reader.kill().unwrap();
    let _ = reader.join();
    for i in 4..8 {
        tx.send_timeout(i, Duration::from_secs(2)).unwrap();
    }
    for i in 4..8 {
        assert_eq!(rx.recv_timeout(Duration::from_secs(1)), Ok(i));
    }
}

// ---- A daemon child forked into a new pid namespace --------------------------------------
//
// A daemon child arms PDEATHSIG and then checks that its parent is still the one that
// forked it (the parent may have died before the signal was armed). After
// `unshare(CLONE_NEWPID)` the child is pid 1 of the new namespace and its parent lies
// outside it, so `getppid()` is 0 there, never the parent's pid: the check must not take
// that for a dead parent.

fn daemon_child_forked_into_a_new_pid_namespace_runs() {
    if !is_root() {
        return skip(
            "daemon in a new pid namespace",
            "needs root to unshare a pid namespace",
        );
    }
    let outer = spawn(|| {
        // SAFETY: plain syscall; this child owns the namespace it creates.
        check(
            unsafe { libc::unshare(libc::CLONE_NEWPID) },
            "unshare(CLONE_NEWPID)",
        );
        let child = Process::builder()
            .daemon(true)
            .fork(std::process::id)
            .unwrap();
        assert_eq!(
            child.join(),
            Ok(1),
            "a daemon child forked into a new pid namespace must run (as its pid 1)"
        );
    });
    join(outer, LIMIT);
}
