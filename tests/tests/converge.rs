//! Convergence strategies end to end: a small guest that dirties all of its memory faster
//! than the link carries it cannot converge on its own; `--converge qemu` and
//! `--converge direct-staged` throttle it until the switchover fits the downtime limit. The
//! switchover is verified (digests, the source memory at the pause is what the destination
//! committed, the workload's verify passes on the destination and it keeps running there),
//! and the guest-impact timeline of the statistics is complete and plots.

use std::path::Path;

use vmstream_tests::*;

/// Per-round throttles of a send statistics file.
fn throttles(s: &serde_json::Value) -> Vec<f64> {
    s["per_round"]
        .as_array()
        .expect("per_round")
        .iter()
        .map(|r| r["throttle"].as_f64().unwrap())
        .collect()
}

/// The guest and link of these tests: 32 MiB of `random` writes at full speed, sent
/// uncompressed over an 80 MiB/s link (all of memory takes 400 ms, above the 300 ms
/// downtime limit).
const FLAT_OUT_GUEST: [&str; 14] = [
    "--size",
    "32M",
    "--workload",
    "random",
    "--rate",
    "0",
    "--warmup",
    "200ms",
    "--compress",
    "none",
    "--xbzrle",
    "off",
    "--max-bandwidth",
    "80M",
];

/// Migrates a 32 MiB `random` guest running flat out over an 80 MiB/s link with
/// `strategy` and resumes it on the destination for 1 s. All of its memory is dirty after
/// every round, and all of it takes 400 ms on that link, above the 300 ms downtime limit:
/// only throttling gets it across. Returns the send statistics and the directory.
fn throttled_migration(name: &str, strategy: &[&str]) -> (serde_json::Value, TmpDir) {
    let dir = TmpDir::new(name);
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (sj, rj) = (dir.path("send.json"), dir.path("recv.json"));
    let (mut recv, port) = start_resuming_receiver(&dst, "1s", &rj);
    let to = format!("127.0.0.1:{port}");
    let mut args = vec!["send", "--memory-file", src.to_str().unwrap()];
    args.extend_from_slice(&FLAT_OUT_GUEST);
    args.extend_from_slice(&[
        // A strategy that fails to converge ends the test as a cancel, not a hang.
        "--timeout",
        "30s",
        "--on-timeout",
        "cancel",
        "--no-progress",
        "--stats-json",
        sj.to_str().unwrap(),
        "--to",
        &to,
    ]);
    args.extend_from_slice(strategy);
    let mut send = Proc::vmstream("send", &args, &[]);
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert!(status.success(), "send failed: {}", send.stderr());
    let (r_status, lines) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    let (s, r) = (read_stats(&sj), read_stats(&rj));
    assert_eq!(s["outcome"], "committed");
    assert_eq!(s["converged"], true, "forced, not converged");
    assert_eq!(s["digest"], r["digest"], "digests differ");
    // The source memory at the pause (its guest ended there) is exactly what the
    // destination committed: the same BLAKE3 as the destination's before its resume.
    let at_pause = std::fs::read(&src).unwrap();
    let hex = vmstream::migration::digest::hex(&vmstream::migration::digest::memory_digest(
        &at_pause, 4096,
    ));
    assert_eq!(
        s["digest"],
        hex.as_str(),
        "source image differs from the commit"
    );
    // The destination verified the image, resumed from the pause and kept running.
    let tx_at_pause = vmstream::guest::file::verify::verify_file(&src)
        .expect("the source image at the pause verifies")
        .tx_count;
    let ready = line_starting(&lines, "ready ");
    assert_eq!(
        field(ready, "tx="),
        tx_at_pause,
        "resumed from another state"
    );
    let verified = line_starting(&lines, "verify ok");
    assert!(field(verified, "tx=") > tx_at_pause, "{verified}");
    // Throttling, not luck, made it fit.
    let th = throttles(&s);
    assert!(th.iter().any(|&t| t >= 0.5), "never throttled: {th:?}");
    (s, dir)
}

