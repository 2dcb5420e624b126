#!/usr/bin/env bash
# Convergence experiments recorded in BENCHMARKS.md (issue 5): a 2 GiB dbsim guest that does
# not converge at --max-bandwidth 1Gbit with throttling off (lz4 + XBZRLE on), migrated with
# each strategy, with and without hot-page deferral, over 1 and 2 channels, and in post-copy
# (issue 22: `--postcopy auto` after direct-staged's rounds, `--postcopy now`). Writes stats,
# logs and plots to OUT (default /tmp/vmstream-converge) and prints one line per run.
#
# Usage: benches/migration/converge.sh [RUN...]
#   runs: none qemu qemu-defer direct direct-defer qemu-2ch qemu-defer-2ch direct-2ch
#         direct-defer-2ch postcopy-auto postcopy-now (default: all)
set -uo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p vmstream --quiet || exit 1
bin=$PWD/target/release/vmstream
out=${OUT:-/tmp/vmstream-converge}
mkdir -p "$out"
dir=$(mktemp -d /dev/shm/vmstream-converge.XXXXXX)
trap 'pkill -f "guest run --memory-file $dir/src.mem" 2>/dev/null; rm -rf "$dir"' EXIT

# The guest: 2 GiB dbsim (75% of blocks written, a tenth of them hot: 154 MiB) at RATE tx/s.
rate=${RATE:-60000}
# How long the resumed guest runs on the destination (post-copy: longer than the stream, so
# that its TPS is measured while pages still arrive).
run_for=${RUN_FOR:-3s}
guest=(--size 2G --workload dbsim --rate "$rate" --warmup 3s --max-bandwidth 1Gbit)

migrate() { # NAME SEND-FLAGS...
    local name=$1; shift
    rm -f "$dir"/*.mem
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$bin" recv --listen "127.0.0.1:$port" --memory-file "$dir/dst.mem" --resume --run-for "$run_for" \
        --stats-json "$out/$name.recv.json" > "$out/$name.recv.log" 2>&1 &
    local recv=$!
    for _ in $(seq 50); do grep -q listening "$out/$name.recv.log" 2>/dev/null && break; sleep 0.1; done
    "$bin" send --memory-file "$dir/src.mem" --to "127.0.0.1:$port" --no-progress \
        --stats-json "$out/$name.send.json" "${guest[@]}" "$@" > "$out/$name.send.log" 2>&1
    echo "send exit $?" >> "$out/$name.send.log"
    pkill -f "guest run --memory-file $dir/src.mem" || true
    wait "$recv"
    "$bin" plot "$out/$name.send.json" -o "$out/$name.svg" > /dev/null 2>&1 || true
    python3 - "$out/$name.send.json" "$name" "$out/$name.recv.log" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
t = s.get("timeline") or {}
samples = t.get("samples", [])
normal = (s.get("tps") or {}).get("before") or 0
# Time the guest ran below 10% of its normal TPS: 100 ms samples under the line, plus the
# downtime (the guest does not run at all then).
low = 0.0
prev = None
for x in samples:
    if prev is not None and x["tps"] < 0.1 * normal:
        low += x["t_ms"] - prev
    prev = x["t_ms"]
down = s.get("downtime_ms") or 0
verify = "verify-ok" if any(l.startswith("verify ok") for l in open(sys.argv[3])) else "no-verify"
# Faults are the destination's (its clock); the source has the owed list and the stream.
try:
    pc = json.load(open(sys.argv[1].replace(".send.json", ".recv.json"))).get("postcopy")
except OSError:
    pc = None
postcopy = ""
if pc:
    lat = pc.get("fault_latency_ms") or {}
    postcopy = (f" postcopy: owed={pc.get('pages_owed')} faulted={pc.get('pages_faulted')} "
                f"streamed={pc.get('pages_streamed')} fault_p50={lat.get('p50')}ms "
                f"fault_p99={lat.get('p99')}ms resume_to_last={pc.get('resume_to_last_page_ms')}ms")
print(f"{sys.argv[2]:16} converged={s.get('converged')} outcome={s.get('outcome')} "
      f"total={s.get('total_time_ms', 0)/1e3:.1f}s downtime={down:.0f}ms "
      f"wire={s.get('bytes_on_wire', 0)/2**20:.0f}MiB rounds={s.get('rounds')} "
      f"normal_tps={normal:.0f} below10%={(low + down)/1e3:.1f}s "
      f"max_throttle={max([r.get('throttle', 0) for r in s.get('per_round', [])] + [0]):.2f} {verify}"
      + postcopy)
PY
}

staged=(--converge direct-staged --timeout 120s --on-timeout force)
qemu=(--converge qemu --timeout 120s --on-timeout force)
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=(none qemu qemu-defer direct direct-defer qemu-2ch qemu-defer-2ch direct-2ch direct-defer-2ch)
for r in "${runs[@]}"; do
    case $r in
    none) migrate none --converge none --timeout 40s --on-timeout cancel ;;
    qemu) migrate qemu "${qemu[@]}" ;;
    qemu-defer) migrate qemu-defer "${qemu[@]}" --defer-hot 30 ;;
    direct) migrate direct "${staged[@]}" ;;
    direct-defer) migrate direct-defer "${staged[@]}" --defer-hot 30 ;;
    qemu-2ch) migrate qemu-2ch "${qemu[@]}" --channels 2 ;;
    qemu-defer-2ch) migrate qemu-defer-2ch "${qemu[@]}" --defer-hot 30 --channels 2 ;;
    direct-2ch) migrate direct-2ch "${staged[@]}" --channels 2 ;;
    direct-defer-2ch) migrate direct-defer-2ch "${staged[@]}" --defer-hot 30 --channels 2 ;;
    postcopy-auto) migrate postcopy-auto "${staged[@]}" --postcopy auto ;;
    postcopy-now) migrate postcopy-now --postcopy now ;;
    *) echo "unknown run $r"; exit 2 ;;
    esac
done
