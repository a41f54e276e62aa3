//! Loom models of the queue rings: every interleaving (up to the preemption bound) and
//! every weak-memory outcome loom can produce, on heap-backed rings that run the same
//! ring code as the shared-memory ones.
//!
//! Run with `.ci/loom` (or `RUSTFLAGS="--cfg loom" cargo test --release --test loom`).
//! `LOOM_MAX_PREEMPTIONS` (default 2 here) bounds how many times a thread may be preempted.
//!
//! Under loom, futex waits with a finite deadline return "timed out" at once and the
//! blocking calls cap each sleep at 20 ms, so blocking calls become spins: the models use
//! `try_*` with a retry loop that yields, and stay tiny (capacity 2, 2 or 3 messages, 2
//! threads).
//!
//! Spawned producers hand their sender back through `join` instead of dropping it: the
//! peer table that counts handles uses std atomics (it is not on the loom switch,
//! `src/loom_switch.rs`), so loom does not see the happens-before edge that a sender's
//! drop gives a receiver that then reads "no senders left", and would report a
//! `Disconnected` that hides a message.
#![cfg(loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;

use procshare::queue::mpmc::{LoomEventCount, LoomSlot, heap_channel};
use procshare::queue::spsc::heap_spsc;
use procshare::{RecvError, TryRecvError, TrySendError};

/// Runs `f` under loom with a preemption bound of 2 unless `LOOM_MAX_PREEMPTIONS` says
/// otherwise.
///
/// The model body runs on a spawned loom thread with a 1 MiB stack: a ring's header (two
/// peer tables of 1024 slots) is built on the stack before it is boxed, which overflows
/// the 32 KiB stack loom gives the model's main thread.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    // The ring headers carry peer tables of 16 KiB each, built on the stack: more than a
    // loom coroutine's default stack. So each model runs on a model thread with room.
    let f = std::sync::Arc::new(f);
    builder.check(move || {
        let f = std::sync::Arc::clone(&f);
        loom::thread::Builder::new()
            .stack_size(4 << 20)
            .spawn(move || f())
            .expect("spawn the model thread")
            .join()
            .unwrap();
    });
}

/// Sends `value` with `try_send`, yielding while the queue is full.
fn send_retrying<T>(mut try_send: impl FnMut(T) -> Result<(), TrySendError<T>>, value: T) {
    let mut value = value;
    loop {
        match try_send(value) {
            Ok(()) => return,
            Err(TrySendError::Full(back)) => {
                value = back;
                thread::yield_now();
            }
            Err(e) => panic!("sending: {e}"),
        }
    }
}

/// Receives with `try_recv`, yielding while the queue is empty.
fn recv_retrying<T>(mut try_recv: impl FnMut() -> Result<T, TryRecvError>) -> T {
    loop {
        match try_recv() {
            Ok(v) => return v,
            Err(TryRecvError::Empty) => thread::yield_now(),
            Err(e) => panic!("receiving: {e}"),
        }
    }
}

#[test]
fn spsc_in_order() {
    model(|| {
        let (tx, rx) = heap_spsc::<u64>(2).unwrap();
        let producer = thread::spawn(move || {
            for i in 0..3 {
                send_retrying(|v| tx.try_send(v), i);
            }
            tx
        });
        for i in 0..3 {
            assert_eq!(recv_retrying(|| rx.try_recv()), i);
        }
        drop(producer.join().unwrap());
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    });
}

