//! Measurements for KVM.md (not a test of behaviour; prints figures):
//! `cargo test --release -p vmstream --test kvm_measure -- --ignored --nocapture`

use std::time::{Duration, Instant};

use vmstream::guest::kvm::{
    kvm_available, DirtyLogMode, GuestRam, KvmGuest, KvmGuestConfig, KvmWorkloadKind,
    RestoreConfig, VmState, WorkloadConfig,
};

const MIB: u64 = 1 << 20;

/// Runs until the rate stops growing (first touches of guest pages are slow:
/// each is a shadow-MMU fault under PVM): at least 2 s, at most 10 s.
fn warm_up(guest: &KvmGuest) -> Duration {
    let start = Instant::now();
    let mut best = 0.0f64;
    while start.elapsed() < Duration::from_secs(10) {
        let r = rate(guest, Duration::from_millis(500));
        if start.elapsed() > Duration::from_secs(2)
            && r <= best * 1.1
            && (r > 100_000.0 || start.elapsed() > Duration::from_secs(4))
        {
            break;
        }
        best = best.max(r);
    }
    start.elapsed()
}

fn rate(guest: &KvmGuest, window: Duration) -> f64 {
    let t0 = guest.total_transactions().unwrap();
    let s = Instant::now();
    std::thread::sleep(window);
    (guest.total_transactions().unwrap() - t0) as f64 / s.elapsed().as_secs_f64()
}

#[test]
#[ignore = "measurement; run explicitly"]
fn measure() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: {why}");
        return;
    }
    let mem = 256 * MIB;
    println!("guest RAM {} MiB, 2 vCPUs", mem / MIB);
    for kind in [
        KvmWorkloadKind::Dbsim,
        KvmWorkloadKind::FileDb,
        KvmWorkloadKind::Random,
        KvmWorkloadKind::Hotset,
        KvmWorkloadKind::Idle,
    ] {
        let cfg = KvmGuestConfig {
            workload: WorkloadConfig {
                kind,
                ..WorkloadConfig::default()
            },
            ..KvmGuestConfig::default()
        };
        let mut guest = KvmGuest::start(GuestRam::memfd(mem).unwrap(), &cfg).unwrap();
        let t = Instant::now();
        let cold = rate(&guest, Duration::from_millis(200));
        let warm = warm_up(&guest) + t.elapsed() - Duration::ZERO;
        let r = rate(&guest, Duration::from_secs(1));
        guest.set_throttle(0.5).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let r_half = rate(&guest, Duration::from_secs(1));
        println!(
            "{kind:?}: first 200 ms {cold:.0} tx/s; warm (after {warm:.1?}) {r:.0} tx/s; throttled 0.5: {r_half:.0} tx/s"
        );
        drop(guest);
    }

    for mode in [
        DirtyLogMode::Bitmap,
        DirtyLogMode::Clear,
        DirtyLogMode::Ring,
    ] {
        let cfg = KvmGuestConfig {
            dirty_log: Some(mode),
            ..KvmGuestConfig::default()
        };
        let guest = KvmGuest::start(GuestRam::memfd(mem).unwrap(), &cfg).unwrap();
        let mut log = guest.dirty_log().unwrap();
        let pages = guest.ram().pages();
        warm_up(&guest);
        log.collect().unwrap();
        log.clear(0, pages).unwrap();
        let r = rate(&guest, Duration::from_millis(500));
        let mut counts = Vec::new();
        let mut clear_time = Duration::ZERO;
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(50));
            let map = log.collect().unwrap();
            counts.push(map.count());
            let t = Instant::now();
            // Clear in 2 MiB chunks as a sender would.
            for first in (0..pages).step_by(512) {
                log.clear(first, 512).unwrap();
            }
            clear_time += t.elapsed();
        }
        let st = log.stats();
        let avg = st.collect_time / st.collections as u32;
        let avg_pages = counts.iter().sum::<u64>() / counts.len() as u64;
        println!(
            "dirty {:6}: dbsim {r:.0} tx/s, {avg_pages} dirty pages per 50 ms, collect avg {:?}, \
             clear (256 chunks) avg {:?}, ring-full exits {}",
            mode.name(),
            avg,
            clear_time / 20,
            st.ring_full_exits
        );
    }

    let mut guest =
        KvmGuest::start(GuestRam::memfd(mem).unwrap(), &KvmGuestConfig::default()).unwrap();
    warm_up(&guest);
    let t = Instant::now();
    let state = guest.pause().unwrap();
    let pause = t.elapsed();
    let blob = state.to_bytes();
    let copy = guest.ram().copy_to_memfd().unwrap();
    drop(guest);
    let t = Instant::now();
    let parsed = VmState::from_bytes(&blob).unwrap();
    let restored = KvmGuest::restore(copy, &parsed, &RestoreConfig::default()).unwrap();
    let restore = t.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    println!(
        "pause (2 vCPUs, with state capture) {pause:?}; state blob {} bytes; parse + restore {restore:?}; \
         restored: first 500 ms {:.0} tx/s, then {:.0} tx/s",
        blob.len(),
        rate(&restored, Duration::from_millis(500)),
        rate(&restored, Duration::from_millis(1000))
    );
}

