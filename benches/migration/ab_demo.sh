#!/usr/bin/env bash
# The demo's migration (./demo.sh: 1 GiB dbsim at 20,000 tx/s, 2 s warm-up, keyed and
# sealed, resumed on the destination) with two builds of vmstream, interleaved A B A B ...
# so that a busy machine slows both alike. Prints total time, downtime and bytes per run
# and the median of each side.
#
# Usage: benches/migration/ab_demo.sh BIN_A BIN_B [RUNS] [SIZE]   (RUNS per side, default 3)
# e.g. the layout refactor: an old build in its own worktree and target dir against
#   target/release/vmstream.
# GUEST="..." replaces the guest and link flags (default: the demo's); the 1 Gbit hot-set
# run of benches/migration/run.sh (hot-opt) is
#   GUEST="--workload dbsim --rate 20000 --warmup 3s --max-bandwidth 1Gbit --timeout 60s"
set -euo pipefail
a=$1 b=$2 runs=${3:-3} size=${4:-1G}
read -r -a guest <<< "${GUEST:---workload dbsim --rate 20000 --warmup 2s}"
dir=$(mktemp -d /dev/shm/vmstream-ab.XXXXXX)
trap 'rm -rf "$dir"' EXIT
(umask 077; head -c 32 /dev/urandom > "$dir/key")

one() { # LABEL BIN
    local label=$1 bin=$2 port
    rm -f "$dir"/*.mem "$dir"/*.json
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$bin" recv --listen "127.0.0.1:$port" --memory-file "$dir/dest.mem" --resume --run-for 3s \
        --stats-json "$dir/recv.json" --auth-key-file "$dir/key" > "$dir/recv.log" 2>&1 &
    local recv=$!
    for _ in $(seq 50); do grep -q listening "$dir/recv.log" 2>/dev/null && break; sleep 0.1; done
    "$bin" send --memory-file "$dir/source.mem" --size "$size" "${guest[@]}" \
        --to "127.0.0.1:$port" --stats-json "$dir/send.json" --no-progress \
        --auth-key-file "$dir/key" > "$dir/send.log" 2>&1
    wait "$recv"
    python3 - "$dir/send.json" "$label" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
est = "/".join(f"{r['expected_downtime_ms']:.0f}" for r in s["per_round"][:-1])
print(f"{sys.argv[2]} outcome={s['outcome']} total_ms={s['total_time_ms']:.0f} "
      f"downtime_ms={s['downtime_ms']:.1f} wire_mib={s['bytes_on_wire'] / 2**20:.1f} rounds={s['rounds']} "
      f"reason={s.get('switchover_reason') or '-'} "
      f"est_ms={est} "
      + " ".join(f"{k}={v:.1f}" for k, v in sorted(s.get("switchover_ms", {}).items())))
PY
}

for i in $(seq "$runs"); do
    one A "$a"
    one B "$b"
done | tee "$dir/runs.txt"
python3 - "$dir/runs.txt" <<'PY'
import statistics, sys
rows = [dict(kv.split("=", 1) for kv in l.split()[1:]) | {"side": l.split()[0]} for l in open(sys.argv[1])]
for side in "AB":
    r = [x for x in rows if x["side"] == side]
    med = lambda k: statistics.median(float(x[k]) for x in r)
    print(f"median {side}: total_ms={med('total_ms'):.0f} downtime_ms={med('downtime_ms'):.1f} "
          f"wire_mib={med('wire_mib'):.1f}")
PY
