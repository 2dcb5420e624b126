#!/usr/bin/env bash
# KVM live migration benchmark (issue 6): a 2-vCPU dbsim KVM guest migrated over loopback at
# --max-bandwidth 1Gbit with lz4 + XBZRLE, once per --dirty-log mode, and the file-backed dbsim
# guest of the same size side by side. The destination resumes each guest (ledger check first)
# and runs it for 2 s. Prints one markdown row per run: total time, downtime as the guest sees
# it (KVM: pause -> first transaction on the destination; file-backed: pause -> the resumed
# guest's ready line), wire bytes, rounds, pages sent, dirty-log collection and re-arm time,
# and the switchover phases.
#
#   benches/kvm_migrate.sh [SIZE] [MODES...]     defaults: 1G bitmap clear ring file
#
# A mode may repeat (e.g. `256M bitmap clear bitmap clear`) to see the run-to-run spread.
# Environment: FILE_RATE (the file-backed guest's tx/s, default 20000 as in demo.sh), WARMUP (default 10s: a fresh KVM guest pays a shadow-MMU fault per first
# touch), BANDWIDTH (1Gbit; `none` for no limit), DIR (a tmpfs directory, default /dev/shm/vmstream-kvm-bench).
set -euo pipefail

cd "$(dirname "$0")/.."
SIZE=${1:-1G}
shift || true
MODES=${*:-bitmap clear ring file}
WARMUP=${WARMUP:-10s}
BANDWIDTH=${BANDWIDTH:-1Gbit}
DIR=${DIR:-/dev/shm/vmstream-kvm-bench}
BIN=target/release/vmstream

cargo build --release -q -p vmstream --bin vmstream
rm -rf "$DIR"
mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT

limit=(--max-bandwidth "$BANDWIDTH")
[ "$BANDWIDTH" = none ] && limit=()
port=7430
runs=()
for mode in $MODES; do
    port=$((port + 1))
    run="$((port - 7430))-$mode"
    runs+=("$run")
    rm -f "$DIR"/*.img
    "$BIN" recv --listen "127.0.0.1:$port" --memory-file "$DIR/dst.img" --resume --run-for 2s \
        --stats-json "$DIR/recv-$run.json" >"$DIR/recv-$run.log" 2>&1 &
    recv=$!
    sleep 0.3
    if [ "$mode" = file ]; then
        # The demo's rate: as fast as possible, one process outruns the link on 2 cores.
        guest=(--workload dbsim --rate "${FILE_RATE:-20000}")
    else
        guest=(--kvm --vcpus 2 --workload dbsim --dirty-log "$mode" --on-failure stop)
    fi
    "$BIN" send "${guest[@]}" --size "$SIZE" --memory-file "$DIR/src.img" \
        --to "127.0.0.1:$port" --warmup "$WARMUP" "${limit[@]}" \
        --timeout 120s --on-timeout force --no-progress \
        --stats-json "$DIR/send-$run.json" >"$DIR/send-$run.log" 2>&1 || {
        echo "send ($mode) failed:" >&2
        cat "$DIR/send-$run.log" >&2
    }
    wait "$recv" || { echo "recv ($mode) failed:" >&2; cat "$DIR/recv-$run.log" >&2; }
done

python3 - "$DIR" "${runs[@]}" <<'EOF'
import json, sys
d, modes = sys.argv[1], sys.argv[2:]
print("| guest | total s | downtime ms | wire MiB | rounds | converged | round 0 s | round 1 pages "
      "| pages sent | last round pages | dirty-log collect ms (sum / max) | re-arm ms "
      "| tx/s before / during / after | switchover ms |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for m in modes:
    try:
        s = json.load(open(f"{d}/send-{m}.json"))
        r = json.load(open(f"{d}/recv-{m}.json"))
    except OSError as e:
        print(f"| {m} | failed: {e} |")
        continue
    pr = s["per_round"]
    col = [x.get("dirty_log_ms", 0.0) for x in pr]
    rearm = sum(x.get("dirty_rearm_ms", 0.0) for x in pr)
    tps = lambda v: "-" if v is None else f"{v:.0f}"
    phases = {**s.get("switchover_ms", {}), **{"dest_" + k: v for k, v in r.get("switchover_ms", {}).items()}}
    ph = ", ".join(f"{k} {v:.0f}" for k, v in sorted(phases.items()))
    mode = m.split("-", 1)[1]
    name = "file-backed (uffd-wp)" if mode == "file" else f"kvm {mode}"
    print(f"| {name} | {s['total_time_ms']/1e3:.1f} | {s['downtime_ms'] or 0:.0f} | "
          f"{s['bytes_on_wire']/2**20:.1f} | {s['rounds']} | {s['converged']} | "
          f"{pr[0]['duration_ms']/1e3:.1f} | {pr[1]['dirty_pages'] if len(pr) > 1 else '-'} | "
          f"{sum(x['dirty_pages'] for x in pr)} | {pr[-1]['dirty_pages']} | "
          f"{sum(col):.1f} / {max(col):.2f} | {rearm:.1f} | "
          f"{tps(s['tps']['before'])} / {tps(s['tps']['during'])} / {tps(r['tps']['after'])} | {ph} |")
EOF
