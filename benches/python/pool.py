"""Python's side of benches/pool.rs (stdlib only): the same work, the same sizes.

    python3 benches/python/pool.py

Prints the median of a few runs for each case (seconds per iteration and items/s).
"""
import multiprocessing as mp
import statistics
import time


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def sum_primes_below(n):
    sieve = bytearray([1]) * n
    total = 0
    for i in range(2, n):
        if sieve[i]:
            total += i
            sieve[i * i :: i] = bytearray(len(range(i * i, n, i)))
    return total


def identity(x):
    return x


def median_time(f, runs):
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def report(name, secs, items=None):
    extra = f"  {items / secs:,.0f} items/s" if items else ""
    print(f"{name:45s} {secs * 1e3:10.3f} ms{extra}")


def main():
    mp.set_start_method("fork")
    with mp.Pool(2) as pool:
        report("pool_cpu/fib_1_to_25/sequential", median_time(lambda: sum(fib(n) for n in range(1, 26)), 5))
        report("pool_cpu/fib_1_to_25/pool2",
               median_time(lambda: sum(pool.imap_unordered(fib, range(25, 0, -1))), 5))
        report("pool_cpu/primes_16x/sequential",
               median_time(lambda: sum(sum_primes_below(200_000) for _ in range(16)), 3))
        report("pool_cpu/primes_16x/pool2",
               median_time(lambda: sum(pool.map(sum_primes_below, [200_000] * 16, chunksize=1)), 3))
        report("map_identity_10k/default_chunks",
               median_time(lambda: pool.map(identity, range(10_000)), 10), 10_000)
        report("map_identity_10k/chunksize_1",
               median_time(lambda: pool.map(identity, range(10_000), chunksize=1), 3), 10_000)
        report("imap_unordered_10k/chunksize_100",
               median_time(lambda: list(pool.imap_unordered(identity, range(10_000), chunksize=100)), 5),
               10_000)

        def apply_1000():
            hs = [pool.apply_async(identity, (i,)) for i in range(1000)]
            return sum(h.get() for h in hs)

        report("apply_async_1000", median_time(apply_1000, 5), 1000)
        report("apply_round_trip", median_time(lambda: [pool.apply(identity, (7,)) for _ in range(200)], 5) / 200)

    def new_and_close():
        p = mp.Pool(2)
        p.terminate()
        p.join()

    report("pool_new_2_and_terminate", median_time(new_and_close, 5))


if __name__ == "__main__":
    main()
