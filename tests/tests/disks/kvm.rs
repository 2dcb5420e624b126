//! A KVM guest's disks (`send --kvm --workload diskio --disk ...`, issue 20): its guest
//! program writes stamped blocks through the VMM's paravirtual block device, whose writes
//! go through the block layer and mark the bitmap the sender tracks. The disks migrate with
//! memory to a verified commit (digests, each disk equal to the source's at the pause, the
//! destination's `kvm verify` of memory and disks), a damaged disk block on the destination
//! is caught by that verify, a resumed guest runs on and verifies both, and mirroring and
//! disk write QoS work for it as for process guests.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmstream::migration::digest::{hex, memory_digest};
use vmstream_tests::*;

use super::mirror::assert_mirrored_stats;
use super::{assert_builtin_disk_stats, disk_args, disk_receiver, verify_with};

/// `vmstream kvm verify` of `memory` and `disks`: its stdout lines, or its stderr.
fn kvm_verify(memory: &Path, disks: &[PathBuf]) -> Result<Vec<String>, String> {
    verify_with("kvm", memory, disks)
}

/// 16 KiB writes at 4 MB/s over a 16 MB/s link.
const GENTLE: Flow = Flow {
    io_size: "16K",
    io_rate: "4M",
    link: "16M",
};

/// How fast the guest writes its disks and how fast the link is.
struct Flow {
    io_size: &'static str,
    io_rate: &'static str,
    link: &'static str,
}

/// Sends a 64 MiB KVM diskio guest with two 64 MiB disks (src-d0.img, src-d1.img, created;
/// writes and link as `flow` says) from `dir` to a receiver into dst.img, dst-d0.img and
/// dst-d1.img with `recv_extra`, with `send_extra`; both must succeed. Returns the source
/// disks, the destination disks and the receiver's stdout.
fn kvm_disks_migrate(
    dir: &TmpDir,
    flow: &Flow,
    recv_extra: &[&str],
    send_extra: &[&str],
) -> (Vec<PathBuf>, Vec<PathBuf>, Vec<String>) {
    let disks = vec![dir.path("src-d0.img"), dir.path("src-d1.img")];
    let targets = vec![dir.path("dst-d0.img"), dir.path("dst-d1.img")];
    let (mut recv, port) = disk_receiver(dir, &targets, recv_extra);
    let stats = dir.path("send.json");
    let mut extra: Vec<&str> = vec![
        "--workload",
        "diskio",
        "--disk-size",
        "64M",
        "--io-size",
        flow.io_size,
        "--io-rate",
        flow.io_rate,
        "--max-bandwidth",
        flow.link,
        "--warmup",
        "500ms",
        "--io-timeout",
        "10s",
        "--stats-json",
        stats.to_str().unwrap(),
    ];
    let disk_flags = disk_args(&disks);
    extra.extend(disk_flags.iter().map(String::as_str));
    extra.extend_from_slice(send_extra);
    // The send process runs the VM: its exit after the commit means the source VM is gone.
    let mut send = kvm_sender(&dir.path("src.img"), "64M", port, &extra, &[]);
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(0), "send: {}", send.stderr());
    let (status, lines) = recv.wait_exit();
    assert_eq!(status.code(), Some(0), "recv: {}", recv.stderr());
    (disks, targets, lines)
}

/// Each destination disk equals the source's at the pause (the VM ended there), and the
/// memory digest both sides agreed on is the source RAM's at the pause.
fn assert_equal_at_the_pause(dir: &TmpDir, disks: &[PathBuf], targets: &[PathBuf]) {
    for (src, dst) in disks.iter().zip(targets) {
        assert!(
            files_identical(src, dst),
            "{} differs from {}",
            dst.display(),
            src.display()
        );
    }
    let sent = read_stats(&dir.path("send.json"));
    let at_pause = std::fs::read(dir.path("src.img")).unwrap();
    assert_eq!(
        sent["digest"].as_str().unwrap(),
        hex(&memory_digest(&at_pause, 4096))
    );
}

/// The first block of `disk` holding data: its offset (blocks of 16 KiB).
fn first_written_block(disk: &Path) -> u64 {
    let f = std::fs::File::open(disk).unwrap();
    let mut head = [0u8; 64];
    (0..(64 << 20) / 16384)
        .map(|b| b * 16384)
        .find(|&at| {
            f.read_exact_at(&mut head, at).unwrap();
            head.iter().any(|&x| x != 0)
        })
        .expect("the guest wrote no block")
}

