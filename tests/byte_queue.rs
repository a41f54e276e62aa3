//! `Queue<T>` and `ByteQueue` across real processes, including processes killed at chosen
//! points of a send or receive. Runs under the forking, watchdogged runner in `common`.

mod common;

use std::time::{Duration, Instant};

use procshare::fork::signal;
use procshare::{ByteQueue, Event, Queue, QueueError, Shared};

use common::{join, spawn};

const LIMIT: Duration = Duration::from_secs(20);

fn main() {
    common::run(
        tests![
            python_queue_seed_program,
            large_messages_arrive_intact,
            producer_killed_mid_chunked_message_delivers_nothing_partial,
            producer_killed_mid_write_is_skipped,
            consumer_killed_mid_read_does_not_block_producers,
            oversize_message_is_refused_and_nothing_is_lost,
            getter_sees_disconnect_when_the_last_peer_dies,
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
    let mut big = spawn(|| q.send(&pattern(4 << 20, 1)).unwrap());
    // 4 MiB cannot fit in 64 KiB: within a moment the producer is stuck mid-message.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        big.try_wait().unwrap().is_none(),
        "the producer is blocked mid-message"
    );
    big.signal(signal::KILL).unwrap();
    big.wait().unwrap();
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
    let mut stuck = spawn(|| {
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
    stuck.signal(signal::KILL).unwrap();
    stuck.wait().unwrap();
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
    let mut reader = spawn(|| {
        q.recv_with(|_| {
            reading.set();
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        })
        .unwrap();
    });
    assert!(reading.wait_timeout(LIMIT));
    reader.signal(signal::KILL).unwrap();
    reader.wait().unwrap();
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
    let mut peer = spawn({
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
    peer.signal(signal::KILL).unwrap();
    peer.wait().unwrap();
    let t0 = Instant::now();
    assert_eq!(q.get_timeout(LIMIT), Err(QueueError::Disconnected));
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t0.elapsed()
    );
}
