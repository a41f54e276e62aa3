//! The seeds' Pool programs: squares with `map`, `apply`/`apply_async`/`map_async`,
//! `starmap` with `calculate_power`, prime checks, factorials, and the Fibonacci benchmark
//! (fib(1..=40), naive recursion) sequential against a pool; plus what Python's Pool
//! cannot do: a worker killed mid-map fails only its own task, a shared array transformed
//! in place by the workers without copying it, and pool results `.await`ed.
//!
//! ```sh
//! cargo run --release --example pool
//! ```

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

use procshare::{Array, Pool, TaskError, as_completed, cpu_count};

fn square(x: u64) -> u64 {
    x * x
}

fn multiply((x, y): (u64, u64)) -> u64 {
    x * y
}

fn calculate_power(base: u64, exponent: u32) -> u64 {
    base.pow(exponent)
}

fn check_prime(num: u64) -> (u32, u64, bool) {
    let is_prime = num >= 2 && (2..num).take_while(|i| i * i <= num).all(|i| num % i != 0);
    (std::process::id(), num, is_prime)
}

/// Factorial's digit count (the seed computes `math.factorial(n)` to burn CPU).
fn factorial_digits(n: u32) -> usize {
    let mut digits = vec![1u32]; // little-endian base 10^9
    for k in 2..=n {
        let mut carry = 0u64;
        for d in digits.iter_mut() {
            let v = u64::from(*d) * u64::from(k) + carry;
            *d = (v % 1_000_000_000) as u32;
            carry = v / 1_000_000_000;
        }
        while carry > 0 {
            digits.push((carry % 1_000_000_000) as u32);
            carry /= 1_000_000_000;
        }
    }
    let top = digits.last().map_or(1, |d| d.to_string().len());
    (digits.len() - 1) * 9 + top
}

/// The seed's `fibonacci(n)`: fib(1) = 0, fib(2) = 1, naive recursion.
fn fibonacci(n: u32) -> u64 {
    match n {
        1 => 0,
        2 => 1,
        _ => fibonacci(n - 1) + fibonacci(n - 2),
    }
}

fn die_at_13(x: u64) -> u64 {
    if x == 13 {
        std::process::abort();
    }
    x
}

fn scale(chunk: &mut [f64]) {
    chunk.iter_mut().for_each(|x| *x = *x * 1.0001 + 1.0);
}

fn sum(chunk: &[f64]) -> f64 {
    chunk.iter().sum()
}

/// The smallest executor: park the thread until the waker unparks it.
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procshare::init();
    let pool = Pool::new(cpu_count().max(2))?;

    println!("Map result: {:?}", pool.map(square, [1, 2, 3, 4, 5])?);
    println!("Apply result: {}", pool.apply(multiply, (10, 20))?);
    println!(
        "Async result: {}",
        pool.apply_async(multiply, (30, 40))?.get()?
    );
    println!(
        "Async map result: {:?}",
        pool.map_async(square, [6, 7, 8, 9, 10])?.get()?
    );
    println!(
        "Starmap result: {:?}",
        pool.starmap(calculate_power, [(2, 3), (3, 2), (4, 4), (5, 2)])?
    );

    for (pid, num, is_prime) in pool.map(
        check_prime,
        [222377, 3334, 2212, 3345, 23441, 454577, 341737, 565633],
    )? {
        println!("Process {pid} says that {num} is {is_prime} prime");
    }

    let handles = [5000u32, 10_000, 2000]
        .into_iter()
        .map(|n| pool.submit(factorial_digits, n))
        .collect::<Result<Vec<_>, _>>()?;
    for h in as_completed(handles) {
        println!("a factorial has {} digits", h.get()?);
    }

    // The seed's Fibonacci benchmark: sequential, then the pool (largest first, unordered,
    // so the two biggest land on different workers).
    let t = Instant::now();
    let seq: u64 = (1..=40).map(fibonacci).sum();
    let sequential = t.elapsed();
    let t = Instant::now();
    let par: u64 = pool
        .imap_unordered(fibonacci, (1..=40).rev())?
        .map(|r| r.map_err(|e| e.to_string()))
        .sum::<Result<u64, String>>()?;
    let parallel = t.elapsed();
    assert_eq!(seq, par);
    println!(
        "fib(1..=40): sequential {sequential:.2?}, pool of {} {parallel:.2?} ({:.2}x)",
        pool.processes(),
        sequential.as_secs_f64() / parallel.as_secs_f64()
    );

    // Python's Pool hangs here (cpython gh-66587); this one reports the one lost task.
    let outcomes: Vec<Result<u64, TaskError>> = pool.imap(die_at_13, 10..16)?.collect();
    for (x, r) in (10..16).zip(&outcomes) {
        match r {
            Ok(v) => println!("{x} -> {v}"),
            Err(e) => println!("{x} -> {e}"),
        }
    }
    println!("and the pool carries on: {:?}", pool.map(square, 0..5)?);

    // Zero-copy: the workers transform the shared array where it lies; only ranges
    // cross the rings.
    let data = Array::from_slice(&vec![1.0f64; 1 << 20])?;
    pool.for_each_chunk_mut(&data, 1 << 16, scale)?;
    let total: f64 = pool.map_chunks(&data, 1 << 16, sum)?.iter().sum();
    println!("in place: {} elements now sum to {total}", data.len());

    // Futures: `.await` pool work from any single-threaded executor.
    let (a, b) = block_on(async {
        let a = pool.submit(square, 12)?.await?;
        let b = pool.apply_async(fibonacci, 30)?.await?;
        Ok::<_, TaskError>((a, b))
    })?;
    println!("awaited: 12² = {a}, fib(30) = {b}");

    pool.close();
    pool.join();
    Ok(())
}
