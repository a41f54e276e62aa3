//! The deposit/withdraw race from Python's multiprocessing tutorial, in two real processes.
//!
//! A shared balance starts at 100; one process deposits 1 ten thousand times while another
//! withdraws 1 as often. Without the lock each update is a separate locked read and locked
//! write (Python's `balance.value = balance.value + 1`), so updates from the two processes
//! overwrite each other and the final balance drifts. With the lock held across the whole
//! read-modify-write (Python's `lock.acquire()` ... `lock.release()`), every run ends at 100.
//!
//! Run with `cargo run --release --example race`.

use procshare::{Barrier, Process, Shared, Value};

const TRANSACTIONS: u32 = 10_000;

fn transact(balance: &Value<i32>, start: &Barrier, delta: i32, use_lock: bool) {
    // Both processes start together so their updates overlap even on two cores.
    start.wait().expect("both processes reach the start");
    for _ in 0..TRANSACTIONS {
        if use_lock {
            *balance.lock().unwrap() += delta;
        } else {
            balance.set(balance.get() + delta);
        }
    }
}

fn perform_transactions(use_lock: bool) -> procshare::Result<i32> {
    let balance = Value::new(100i32)?;
    let start = Shared::new(Barrier::new(2))?;
    // Python: Process(target=withdraw, args=(balance, lock)) ... start(), join()
    let withdraw = Process::fork(|| transact(&balance, &start, -1, use_lock))?;
    let deposit = Process::fork(|| transact(&balance, &start, 1, use_lock))?;
    for child in [withdraw, deposit] {
        if let Err(e) = child.join() {
            panic!("a transaction process failed: {e}");
        }
    }
    Ok(balance.get())
}

fn main() -> procshare::Result<()> {
    procshare::init();
    for _ in 0..10 {
        println!(
            "without lock: Final balance = {}",
            perform_transactions(false)?
        );
    }
    for _ in 0..10 {
        println!("with lock: Final balance = {}", perform_transactions(true)?);
    }
    Ok(())
}
