#!/usr/bin/env bash
# BENCHMARKS.md section 13 in one sitting: every mode of compare.py on the light guest at
# 1 Gbit and on the heavy guest at 25 MB/s, one run each, one JSON line per run (with the
# host's CPU model and load first).
#
# Usage: benches/qemu/compare_all.sh VMSTREAM_BIN GUEST_DIR [MODES...]
#   GUEST_DIR: tests/qemu-guest/build.sh's output; MODES default to all of compare.py's.
set -uo pipefail
bin=$1 guest=$2
shift 2
modes=("$@")
[ ${#modes[@]} -eq 0 ] && modes=(qemu qemu-xbzrle qemu-auto-converge qemu-multifd-zstd vmstream vmstream-direct-staged)
here=$(dirname "$0")
echo "# $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
for m in "${modes[@]}"; do
    python3 "$here/compare.py" "$bin" "$guest" "$m" 125000000 32M 200 --timeout 120
done
for m in "${modes[@]}"; do
    python3 "$here/compare.py" "$bin" "$guest" "$m" 25000000 256M 0 --timeout 90
done
echo "# done $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
