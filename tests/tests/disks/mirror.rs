//! Write-through disk mirroring (`send --disk-mode mirror`, issue 20): a started guest's
//! disks, mirrored after their bulk copy, reach a verified commit (digests, each disk equal
//! to the source's at the pause, the guest's verify; a resumed guest runs on them); a
//! receiver killed while mirroring leaves the source guest running and writing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmstream::disk::bitmap::{bitmap_path, DirtyBitmap};
use vmstream_tests::*;

use super::{
    committed_disk_stats, disk_receiver, resumed_dbsim_disk_guest_verifies,
    started_disk_guest_commits, started_disk_guest_sender,
};

/// A sender of a guest it starts on `dir`'s src.img (4 MiB) with two 8 MiB disks
/// (src-d0.img, src-d1.img) that `workload` writes through the block layer, mirrored
/// (`--disk-mode mirror`), to `port`, at `bandwidth`, stats in send.json.
fn mirror_sender(
    dir: &TmpDir,
    port: u16,
    workload: &[&str],
    bandwidth: &str,
) -> (Proc, Vec<PathBuf>) {
    started_disk_guest_sender(
        dir,
        port,
        workload,
        &["--max-bandwidth", bandwidth, "--disk-mode", "mirror"],
    )
}

/// The statistics of a committed mirrored migration: equal digests on both sides, and
/// guest writes that returned only once the destination had them, none of which gave up.
pub(super) fn assert_mirrored_stats(dir: &TmpDir) {
    let sd = committed_disk_stats(dir);
    let mut mirrored = 0;
    for s in &sd {
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
    let workload = [
        "--workload",
        "diskio",
        "--io-size",
        "16K",
        "--io-rate",
        "4M",
    ];
    let (dir, recv_stderr) = started_disk_guest_commits(
        "disk-mirror-diskio",
        &workload,
        &["--disk-mode", "mirror"],
        false,
    );
    assert!(recv_stderr.contains("disk mirror: "), "{recv_stderr}");
    assert_mirrored_stats(&dir);
}

#[test]
fn a_mirrored_dbsim_guest_resumes_on_its_migrated_memory_and_disks_and_verifies_both() {
    let _g = serial();
    let dir = resumed_dbsim_disk_guest_verifies("disk-mirror-dbsim", &["--disk-mode", "mirror"]);
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
    let (recv, port) = disk_receiver(&dir, &targets, &[]);
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
