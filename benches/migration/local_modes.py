#!/usr/bin/env python3
"""Same-host migration modes compared (issue 23): TCP loopback, a unix socket, and
`send --handover`, on one `dbsim` guest size, interleaved round by round.

For each run: total time and downtime (the source's stats JSON), the switchover's parts,
and the peak extra host memory while it runs: the destination image's allocated blocks
(and its temporary file's) plus the anonymous memory (RssAnon) of the send and recv
processes, sampled every 10 ms. The source guest's own memory is not extra: it exists
before and after.

Usage: benches/migration/local_modes.py BIN [SIZE] [ROUNDS] [MODES...]
  e.g. benches/migration/local_modes.py target/release/vmstream 1G 3 tcp unix handover
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time


def rss_anon(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def allocated(d):
    total = 0
    for name in os.listdir(d):
        if name.startswith("dst") or ".vmstream-recv-" in name:
            try:
                total += os.stat(os.path.join(d, name)).st_blocks * 512
            except OSError:
                pass
    return total


def run(binary, size, mode, base):
    d = tempfile.mkdtemp(prefix=f"vmstream-local-{mode}-", dir=base)
    sock = os.path.join(d, "m.sock")
    if mode == "tcp":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        listen, to = f"127.0.0.1:{port}", f"127.0.0.1:{port}"
    else:
        listen = to = f"unix:{sock}"
    recv_args = [binary, "recv", "--listen", listen, "--resume", "--run-for", "1s",
                 "--stats-json", f"{d}/recv.json"]
    if mode != "handover":
        recv_args += ["--memory-file", f"{d}/dst.mem"]
    recv = subprocess.Popen(recv_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    recv.stdout.readline()  # listening on ...
    send_args = [binary, "send", "--memory-file", f"{d}/src.mem", "--size", size, "--workload",
                 "dbsim", "--rate", "20000", "--warmup", "2s", "--to", to, "--no-progress",
                 "--stats-json", f"{d}/send.json"]
    if mode == "handover":
        send_args.append("--handover")
    send = subprocess.Popen(send_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            extra = allocated(d) + rss_anon(send.pid) + rss_anon(recv.pid)
            peak[0] = max(peak[0], extra)
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    send_out = send.communicate()[0]
    recv_out = recv.communicate()[0]
    done.set()
    t.join()
    if send.returncode != 0 or recv.returncode != 0:
        print(send_out, recv_out, file=sys.stderr)
        raise SystemExit(f"{mode}: send {send.returncode}, recv {recv.returncode}")
    s = json.load(open(f"{d}/send.json"))
    r = json.load(open(f"{d}/recv.json"))
    subprocess.run(["rm", "-rf", d])
    return {
        "mode": mode,
        "total_ms": s["total_time_ms"],
        "downtime_ms": s["downtime_ms"],
        "peak_extra_mib": peak[0] / 2**20,
        "wire_mib": s["bytes_on_wire"] / 2**20,
        "rounds": s["rounds"],
        "send_switchover": s.get("switchover_ms"),
        "recv_switchover": r.get("switchover_ms"),
        "digest": s["digest"],
    }


def main():
    binary = sys.argv[1]
    size = sys.argv[2] if len(sys.argv) > 2 else "1G"
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    modes = sys.argv[4:] or ["tcp", "unix", "handover"]
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    for i in range(rounds):
        for mode in modes:
            load = os.getloadavg()[0]
            res = run(binary, size, mode, base)
            res["round"] = i
            res["load"] = load
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
