//! Properties of the throttling strategies over random observation sequences: bounds,
//! QEMU's step ladder and pacing, direct-staged's phase order, hold times, monotone staged
//! throttle and guaranteed end.

use std::time::Duration;

use quickcheck::{Arbitrary, Gen, QuickCheck, TestResult};
use vmstream::converge::direct_staged::Phase;
use vmstream::converge::{
    AutoConverge, AutoConvergeConfig, DirectStaged, DirectStagedConfig, NoThrottle,
    RoundObservation, Strategy, SwitchReason, ThrottleStrategy,
};

const MIB: u64 = 1 << 20;

/// A random run: rounds of 50 ms .. 2 s, dirty page counts that wander or stay put,
/// bandwidth 10 .. 1000 MiB/s, and (if `may_fit`) an occasional round that fits 300 ms.
#[derive(Debug, Clone)]
struct Run {
    rounds: Vec<RoundObservation>,
}

fn gen_run(g: &mut Gen, may_fit: bool, stable: bool) -> Run {
    let n = 1 + usize::arbitrary(g) % 200;
    let mut now = Duration::ZERO;
    let mut dirty = 1000 + u64::arbitrary(g) % 100_000;
    let mut rounds = Vec::with_capacity(n);
    for round in 0..n as u64 {
        let duration = Duration::from_millis(50 + u64::arbitrary(g) % 1950);
        now += duration;
        // Stable runs change by under 5%; others jump around.
        let jitter = if stable {
            u64::arbitrary(g) % (dirty / 25 + 1)
        } else {
            u64::arbitrary(g) % (dirty / 2 + 1)
        };
        dirty = if bool::arbitrary(g) {
            dirty + jitter
        } else {
            (dirty - jitter).max(1)
        };
        let bw = (10 + u64::arbitrary(g) % 990) * MIB;
        let fits = may_fit && u8::arbitrary(g) % 10 == 0;
        let remaining = if fits {
            bw / 10
        } else {
            bw + u64::arbitrary(g) % (20 * bw)
        };
        rounds.push(RoundObservation {
            round,
            now,
            dirty_pages: dirty,
            dirty_bytes: dirty * 4096,
            bytes_sent: bw * duration.as_millis() as u64 / 1000,
            duration,
            bandwidth_bytes_per_s: bw as f64,
            avg_bandwidth: bw as f64,
            remaining_dirty_bytes: remaining,
            downtime_limit: Duration::from_millis(300),
        });
    }
    Run { rounds }
}

impl Arbitrary for Run {
    fn arbitrary(g: &mut Gen) -> Run {
        let may_fit = bool::arbitrary(g);
        let stable = bool::arbitrary(g);
        gen_run(g, may_fit, stable)
    }
}

/// A run whose rounds never fit the downtime and whose dirty count is stable.
#[derive(Debug, Clone)]
struct StuckRun(Run);

impl Arbitrary for StuckRun {
    fn arbitrary(g: &mut Gen) -> StuckRun {
        let mut r = gen_run(g, false, true);
        // At least 120 s of rounds (the worst case needs about 57 s: 2 s to enter, two
        // 3 s holds overshooting by up to a 2 s round, 20 staged rounds, the final hold).
        while r.rounds.last().unwrap().now < Duration::from_secs(120) {
            let mut next = *r.rounds.last().unwrap();
            next.round += 1;
            next.now += next.duration;
            r.rounds.push(next);
        }
        StuckRun(r)
    }
}

fn qc() -> QuickCheck {
    QuickCheck::new().tests(500)
}

#[test]
fn every_strategy_stays_in_bounds_and_switches_when_it_fits() {
    fn prop(run: Run) -> TestResult {
        for s in Strategy::ALL {
            let mut st = s.build();
            for o in &run.rounds {
                let d = st.observe(o);
                if !(0.0..=0.99).contains(&d.throttle) {
                    return TestResult::error(format!("{s}: throttle {}", d.throttle));
                }
                if o.fits_downtime() && d.switchover.is_none() {
                    return TestResult::error(format!("{s}: fits but no switchover"));
                }
                if d.switchover == Some(SwitchReason::Converged) && !o.fits_downtime() {
                    return TestResult::error(format!("{s}: converged but does not fit"));
                }
            }
        }
        TestResult::passed()
    }
    qc().quickcheck(prop as fn(Run) -> TestResult);
}

#[test]
fn qemu_climbs_its_ladder_at_most_every_two_seconds() {
    fn prop(run: Run) -> TestResult {
        let mut s = AutoConverge::new(AutoConvergeConfig::default());
        let ladder = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99];
        let mut level = 0;
        let mut last_step = Duration::ZERO;
        for o in &run.rounds {
            let d = s.observe(o);
            if d.throttle == ladder[level] {
                if d.switchover == Some(SwitchReason::Forced) {
                    return TestResult::error("auto-converge forced a switchover");
                }
                continue;
            }
            // The only move is one rung up, two >= 1 s periods after the last step.
            if level + 1 >= ladder.len() || d.throttle != ladder[level + 1] {
                return TestResult::error(format!("{} -> {}", ladder[level], d.throttle));
            }
            if o.now < last_step + Duration::from_secs(2) {
                return TestResult::error(format!("step at {:?} after {:?}", o.now, last_step));
            }
            if d.note.is_none() {
                return TestResult::error("step without a note");
            }
            level += 1;
            last_step = o.now;
        }
        TestResult::passed()
    }
    qc().quickcheck(prop as fn(Run) -> TestResult);
}

