//! Python's Queue producer/consumer program: one process puts ten random numbers on a
//! queue, another takes them off at its own pace.
//!
//! Python's consumer stops when `get(timeout=1)` raises. Here the consumer holds a
//! receive-only handle and stops when the queue tells it that no process can put any more
//! (`Disconnected`), which also happens at once if the producer crashes.
//!
//! ```sh
//! cargo run --example queue_producer_consumer
//! ```

use std::time::Duration;

use procshare::{Process, Queue, QueueError};

fn producer(queue: procshare::QueueSender<u32>) -> u32 {
    // A small xorshift generator: the example needs no `rand` dependency.
    let mut state = std::process::id() | 1;
    for _ in 0..10 {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let item = state % 100 + 1;
        queue.put(&item).expect("put");
        println!("Produced: {item}");
        std::thread::sleep(Duration::from_millis(20));
    }
    10
}

fn consumer(queue: procshare::QueueReceiver<u32>) -> u32 {
    let mut consumed = 0;
    loop {
        match queue.get() {
            Ok(item) => {
                println!("Consumed: {item}");
                consumed += 1;
                std::thread::sleep(Duration::from_millis(40));
            }
            // Every producer is gone and the queue is drained.
            Err(QueueError::Disconnected) => break,
            Err(e) => panic!("get failed: {e}"),
        }
    }
    println!("Consumer done: {consumed} items");
    consumed
}

fn main() -> procshare::Result<()> {
    // Python: q = Queue(); here split into the two roles the processes play.
    let (tx, rx) = Queue::<u32>::new()?.split()?;
    // Python: Process(target=producer, args=(q,)), Process(target=consumer, args=(q,)).
    // A forked child inherits every handle its parent holds at that moment, so hand each
    // end over with `move`: `Process::fork` drops the closure (and the end in it) in the
    // parent, and the consumer, forked after that, holds no sender that would keep the
    // queue open.
    let prod = Process::fork(move || producer(tx))?;
    let cons = Process::fork(move || consumer(rx))?;
    // Python: prod.join(); cons.join()
    let produced = prod.join().expect("the producer process failed");
    let consumed = cons.join().expect("the consumer process failed");
    assert_eq!((produced, consumed), (10, 10));
    Ok(())
}