#[test]
fn a_kvm_guests_disks_migrate_through_its_block_device_and_a_damaged_block_is_caught() {
    let _g = serial();
    if kvm_unavailable() {
        return;
    }
    let dir = TmpDir::new("disks-kvm");
    let (disks, targets, _) = kvm_disks_migrate(&dir, &GENTLE, &[], &[]);
    assert_equal_at_the_pause(&dir, &disks, &targets);
    assert_builtin_disk_stats(&dir);
    let lines = kvm_verify(&dir.path("dst.img"), &targets).unwrap_or_else(|e| panic!("{e}"));
    let ok = line_starting(&lines, "ok disks=2");
    assert!(field(ok, "writes=") > 0, "{ok}");
    // One flipped byte in a written block of the destination's first disk: torn.
    let at = first_written_block(&targets[0]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&targets[0])
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, at + 5000).unwrap();
    f.write_all_at(&[byte[0] ^ 0x10], at + 5000).unwrap();
    let err = kvm_verify(&dir.path("dst.img"), &targets).unwrap_err();
    assert!(
        err.contains(&format!("disk 0 block {}: torn", at / 16384)),
        "{err}"
    );
    // A disk missing from the verify is refused too.
    let err = kvm_verify(&dir.path("dst.img"), &targets[..1]).unwrap_err();
    assert!(err.contains("the guest has 2 disks, 1 given"), "{err}");
}

#[test]
fn a_resumed_kvm_guest_writes_its_migrated_disks_and_verifies_them() {
    let _g = serial();
    if kvm_unavailable() {
        return;
    }
    let dir = TmpDir::new("disks-kvm-resume");
    let (_, targets, lines) =
        kvm_disks_migrate(&dir, &GENTLE, &["--resume", "--run-for", "1500ms"], &[]);
    let verify = line_starting(&lines, "verify ok");
    assert!(
        field(verify, "tx=") > field(verify, "resumed_from="),
        "{verify}"
    );
    assert_eq!(field(verify, "disks="), 2, "{verify}");
    assert!(field(verify, "disk_writes=") > 0, "{verify}");
    let after = kvm_verify(&dir.path("dst.img"), &targets).unwrap_or_else(|e| panic!("{e}"));
    let ok = line_starting(&after, "ok disks=2");
    assert_eq!(field(ok, "writes="), field(verify, "disk_writes="), "{ok}");
}

#[test]
fn a_mirrored_kvm_guest_commits_its_disks_equal_to_the_source_at_the_pause() {
    let _g = serial();
    if kvm_unavailable() {
        return;
    }
    let dir = TmpDir::new("disks-kvm-mirror");
    let (disks, targets, _) = kvm_disks_migrate(&dir, &GENTLE, &[], &["--disk-mode", "mirror"]);
    assert_equal_at_the_pause(&dir, &disks, &targets);
    assert_mirrored_stats(&dir);
    kvm_verify(&dir.path("dst.img"), &targets).unwrap_or_else(|e| panic!("{e}"));
}

/// Disk write QoS reaches a KVM guest's writes too (its block device writes through the
/// block layer's limit): diskio at 16 MB/s over an 8 MB/s link commits once the sender
/// capped the guest's writes, the cap in the statistics.
#[test]
fn a_kvm_guest_writing_faster_than_the_link_converges_with_disk_write_qos() {
    let _g = serial();
    if kvm_unavailable() {
        return;
    }
    let dir = TmpDir::new("disks-kvm-qos");
    let flow = Flow {
        io_size: "64K",
        io_rate: "16M",
        link: "8M",
    };
    let (disks, targets, _) = kvm_disks_migrate(&dir, &flow, &[], &["--timeout", "60s"]);
    assert_equal_at_the_pause(&dir, &disks, &targets);
    let sent = read_stats(&dir.path("send.json"));
    for d in sent["disks"].as_array().unwrap() {
        let cap = d["write_limit_min"]
            .as_u64()
            .unwrap_or_else(|| panic!("{d}"));
        assert!(cap > 0 && cap < 16 << 20, "{d}");
        assert!(d["write_limited_ms"].as_f64().unwrap() > 0.0, "{d}");
    }
    kvm_verify(&dir.path("dst.img"), &targets).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn post_copy_of_a_kvm_guest_with_disks_is_a_usage_error() {
    let dir = TmpDir::new("disks-kvm-postcopy");
    let disk = dir.path("src-d0.img");
    let mut send = kvm_sender(
        &dir.path("src.img"),
        "64M",
        9,
        &[
            "--workload",
            "diskio",
            "--disk",
            disk.to_str().unwrap(),
            "--disk-size",
            "64M",
            "--postcopy",
            "now",
        ],
        &[],
    );
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(2), "{}", send.stderr());
    assert!(send.stderr().contains("--postcopy"), "{}", send.stderr());
    // Refused before anything started.
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());
}
