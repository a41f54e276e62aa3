#!/usr/bin/env python3
"""Start + join of a multiprocessing.Process returning a small value, per start method.

Python's counterpart of `benches/process.rs` (stdlib only). A Process has no return
value, so the child sends `x * 2` through a `SimpleQueue` (what users do; `Pool` does the
same internally), and one iteration is: create the process, start it, get the value,
join. Prints the median, min and max per method, plus `subprocess.run(["/bin/true"])`.

    python3 benches/python/process_start.py [iterations]
"""

import multiprocessing as mp
import statistics
import subprocess
import sys
import time


def double(q, x):
    q.put(x * 2)


def one(ctx, q):
    p = ctx.Process(target=double, args=(q, 21))
    p.start()
    v = q.get()
    p.join()
    assert v == 42 and p.exitcode == 0


def measure(name, fn, n):
    fn()  # warm-up (forkserver: starts the server)
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"{name:14s} median {med * 1e3:8.3f} ms   min {min(times) * 1e3:8.3f} ms   "
          f"max {max(times) * 1e3:8.3f} ms   (n={n})")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    print(f"Python {sys.version.split()[0]}")
    for method in ("fork", "spawn", "forkserver"):
        ctx = mp.get_context(method)
        q = ctx.SimpleQueue()
        measure(method, lambda: one(ctx, q), n)
    measure("/bin/true", lambda: subprocess.run(["/bin/true"], check=True), n)


if __name__ == "__main__":
    main()
