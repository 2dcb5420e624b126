#!/usr/bin/env python3
"""QEMU's own migration beside vmstream's on the test guest (tests/qemu-guest/build.sh).

usage: compare.py VMSTREAM_BIN GUEST_DIR MODE BANDWIDTH SIZE RATE [--timeout S]
  MODE: qemu | qemu-xbzrle | qemu-auto-converge | qemu-multifd-zstd | vmstream |
        vmstream-direct-staged (VMSTREAM_ARGS: more send flags; COMPARE_KEEP=PREFIX keeps
        both sides' stats JSON as PREFIX.send.json, PREFIX.recv.json)
  BANDWIDTH: bytes/s (e.g. 125000000 for 1 Gbit, 25000000 for 25 MB/s)
  SIZE, RATE: the in-guest dbsim's memory (e.g. 32M) and tx/s (0: as fast as it goes)
Boots a fresh 512 MiB guest (TCG, RAM in a shared file on /dev/shm), lets it run 10 s,
migrates it to a destination QEMU on this host, and prints one JSON line: converged,
total_ms, downtime_ms (QEMU's own figure, or vmstream's stop-to-RESUME), for QEMU's
migration also guest_pause_ms (its source's STOP to its destination's RESUME) and
source_migration_cpu_ms (its source's migration threads, sampled every 0.1 s), wire_bytes and,
for vmstream, the CPU of both sides.
"""
import json, os, shutil, socket, subprocess, sys, tempfile, time

RAM = "524280K"


