//! Successful migrations over loopback with the real binary: the receiver's image must be
//! byte-identical to the source's memory at the pause, and both digests must agree.

use vmstream_tests::*;

/// Runs one migration of a started guest; returns (send stats, recv stats).
fn migrate(
    dir: &TmpDir,
    size: &str,
    workload: &str,
    send_extra: &[&str],
) -> (serde_json::Value, serde_json::Value) {
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (sj, rj) = (dir.path("send.json"), dir.path("recv.json"));
    let (mut recv, port) = start_receiver(&[
        "--memory-file",
        dst.to_str().unwrap(),
        "--stats-json",
        rj.to_str().unwrap(),
    ]);
    let to = format!("127.0.0.1:{port}");
    let mut args = vec![
        "send",
        "--memory-file",
        src.to_str().unwrap(),
        "--size",
        size,
        "--workload",
        workload,
        "--to",
        &to,
        "--stats-json",
        sj.to_str().unwrap(),
        "--no-progress",
    ];
    args.extend_from_slice(send_extra);
    let mut send = Proc::vmstream("send", &args, &[]);
    let _guest = KillPid(guest_pid(&mut send));
    let (s_status, _) = send.wait_exit();
    assert!(s_status.success(), "send failed: {}", send.stderr());
    let (r_status, _) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    assert!(
        files_identical(&src, &dst),
        "source memory at the pause differs from the committed image"
    );
    let (s, r) = (read_stats(&sj), read_stats(&rj));
    assert_eq!(s["outcome"], "committed");
    assert_eq!(r["outcome"], "committed");
    // uffd-wp re-arms in its collection, so the encode workers copy the live pages.
    assert_eq!(s["settings"]["page_copies"], "encode workers");
    assert!(s["digest"].is_string());
    assert_eq!(s["digest"], r["digest"], "digests differ");
    assert_eq!(s["rounds"], r["rounds"]);
    // No temporary image is left next to the target.
    assert!(
        dir.entries().iter().all(|e| !e.contains("vmstream-recv")),
        "{:?}",
        dir.entries()
    );
    (s, r)
}

