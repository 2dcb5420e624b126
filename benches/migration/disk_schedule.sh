#!/usr/bin/env bash
# Time slices against QEMU's parallel iteration (issue 20, BENCHMARKS.md section 14.3): a
# `dbsim` guest with disks (its database blocks on a data disk, its redo log on a log disk)
# migrated over a capped link with `--disk-schedule slices` and with `parallel`, interleaved.
# Prints per run: converged, total time, downtime, memory rounds (rounds after the disks'
# slice rounds), memory bytes on the wire (all bytes less the disks'), disk bytes, and how
# often memory was sent whole (rounds that carried memory pages).
#
# Usage: benches/migration/disk_schedule.sh BIN [MEMORY] [DISK_SIZE] [BANDWIDTH] [RUNS]
#   e.g. benches/migration/disk_schedule.sh target/release/vmstream 2G 4G 1Gbit 1
set -euo pipefail
bin=$1 mem=${2:-2G} disk=${3:-4G} bw=${4:-1Gbit} runs=${5:-1}
dir=$(mktemp -d /dev/shm/vmstream-sched.XXXXXX)
trap 'rm -rf "$dir"' EXIT

one() { # SCHEDULE
    local schedule=$1
    rm -f "$dir"/*
    "$bin" recv --listen "unix:$dir/sock" --memory-file "$dir/dst.mem" \
        --disk "$dir/dst-data.img" --disk "$dir/dst-log.img" --stats-json "$dir/recv.json" > "$dir/recv.log" 2>&1 &
    local recv=$!
    for _ in $(seq 100); do [ -S "$dir/sock" ] && break; sleep 0.05; done
    "$bin" send --memory-file "$dir/src.mem" --size "$mem" --workload dbsim --rate 20000 \
        --disk "$dir/src-data.img" --disk "$dir/src-log.img" --disk-size "$disk" \
        --disk-schedule "$schedule" --max-bandwidth "$bw" --warmup 3s --timeout 300s \
        --to "unix:$dir/sock" --no-progress --stats-json "$dir/send.json" > "$dir/send.log" 2>&1 || true
    wait "$recv" || true
    [ -n "${KEEP:-}" ] && cp "$dir/send.json" "$KEEP.$schedule.send.json" && cp "$dir/recv.json" "$KEEP.$schedule.recv.json"
    python3 - "$dir/send.json" "$schedule" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
disk_wire = sum(d["bytes_on_wire"] for d in s.get("disks", []))
rounds = s["per_round"]
# Rounds that sent memory pages (the disks' slice rounds push none), the final one included.
memory_rounds = sum(1 for r in rounds if r["dirty_pages"] > 0)
print(json.dumps({
    "schedule": sys.argv[2], "outcome": s["outcome"], "converged": s["converged"],
    "total_s": round(s["total_time_ms"] / 1e3, 1), "downtime_ms": s["downtime_ms"],
    "rounds": s["rounds"], "memory_rounds": memory_rounds,
    "memory_wire_mib": round((s["bytes_on_wire"] - disk_wire) / 2**20, 1),
    "disk_wire_mib": round(disk_wire / 2**20, 1),
    "disk_rounds": [d["rounds"] for d in s.get("disks", [])],
    "switchover": s.get("switchover_reason"),
    "switchover_ms": {k: round(v, 1) for k, v in s.get("switchover_ms", {}).items()},
    "final_round_pages": rounds[-1]["dirty_pages"] if rounds else None,
    "final_round_wire_mib": round(rounds[-1]["wire_bytes"] / 2**20, 2) if rounds else None,
}))
PY
}

for _ in $(seq "$runs"); do
    one slices
    one parallel
done
