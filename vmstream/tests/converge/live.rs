//! The strategies in a closed loop with a real guest process: uffd-wp dirty tracking, the
//! SIGSTOP/SIGCONT throttle, the TPS sampler, and an emulated link (a round "sends" its dirty
//! bytes by sleeping bytes / bandwidth). Records the guest-impact timeline and plots it.
//!
//! Slow (tens of seconds per strategy), so ignored; run by hand with
//! `VMSTREAM_LIVE_OUT=DIR cargo test -p vmstream --release --test converge_live -- --ignored --nocapture`
//! to keep the stats JSON and SVG of each run in DIR.

#[path = "../common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Guest, TmpFile};
use vmstream::converge::{RoundObservation, Strategy, SwitchReason};
use vmstream::guest::file::throttle::Throttle;
use vmstream::memory::PAGE_SIZE;
use vmstream::telemetry::sampler::TpsSampler;
use vmstream::telemetry::timeline::TimelineRecorder;
use vmstream::track::{DirtyTracker, UffdWpTracker};

const MIB: u64 = 1 << 20;
/// Emulated link speed.
const BANDWIDTH: u64 = 200 * MIB;
const LIMIT: Duration = Duration::from_millis(300);
/// Give up (force) after this long, as `--on-timeout force` would.
const TIMEOUT: Duration = Duration::from_secs(60);

fn live(strategy: Strategy) {
    let mem = TmpFile::new("converge-live");
    let g = Guest::spawn(&[
        "--memory-file",
        mem.str(),
        "--size",
        "256M",
        "--workload",
        "hotset",
        "--hot-set",
        "96M",
        "--init",
    ]);
    let mut tracker = UffdWpTracker::new(g.ready.pid, g.ready.addr, g.ready.len).unwrap();
    let throttle = Throttle::new(g.ready.pid).unwrap();
    let sampler = TpsSampler::start(&mem.0, Duration::from_millis(100)).unwrap();
    std::thread::sleep(Duration::from_secs(1)); // warm-up
    let start = Instant::now();
    let sampler_offset_ms = -1000.0;
    let mut policy = strategy.build();
    let mut rec = TimelineRecorder::new();
    tracker.collect().unwrap();
    let mut pending = g.ready.len / PAGE_SIZE as u64;
    let mut sent_total = 0u64;
    let reason = 'migration: {
        for round in 0.. {
            let round_start = start.elapsed();
            let bytes = pending * PAGE_SIZE as u64;
            std::thread::sleep(Duration::from_secs_f64(bytes as f64 / BANDWIDTH as f64));
            let dirty = tracker.collect().unwrap().len() as u64;
            let now = start.elapsed();
            let duration = now - round_start;
            sent_total += bytes;
            rec.round(
                round,
                round_start,
                duration,
                dirty * PAGE_SIZE as u64,
                bytes,
                0,
                false,
            );
            let obs = RoundObservation {
                round,
                now,
                dirty_pages: dirty,
                dirty_bytes: dirty * PAGE_SIZE as u64,
                bytes_sent: bytes,
                duration,
                bandwidth_bytes_per_s: bytes as f64 / duration.as_secs_f64(),
                avg_bandwidth: sent_total as f64 / now.as_secs_f64(),
                remaining_dirty_bytes: dirty * PAGE_SIZE as u64,
                downtime_limit: LIMIT,
            };
            let d = policy.observe(&obs);
            throttle.set(d.throttle);
            assert_eq!(throttle.fraction(), d.throttle);
            rec.throttle(now, d.throttle);
            if let Some(n) = d.note {
                println!("{strategy} {:>6.2} s: {n}", now.as_secs_f64());
                rec.note(now, n);
            }
            pending = dirty;
            if d.switchover.is_some() {
                break 'migration d.switchover;
            }
            if now >= TIMEOUT {
                break 'migration None;
            }
        }
        unreachable!()
    };
    // Stop-and-copy: pause, send the rest, "resume on the destination".
    let paused_at = start.elapsed();
    throttle.pause().unwrap();
    rec.pause(paused_at);
    let last = pending + tracker.collect().unwrap().len() as u64;
    let final_secs = (last * PAGE_SIZE as u64) as f64 / BANDWIDTH as f64;
    std::thread::sleep(Duration::from_secs_f64(final_secs));
    rec.round(
        u64::MAX,
        paused_at,
        Duration::from_secs_f64(final_secs),
        0,
        last * PAGE_SIZE as u64,
        0,
        true,
    );
    throttle.set(0.0);
    throttle.resume().unwrap();
    let downtime = start.elapsed() - paused_at;
    rec.resumed_after(downtime);
    std::thread::sleep(Duration::from_secs(1));
    let samples = sampler.stop();
    let timeline = rec.finish(&samples, sampler_offset_ms);
    println!(
        "{strategy}: {reason:?} after {:.1} s, {} rounds, downtime {:.0} ms",
        paused_at.as_secs_f64(),
        timeline.rounds.len(),
        downtime.as_secs_f64() * 1e3
    );
    assert!(timeline.samples.len() > 10);
    assert!(timeline.samples.iter().any(|s| s.tps > 0.0));
    if strategy != Strategy::None {
        assert!(reason.is_some(), "{strategy} did not switch over in time");
    }
    if reason == Some(SwitchReason::Forced) {
        assert!(timeline.notes.iter().any(|n| n.text.contains("forcing")));
    }
    let dir = std::env::var_os("VMSTREAM_LIVE_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let json = dir.join(format!("converge-live-{strategy}.json"));
    let svg = dir.join(format!("converge-live-{strategy}.svg"));
    std::fs::write(
        &json,
        serde_json::json!({ "timeline": timeline, "downtime_ms": downtime.as_secs_f64() * 1e3 })
            .to_string(),
    )
    .unwrap();
    let title =
        format!("live guest (hotset 96 MiB of 256 MiB), 200 MiB/s link, --converge {strategy}");
    vmstream::telemetry::plot::plot_file(&json, &svg, &title, 1200, 760).unwrap();
    assert!(std::fs::read_to_string(&svg).unwrap().contains("guest TPS"));
}

#[test]
#[ignore = "slow: a live guest for up to a minute per strategy"]
fn live_qemu() {
    live(Strategy::Qemu);
}

#[test]
#[ignore = "slow: a live guest for up to a minute per strategy"]
fn live_direct_staged() {
    live(Strategy::DirectStaged);
}

#[test]
#[ignore = "slow: a live guest for a minute"]
fn live_none() {
    live(Strategy::None);
}
