//! Dirty-log exactness for every mode: the touch guest writes known pages and
//! the log reports exactly those (plus the VMM's own writes); with the dbsim
//! guest, every page that changed between two pauses is reported.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use vmstream::guest::kvm::{
    kvm_available, DirtyLog, DirtyLogMode, GuestRam, KvmGuest, KvmGuestConfig, KvmWorkloadKind,
    WorkloadConfig,
};
use vmstream::track::DirtyTracker;

const MODES: [DirtyLogMode; 3] = [
    DirtyLogMode::Bitmap,
    DirtyLogMode::Clear,
    DirtyLogMode::Ring,
];

fn skip() -> bool {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: {why}");
        return true;
    }
    false
}

fn start(kind: KvmWorkloadKind, mode: DirtyLogMode, mib: u64) -> KvmGuest {
    let cfg = KvmGuestConfig {
        vcpus: 2,
        workload: WorkloadConfig {
            kind,
            ..WorkloadConfig::default()
        },
        dirty_log: Some(mode),
        ..KvmGuestConfig::default()
    };
    KvmGuest::start(GuestRam::memfd(mib << 20).unwrap(), &cfg).unwrap()
}

/// Collects and re-arms everything (clear mode needs the explicit clear).
fn collect_all(log: &mut dyn DirtyLog, pages: u64) -> BTreeSet<u64> {
    let map = log.collect().unwrap();
    log.clear(0, pages).unwrap();
    map.iter().collect()
}

fn touch_and_wait(guest: &KvmGuest, vcpu: usize, pages: &[u64]) {
    let before = guest.touch_batches(vcpu);
    guest.touch(vcpu, pages).unwrap();
    assert!(
        guest.wait_touch_batches(vcpu, before + 1, Duration::from_secs(10)),
        "touch batch not done: {:?}",
        guest.failures()
    );
}

#[test]
fn touched_pages_are_reported_exactly_in_every_mode() {
    if skip() {
        return;
    }
    for mode in MODES {
        let guest = start(KvmWorkloadKind::Touch, mode, 32);
        let pages = guest.ram().pages();
        let mut log = guest.dirty_log().unwrap();
        assert_eq!(log.mode(), mode);
        // Wait until both vCPUs poll for work, then drop setup writes.
        touch_and_wait(&guest, 0, &[]);
        touch_and_wait(&guest, 1, &[]);
        let setup = collect_all(log.as_mut(), pages);
        assert!(!setup.is_empty(), "{mode:?}: VMM setup writes missing");

        let a = [600, 601, 1000, 4097, 8000];
        let b = [700, 5000, 8191];
        touch_and_wait(&guest, 0, &a);
        touch_and_wait(&guest, 1, &b);
        let got = collect_all(log.as_mut(), pages);
        let want: BTreeSet<u64> = a.iter().chain(&b).copied().collect();
        assert_eq!(got, want, "{mode:?}: guest writes");

        // The VMM's own writes are reported too.
        guest.ram().write_u64(3000 * 4096 + 8, 42).unwrap();
        assert_eq!(
            collect_all(log.as_mut(), pages),
            BTreeSet::from([3000]),
            "{mode:?}"
        );

        // Pages written again after a collect are reported again.
        touch_and_wait(&guest, 0, &[600, 602]);
        assert_eq!(
            collect_all(log.as_mut(), pages),
            BTreeSet::from([600, 602]),
            "{mode:?}"
        );
        assert!(
            collect_all(log.as_mut(), pages).is_empty(),
            "{mode:?}: nothing new"
        );

        let stats = log.stats();
        assert_eq!(stats.collections, 5);
        assert!(guest.failures().is_empty(), "{:?}", guest.failures());
    }
}

#[test]
fn clear_mode_keeps_pages_dirty_until_cleared() {
    if skip() {
        return;
    }
    let guest = start(KvmWorkloadKind::Touch, DirtyLogMode::Clear, 16);
    let pages = guest.ram().pages();
    let mut log = guest.dirty_log().unwrap();
    touch_and_wait(&guest, 0, &[]);
    collect_all(log.as_mut(), pages);
    touch_and_wait(&guest, 0, &[900, 901]);
    let first: BTreeSet<u64> = log.collect().unwrap().iter().collect();
    assert_eq!(first, BTreeSet::from([900, 901]));
    // Not cleared yet: still reported.
    let again: BTreeSet<u64> = log.collect().unwrap().iter().collect();
    assert_eq!(again, first);
    // Clearing one 64-page chunk re-arms both pages (same chunk), and only them.
    let cleared = log.stats().cleared_pages;
    log.clear(896, 64).unwrap();
    assert_eq!(log.stats().cleared_pages, cleared + 2);
    assert!(log.collect().unwrap().iter().next().is_none());
    // After the clear, a new write is caught.
    touch_and_wait(&guest, 0, &[901]);
    let after: BTreeSet<u64> = log.collect().unwrap().iter().collect();
    assert_eq!(after, BTreeSet::from([901]));
}

