//! procshare's primitives embedded in a mapping that is not procshare's: two unrelated
//! processes (this program and a copy of itself started with `Command`) share a plain file
//! mapped with `memmap2`, holding a user-defined `#[repr(C)]` struct with a robust `Mutex`
//! around a small ring buffer, a `Condvar` for each direction and a `Barrier`.
//!
//! ```sh
//! cargo run --example embed_memmap2
//! ```

use std::fs::OpenOptions;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use memmap2::{MmapOptions, MmapRaw};
use procshare::shm::{init_in, place};
use procshare::{Barrier, Condvar, Mutex, ShmSafe};

const SLOTS: usize = 8;
const ITEMS: u64 = 1000;

/// A bounded ring of numbers; `u64::MAX` marks the end of the stream.
#[repr(C)]
struct Ring {
    head: u64,
    tail: u64,
    items: [u64; SLOTS],
}

// SAFETY: repr(C), integers only: no pointers, no Drop, every bit pattern valid.
unsafe impl ShmSafe for Ring {}

/// Everything the two processes share, at offset 0 of the file.
#[repr(C)]
struct Board {
    ring: Mutex<Ring>,
    not_empty: Condvar,
    not_full: Condvar,
    start: Barrier,
    total: Mutex<u64>,
}

// SAFETY: repr(C), only ShmSafe procshare types inside, no pointers, no Drop.
unsafe impl ShmSafe for Board {}

/// Maps the whole file shared. A raw mapping (not `MmapMut`, which hands out slices over
/// the same bytes the placed values change) is what `procshare::shm::place` accepts.
/// Nobody may truncate the file while it is mapped: accesses past its end would fault.
fn map(path: &Path) -> procshare::Result<MmapRaw> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    Ok(MmapOptions::new().map_raw(&file)?)
}

fn main() -> procshare::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, role, path] = args.as_slice() {
        if role == "consumer" {
            return consumer(Path::new(path));
        }
    }

    // The producer: make the file, initialise the board in it, start the consumer.
    let path = std::env::temp_dir().join(format!("procshare-embed-{}", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    file.set_len(4096)?;
    let mut mapping = map(&path)?;
    init_in(
        &mut mapping,
        0,
        Board {
            ring: Mutex::new(Ring {
                head: 0,
                tail: 0,
                items: [0; SLOTS],
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            start: Barrier::new(2),
            total: Mutex::new(0),
        },
    )?;
    let board: &Board = place(&mapping, 0)?;

    let mut consumer = Command::new(std::env::current_exe()?)
        .arg("consumer")
        .arg(&path)
        .spawn()?;
    board.start.wait()?;
    println!("producer: both processes met at the barrier");

    for n in (1..=ITEMS).chain([u64::MAX]) {
        let mut ring = board.ring.lock().unwrap();
        while ring.tail - ring.head == SLOTS as u64 {
            // A bounded wait, so that a consumer that died is noticed instead of waited
            // for forever.
            ring = board
                .not_full
                .wait_timeout(ring, Duration::from_millis(100))
                .unwrap()
                .0;
            if let Some(status) = consumer.try_wait()? {
                panic!("the consumer exited early ({status})");
            }
        }
        let slot = (ring.tail % SLOTS as u64) as usize;
        ring.items[slot] = n;
        ring.tail += 1;
        drop(ring);
        board.not_empty.notify_one();
    }
    let status = consumer.wait()?;
    let total = *board.total.lock().unwrap();
    println!("producer: consumer exited with {status}; it summed {total}");
    assert_eq!(total, ITEMS * (ITEMS + 1) / 2);
    std::fs::remove_file(&path)?;
    println!("producer: sum of 1..={ITEMS} = {total}, as expected");
    Ok(())
}

fn consumer(path: &Path) -> procshare::Result<()> {
    let mapping = map(path)?;
    let board: &Board = place(&mapping, 0)?;
    board.start.wait()?;
    let mut sum = 0u64;
    loop {
        let mut ring = board.ring.lock().unwrap();
        while ring.tail == ring.head {
            ring = board.not_empty.wait(ring).unwrap();
        }
        let slot = (ring.head % SLOTS as u64) as usize;
        let n = ring.items[slot];
        ring.head += 1;
        drop(ring);
        board.not_full.notify_one();
        if n == u64::MAX {
            break;
        }
        sum += n;
    }
    *board.total.lock().unwrap() = sum;
    println!("consumer: received {ITEMS} numbers through the ring in the file");
    Ok(())
}