#[test]
fn spsc_batches_in_order() {
    model(|| {
        let (tx, rx) = heap_spsc::<u64>(2).unwrap();
        let producer = thread::spawn(move || {
            let values = [0, 1, 2];
            let mut sent = 0;
            while sent < values.len() {
                match tx.try_send_batch(&values[sent..]) {
                    Ok(0) => thread::yield_now(),
                    Ok(n) => sent += n,
                    Err(e) => panic!("{e}"),
                }
            }
            tx
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            match rx.try_recv_batch(&mut got, 2) {
                Ok(n) => assert!(n > 0),
                Err(TryRecvError::Empty) => thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, [0, 1, 2]);
        drop(producer.join().unwrap());
    });
}

/// One producer and one consumer on the MPMC ring.
#[test]
fn channel_in_order() {
    model(|| {
        let (tx, rx) = heap_channel::<u64>(2).unwrap();
        let producer = thread::spawn(move || {
            for i in 0..3 {
                send_retrying(|v| tx.try_send(v), i);
            }
            tx
        });
        for i in 0..3 {
            assert_eq!(recv_retrying(|| rx.try_recv()), i);
        }
        drop(producer.join().unwrap());
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    });
}

/// Two producers: a spawned one sends `[1, 0]`, `[1, 1]`; the main thread sends `[0, 0]`
/// (receiving while the ring is full) and then receives the rest. Each message must
/// arrive exactly once, each producer's in order.
#[test]
fn channel_two_producers() {
    model(|| {
        let (tx, rx) = heap_channel::<[u32; 2]>(2).unwrap();
        let tx1 = tx.clone();
        let producer = thread::spawn(move || {
            for i in 0..2 {
                send_retrying(|v| tx1.try_send(v), [1, i]);
            }
            tx1
        });
        let mut got = Vec::new();
        loop {
            match tx.try_send([0, 0]) {
                Ok(()) => break,
                Err(TrySendError::Full(_)) => match rx.try_recv() {
                    Ok(m) => got.push(m),
                    Err(TryRecvError::Empty) => thread::yield_now(),
                    Err(e) => panic!("{e}"),
                },
                Err(e) => panic!("{e:?}"),
            }
        }
        while got.len() < 3 {
            got.push(recv_retrying(|| rx.try_recv()));
        }
        drop(producer.join().unwrap());
        let from1: Vec<_> = got.iter().filter(|m| m[0] == 1).collect();
        assert_eq!(from1, [&[1, 0], &[1, 1]], "got {got:?}");
        assert!(got.contains(&[0, 0]), "got {got:?}");
    });
}

/// Two consumers: the main thread sends 3 messages, then helps receive; a spawned thread
/// receives until all 3 are taken. Exactly once, each consumer's share in order.
#[test]
fn channel_two_consumers() {
    model(|| {
        let (tx, rx) = heap_channel::<u64>(2).unwrap();
        let taken = Arc::new(AtomicUsize::new(0));
        let consume = {
            let taken = Arc::clone(&taken);
            move |rx: &procshare::channel::Receiver<u64>| {
                let mut mine = Vec::new();
                while taken.load(Ordering::SeqCst) < 3 {
                    match rx.try_recv() {
                        Ok(v) => {
                            mine.push(v);
                            taken.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(TryRecvError::Empty) => thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
                mine
            }
        };
        let rx1 = rx.clone();
        let consume1 = consume.clone();
        let consumer = thread::spawn(move || consume1(&rx1));
        for i in 0..3 {
            send_retrying(|v| tx.try_send(v), i);
        }
        let mine = consume(&rx);
        let theirs = consumer.join().unwrap();
        assert!(
            mine.is_sorted() && theirs.is_sorted(),
            "{mine:?} {theirs:?}"
        );
        let mut all: Vec<_> = mine.iter().chain(&theirs).copied().collect();
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2], "{mine:?} {theirs:?}");
    });
}

/// A channel asked for one slot gets two (one slot cannot tell "full" from "free"): the
/// third send is `Full`, never an overwrite.
#[test]
fn channel_capacity_one() {
    model(|| {
        let (tx, rx) = heap_channel::<u64>(1).unwrap();
        tx.try_send(10).unwrap();
        tx.try_send(11).unwrap();
        assert!(
            matches!(tx.try_send(12), Err(TrySendError::Full(12))),
            "a third message fits in a ring of two slots"
        );
        assert_eq!(rx.try_recv(), Ok(10));
        assert_eq!(rx.try_recv(), Ok(11));
        let producer = thread::spawn(move || {
            for i in 0..2 {
                send_retrying(|v| tx.try_send(v), i);
            }
            tx
        });
        for i in 0..2 {
            assert_eq!(recv_retrying(|| rx.try_recv()), i);
        }
        drop(producer.join().unwrap());
    });
}

/// The blocking receive (eventcount, no deadline) gets a message sent from another thread,
/// and then `Disconnected` once that sender is dropped.
#[test]
fn spsc_blocking_recv() {
    model(|| {
        let (tx, rx) = heap_spsc::<u64>(2).unwrap();
        let producer = thread::spawn(move || {
            tx.try_send(7).unwrap();
            tx
        });
        assert_eq!(rx.recv(), Ok(7));
        drop(producer.join().unwrap());
        assert_eq!(rx.recv(), Err(RecvError::Disconnected));
    });
}

/// As [`spsc_blocking_recv`], on the MPMC ring.
#[test]
fn channel_blocking_recv() {
    model(|| {
        let (tx, rx) = heap_channel::<u64>(2).unwrap();
        let producer = thread::spawn(move || {
            tx.try_send(7).unwrap();
            tx
        });
        assert_eq!(rx.recv(), Ok(7));
        drop(producer.join().unwrap());
        assert_eq!(rx.recv(), Err(RecvError::Disconnected));
    });
}

/// The blocking send waits while the ring is full and completes once the other thread
/// makes room.
#[test]
fn spsc_blocking_send() {
    model(|| {
        let (tx, rx) = heap_spsc::<u64>(2).unwrap();
        tx.try_send(0).unwrap();
        tx.try_send(1).unwrap();
        let producer = thread::spawn(move || {
            tx.send(2).unwrap();
            tx
        });
        for i in 0..3 {
            assert_eq!(recv_retrying(|| rx.try_recv()), i);
        }
        drop(producer.join().unwrap());
    });
}

/// As [`spsc_blocking_send`], on the MPMC ring.
#[test]
fn channel_blocking_send() {
    model(|| {
        let (tx, rx) = heap_channel::<u64>(2).unwrap();
        tx.try_send(0).unwrap();
        tx.try_send(1).unwrap();
        let producer = thread::spawn(move || {
            tx.send(2).unwrap();
            tx
        });
        for i in 0..3 {
            assert_eq!(recv_retrying(|| rx.try_recv()), i);
        }
        drop(producer.join().unwrap());
    });
}

/// The eventcount never loses a wake-up although every notify erases all announcements:
/// one waiter needs two notifications (the first erases its announcement and wakes it,
/// it announces again, the second must still wake it), with the notifications coming
/// from two threads. A lost wake-up is a deadlock here (no deadline).
#[test]
fn eventcount_reannounces_after_an_erase() {
    model(|| {
        let ec = Arc::new(LoomEventCount::default());
        let count = Arc::new(AtomicUsize::new(0));
        let notifiers: Vec<_> = (0..2)
            .map(|_| {
                let (ec, count) = (Arc::clone(&ec), Arc::clone(&count));
                thread::spawn(move || {
                    count.fetch_add(1, Ordering::SeqCst);
                    ec.notify_all();
                })
            })
            .collect();
        ec.wait_until(|| count.load(Ordering::SeqCst) == 2);
        for n in notifiers {
            n.join().unwrap();
        }
    });
}

/// Two waiters and one notification: both wake.
#[test]
fn eventcount_wakes_every_waiter() {
    model(|| {
        let ec = Arc::new(LoomEventCount::default());
        let flag = Arc::new(AtomicUsize::new(0));
        let waiter = {
            let (ec, flag) = (Arc::clone(&ec), Arc::clone(&flag));
            thread::spawn(move || ec.wait_until(|| flag.load(Ordering::SeqCst) == 1))
        };
        let notifier = {
            let (ec, flag) = (Arc::clone(&ec), Arc::clone(&flag));
            thread::spawn(move || {
                flag.store(1, Ordering::SeqCst);
                ec.notify_all();
            })
        };
        ec.wait_until(|| flag.load(Ordering::SeqCst) == 1);
        waiter.join().unwrap();
        notifier.join().unwrap();
    });
}

/// A notifier that does the work a wake-up needs only when someone waits, as a byte
/// queue's release moves `free` only when a producer waits for room (`has_waiters`),
/// leaving it otherwise to the producer's own attempts, which move it themselves: the
/// producer is never left asleep behind a record released meanwhile. (A lost wake-up is a
/// deadlock here.)
#[test]
fn eventcount_lazy_notifier_and_a_waiter_that_helps_itself() {
    fn advance(done: &AtomicUsize, free: &AtomicUsize) -> bool {
        done.load(Ordering::Acquire) == 1
            && free
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
    model(|| {
        let ec = Arc::new(LoomEventCount::default());
        let done = Arc::new(AtomicUsize::new(0)); // the record released (DONE)
        let free = Arc::new(AtomicUsize::new(0)); // `free` moved past it
        let releaser = {
            let (ec, done, free) = (Arc::clone(&ec), Arc::clone(&done), Arc::clone(&free));
            thread::spawn(move || {
                done.store(1, Ordering::Release);
                if ec.has_waiters() && advance(&done, &free) {
                    ec.notify_all();
                }
            })
        };
        ec.wait_until(|| {
            advance(&done, &free);
            free.load(Ordering::Acquire) == 1
        });
        releaser.join().unwrap();
    });
}

/// A waiter that dies announced leaves a count that the next notify erases (so later
/// notifies take the fast path again), while a live waiter racing with it is still woken.
#[test]
fn eventcount_heals_after_a_dead_waiter() {
    model(|| {
        let ec = Arc::new(LoomEventCount::default());
        let flag = Arc::new(AtomicUsize::new(0));
        {
            let ec = Arc::clone(&ec);
            thread::spawn(move || ec.announce_and_die()).join().unwrap();
        }
        assert_eq!(ec.waiters(), 1);
        let waiter = {
            let (ec, flag) = (Arc::clone(&ec), Arc::clone(&flag));
            thread::spawn(move || ec.wait_until(|| flag.load(Ordering::SeqCst) == 1))
        };
        flag.store(1, Ordering::SeqCst);
        ec.notify_all();
        waiter.join().unwrap();
        // Whatever the interleaving, nobody is announced any more once the waiter is
        // done: the dead waiter's count was erased by a notify, the live one's taken back
        // or erased.
        ec.notify_all();
        assert_eq!(ec.waiters(), 0);
    });
}

/// A checker never pairs a claim with the claimant word of an *earlier* claim. Thread id 5
/// claims a slot as a producer, then (its id reused by a new thread whose start time
/// agrees in the low 8 bits, so the claim words look alike) as a consumer. A checker that
/// reads the consumer's claim and then the claimant word must find 0 (not written yet) or
/// the consumer's own word, never the producer's: with it, the live consumer would look
/// dead by its full start time. (A word of a *later* claim is harmless: `repair` acts only
/// through a compare-and-swap from the claim it read, which then fails.)
#[test]
fn channel_claimant_word_is_never_stale() {
    model(|| {
        const X: u64 = 0x1_00; // the first thread's start time
        const Y: u64 = 0x2_00; // the reuser's: equal low 8 bits
        let slot = Arc::new(LoomSlot::default());
        let claimant = {
            let slot = Arc::clone(&slot);
            thread::spawn(move || {
                slot.write_as(5, X);
                slot.read_as(5, Y, 2);
            })
        };
        for _ in 0..2 {
            if let Some((stamp, record)) = slot.check() {
                let (x, y) = (LoomSlot::record_of(5, X), LoomSlot::record_of(5, Y));
                let ok = if LoomSlot::is_reading(stamp) {
                    record == 0 || record == y
                } else {
                    record == 0 || record == x || record == y
                };
                assert!(ok, "claim {stamp:#x} with claimant word {record:#x}");
            }
        }
        claimant.join().unwrap();
    });
}

/// The in-place batch API on the SPSC ring: the producer writes slots through
/// `send_batch_with` (one `tail` update per batch, blocking while full), the consumer reads
/// them in place through `recv_batch_with`; every message arrives once, in order.
#[test]
fn spsc_in_place_batches_in_order() {
    model(|| {
        let (tx, rx) = heap_spsc::<u64>(2).unwrap();
        let producer = thread::spawn(move || {
            let mut next = 0;
            while next < 3 {
                let n = tx
                    .send_batch_with(3 - next as usize, |_, slot| {
                        *slot = next;
                        next += 1;
                    })
                    .unwrap();
                assert!(n > 0);
            }
            tx
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            let n = rx.recv_batch_with(2, |m| got.push(*m)).unwrap();
            assert!(n > 0);
        }
        assert_eq!(got, [0, 1, 2]);
        drop(producer.join().unwrap());
    });
}

/// The in-place API on the MPMC ring, with a producer whose `fill` panics in between:
/// its position is skipped (finished by the drop guard), the messages around it arrive
/// once, in order, and the blocking receive neither hangs nor sees the abandoned write.
#[test]
fn channel_in_place_with_an_abandoned_fill() {
    model(|| {
        let (tx, rx) = heap_channel::<u64>(2).unwrap();
        let producer = thread::spawn(move || {
            tx.send_with(|slot| *slot = 1).unwrap();
            let abandoned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                tx.send_with(|slot| {
                    *slot = 99;
                    panic!("fill fails");
                })
            }));
            assert!(abandoned.is_err());
            tx.send_with(|slot| *slot = 2).unwrap();
            tx
        });
        assert_eq!(rx.recv_with(|m| *m), Ok(1));
        assert_eq!(rx.recv_with(|m| *m), Ok(2));
        drop(producer.join().unwrap());
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    });
}
