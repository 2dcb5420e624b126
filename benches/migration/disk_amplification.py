#!/usr/bin/env python3
"""Disk write amplification by dirty granularity (issue 20, BENCHMARKS.md section 14.1).

A `diskio` guest writes one sparse disk at a fixed rate in random writes of one block size;
`vmstream send` migrates it (builtin tracking, the block layer's bitmap) to a receiver on a
unix socket. The link is capped at what the dirty granules need if no two writes of a
round share one (rate x granularity / block size, at least 4 MB/s), so rounds neither pile
up a backlog nor run empty at once; `--downtime-limit 1ms` makes the source iterate until a
round finds nothing dirty or `--timeout` forces the switchover. Disk write QoS is off (it
would cap the guest). For each granularity and block size the source's stats give `disks[0]`:
`amplification` = disk bytes sent after the bulk copy / bytes the guest wrote (its block
layer's counter, the workload's checkpoints included, see BENCHMARKS.md).

Usage: benches/migration/disk_amplification.py BIN [SECONDS] [RATE] [DISK_SIZE]
  e.g. benches/migration/disk_amplification.py target/release/vmstream 8 2M 1G
       benches/migration/disk_amplification.py --dbsim BIN [SECONDS] [RATE] [DISK_SIZE]
  (dbsim's disk mode, a data and a log disk, at 1 MiB and 64 KiB granules; DBSIM_SIZE,
  DBSIM_RATE: its memory and tx/s)
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

GRANULARITIES = ["1M", "64K", "4K"]
IO_SIZES = ["4K", "8K", "16K", "32K", "64K", "128K", "256K"]
# dbsim's disk mode (--dbsim): its memory (the buffer pool; its blocks are the data disk's) and
# transaction rate, low enough that write-back of dirty pool blocks, not the redo log, takes
# most of the I/O rate.
DBSIM_SIZE = os.environ.get("DBSIM_SIZE", "256M")
DBSIM_RATE = os.environ.get("DBSIM_RATE", "2000")
# The link, as a multiple of what the dirty granules need if no two writes share one.
LINK_FACTOR = 1.0


def size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def run(binary, seconds, rate, disk_size, granularity, io_size, dbsim=False):
    need = size(rate) * max(1.0, size(granularity) / size(io_size))
    link = max(4_000_000, int(LINK_FACTOR * need))
    d = tempfile.mkdtemp(prefix="vmstream-amp-", dir="/dev/shm")
    # dbsim: a data disk (8 KiB random write-back) and a log disk (sequential redo).
    disks = 2 if dbsim else 1
    try:
        sock = os.path.join(d, "sock")
        recv = subprocess.Popen(
            [binary, "recv", "--listen", f"unix:{sock}",
             "--memory-file", os.path.join(d, "dst.img")]
            + [a for i in range(disks) for a in ("--disk", os.path.join(d, f"dst-d{i}.img"))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        stats = os.path.join(d, "send.json")
        send = subprocess.run(
            [binary, "send", "--memory-file", os.path.join(d, "src.img")]
            + (["--size", DBSIM_SIZE, "--workload", "dbsim", "--rate", DBSIM_RATE] if dbsim
               else ["--size", "16M", "--workload", "diskio", "--io-size", io_size])
            + ["--io-rate", rate]
            + [a for i in range(disks) for a in ("--disk", os.path.join(d, f"src-d{i}.img"))]
            + ["--disk-size", disk_size,
             "--disk-granularity", granularity, "--disk-qos", "off",
             "--compress", "none", "--downtime-limit", "1ms",
             "--max-bandwidth", str(link),
             "--timeout", f"{seconds}s", "--on-timeout", "force",
             "--warmup", "500ms", "--no-progress", "--to", f"unix:{sock}",
             "--stats-json", stats],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        recv.wait(timeout=60)
        if send.returncode != 0:
            raise RuntimeError(f"send exited {send.returncode}: {send.stderr[-500:]}")
        s = json.load(open(stats))
        written = sum(x["guest_bytes_written"] for x in s["disks"])
        after_bulk = sum(x["bytes_sent"] - x["bulk_bytes"] for x in s["disks"])
        return {
            "workload": "dbsim" if dbsim else "diskio",
            "granularity": granularity,
            "io_size": io_size,
            "amplification": after_bulk / written if written else None,
            "per_disk": [x["amplification"] for x in s["disks"]],
            "written_mb": written / 1e6,
            "sent_after_bulk_mb": after_bulk / 1e6,
            "link_mb_s": link / 1e6,
            "rounds": s["rounds"],
            "total_s": s["total_time_ms"] / 1e3,
        }
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main_dbsim(binary, seconds, rate, disk_size):
    """dbsim's disk mode (8 KiB random write-back plus a sequential redo log) at 1 MiB and
    64 KiB granules: the seed's Oracle workload went from 93 to 8."""
    rows = []
    for g in ["1M", "64K"]:
        r = run(binary, seconds, rate, disk_size, g, "8K", dbsim=True)
        print(json.dumps(r), flush=True)
        rows.append(r)
    print()
    print("| granularity | amplification (both disks) | data disk | log disk | written MB | rounds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['granularity']} | {r['amplification']:.1f} | {r['per_disk'][0]:.1f} | "
              f"{r['per_disk'][1]:.1f} | {r['written_mb']:.1f} | {r['rounds']} |")


def main():
    if sys.argv[1] == "--dbsim":
        main_dbsim(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 30,
                   sys.argv[4] if len(sys.argv) > 4 else "2M",
                   sys.argv[5] if len(sys.argv) > 5 else "1G")
        return
    binary = sys.argv[1]
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    rate = sys.argv[3] if len(sys.argv) > 3 else "2M"
    disk_size = sys.argv[4] if len(sys.argv) > 4 else "1G"
    rows = []
    for g in GRANULARITIES:
        for io in IO_SIZES:
            r = run(binary, seconds, rate, disk_size, g, io)
            print(json.dumps(r), flush=True)
            rows.append(r)
    print()
    print("| block size | " + " | ".join(f"{g} granules" for g in GRANULARITIES) + " |")
    print("|---|" + "---|" * len(GRANULARITIES))
    for io in IO_SIZES:
        cells = []
        for g in GRANULARITIES:
            r = next(x for x in rows if x["granularity"] == g and x["io_size"] == io)
            cells.append(f"{r['amplification']:.1f}")
        print(f"| {io} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
