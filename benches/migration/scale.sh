#!/usr/bin/env bash
# The scale benchmark of issue 18 (BENCHMARKS.md, "Round 0 at the copy bound"): file-backed
# dbsim guests of 1, 2, 4 and 8 GiB at 5000 tx/s and KVM dbsim guests of 1, 2 and 4 GiB at 5000 tx/s,
# migrated over unlimited loopback with the default downtime limit and with 50 ms; the
# receiver resumes the guest for 1 s. Before each migration a memory file of the guest's
# size and workload is made on the same file system and copied with `cp` to a fresh file
# (memory warmed first: on these VMs the first touch of never-used memory is several times
# slower than later ones), so round 0 is compared with a copy of the same bytes taken in the
# same run. The VM hands memory freed for a few seconds back to its host, so the migration's
# warm memory is held until the source connects (BENCHMARKS.md 20). Prints one table row per
# migration; stats and logs go to OUT.
#
# Usage: benches/migration/scale.sh
#   SIZES="1 2 4 8"      file-backed guest sizes in GiB (a subset for a short run)
#   KVM_SIZES="1 2 4"    KVM guest sizes in GiB ("" for none; needs /dev/kvm)
#   LIMITS="default 50ms"  downtime limits ("default": no --downtime-limit flag)
#   BINS="new=PATH old=PATH"  builds to compare, run interleaved per configuration
#                        (default: this workspace's release build, labelled "this")
#   SEND_FLAGS="..."     more `vmstream send` flags for every migration (e.g. --compress none)
#   OUT=/tmp/vmstream-scale  DIR=/dev/shm (where memory files live)
#   COLD_IDLE=8          seconds idle before the cold `cp` (memory freed that long is cold)
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${BINS:-}" ]; then
    cargo build --release -p vmstream --quiet || exit 1
    BINS="this=$PWD/target/release/vmstream"
fi
sizes=${SIZES-1 2 4 8}
kvm_sizes=${KVM_SIZES-1 2 4}
limits=${LIMITS:-default 50ms}
out=${OUT:-/tmp/vmstream-scale}
COLD_IDLE=${COLD_IDLE:-8}
mkdir -p "$out"
dir=$(mktemp -d "${DIR:-/dev/shm}/vmstream-scale.XXXXXX")
trap 'pkill -f "guest run --memory-file $dir/" 2>/dev/null; rm -rf "$dir"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Touches SIZE GiB of fresh memory and frees it again, right before a `cp`.
warm() { dd if=/dev/zero of="$dir/warm" bs=4M count=$(($1 * 256)) status=none; rm -f "$dir/warm"; }

