//! Pause -> save -> restore into a fresh VM on a copy of guest RAM: the guest
//! continues (counters keep growing from where they were) and verifies.
//! Damaged state blobs are refused with typed errors.

use std::time::{Duration, Instant};

use vmstream::guest::kvm::verify::KvmVerifyError;
use vmstream::guest::kvm::{
    kvm_available, GuestRam, KvmError, KvmGuest, KvmGuestConfig, RestoreConfig, StateError,
    VmState, WorkloadConfig,
};

fn skip() -> bool {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: {why}");
        return true;
    }
    false
}

fn start(mib: u64) -> KvmGuest {
    let cfg = KvmGuestConfig {
        vcpus: 2,
        workload: WorkloadConfig {
            seed: 7,
            ..WorkloadConfig::default()
        },
        ..KvmGuestConfig::default()
    };
    KvmGuest::start(GuestRam::memfd(mib << 20).unwrap(), &cfg).unwrap()
}

fn wait_each_above(guest: &KvmGuest, floor: &[u64], by: u64) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = guest.transactions().unwrap();
        if t.iter().zip(floor).all(|(c, f)| *c >= f + by) || Instant::now() > deadline {
            assert!(guest.failures().is_empty(), "{:?}", guest.failures());
            return t;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn restored_guest_continues_and_verifies() {
    if skip() {
        return;
    }
    let mut guest = start(32);
    wait_each_above(&guest, &[0, 0], 50_000);
    let state = guest.pause().unwrap();
    let at_pause = guest.transactions().unwrap();
    let blob = state.to_bytes();
    let copy = guest.ram().copy_to_memfd().unwrap();
    drop(guest);

    let parsed = VmState::from_bytes(&blob).unwrap();
    assert_eq!(parsed.to_bytes(), blob, "re-serialization is byte-exact");
    assert_eq!(parsed.vcpus.len(), 2);
    for (a, b) in parsed.vcpus.iter().zip(&state.vcpus) {
        assert_eq!(a.regs, b.regs);
        assert_eq!(a.msrs, b.msrs);
        assert_eq!(a.xsave, b.xsave);
    }

    let mut restored = KvmGuest::restore(copy, &parsed, &RestoreConfig::default()).unwrap();
    // Counters start from the saved values (RAM came along) and keep growing.
    let first = restored.transactions().unwrap();
    assert!(
        first.iter().zip(&at_pause).all(|(r, p)| r >= p),
        "{first:?} < {at_pause:?}"
    );
    wait_each_above(&restored, &at_pause, 50_000);
    restored.pause().unwrap();
    let report = restored.verify().unwrap();
    assert!(report.written_blocks > 0);
    // A second round trip of the restored guest works as well.
    let again = restored.pause();
    assert!(matches!(again, Err(KvmError::AlreadyPaused)));
    restored.resume().unwrap();
    let state2 = restored.pause().unwrap();
    let copy2 = restored.ram().copy_to_memfd().unwrap();
    let t2 = restored.transactions().unwrap();
    drop(restored);
    let third = KvmGuest::restore(copy2, &state2, &RestoreConfig::default()).unwrap();
    wait_each_above(&third, &t2, 10_000);
}

#[test]
fn restore_can_start_paused_for_verification() {
    if skip() {
        return;
    }
    let mut guest = start(16);
    wait_each_above(&guest, &[0, 0], 10_000);
    let state = guest.pause().unwrap();
    let at_pause = guest.transactions().unwrap();
    let copy = guest.ram().copy_to_memfd().unwrap();
    drop(guest);
    let cfg = RestoreConfig {
        start_paused: true,
        ..RestoreConfig::default()
    };
    let mut restored = KvmGuest::restore(copy, &state, &cfg).unwrap();
    assert!(restored.is_paused());
    restored.verify().unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(
        restored.transactions().unwrap(),
        at_pause,
        "ran while paused"
    );
    // A pause right away is refused, resume lets it run.
    assert!(matches!(restored.pause(), Err(KvmError::AlreadyPaused)));
    restored.resume().unwrap();
    wait_each_above(&restored, &at_pause, 10_000);
    let again = restored.pause().unwrap();
    assert_eq!(again.vcpus.len(), 2);
    restored.verify().unwrap();
}

#[test]
fn restore_refuses_memory_of_another_size() {
    if skip() {
        return;
    }
    let mut guest = start(16);
    let state = guest.pause().unwrap();
    let other = GuestRam::memfd(32 << 20).unwrap();
    let err = KvmGuest::restore(other, &state, &RestoreConfig::default()).unwrap_err();
    assert!(
        matches!(err, KvmError::State(StateError::MemorySizeMismatch { .. })),
        "{err}"
    );
    // Right size, but RAM without a parameter block (not this guest's memory).
    let blank = GuestRam::memfd(16 << 20).unwrap();
    let err = KvmGuest::restore(blank, &state, &RestoreConfig::default()).unwrap_err();
    assert!(matches!(err, KvmError::BadParams(_)), "{err}");
}

fn fix_crc(blob: &mut [u8]) {
    let end = blob.len() - 8;
    let crc = vmstream_simd::crc32c(&blob[..end]);
    blob[end..end + 4].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn damaged_state_blobs_are_refused() {
    if skip() {
        return;
    }
    let mut guest = start(16);
    let blob = guest.pause().unwrap().to_bytes();
    assert!(VmState::from_bytes(&blob).is_ok());

    let mut flipped = blob.clone();
    flipped[blob.len() / 2] ^= 0x40;
    assert!(matches!(
        VmState::from_bytes(&flipped),
        Err(StateError::ChecksumMismatch { .. })
    ));

    assert!(matches!(
        VmState::from_bytes(&blob[..blob.len() - 100]),
        Err(StateError::LengthMismatch { .. })
    ));
    assert_eq!(
        VmState::from_bytes(&blob[..20]).unwrap_err(),
        StateError::TooShort(20)
    );

    let mut magic = blob.clone();
    magic[0] = b'X';
    assert_eq!(
        VmState::from_bytes(&magic).unwrap_err(),
        StateError::BadMagic
    );

    let mut version = blob.clone();
    version[8] = 99;
    assert_eq!(
        VmState::from_bytes(&version).unwrap_err(),
        StateError::UnsupportedVersion(99)
    );

    // Structural damage behind a valid checksum: the first section (VM info,
    // 16 bytes) claims 24 bytes, so the regs that follow no longer line up.
    let mut resized = blob.clone();
    resized[32 + 8..32 + 16].copy_from_slice(&24u64.to_le_bytes());
    fix_crc(&mut resized);
    assert!(
        matches!(
            VmState::from_bytes(&resized),
            Err(StateError::SectionSize { .. })
        ),
        "{:?}",
        VmState::from_bytes(&resized)
    );

    // Unknown section tag behind a valid checksum.
    let mut tagged = blob.clone();
    tagged[32..36].copy_from_slice(&77u32.to_le_bytes());
    fix_crc(&mut tagged);
    assert_eq!(
        VmState::from_bytes(&tagged).unwrap_err(),
        StateError::UnknownSection(77)
    );

    // Every byte-level truncation point is refused without panicking.
    for len in (0..blob.len()).step_by(97) {
        assert!(VmState::from_bytes(&blob[..len]).is_err());
    }
}

#[test]
fn verifier_catches_corrupted_blocks() {
    if skip() {
        return;
    }
    let mut guest = start(16);
    wait_each_above(&guest, &[0, 0], 20_000);
    guest.pause().unwrap();
    guest.verify().unwrap();
    let layout = guest.params().layout;
    let ledger: Vec<u64> = (0..layout.block_count)
        .map(|b| guest.ram().read_u64(layout.ledger_gpa + b * 8).unwrap())
        .collect();
    let inflight: Vec<u64> = (0..2)
        .map(|v| guest.ram().read_u64(0x81000 + v * 64 + 8).unwrap())
        .collect();
    let block = (0..layout.block_count)
        .find(|&b| ledger[b as usize] > 0 && !inflight.contains(&(b + 1)))
        .expect("a committed block");
    let gpa = layout.block_gpa(block) + 4000;
    let old = guest.ram().read_u64(gpa).unwrap();
    guest.ram().write_u64(gpa, old ^ 1).unwrap();
    match guest.verify() {
        Err(KvmError::Verify(KvmVerifyError::Checksum { block: b, .. })) => assert_eq!(b, block),
        other => panic!("expected checksum error, got {other:?}"),
    }
    guest.ram().write_u64(gpa, old).unwrap();
    guest.verify().unwrap();
    // A ledger entry that disagrees with the block header.
    let lgpa = layout.ledger_gpa + block * 8;
    guest
        .ram()
        .write_u64(lgpa, ledger[block as usize] + 5)
        .unwrap();
    assert!(matches!(
        guest.verify(),
        Err(KvmError::Verify(KvmVerifyError::VersionMismatch { .. }))
    ));
}

/// Post-copy's premise: a guest restored on RAM that is all holes, registered with
/// userfaultfd MISSING ([`GuestRam::register_missing`]), runs as its pages are placed on
/// fault: the restore's read of the parameter block and the vCPUs' own accesses (KVM
/// reaching guest memory through the VMM's mapping) wait for their pages, and the guest
/// continues from its counters and verifies.
#[test]
fn restored_guest_runs_on_ram_whose_pages_are_placed_on_fault() {
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use nix::fcntl::{fallocate, FallocateFlags};
    use vmstream::memory::PAGE_SIZE;

    if skip() {
        return;
    }
    let mut guest = start(16);
    wait_each_above(&guest, &[0, 0], 10_000);
    let state = guest.pause().unwrap();
    let at_pause = guest.transactions().unwrap();
    let mut frozen = vec![0u8; 16 << 20];
    guest.ram().read(0, &mut frozen).unwrap();
    let copy = guest.ram().copy_to_memfd().unwrap();
    drop(guest);
    let size = copy.size();
    let hole = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(copy.file().as_fd(), hole, 0, size as i64).unwrap();
    let ram = GuestRam::from_file(copy.file().try_clone().unwrap(), size).unwrap();
    drop(copy);
    let faults = Arc::new(ram.register_missing().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (faults, stop) = (Arc::clone(&faults), Arc::clone(&stop));
        std::thread::spawn(move || {
            let (mut placed, mut pages) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                pages.clear();
                faults
                    .wait_faults(Duration::from_millis(20), &mut pages)
                    .unwrap();
                for &p in &pages {
                    let at = p as usize * PAGE_SIZE;
                    faults.place(p, &frozen[at..at + PAGE_SIZE]).unwrap();
                    placed += 1;
                }
            }
            placed
        })
    };
    let mut restored = KvmGuest::restore(ram, &state, &RestoreConfig::default()).unwrap();
    wait_each_above(&restored, &at_pause, 10_000);
    restored.pause().unwrap();
    let report = restored.verify().unwrap();
    stop.store(true, Ordering::Relaxed);
    let placed = server.join().unwrap();
    assert!(report.written_blocks > 0);
    // The page tables, the program, the counters and the blocks it touched at least.
    assert!(placed > 10, "{placed} pages placed on fault");
}
