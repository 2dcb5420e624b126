//! A 2-vCPU KVM guest runs the dbsim workload: both counters grow, progress
//! exits arrive, and the paused guest passes verification.

use std::time::{Duration, Instant};

use vmstream::guest::kvm::{
    kvm_available, GuestRam, KvmGuest, KvmGuestConfig, KvmWorkloadKind, WorkloadConfig,
};

fn skip() -> bool {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: {why}");
        return true;
    }
    false
}

/// Waits (bounded) until every vCPU's counter passed `min`.
fn wait_for_counts(guest: &KvmGuest, min: u64) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = guest.transactions().unwrap();
        if t.iter().all(|&c| c >= min) || Instant::now() > deadline {
            return t;
        }
        assert!(guest.failures().is_empty(), "{:?}", guest.failures());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn two_vcpu_dbsim_guest_makes_progress_and_verifies() {
    if skip() {
        return;
    }
    let ram = GuestRam::memfd(64 << 20).unwrap();
    let cfg = KvmGuestConfig {
        vcpus: 2,
        workload: WorkloadConfig {
            report_shift: 12,
            ..WorkloadConfig::default()
        },
        ..KvmGuestConfig::default()
    };
    let mut guest = KvmGuest::start(ram, &cfg).unwrap();
    let first = wait_for_counts(&guest, 10_000);
    let second = wait_for_counts(&guest, first.iter().max().unwrap() + 10_000);
    for v in 0..2 {
        assert!(
            second[v] > first[v],
            "vCPU {v} stalled: {first:?} -> {second:?}"
        );
    }
    assert!(guest.progress_reports().iter().all(|&r| r > 0));
    let state = guest.pause().unwrap();
    assert_eq!(state.vcpus.len(), 2);
    let at_pause = guest.transactions().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(guest.transactions().unwrap(), at_pause, "paused guest ran");
    let report = guest.verify().unwrap();
    // Every committed transaction is in the ledger; a vCPU paused between
    // its ledger and counter updates may be one ahead.
    let committed: u64 = at_pause.iter().sum();
    assert!(
        report.versions >= committed && report.versions <= committed + report.inflight,
        "{report:?} vs {committed}"
    );
    assert!(report.written_blocks > 0);
    guest.resume().unwrap();
    wait_for_counts(&guest, at_pause.iter().max().unwrap() + 1000);
    assert!(guest.failures().is_empty(), "{:?}", guest.failures());
}

#[test]
fn every_workload_kind_runs() {
    if skip() {
        return;
    }
    for kind in [
        KvmWorkloadKind::Random,
        KvmWorkloadKind::Hotset,
        KvmWorkloadKind::Idle,
    ] {
        let ram = GuestRam::memfd(16 << 20).unwrap();
        let cfg = KvmGuestConfig {
            vcpus: 2,
            workload: WorkloadConfig {
                kind,
                ..WorkloadConfig::default()
            },
            ..KvmGuestConfig::default()
        };
        let guest = KvmGuest::start(ram, &cfg).unwrap();
        let counts = wait_for_counts(&guest, 10);
        assert!(counts.iter().all(|&c| c >= 10), "{kind:?}: {counts:?}");
        guest.verify().unwrap();
    }
}

#[test]
fn repeated_pause_resume_keeps_the_guest_consistent() {
    if skip() {
        return;
    }
    let cfg = KvmGuestConfig {
        workload: WorkloadConfig {
            report_shift: 8,
            ..WorkloadConfig::default()
        },
        ..KvmGuestConfig::default()
    };
    let mut guest = KvmGuest::start(GuestRam::memfd(16 << 20).unwrap(), &cfg).unwrap();
    let mut last = vec![0, 0];
    for round in 0..20 {
        last = wait_for_counts(&guest, last.iter().max().unwrap() + 1000);
        let state = guest.pause().unwrap();
        // rip stays inside the guest program.
        for v in &state.vcpus {
            assert!(
                (0x100000..0x120000).contains(&v.regs.rip),
                "round {round}: rip {:#x}",
                v.regs.rip
            );
        }
        guest.verify().unwrap();
        guest.resume().unwrap();
    }
    assert!(matches!(
        guest.resume(),
        Err(vmstream::guest::kvm::KvmError::NotPaused)
    ));
}

#[test]
fn touch_guest_can_be_paused_while_polling() {
    if skip() {
        return;
    }
    let cfg = KvmGuestConfig {
        workload: WorkloadConfig {
            kind: KvmWorkloadKind::Touch,
            ..WorkloadConfig::default()
        },
        ..KvmGuestConfig::default()
    };
    let mut guest = KvmGuest::start(GuestRam::memfd(16 << 20).unwrap(), &cfg).unwrap();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(3));
        guest.pause().unwrap();
        guest.resume().unwrap();
    }
    guest.touch(1, &[1000, 1001]).unwrap();
    assert!(guest.wait_touch_batches(1, 1, Duration::from_secs(10)));
    assert_eq!(guest.ram().read_u64(1000 * 4096).unwrap(), 1);
    assert_eq!(guest.ram().read_u64(1001 * 4096).unwrap(), 2);
    assert!(
        guest.touch(0, &[0]).is_err(),
        "page 0 is the batch terminator"
    );
    assert!(guest.touch(0, &[1 << 40]).is_err(), "beyond RAM");
    assert!(guest.touch(9, &[5]).is_err(), "no such vCPU");
}

#[test]
fn invalid_configurations_are_refused() {
    use vmstream::guest::kvm::{DirtyLogMode, KvmError};
    assert!(matches!(GuestRam::memfd(3 << 20), Err(KvmError::Config(_))));
    assert!(matches!(GuestRam::memfd(0), Err(KvmError::Config(_))));
    if skip() {
        return;
    }
    let ram = || GuestRam::memfd(8 << 20).unwrap();
    let zero = KvmGuestConfig {
        vcpus: 0,
        ..KvmGuestConfig::default()
    };
    assert!(matches!(
        KvmGuest::start(ram(), &zero),
        Err(KvmError::Config(_))
    ));
    let small_ring = KvmGuestConfig {
        dirty_log: Some(DirtyLogMode::Ring),
        ring_entries: 1024,
        ..KvmGuestConfig::default()
    };
    assert!(matches!(
        KvmGuest::start(ram(), &small_ring),
        Err(KvmError::Config(_))
    ));
    let no_rows = KvmGuestConfig {
        workload: WorkloadConfig {
            rows_per_tx: 0,
            ..WorkloadConfig::default()
        },
        ..KvmGuestConfig::default()
    };
    assert!(matches!(
        KvmGuest::start(ram(), &no_rows),
        Err(KvmError::Config(_))
    ));
    let no_log = KvmGuest::start(ram(), &KvmGuestConfig::default()).unwrap();
    assert!(no_log.dirty_log().is_err());
}
