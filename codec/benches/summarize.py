#!/usr/bin/env python3
"""Summarizes the codec's criterion results (target/criterion) as the tables
in codec/BENCH_RESULTS.md: MB/s from the median time, and ratios between
benchmarks of the same run.

Usage: python3 codec/benches/summarize.py [target/criterion]
"""
import json
import os
import sys

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "../../target/criterion")


def load(group, bench):
    d = os.path.join(ROOT, group.replace("/", "_"), bench, "new")
    try:
        est = json.load(open(os.path.join(d, "estimates.json")))
        meta = json.load(open(os.path.join(d, "benchmark.json")))
    except OSError:
        return None
    ns = est["median"]["point_estimate"]
    nbytes = meta["throughput"]["Bytes"]
    return nbytes / ns * 1e3  # MB/s (1e6 bytes)


def corpora(prefix):
    names = set()
    for entry in os.listdir(ROOT):
        if entry.startswith(prefix + "_"):
            names.add(entry[len(prefix) + 1:].rsplit("_", 1)[0] if prefix in ("compress", "decompress") else entry[len(prefix) + 1:])
    return sorted(names)


def fmt(x):
    return "-" if x is None else f"{x:,.0f}"


def ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.3f}"


print("### Per-page compression (MB/s of page bytes, median)\n")
print("| corpus | method | library one-shot | library, reused context | PageEncoder | encoder / one-shot | encoder / reused ctx |")
print("|---|---|---:|---:|---:|---:|---:|")
for c in corpora("compress"):
    for m in ["lz4", "zstd1", "zlib1"]:
        g = f"compress/{c}/{m}"
        one, ctx, enc = load(g, "raw_oneshot"), load(g, "raw_ctx"), load(g, "encoder")
        print(f"| {c} | {m} | {fmt(one)} | {fmt(ctx)} | {fmt(enc)} | {ratio(enc, one)} | {ratio(enc, ctx)} |")

print("\n### Per-page decompression (MB/s of page bytes, median)\n")
print("| corpus | method | library one-shot | library, reused context | receiver path (CRC + validation + decode) | receiver / one-shot | receiver / reused ctx |")
print("|---|---|---:|---:|---:|---:|---:|")
for c in corpora("decompress"):
    for m in ["lz4", "zstd1", "zlib1"]:
        g = f"decompress/{c}/{m}"
        raw, ctx, dec = load(g, "raw"), load(g, "raw_ctx"), load(g, "decoder")
        print(f"| {c} | {m} | {fmt(raw)} | {fmt(ctx)} | {fmt(dec)} | {ratio(dec, raw)} | {ratio(dec, ctx)} |")

print("\n### Pipeline scaling (MB/s of page bytes, median)\n")
print("| pipeline | corpus | 1 worker | 2 workers | 2w / 1w |")
print("|---|---|---:|---:|---:|")
for side, variants in [("sender", ["push", "source"]), ("receiver", [None])]:
    for c in corpora(side):
        for v in variants:
            suffix = f"_{v}" if v else ""
            one, two = load(f"{side}/{c}", f"1w{suffix}"), load(f"{side}/{c}", f"2w{suffix}")
            name = f"{side} ({v})" if v else side
            print(f"| {name} | {c} | {fmt(one)} | {fmt(two)} | {ratio(two, one)} |")

print("\n### Zero-page path, 1 GiB all-zero image (GB/s, median)\n")
print("| path | GB/s |")
print("|---|---:|")
for b in ["encoder_1t", "sender_2w_push", "sender_2w_source"]:
    x = load("zero", b)
    print(f"| {b} | {'-' if x is None else f'{x / 1e3:.2f}'} |")