/// One round of a sender through the crate's DirtyTracker contract: collect, then
/// `before_read` every page before reading it (clear mode re-arms there).
fn send_round(tracker: &mut dyn DirtyTracker) -> Vec<u64> {
    let pages = tracker.collect().unwrap();
    for &p in &pages {
        tracker.before_read(p).unwrap();
    }
    pages
}

/// Through the crate's DirtyTracker contract, as the sender drives it.
#[test]
fn kvm_logs_work_as_dirty_trackers() {
    if skip() {
        return;
    }
    for mode in MODES {
        let guest = start(KvmWorkloadKind::Touch, mode, 16);
        let mut tracker = guest.dirty_tracker().unwrap();
        assert_eq!(tracker.pages(), guest.ram().pages());
        assert!(tracker.name().starts_with("kvm-"));
        touch_and_wait(&guest, 0, &[]);
        send_round(&mut tracker);
        touch_and_wait(&guest, 1, &[700, 3000, 1500]);
        assert_eq!(send_round(&mut tracker), vec![700, 1500, 3000], "{mode:?}");
        assert!(send_round(&mut tracker).is_empty(), "{mode:?}");
        touch_and_wait(&guest, 0, &[700]);
        assert_eq!(send_round(&mut tracker), vec![700], "{mode:?}");
    }
}

/// Clear mode re-arms a page's chunk in `before_read`, not in `collect`: a collected page
/// not read yet is reported again, and a write after the re-arm (racing with the read) is
/// reported by the next collect. The other modes re-arm in `collect`.
#[test]
fn kvm_tracker_rearms_before_the_read() {
    if skip() {
        return;
    }
    for mode in MODES {
        let guest = start(KvmWorkloadKind::Touch, mode, 16);
        let mut tracker = guest.dirty_tracker().unwrap();
        touch_and_wait(&guest, 0, &[]);
        send_round(&mut tracker);
        tracker.take_rearm_time();
        // Pages 700 and 1500 lie in different 2 MiB chunks.
        touch_and_wait(&guest, 0, &[700, 1500]);
        assert_eq!(tracker.collect().unwrap(), vec![700, 1500], "{mode:?}");
        tracker.before_read(700).unwrap();
        touch_and_wait(&guest, 0, &[701]);
        let want = if mode == DirtyLogMode::Clear {
            vec![701, 1500]
        } else {
            vec![701]
        };
        assert_eq!(tracker.collect().unwrap(), want, "{mode:?}");
        assert_eq!(
            tracker.take_rearm_time() > Duration::ZERO,
            mode == DirtyLogMode::Clear,
            "{mode:?}"
        );
    }
}

/// Clear mode must not clear a page dirtied after the collect that is not
/// being sent: a write between collect and clear stays reported.
#[test]
fn clear_mode_keeps_writes_made_after_the_collect() {
    if skip() {
        return;
    }
    let guest = start(KvmWorkloadKind::Touch, DirtyLogMode::Clear, 16);
    let pages = guest.ram().pages();
    let mut log = guest.dirty_log().unwrap();
    touch_and_wait(&guest, 0, &[]);
    collect_all(log.as_mut(), pages);
    touch_and_wait(&guest, 0, &[1000]);
    let first: BTreeSet<u64> = log.collect().unwrap().iter().collect();
    assert_eq!(first, BTreeSet::from([1000]));
    // Page 1001 (same 64-page chunk) is written after the collect...
    touch_and_wait(&guest, 0, &[1001]);
    // ...and the sender re-arms the chunk before copying page 1000.
    log.clear(960, 64).unwrap();
    let next: BTreeSet<u64> = log.collect().unwrap().iter().collect();
    assert_eq!(next, BTreeSet::from([1001]), "write after collect was lost");
}