# Seconds `cp` takes to copy a guest memory file of KIND (file, kvm) and SIZE GiB, made
# with the guest's own workload, to a fresh file beside it.
cp_time() { # BIN KIND SIZE
    local bin=$1 kind=$2 size=$3
    rm -f "$dir"/*.mem
    if [ "$kind" = kvm ]; then
        "$bin" kvm run --size "${size}G" --vcpus 2 --workload dbsim --memory-file "$dir/cp-src.mem" \
            --run-for 1s > /dev/null 2>&1
    else
        "$bin" guest run --memory-file "$dir/cp-src.mem" --size "${size}G" --workload dbsim \
            --duration 1ms --no-track > /dev/null 2>&1
    fi
    local t0 t1 t2 t3
    # Cold: this VM hands memory freed for a few seconds back to its host (free page
    # reporting, BENCHMARKS.md 20), and a migration's destination is allocated seconds
    # after any warming, so it gets that memory. The same copy, after as long idle.
    sleep "$COLD_IDLE"
    t0=$(date +%s.%N)
    cp "$dir/cp-src.mem" "$dir/cp-dst.mem"
    t1=$(date +%s.%N)
    rm -f "$dir/cp-dst.mem"
    warm $((2 * size))
    t2=$(date +%s.%N)
    cp "$dir/cp-src.mem" "$dir/cp-dst.mem"
    t3=$(date +%s.%N)
    rm -f "$dir"/*.mem
    python3 -c "print(f'{$t3 - $t2:.3f} {$t1 - $t0:.3f}')"
}

migrate() { # LABEL BIN KIND SIZE LIMIT
    local label=$1 bin=$2 kind=$3 size=$4 limit=$5
    local name="$kind-${size}G-$limit-$label" p
    local cp cold
    read -r cp cold <<< "$(cp_time "$bin" "$kind" "$size")"
    # Warm memory for the destination image, the sender's XBZRLE cache (up to 1 GiB) and
    # buffers, held until the source connects: memory freed earlier would be cold again by
    # round 0 (see cp_time), while `cp` above copies right after its warming.
    dd if=/dev/zero of="$dir/warm" bs=4M count=$(((size + 2) * 256)) status=none
    p=$(port)
    local extra=(--memory-file "$dir/src.mem")
    # shellcheck disable=SC2206 # word splitting of the flags is wanted
    extra+=(${SEND_FLAGS:-})
    [ "$limit" = default ] || extra+=(--downtime-limit "$limit")
    if [ "$kind" = kvm ]; then
        extra+=(--kvm --vcpus 2)
    else
        extra+=(--rate 5000)
    fi
    "$bin" recv --listen "127.0.0.1:$p" --memory-file "$dir/dst.mem" --resume --run-for 1s \
        --stats-json "$out/$name.recv.json" > "$out/$name.recv.log" 2>&1 &
    local recv=$!
    for _ in $(seq 50); do grep -q listening "$out/$name.recv.log" 2>/dev/null && break; sleep 0.1; done
    (
        for _ in $(seq 1200); do
            grep -q "connection from" "$out/$name.recv.log" 2>/dev/null && break
            sleep 0.05
        done
        rm -f "$dir/warm"
    ) &
    "$bin" send --to "127.0.0.1:$p" --no-progress --size "${size}G" --workload dbsim \
        --warmup 2s --stats-json "$out/$name.send.json" "${extra[@]}" > "$out/$name.send.log" 2>&1
    echo "send exit $?" >> "$out/$name.send.log"
    # A cancelled migration leaves a file guest running, by design: stop it here.
    pkill -f "guest run --memory-file $dir/src.mem" || true
    # A sender that never connected leaves the receiver listening.
    for _ in $(seq 100); do kill -0 "$recv" 2>/dev/null || break; sleep 0.1; done
    kill "$recv" 2>/dev/null
    wait "$recv"
    rm -f "$dir"/*.mem
    python3 - "$out/$name.send.json" "$out/$name.recv.json" "$kind" "$size" "$limit" "$label" "$cp" "$cold" \
        "$(uptime | sed 's/.*load average: //; s/,.*//')" <<'PY'
import json, sys
def load(p):
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return {}
s, r = load(sys.argv[1]), load(sys.argv[2])
kind, size, limit, label, cp, cold, load1 = sys.argv[3:10]
cp, cold = float(cp), float(cold)
rounds = s.get("per_round", [])
r0 = rounds[0]["duration_ms"] / 1e3 if rounds else float("nan")
final = next((x["duration_ms"] for x in reversed(rounds) if x.get("paused")), None)
ss, rs = s.get("switchover_ms", {}), r.get("switchover_ms", {})
def ms(v):
    return "-" if v is None else f"{v:.0f}"
def find(d, key):
    """`key` anywhere in the stats (top level or one object down), or None."""
    if key in d:
        return d[key]
    for v in d.values():
        if isinstance(v, dict) and key in v:
            return v[key]
    return None
def cpu(d):
    c = d.get("cpu")
    return f"{(c['user_ms'] + c['sys_ms']) / 1e3:.1f}" if c else "-"
state = next((v for k, v in {**ss, **rs}.items() if "state" in k), None)
verify = (s.get("verify") or {}).get("mode") or "full"
reason = find(s, "switchover_reason") or ("converged" if s.get("converged") else "forced")
print(f"| {kind} | {size} | {limit} | {label} | {r0:.2f} | {cp:.2f} | {r0 / cp:.1f} | {cold:.2f} | {r0 / cold:.1f} | "
      f"{s.get('total_time_ms', float('nan')) / 1e3:.1f} | {ms(s.get('downtime_ms'))} | "
      f"{ms(final)} | {ms(ss.get('digest'))} / {ms(rs.get('digest'))} | {ms(rs.get('verify'))} | {ms(state)} | "
      f"{ms(rs.get('commit'))} | {ms(rs.get('resume') or rs.get('kvm_restore'))} | "
      f"{s.get('bytes_on_wire', 0) / 2**20:.0f} | {cpu(s)} / {cpu(r)} | {verify} | {reason} | "
      f"{s.get('outcome', 'failed')} | {load1} |", flush=True)
PY
}

echo "host: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load average at start: $(uptime | sed 's/.*load average: //')"
echo "| guest | GiB | limit | build | round 0 s | cp s | round 0 / cp | cold cp s | round 0 / cold cp | total s | downtime ms | final round ms | digest ms src / dst | dest verify ms | state ms | commit ms | resume ms | wire MiB | cpu s src / dst | verify | switchover | outcome | load |"
echo "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|---|---|---:|"
run_kind() { # KIND SIZES
    local kind=$1 size limit b
    for size in $2; do
        for limit in $limits; do
            for b in $BINS; do
                migrate "${b%%=*}" "${b#*=}" "$kind" "$size" "$limit"
            done
        done
    done
}
run_kind file "$sizes"
[ -n "$kvm_sizes" ] && run_kind kvm "$kvm_sizes"
exit 0
