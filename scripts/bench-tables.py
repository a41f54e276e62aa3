#!/usr/bin/env python3
"""Prints BENCHMARKS.md tables (median msg/s and bytes/s, ratios) for the queue_vs_pipe
groups from criterion's JSON in target/criterion (the latest run of each id).

usage: scripts/bench-tables.py [TARGET_DIR]
"""
import json
import os
import sys

root = os.path.join(sys.argv[1] if len(sys.argv) > 1 else "target", "criterion")
SIZES = ["8B", "64B", "1KiB", "64KiB", "1MiB"]


def load(group):
    out = {}
    gdir = os.path.join(root, group)
    if not os.path.isdir(gdir):
        return out
    for dirpath, _, files in os.walk(gdir):
        if "benchmark.json" in files and os.path.basename(dirpath) == "new":
            b = json.load(open(os.path.join(dirpath, "benchmark.json")))
            e = json.load(open(os.path.join(dirpath, "estimates.json")))
            out[b["full_id"]] = (b, e["median"]["point_estimate"])
    return out


def rate(per_s, unit):
    if unit == "msg":
        return f"{per_s / 1e6:.2f} M/s" if per_s >= 1e6 else f"{per_s / 1e3:.1f} k/s"
    return f"{per_s / 2**30:.2f} GiB/s" if per_s >= 2**30 else f"{per_s / 2**20:.0f} MiB/s"


tp = load("queue_throughput")
transports = []
for fid in tp:
    t = fid.split("/")[1]
    if t not in transports:
        transports.append(t)
order = ["spsc", "spsc_inplace", "channel", "channel_inplace", "queue", "queue_into",
         "queue_u64", "bytes_loan", "pipe", "unix_socket", "os_pipe", "bare_ring",
         "crossbeam_inproc"]
transports = [t for t in order if t in transports] + [t for t in transports if t not in order]


def ns(t, s):
    v = tp.get(f"queue_throughput/{t}/{s}")
    return v[1] if v else None


print("| transport | " + " | ".join(SIZES) + " |")
print("|---|" + "---:|" * len(SIZES))
for t in transports:
    cells = []
    for s in SIZES:
        v = tp.get(f"queue_throughput/{t}/{s}")
        if not v:
            cells.append("–")
            continue
        b, med = v
        per = b["throughput"]["Bytes"]
        cells.append(f"{rate(1e9 / med, 'msg')} · {rate(per * 1e9 / med, 'B')}")
    print(f"| `{t}` | " + " | ".join(cells) + " |")

for base in ["os_pipe", "unix_socket", "bare_ring"]:
    print(f"\nRatio of msg/s (= bytes/s) to `{base}`:\n")
    print("| transport | " + " | ".join(SIZES) + " |")
    print("|---|" + "---:|" * len(SIZES))
    for t in transports:
        cells = []
        for s in SIZES:
            a, z = ns(t, s), ns(base, s)
            cells.append(f"{z / a:.2f}×" if a and z else "–")
        print(f"| `{t}` | " + " | ".join(cells) + " |")

rt = load("queue_roundtrip")
if rt:
    def us(t):
        v = rt.get(f"queue_roundtrip/{t}")
        return v[1] if v else None
    print("\n| transport | 8-byte round trip | vs `bare_ring` | vs `os_pipe` | vs `unix_socket` |")
    print("|---|---:|---:|---:|---:|")
    for t in [t for t in order if us(t)] + [x.split("/")[1] for x in rt if x.split("/")[1] not in order]:
        v = us(t)
        cols = [f"{v / us(b):.2f}×" if us(b) else "–" for b in ["bare_ring", "os_pipe", "unix_socket"]]
        print(f"| `{t}` | {v / 1e3:.2f} µs | " + " | ".join(cols) + " |")
