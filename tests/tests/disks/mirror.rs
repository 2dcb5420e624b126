//! Write-through disk mirroring (`send --disk-mode mirror`, issue 20): a started guest's
//! disks, mirrored after their bulk copy, reach a verified commit (digests, each disk equal
//! to the source's at the pause, the guest's verify; a resumed guest runs on them); a
//! receiver killed while mirroring leaves the source guest running and writing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmstream::disk::bitmap::{bitmap_path, DirtyBitmap};
use vmstream_tests::*;

use super::{disk_args, guest_verify};

/// A sender of a guest it starts on `dir`'s src.img (4 MiB) with two 8 MiB disks
/// (src-d0.img, src-d1.img) that `workload` writes through the block layer, mirrored
/// (`--disk-mode mirror`), to `port`, at `bandwidth`, stats in send.json.
fn mirror_sender(
    dir: &TmpDir,
    port: u16,
    workload: &[&str],
    bandwidth: &str,
) -> (Proc, Vec<PathBuf>) {
    let disks = vec![dir.path("src-d0.img"), dir.path("src-d1.img")];
    let to = format!("127.0.0.1:{port}");
    let (mem, stats) = (dir.path("src.img"), dir.path("send.json"));
    let mut args: Vec<String> = [
        "send",
        "--memory-file",
        mem.to_str().unwrap(),
        "--size",
        "4M",
        "--disk-size",
        "8M",
        "--warmup",
        "300ms",
        "--no-progress",
        "--to",
        &to,
        "--io-timeout",
        "10s",
        "--stats-json",
        stats.to_str().unwrap(),
        "--max-bandwidth",
        bandwidth,
        "--disk-mode",
        "mirror",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(workload.iter().map(|s| s.to_string()));
    args.extend(disk_args(&disks));
    let send = Proc::vmstream(
        "send",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    );
    (send, disks)
}

/// A receiver into `dir`'s dst.img and `disks`, stats in recv.json, and `extra`.
fn receiver(dir: &TmpDir, disks: &[PathBuf], extra: &[&str]) -> (Proc, u16) {
    let mut args = vec![
        "--memory-file".to_string(),
        dir.path("dst.img").to_str().unwrap().to_string(),
        "--stats-json".into(),
        dir.path("recv.json").to_str().unwrap().to_string(),
        "--io-timeout".into(),
        "10s".into(),
    ];
    args.extend(disk_args(disks));
    args.extend(extra.iter().map(|s| s.to_string()));
    start_receiver(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The statistics of a committed mirrored migration: equal digests on both sides, and
/// guest writes that returned only once the destination had them, none of which gave up.
fn assert_mirrored_stats(dir: &TmpDir) {
    let (sent, received) = (
        read_stats(&dir.path("send.json")),
        read_stats(&dir.path("recv.json")),
    );
    assert_eq!(sent["digest"], received["digest"]);
    let (sd, rd) = (
        sent["disks"].as_array().unwrap(),
        received["disks"].as_array().unwrap(),
    );
    assert_eq!((sd.len(), rd.len()), (2, 2));
    let mut mirrored = 0;
    for (s, r) in sd.iter().zip(rd) {
        assert_eq!(s["digest"], r["digest"]);
        assert_eq!(s["committed"], true);
        assert_eq!(s["mirror_fallbacks"], 0, "{s}");
        assert!(s["write_latency_p50_us"].as_f64().is_some(), "{s}");
        mirrored += s["mirrored_writes"]
            .as_u64()
            .unwrap_or_else(|| panic!("{s}"));
    }
    assert!(mirrored > 0, "no write was mirrored: {sd:?}");
    let p99 = sd
        .iter()
        .filter_map(|s| s["mirrored_write_latency_p99_us"].as_f64())
        .fold(0.0, f64::max);
    assert!(p99 > 0.0, "{sd:?}");
}

#[test]
fn a_mirrored_diskio_guest_commits_its_disks_equal_to_the_source_at_the_pause() {
    let _g = serial();
    let dir = TmpDir::new("disk-mirror-diskio");
    let targets = vec![dir.path("dst-d0.img"), dir.path("dst-d1.img")];
    let (mut recv, port) = receiver(&dir, &targets, &[]);
    let workload = [
        "--workload",
        "diskio",
        "--io-size",
        "16K",
        "--io-rate",
        "4M",
    ];
    let (mut send, disks) = mirror_sender(&dir, port, &workload, "8M");
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(0), "send: {}", send.stderr());
    let (status, _) = recv.wait_exit();
    assert_eq!(status.code(), Some(0), "recv: {}", recv.stderr());
    assert!(recv.stderr().contains("disk mirror: "), "{}", recv.stderr());
    for (src, dst) in disks.iter().zip(&targets) {
        assert!(files_identical(src, dst), "{} differs", dst.display());
    }
    let lines = guest_verify(&dir.path("dst.img"), &targets).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        lines.iter().any(|l| l.starts_with("ok disks=2")),
        "{lines:?}"
    );
    assert_mirrored_stats(&dir);
}

#[test]
fn a_mirrored_dbsim_guest_resumes_on_its_migrated_memory_and_disks_and_verifies_both() {
    let _g = serial();
    let dir = TmpDir::new("disk-mirror-dbsim");
    let targets = vec![dir.path("dst-d0.img"), dir.path("dst-d1.img")];
    let (mut recv, port) = receiver(&dir, &targets, &["--resume", "--run-for", "1500ms"]);
    let workload = ["--workload", "dbsim", "--rate", "3000", "--io-rate", "1M"];
    let (mut send, _) = mirror_sender(&dir, port, &workload, "8M");
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(0), "send: {}", send.stderr());
    let (status, lines) = recv.wait_exit();
    assert_eq!(status.code(), Some(0), "recv: {}", recv.stderr());
    let verify = line_starting(&lines, "verify ok");
    assert!(
        field(verify, "tx=") > field(verify, "resumed_from="),
        "{verify}"
    );
    assert_eq!(field(verify, "disks="), 2, "{verify}");
    assert!(field(verify, "disk_writes=") > 0, "{verify}");
    let after = guest_verify(&dir.path("dst.img"), &targets).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        after.iter().any(|l| l.starts_with("ok disks=2")),
        "{after:?}"
    );
    assert_mirrored_stats(&dir);
}