/// The timeline of a throttled migration with a resumed destination.
fn check_timeline(s: &serde_json::Value, dir: &TmpDir, json: &Path) {
    let t = &s["timeline"];
    let samples = t["samples"].as_array().expect("timeline samples");
    let pause = t["pause_ms"].as_f64().expect("pause_ms");
    let resume = t["resume_ms"].as_f64().expect("resume_ms");
    let downtime = s["downtime_ms"].as_f64().unwrap();
    assert!(
        (resume - pause - downtime).abs() < 1.0,
        "{pause} {resume} {downtime}"
    );
    let rounds = t["rounds"].as_array().unwrap();
    assert_eq!(rounds.len() as u64, s["rounds"].as_u64().unwrap());
    assert!(rounds.last().unwrap()["paused"].as_bool().unwrap());
    assert!(rounds.iter().all(|r| r["sent_bytes"].as_u64().unwrap() > 0));
    assert!(rounds[0]["dirty_bytes"].as_u64().unwrap() > 16 << 20);
    let starts: Vec<f64> = rounds
        .iter()
        .map(|r| r["start_ms"].as_f64().unwrap())
        .collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "{starts:?}");
    // 100 ms samples: the running source, then the throttled source, then the destination.
    let at = |s: &serde_json::Value, k: &str| s[k].as_f64().unwrap();
    let before: Vec<&serde_json::Value> =
        samples.iter().filter(|x| at(x, "t_ms") < pause).collect();
    let after: Vec<&serde_json::Value> =
        samples.iter().filter(|x| at(x, "t_ms") > resume).collect();
    assert!(
        before.len() >= 5,
        "{} samples before the pause",
        before.len()
    );
    assert!(before.iter().any(|x| at(x, "tps") > 0.0));
    assert!(
        before.iter().any(|x| at(x, "throttle") >= 0.5),
        "no throttled sample"
    );
    assert!(after.len() >= 5, "{} destination samples", after.len());
    assert!(after.iter().all(|x| at(x, "throttle") == 0.0));
    assert!(after.iter().filter(|x| at(x, "tps") > 0.0).count() >= 3);
    assert!(s["tps"]["after"].as_f64().unwrap() > 0.0);
    // `vmstream plot` draws it.
    let svg = dir.path("timeline.svg");
    let mut plot = Proc::vmstream(
        "plot",
        &["plot", json.to_str().unwrap(), "-o", svg.to_str().unwrap()],
        &[],
    );
    let (status, _) = plot.wait_exit();
    assert!(status.success(), "plot failed: {}", plot.stderr());
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "not an SVG");
    for label in ["downtime", "guest TPS", "throttle (%)", "sent in round"] {
        assert!(text.contains(label), "no {label:?} in the plot");
    }
}

#[test]
fn qemu_auto_converge_gets_a_non_converging_guest_across() {
    let _g = serial();
    let (s, dir) = throttled_migration(
        "qemu",
        &[
            "--converge",
            "qemu",
            // Two steps (90%, 99%) instead of the default ladder's nine keep this short.
            "--cpu-throttle-initial",
            "90",
            "--cpu-throttle-increment",
            "9",
        ],
    );
    assert_eq!(s["settings"]["converge"], "qemu");
    let sj = dir.path("send.json");
    check_timeline(&s, &dir, &sj);
}

#[test]
fn direct_staged_gets_a_non_converging_guest_across() {
    let _g = serial();
    let (s, dir) = throttled_migration("direct-staged", &["--converge", "direct-staged"]);
    assert_eq!(s["settings"]["converge"], "direct-staged");
    // Its first step is direct throttling at 90%.
    let th = throttles(&s);
    assert!(th.contains(&0.9), "{th:?}");
    let notes = s["timeline"]["notes"].as_array().unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n["text"].as_str().unwrap().contains("direct throttling")),
        "{notes:?}"
    );
    let sj = dir.path("send.json");
    check_timeline(&s, &dir, &sj);
}

#[test]
fn without_throttling_the_same_guest_does_not_converge() {
    let _g = serial();
    let dir = TmpDir::new("none");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let to = format!("127.0.0.1:{port}");
    let mut args = vec!["send", "--memory-file", src.to_str().unwrap()];
    args.extend_from_slice(&FLAT_OUT_GUEST);
    args.extend_from_slice(&[
        "--timeout",
        "3s",
        "--on-timeout",
        "cancel",
        "--converge",
        "none",
        "--no-progress",
        "--to",
        &to,
    ]);
    let mut send = Proc::vmstream("send", &args, &[]);
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(3), "not cancelled: {}", send.stderr());
    let (r_status, _) = recv.wait_exit();
    assert_eq!(r_status.code(), Some(1));
    assert!(!dst.exists());
}

/// With `--defer-hot`, rounds hold back the hottest segments' pages, the migration still
/// ends exact (checked by `throttled_migration`), and the stats report what deferral saved.
#[test]
fn hot_page_deferral_defers_pages_and_reports_the_saving() {
    let _g = serial();
    let (s, _dir) = throttled_migration(
        "defer-hot",
        &[
            "--converge",
            "direct-staged",
            "--defer-hot",
            "30",
            "--defer-segment",
            "1M",
        ],
    );
    let deferred: u64 = s["per_round"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["deferred_pages"].as_u64().unwrap_or(0))
        .sum();
    assert!(deferred > 0, "no round deferred a page");
    let saved: u64 = s["settings"]["defer_hot_saved_bytes"]
        .as_str()
        .expect("defer_hot_saved_bytes")
        .parse()
        .unwrap();
    assert_eq!(saved % 4096, 0, "saved bytes are whole pages: {saved}");
}
