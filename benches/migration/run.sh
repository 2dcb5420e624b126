#!/usr/bin/env bash
# Migration runs recorded in BENCHMARKS.md (issue 4): each starts a receiver and a sender on
# loopback, writes both stats files to OUT (default /tmp/vmstream-bench) and prints a
# one-line summary per run.
#
# Usage: benches/migration/run.sh [RUN...]   (runs: idle idle-75 hot-opt hot-raw; default all)
set -uo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p vmstream --quiet || exit 1
bin=$PWD/target/release/vmstream
out=${OUT:-/tmp/vmstream-bench}
mkdir -p "$out"
dir=$(mktemp -d /dev/shm/vmstream-bench.XXXXXX)
trap 'rm -rf "$dir"' EXIT

# The hot-set guest: 1 GiB dbsim, 75% of blocks active, a tenth of them hot (77 MiB);
# 20,000 tx/s with 80% on hot blocks rewrite each hot block 1.6 times a second, a few rows
# (small changes) per block.
hot=(--size 1G --workload dbsim --rate 20000 --warmup 3s --max-bandwidth 1Gbit)

migrate() { # NAME SEND-FLAGS...
    local name=$1; shift
    rm -f "$dir"/*.mem
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$bin" recv --listen "127.0.0.1:$port" --memory-file "$dir/dst.mem" \
        --stats-json "$out/$name.recv.json" > "$out/$name.recv.log" 2>&1 &
    local recv=$!
    for _ in $(seq 50); do grep -q listening "$out/$name.recv.log" 2>/dev/null && break; sleep 0.1; done
    "$bin" send --memory-file "$dir/src.mem" --to "127.0.0.1:$port" --no-progress \
        --stats-json "$out/$name.send.json" "$@" > "$out/$name.send.log" 2>&1
    echo "send exit $?" >> "$out/$name.send.log"
    # A cancelled migration leaves the source guest running, by design: stop it here.
    pkill -f "guest run --memory-file $dir/src.mem" || true
    wait "$recv"
    local same=no
    [ -f "$dir/dst.mem" ] && cmp -s "$dir/src.mem" "$dir/dst.mem" && same=yes
    python3 - "$out/$name.send.json" "$name" "$same" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
rounds = s.get("per_round", [])
print(f"{sys.argv[2]:8} outcome={s.get('outcome')} converged={s.get('converged')} "
      f"rounds={s.get('rounds')} total={s.get('total_time_ms', 0)/1e3:.1f}s "
      f"downtime={s.get('downtime_ms') or 0:.0f}ms wire={s.get('bytes_on_wire', 0)/2**20:.0f}MiB "
      f"guest={s.get('guest_bytes', 0)/2**20:.0f}MiB identical={sys.argv[3]} "
      f"switchover_ms={json.dumps({k: round(v, 1) for k, v in s.get('switchover_ms', {}).items()})}")
for r in rounds[:3] + (["..."] if len(rounds) > 6 else []) + rounds[max(3, len(rounds) - 3):]:
    if r == "...":
        print("   ...")
        continue
    print(f"   round {r['round']:4} dirty={r['dirty_pages']:7} wire={r['wire_bytes']/2**20:8.1f}MiB "
          f"{r['duration_ms']:8.0f}ms {r['bandwidth_bytes_per_s']/1e6:6.0f}MB/s "
          f"est.downtime={r.get('expected_downtime_ms', 0):7.0f}ms")
PY
}

runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=(idle idle-75 hot-opt hot-raw)
for r in "${runs[@]}"; do
    case $r in
    idle)
        # An idle guest: 1% of its blocks formatted, the rest never written (zero), the way
        # most of a booted idle VM's memory is.
        migrate idle --size 1G --workload idle --active 1 --warmup 1s
        # The bound: one read of the same memory (dd: read(2) into a buffer), measured now.
        "$bin" guest run --memory-file "$dir/read.mem" --size 1G --workload idle --duration 1ms --no-track >/dev/null
        dd if="$dir/read.mem" of=/dev/null bs=4M 2>&1 | tail -1 | sed 's/^/idle     bound: one read of its memory: /'
        rm -f "$dir/read.mem"
        ;;
    idle-75) # The same with the default 75% of memory formatted (incompressible fill).
        migrate idle-75 --size 1G --workload idle --warmup 1s ;;
    hot-opt) migrate hot-opt "${hot[@]}" --timeout 60s ;;
    hot-raw) migrate hot-raw "${hot[@]}" --compress none --xbzrle off --timeout 30s --on-timeout cancel ;;
    *) echo "unknown run $r"; exit 2 ;;
    esac
done
