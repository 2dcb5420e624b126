//! Drives each strategy through a simulated migration (a guest whose dirty rate falls with
//! the throttle, a fixed-bandwidth link), records the timeline, embeds it in a stats JSON
//! like `vmstream send --stats-json` writes, and plots it with `vmstream plot`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use vmstream::converge::{
    AutoConverge, AutoConvergeConfig, DirectStaged, DirectStagedConfig, NoThrottle,
    RoundObservation, SwitchReason, ThrottleStrategy,
};
use vmstream::memory::PAGE_SIZE;
use vmstream::telemetry::sampler::Sample;
use vmstream::telemetry::timeline::{Timeline, TimelineRecorder};

const MIB: f64 = (1u64 << 20) as f64;

/// A guest writing randomly in a hot working set, on a link of fixed bandwidth.
struct Sim {
    memory_pages: u64,
    hot_pages: u64,
    /// Unthrottled writes per second (pages).
    write_rate: f64,
    bandwidth: f64,
    tps: f64,
    /// Smallest run fraction the throttle achieves (measured: about 0.03 at p = 0.99,
    /// see converge_throttle_model.rs); 0 = the ideal `1 - p`.
    floor: f64,
}

impl Sim {
    /// Distinct hot pages dirtied in `secs` at throttle `p`.
    fn dirtied(&self, secs: f64, p: f64) -> u64 {
        let writes = self.write_rate * (1.0 - p).max(self.floor) * secs;
        (self.hot_pages as f64 * (1.0 - (-writes / self.hot_pages as f64).exp())) as u64
    }

    /// Runs a migration under `strategy`; returns the timeline and the switch reason
    /// (`None`: the 60 s timeout forced it, as `--on-timeout force` would).
    fn migrate(&self, strategy: &mut dyn ThrottleStrategy) -> (Timeline, Option<SwitchReason>) {
        let limit = Duration::from_millis(300);
        let mut rec = TimelineRecorder::new();
        let mut now = 0.0f64;
        let mut pending = self.memory_pages;
        let mut p = 0.0;
        let mut throttle_log = vec![(0.0, 0.0)];
        for round in 0..10_000u64 {
            let bytes = pending * PAGE_SIZE as u64;
            let secs = bytes as f64 / self.bandwidth;
            let dirty = self.dirtied(secs, p);
            let start = Duration::from_secs_f64(now);
            now += secs;
            rec.round(
                round,
                start,
                Duration::from_secs_f64(secs),
                dirty * PAGE_SIZE as u64,
                bytes,
                0,
                false,
            );
            let obs = RoundObservation {
                round,
                now: Duration::from_secs_f64(now),
                dirty_pages: dirty,
                dirty_bytes: dirty * PAGE_SIZE as u64,
                bytes_sent: bytes,
                duration: Duration::from_secs_f64(secs),
                bandwidth_bytes_per_s: self.bandwidth,
                avg_bandwidth: self.bandwidth,
                remaining_dirty_bytes: dirty * PAGE_SIZE as u64,
                downtime_limit: limit,
            };
            let d = strategy.observe(&obs);
            assert!((0.0..=0.99).contains(&d.throttle));
            if let Some(n) = &d.note {
                rec.note(obs.now, n.clone());
            }
            if d.throttle != p {
                p = d.throttle;
                rec.throttle(obs.now, p);
                throttle_log.push((now, p));
            }
            let timed_out = now >= 60.0;
            if d.switchover.is_some() || timed_out {
                let reason = d.switchover;
                let final_secs = (dirty * PAGE_SIZE as u64) as f64 / self.bandwidth;
                rec.pause(obs.now);
                rec.round(
                    round + 1,
                    obs.now,
                    Duration::from_secs_f64(final_secs),
                    0,
                    dirty * PAGE_SIZE as u64,
                    0,
                    true,
                );
                let downtime = final_secs + 0.05;
                rec.resumed_after(Duration::from_secs_f64(downtime));
                let (pause, resume) = (now, now + downtime);
                // TPS every 100 ms from a 2 s warm-up to 2 s after the resume.
                let mut samples = Vec::new();
                let mut t = 0.0;
                while t < resume + 2.0 + 2.0 {
                    let mig_t = t - 2.0;
                    let thr = throttle_log
                        .iter()
                        .take_while(|&&(at, _)| at <= mig_t)
                        .last()
                        .map_or(0.0, |&(_, q)| q);
                    let wobble = 1.0 + 0.05 * ((t * 7.0).sin());
                    let tps = if mig_t >= pause && mig_t < resume {
                        0.0
                    } else if mig_t >= resume {
                        self.tps * wobble
                    } else {
                        self.tps * (1.0 - thr) * wobble
                    };
                    samples.push(Sample {
                        at: Duration::from_secs_f64(t),
                        tx_count: 0,
                        tps,
                    });
                    t += 0.1;
                }
                return (rec.finish(&samples, -2000.0), reason);
            }
            pending = dirty;
        }
        panic!("no switchover in 10000 rounds");
    }
}

