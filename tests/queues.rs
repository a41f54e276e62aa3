//! Cross-process behaviour of the zero-copy queues (`spsc` and `channel`), with real forked
//! processes: throughput and ordering, exactly-once delivery, disconnection, crashes at the
//! worst moments (a producer killed between claiming and publishing a slot, a consumer
//! killed while copying a message out), timeouts, and two processes sharing one vCPU.
//!
//! Every test runs in its own forked process under a watchdog (see `common`), and every
//! blocking step inside a test is bounded, so a hang fails in seconds.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use procshare::{
    Event, RecvError, RecvTimeoutError, SendError, SendTimeoutError, Shared, TryRecvError,
    TrySendError,
};

use common::{join, spawn};

const LIMIT: Duration = Duration::from_secs(20);
/// How soon a peer's death must be noticed by a process blocked on it.
const NOTICE: Duration = Duration::from_secs(1);

fn main() {
    common::run(
        tests![
            spsc_million_in_order_with_batches,
            channel_two_producers_two_consumers_exactly_once,
            recv_blocked_when_the_only_sender_is_killed,
            sender_exits_after_n_then_disconnected,
            send_blocked_when_the_receiver_is_killed,
            spsc_producer_killed_mid_stream_is_replaced,
            channel_dead_producer_claim_is_skipped,
            channel_stopped_producer_claim_is_waited_for,
            channel_consumer_killed_holding_a_claim_frees_the_slot,
            channel_reader_from_the_last_lap_is_not_corruption,
            timeouts_are_honoured,
            capacity_one_holds_exactly_one_message,
            one_cpu_ping_pong,
            try_recv_repairs_a_dead_claim_in_front,
            try_recv_sees_the_killed_sender,
            try_send_sees_the_killed_receiver_and_its_dead_claim,
            channel_claim_of_a_reused_tid_is_judged_by_its_full_start_time,
            receiver_killed_asleep_leaves_no_waiter_count,
            channel_corrupted_tail_is_reported_to_both_sides,
            spsc_end_used_from_two_processes_is_refused,
            spsc_end_moved_to_a_child_or_left_by_a_dead_one_is_usable,
        ],
        &[],
    )
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine, so times
/// taken in different processes can be compared.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until the process is killed.
fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Asserts that `later - earlier` (both from [`mono_ns`]) is below `limit`.
fn assert_within(what: &str, earlier: u64, later: u64, limit: Duration) {
    assert!(later >= earlier, "{what}: happened before its cause");
    let took = Duration::from_nanos(later - earlier);
    assert!(took < limit, "{what}: took {took:?}, limit {limit:?}");
}

/// Runs `$body` twice, once with `$make(cap)` building an `spsc::<$t>` and once a
/// `channel::<$t>`, with `$flavour` naming which one in failure messages. The two flavours
/// share no trait, so the body is duplicated by the macro and type-checked for each.
macro_rules! for_both_flavours {
    (<$t:ty> |$flavour:ident, $make:ident| $body:block) => {{
        {
            let $flavour = "spsc";
            let $make = |cap: usize| procshare::spsc::<$t>(cap).expect("spsc");
            $body
        }
        {
            let $flavour = "channel";
            let $make = |cap: usize| procshare::channel::<$t>(cap).expect("channel");
            $body
        }
    }};
}

fn spsc_million_in_order_with_batches() {
    const N: u64 = 1_000_000;

    // Child to parent: the child mixes single sends with batches of every size up to 97,
    // the parent mixes single receives with batch receives.
    let (tx, rx) = procshare::spsc::<u64>(1024).unwrap();
    let producer = spawn(move || {
        let mut next = 0;
        let mut round = 0u64;
        let mut chunk = Vec::with_capacity(128);
        while next < N {
            round += 1;
            if round % 3 == 0 {
                tx.send(next).unwrap();
                next += 1;
            } else {
                let len = (1 + round % 97).min(N - next);
                chunk.clear();
                chunk.extend(next..next + len);
                tx.send_batch(&chunk).unwrap();
                next += len;
            }
        }
    });
    let mut expect = 0u64;
    let mut buf = Vec::with_capacity(256);
    let mut round = 0usize;
    while expect < N {
        round += 1;
        if round % 4 == 0 {
            assert_eq!(rx.recv(), Ok(expect));
            expect += 1;
        } else {
            buf.clear();
            let n = rx.recv_batch(&mut buf, 1 + round % 200).unwrap();
            assert_eq!(n, buf.len());
            for &v in &buf {
                assert_eq!(v, expect, "out of order");
                expect += 1;
            }
        }
    }
    assert_eq!(rx.recv(), Err(RecvError::Disconnected));
    join(producer, LIMIT);

    // Parent to child: plain sends, and a child that reads with the blocking iterator,
    // which ends when the parent drops its sender. A forked child inherits every handle
    // its parent holds, so the child first drops its copy of the parent's sender.
    let (tx, rx) = procshare::spsc::<u64>(1024).unwrap();
    let mut tx = Some(tx);
    let inherited = &mut tx;
    let consumer = spawn(move || {
        drop(inherited.take());
        let mut expect = 0;
        for v in rx.iter() {
            assert_eq!(v, expect, "out of order");
            expect += 1;
        }
        assert_eq!(expect, N, "the iterator ended early");
    });
    let tx = tx.take().unwrap();
    for i in 0..N {
        tx.send(i).unwrap();
    }
    drop(tx);
    join(consumer, LIMIT);
}

/// Messages each producer sends in the 2 x 2 test: 2M sends and receives in all, about
/// 0.5 s in a debug build on 2 vCPUs.
const PER_PRODUCER: u32 = 1_000_000;

/// Two producer processes send `[producer, seq]`; two consumer processes receive until
/// disconnected, checking that each producer's messages reach them in order and marking
/// every message in a shared bitmap (a bit found already set is a duplicate). In the end,
/// every bit must be set: delivered exactly once.
fn channel_two_producers_two_consumers_exactly_once() {
    let per = PER_PRODUCER;
    let (tx, rx) = procshare::channel::<[u32; 2]>(1024).unwrap();
    let bitmap = Shared::<[AtomicU64]>::zeroed((2 * per as usize).div_ceil(64)).unwrap();
    let received = Shared::<[AtomicU64]>::zeroed(2).unwrap();
    let producers: Vec<_> = (0..2u32)
        .map(|p| {
            let tx = tx.clone();
            spawn(move || {
                if p == 0 {
                    for i in 0..per {
                        tx.send([p, i]).unwrap();
                    }
                } else {
                    let mut batch = Vec::with_capacity(16);
                    let mut i = 0;
                    while i < per {
                        let len = (1 + i % 13).min(per - i);
                        batch.clear();
                        batch.extend((i..i + len).map(|s| [p, s]));
                        tx.send_batch(&batch).unwrap();
                        i += len;
                    }
                }
            })
        })
        .collect();
    // Only the producers hold senders now, so the consumers forked below inherit none and
    // see the queue disconnect when both producers are done.
    drop(tx);
    let bits: &[AtomicU64] = &bitmap;
    let counts: &[AtomicU64] = &received;
    let consumers: Vec<_> = (0..2usize)
        .map(|c| {
            let rx = rx.clone();
            spawn(move || {
                let mut last = [None::<u32>; 2];
                let mut count = 0u64;
                let mut take = |[p, i]: [u32; 2]| {
                    assert!(p < 2 && i < per, "message [{p}, {i}] was never sent");
                    assert!(
                        last[p as usize].is_none_or(|l| l < i),
                        "consumer {c}: producer {p}'s message {i} after {:?}",
                        last[p as usize]
                    );
                    last[p as usize] = Some(i);
                    let bit = p as usize * per as usize + i as usize;
                    let old = bits[bit / 64].fetch_or(1 << (bit % 64), Ordering::Relaxed);
                    assert!(old & (1 << (bit % 64)) == 0, "[{p}, {i}] delivered twice");
                    count += 1;
                };
                if c == 0 {
                    loop {
                        match rx.recv() {
                            Ok(m) => take(m),
                            Err(RecvError::Disconnected) => break,
                            Err(e) => panic!("consumer {c}: {e}"),
                        }
                    }
                } else {
                    let mut buf = Vec::with_capacity(64);
                    for round in 0usize.. {
                        buf.clear();
                        match rx.recv_batch(&mut buf, 1 + round % 64) {
                            Ok(_) => buf.iter().copied().for_each(&mut take),
                            Err(RecvError::Disconnected) => break,
                            Err(e) => panic!("consumer {c}: {e}"),
                        }
                    }
                }
                counts[c].store(count, Ordering::SeqCst);
            })
        })
        .collect();
    drop(rx);
    for child in producers.into_iter().chain(consumers) {
        join(child, LIMIT);
    }
    let total: u64 = counts.iter().map(|c| c.load(Ordering::SeqCst)).sum();
    assert_eq!(total, 2 * u64::from(per), "messages lost");
    for (w, word) in bits.iter().enumerate() {
        let want = if (w + 1) * 64 <= 2 * per as usize {
            u64::MAX
        } else {
            (1 << (2 * per as usize % 64)) - 1
        };
        assert_eq!(word.load(Ordering::SeqCst), want, "bitmap word {w}");
    }
    println!(
        "    ({} received by consumer 0, {} by consumer 1)",
        counts[0].load(Ordering::SeqCst),
        counts[1].load(Ordering::SeqCst)
    );
}

fn recv_blocked_when_the_only_sender_is_killed() {
    for_both_flavours!(<u64> |flavour, make| {
        let (tx, rx) = make(4);
        let ready = Shared::new(Event::new()).unwrap();
        // [0]: when the sender was killed; [1]: when the blocked recv returned.
        let times = Shared::<[AtomicU64]>::zeroed(2).unwrap();
        let (ready_ref, times_ref): (&Event, &[AtomicU64]) = (&ready, &times);
        let sender = spawn(move || {
            let _tx = tx;
            ready_ref.set();
            sleep_forever()
        });
        assert!(ready.wait_timeout(LIMIT));
        let receiver = spawn(move || {
            let t0 = Instant::now();
            let r = rx.recv();
            times_ref[1].store(mono_ns(), Ordering::SeqCst);
            assert_eq!(r, Err(RecvError::Disconnected), "{flavour}");
            assert!(t0.elapsed() >= Duration::from_millis(250), "{flavour}: did not block");
        });
        // Let the receiver get into its futex sleep before the sender dies.
        std::thread::sleep(Duration::from_millis(300));
        times[0].store(mono_ns(), Ordering::SeqCst);
        sender.kill().unwrap();
        let _ = sender.join();
        join(receiver, LIMIT);
        assert_within(
            &format!("{flavour}: Disconnected after the sender was killed"),
            times[0].load(Ordering::SeqCst),
            times[1].load(Ordering::SeqCst),
            NOTICE,
        );
    });
}

fn sender_exits_after_n_then_disconnected() {
    const N: u64 = 10_000;
    for_both_flavours!(<u64> |flavour, make| {
        // The sender either drops its handle and returns, or leaves it undropped and
        // exits anyway (the process's death must count as a drop).
        for forget in [false, true] {
            let (tx, rx) = make(64);
            let sender = spawn(move || {
                for i in 0..N {
                    tx.send(i).unwrap();
                }
                if forget {
                    std::mem::forget(tx);
                }
            });
            for i in 0..N {
                assert_eq!(rx.recv(), Ok(i), "{flavour}, forget={forget}");
            }
            let t0 = Instant::now();
            assert_eq!(rx.recv(), Err(RecvError::Disconnected), "{flavour}, forget={forget}");
            assert!(
                t0.elapsed() < NOTICE,
                "{flavour}, forget={forget}: Disconnected took {:?}",
                t0.elapsed()
            );
            assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
            join(sender, LIMIT);
        }
    });
}

fn send_blocked_when_the_receiver_is_killed() {
    for_both_flavours!(<u64> |flavour, make| {
        let (tx, rx) = make(4);
        let ready = Shared::new([Event::new(), Event::new()]).unwrap();
        let times = Shared::<[AtomicU64]>::zeroed(2).unwrap();
        let (ready_ref, times_ref): (&[Event; 2], &[AtomicU64]) = (&ready, &times);
        let receiver = spawn(move || {
            let _rx = rx;
            ready_ref[0].set();
            sleep_forever()
        });
        assert!(ready[0].wait_timeout(LIMIT));
        let sender = spawn(move || {
            loop {
                match tx.try_send(1) {
                    Ok(()) => {}
                    Err(TrySendError::Full(1)) => break,
                    Err(e) => panic!("{flavour}: filling: {e}"),
                }
            }
            ready_ref[1].set();
            let t0 = Instant::now();
            let r = tx.send(7);
            times_ref[1].store(mono_ns(), Ordering::SeqCst);
            assert!(matches!(r, Err(SendError::Disconnected(7))), "{flavour}: {r:?}");
            assert!(t0.elapsed() >= Duration::from_millis(250), "{flavour}: did not block");
        });
        assert!(ready[1].wait_timeout(LIMIT));
        std::thread::sleep(Duration::from_millis(300));
        times[0].store(mono_ns(), Ordering::SeqCst);
        receiver.kill().unwrap();
        let _ = receiver.join();
        join(sender, LIMIT);
        assert_within(
            &format!("{flavour}: SendError after the receiver was killed"),
            times[0].load(Ordering::SeqCst),
            times[1].load(Ordering::SeqCst),
            NOTICE,
        );
    });
}

/// A message whose 8 words all carry the sequence number, so a torn one is visible.
type Wide = [u64; 8];

fn check_wide(m: Wide, expect: u64) {
    assert!(m.iter().all(|&w| w == m[0]), "torn message {m:?}");
    assert_eq!(m[0], expect, "out of order or lost");
}

/// A producer is SIGKILLed at an arbitrary point of a fast stream (possibly mid-write);
/// the consumer must see only complete messages, in order, then `Disconnected`; a new
/// sender made with `new_sender` continues the stream. Five rounds on one queue.
fn spsc_producer_killed_mid_stream_is_replaced() {
    let (tx, rx) = procshare::spsc::<Wide>(64).unwrap();
    let mut first = Some(tx);
    let mut next = 0u64;
    for round in 0..5u64 {
        let tx = match first.take() {
            Some(tx) => tx,
            None => rx
                .new_sender()
                .expect("the old sender's process is dead: a new sender is allowed"),
        };
        let start = next;
        let producer = spawn(move || {
            let mut seq = start;
            let mut batch = Vec::with_capacity(8);
            loop {
                if seq % 5 == 0 {
                    batch.clear();
                    batch.extend((seq..seq + 7).map(|s| [s; 8]));
                    tx.send_batch(&batch).unwrap();
                    seq += 7;
                } else {
                    tx.send([seq; 8]).unwrap();
                    seq += 1;
                }
            }
        });
        assert!(
            rx.new_sender().is_err(),
            "round {round}: a second sender while the first is alive"
        );
        let until = next + 20_000 + round * 1_234;
        while next < until {
            check_wide(rx.recv().unwrap(), next);
            next += 1;
        }
        producer.kill().unwrap();
        let _ = producer.join();
        let t0 = Instant::now();
        loop {
            match rx.recv() {
                Ok(m) => {
                    check_wide(m, next);
                    next += 1;
                }
                Err(RecvError::Disconnected) => break,
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert!(
            t0.elapsed() < NOTICE,
            "round {round}: drain took {:?}",
            t0.elapsed()
        );
    }
    // The last replacement sends from this process.
    let tx = rx.new_sender().unwrap();
    for s in next..next + 100 {
        tx.send([s; 8]).unwrap();
        check_wide(rx.recv().unwrap(), s);
    }
}

/// `[claimed, release]` events for the stalled-claim tests.
fn stall() -> Shared<[Event; 2]> {
    Shared::new([Event::new(), Event::new()]).unwrap()
}

fn channel_dead_producer_claim_is_skipped() {
    let (tx, rx) = procshare::channel::<u64>(8).unwrap();
    let ev = stall();
    let claimed: &Event = &ev[0];
    let stalled = {
        let tx = tx.clone();
        spawn(move || {
            tx.__send_stalled_after_claim(1000, || {
                claimed.set();
                sleep_forever()
            });
        })
    };
    assert!(claimed.wait_timeout(LIMIT));
    let other = {
        let tx = tx.clone();
        spawn(move || {
            for i in 0..5 {
                tx.send(i).unwrap();
            }
        })
    };
    drop(tx);
    join(other, LIMIT);
    // The stalled claim holds the head: nothing after it can be received while its
    // producer lives.
    assert_eq!(
        rx.recv_timeout(Duration::from_millis(300)),
        Err(RecvTimeoutError::Timeout)
    );
    let killed = Instant::now();
    stalled.kill().unwrap();
    let _ = stalled.join();
    assert_eq!(rx.recv_timeout(LIMIT), Ok(0));
    assert!(
        killed.elapsed() < NOTICE,
        "the dead claim was skipped after {:?}",
        killed.elapsed()
    );
    for i in 1..5 {
        assert_eq!(rx.recv_timeout(LIMIT), Ok(i));
    }
    assert_eq!(rx.recv_timeout(LIMIT), Err(RecvTimeoutError::Disconnected));
}

fn channel_stopped_producer_claim_is_waited_for() {
    let (tx, rx) = procshare::channel::<u64>(8).unwrap();
    let ev = stall();
    let (claimed, release): (&Event, &Event) = (&ev[0], &ev[1]);
    let stalled = {
        let tx = tx.clone();
        spawn(move || {
            tx.__send_stalled_after_claim(1000, || {
                claimed.set();
                assert!(release.wait_timeout(LIMIT), "never released");
            });
        })
    };
    assert!(claimed.wait_timeout(LIMIT));
    let other = {
        let tx = tx.clone();
        spawn(move || {
            for i in 0..5 {
                tx.send(i).unwrap();
            }
        })
    };
    drop(tx);
    join(other, LIMIT);
    stalled.signal(libc::SIGSTOP).unwrap();
    // Stopped is not dead: its claim must not be skipped, however long we wait.
    for _ in 0..2 {
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(300)),
            Err(RecvTimeoutError::Timeout),
            "a stopped producer's claim was skipped"
        );
    }
    stalled.signal(libc::SIGCONT).unwrap();
    release.set();
    assert_eq!(rx.recv_timeout(LIMIT), Ok(1000));
    for i in 0..5 {
        assert_eq!(rx.recv_timeout(LIMIT), Ok(i));
    }
    join(stalled, LIMIT);
    assert_eq!(rx.recv_timeout(LIMIT), Err(RecvTimeoutError::Disconnected));
}

fn channel_consumer_killed_holding_a_claim_frees_the_slot() {
    let (tx, rx) = procshare::channel::<u64>(4).unwrap();
    for i in 0..4 {
        tx.try_send(i).unwrap();
    }
    let ev = stall();
    let claimed: &Event = &ev[0];
    let times = Shared::<[AtomicU64]>::zeroed(2).unwrap();
    let times_ref: &[AtomicU64] = &times;
    let consumer = {
        let rx = rx.clone();
        spawn(move || {
            rx.__recv_stalled_after_claim(|| {
                claimed.set();
                sleep_forever()
            });
        })
    };
    assert!(claimed.wait_timeout(LIMIT));
    assert!(matches!(tx.try_send(9), Err(TrySendError::Full(9))));
    // A live consumer, even a stopped one, keeps its claim.
    consumer.signal(libc::SIGSTOP).unwrap();
    assert!(matches!(
        tx.send_timeout(9, Duration::from_millis(300)),
        Err(SendTimeoutError::Timeout(9))
    ));
    consumer.signal(libc::SIGCONT).unwrap();
    let producer = {
        let tx = tx.clone();
        spawn(move || {
            let r = tx.send_timeout(4, LIMIT);
            times_ref[1].store(mono_ns(), Ordering::SeqCst);
            assert!(r.is_ok(), "{r:?}");
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        producer.is_alive(),
        "the producer got room while the queue was full"
    );
    times[0].store(mono_ns(), Ordering::SeqCst);
    consumer.kill().unwrap();
    let _ = consumer.join();
    join(producer, LIMIT);
    assert_within(
        "the producer continues after the consumer holding a slot was killed",
        times[0].load(Ordering::SeqCst),
        times[1].load(Ordering::SeqCst),
        NOTICE,
    );
    // Message 0 died with the consumer; the rest are intact and in order.
    assert_eq!(rx.try_iter().collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
}

/// A consumer still copying out the message of position `p` (claimed, `head` advanced)
/// while another consumer reaches position `p + capacity`, whose slot is that same one:
/// the queue is simply empty there (no producer can have written position `p + capacity`
/// yet), so `try_recv` must say `Empty` and `recv_timeout` must time out, not call the
/// queue corrupted. In a real run the first consumer is just descheduled for a moment.
fn channel_reader_from_the_last_lap_is_not_corruption() {
    let (tx, rx) = procshare::channel::<u64>(4).unwrap();
    for i in 0..4 {
        tx.try_send(i).unwrap();
    }
    let other = rx.clone();
    let first = rx.__recv_stalled_after_claim(|| {
        for i in 1..4 {
            assert_eq!(other.try_recv(), Ok(i));
        }
        assert!(matches!(tx.try_send(4), Err(TrySendError::Full(4))));
        assert_eq!(other.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(
            other.recv_timeout(Duration::from_millis(50)),
            Err(RecvTimeoutError::Timeout)
        );
    });
    assert_eq!(first, 0);
    tx.try_send(4).unwrap();
    assert_eq!(other.try_recv(), Ok(4));
}

/// Asserts that `f` took `want` (not less) and at most 400 ms more.
fn assert_waited<R: std::fmt::Debug>(what: &str, want: Duration, f: impl FnOnce() -> R) -> R {
    let t0 = Instant::now();
    let r = f();
    let took = t0.elapsed();
    assert!(took >= want, "{what}: returned early after {took:?}: {r:?}");
    assert!(
        took < want + Duration::from_millis(400),
        "{what}: returned late after {took:?}"
    );
    r
}

fn timeouts_are_honoured() {
    let d = Duration::from_millis(200);
    for_both_flavours!(<u64> |flavour, make| {
        // The other end of each queue lives in a child, so a wait that ends because it
        // wrongly took the peer for dead shows up as a Disconnected here.
        let (to_parent, from_child) = make(2);
        let (to_child, from_parent) = make(2);
        let release = Shared::new(Event::new()).unwrap();
        let release_ref: &Event = &release;
        let child = spawn(move || {
            let _keep = (to_parent, from_parent);
            assert!(release_ref.wait_timeout(LIMIT));
        });
        let r = assert_waited(&format!("{flavour} recv_timeout"), d, || {
            from_child.recv_timeout(d)
        });
        assert_eq!(r, Err(RecvTimeoutError::Timeout), "{flavour}");
        let r = from_child.recv_timeout(Duration::ZERO);
        assert_eq!(r, Err(RecvTimeoutError::Timeout), "{flavour}: zero timeout");
        while to_child.try_send(1).is_ok() {}
        let r = assert_waited(&format!("{flavour} send_timeout"), d, || {
            to_child.send_timeout(2, d)
        });
        assert!(matches!(r, Err(SendTimeoutError::Timeout(2))), "{flavour}: {r:?}");
        release.set();
        join(child, LIMIT);
    });
}

/// A queue asked for one slot never overwrites: spsc holds exactly one message, a channel
/// (whose stamps need two slots to tell "full" from "free") exactly two; the next
/// `try_send` is `Full` and every message comes back in order.
fn capacity_one_holds_exactly_one_message() {
    for_both_flavours!(<u32> |flavour, make| {
        let (tx, rx) = make(1);
        let holds = if flavour == "channel" { 2 } else { 1 };
        for round in 0..3 {
            for i in 0..holds {
                tx.try_send(10 * round + i).unwrap();
            }
            let r = tx.try_send(99);
            assert!(
                matches!(r, Err(TrySendError::Full(_))),
                "{flavour}: a queue asked for one slot accepted too many ({r:?})"
            );
            for i in 0..holds {
                assert_eq!(rx.try_recv(), Ok(10 * round + i), "{flavour}");
            }
            assert_eq!(rx.try_recv(), Err(TryRecvError::Empty), "{flavour}");
        }
    });
}

/// Pins the calling process to the first CPU it may run on; returns that CPU.
fn pin_to_one_cpu(cpu: Option<usize>) -> usize {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = size_of::<libc::cpu_set_t>();
    // SAFETY: pid 0 is the calling thread; `set` is a writable cpu_set_t of `size` bytes.
    let rc = unsafe { libc::sched_getaffinity(0, size, &mut set) };
    assert_eq!(rc, 0, "sched_getaffinity");
    let cpu = cpu.unwrap_or_else(|| {
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `c` < CPU_SETSIZE, the number of CPUs a cpu_set_t holds.
            .find(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .expect("some CPU is allowed")
    });
    // SAFETY: as above.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut one) };
    // SAFETY: pid 0 is the calling thread; `one` is a valid cpu_set_t of `size` bytes.
    let rc = unsafe { libc::sched_setaffinity(0, size, &one) };
    assert_eq!(rc, 0, "sched_setaffinity to CPU {cpu}");
    cpu
}

/// Round trips per second between two processes pinned to `cpu`, through a socket pair:
/// the kernel hands the CPU straight to the woken peer, so this is the yardstick for what
/// the machine (and whatever else is running on that CPU) allows.
fn socket_round_trip(cpu: usize, rounds: u32) -> Duration {
    use std::io::{Read, Write};
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let child = spawn(move || {
        pin_to_one_cpu(Some(cpu));
        let mut buf = [0u8; 8];
        for _ in 0..rounds {
            b.read_exact(&mut buf).unwrap();
            b.write_all(&buf).unwrap();
        }
    });
    let mut buf = [0u8; 8];
    let t0 = Instant::now();
    for _ in 0..rounds {
        a.write_all(&buf).unwrap();
        a.read_exact(&mut buf).unwrap();
    }
    let took = t0.elapsed();
    join(child, LIMIT);
    took / rounds
}

/// What one `sched_yield` costs on the current (pinned) CPU: about a microsecond on an
/// idle CPU, a whole time slice when another process is busy on it.
fn yield_cost() -> Duration {
    const YIELDS: u32 = 100;
    let t0 = Instant::now();
    for _ in 0..YIELDS {
        std::thread::yield_now();
    }
    t0.elapsed() / YIELDS
}

/// Two processes pinned to the same CPU play ping-pong through two spsc queues. A waiter
/// that spun without bound (or without yielding) would keep its peer off the CPU for a
/// whole time slice (milliseconds) per message; a bounded spin that yields, then sleeps on
/// the futex, costs a few microseconds (about 8 us per round trip here, idle). The limit
/// is 200 us per round trip, or 10 times a socket pair's round trip or a `sched_yield` on
/// the same CPU if those are slower: another busy process on the CPU (a build, say) slows
/// the yields in the queue's wait loop to a time slice each, and must not fail the test.
fn one_cpu_ping_pong() {
    const ROUNDS: u32 = 10_000;
    let cpu = pin_to_one_cpu(None);
    let (ping_tx, ping_rx) = procshare::spsc::<u64>(16).unwrap();
    let (pong_tx, pong_rx) = procshare::spsc::<u64>(16).unwrap();
    let child = spawn(move || {
        pin_to_one_cpu(Some(cpu));
        for i in 0..u64::from(ROUNDS) {
            let v = ping_rx
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("lost ping {i}: {e}"));
            assert_eq!(v, i);
            pong_tx.send(v + 1).unwrap();
        }
    });
    let t0 = Instant::now();
    for i in 0..u64::from(ROUNDS) {
        ping_tx.send(i).unwrap();
        let v = pong_rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("lost pong {i}: {e}"));
        assert_eq!(v, i + 1);
    }
    let each = t0.elapsed() / ROUNDS;
    join(child, LIMIT);
    let socket = socket_round_trip(cpu, ROUNDS / 5);
    let yielding = yield_cost();
    println!(
        "    (CPU {cpu}: spsc round trip {each:.1?}; socket pair {socket:.1?}, sched_yield \
         {yielding:.1?})"
    );
    let limit = Duration::from_micros(200)
        .max(socket * 10)
        .max(yielding * 10);
    assert!(each < limit, "one-CPU round trip {each:?}, limit {limit:?}");
}

/// Polls `f` until it returns `Some`, panicking with `what` after [`NOTICE`].
fn poll_within<R>(what: &str, mut f: impl FnMut() -> Option<R>) -> R {
    let t0 = Instant::now();
    loop {
        if let Some(r) = f() {
            return r;
        }
        assert!(t0.elapsed() < NOTICE, "{what}: nothing after {NOTICE:?}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A producer killed between claiming a slot and publishing it, with two messages queued
/// behind its claim: a consumer that only polls with `try_recv` must get them as soon as
/// a blocking one would (which notices the dead claim within its 20 ms check).
fn try_recv_repairs_a_dead_claim_in_front() {
    let (tx, rx) = procshare::channel::<u64>(8).unwrap();
    let ev = stall();
    let claimed: &Event = &ev[0];
    let stalled = {
        let tx = tx.clone();
        spawn(move || {
            tx.__send_stalled_after_claim(1000, || {
                claimed.set();
                sleep_forever()
            });
        })
    };
    assert!(claimed.wait_timeout(LIMIT));
    tx.send(1).unwrap();
    tx.send(2).unwrap();
    assert_eq!(
        rx.try_recv(),
        Err(TryRecvError::Empty),
        "the live claim is skipped"
    );
    stalled.kill().unwrap();
    let _ = stalled.join();
    let got = poll_within("try_recv behind a dead claim", || match rx.try_recv() {
        Ok(v) => Some(v),
        Err(TryRecvError::Empty) => None,
        Err(e) => panic!("{e}"),
    });
    assert_eq!(got, 1);
    assert_eq!(rx.try_recv(), Ok(2));
}

/// With the only sender SIGKILLed, a receiver that only polls must see `Disconnected`,
/// not `Empty` forever.
fn try_recv_sees_the_killed_sender() {
    for_both_flavours!(<u64> |flavour, make| {
        let (tx, rx) = make(4);
        let ready = Shared::new(Event::new()).unwrap();
        let ready_ref: &Event = &ready;
        let sender = spawn(move || {
            let _tx = tx;
            ready_ref.set();
            sleep_forever()
        });
        assert!(ready.wait_timeout(LIMIT));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty), "{flavour}");
        sender.kill().unwrap();
        let _ = sender.join();
        poll_within(&format!("{flavour}: try_recv after the sender was killed"), || {
            match rx.try_recv() {
                Err(TryRecvError::Disconnected) => Some(()),
                Err(TryRecvError::Empty) => None,
                r => panic!("{flavour}: {r:?}"),
            }
        });
    });
}

/// A sender that only polls with `try_send` must see `Disconnected` once the only
/// receiver is SIGKILLed, and (channel) must get the slot of a consumer killed while
/// holding it.
fn try_send_sees_the_killed_receiver_and_its_dead_claim() {
    for_both_flavours!(<u64> |flavour, make| {
        let (tx, rx) = make(4);
        let ready = Shared::new(Event::new()).unwrap();
        let ready_ref: &Event = &ready;
        let receiver = spawn(move || {
            let _rx = rx;
            ready_ref.set();
            sleep_forever()
        });
        assert!(ready.wait_timeout(LIMIT));
        while tx.try_send(1).is_ok() {}
        receiver.kill().unwrap();
        let _ = receiver.join();
        poll_within(&format!("{flavour}: try_send after the receiver was killed"), || {
            match tx.try_send(2) {
                Err(TrySendError::Disconnected(2)) => Some(()),
                Err(TrySendError::Full(2)) => None,
                r => panic!("{flavour}: {r:?}"),
            }
        });
    });
    let (tx, rx) = procshare::channel::<u64>(4).unwrap();
    for i in 0..4 {
        tx.try_send(i).unwrap();
    }
    let ev = stall();
    let claimed: &Event = &ev[0];
    let consumer = {
        let rx = rx.clone();
        spawn(move || {
            rx.__recv_stalled_after_claim(|| {
                claimed.set();
                sleep_forever()
            });
        })
    };
    assert!(claimed.wait_timeout(LIMIT));
    assert!(matches!(tx.try_send(9), Err(TrySendError::Full(9))));
    consumer.kill().unwrap();
    let _ = consumer.join();
    poll_within(
        "try_send after a consumer holding a slot was killed",
        || match tx.try_send(4) {
            Ok(()) => Some(()),
            Err(TrySendError::Full(4)) => None,
            Err(e) => panic!("{e:?}"),
        },
    );
    assert_eq!(rx.try_iter().collect::<Vec<_>>(), [1, 2, 3, 4]);
}

/// The start time (clock ticks after boot) of process `pid`, from `/proc/<pid>/stat`.
fn start_time(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &text[text.rfind(')').unwrap() + 1..];
    after.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// A claim left by a dead thread whose tid now belongs to a live stranger that started at
/// a time equal to the dead one's in the low 8 bits (1 in 256 reuses): the claim must be
/// judged by the full start time, so it is dead and repaired. The same claim naming the
/// stranger exactly must be left alone.
fn channel_claim_of_a_reused_tid_is_judged_by_its_full_start_time() {
    let stranger = spawn(|| sleep_forever());
    let tid = stranger.pid();
    let start = start_time(tid);
    for (exact, want) in [(true, Err(RecvTimeoutError::Timeout)), (false, Ok(1))] {
        let (tx, rx) = procshare::channel::<u64>(8).unwrap();
        let claimed_start = if exact { start } else { start ^ (1 << 9) };
        tx.__plant_claim(tid, claimed_start);
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        let wait = if exact {
            Duration::from_millis(300)
        } else {
            NOTICE
        };
        assert_eq!(
            rx.recv_timeout(wait),
            want,
            "claim naming start time {claimed_start} \
             (the stranger's is {start})"
        );
    }
    drop(stranger);
}

/// A receiver SIGKILLed while asleep in `recv` leaves its announcement on the eventcount;
/// the next sends must clear it, or every send pays a futex wake for the queue's life.
fn receiver_killed_asleep_leaves_no_waiter_count() {
    for_both_flavours!(<u64> |flavour, make| {
        let (tx, rx) = make(4);
        // The sleeper re-announces itself every 20 ms; a kill that lands in the few
        // microseconds between two announcements leaves nothing to heal, so try again.
        let mut left = 0;
        for _ in 0..10 {
            let receiver = spawn(|| {
                let _ = rx.recv();
                panic!("received");
            });
            common::wait_for("the receiver to sleep", LIMIT, || tx.__not_empty_waiters() != 0);
            std::thread::sleep(Duration::from_millis(50));
            receiver.kill().unwrap();
            let _ = receiver.join();
            left = tx.__not_empty_waiters();
            if left != 0 {
                break;
            }
        }
        assert_ne!(left, 0, "{flavour}: the dead sleeper left no count to heal");
        for i in 0..3 {
            let _ = tx.try_send(i);
        }
        assert_eq!(tx.__not_empty_waiters(), 0, "{flavour}: the count stayed high");
        drop(rx);
    });
}

/// A scribbled `tail` (far ahead, or a few positions ahead) must be reported as
/// corruption to senders and receivers alike, persistently, and must wake a receiver
/// blocked in `recv` rather than leave it asleep forever.
fn channel_corrupted_tail_is_reported_to_both_sides() {
    let far: fn(u64) -> u64 = |_| 1000;
    for scribble in [far, |t| t + 5] {
        let (tx, rx) = procshare::channel::<u64>(8).unwrap();
        let receiver = {
            let rx = rx.clone();
            spawn(move || {
                let mut got = Vec::new();
                let e = loop {
                    match rx.recv() {
                        Ok(v) => got.push(v),
                        Err(e) => break e,
                    }
                };
                assert!(
                    e.to_string().contains("corrupted"),
                    "blocked recv got {e} after {got:?}"
                );
            })
        };
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        tx.__scribble_tail(scribble);
        // The sender may not notice the first time (a position ahead looks free), but once
        // anyone has noticed, everyone must be told.
        let mut sender_told = false;
        let t0 = Instant::now();
        while t0.elapsed() < NOTICE {
            match tx.send_timeout(3, Duration::from_millis(10)) {
                Err(e) if e.to_string().contains("corrupted") => {
                    sender_told = true;
                    break;
                }
                Err(e) if e.to_string().contains("disconnected") => {
                    panic!("a corrupted queue told the sender: {e}")
                }
                _ => match rx.try_recv() {
                    Err(TryRecvError::Corrupted(_)) | Err(TryRecvError::Empty) | Ok(_) => {}
                    Err(e) => panic!("{e}"),
                },
            }
        }
        assert!(
            sender_told,
            "the sender was never told the queue is corrupted"
        );
        join(receiver, LIMIT);
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Corrupted(_))));
        assert!(
            tx.try_send(4)
                .unwrap_err()
                .to_string()
                .contains("corrupted")
        );
    }
}

/// Runs `f`, which must panic with the refusal of a second process on an spsc end.
fn assert_refused<R: std::fmt::Debug>(what: &str, f: impl FnOnce() -> R) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let e = r.expect_err(what);
    let msg = e
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(
        msg.contains("another live process"),
        "{what}: unclear refusal: {msg}"
    );
}

/// An spsc end inherited by fork and used by two live processes would duplicate or lose
/// messages: after a fork, the first process to use an end owns it, and another live
/// process's use panics with a clear message, while the owner carries on undisturbed.
/// Once the owner is dead, the other process may take over.
fn spsc_end_used_from_two_processes_is_refused() {
    let (tx, rx) = procshare::spsc::<u64>(64).unwrap();
    let ev = Shared::new([Event::new(), Event::new()]).unwrap();
    let (used, done): (&Event, &Event) = (&ev[0], &ev[1]);
    tx.send(0).unwrap();
    // The parent uses the sender after the fork first; the child is refused.
    let child = spawn(|| {
        assert!(used.wait_timeout(LIMIT));
        assert_refused("a second process sent on the spsc sender", || tx.send(99));
        assert_refused("a second process received on the spsc receiver", || {
            rx.try_recv()
        });
    });
    tx.send(1).unwrap();
    assert_eq!(rx.recv(), Ok(0));
    used.set();
    join(child, LIMIT);
    for i in 2..10 {
        tx.send(i).unwrap();
    }
    assert_eq!(
        rx.try_iter().collect::<Vec<_>>(),
        (1..10).collect::<Vec<_>>()
    );
    // The child uses both ends first; the parent is refused while the child lives.
    used.clear();
    let child = spawn(|| {
        tx.send(10).unwrap();
        assert_eq!(rx.recv(), Ok(10));
        tx.send(11).unwrap();
        used.set();
        assert!(done.wait_timeout(LIMIT));
    });
    assert!(used.wait_timeout(LIMIT));
    assert_refused("the parent sent while the child owns the sender", || {
        tx.send(98)
    });
    assert_refused(
        "the parent received while the child owns the receiver",
        || rx.try_recv(),
    );
    done.set();
    join(child, LIMIT);
    // The child exited without dropping (fork children leave with _exit): its ownership
    // dies with it, and the parent takes over where it left off.
    tx.send(12).unwrap();
    assert_eq!(rx.try_iter().collect::<Vec<_>>(), [11, 12]);
}

/// The usual hand-over stays legal: an end used here, then moved into a forked child,
/// works there at once; and an end whose owning process died may be used by a process
/// that inherited it.
fn spsc_end_moved_to_a_child_or_left_by_a_dead_one_is_usable() {
    for _ in 0..20 {
        let (tx, rx) = procshare::spsc::<u64>(64).unwrap();
        tx.send(0).unwrap();
        let child = spawn(move || {
            for i in 1..100 {
                tx.send(i).unwrap();
            }
        });
        for i in 0..100 {
            assert_eq!(rx.recv_timeout(LIMIT), Ok(i));
        }
        join(child, LIMIT);
    }
    let (tx, rx) = procshare::spsc::<u64>(64).unwrap();
    let ready = Shared::new(Event::new()).unwrap();
    let ready_ref: &Event = &ready;
    let owner = spawn(|| {
        tx.send(1).unwrap();
        ready_ref.set();
        sleep_forever()
    });
    assert!(ready.wait_timeout(LIMIT));
    owner.kill().unwrap();
    let _ = owner.join();
    tx.send(2).unwrap();
    assert_eq!(rx.try_iter().collect::<Vec<_>>(), [1, 2]);
}