/// The guest's writes through the block layer to `disk` so far (its bitmap's counter).
fn disk_writes(disk: &Path) -> u64 {
    DirtyBitmap::open(&bitmap_path(disk)).unwrap().writes()
}

#[test]
fn a_receiver_killed_while_mirroring_leaves_the_source_guest_writing() {
    let _g = serial();
    let dir = TmpDir::new("disk-mirror-kill");
    let targets = vec![dir.path("dst-d0.img"), dir.path("dst-d1.img")];
    let (recv, port) = receiver(&dir, &targets, &[]);
    let workload = [
        "--workload",
        "diskio",
        "--io-size",
        "64K",
        "--io-rate",
        "4M",
    ];
    // At 2 MB/s memory's 4 MiB alone take two seconds after the mirror starts.
    let (mut send, disks) = mirror_sender(&dir, port, &workload, "2M");
    let _guest = KillPid(guest_pid(&mut send));
    // The mirror's connection is the second the receiver takes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while recv.stderr().matches("connection from").count() < 2 {
        assert!(Instant::now() < deadline, "no mirror: {}", recv.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    send_signal("KILL", &recv.pid().to_string());
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "send: {}", send.stderr());
    // Mirroring is off and the guest writes on, none of its writes held.
    for d in &disks {
        let b = DirtyBitmap::open(&bitmap_path(d)).unwrap();
        assert!(!vmstream::disk::mirror::mirroring(&b), "{}", d.display());
    }
    let before: u64 = disks.iter().map(|d| disk_writes(d)).sum();
    std::thread::sleep(Duration::from_millis(1500));
    let after: u64 = disks.iter().map(|d| disk_writes(d)).sum();
    // 64 writes a second: at least half of them within 1.5 s on a busy machine.
    // (diskio leaves memory idle: its disks' counters are how it shows it runs.)
    assert!(after >= before + 48, "{before} -> {after}");
    for t in targets.iter().chain([&dir.path("dst.img")]) {
        assert!(!t.exists(), "{} was committed", t.display());
    }
}
