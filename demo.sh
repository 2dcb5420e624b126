#!/usr/bin/env bash
# Complete local live migration on loopback: a 1 GiB `dbsim` guest (database-like
# workload, state kept in guest memory) is started, warmed up and migrated to a
# receiver (both prove a shared key first), which verifies the memory digest, commits, resumes the guest from its
# in-memory state (its verifier runs first) and lets it run for 3 s.
#
# Usage: ./demo.sh [SIZE] [extra `vmstream send` flags...]
set -euo pipefail
cd "$(dirname "$0")"
size=${1:-1G}
shift || true
cargo build --release -p vmstream --quiet
bin=target/release/vmstream
dir=$(mktemp -d /dev/shm/vmstream-demo.XXXXXX)
trap 'kill "${recv_pid:-}" 2>/dev/null || true; rm -rf "$dir"' EXIT
# Both sides prove a shared key to each other before anything else, then encrypt the
# stream with keys derived from it (--auth-key-file).
(umask 077; head -c 32 /dev/urandom > "$dir/key")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

echo "== receiver: 127.0.0.1:$port -> $dir/dest.mem"
"$bin" recv --listen "127.0.0.1:$port" --memory-file "$dir/dest.mem" --resume --run-for 3s \
    --stats-json "$dir/recv.json" --auth-key-file "$dir/key" > "$dir/recv.log" 2>&1 &
recv_pid=$!
for _ in $(seq 50); do grep -q listening "$dir/recv.log" 2>/dev/null && break; sleep 0.1; done

echo "== sender: $size dbsim guest on $dir/source.mem, rate-limited to 20000 tx/s, 2 s warm-up"
"$bin" send --memory-file "$dir/source.mem" --size "$size" --workload dbsim --rate 20000 \
    --warmup 2s --to "127.0.0.1:$port" --stats-json "$dir/send.json" \
    --auth-key-file "$dir/key" "$@"

wait "$recv_pid"
echo "== receiver"
cat "$dir/recv.log"