def qmp(path):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(500):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    f = s.makefile("rw")
    f.readline()
    events = []

    def cmd(name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        f.write(json.dumps(msg) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "event" in r:
                events.append(r)
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")

    cmd("qmp_capabilities")
    # The events seen so far (STOP, RESUME, ...), each with QEMU's host timestamp.
    cmd.events = events
    return cmd


def event_time(cmd, name):
    """Host time (s) of the last `name` event this monitor reported, or None."""
    for e in reversed(cmd.events):
        if e["event"] == name:
            return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
    return None


def qemu_cmd(guest, mem, serial, size, rate, share=True):
    return (
        f"qemu-system-x86_64 -name guest,debug-threads=on "
        f"-machine pc,accel=tcg,memory-backend=ram0 -m {RAM} "
        f"-object memory-backend-file,id=ram0,size={RAM},mem-path={mem},share={'on' if share else 'off'} "
        f"-kernel {guest}/vmlinuz -initrd {guest}/initrd.cpio.gz "
        f"-append 'console=ttyS0 quiet vmstream.size={size} vmstream.rate={rate}' "
        f"-nographic -nodefaults -vga none -no-reboot -serial file:{serial}"
    )


def migration_thread_ticks(pid, seen):
    """Records in `seen` the CPU ticks (user + system) of QEMU's migration threads (named
    with debug-threads=on: live_migration, multifdsend_N, return path), which end with the
    migration: sampled while it runs."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            if not (name.startswith("live_migration") or name.startswith("multifd")
                    or name.startswith("return path")):
                continue
            fields = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            seen[tid] = int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass


def main():
    bin_, guest, mode, bw, size, rate = sys.argv[1:7]
    timeout = int(sys.argv[8]) if len(sys.argv) > 8 and sys.argv[7] == "--timeout" else 120
    d = tempfile.mkdtemp(prefix="vmstream-qemu-bench-", dir="/dev/shm")
    procs = []
    try:
        src_cmd = qemu_cmd(guest, f"{d}/src.ram", f"{d}/src.serial", size, rate)
        procs.append(subprocess.Popen(
            ["sh", "-c", f"exec {src_cmd} -qmp unix:{d}/src.qmp,server=on,wait=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 600
        while "done tx=" not in open(f"{d}/src.serial", errors="replace").read() if os.path.exists(f"{d}/src.serial") else True:
            if time.time() > deadline:
                raise SystemExit("the guest did not boot")
            time.sleep(0.5)
        time.sleep(10)
        out = {"mode": mode, "bandwidth": int(bw), "size": size, "rate": rate}
        if mode.startswith("qemu"):
            dst_cmd = qemu_cmd(guest, f"{d}/dst.ram", f"{d}/dst.serial", size, rate)
            procs.append(subprocess.Popen(
                ["sh", "-c", f"exec {dst_cmd} -incoming defer -qmp unix:{d}/dst.qmp,server=on,wait=off"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            src, dst = qmp(f"{d}/src.qmp"), qmp(f"{d}/dst.qmp")
            caps = []
            if mode == "qemu-xbzrle":
                caps = ["xbzrle"]
            if mode == "qemu-auto-converge":
                caps = ["xbzrle", "auto-converge"]
            if mode == "qemu-multifd-zstd":
                caps = ["multifd"]
            for c in (src, dst):
                c("migrate-set-capabilities", capabilities=[{"capability": k, "state": True} for k in caps])
            params = {"max-bandwidth": int(bw), "downtime-limit": 300}
            if "xbzrle" in caps:
                params["xbzrle-cache-size"] = 256 << 20
            if "multifd" in caps:
                for c in (src, dst):
                    c("migrate-set-parameters", **{"multifd-channels": 2, "multifd-compression": "zstd"})
            src("migrate-set-parameters", **params)
            dst("migrate-incoming", uri=f"unix:{d}/mig.sock")
            src("migrate", uri=f"unix:{d}/mig.sock")
            t = time.time()
            threads = {}
            while True:
                migration_thread_ticks(procs[0].pid, threads)
                m = src("query-migrate")
                if m.get("status") in ("completed", "failed"):
                    break
                if time.time() - t > timeout:
                    src("migrate_cancel")
                    m["status"] = "not converged"
                    break
                time.sleep(0.1)
            ram = m.get("ram", {})
            out.update(converged=m.get("status") == "completed", total_ms=m.get("total-time", int((time.time() - t) * 1000)),
                       downtime_ms=m.get("downtime"), wire_bytes=ram.get("transferred"),
                       source_migration_cpu_ms=round(sum(threads.values()) * 1000 / os.sysconf("SC_CLK_TCK")))
            if out["converged"]:
                # The pause as the guest sees it: no vCPU runs from the source's STOP to
                # the destination's RESUME (both QMP events, host clock): vmstream's
                # downtime_ms is measured the same way.
                for _ in range(500):
                    if dst("query-status")["status"] == "running":
                        break
                    time.sleep(0.01)
                stop, resume = event_time(src, "STOP"), event_time(dst, "RESUME")
                if stop and resume:
                    out["guest_pause_ms"] = round((resume - stop) * 1e3, 1)
        else:
            dst_cmd = qemu_cmd(guest, "{memory}", f"{d}/dst.serial", size, rate)
            recv = subprocess.Popen([bin_, "recv", "--listen", f"unix:{d}/vm.sock", "--memory-file", f"{d}/dst.ram",
                                     "--qemu", dst_cmd, "--stats-json", f"{d}/recv.json"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(recv)
            while not os.path.exists(f"{d}/vm.sock"):
                time.sleep(0.05)
            args = [bin_, "send", "--qemu", f"{d}/src.qmp", "--to", f"unix:{d}/vm.sock", "--max-bandwidth", bw,
                    "--no-progress", "--stats-json", f"{d}/send.json", "--timeout", f"{timeout}s"]
            if mode == "vmstream-direct-staged":
                args += ["--converge", "direct-staged"]
            # Further send options (e.g. "--xbzrle-cache 256M"), recorded in the output.
            extra = os.environ.get("VMSTREAM_ARGS", "").split()
            args += extra
            out["send_args"] = " ".join(extra)
            rc = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
            recv.wait(timeout=60)
            s = json.load(open(f"{d}/send.json"))
            if os.environ.get("COMPARE_KEEP"):
                # The whole stats of both sides, for the downtime's parts.
                for side in ("send", "recv"):
                    shutil.copy(f"{d}/{side}.json", f"{os.environ['COMPARE_KEEP']}.{side}.json")
            out.update(converged=rc == 0 and s.get("converged"), total_ms=s.get("total_time_ms"),
                       downtime_ms=s.get("downtime_ms"), wire_bytes=s.get("bytes_on_wire"),
                       cpu_ms=s.get("cpu", {}), peer_cpu_ms=s.get("peer_cpu_ms"), rounds=s.get("rounds"),
                       switchover_ms=s.get("switchover_ms"))
            if os.path.exists(f"{d}/dst.ram.qmp"):
                try:
                    qmp(f"{d}/dst.ram.qmp")("quit")
                except Exception:
                    pass
        print(json.dumps(out), flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
