#!/usr/bin/env python3
"""Prints criterion results as ratios to the `memcmp` baseline of each group.

Usage: python3 benches/ratios.py [target/criterion] [group-prefix ...]
Reads <dir>/<group>/<function>/new/estimates.json (criterion's output) and prints,
per group, the mean time per iteration and its ratio to that group's `memcmp`.
"""
import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "target/criterion"
prefixes = sys.argv[2:]


def mean_ns(path):
    with open(path) as f:
        return json.load(f)["mean"]["point_estimate"]


rows = []
for dirpath, dirnames, filenames in os.walk(root):
    if "estimates.json" in filenames and dirpath.endswith(os.path.join("new")):
        bench_dir = os.path.dirname(dirpath)
        with open(os.path.join(bench_dir, "new", "benchmark.json")) as f:
            meta = json.load(f)
        rows.append((meta["group_id"], meta["function_id"], mean_ns(os.path.join(dirpath, "estimates.json"))))

groups = {}
for group, func, ns in rows:
    if prefixes and not any(group.startswith(p) for p in prefixes):
        continue
    groups.setdefault(group, {})[func] = ns

print("| group | function | ns/page | ratio to memcmp |")
print("|---|---|---:|---:|")
for group in sorted(groups):
    funcs = groups[group]
    base = funcs.get("memcmp")
    for func in sorted(funcs, key=lambda f: (f != "memcmp", f)):
        ratio = f"{funcs[func] / base:.2f}" if base else "-"
        print(f"| {group} | {func} | {funcs[func]:.1f} | {ratio} |")
