//! A tour of procshare: Python's `multiprocessing` programs, in real processes.
//!
//! Run with `cargo run --release --example tour`.
//!
//! Each section starts worker processes with `Process::fork` (a forked child running a
//! closure; `join` gives back its return value) and shows one primitive doing the job
//! Python's does, plus what Python's cannot: surviving a worker that is killed at the worst
//! moment.

use std::time::{Duration, Instant};

use procshare::{
    Array, Event, Mutex, Process, ProcessError, Queue, Shared, Value, channel, pipe, spsc,
};

type Res = Result<(), Box<dyn std::error::Error>>;

fn main() -> Res {
    procshare::init();
    println!(
        "procshare tour: {} CPUs available\n",
        procshare::cpu_count()
    );
    value_and_array()?;
    queue()?;
    pipe_conversation()?;
    zero_copy_rings()?;
    robust_lock()?;
    Ok(())
}

/// Python: `Value('i')`, `Array('i', 4)` filled by a child process.
fn value_and_array() -> Res {
    let mylist = [1, 2, 3, 4];
    let result = Array::<i32>::zeroed(4)?;
    let square_sum = Value::new(0i32)?;
    let child = Process::fork(|| {
        for (slot, n) in result.lock().unwrap().iter_mut().zip(mylist) {
            *slot = n * n;
        }
        square_sum.set(result.to_vec().iter().sum());
    })?;
    child.join()?;
    println!(
        "Value/Array: result = {:?}, sum of squares = {}",
        result.to_vec(),
        square_sum.get()
    );
    Ok(())
}

/// Python: `Queue()` between a producer and a consumer process, any serde type, any size.
fn queue() -> Res {
    let q: Queue<(String, Vec<u8>)> = Queue::new()?;
    let producer = Process::fork({
        let q = q.clone();
        move || {
            for (name, size) in [("small", 10), ("medium", 64 << 10), ("large", 8 << 20)] {
                q.put(&(name.to_string(), vec![7; size])).unwrap();
            }
        }
    })?;
    for _ in 0..3 {
        let (name, data) = q.get()?;
        println!("Queue: got {name:>6} message of {:>8} bytes", data.len());
    }
    producer.join()?;
    Ok(())
}

/// Python: `Pipe()`: the child sends messages until "END".
fn pipe_conversation() -> Res {
    let (parent_end, child_end) = pipe()?;
    let child = Process::fork(move || {
        for msg in ["hello", "hey", "hru?", "END"] {
            child_end.send(msg).unwrap();
        }
    })?;
    let mut heard = Vec::new();
    loop {
        let msg: String = parent_end.recv()?;
        if msg == "END" {
            break;
        }
        heard.push(msg);
    }
    child.join()?;
    println!("Pipe: received {heard:?}");
    Ok(())
}

/// No Python equivalent: plain-old-data rings with no encoding at all.
fn zero_copy_rings() -> Res {
    const N: u64 = 2_000_000;
    let (tx, rx) = spsc::<u64>(4096)?;
    let t0 = Instant::now();
    let child = Process::fork(move || {
        for i in 0..N {
            tx.send(i).unwrap();
        }
    })?;
    let sum: u64 = rx.iter().sum(); // ends when the child's sender is gone
    child.join()?;
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(sum, N * (N - 1) / 2);
    println!(
        "spsc: {N} messages between processes in {:.1} ms ({:.1} M msg/s)",
        secs * 1e3,
        N as f64 / secs / 1e6
    );

    let (tx, rx) = channel::<[u64; 2]>(1024)?;
    let workers: Vec<_> = (0..2u64)
        .map(|w| {
            let tx = tx.clone();
            Process::fork(move || {
                for i in 0..100_000 {
                    tx.send([w, i]).unwrap();
                }
            })
        })
        .collect::<Result<_, _>>()?;
    drop(tx);
    let received = rx.iter().count();
    for w in workers {
        w.join()?;
    }
    println!("channel: {received} messages from 2 producer processes");
    Ok(())
}

/// Python's Lock hangs forever if its holder is killed. procshare's Mutex does not.
fn robust_lock() -> Res {
    #[repr(C)]
    struct Account {
        balance: Mutex<i64>,
        locked: Event,
    }
    // SAFETY: repr(C) of ShmSafe procshare types.
    unsafe impl procshare::ShmSafe for Account {}

    let account = Shared::new(Account {
        balance: Mutex::new(100),
        locked: Event::new(),
    })?;
    let holder = Process::fork(|| {
        let mut balance = account.balance.lock().unwrap();
        *balance -= 30; // half-way through a transaction...
        account.locked.set();
        std::thread::sleep(Duration::from_secs(3600)); // ...and never finishes
    })?;
    account.locked.wait();
    holder.kill()?;
    assert_eq!(holder.join(), Err(ProcessError::Signaled(9)));
    let t0 = Instant::now();
    match account.balance.lock() {
        Ok(_) => unreachable!("the holder died mid-transaction: the lock must say so"),
        Err(poisoned) => {
            let balance = poisoned.into_inner();
            println!(
                "Mutex: holder killed mid-transaction; lock recovered in {:.1} ms, poisoned, \
                 balance seen = {}",
                t0.elapsed().as_secs_f64() * 1e3,
                *balance
            );
        }
    }
    account.balance.clear_poison();
    Ok(())
}