fn sim() -> Sim {
    Sim {
        memory_pages: (1u64 << 30) / PAGE_SIZE as u64,
        hot_pages: (256u64 << 20) / PAGE_SIZE as u64,
        write_rate: 60_000.0,
        bandwidth: 100.0 * MIB,
        tps: 50_000.0,
        floor: 0.0,
    }
}

fn stats_json(timeline: &Timeline, downtime_ms: f64) -> String {
    serde_json::json!({
        "role": "source",
        "outcome": "committed",
        "downtime_ms": downtime_ms,
        "per_round": [],
        "timeline": timeline,
    })
    .to_string()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "vmstream-converge-plot-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_strategy_ends_and_throttles_as_specified() {
    let s = sim();
    // Unthrottled, the hot set (256 MiB) refills faster than 100 MiB/s drains it: only
    // the timeout ends the migration.
    let (t, reason) = s.migrate(&mut NoThrottle);
    assert!(t.rounds.iter().all(|r| r.throttle == 0.0));
    assert_eq!(reason, None);

    // Auto-converge steps up until the dirty set fits 300 ms (30 MiB).
    let (t, reason) = s.migrate(&mut AutoConverge::new(AutoConvergeConfig::default()));
    assert_eq!(reason, Some(SwitchReason::Converged));
    let steps: Vec<f64> = t
        .rounds
        .iter()
        .filter(|r| !r.paused)
        .map(|r| r.throttle)
        .collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    assert!(steps.iter().any(|&p| p >= 0.2));
    let (p, r) = t.downtime().unwrap();
    assert!(r - p <= 350.0, "downtime {} ms", r - p);

    // Direct-staged throttles and switches over before the timeout.
    let (t, reason) = s.migrate(&mut DirectStaged::new(DirectStagedConfig::default()));
    assert!(reason.is_some());
    assert!(t.rounds.iter().any(|r| r.throttle > 0.0));
    assert!(t.pause_ms.unwrap() < 60_000.0);
}

