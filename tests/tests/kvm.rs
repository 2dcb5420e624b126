//! KVM guests through the real binary over loopback: `vmstream send --kvm` runs the VM in
//! its own process and migrates it; `vmstream recv --resume` restores and runs it. Skipped
//! (with the reason printed) only where /dev/kvm is unusable.

use std::path::Path;
use std::time::{Duration, Instant};

use vmstream::guest::kvm::abi::{VCPU_AREA_GPA, VCPU_AREA_STRIDE, VCPU_TX_COUNT};
use vmstream::migration::digest::{hex, memory_digest};
use vmstream_tests::*;

/// Sum of the per-vCPU transaction counters in the guest RAM file at `path`.
fn kvm_tx(path: &Path, vcpus: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    (0..vcpus)
        .map(|i| {
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, VCPU_AREA_GPA + i * VCPU_AREA_STRIDE + VCPU_TX_COUNT)
                .expect("read vCPU counter");
            u64::from_le_bytes(b)
        })
        .sum()
}

/// Waits (bounded) until the KVM guest on `path` has committed more than `than`.
fn wait_kvm_tx_above(path: &Path, than: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = kvm_tx(path, 2);
        if now > than {
            return now;
        }
        assert!(Instant::now() < deadline, "KVM guest stuck at tx {now}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Migrates a 256 MiB guest with `mode`; with `resume` the destination runs it for a
/// second. Checks what both variants share and returns (send stats, recv stats, recv
/// stdout).
fn migrate_kvm(
    dir: &TmpDir,
    mode: &str,
    resume: bool,
) -> (serde_json::Value, serde_json::Value, Vec<String>) {
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (sj, rj) = (dir.path("send.json"), dir.path("recv.json"));
    let mut recv_args = vec![
        "--memory-file",
        dst.to_str().unwrap(),
        "--stats-json",
        rj.to_str().unwrap(),
    ];
    if resume {
        recv_args.extend_from_slice(&["--resume", "--run-for", "1s"]);
    }
    let (mut recv, port) = start_receiver(&recv_args);
    let mut send = kvm_sender(
        &src,
        "256M",
        port,
        &[
            "--dirty-log",
            mode,
            "--warmup",
            "500ms",
            // On a loaded machine the digest estimate can eat the whole downtime limit;
            // a forced switchover is just as exact.
            "--timeout",
            "20s",
            "--on-timeout",
            "force",
            "--stats-json",
            sj.to_str().unwrap(),
        ],
        &[],
    );
    // The send process runs the VM: its exit after the commit means the source VM is gone.
    let (s_status, _) = send.wait_exit();
    assert!(s_status.success(), "{mode}: send failed: {}", send.stderr());
    let (r_status, lines) = recv.wait_exit();
    assert!(r_status.success(), "{mode}: recv failed: {}", recv.stderr());
    let (s, r) = (read_stats(&sj), read_stats(&rj));
    assert_eq!(s["outcome"], "committed");
    assert_eq!(r["outcome"], "committed");
    assert_eq!(s["settings"]["dirty_tracking"], format!("kvm-{mode}"));
    // KVM's log re-arms before each page is queued: the encode workers copy the pages.
    assert_eq!(s["settings"]["page_copies"], "encode workers");
    // PATH holds the memory at the pause: its digest is the one both sides agreed on.
    let at_pause = std::fs::read(&src).unwrap();
    assert_eq!(at_pause.len(), 256 << 20);
    assert_eq!(
        s["digest"].as_str().unwrap(),
        hex(&memory_digest(&at_pause, 4096))
    );
    assert_eq!(s["digest"], r["digest"], "{mode}: digests differ");
    // Every round reports its dirty-log collection time.
    let rounds = s["per_round"].as_array().unwrap();
    assert_eq!(rounds.len() as u64, s["rounds"].as_u64().unwrap());
    assert!(rounds.iter().all(|r| r["dirty_log_ms"].as_f64().is_some()));
    assert!(rounds.last().unwrap()["paused"].as_bool().unwrap());
    (s, r, lines)
}

#[test]
fn dbsim_256m_migrates_live_with_every_dirty_log_mode() {
    if kvm_unavailable() {
        return;
    }
    let _g = serial();
    for mode in ["bitmap", "clear", "ring"] {
        // Committed only: the destination file must equal the source's at the pause.
        let dir = TmpDir::new(&format!("kvm-{mode}"));
        migrate_kvm(&dir, mode, false);
        assert!(
            files_identical(&dir.path("src.img"), &dir.path("dst.img")),
            "{mode}: the committed image differs from the source memory at the pause"
        );
        assert!(
            dir.entries().iter().all(|e| !e.contains("vmstream-recv")),
            "{:?}",
            dir.entries()
        );

        // Resumed: verified, continues from the source's counters and keeps counting.
        let dir = TmpDir::new(&format!("kvm-{mode}-resume"));
        let (s, r, lines) = migrate_kvm(&dir, mode, true);
        let tx_at_pause = kvm_tx(&dir.path("src.img"), 2);
        assert!(tx_at_pause > 0);
        let resumed = line_starting(&lines, "resumed kind=kvm");
        assert!(resumed.contains("verify=ok"), "{resumed}");
        assert_eq!(
            field(resumed, "tx="),
            tx_at_pause,
            "{mode}: resumed elsewhere"
        );
        let ok = line_starting(&lines, "verify ok");
        assert_eq!(field(ok, "resumed_from="), tx_at_pause);
        assert!(
            field(ok, "tx=") > tx_at_pause,
            "{mode}: the counter did not grow on the destination: {ok}"
        );
        assert!(s["downtime_ms"].as_f64().is_some());
        assert_eq!(s["settings"]["destination_running"], "true");
        // The destination sampled the resumed guest for the source's timeline.
        assert!(
            s["tps"]["after"].as_f64().is_some_and(|t| t > 0.0),
            "{mode}: no destination samples: {}",
            s["tps"]
        );
        assert!(
            s["timeline"]["samples"]
                .as_array()
                .is_some_and(|v| !v.is_empty()),
            "{mode}: {}",
            s["timeline"]
        );
        assert!(r["switchover_ms"]["verify"].as_f64().is_some());
    }
}

#[test]
fn receiver_killed_mid_migration_leaves_the_kvm_guest_running() {
    if kvm_unavailable() {
        return;
    }
    let _g = serial();
    let dir = TmpDir::new("kvm-kill-recv");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    // Raw pages at 32 MB/s: round 0 of 256 MiB takes ~8 s, the kill lands in it.
    let mut send = kvm_sender(
        &src,
        "256M",
        port,
        &[
            "--warmup",
            "300ms",
            "--compress",
            "none",
            "--xbzrle",
            "off",
            "--max-bandwidth",
            "32M",
            "--io-timeout",
            "10s",
            "--keep-running-for",
            "3s",
        ],
        &[],
    );
    send.wait_line("guest pid=");
    std::thread::sleep(Duration::from_millis(1500));
    recv.child.kill().unwrap();
    recv.wait_exit();
    send.wait_stderr("migration failed");
    // stderr is unbuffered: the failure line may arrive in pieces, the note after it.
    send.wait_stderr("keeps running in this process");
    // The VM lives in the send process, which is still running it: its counters (read
    // from the shared RAM file) keep growing.
    let tx = kvm_tx(&src, 2);
    let later = wait_kvm_tx_above(&src, tx);
    assert!(
        send.child.try_wait().unwrap().is_none(),
        "send exited early"
    );
    wait_kvm_tx_above(&src, later);
    let (status, lines) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "stderr: {}", send.stderr());
    let done = line_starting(&lines, "done tx=");
    assert!(field(done, "tx=") > later, "{done}");
    // (A SIGKILLed receiver cannot remove its temporary file; it never becomes PATH.)
    assert!(!dst.exists(), "{} was committed", dst.display());
}

#[test]
fn corrupted_state_blob_is_refused_before_the_commit() {
    if kvm_unavailable() {
        return;
    }
    let _g = serial();
    let dir = TmpDir::new("kvm-corrupt-state");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap(), "--resume"]);
    let mut send = kvm_sender(
        &src,
        "64M",
        port,
        &[
            "--warmup",
            "300ms",
            "--keep-running-for",
            "2s",
            "--timeout",
            "20s",
            "--on-timeout",
            "force",
        ],
        &[("VMSTREAM_TEST_CORRUPT_STATE_AT", "200")],
    );
    let (r_status, _) = recv.wait_exit();
    assert_eq!(r_status.code(), Some(1));
    let err = recv.stderr();
    assert!(
        err.contains("guest state refused: invalid KVM state blob: checksum mismatch")
            && err.contains("nothing committed"),
        "{err}"
    );
    send.wait_stderr("migration failed");
    send.wait_stderr("StateRejected");
    // The source guest was resumed and keeps running.
    let tx = kvm_tx(&src, 2);
    wait_kvm_tx_above(&src, tx);
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "stderr: {}", send.stderr());
    assert!(!dst.exists(), "{} was committed", dst.display());
    assert_eq!(dir.entries(), vec!["src.img".to_string()]);
}

