//! The Pool against the same work done sequentially, and its per-task overhead.
//!
//! * `pool_cpu`: the seeds' CPU-bound work. `fib_1_to_32`: `fib(n)` for n in 1..=32 (seed
//!   000's Fibonacci benchmark, shortened from 40 so an iteration takes ~30 ms), sequential
//!   vs a 2-worker pool (`imap_unordered`, largest first). `primes_16x`: the sum of primes
//!   below 200 000 for 16 items, sequential vs `map` with chunksize 1.
//! * `pool_overhead`: tiny tasks, where only the pool's own cost shows: `map` of the
//!   identity over 10 000 `u64`s with Python's default chunks and with chunksize 1,
//!   `apply_async` × 1000 in flight, one `apply` round trip, and `Pool::new(2)` + drop.
//! * `pool_start_methods`: per start method (`fork`, `spawn`, `forkserver`):
//!   `pool_new/<method>`, a 2-worker pool built with a no-op initializer (so `build`
//!   returns once both workers run; without one a Spawn pool's `build` returns before its
//!   workers reach `init()`) and dropped; and `map_identity_10k/<method>`, the
//!   default-chunk `map` of `pool_overhead` on a pool of that method.
//! * `pool_inplace`: an `Array<f64>` transformed in place, `x = x * 1.0001 + 1`, by the
//!   2-worker pool (`for_each_chunk_mut`, 4 MiB chunks, zero-copy), by one loop in this
//!   process, and, for the memory bandwidth ceiling, a `memcpy` of the same bytes into a
//!   second buffer. Throughput is the array's size. The size is
//!   `PROCSHARE_BENCH_GIB` GiB (default 1/64 GiB, for `--test` smoke runs; the issue's
//!   figure uses 1).
//!
//! ```text
//! cargo bench --bench pool -- --warm-up-time 1 --measurement-time 3
//! PROCSHARE_BENCH_GIB=1 cargo bench --bench pool -- pool_inplace --warm-up-time 2 --measurement-time 10
//! python3 benches/python/pool.py
//! ```

use std::hint::black_box;

use criterion::{Criterion, Throughput};
use procshare::{Array, Pool, StartMethod};

fn fib(n: u32) -> u64 {
    if n < 2 {
        u64::from(n)
    } else {
        fib(n - 1) + fib(n - 2)
    }
}

fn sum_primes_below(n: u64) -> u64 {
    let mut sieve = vec![true; n as usize];
    let mut sum = 0;
    for i in 2..n as usize {
        if sieve[i] {
            sum += i as u64;
            let mut j = i * i;
            while j < n as usize {
                sieve[j] = false;
                j += i;
            }
        }
    }
    sum
}

fn identity(x: u64) -> u64 {
    x
}

fn cpu(c: &mut Criterion, pool: &Pool) {
    let mut g = c.benchmark_group("pool_cpu");
    g.sample_size(10);
    g.bench_function("fib_1_to_32/sequential", |b| {
        b.iter(|| (1..=32u32).map(|n| fib(black_box(n))).sum::<u64>())
    });
    g.bench_function("fib_1_to_32/pool2", |b| {
        b.iter(|| {
            pool.imap_unordered(fib, (1..=32u32).rev())
                .unwrap()
                .map(Result::unwrap)
                .sum::<u64>()
        })
    });
    g.bench_function("primes_16x/sequential", |b| {
        b.iter(|| {
            (0..16)
                .map(|_| sum_primes_below(black_box(200_000)))
                .sum::<u64>()
        })
    });
    g.bench_function("primes_16x/pool2", |b| {
        b.iter(|| {
            pool.map_chunked(sum_primes_below, [200_000u64; 16], 1)
                .unwrap()
                .into_iter()
                .sum::<u64>()
        })
    });
    g.finish();
}

fn overhead(c: &mut Criterion, pool: &Pool) {
    let mut g = c.benchmark_group("pool_overhead");
    g.sample_size(20);
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("map_identity_10k/default_chunks", |b| {
        b.iter(|| assert_eq!(pool.map(identity, 0..10_000u64).unwrap().len(), 10_000))
    });
    g.bench_function("map_identity_10k/chunksize_1", |b| {
        b.iter(|| {
            assert_eq!(
                pool.map_chunked(identity, 0..10_000u64, 1).unwrap().len(),
                10_000
            )
        })
    });
    g.bench_function("imap_unordered_10k/chunksize_100", |b| {
        b.iter(|| {
            assert_eq!(
                pool.imap_unordered_chunked(identity, 0..10_000u64, 100)
                    .unwrap()
                    .count(),
                10_000
            )
        })
    });
    g.throughput(Throughput::Elements(1000));
    g.bench_function("apply_async_1000", |b| {
        b.iter(|| {
            let hs: Vec<_> = (0..1000u64)
                .map(|i| pool.apply_async(identity, i).unwrap())
                .collect();
            hs.into_iter().map(|h| h.get().unwrap()).sum::<u64>()
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("apply_round_trip", |b| {
        b.iter(|| pool.apply(identity, black_box(7)).unwrap())
    });
    g.bench_function("pool_new_2_and_drop", |b| {
        b.iter(|| drop(Pool::new(2).unwrap()))
    });
    g.finish();
}

fn noop(_: ()) {}

fn start_methods(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool_start_methods");
    g.sample_size(10);
    for (name, method) in [
        ("fork", StartMethod::Fork),
        ("spawn", StartMethod::Spawn),
        ("forkserver", StartMethod::ForkServer),
    ] {
        let build = || {
            Pool::builder()
                .processes(2)
                .start_method(method)
                .initializer(noop, ())
                .build()
                .unwrap()
        };
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("pool_new/{name}"), |b| b.iter(|| drop(build())));
        let pool = build();
        g.throughput(Throughput::Elements(10_000));
        g.bench_function(format!("map_identity_10k/{name}"), |b| {
            b.iter(|| assert_eq!(pool.map(identity, 0..10_000u64).unwrap().len(), 10_000))
        });
    }
    g.finish();
}

fn affine(chunk: &mut [f64]) {
    for x in chunk {
        *x = *x * 1.0001 + 1.0;
    }
}

fn inplace(c: &mut Criterion, pool: &Pool) {
    let gib: f64 = std::env::var("PROCSHARE_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0 / 64.0);
    let n = ((gib * (1u64 << 30) as f64) as usize / 8).max(1);
    let chunk = (4 << 20) / 8;
    let init: Vec<f64> = (0..n).map(|i| i as f64).collect();
    let array = Array::from_slice(&init).unwrap();
    drop(init);
    let mut copy = vec![0.0f64; n];
    let mut g = c.benchmark_group("pool_inplace");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((n * 8) as u64));
    g.bench_function(format!("affine_{gib}GiB/pool2_for_each_chunk_mut"), |b| {
        b.iter(|| pool.for_each_chunk_mut(&array, chunk, affine).unwrap())
    });
    g.bench_function(format!("affine_{gib}GiB/single_process_loop"), |b| {
        b.iter(|| affine(&mut array.lock().unwrap()))
    });
    g.bench_function(format!("affine_{gib}GiB/memcpy_same_bytes"), |b| {
        b.iter(|| copy.copy_from_slice(black_box(&array.lock().unwrap())))
    });
    g.finish();
}

fn main() {
    procshare::init();
    let mut c = Criterion::default().configure_from_args();
    let pool = Pool::new(2).unwrap();
    cpu(&mut c, &pool);
    overhead(&mut c, &pool);
    inplace(&mut c, &pool);
    drop(pool);
    start_methods(&mut c);
    c.final_summary();
}