#[test]
fn plot_command_writes_an_svg_with_all_series() {
    let dir = tmpdir("cli");
    let s = sim();
    let (t, _) = s.migrate(&mut AutoConverge::new(AutoConvergeConfig::default()));
    let (p, r) = t.downtime().unwrap();
    let stats = dir.join("stats.json");
    std::fs::write(&stats, stats_json(&t, r - p)).unwrap();
    let out = dir.join("plot.svg");
    let status = Command::new(env!("CARGO_BIN_EXE_vmstream"))
        .args(["plot"])
        .arg(&stats)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
    for label in [
        "dirtied during round (MiB)",
        "sent in round (MiB)",
        "guest TPS (right axis)",
        "throttle (%)",
        "downtime ",
        "guest transactions/s",
        "stats.json",
    ] {
        assert!(svg.contains(label), "missing {label:?}");
    }
    // One bar pair per round plus the downtime bands: at least 2 * rounds rectangles.
    assert!(svg.matches("<rect").count() >= 2 * t.rounds.len());
    // Keep a copy for a look by eye when asked.
    if let Ok(keep) = std::env::var("VMSTREAM_PLOT_KEEP") {
        for (name, strategy) in [
            (
                "qemu",
                Box::new(AutoConverge::new(AutoConvergeConfig::default()))
                    as Box<dyn ThrottleStrategy>,
            ),
            (
                "direct-staged",
                Box::new(DirectStaged::new(DirectStagedConfig::default())),
            ),
            ("none", Box::new(NoThrottle)),
        ] {
            let mut strategy = strategy;
            let (t, _) = s.migrate(strategy.as_mut());
            let (p, r) = t.downtime().unwrap();
            let f = PathBuf::from(&keep).join(format!("{name}.json"));
            std::fs::write(&f, stats_json(&t, r - p)).unwrap();
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn plot_command_reports_bad_input() {
    let dir = tmpdir("bad");
    let stats = dir.join("empty.json");
    std::fs::write(&stats, "{}").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmstream"))
        .arg("plot")
        .arg(&stats)
        .arg("-o")
        .arg(dir.join("x.svg"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no `timeline` or `per_round`"));
    let out = Command::new(env!("CARGO_BIN_EXE_vmstream"))
        .arg("plot")
        .arg(dir.join("missing.json"))
        .arg("-o")
        .arg(dir.join("x.svg"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.json"));
    assert!(!dir.join("x.svg").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Throttle seconds spent (the integral of p over the migration: guest CPU time lost).
fn throttle_seconds(t: &Timeline) -> f64 {
    t.rounds
        .iter()
        .filter(|r| !r.paused)
        .map(|r| r.throttle * r.duration_ms / 1e3)
        .sum()
}

#[test]
#[ignore = "prints the strategy comparison table of CONVERGENCE.md"]
fn strategy_table() {
    println!("| link MiB/s | writes/s | throttle floor | strategy | switchover | at s | rounds | downtime ms | throttle-s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (bw, writes, floor) in [
        (400.0, 60_000.0, 0.03),
        (100.0, 60_000.0, 0.03),
        (50.0, 60_000.0, 0.03),
        (100.0, 600_000.0, 0.0),
        (100.0, 600_000.0, 0.03),
        (50.0, 600_000.0, 0.03),
    ] {
        {
            let s = Sim {
                bandwidth: bw * MIB,
                write_rate: writes,
                floor,
                ..sim()
            };
            for name in ["none", "qemu", "direct-staged"] {
                let mut st: Box<dyn ThrottleStrategy> = match name {
                    "qemu" => Box::new(AutoConverge::new(AutoConvergeConfig::default())),
                    "direct-staged" => Box::new(DirectStaged::new(DirectStagedConfig::default())),
                    _ => Box::new(NoThrottle),
                };
                let (t, reason) = s.migrate(st.as_mut());
                let (p, r) = t.downtime().unwrap();
                println!(
                    "| {bw} | {writes} | {floor} | {name} | {} | {:.1} | {} | {:.0} | {:.1} |",
                    match reason {
                        Some(r) => r.name(),
                        None => "timeout 60 s",
                    },
                    p / 1e3,
                    t.rounds.len(),
                    r - p,
                    throttle_seconds(&t)
                );
                if std::env::var_os("VMSTREAM_NOTES").is_some() {
                    for n in &t.notes {
                        println!("    {:.1} s: {}", n.t_ms / 1e3, n.text);
                    }
                }
            }
        }
    }
}

#[test]
fn plot_reads_the_migration_statistics_without_a_timeline() {
    use vmstream::telemetry::stats::{MigrationOutcome, MigrationStats, Role, RoundStats};
    // The statistics `vmstream send --stats-json` writes today (no timeline yet).
    let mut stats = MigrationStats {
        outcome: MigrationOutcome::Committed,
        downtime_ms: Some(42.0),
        ..MigrationStats::new(Role::Source)
    };
    for (round, ms, wire, rate, paused) in [
        (0u64, 2000.0, 500 << 20, 1000.0, false),
        (1, 300.0, 8 << 20, 900.0, false),
        (2, 40.0, 1 << 20, 0.0, true),
    ] {
        stats.per_round.push(RoundStats {
            round,
            paused,
            duration_ms: ms,
            wire_bytes: wire,
            dirty_pages_per_s: rate,
            ..Default::default()
        });
    }
    let dir = tmpdir("stats");
    let path = dir.join("send.json");
    stats.write_json(&path).unwrap();
    let t =
        vmstream::telemetry::plot::load_timeline(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(t.rounds.len(), 3);
    assert_eq!(t.rounds[1].start_ms, 2000.0);
    assert_eq!(t.rounds[1].sent_bytes, 8 << 20);
    assert_eq!(t.rounds[0].dirty_bytes, 2000 * 4096);
    assert_eq!(t.downtime(), Some((2300.0, 2342.0)));
    let out = dir.join("send.svg");
    vmstream::telemetry::plot::plot_file(&path, &out, "send", 900, 600).unwrap();
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.contains("downtime 42.0 ms"));
    // No samples: no TPS series.
    assert!(!svg.contains("guest TPS"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn plot_never_panics_on_odd_timelines() {
    use quickcheck::{Arbitrary, Gen, QuickCheck};
    use vmstream::telemetry::timeline::{TimelineRound, TimelineSample};

    fn odd(g: &mut Gen) -> f64 {
        let any = f64::arbitrary(g);
        let plain = u16::arbitrary(g) as f64 * 10.0;
        *g.choose(&[
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -1.0,
            0.0,
            1e-9,
            1e300,
            any,
            plain,
            plain,
        ])
        .unwrap()
    }
    fn prop(seed: u64) -> bool {
        let mut g = Gen::new(20 + (seed % 50) as usize);
        let n = usize::arbitrary(&mut g) % 30;
        let t = Timeline {
            samples: (0..n)
                .map(|_| TimelineSample {
                    t_ms: odd(&mut g),
                    tps: odd(&mut g),
                    throttle: odd(&mut g),
                    disk_write_limit: 0,
                })
                .collect(),
            rounds: (0..n)
                .map(|i| TimelineRound {
                    round: i as u64,
                    start_ms: odd(&mut g),
                    duration_ms: odd(&mut g),
                    dirty_bytes: u64::arbitrary(&mut g),
                    sent_bytes: u64::arbitrary(&mut g),
                    deferred_bytes: 0,
                    throttle: odd(&mut g),
                    paused: bool::arbitrary(&mut g),
                    disk_write_limit: 0,
                })
                .collect(),
            pause_ms: Some(odd(&mut g)),
            resume_ms: Some(odd(&mut g)),
            notes: Vec::new(),
        };
        match vmstream::telemetry::plot::render_svg(&t, "odd", 640, 480) {
            Ok(svg) => svg.starts_with("<svg"),
            Err(e) => matches!(e, vmstream::telemetry::plot::PlotError::NoData),
        }
    }
    QuickCheck::new()
        .tests(300)
        .quickcheck(prop as fn(u64) -> bool);
}