/// Migrates a 16 MiB random KVM guest as raw pages at `bandwidth` with `extra` arguments,
/// runs `cancel` on the sender and the receiver, and checks how the migration ended:
/// cancelled (exit 3, `reason` in the message), the guest still running in the sender, the
/// destination rolled back.
fn cancelled_kvm_migration(
    name: &str,
    bandwidth: &str,
    extra: &[&str],
    cancel: impl FnOnce(&Proc, &Proc),
    reason: &str,
) {
    let _g = serial();
    let dir = TmpDir::new(name);
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let sj = dir.path("send.json");
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let mut args = vec![
        "--workload",
        "random",
        "--warmup",
        "200ms",
        "--compress",
        "none",
        "--xbzrle",
        "off",
        "--max-bandwidth",
        bandwidth,
        "--keep-running-for",
        "2s",
        "--stats-json",
        sj.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut send = kvm_sender(&src, "16M", port, &args, &[]);
    cancel(&send, &recv);
    send.wait_stderr(&format!("cancelled: {reason}"));
    let tx = kvm_tx(&src, 2);
    wait_kvm_tx_above(&src, tx);
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(3), "stderr: {}", send.stderr());
    expect_receiver_failure(&mut recv, &dst, &["source aborted (Cancelled)"]);
    assert_eq!(read_stats(&sj)["outcome"], "cancelled");
    assert_eq!(read_stats(&sj)["settings"]["guest_kind"], "kvm");
}

