#!/usr/bin/env bash
# Builds the Linux guest the QEMU tests and benchmarks boot: Debian's kernel (vmlinuz) and an
# initramfs with busybox, the `vmstream` binary and the libraries it links, and an /init that
# runs vmstream's dbsim workload on a memory file in /dev/shm, printing its transaction counter
# and its verify on the serial console.
#
# usage: build.sh VMSTREAM_BINARY OUT_DIR
# Writes OUT_DIR/vmlinuz and OUT_DIR/initrd.cpio.gz; idempotent (rebuilds the initramfs only
# when the binary or this script changed). Needs busybox-static and apt-get (for the kernel
# package, downloaded and unpacked, not installed). Exit 3: a prerequisite is missing.
set -euo pipefail
bin=$(readlink -f "$1")
out=$2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
out=$(readlink -f "$out")

busybox=$(command -v busybox || true)
[ -n "$busybox" ] || busybox=/bin/busybox
if ! "$busybox" --list >/dev/null 2>&1 && [ -x /bin/busybox ]; then
    busybox=/bin/busybox
fi
[ -x "$busybox" ] || { echo "build.sh: busybox not found (apt-get install busybox-static)" >&2; exit 3; }

if [ ! -s "$out/vmlinuz" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # linux-image-amd64 is a metapackage: its dependency names the real kernel package.
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9].*\)/\1/p' | head -1)
    [ -n "$pkg" ] || { echo "build.sh: no linux-image-amd64 in apt's lists (apt-get update?)" >&2; exit 3; }
    (cd "$work" && apt-get download "$pkg" >/dev/null) || { echo "build.sh: apt-get download $pkg failed" >&2; exit 3; }
    dpkg-deb -x "$work"/*.deb "$work/x"
    cp "$work"/x/boot/vmlinuz-* "$out/vmlinuz.tmp.$$"
    mv "$out/vmlinuz.tmp.$$" "$out/vmlinuz"
fi

stamp=$( (sha256sum "$bin" "$here/build.sh" "$busybox") | sha256sum | cut -c1-16)
if [ -s "$out/initrd.cpio.gz" ] && [ "$(cat "$out/initrd.stamp" 2>/dev/null)" = "$stamp" ]; then
    exit 0
fi
root=$(mktemp -d)
trap 'rm -rf "$root" ${work:-}' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib64,lib/x86_64-linux-gnu}
cp "$busybox" "$root/bin/busybox"
for applet in sh mount mkdir cat sleep echo grep sed poweroff; do ln -s busybox "$root/bin/$applet"; done
cp "$bin" "$root/bin/vmstream"
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
cat > "$root/init" <<'INIT'
#!/bin/sh
# The guest's init: dbsim on a memory file in /dev/shm, run one second at a time (each run
# resumes, and so verifies, what the previous left), its counter and verify on the console.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm
mount -t tmpfs -o size=90% shm /dev/shm
size=32M; rate=200
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmstream.size=*) size=${arg#vmstream.size=} ;;
        vmstream.rate=*) rate=${arg#vmstream.rate=} ;;
    esac
done
db=/dev/shm/db
echo "vmstream-guest: booted size=$size rate=$rate"
/bin/vmstream guest run --memory-file $db --size $size --rate $rate --no-track --duration 1s
while true; do
    /bin/vmstream guest run --memory-file $db --resume --rate $rate --no-track --duration 1s \
        || echo "vmstream-guest: RESUME FAILED"
    v=$(/bin/vmstream guest verify --memory-file $db 2>&1)
    echo "vmstream-guest: verify $v"
done
INIT
chmod +x "$root/init"
(cd "$root" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$out/initrd.cpio.gz.tmp.$$"
mv "$out/initrd.cpio.gz.tmp.$$" "$out/initrd.cpio.gz"
echo "$stamp" > "$out/initrd.stamp"
