//! `Queue<T>` and `ByteQueue` across real processes, including processes killed at chosen
//! points of a send or receive. Runs under the forking, watchdogged runner in `common`.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use procshare::queue::bytes::__FAIL_POINTS;
use procshare::{ByteQueue, Event, Process, Queue, QueueError, Shared};

use common::{join, spawn};

const LIMIT: Duration = Duration::from_secs(20);

fn main() {
    common::run(
        tests![
            python_queue_seed_program,
            a_record_word_with_stray_bits_is_corruption_not_a_spin,
            a_two_way_handle_in_the_parent_keeps_the_queue_connected,
            receivers_learn_every_sender_died_while_the_parent_keeps_a_receiver,
            senders_learn_every_receiver_died_while_the_parent_keeps_a_sender,
            large_messages_arrive_intact,
            producer_killed_mid_chunked_message_delivers_nothing_partial,
            producer_killed_mid_write_is_skipped,
            consumer_killed_mid_read_does_not_block_producers,
            oversize_message_is_refused_and_nothing_is_lost,
            getter_sees_disconnect_when_the_last_peer_dies,
            timed_receive_mid_chunked_message_keeps_it_whole,
            typed_get_timeout_mid_chunked_message_keeps_it_whole,
            partial_message_kept_by_a_timed_out_receiver_is_not_stolen,
            receiver_killed_holding_a_partial_message_blocks_nobody,
            message_kept_by_a_receiver_that_timed_out_is_put_back_when_its_process_lets_go,
            message_completed_by_a_keepers_send_is_put_back_when_its_process_lets_go,
            a_sole_receiver_dropping_a_clone_while_it_keeps_a_message_keeps_it,
            a_peer_killed_between_any_two_stores_leaves_a_working_queue,
            panicking_fill_sends_nothing_and_does_not_wedge,
            panicking_reader_consumes_the_message_and_does_not_wedge,
            panicking_serialize_does_not_wedge_a_typed_queue,
            try_and_timed_calls_return_on_time_while_a_chunked_message_streams,
            timed_chunked_send_that_gives_up_sends_nothing,
            impatient_receivers_get_every_message_once,
            a_process_keeping_a_partial_message_can_still_send,
        ],
        &[],
    )
}

