//! Pausing, throttling and sampling a real guest process.

#[path = "../common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Guest, TmpFile};
use vmstream::guest::file::layout::{get_u64, sb};
use vmstream::guest::file::throttle::{process_state, Throttle};
use vmstream::guest::file::workload::recover;
use vmstream::memory::{GuestMemory, MapMode};
use vmstream::telemetry::sampler::{read_tx_count, TpsSampler};

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn pause_freezes_the_counter_and_resume_continues() {
    let mem = TmpFile::new("pause");
    let g = Guest::spawn(&[
        "--memory-file",
        mem.str(),
        "--size",
        "4M",
        "--workload",
        "dbsim",
        "--init",
    ]);
    let view = GuestMemory::open(&mem.0, MapMode::SharedReadOnly).unwrap();
    let t = Throttle::new(g.child.id()).unwrap();
    wait_for("first transactions", || read_tx_count(&view) > 0);
    t.pause().unwrap();
    assert!(t.is_paused());
    assert_eq!(process_state(g.child.id()).unwrap(), 'T');
    let frozen = read_tx_count(&view);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(read_tx_count(&view), frozen);
    t.resume().unwrap();
    wait_for("progress after resume", || read_tx_count(&view) > frozen);
}

#[test]
fn the_counter_of_a_paused_guest_is_what_its_recovered_memory_holds() {
    // A guest stopped between arming its redo record and bumping the counter has committed
    // that transaction: the guest resuming the memory replays it. The counter read at a
    // pause must say so, at whatever instruction the pause lands.
    let mem = TmpFile::new("pause-mid-tx");
    let g = Guest::spawn(&[
        "--memory-file",
        mem.str(),
        "--size",
        "4M",
        "--workload",
        "dbsim",
        "--init",
    ]);
    let view = GuestMemory::open(&mem.0, MapMode::SharedReadOnly).unwrap();
    let t = Throttle::new(g.child.id()).unwrap();
    wait_for("first transactions", || read_tx_count(&view) > 0);
    let mut image = vec![0u8; view.len()];
    for _ in 0..200 {
        t.pause().unwrap();
        let counted = read_tx_count(&view);
        view.read_at(0, &mut image);
        t.resume().unwrap();
        recover(&mut image).unwrap();
        assert_eq!(counted, get_u64(&image, sb::TX_COUNT));
    }
}

#[test]
fn throttling_stops_the_guest_part_of_the_time_and_drop_releases_it() {
    let mem = TmpFile::new("throttle");
    let g = Guest::spawn(&[
        "--memory-file",
        mem.str(),
        "--size",
        "4M",
        "--workload",
        "random",
        "--init",
    ]);
    let pid = g.child.id();
    let t = Throttle::new(pid).unwrap();
    t.set(5.0);
    assert_eq!(t.fraction(), vmstream::guest::file::throttle::MAX_FRACTION);
    t.set(0.5);
    wait_for("a throttle stop", || process_state(pid).unwrap() == 'T');
    wait_for("a throttle continue", || process_state(pid).unwrap() != 'T');
    drop(t);
    // After drop the guest runs freely: it is never seen stopped again.
    std::thread::sleep(Duration::from_millis(30));
    for _ in 0..200 {
        assert_ne!(process_state(pid).unwrap(), 'T');
        std::thread::sleep(Duration::from_micros(500));
    }
}

#[test]
fn sampler_builds_a_tps_timeline() {
    let mem = TmpFile::new("sampler");
    let _g = Guest::spawn(&[
        "--memory-file",
        mem.str(),
        "--size",
        "4M",
        "--workload",
        "sequential",
        "--init",
        "--rate",
        "2000",
    ]);
    let s = TpsSampler::start(&mem.0, Duration::from_millis(20)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let samples = s.stop();
    assert!(samples.len() >= 3, "{} samples", samples.len());
    assert_eq!(samples[0].tps, 0.0);
    for w in samples.windows(2) {
        assert!(w[1].at > w[0].at && w[1].tx_count >= w[0].tx_count);
    }
    assert!(samples.last().unwrap().tx_count > samples[0].tx_count);
    assert!(samples.iter().any(|s| s.tps > 0.0));
}
