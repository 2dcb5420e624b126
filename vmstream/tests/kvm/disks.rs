//! The KVM guest's disks: the diskio workload writes stamped blocks through the VMM's
//! paravirtual block device (and so through the block layer, which marks the dirty bitmap
//! the sender reads); its disks verify against the ledgers in guest RAM (and their
//! checkpoints) at every pause and after a restore on copies of RAM and disks; a block request that fails stops the guest
//! where its verify and its failures say so.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmstream::disk::bitmap::{bitmap_path, DirtyBitmap};
use vmstream::guest::file::disks::area::{da, DiskWorkloadKind};
use vmstream::guest::file::disks::{DiskParams, GuestDisks};
use vmstream::guest::kvm::abi::BLK_STATUS_BAD_RANGE;
use vmstream::guest::kvm::{
    kvm_available, GuestRam, KvmError, KvmGuest, KvmGuestConfig, KvmWorkloadKind, RestoreConfig,
    WorkloadConfig,
};

fn tmp(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("vmstream-kvm-disks-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A 2-vCPU diskio guest on 16 MiB of RAM with 8 MiB disks at `paths` (created), 8 KiB
/// writes as fast as the disks take them.
fn start(paths: &[PathBuf]) -> KvmGuest {
    let cfg = KvmGuestConfig {
        vcpus: 2,
        workload: WorkloadConfig {
            kind: KvmWorkloadKind::Diskio,
            report_shift: 6,
            ..WorkloadConfig::default()
        },
        disks: GuestDisks {
            paths: paths.to_vec(),
            create_size: Some(8 << 20),
            granularity: Some(64 << 10),
            workload: Some(DiskParams {
                kind: DiskWorkloadKind::Diskio,
                io_size: 8192,
                io_rate: 0,
                seed: 3,
            }),
        },
        ..KvmGuestConfig::default()
    };
    KvmGuest::start(GuestRam::memfd(16 << 20).unwrap(), &cfg).unwrap()
}

/// Waits (bounded) until vCPU 0, the writer, committed more than `than` disk writes.
fn wait_writes(guest: &KvmGuest, than: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = guest.transactions().unwrap()[0];
        assert!(guest.failures().is_empty(), "{:?}", guest.failures());
        if t > than {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "the diskio guest is stuck at {t}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
}

#[test]
fn diskio_disks_verify_at_every_pause_and_after_a_restore_on_copies() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = tmp("pauses");
    let paths = vec![dir.join("d0.img"), dir.join("d1.img")];
    let mut guest = start(&paths);
    let mut seen = 0;
    for _ in 0..5 {
        seen = wait_writes(&guest, seen + 200);
        guest.pause().unwrap();
        let report = guest.verify_disks().unwrap().expect("the guest has disks");
        assert_eq!(report.disks, 2);
        assert!(report.writes >= 200, "{report:?}");
        assert!(report.written_blocks > 0 && report.written_blocks <= report.writes);
        guest.verify().unwrap();
        guest.resume().unwrap();
    }
    // The writes went through the block layer: its bitmaps counted and marked them.
    for p in &paths {
        let b = DirtyBitmap::open(&bitmap_path(p)).unwrap();
        assert!(b.writes() > 0, "{}", p.display());
        assert!(!b.take_all().is_empty(), "{}", p.display());
    }
    let state = guest.pause().unwrap();
    let written = guest.verify_disks().unwrap().unwrap().writes;
    let ram = guest.ram().copy_to_memfd().unwrap();
    let copies = vec![dir.join("c0.img"), dir.join("c1.img")];
    for (p, c) in paths.iter().zip(&copies) {
        copy(p, c);
    }
    guest.shutdown();
    // A restore needs exactly the guest's disks.
    let one = RestoreConfig {
        disks: copies[..1].to_vec(),
        ..RestoreConfig::default()
    };
    let refused = KvmGuest::restore(ram.copy_to_memfd().unwrap(), &state, &one).unwrap_err();
    assert!(matches!(refused, KvmError::Disks(_)), "{refused}");
    let cfg = RestoreConfig {
        disks: copies.clone(),
        ..RestoreConfig::default()
    };
    let mut restored = KvmGuest::restore(ram, &state, &cfg).unwrap();
    wait_writes(&restored, seen + 300);
    restored.pause().unwrap();
    let after = restored.verify_disks().unwrap().unwrap();
    assert!(after.writes > written, "{written} -> {}", after.writes);
    // A checkpoint every 256 writes: each disk's ledger on disk too, checked against RAM's.
    assert_eq!(after.checkpoints, after.writes / 256, "{after:?}");
    restored.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_block_request_stops_the_guest_and_its_verify_names_it() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = tmp("failed");
    let paths = vec![dir.join("d0.img")];
    let guest = start(&paths);
    wait_writes(&guest, 10);
    // The guest's own idea of its disk becomes far larger than the disk: it soon asks
    // for a block past the end, which the device refuses.
    let area = guest.params().disk_area_gpa;
    let blocks = guest.ram().read_u64(area + da::DISK_BLOCKS as u64).unwrap();
    guest
        .ram()
        .write_u64(area + da::DISK_BLOCKS as u64, blocks * 1000)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while guest.failures().is_empty() {
        assert!(Instant::now() < deadline, "the guest never failed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let failures = guest.failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].0, 0, "{failures:?}");
    assert!(
        failures[0].1.contains("guest panic, code 2"),
        "{failures:?}"
    );
    match guest.verify_disks() {
        Err(KvmError::BlockRequestFailed { vcpu: 0, status }) => {
            assert_eq!(status, BLK_STATUS_BAD_RANGE)
        }
        other => panic!("{other:?}"),
    }
    // Nothing was written past the disk's end.
    assert_eq!(std::fs::metadata(&paths[0]).unwrap().len(), 8 << 20);
    guest.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
