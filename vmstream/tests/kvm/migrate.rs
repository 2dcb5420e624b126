//! In-process pre-copy migration of a running KVM guest, for every dirty-log
//! mode: copy all RAM while the guest runs, re-send dirty pages for a few
//! rounds (re-arming each 2 MiB chunk right before copying it in clear
//! mode), pause, send the last dirty pages, restore on the copy. The
//! destination must verify and keep running.

use std::time::{Duration, Instant};

use vmstream::guest::kvm::{
    kvm_available, DirtyBitmap, DirtyLog, DirtyLogMode, GuestRam, KvmGuest, KvmGuestConfig,
    RestoreConfig, VmState, WorkloadConfig,
};

const CHUNK_PAGES: u64 = 512;

/// Sends the pages of `dirty` (all pages if None) chunk by chunk.
fn send(
    log: &mut dyn DirtyLog,
    src: &GuestRam,
    dst: &GuestRam,
    dirty: Option<&DirtyBitmap>,
) -> u64 {
    let mut sent = 0;
    let mut buf = vec![0u8; 4096];
    for first in (0..src.pages()).step_by(CHUNK_PAGES as usize) {
        let pages: Vec<u64> = (first..(first + CHUNK_PAGES).min(src.pages()))
            .filter(|&p| dirty.is_none_or(|d| d.is_set(p)))
            .collect();
        if pages.is_empty() {
            continue;
        }
        // Re-arm before reading, so writes after this point are logged again.
        log.clear(first, CHUNK_PAGES).unwrap();
        for p in pages {
            src.read(p * 4096, &mut buf).unwrap();
            dst.write(p * 4096, &buf).unwrap();
            sent += 1;
        }
    }
    sent
}

#[test]
fn precopy_migration_in_every_mode() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: {why}");
        return;
    }
    for mode in [
        DirtyLogMode::Bitmap,
        DirtyLogMode::Clear,
        DirtyLogMode::Ring,
    ] {
        let cfg = KvmGuestConfig {
            vcpus: 2,
            workload: WorkloadConfig {
                seed: 11,
                ..WorkloadConfig::default()
            },
            dirty_log: Some(mode),
            ..KvmGuestConfig::default()
        };
        let mut src = KvmGuest::start(GuestRam::memfd(32 << 20).unwrap(), &cfg).unwrap();
        let mut log = src.dirty_log().unwrap();
        let dst = GuestRam::memfd(32 << 20).unwrap();

        // Round 0: everything, while the guest runs.
        log.collect().unwrap();
        let mut sent = send(log.as_mut(), src.ram(), &dst, None);
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(20));
            let dirty = log.collect().unwrap();
            sent += send(log.as_mut(), src.ram(), &dst, Some(&dirty));
        }
        let state = src.pause().unwrap();
        let at_pause = src.transactions().unwrap();
        let dirty = log.collect().unwrap();
        sent += send(log.as_mut(), src.ram(), &dst, Some(&dirty));
        assert!(sent >= src.ram().pages(), "{mode:?}: sent {sent}");

        // Byte-exact copy of the paused source.
        let size = src.ram().size() as usize;
        let (mut a, mut b) = (vec![0u8; size], vec![0u8; size]);
        src.ram().read(0, &mut a).unwrap();
        dst.read(0, &mut b).unwrap();
        let differing = (0..size / 4096)
            .filter(|&p| a[p * 4096..(p + 1) * 4096] != b[p * 4096..(p + 1) * 4096])
            .count();
        assert_eq!(
            differing, 0,
            "{mode:?}: {differing} pages differ after migration"
        );
        drop(log);
        drop(src);

        let blob = state.to_bytes();
        let mut dst_guest = KvmGuest::restore(
            dst,
            &VmState::from_bytes(&blob).unwrap(),
            &RestoreConfig::default(),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while dst_guest
            .transactions()
            .unwrap()
            .iter()
            .zip(&at_pause)
            .any(|(n, p)| *n < p + 10_000)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        dst_guest.pause().unwrap();
        let now = dst_guest.transactions().unwrap();
        assert!(
            now.iter().zip(&at_pause).all(|(n, p)| *n >= p + 10_000),
            "{mode:?}: {at_pause:?} -> {now:?}"
        );
        dst_guest.verify().unwrap();
    }
}
