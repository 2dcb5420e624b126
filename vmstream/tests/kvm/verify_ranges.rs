//! The ledger check splits the blocks across threads: corruption in any part of RAM is
//! found, and when several blocks are bad the error names the first one, as a sequential
//! check would.

use std::time::{Duration, Instant};

use vmstream::guest::kvm::{
    kvm_available, GuestRam, KvmError, KvmGuest, KvmGuestConfig, KvmVerifyError, WorkloadConfig,
};

#[test]
fn corruption_anywhere_is_found_and_the_first_bad_block_is_named() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: {why}");
        return;
    }
    let cfg = KvmGuestConfig {
        vcpus: 2,
        workload: WorkloadConfig {
            seed: 5,
            ..WorkloadConfig::default()
        },
        ..KvmGuestConfig::default()
    };
    let mut guest = KvmGuest::start(GuestRam::memfd(16 << 20).unwrap(), &cfg).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while guest.total_transactions().unwrap() < 200_000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    guest.pause().unwrap();
    guest.verify().unwrap();
    let ram = guest.ram().clone();
    let layout = guest.params().layout;
    let inflight: Vec<u64> = (0..2)
        .map(|v| ram.read_u64(0x81000 + v * 64 + 8).unwrap())
        .collect();
    let committed: Vec<u64> = (0..layout.block_count)
        .filter(|&b| ram.read_u64(layout.ledger_gpa + b * 8).unwrap() > 0)
        .filter(|b| !inflight.contains(&(b + 1)))
        .collect();
    let (first, last) = (committed[0], *committed.last().unwrap());
    assert!(
        last > layout.block_count / 2,
        "no committed block in the upper half"
    );
    let flip = |b: u64| {
        let gpa = layout.block_gpa(b) + 5000;
        let old = ram.read_u64(gpa).unwrap();
        ram.write_u64(gpa, old ^ 4).unwrap();
    };
    flip(last);
    match guest.verify() {
        Err(KvmError::Verify(KvmVerifyError::Checksum { block, .. })) => assert_eq!(block, last),
        other => panic!("expected a checksum error in block {last}, got {other:?}"),
    }
    flip(first);
    match guest.verify() {
        Err(KvmError::Verify(KvmVerifyError::Checksum { block, .. })) => assert_eq!(block, first),
        other => panic!("expected a checksum error in block {first}, got {other:?}"),
    }
    flip(first);
    flip(last);
    guest.verify().unwrap();
    // The last block lies beyond the active set and must stay zero.
    let tail = layout.block_count - 1;
    ram.write_u64(layout.block_gpa(tail) + 64, 1).unwrap();
    assert!(matches!(
        guest.verify(),
        Err(KvmError::Verify(KvmVerifyError::NotZero { block })) if block == tail
    ));
}
