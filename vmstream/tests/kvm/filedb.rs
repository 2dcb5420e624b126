//! The filedb workload writes the file-backed guests' image format from a KVM
//! guest: the image verifies with their verifier at any pause (journal replay
//! included), survives save/restore, and its counter keeps growing.

use std::time::{Duration, Instant};

use vmstream::guest::kvm::abi::IMAGE_GPA;
use vmstream::guest::kvm::{
    kvm_available, GuestRam, KvmGuest, KvmGuestConfig, KvmWorkloadKind, RestoreConfig,
    WorkloadConfig,
};

fn wait_tx(guest: &KvmGuest, min: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = guest.transactions().unwrap()[0];
        if t >= min || Instant::now() > deadline {
            assert!(guest.failures().is_empty(), "{:?}", guest.failures());
            return t;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn filedb_image_verifies_at_every_pause_and_after_restore() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: {why}");
        return;
    }
    let cfg = KvmGuestConfig {
        vcpus: 2,
        workload: WorkloadConfig {
            kind: KvmWorkloadKind::FileDb,
            report_shift: 10,
            ..WorkloadConfig::default()
        },
        ..KvmGuestConfig::default()
    };
    let mut guest = KvmGuest::start(GuestRam::memfd(16 << 20).unwrap(), &cfg).unwrap();
    let mut replayed = 0;
    let mut last = 0;
    for _ in 0..30 {
        last = wait_tx(&guest, last + 500);
        guest.pause().unwrap();
        let report = guest.verify().unwrap();
        replayed += report.inflight;
        guest.resume().unwrap();
    }
    eprintln!("{replayed} of 30 pauses landed mid-transaction");

    // The image alone (what a file-backed tool sees) verifies too.
    let state = guest.pause().unwrap();
    let at_pause = guest.transactions().unwrap()[0];
    let mut image = vec![0u8; (guest.ram().size() - IMAGE_GPA) as usize];
    guest.ram().read(IMAGE_GPA, &mut image).unwrap();
    let r = vmstream::guest::file::verify::verify_snapshot(&mut image).unwrap();
    assert!(
        r.tx_count + 1 >= at_pause && r.tx_count <= at_pause + 1,
        "{r:?} vs {at_pause}"
    );

    // Corrupt one payload byte of a block: the file-backed verifier notices.
    let copy = guest.ram().copy_to_memfd().unwrap();
    let data_offset = u64::from_le_bytes(image[48..56].try_into().unwrap());
    let victim = IMAGE_GPA + data_offset + 5 * 8192 + 3000;
    let byte = {
        let mut b = [0u8; 1];
        copy.read(victim, &mut b).unwrap();
        b[0]
    };
    copy.write(victim, &[byte ^ 0x20]).unwrap();
    assert!(vmstream::guest::kvm::verify::verify_image(&copy).is_err());
    copy.write(victim, &[byte]).unwrap();

    drop(guest);
    let restored = KvmGuest::restore(copy, &state, &RestoreConfig::default()).unwrap();
    wait_tx(&restored, at_pause + 5_000);
    let mut restored = restored;
    restored.pause().unwrap();
    let report = restored.verify().unwrap();
    assert!(report.versions >= report.written_blocks + at_pause);
}