#[test]
fn direct_staged_follows_its_phase_order() {
    fn prop(run: Run) -> TestResult {
        let cfg = DirectStagedConfig::default();
        let mut s = DirectStaged::new(cfg);
        let mut prev_dirty: Option<u64> = None;
        let mut staged_last: Option<f64> = None;
        for o in &run.rounds {
            let before = s.phase();
            let before_throttle = s.throttle();
            let d = s.observe(o);
            let after = s.phase();
            let held = |since: Duration| o.now.saturating_sub(since) >= cfg.hold;
            let ok = match (before, after) {
                (a, b) if a == b => true,
                (Phase::Iterating { .. }, Phase::Iterating { .. }) => true,
                (Phase::Iterating { .. }, Phase::DirectFirst { .. } | Phase::Staged { .. })
                | (Phase::Iterating { .. }, Phase::Hold { .. }) => {
                    // Only on a change under 5%.
                    let prev = prev_dirty.unwrap_or(0) as f64;
                    prev > 0.0 && (o.dirty_pages as f64 - prev).abs() / prev < 0.05
                }
                (Phase::DirectFirst { since }, Phase::DirectSecond { .. }) => held(since),
                (Phase::DirectSecond { since }, Phase::Staged { .. } | Phase::Hold { .. }) => {
                    held(since)
                }
                (Phase::Staged { .. }, Phase::Staged { .. } | Phase::Hold { .. }) => true,
                (Phase::Hold { since }, Phase::Forced) => held(since),
                _ => false,
            };
            if !ok {
                return TestResult::error(format!("{before:?} -> {after:?} at {:?}", o.now));
            }
            if o.fits_downtime() && before != Phase::Forced && d.throttle != before_throttle {
                return TestResult::error("throttle changed on a converged switchover");
            }
            match after {
                Phase::DirectFirst { .. } if d.throttle != 0.90 => {
                    return TestResult::error("direct first is not 90%")
                }
                Phase::DirectSecond { .. } | Phase::Hold { .. } if d.throttle != 0.99 => {
                    return TestResult::error("direct second / hold is not 99%")
                }
                Phase::Staged { .. } if before == after && d.switchover.is_none() => {
                    return TestResult::error("staged round without a step");
                }
                Phase::Staged { last } if before != after => {
                    // Staged: strictly rising by the minimum step from its previous value.
                    if let Some(p) = staged_last {
                        if last < p + cfg.staged_min_step - 1e-12 {
                            return TestResult::error(format!("staged {p} -> {last}"));
                        }
                    }
                    if d.throttle != last || last > 0.99 {
                        return TestResult::error("staged throttle out of step");
                    }
                    staged_last = Some(last);
                }
                _ => {}
            }
            if d.switchover == Some(SwitchReason::Forced) && d.note.is_none() && before != after {
                return TestResult::error("forced switchover without a note");
            }
            if let Phase::Iterating { .. } = after {
                if d.throttle != 0.0 {
                    return TestResult::error("throttled while iterating");
                }
            }
            prev_dirty = Some(o.dirty_pages);
        }
        TestResult::passed()
    }
    qc().quickcheck(prop as fn(Run) -> TestResult);
}

#[test]
fn direct_staged_always_ends_with_a_forced_switchover_when_stuck() {
    fn prop(run: StuckRun) -> TestResult {
        let mut s = DirectStaged::new(DirectStagedConfig::default());
        for o in &run.0.rounds {
            if let Some(reason) = s.observe(o).switchover {
                return if reason == SwitchReason::Forced {
                    TestResult::passed()
                } else {
                    TestResult::error("converged although nothing fits")
                };
            }
        }
        TestResult::error(format!(
            "no switchover within {:?} ({:?})",
            run.0.rounds.last().unwrap().now,
            s.phase()
        ))
    }
    qc().quickcheck(prop as fn(StuckRun) -> TestResult);
}

#[test]
fn none_never_throttles() {
    fn prop(run: Run) -> bool {
        let mut s = NoThrottle;
        run.rounds.iter().all(|o| s.observe(o).throttle == 0.0)
    }
    qc().quickcheck(prop as fn(Run) -> bool);
}

#[test]
fn odd_observations_never_panic_or_leave_bounds() {
    fn odd(g: &mut Gen) -> f64 {
        let any = f64::arbitrary(g);
        *g.choose(&[f64::NAN, f64::INFINITY, -1.0, 0.0, 1e300, any, 1e8])
            .unwrap()
    }
    fn prop(seed: u64) -> bool {
        let mut g = Gen::new(10 + (seed % 40) as usize);
        let mut strategies: Vec<Box<dyn ThrottleStrategy>> =
            Strategy::ALL.iter().map(|s| s.build()).collect();
        let mut now = Duration::ZERO;
        for round in 0..50 {
            let duration = Duration::from_nanos(u64::arbitrary(&mut g) % 3_000_000_000);
            now = now.saturating_add(duration);
            let pick = |g: &mut Gen| {
                let any = u64::arbitrary(g);
                *g.choose(&[0, 1, u64::MAX, any]).unwrap()
            };
            let dirty_pages = pick(&mut g);
            let o = RoundObservation {
                round,
                now,
                dirty_pages,
                dirty_bytes: dirty_pages.saturating_mul(4096),
                bytes_sent: pick(&mut g),
                duration,
                bandwidth_bytes_per_s: odd(&mut g),
                avg_bandwidth: odd(&mut g),
                remaining_dirty_bytes: pick(&mut g),
                downtime_limit: Duration::from_millis(u64::arbitrary(&mut g) % 1000),
            };
            for s in &mut strategies {
                let d = s.observe(&o);
                if !(0.0..=0.99).contains(&d.throttle) {
                    return false;
                }
            }
        }
        true
    }
    qc().quickcheck(prop as fn(u64) -> bool);
}
