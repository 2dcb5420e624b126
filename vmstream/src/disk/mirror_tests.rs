//! The mirror wait between a guest's block layer and a sender, each with its own mapping
//! of the same `<disk>.dirty` file.

use super::*;
use crate::disk::bitmap::bitmap_path;
use crate::disk::block::Disk;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmstream-mirror-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("disk.img")
}

/// Waits (generously) until `b` has a request waiting.
fn wait_for_request(b: &DirtyBitmap) -> MirrorRequest {
    let t = Instant::now();
    loop {
        beat(b);
        if let Some(r) = pending_requests(b).pop() {
            return r;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no request came");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_mirrored_write_returns_only_once_acknowledged_and_is_not_marked() {
    let path = tmp("ack");
    let mut disk = Disk::open(&path, Some(1 << 20), Some(4096)).unwrap();
    let sender = DirtyBitmap::open(&bitmap_path(&path)).unwrap();
    start_mirroring(&sender, 7);
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            disk.write_at(8192, &[5; 8192]).unwrap();
            done.store(true, Ordering::SeqCst);
            disk
        })
    };
    let r = wait_for_request(&sender);
    assert_eq!(r.granules, 2..4);
    // The data is in the file when the request is published.
    let mut buf = [0u8; 8192];
    std::fs::File::open(&path)
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 8192))
        .unwrap();
    assert_eq!(buf, [5; 8192]);
    // Unacknowledged, the write keeps waiting (the heartbeat kept alive).
    for _ in 0..100 {
        beat(&sender);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(!done.load(Ordering::SeqCst));
    acknowledge(&sender, &r);
    let disk = writer.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    // Mirrored: nothing to resend.
    assert!(sender.take_all().is_empty());
    assert_eq!(mirror_counts(&sender), (1, 8192, 0));
    let lat = Latencies::read(&sender, LatencyOf::MirroredWrites);
    assert_eq!(lat.count(), 1);
    // It waited about 200 ms.
    assert!(lat.quantile_us(0.5).unwrap() > 100_000.0, "{lat:?}");
    assert_eq!(Latencies::read(&sender, LatencyOf::AllWrites).count(), 1);
    assert!(sender.in_flight().is_empty());
    drop(disk);
}

#[test]
fn a_dead_sender_releases_the_write_which_is_marked_and_later_writes_do_not_wait() {
    let path = tmp("dead");
    let mut disk = Disk::open(&path, Some(1 << 20), Some(4096)).unwrap();
    let sender = DirtyBitmap::open(&bitmap_path(&path)).unwrap();
    start_mirroring(&sender, 1);
    // The sender "dies": its heartbeat stops, nobody acknowledges.
    drop(sender);
    let t = Instant::now();
    disk.write_at(0, &[1; 4096]).unwrap();
    let waited = t.elapsed();
    assert!(waited >= HEARTBEAT_STALE, "{waited:?}");
    assert!(waited < MIRROR_WAIT_MAX, "{waited:?}");
    // The next write sees mirroring off: no wait.
    let t = Instant::now();
    disk.write_at(4096, &[2; 4096]).unwrap();
    assert!(t.elapsed() < HEARTBEAT_STALE);
    let b = disk.bitmap();
    assert!(!mirroring(b));
    assert_eq!(b.take_all(), vec![0..2]);
    assert_eq!(mirror_counts(b), (0, 0, 1));
}

#[test]
fn stopping_the_mirror_releases_a_waiting_write() {
    let path = tmp("stop");
    let mut disk = Disk::open(&path, Some(1 << 20), Some(4096)).unwrap();
    let sender = DirtyBitmap::open(&bitmap_path(&path)).unwrap();
    start_mirroring(&sender, 3);
    let writer = std::thread::spawn(move || {
        disk.write_at(4096 * 9, &[3; 100]).unwrap();
        disk
    });
    let r = wait_for_request(&sender);
    assert_eq!(r.granules, 9..10);
    stop_mirroring(&sender);
    let disk = writer.join().unwrap();
    assert_eq!(disk.bitmap().take_all(), vec![9..10]);
    assert_eq!(mirror_counts(&sender), (0, 0, 1));
}

#[test]
fn quantiles_come_from_the_buckets() {
    let mut l = Latencies([0; LATENCY_BUCKETS]);
    assert_eq!(l.quantile_us(0.5), None);
    l.0[bucket(Duration::from_micros(100))] = 99;
    l.0[bucket(Duration::from_millis(50))] = 1;
    let p50 = l.quantile_us(0.5).unwrap();
    assert!((80.0..125.0).contains(&p50), "{p50}");
    let p99 = l.quantile_us(0.99).unwrap();
    assert!((80.0..125.0).contains(&p99), "{p99}");
    let max = l.quantile_us(1.0).unwrap();
    assert!((40_000.0..60_000.0).contains(&max), "{max}");
    assert_eq!(bucket(Duration::ZERO), 0);
    assert_eq!(bucket(Duration::from_secs(1 << 40)), LATENCY_BUCKETS - 1);
}