/// Every page that differs between two pauses must be in the dirty set.
#[test]
fn dbsim_changes_are_all_reported_in_every_mode() {
    if skip() {
        return;
    }
    for mode in MODES {
        let mut guest = start(KvmWorkloadKind::Dbsim, mode, 32);
        let size = guest.ram().size();
        let pages = guest.ram().pages();
        let mut log = guest.dirty_log().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while guest.total_transactions().unwrap() < 10_000 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        guest.pause().unwrap();
        collect_all(log.as_mut(), pages);
        let mut before = vec![0u8; size as usize];
        guest.ram().read(0, &mut before).unwrap();
        let tx_before = guest.total_transactions().unwrap();
        guest.resume().unwrap();
        while guest.total_transactions().unwrap() < tx_before + 20_000 && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        guest.pause().unwrap();
        let dirty = log.collect().unwrap();
        let mut after = vec![0u8; size as usize];
        guest.ram().read(0, &mut after).unwrap();
        let changed: Vec<u64> = (0..pages)
            .filter(|&p| {
                let r = (p * 4096) as usize..((p + 1) * 4096) as usize;
                before[r.clone()] != after[r]
            })
            .collect();
        assert!(!changed.is_empty(), "{mode:?}: guest changed nothing");
        let missed: Vec<u64> = changed
            .iter()
            .copied()
            .filter(|&p| !dirty.is_set(p))
            .collect();
        assert!(
            missed.is_empty(),
            "{mode:?}: changed pages not reported: {missed:?}"
        );
        guest.verify().unwrap();
        guest.resume().unwrap();
    }
}

/// A random writer overflows small rings quickly: the vCPUs harvest their own
/// ring on ring-full exits and keep running.
#[test]
fn ring_full_exits_do_not_stall_the_guest() {
    if skip() {
        return;
    }
    let cfg = KvmGuestConfig {
        vcpus: 2,
        workload: WorkloadConfig {
            kind: KvmWorkloadKind::Random,
            ..WorkloadConfig::default()
        },
        dirty_log: Some(DirtyLogMode::Ring),
        ring_entries: 8192,
        ..KvmGuestConfig::default()
    };
    let guest = KvmGuest::start(GuestRam::memfd(256 << 20).unwrap(), &cfg).unwrap();
    let mut log = guest.dirty_log().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    // 256 MiB = 65536 pages: far more distinct pages than one ring holds.
    while log.stats().ring_full_exits == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(log.stats().ring_full_exits > 0, "no ring-full exit");
    let t0 = guest.transactions().unwrap();
    let dirty = log.collect().unwrap();
    assert!(dirty.count() > 8192, "{} pages", dirty.count());
    while guest
        .transactions()
        .unwrap()
        .iter()
        .zip(&t0)
        .any(|(a, b)| a <= b)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    let t1 = guest.transactions().unwrap();
    assert!(t1.iter().zip(&t0).all(|(a, b)| a > b), "{t0:?} -> {t1:?}");
    assert!(guest.failures().is_empty(), "{:?}", guest.failures());
}

/// More distinct pages than one ring holds: the vCPU harvests its own ring on
/// ring-full exits, and the collected set is still exactly the written pages.
#[test]
fn ring_full_harvest_stays_exact() {
    if skip() {
        return;
    }
    let cfg = KvmGuestConfig {
        vcpus: 2,
        workload: WorkloadConfig {
            kind: KvmWorkloadKind::Touch,
            ..WorkloadConfig::default()
        },
        dirty_log: Some(DirtyLogMode::Ring),
        ring_entries: 8192,
        ..KvmGuestConfig::default()
    };
    let guest = KvmGuest::start(GuestRam::memfd(128 << 20).unwrap(), &cfg).unwrap();
    let pages = guest.ram().pages();
    let mut log = guest.dirty_log().unwrap();
    touch_and_wait(&guest, 0, &[]);
    collect_all(log.as_mut(), pages);
    let want: Vec<u64> = (600..600 + 2 * 8192 + 1000).collect();
    let before = guest.touch_batches(0);
    guest.touch(0, &want).unwrap();
    assert!(guest.wait_touch_batches(0, before + 1, Duration::from_secs(60)));
    assert!(log.stats().ring_full_exits > 0, "{:?}", log.stats());
    let got = collect_all(log.as_mut(), pages);
    assert_eq!(got, want.iter().copied().collect::<BTreeSet<u64>>());
}