/// Seed 000's `push_elements`/`pop_elements`: one process puts a list, another takes it.
fn python_queue_seed_program() {
    let q: Queue<String> = Queue::new().unwrap();
    let items = ["apple", "banana", "cherry", "date"];
    let producer = spawn(|| {
        for item in items {
            q.put(&item.to_string()).unwrap();
        }
        q.put(&"END".to_string()).unwrap();
    });
    let mut got = Vec::new();
    loop {
        let item = q.get_timeout(LIMIT).unwrap();
        if item == "END" {
            break;
        }
        got.push(item);
    }
    assert_eq!(got, items);
    join(producer, LIMIT);
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn pattern(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn large_messages_arrive_intact() {
    let q: Queue<Vec<u8>> = Queue::builder().capacity(256 * 1024).build().unwrap();
    let sizes = [64 * 1024, 1 << 20, 8 << 20, 10];
    let producer = spawn(|| {
        for (i, size) in sizes.iter().enumerate() {
            q.put(&pattern(*size, i as u8)).unwrap();
        }
    });
    for (i, size) in sizes.iter().enumerate() {
        let v = q.get_timeout(LIMIT).unwrap();
        assert_eq!(v.len(), *size);
        assert_eq!(
            checksum(&v),
            checksum(&pattern(*size, i as u8)),
            "message {i} intact"
        );
    }
    join(producer, LIMIT);
}

fn producer_killed_mid_chunked_message_delivers_nothing_partial() {
    // A 4 MiB message into a 64 KiB ring nobody reads yet: the producer blocks after a few
    // chunks, holding the producer lock. Kill it there.
    let q = ByteQueue::builder().capacity(64 * 1024).bytes().unwrap();
    let big = spawn(|| q.send(&pattern(4 << 20, 1)).unwrap());
    // 4 MiB cannot fit in 64 KiB: within a moment the producer is stuck mid-message.
    std::thread::sleep(Duration::from_millis(300));
    assert!(big.is_alive(), "the producer is blocked mid-message");
    big.kill().unwrap();
    let _ = big.join();
    // Another producer sends a small message after it (recovering the dead lock).
    let after = spawn(|| q.send(b"after").unwrap());
    // The consumer must get exactly "after": the partial message is dropped whole.
    let got = q.recv_with_timeout(LIMIT, <[u8]>::to_vec).unwrap();
    assert_eq!(got, b"after");
    join(after, LIMIT);
    // Nothing else: no fragment of the dead producer's message ever surfaces. (With every
    // other process gone this handle is alone, so the queue reports that.)
    let rest = q.recv_with_timeout(Duration::from_millis(200), <[u8]>::to_vec);
    assert!(
        matches!(rest, Err(QueueError::Timeout | QueueError::Disconnected)),
        "{rest:?}"
    );
}

fn producer_killed_mid_write_is_skipped() {
    let q = ByteQueue::new().unwrap();
    let writing = Shared::new(Event::new()).unwrap();
    let stuck = spawn(|| {
        q.send_with(100, |buf| {
            buf.fill(9);
            writing.set();
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        })
        .unwrap();
    });
    assert!(writing.wait_timeout(LIMIT));
    // A later message from a live producer waits behind the unpublished one...
    q.send(b"second").unwrap();
    assert_eq!(
        q.recv_with_timeout(Duration::from_millis(100), <[u8]>::to_vec),
        Err(QueueError::Timeout),
        "a slow (live) writer must not be skipped"
    );
    // ...until the writer dies; then it is skipped.
    stuck.kill().unwrap();
    let _ = stuck.join();
    let t0 = Instant::now();
    assert_eq!(
        q.recv_with_timeout(LIMIT, <[u8]>::to_vec).unwrap(),
        b"second"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t0.elapsed()
    );
}

fn consumer_killed_mid_read_does_not_block_producers() {
    let q = ByteQueue::builder().capacity(4096).bytes().unwrap();
    q.send(&[1; 512]).unwrap();
    let reading = Shared::new(Event::new()).unwrap();
    let reader = spawn(|| {
        q.recv_with(|_| {
            reading.set();
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        })
        .unwrap();
    });
    assert!(reading.wait_timeout(LIMIT));
    reader.kill().unwrap();
    let _ = reader.join();
    // Fill the ring several times over: the dead reader's record must be freed.
    let consumer = spawn(|| {
        for _ in 0..64 {
            assert_eq!(q.recv_with_timeout(LIMIT, <[u8]>::len).unwrap(), 512);
        }
    });
    for _ in 0..64 {
        q.send_timeout(&[2; 512], LIMIT).unwrap();
    }
    join(consumer, LIMIT);
}

fn oversize_message_is_refused_and_nothing_is_lost() {
    let q: Queue<Vec<u8>> = Queue::builder().max_message(1 << 20).build().unwrap();
    q.put(&vec![1; 10]).unwrap();
    let e = q.put(&vec![0; 2 << 20]).unwrap_err();
    assert!(
        matches!(e, QueueError::MessageTooLarge { max, .. } if max == 1 << 20),
        "{e}"
    );
    assert!(
        e.to_string().contains("max_message"),
        "the error says what to do: {e}"
    );
    q.put(&vec![3; 10]).unwrap();
    let child = spawn(|| {
        assert_eq!(q.get_timeout(LIMIT).unwrap(), vec![1; 10]);
        assert_eq!(q.get_timeout(LIMIT).unwrap(), vec![3; 10]);
    });
    join(child, LIMIT);
}

fn getter_sees_disconnect_when_the_last_peer_dies() {
    let q: Queue<u32> = Queue::new().unwrap();
    let peer = spawn({
        let q = q.clone();
        move || {
            let _keep = q;
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    });
    assert_eq!(
        q.get_timeout(Duration::from_millis(100)),
        Err(QueueError::Timeout)
    );
    peer.kill().unwrap();
    let _ = peer.join();
    let t0 = Instant::now();
    assert_eq!(q.get_timeout(LIMIT), Err(QueueError::Disconnected));
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t0.elapsed()
    );
}

// ---- issue 6: timeouts, kills between stores, panics --------------------------------

/// A 4 KiB ring: a record holds at most 1008 payload bytes, larger messages are chunked.
fn small_queue() -> ByteQueue {
    ByteQueue::builder().capacity(4096).bytes().unwrap()
}

/// Asserts that `f` returns within `limit` (a generous bound: "did not block for seconds").
fn within<R>(what: &str, limit: Duration, f: impl FnOnce() -> R) -> R {
    let t0 = Instant::now();
    let r = f();
    assert!(
        t0.elapsed() < limit,
        "{what} took {:?}, more than {limit:?}",
        t0.elapsed()
    );
    r
}

fn timed_receive_mid_chunked_message_keeps_it_whole() {
    let q = small_queue();
    let big = pattern(100_000, 3);
    let producer = spawn(|| {
        q.send(&big).unwrap();
        q.send(b"after").unwrap();
    });
    // The producer has filled the ring with the first chunks and waits for room.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(q.try_recv_with(<[u8]>::to_vec), Err(QueueError::Empty));
    let got = q.recv_with_timeout(LIMIT, <[u8]>::to_vec).unwrap();
    assert_eq!(got.len(), big.len(), "the chunked message arrives whole");
    assert_eq!(checksum(&got), checksum(&big));
    assert_eq!(
        q.recv_with_timeout(LIMIT, <[u8]>::to_vec).unwrap(),
        b"after"
    );
    join(producer, LIMIT);
}

fn typed_get_timeout_mid_chunked_message_keeps_it_whole() {
    let q: Queue<Vec<u8>> = Queue::builder().capacity(4096).build().unwrap();
    let big = pattern(2_000_000, 4);
    let producer = spawn(|| {
        q.put(&big).unwrap();
        q.put(&b"second".to_vec()).unwrap();
    });
    // The producer has filled the ring with the first chunks and waits for room.
    std::thread::sleep(Duration::from_millis(200));
    let same = |v: &Vec<u8>| v.len() == big.len() && checksum(v) == checksum(&big);
    match q.get_timeout(Duration::from_millis(1)) {
        Err(QueueError::Timeout) => {
            let v = q.get_timeout(LIMIT).unwrap();
            assert!(
                same(&v),
                "got {} bytes instead of the chunked message",
                v.len()
            );
        }
        Ok(v) => assert!(same(&v), "a 1 ms get that succeeds gets the first message"),
        Err(e) => panic!("{e}"),
    }
    assert_eq!(q.get_timeout(LIMIT).unwrap(), b"second");
    join(producer, LIMIT);
}

fn partial_message_kept_by_a_timed_out_receiver_is_not_stolen() {
    let q = small_queue();
    let big = pattern(100_000, 5);
    let producer = spawn(|| {
        q.send(&big).unwrap();
        q.send(b"after").unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(q.try_recv_with(<[u8]>::len), Err(QueueError::Empty));
    // A receiver in another process neither gets a fragment nor skips ahead to "after":
    // the rest of the message belongs to the receiver that started it.
    let other = spawn(|| {
        assert_eq!(
            q.recv_with_timeout(Duration::from_millis(300), <[u8]>::to_vec),
            Err(QueueError::Timeout)
        );
    });
    join(other, LIMIT);
    let got = q.recv_with_timeout(LIMIT, <[u8]>::to_vec).unwrap();
    assert_eq!(checksum(&got), checksum(&big));
    assert_eq!(
        q.recv_with_timeout(LIMIT, <[u8]>::to_vec).unwrap(),
        b"after"
    );
    join(producer, LIMIT);
}

fn receiver_killed_holding_a_partial_message_blocks_nobody() {
    let q = small_queue();
    let kept = Shared::new(Event::new()).unwrap();
    let producer = spawn(|| {
        q.send(&pattern(100_000, 6)).unwrap();
        q.send(b"after").unwrap();
    });
    let keeper = spawn(|| {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(q.try_recv_with(<[u8]>::len), Err(QueueError::Empty));
        kept.set();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    assert!(kept.wait_timeout(LIMIT));
    keeper.kill().unwrap();
    let _ = keeper.join();
    // The message is lost with the receiver that held its start; the rest is skipped.
    let got = within(
        "receiving after the keeper died",
        Duration::from_secs(5),
        || q.recv_with_timeout(LIMIT, <[u8]>::to_vec).unwrap(),
    );
    assert_eq!(got, b"after");
    join(producer, LIMIT);
}

/// Review finding F05: a worker polls with `get_timeout`, gives up in the middle of a
/// large message (keeping its start, see the module docs' "Timeouts") and goes home. Its
/// last handle's drop finishes receiving the message and puts it back: nothing is lost.
/// (Before: the message was gone, and the next `get` returned the one after it.)
fn message_kept_by_a_receiver_that_timed_out_is_put_back_when_its_process_lets_go() {
    let q: Queue<Vec<u8>> = Queue::builder().capacity(4096).build().unwrap();
    let big = pattern(50_000, 9);
    let producer = spawn(|| {
        q.put(&big).unwrap();
        q.put(&b"after".to_vec()).unwrap();
    });
    // The producer fills the ring and waits for room; stop it there.
    std::thread::sleep(Duration::from_millis(200));
    producer.signal(libc::SIGSTOP).unwrap();
    let timed_out = Shared::new(Event::new()).unwrap();
    let poller = spawn({
        // Its own handle, dropped when it goes home (a borrowed one would not be).
        let (q, timed_out) = (q.clone(), &timed_out);
        move || {
            // Sees no whole message in time, keeps the start of `big`, and goes home: its
            // handle's drop waits for the (stopped) producer to stream the rest.
            assert_eq!(
                q.get_timeout(Duration::from_millis(50)),
                Err(QueueError::Timeout)
            );
            timed_out.set();
        }
    });
    assert!(timed_out.wait_timeout(LIMIT));
    std::thread::sleep(Duration::from_millis(100));
    producer.signal(libc::SIGCONT).unwrap();
    // Put back as a new message, so "after" may come first.
    let mut got = Vec::new();
    for _ in 0..2 {
        match q.get_timeout(Duration::from_secs(5)) {
            Ok(v) => got.push(v),
            Err(e) => panic!(
                "a message was lost: got {:?} and then {e}",
                got.iter().map(Vec::len).collect::<Vec<_>>()
            ),
        }
    }
    got.sort_by_key(Vec::len);
    assert_eq!(got[0], b"after");
    assert_eq!(
        checksum(&got[1]),
        checksum(&big),
        "the large message, whole"
    );
    join(poller, LIMIT);
    join(producer, LIMIT);
    // Nothing else in the queue (and nobody else holds it any more).
    assert_eq!(q.try_get(), Err(QueueError::Disconnected));
}

/// As above, when the kept message was already completed (by a send of the keeping
/// process draining it while waiting for room) and waits for that process's next receive.
fn message_completed_by_a_keepers_send_is_put_back_when_its_process_lets_go() {
    let q = small_queue();
    let big = pattern(20_000, 10);
    let producer = spawn(|| q.send(&big).unwrap());
    // Stopped with the ring full of the first chunks, so the keeper's try keeps a part.
    std::thread::sleep(Duration::from_millis(200));
    producer.signal(libc::SIGSTOP).unwrap();
    let (kept, drained) = (
        Shared::new(Event::new()).unwrap(),
        Shared::new(Event::new()).unwrap(),
    );
    let keeper = spawn({
        let (q, kept, drained) = (q.clone(), &kept, &drained);
        move || {
            assert_eq!(q.try_recv_with(<[u8]>::len), Err(QueueError::Empty));
            kept.set();
            // A send that must wait for room drains the kept message meanwhile.
            q.send_timeout(&[7; 3000], Duration::from_secs(5)).unwrap();
            drained.set();
        }
    });
    assert!(kept.wait_timeout(LIMIT));
    producer.signal(libc::SIGCONT).unwrap();
    assert!(drained.wait_timeout(LIMIT));
    // Received while the keeper goes home: a message larger than the ring goes back
    // chunk by chunk, so a receiver must be taking them.
    let mut got = [
        q.recv_with_timeout(Duration::from_secs(5), <[u8]>::to_vec)
            .unwrap(),
        q.recv_with_timeout(Duration::from_secs(5), <[u8]>::to_vec)
            .unwrap(),
    ];
    got.sort_by_key(Vec::len);
    assert_eq!(got[0], [7; 3000]);
    assert_eq!(checksum(&got[1]), checksum(&big));
    join(keeper, LIMIT);
    join(producer, LIMIT);
}

/// The put-back on drop is bounded: a process that is the queue's only receiver, keeps a
/// message larger than the ring and drops a clone cannot put it back (nobody else takes
/// the chunks); after a bounded wait it keeps the message for its next receive.
fn a_sole_receiver_dropping_a_clone_while_it_keeps_a_message_keeps_it() {
    let q = small_queue();
    let big = pattern(20_000, 11);
    let producer = spawn(|| q.send(&big).unwrap());
    // Stopped with the ring full of the first chunks, so the try keeps a part.
    std::thread::sleep(Duration::from_millis(200));
    producer.signal(libc::SIGSTOP).unwrap();
    assert_eq!(q.try_recv_with(<[u8]>::len), Err(QueueError::Empty));
    producer.signal(libc::SIGCONT).unwrap();
    let clone = q.clone();
    within("dropping a clone", Duration::from_secs(6), || drop(clone));
    join(producer, LIMIT);
    let got = q
        .recv_with_timeout(Duration::from_secs(1), <[u8]>::to_vec)
        .unwrap();
    assert_eq!(checksum(&got), checksum(&big));
    assert_eq!(q.len(), 0);
}

static STALLED: OnceLock<Shared<Event>> = OnceLock::new();

fn stalled() -> &'static Event {
    STALLED.get_or_init(|| Shared::new(Event::new()).unwrap())
}

/// A fail point's stall: tell the test, then wait to be killed.
fn stall_forever() {
    stalled().set();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A fail point's stall for a second process: wait to be killed, quietly.
fn stall_quietly() {
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

const A_LEN: usize = 900;

/// A 4 KiB queue whose positions stand 384 bytes before the end of the ring, so the next
/// 900-byte message (a 928-byte record) is preceded by a padding record.
fn queue_before_wrap() -> ByteQueue {
    let q = small_queue();
    for _ in 0..4 {
        q.send(&[0; A_LEN]).unwrap();
        assert_eq!(q.recv().unwrap().len(), A_LEN);
    }
    q
}

/// One kill scenario: a victim process stalls at `point` and is killed there; then this
/// process must receive exactly the messages the point allows, and the queue must work.
fn kill_at(point: &'static str) {
    let q = queue_before_wrap();
    let a = pattern(A_LEN, 7);
    let big = pattern(3000, 8);
    stalled().clear();
    let consumer_side = point.starts_with("claim") || point.starts_with("release");
    let mut others = Vec::new();
    let victim = if consumer_side {
        q.send(&a).unwrap();
        q.send(b"b").unwrap();
        spawn(|| {
            ByteQueue::__stall_at(Some(point), stall_forever);
            let _ = q.recv_with(<[u8]>::len);
            panic!("the victim never reached {point}");
        })
    } else if point.starts_with("assemble") {
        // A producer stalled for good after its first chunk, a receiver that gives up
        // mid-message and keeps what it has.
        others.push(spawn(|| {
            ByteQueue::__stall_at(Some("chunked: first chunk published"), stall_quietly);
            let _ = q.send(&big);
        }));
        spawn(|| {
            ByteQueue::__stall_at(Some(point), stall_forever);
            loop {
                let _ = q.recv_with_timeout(Duration::from_millis(10), <[u8]>::len);
            }
        })
    } else {
        let msg = if point.starts_with("chunked") {
            &big
        } else {
            &a
        };
        spawn(|| {
            ByteQueue::__stall_at(Some(point), stall_forever);
            let _ = q.send(msg);
            panic!("the victim never reached {point}");
        })
    };
    assert!(
        stalled().wait_timeout(Duration::from_secs(5)),
        "the victim never reached {point}"
    );
    for p in others.into_iter().chain([victim]) {
        p.kill().unwrap();
        let _ = p.join();
    }
    if !consumer_side {
        q.send(b"b").unwrap();
    }
    // This handle is now the only one: drain until the queue says so.
    let mut got = Vec::new();
    loop {
        match q.recv_with_timeout(LIMIT, <[u8]>::to_vec) {
            Ok(m) => got.push(m),
            Err(QueueError::Disconnected) => break,
            Err(e) => panic!("{point}: receiving after the kill: {e}"),
        }
    }
    let allowed: &[&[u8]] = &[&a, &big, b"b"];
    for m in &got {
        assert!(
            allowed.contains(&m.as_slice()),
            "{point}: a damaged message of {} bytes",
            m.len()
        );
    }
    let mut dedup = got.clone();
    dedup.dedup();
    assert_eq!(dedup.len(), got.len(), "{point}: a message delivered twice");
    assert_eq!(
        got.last().map(Vec::as_slice),
        Some(&b"b"[..]),
        "{point}: got {} messages",
        got.len()
    );
    // Nothing handed to the victim's code was lost, and nothing half-sent delivered.
    let must_deliver_a =
        point.starts_with("claim: padding") || point.starts_with("claim: record READING");
    if must_deliver_a {
        assert_eq!(
            got.first(),
            Some(&a),
            "{point}: a message its reader never saw was lost"
        );
    }
    if point.starts_with("chunked: stream cleared") {
        // Every chunk was out: the message was sent whole.
        assert_eq!(got, [big.clone(), b"b".to_vec()], "{point}");
    } else if !consumer_side {
        assert_eq!(
            got.len(),
            1,
            "{point}: an unpublished message was delivered"
        );
    }
    assert_eq!(q.len(), 0, "{point}: len() after draining");
    // The ring still cycles: every byte the victim held is free again.
    for i in 0..16u8 {
        q.send(&pattern(A_LEN, i))
            .unwrap_or_else(|e| panic!("{point}: send {i}: {e}"));
        assert_eq!(q.recv().unwrap(), pattern(A_LEN, i), "{point}");
    }
    assert_eq!(q.len(), 0, "{point}: len() at the end");
}

fn a_peer_killed_between_any_two_stores_leaves_a_working_queue() {
    let mut failed = Vec::new();
    for point in __FAIL_POINTS {
        let mut child = Process::builder()
            .daemon(true)
            .process_group(true)
            .fork(|| kill_at(point))
            .expect("fork");
        let outcome = child.join_timeout(Duration::from_secs(15));
        common::kill_group(child.pid());
        match outcome {
            Ok(()) => println!("    killed at {point:?}: ok"),
            other => {
                println!("    killed at {point:?}: FAILED ({other:?})");
                failed.push(*point);
            }
        }
    }
    assert!(failed.is_empty(), "failed at {failed:?}");
}

fn panicking_fill_sends_nothing_and_does_not_wedge() {
    let q = small_queue();
    let done = Shared::new(Event::new()).unwrap();
    let quit = Shared::new(Event::new()).unwrap();
    // The panicking process lives on (as a thread pool would), holding its handle.
    let child = spawn(|| {
        let r = catch_unwind(AssertUnwindSafe(|| {
            q.send_with(100, |_| panic!("fill fails"))
        }));
        assert!(r.is_err());
        q.send(b"after").unwrap();
        done.set();
        assert!(quit.wait_timeout(LIMIT));
    });
    assert!(done.wait_timeout(LIMIT));
    assert_eq!(
        q.recv_with_timeout(Duration::from_secs(2), <[u8]>::to_vec),
        Ok(b"after".to_vec()),
        "the abandoned message is skipped, not waited for"
    );
    assert_eq!(q.len(), 0);
    quit.set();
    join(child, LIMIT);
}

fn panicking_reader_consumes_the_message_and_does_not_wedge() {
    let q = small_queue();
    let done = Shared::new(Event::new()).unwrap();
    let quit = Shared::new(Event::new()).unwrap();
    q.send(&[1; A_LEN]).unwrap();
    q.send(b"next").unwrap();
    let child = spawn(|| {
        let r = catch_unwind(AssertUnwindSafe(|| {
            q.recv_with(|_| -> usize { panic!("reader fails") })
        }));
        assert!(r.is_err());
        done.set();
        assert!(quit.wait_timeout(LIMIT));
    });
    assert!(done.wait_timeout(LIMIT));
    // Documented: a message whose reader panicked is consumed.
    assert_eq!(
        q.recv_with_timeout(Duration::from_secs(2), <[u8]>::to_vec),
        Ok(b"next".to_vec())
    );
    // Its space is free again: the ring cycles several times.
    for i in 0..16u8 {
        q.send_timeout(&pattern(A_LEN, i), Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("send {i}: {e}"));
        assert_eq!(q.recv().unwrap(), pattern(A_LEN, i));
    }
    quit.set();
    join(child, LIMIT);
}

/// A value whose `Serialize` panics on its second call (the first only measures it), as
/// a buggy impl would while being written into the ring. Larger in memory than the
/// values `Queue` encodes on the stack first, so it takes the measure-then-write path.
struct Flaky {
    calls: std::cell::Cell<u32>,
    value: u32,
    _large: [u64; 16],
}

impl serde::Serialize for Flaky {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.calls.set(self.calls.get() + 1);
        if self.calls.get() == 2 {
            panic!("Serialize fails");
        }
        s.serialize_u32(self.value)
    }
}

impl<'de> serde::Deserialize<'de> for Flaky {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Flaky {
            calls: Default::default(),
            value: u32::deserialize(d)?,
            _large: [0; 16],
        })
    }
}

fn panicking_serialize_does_not_wedge_a_typed_queue() {
    let q: Queue<Flaky> = Queue::builder().capacity(4096).build().unwrap();
    let done = Shared::new(Event::new()).unwrap();
    let quit = Shared::new(Event::new()).unwrap();
    let child = spawn(|| {
        let bad = Flaky {
            calls: Default::default(),
            value: 1,
            _large: [0; 16],
        };
        assert!(catch_unwind(AssertUnwindSafe(|| q.put(&bad))).is_err());
        let good = Flaky {
            calls: std::cell::Cell::new(5),
            value: 2,
            _large: [0; 16],
        };
        q.put(&good).unwrap();
        done.set();
        assert!(quit.wait_timeout(LIMIT));
    });
    assert!(done.wait_timeout(LIMIT));
    let got = q.get_timeout(Duration::from_secs(2)).map(|f| f.value);
    assert_eq!(got, Ok(2));
    quit.set();
    join(child, LIMIT);
}

static RESERVES: AtomicU32 = AtomicU32::new(0);

/// Stall for the producer of `try_and_timed_calls_...`: pauses 3 s before its second
/// chunk, with the producer lock held and its first chunk out.
fn pause_before_second_chunk() {
    if RESERVES.fetch_add(1, Ordering::Relaxed) == 1 {
        std::thread::sleep(Duration::from_secs(3));
    }
}

fn try_and_timed_calls_return_on_time_while_a_chunked_message_streams() {
    let q = small_queue();
    let big = pattern(100_000, 9);
    let producer = spawn(|| {
        ByteQueue::__stall_at(
            Some("reserve: record WRITING, tail not advanced"),
            pause_before_second_chunk,
        );
        q.send(&big).unwrap();
    });
    // A receiver that started on the message and waits for the rest of it.
    let receiver = spawn(|| {
        let got = q.recv_with_timeout(LIMIT, <[u8]>::to_vec).unwrap();
        assert_eq!(checksum(&got), checksum(&big));
    });
    std::thread::sleep(Duration::from_millis(300));
    let quick = Duration::from_millis(500);
    let ms10 = Duration::from_millis(10);
    let r = within("try_send", quick, || q.try_send(b"x"));
    assert_eq!(r, Err(QueueError::Full));
    let r = within("send_timeout(10 ms)", quick, || {
        q.send_timeout(&[5; 8000], ms10)
    });
    assert_eq!(r, Err(QueueError::Timeout));
    let r = within("send_timeout(1 byte, 10 ms)", quick, || {
        q.send_timeout(b"y", ms10)
    });
    assert_eq!(r, Err(QueueError::Timeout));
    let r = within("try_recv_with", quick, || q.try_recv_with(<[u8]>::len));
    assert_eq!(r, Err(QueueError::Empty));
    let r = within("recv_with_timeout(10 ms)", quick, || {
        q.recv_with_timeout(ms10, <[u8]>::len)
    });
    assert_eq!(r, Err(QueueError::Timeout));
    join(producer, LIMIT);
    join(receiver, LIMIT);
    // Nothing the calls above gave up on was sent, in whole or in part.
    assert_eq!(
        q.recv_with_timeout(LIMIT, <[u8]>::len),
        Err(QueueError::Disconnected)
    );
}

fn timed_chunked_send_that_gives_up_sends_nothing() {
    let q = small_queue();
    let quit = Shared::new(Event::new()).unwrap();
    // Another handle, alive but not receiving: the ring fills and stays full.
    let idle = spawn(|| {
        assert!(quit.wait_timeout(LIMIT));
    });
    let sender = spawn(|| {
        let r = within("a 100 ms chunked send", Duration::from_secs(2), || {
            q.send_timeout(&pattern(100_000, 10), Duration::from_millis(100))
        });
        assert_eq!(r, Err(QueueError::Timeout));
        let r = within(
            "try_send of a chunked message",
            Duration::from_secs(2),
            || q.try_send(&pattern(100_000, 10)),
        );
        assert_eq!(r, Err(QueueError::Full));
    });
    join(sender, Duration::from_secs(5));
    // The chunks that did go out fill the ring until a receiver passes over them; none
    // of them is delivered.
    assert_eq!(q.try_recv_with(<[u8]>::len), Err(QueueError::Empty));
    q.send(b"after").unwrap();
    assert_eq!(
        q.recv_with_timeout(LIMIT, <[u8]>::to_vec).unwrap(),
        b"after",
        "the abandoned message is never delivered, in part or whole"
    );
    assert_eq!(q.try_recv_with(<[u8]>::len), Err(QueueError::Empty));
    for i in 0..16u8 {
        q.send_timeout(&pattern(A_LEN, i), LIMIT).unwrap();
        assert_eq!(q.recv().unwrap(), pattern(A_LEN, i));
    }
    assert_eq!(q.len(), 0);
    quit.set();
    join(idle, LIMIT);
}

/// Two producer processes send messages of mixed sizes (most chunked) through a 4 KiB
/// ring, one of them with 300 µs timeouts and `try_send`, retrying until a send succeeds,
/// so it abandons chunked messages midway all the time; two receiver processes take them with 200 µs timeouts and `try_recv`, so they keep
/// and resume partial messages all the time. Every message arrives once, intact.
fn impatient_receivers_get_every_message_once() {
    const PER_PRODUCER: u32 = 300;
    const TOTAL: usize = 2 * PER_PRODUCER as usize;
    let sizes = [10usize, 500, 2000, 5000, 20_000];
    let q = small_queue();
    let seen: Shared<[AtomicU32]> = Shared::zeroed(TOTAL).unwrap();
    let received = Shared::new(AtomicU32::new(0)).unwrap();
    let message = |id: u32| -> Vec<u8> {
        let size = sizes[id as usize % sizes.len()];
        let mut m = id.to_le_bytes().to_vec();
        m.extend(pattern(size, id as u8));
        m
    };
    let producers: Vec<_> = (0..2u32)
        .map(|p| {
            spawn(|| {
                for i in 0..PER_PRODUCER {
                    let m = message(p * PER_PRODUCER + i);
                    if p == 0 {
                        q.send_timeout(&m, LIMIT).unwrap();
                        continue;
                    }
                    // Impatient too: gives up (abandoning chunks already out) and retries.
                    // `Timeout`/`Full` mean "not sent", so each message still arrives once.
                    let mut tries = 0u32;
                    loop {
                        tries += 1;
                        let r = if tries % 2 == 0 {
                            q.try_send(&m)
                        } else {
                            q.send_timeout(&m, Duration::from_micros(300))
                        };
                        match r {
                            Ok(()) => break,
                            Err(QueueError::Timeout | QueueError::Full) => {
                                assert!(tries < 1_000_000, "producer {p} gave up")
                            }
                            Err(e) => panic!("producer {p}: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    let receivers: Vec<_> = (0..2)
        .map(|r| {
            spawn(|| {
                let deadline = Instant::now() + LIMIT;
                let mut n = 0u32;
                while (received.load(Ordering::SeqCst) as usize) < TOTAL {
                    assert!(Instant::now() < deadline, "receiver {r} gave up");
                    n += 1;
                    let got = if n % 2 == 0 {
                        q.try_recv_with(<[u8]>::to_vec)
                    } else {
                        q.recv_with_timeout(Duration::from_micros(200), <[u8]>::to_vec)
                    };
                    match got {
                        Ok(m) => {
                            let id = u32::from_le_bytes(m[..4].try_into().unwrap());
                            assert!((id as usize) < TOTAL, "a damaged message");
                            assert!(m == message(id), "message {id} damaged");
                            seen[id as usize].fetch_add(1, Ordering::SeqCst);
                            received.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(QueueError::Timeout | QueueError::Empty) => {}
                        Err(e) => panic!("receiver {r}: {e}"),
                    }
                }
            })
        })
        .collect();
    for p in producers {
        join(p, LIMIT);
    }
    for r in receivers {
        join(r, LIMIT);
    }
    for (id, n) in seen.iter().enumerate() {
        assert_eq!(n.load(Ordering::SeqCst), 1, "message {id}");
    }
}

/// A process that keeps the start of a large message is the only one that may take the
/// rest, so its own sends must not wait for room that only its receiving would free (or
/// for the producer lock of a producer waiting for that room).
fn a_process_keeping_a_partial_message_can_still_send() {
    let q = small_queue();
    let big = pattern(100_000, 11);
    let producer = spawn(|| {
        q.send(&big).unwrap();
        q.send(b"after").unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(q.try_recv_with(<[u8]>::len), Err(QueueError::Empty));
    // The producer refills the ring with the rest of the message and waits for room,
    // holding the producer lock.
    std::thread::sleep(Duration::from_millis(100));
    let r = within("sending while keeping", Duration::from_secs(4), || {
        q.send_timeout(b"mine", Duration::from_secs(3))
    });
    assert_eq!(r, Ok(()));
    let r = within("a large send while keeping", Duration::from_secs(4), || {
        q.send_timeout(&pattern(3000, 12), Duration::from_secs(3))
    });
    assert_eq!(r, Ok(()));
    let got = q.recv_with_timeout(LIMIT, <[u8]>::to_vec).unwrap();
    assert_eq!(
        checksum(&got),
        checksum(&big),
        "the kept message comes first, whole"
    );
    let mut rest = Vec::new();
    for _ in 0..3 {
        rest.push(q.recv_with_timeout(LIMIT, <[u8]>::to_vec).unwrap());
    }
    rest.sort();
    let mut want = vec![b"after".to_vec(), b"mine".to_vec(), pattern(3000, 12)];
    want.sort();
    assert!(rest == want, "the other messages, once each");
    join(producer, LIMIT);
}

/// The documented rule: a `Queue` handle can both send and receive, so the parent's own
/// idle handle counts as a live sender (and receiver) for as long as it exists.
fn a_two_way_handle_in_the_parent_keeps_the_queue_connected() {
    let q: Queue<u32> = Queue::new().unwrap();
    let producer = spawn(|| {
        q.put(&1).unwrap();
        std::thread::sleep(Duration::from_secs(60)); // killed before its sentinel
    });
    let consumer = spawn(|| {
        assert_eq!(q.get_timeout(Duration::from_secs(5)), Ok(1));
        assert_eq!(
            q.get_timeout(Duration::from_millis(300)),
            Err(QueueError::Timeout),
            "the parent's two-way handle could still send"
        );
    });
    std::thread::sleep(Duration::from_millis(50));
    producer.kill().unwrap();
    let _ = producer.join();
    join(consumer, Duration::from_secs(10));
    // Once the parent's handle is gone too, the consumer's own handle is the last one.
    drop(q);
}

fn receivers_learn_every_sender_died_while_the_parent_keeps_a_receiver() {
    let (tx, rx) = Queue::<u32>::new().unwrap().split().unwrap();
    let producer = spawn(|| {
        tx.put(&1).unwrap();
        std::thread::sleep(Duration::from_secs(60)); // killed before its sentinel
    });
    drop(tx);
    // A consumer process holds a receive-only handle, and so does this one.
    let consumer = spawn(|| {
        assert_eq!(rx.get_timeout(Duration::from_secs(5)), Ok(1));
        let start = Instant::now();
        assert_eq!(
            rx.get_timeout(Duration::from_secs(10)),
            Err(QueueError::Disconnected)
        );
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    });
    std::thread::sleep(Duration::from_millis(100));
    producer.kill().unwrap();
    let _ = producer.join();
    join(consumer, Duration::from_secs(15));
    assert_eq!(rx.try_get(), Err(QueueError::Disconnected));
}

fn senders_learn_every_receiver_died_while_the_parent_keeps_a_sender() {
    let q: Queue<u32> = Queue::builder().capacity(4096).build().unwrap();
    let (tx, rx) = q.split().unwrap();
    let mut consumer = spawn(|| {
        std::thread::sleep(Duration::from_secs(60)); // never reads
        drop(rx.get());
    });
    drop(rx);
    let mut outcome = Ok(());
    let start = Instant::now();
    let mut killed = false;
    for i in 0..100_000 {
        if !killed && i == 100 {
            consumer.kill().unwrap();
            let _ = consumer.join_timeout(Duration::from_secs(10));
            killed = true;
        }
        outcome = tx.put_timeout(&i, Duration::from_secs(10));
        if outcome.is_err() {
            break;
        }
    }
    assert_eq!(outcome, Err(QueueError::Disconnected));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

/// Found by the `ring_records` fuzz target: a READING record at `head` whose word had a
/// bit set between the length and the kind made the consumer's repair (a compare-and-swap
/// against the decoded value) fail and retry for ever.
fn a_record_word_with_stray_bits_is_corruption_not_a_spin() {
    let q = ByteQueue::builder().capacity(4096).bytes().unwrap();
    let _other = q.clone();
    // state 3 (READING), kind 0, length 256, and a stray bit 39.
    let w: u64 = (3 << 56) | (1 << 39) | 256;
    q.__scribble(0, 0, 3840, &w.to_le_bytes());
    let start = Instant::now();
    match q.try_recv_with(|b| b.len()) {
        Err(QueueError::Corrupted(what)) => assert!(what.contains("record at 0"), "{what}"),
        other => panic!("expected Corrupted, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}
