//! Treats arbitrary bytes as the shared state of a byte queue (its three positions, its
//! chunked-message marks and the records in its ring), as if a peer had scribbled over the
//! shared memory, then drives the readers and a writer. Nothing may panic, read out of
//! bounds or hang: every impossible value must come back as `QueueError::Corrupted` (or an
//! ordinary empty/full answer).
#![no_main]

use libfuzzer_sys::fuzz_target;
use procshare::{ByteQueue, QueueError};

fuzz_target!(|input: &[u8]| {
    if input.len() < 24 {
        return;
    }
    let word = |i: usize| u64::from_le_bytes(input[i * 8..i * 8 + 8].try_into().unwrap());
    // Keep positions near each other often enough to reach the record parser.
    let base = word(0) % (1 << 20);
    let (free, head, tail) = (base, base + word(1) % 8192, base + word(2) % 8192);
    let q = ByteQueue::builder()
        .capacity(4096)
        .max_message(1 << 16)
        .bytes()
        .expect("queue");
    let _other = q.clone(); // a second handle: empty means "empty", not "disconnected"
    // With 40 bytes or more, two more words scribble the chunked-message marks too.
    let data = if input.len() >= 40 {
        q.__scribble_marks(word(3) % 8192, word(4));
        &input[40..]
    } else {
        &input[24..]
    };
    q.__scribble(free, head, tail, data);
    for _ in 0..8 {
        match q.try_recv_with(|bytes| bytes.len()) {
            Ok(len) => assert!(len <= q.max_message()),
            Err(QueueError::Empty | QueueError::Corrupted(_) | QueueError::Closed) => {}
            Err(e) => panic!("unexpected error {e:?}"),
        }
        match q.try_send(&[7; 100]) {
            Ok(()) | Err(QueueError::Full | QueueError::Corrupted(_)) => {}
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
});