#[test]
fn timeout_cancel_keeps_the_kvm_guest_running_and_exits_3() {
    if kvm_unavailable() {
        return;
    }
    // Raw pages at 8 MB/s: round 0 of 16 MiB outlasts the 1 s timeout, and the random
    // workload has rewritten thousands of pages by then (far beyond the downtime limit).
    cancelled_kvm_migration(
        "kvm-cancel",
        "8M",
        &["--timeout", "1s", "--on-timeout", "cancel"],
        |_, _| {},
        "migration did not converge",
    );
}

/// SIGINT to the sender in the middle of a round cancels the migration like the timeout
/// does, instead of ending the process and the KVM guest with it.
#[test]
fn sigint_cancels_the_migration_and_the_kvm_guest_keeps_running() {
    if kvm_unavailable() {
        return;
    }
    // Raw pages at 4 MB/s: round 0 of 16 MiB takes 4 s.
    cancelled_kvm_migration(
        "kvm-sigint",
        "4M",
        &[],
        |send, recv| {
            recv.wait_stderr("connection from");
            std::thread::sleep(Duration::from_millis(300));
            send_signal("INT", &send.pid().to_string());
        },
        "on request (SIGINT or SIGTERM",
    );
}

#[test]
fn qemu_auto_converge_throttles_a_kvm_guest() {
    if kvm_unavailable() {
        return;
    }
    let _g = serial();
    let dir = TmpDir::new("kvm-autoconverge");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let sj = dir.path("send.json");
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    // The random workload dirties pages far faster than 8 MB/s of raw pages carry.
    let to = format!("127.0.0.1:{port}");
    let mut send = Proc::vmstream(
        "send --kvm",
        &[
            "send",
            "--kvm",
            "--size",
            "32M",
            "--workload",
            "random",
            "--memory-file",
            src.to_str().unwrap(),
            "--to",
            &to,
            "--warmup",
            "300ms",
            "--converge",
            "qemu",
            "--max-bandwidth",
            "8M",
            "--compress",
            "none",
            "--xbzrle",
            "off",
            "--timeout",
            "4s",
            "--on-timeout",
            "force",
            "--stats-json",
            sj.to_str().unwrap(),
            "--no-progress",
        ],
        &[],
    );
    let (status, _) = send.wait_exit();
    assert!(status.success(), "send failed: {}", send.stderr());
    let (r_status, _) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    assert!(files_identical(&src, &dst));
    let s = read_stats(&sj);
    let throttles: Vec<f64> = s["per_round"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["throttle"].as_f64().unwrap())
        .collect();
    assert!(
        throttles.iter().any(|&t| t > 0.0),
        "the KVM guest was never throttled: {throttles:?}"
    );
}

#[test]
fn kvm_run_prints_rates_and_verifies() {
    if kvm_unavailable() {
        return;
    }
    let _g = serial();
    let mut run = Proc::vmstream(
        "kvm run",
        &[
            "kvm",
            "run",
            "--size",
            "32M",
            "--vcpus",
            "2",
            "--workload",
            "dbsim",
            "--dirty-log",
            "ring",
            "--interval",
            "300ms",
            "--run-for",
            "1200ms",
        ],
        &[],
    );
    let (status, lines) = run.wait_exit();
    assert!(status.success(), "kvm run failed: {}", run.stderr());
    let rates: Vec<&String> = lines.iter().filter(|l| l.starts_with("kvm tps=")).collect();
    assert!(rates.len() >= 3, "{lines:?}");
    assert!(
        rates.iter().all(|l| l.contains("dirty_pages=")),
        "{lines:?}"
    );
    let done = line_starting(&lines, "done tx=");
    assert!(
        field(done, "tx=") > 0 && done.contains("verify=ok"),
        "{done}"
    );
}