fn pages(stats: &serde_json::Value, encoding: &str) -> u64 {
    stats["codec"]["by_encoding"][encoding]["pages"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn dbsim_256m_default_settings_resumes_on_destination() {
    let _g = serial();
    let dir = TmpDir::new("dbsim256");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (sj, rj) = (dir.path("send.json"), dir.path("recv.json"));
    let (mut recv, port) = start_resuming_receiver(&dst, "1500ms", &rj);
    let to = format!("127.0.0.1:{port}");
    let mut send = Proc::vmstream(
        "send",
        &[
            "send",
            "--memory-file",
            src.to_str().unwrap(),
            "--size",
            "256M",
            "--workload",
            "dbsim",
            // The guest shares 2 cores with both pipelines here: a bounded rate keeps its
            // dirty rate below what they can carry (migration settings stay default).
            "--rate",
            "20000",
            "--warmup",
            "1s",
            "--to",
            &to,
            "--stats-json",
            sj.to_str().unwrap(),
        ],
        &[],
    );
    let _guest = KillPid(guest_pid(&mut send));
    let (s_status, _) = send.wait_exit();
    assert!(s_status.success(), "send failed: {}", send.stderr());
    // The source guest ended at the pause: its memory is what the destination resumed
    // (verify replays a transaction the pause interrupted, as the resume does).
    let tx_at_pause = vmstream::guest::file::verify::verify_file(&src)
        .expect("the source image at the pause verifies")
        .tx_count;
    let (r_status, lines) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    let ready = line_starting(&lines, "ready ");
    let done = line_starting(&lines, "done tx=");
    assert!(
        lines.iter().any(|l| l.starts_with("verify ok")),
        "{lines:?}"
    );
    let resumed_at = field(ready, "tx=");
    assert_eq!(resumed_at, tx_at_pause, "resumed from another state");
    assert!(
        field(done, "tx=") > resumed_at,
        "the transaction counter did not grow on the destination: {ready} / {done}"
    );
    let (s, r) = (read_stats(&sj), read_stats(&rj));
    assert_eq!(s["digest"], r["digest"]);
    assert_eq!(s["guest_bytes"], 256u64 << 20);
    for key in [
        "total_time_ms",
        "downtime_ms",
        "bytes_on_wire",
        "guest_bytes",
        "rounds",
        "converged",
        "switchover_reason",
        "digest",
    ] {
        assert!(!s[key].is_null(), "send stats lack {key}");
    }
    assert!(s["per_round"].as_array().unwrap().len() as u64 == s["rounds"].as_u64().unwrap());
    // PATH holds the memory at the pause; the destination has since run on, so compare
    // with the digest instead of the (changed) destination file.
    use vmstream::migration::digest::{hex, memory_digest};
    let bytes = std::fs::read(&src).unwrap();
    assert_eq!(
        s["digest"].as_str().unwrap(),
        hex(&memory_digest(&bytes, 4096))
    );
}

#[test]
fn every_compression_method_and_xbzrle_on_and_off() {
    let _g = serial();
    for (method, xbzrle, full) in [
        ("lz4", "on", "lz4"),
        ("zstd", "off", "zstd"),
        ("zlib", "on", "zlib"),
        ("none", "off", "raw"),
    ] {
        let dir = TmpDir::new(&format!("codec-{method}-{xbzrle}"));
        let (s, _) = migrate(
            &dir,
            "16M",
            "random",
            &[
                "--compress",
                method,
                "--xbzrle",
                xbzrle,
                "--rate",
                "3000",
                "--warmup",
                "300ms",
            ],
        );
        assert!(
            pages(&s, full) > 0,
            "{method}: no {full} pages in {}",
            s["codec"]["by_encoding"]
        );
        for other in ["lz4", "zstd", "zlib"] {
            if other != full {
                assert_eq!(pages(&s, other), 0, "{method}: unexpected {other} pages");
            }
        }
        if xbzrle == "off" {
            assert_eq!(pages(&s, "xbzrle"), 0);
            assert_eq!(pages(&s, "xbzrle_lz4"), 0);
            assert_eq!(s["settings"]["xbzrle"], "false");
        } else {
            assert_eq!(s["settings"]["xbzrle"], "true");
        }
    }
}

#[test]
fn low_bandwidth_forces_several_rounds_and_stays_exact() {
    let _g = serial();
    let dir = TmpDir::new("bandwidth");
    let (s, _) = migrate(
        &dir,
        "16M",
        "random",
        &[
            "--max-bandwidth",
            "64Mbit",
            "--downtime-limit",
            "100ms",
            "--rate",
            "1000",
            "--warmup",
            "200ms",
            "--compress",
            "none",
            "--xbzrle",
            "off",
        ],
    );
    let rounds = s["rounds"].as_u64().unwrap();
    assert!(rounds >= 3, "only {rounds} rounds: {}", s["per_round"]);
    assert_eq!(s["converged"], true);
    // Not forced: the policy says why the pause that fit was taken.
    let reason = s["switchover_reason"].as_str().unwrap_or_default();
    assert!(
        ["target-reached", "stopped-shrinking", "throttled-fits"].contains(&reason),
        "switchover_reason {reason:?}"
    );
}

#[test]
fn hash_tracking_migrates_a_guest_vmstream_did_not_start() {
    let _g = serial();
    let dir = TmpDir::new("hash");
    let (src, dst) = (dir.path("ext.img"), dir.path("dst.img"));
    let mut guest = start_external_guest(&src, &[]);
    let tx0 = read_tx_count(&src);
    wait_tx_above(&src, tx0);
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let sj = dir.path("send.json");
    let mut send = send_external_guest(&src, &guest, port, &["--stats-json", sj.to_str().unwrap()]);
    assert_eq!(
        send.wait_line("guest pid="),
        format!(
            "guest pid={} path={} tracking=hash",
            guest.pid(),
            src.display()
        )
    );
    let (s_status, _) = send.wait_exit();
    assert!(s_status.success(), "send failed: {}", send.stderr());
    let (r_status, _) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    // The sender ended the external guest at the switchover.
    let (g_status, _) = guest.wait_exit();
    assert!(
        !g_status.success(),
        "the external guest should have been killed"
    );
    assert!(files_identical(&src, &dst));
    assert!(read_tx_count(&dst) > tx0);
    // The hash tracker must see every page sent: this thread copies them, not the workers.
    assert_eq!(read_stats(&sj)["settings"]["page_copies"], "sending thread");
}

#[test]
fn qemu_auto_converge_throttles_a_guest_that_outruns_the_link() {
    let _g = serial();
    let dir = TmpDir::new("autoconverge");
    let (s, _) = migrate(
        &dir,
        "8M",
        "random",
        &[
            "--converge",
            "qemu",
            "--max-bandwidth",
            "16M",
            "--rate",
            "0",
            "--warmup",
            "200ms",
            "--compress",
            "none",
            "--xbzrle",
            "off",
            "--timeout",
            "3s",
            "--on-timeout",
            "force",
        ],
    );
    assert_eq!(s["settings"]["converge"], "qemu");
    let throttles: Vec<f64> = s["per_round"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["throttle"].as_f64().unwrap())
        .collect();
    assert!(
        throttles.iter().any(|&t| t > 0.0),
        "the guest was never throttled: {throttles:?}"
    );
}

/// `recv --resume` without `--run-for` runs the guest until stopped: SIGTERM ends it
/// cleanly, the receiver verifies the image after the run and exits 0.
#[test]
fn resumed_guest_runs_until_sigterm_and_exits_healthy() {
    let _g = serial();
    let dir = TmpDir::new("until-stopped");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap(), "--resume"]);
    let to = format!("127.0.0.1:{port}");
    let mut send = Proc::vmstream(
        "send",
        &[
            "send",
            "--memory-file",
            src.to_str().unwrap(),
            "--size",
            "16M",
            "--workload",
            "dbsim",
            "--rate",
            "2000",
            "--warmup",
            "200ms",
            "--to",
            &to,
            "--no-progress",
        ],
        &[],
    );
    let _guest = KillPid(guest_pid(&mut send));
    let (s_status, _) = send.wait_exit();
    assert!(s_status.success(), "send failed: {}", send.stderr());
    recv.wait_line("ready ");
    let tx0 = read_tx_count(&dst);
    assert!(
        wait_tx_above(&dst, tx0) > tx0,
        "the resumed guest does not run"
    );
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &recv.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (r_status, lines) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    assert!(
        lines.iter().any(|l| l.starts_with("verify ok")),
        "no verify line in {lines:?}"
    );
}