/// Warm random-store rate against RAM size (where native speed stops).
#[test]
#[ignore = "measurement; run explicitly"]
fn measure_random_by_size() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: {why}");
        return;
    }
    for mib in [16, 256, 1024, 2048] {
        let cfg = KvmGuestConfig {
            workload: WorkloadConfig {
                kind: KvmWorkloadKind::Random,
                ..WorkloadConfig::default()
            },
            ..KvmGuestConfig::default()
        };
        let guest = KvmGuest::start(GuestRam::memfd(mib * MIB).unwrap(), &cfg).unwrap();
        let warm = warm_up(&guest);
        let r = rate(&guest, Duration::from_secs(1));
        println!("random, {mib} MiB RAM: {r:.0} tx/s after {warm:.1?}");
    }
}

/// Copies the pages of `set` (all if None) in 2 MiB chunks, re-arming each chunk first.
fn copy(
    log: &mut Box<dyn vmstream::guest::kvm::DirtyLog>,
    src: &GuestRam,
    dst: &GuestRam,
    set: Option<&vmstream::guest::kvm::DirtyBitmap>,
) -> u64 {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    for first in (0..src.pages()).step_by(512) {
        let chunk: Vec<u64> = (first..first + 512)
            .filter(|&p| set.is_none_or(|s| s.is_set(p)))
            .collect();
        if chunk.is_empty() {
            continue;
        }
        log.clear(first, 512).unwrap();
        for p in chunk {
            src.read(p * 4096, &mut buf).unwrap();
            dst.write(p * 4096, &buf).unwrap();
            n += 1;
        }
    }
    n
}

/// In-process pre-copy of a warm dbsim guest: pages per round and downtime.
#[test]
#[ignore = "measurement; run explicitly"]
fn measure_precopy() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: {why}");
        return;
    }
    let mem = 256 * MIB;
    for mode in [
        DirtyLogMode::Bitmap,
        DirtyLogMode::Clear,
        DirtyLogMode::Ring,
    ] {
        let cfg = KvmGuestConfig {
            dirty_log: Some(mode),
            ..KvmGuestConfig::default()
        };
        let mut src = KvmGuest::start(GuestRam::memfd(mem).unwrap(), &cfg).unwrap();
        warm_up(&src);
        let mut log = src.dirty_log().unwrap();
        let dst = GuestRam::memfd(mem).unwrap();
        let t = Instant::now();
        log.collect().unwrap();
        let mut rounds = vec![copy(&mut log, src.ram(), &dst, None)];
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(20));
            let d = log.collect().unwrap();
            rounds.push(copy(&mut log, src.ram(), &dst, Some(&d)));
        }
        let down = Instant::now();
        let state = src.pause().unwrap();
        let d = log.collect().unwrap();
        let last = copy(&mut log, src.ram(), &dst, Some(&d));
        let restored = KvmGuest::restore(dst, &state, &RestoreConfig::default()).unwrap();
        let downtime = down.elapsed();
        drop(log);
        drop(src);
        println!(
            "precopy {:6}: pages per round {rounds:?}, last (paused) {last}, total {:?}, \
             downtime (pause + last round + restore) {downtime:?}",
            mode.name(),
            t.elapsed()
        );
        restored.verify().ok();
    }
}
