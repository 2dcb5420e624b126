//! A KVM guest on a regular file is a file-backed guest: what the guest
//! writes is in the file, and a guest can be restored from the file itself.

use std::time::{Duration, Instant};

use vmstream::guest::kvm::{kvm_available, GuestRam, KvmGuest, KvmGuestConfig, RestoreConfig};

struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn memfd_ram_is_reachable_through_its_proc_path() {
    let ram = GuestRam::memfd(4 << 20).unwrap();
    ram.write_u64(123 * 8, 0xfeed).unwrap();
    let p = ram.shared_path();
    assert!(p.starts_with("/proc/"), "{p:?}");
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(bytes.len(), 4 << 20);
    assert_eq!(
        u64::from_le_bytes(bytes[123 * 8..124 * 8].try_into().unwrap()),
        0xfeed
    );
}

#[test]
fn guest_on_a_file_writes_through_and_restores_from_it() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: {why}");
        return;
    }
    let path = TempFile(std::env::temp_dir().join(format!(
        "vmstream-kvm-file-{}-{:?}.ram",
        std::process::id(),
        Instant::now()
    )));
    let size = 16 << 20;
    let mut guest = KvmGuest::start(
        GuestRam::open(&path.0, size).unwrap(),
        &KvmGuestConfig::default(),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while guest.transactions().unwrap().iter().any(|&c| c < 10_000) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let state = guest.pause().unwrap();
    let counts = guest.transactions().unwrap();
    drop(guest);

    // The guest's counters, read from the file with plain file I/O.
    let bytes = std::fs::read(&path.0).unwrap();
    let ram_copy = GuestRam::open(&path.0, size).unwrap();
    assert_eq!(ram_copy.path(), Some(path.0.as_path()));
    assert_eq!(ram_copy.shared_path(), path.0);
    // RAM on a file is owned: a second guest on it would rewrite it under the first.
    assert!(matches!(
        GuestRam::open(&path.0, size),
        Err(e) if e.to_string().contains("is in use by another running guest")
    ));
    drop(ram_copy);
    assert_eq!(bytes.len() as u64, size);
    for (v, &c) in counts.iter().enumerate() {
        let off = 0x81000 + v * 64;
        let in_file = u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap());
        assert_eq!(in_file, c, "vCPU {v}");
    }

    // Restore straight from the file (its contents are the paused RAM).
    let mut again = KvmGuest::restore(
        GuestRam::open(&path.0, size).unwrap(),
        &state,
        &RestoreConfig::default(),
    )
    .unwrap();
    while again
        .transactions()
        .unwrap()
        .iter()
        .zip(&counts)
        .any(|(n, c)| *n < c + 10_000)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    again.pause().unwrap();
    assert!(again
        .transactions()
        .unwrap()
        .iter()
        .zip(&counts)
        .all(|(n, c)| *n >= c + 10_000));
    again.verify().unwrap();
}
