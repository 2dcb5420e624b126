//! Direct-then-staged throttling (our design; `vmstream/CONVERGENCE.md` has the reasoning).
//!
//! ```text
//! Iterating --dirty pages changed < 5%--+--remaining < avg bandwidth x 5 s--> Direct90
//!                                       \--otherwise--> Staged
//! Direct90 --3 s--> Direct99 --3 s--> Staged
//! Staged: p <- max(1 - (B x 0.2 / D) x (1 - p_in_force), p_last_staged + min_step)
//!         --p would exceed 99%--> Hold99 --3 s--> Forced (switchover, SwitchReason::Forced)
//! any phase: expected downtime fits the limit --> switchover (Converged)
//! ```
//!
//! `B` is the average bandwidth and `D` the dirty rate observed in the last round, both in
//! bytes per second, so `B x 0.2 / D` is a pure ratio. `D` was measured under the throttle
//! `p_in_force`, so `D / (1 - p_in_force)` estimates the unthrottled rate and the formula is
//! the throttle that holds the guest's dirty rate at 20% of the bandwidth.

use std::time::Duration;

use crate::converge::{clamp_throttle, Decision, RoundObservation, SwitchReason, ThrottleStrategy};
use crate::converge::{SettingError, MAX_THROTTLE};

/// Direct-staged settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DirectStagedConfig {
    /// Relative change of the dirty page count below which iterating has stalled.
    pub stable_change: f64,
    /// Direct throttling when the remaining bytes could be sent in this long at the
    /// average bandwidth.
    pub direct_window: Duration,
    /// First direct throttle.
    pub direct_first: f64,
    /// Second direct throttle.
    pub direct_second: f64,
    /// How long each direct throttle and the final 99% are held.
    pub hold: Duration,
    /// Target dirty rate under staged throttling, as a fraction of the bandwidth.
    pub staged_target: f64,
    /// Smallest increase of the staged throttle per round (keeps it strictly rising, so
    /// staged throttling always ends).
    pub staged_min_step: f64,
}

impl Default for DirectStagedConfig {
    fn default() -> Self {
        DirectStagedConfig {
            stable_change: 0.05,
            direct_window: Duration::from_secs(5),
            direct_first: 0.90,
            direct_second: 0.99,
            hold: Duration::from_secs(3),
            staged_target: 0.2,
            staged_min_step: 0.05,
        }
    }
}

impl DirectStagedConfig {
    /// Checks every setting's range.
    pub fn validate(&self) -> Result<(), SettingError> {
        let check = |name: &'static str, v: f64, ok: bool, range: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(SettingError::OutOfRange {
                    name,
                    value: v,
                    range,
                })
            }
        };
        let t = |v: f64| v > 0.0 && v <= MAX_THROTTLE;
        check(
            "stable_change",
            self.stable_change,
            self.stable_change > 0.0 && self.stable_change <= 1.0,
            "(0, 1]",
        )?;
        check(
            "direct_first",
            self.direct_first,
            t(self.direct_first),
            "(0, 0.99]",
        )?;
        check(
            "direct_second",
            self.direct_second,
            t(self.direct_second),
            "(0, 0.99]",
        )?;
        check(
            "staged_target",
            self.staged_target,
            self.staged_target > 0.0 && self.staged_target <= 1.0,
            "(0, 1]",
        )?;
        check(
            "staged_min_step",
            self.staged_min_step,
            self.staged_min_step > 0.0 && self.staged_min_step <= MAX_THROTTLE,
            "(0, 0.99]",
        )
    }
}

/// Where the strategy is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    /// Unthrottled; remembers the last round's dirty page count.
    Iterating {
        /// Dirty pages of the previous round (None before the first observation).
        prev_dirty_pages: Option<u64>,
    },
    /// Direct throttling at the first throttle since `since`.
    DirectFirst {
        /// Start of the phase.
        since: Duration,
    },
    /// Direct throttling at the second throttle since `since`.
    DirectSecond {
        /// Start of the phase.
        since: Duration,
    },
    /// Staged throttling; `last` is the last staged throttle (0 before the first step).
    Staged {
        /// The previous staged throttle.
        last: f64,
    },
    /// At 99% since `since`, waiting to force the switchover.
    Hold {
        /// Start of the hold.
        since: Duration,
    },
    /// The switchover was forced.
    Forced,
}

/// The direct-staged strategy.
#[derive(Debug, Clone)]
pub struct DirectStaged {
    cfg: DirectStagedConfig,
    phase: Phase,
    throttle: f64,
}

impl DirectStaged {
    /// A strategy with `cfg` (see [`DirectStagedConfig::validate`]).
    pub fn new(cfg: DirectStagedConfig) -> DirectStaged {
        DirectStaged {
            cfg,
            phase: Phase::Iterating {
                prev_dirty_pages: None,
            },
            throttle: 0.0,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The throttle now in force.
    pub fn throttle(&self) -> f64 {
        self.throttle
    }

    /// One staged step from the throttle in force, given average bandwidth `b` and the
    /// dirty rate `d` observed under it (bytes/s): `1 - (b * target / d) * (1 - p_in_force)`.
    /// Not clamped: above [`MAX_THROTTLE`] means the strategy has run out of throttle; -inf
    /// (no dirtying) means no throttle is needed.
    pub fn staged_formula(target: f64, b: f64, d: f64, p_in_force: f64) -> f64 {
        if d.is_nan() || d <= 0.0 || !b.is_finite() {
            return f64::NEG_INFINITY;
        }
        1.0 - (b.max(0.0) * target / d) * (1.0 - p_in_force)
    }

    /// Whether the dirty page count changed by less than `stable_change` relative to `prev`.
    fn stalled(&self, prev: u64, now: u64) -> bool {
        if prev == 0 {
            return now == 0;
        }
        (now as f64 - prev as f64).abs() / (prev as f64) < self.cfg.stable_change
    }

    /// The next staged throttle after `last`, or the hold when it would exceed 99%; `why`
    /// starts the note.
    fn staged_step(&mut self, obs: &RoundObservation, last: f64, why: &str) -> Decision {
        let formula = Self::staged_formula(
            self.cfg.staged_target,
            obs.avg_bandwidth,
            obs.dirty_rate(),
            self.throttle,
        );
        let next = formula.max(last + self.cfg.staged_min_step);
        if next > MAX_THROTTLE {
            self.phase = Phase::Hold { since: obs.now };
            self.throttle = MAX_THROTTLE;
            return Decision::iterate(MAX_THROTTLE).with_note(format!(
                "{why}staged throttling: next throttle {:.1}% would exceed 99%: holding 99% for {:.1} s",
                next * 100.0,
                self.cfg.hold.as_secs_f64()
            ));
        }
        let from = self.throttle;
        self.throttle = clamp_throttle(next);
        self.phase = Phase::Staged {
            last: self.throttle,
        };
        Decision::iterate(self.throttle).with_note(format!(
            "{why}staged throttling: {:.1}% -> {:.1}% (bandwidth {:.0} B/s, dirty rate {:.0} B/s)",
            from * 100.0,
            self.throttle * 100.0,
            obs.avg_bandwidth,
            obs.dirty_rate()
        ))
    }

    fn advance(&mut self, obs: &RoundObservation) -> Decision {
        let held = |since: Duration| obs.now.saturating_sub(since) >= self.cfg.hold;
        match self.phase {
            Phase::Iterating { prev_dirty_pages } => {
                self.phase = Phase::Iterating {
                    prev_dirty_pages: Some(obs.dirty_pages),
                };
                match prev_dirty_pages {
                    Some(prev) if self.stalled(prev, obs.dirty_pages) => {
                        let window = obs.avg_bandwidth * self.cfg.direct_window.as_secs_f64();
                        if (obs.remaining_dirty_bytes as f64) < window {
                            self.phase = Phase::DirectFirst { since: obs.now };
                            self.throttle = self.cfg.direct_first;
                            Decision::iterate(self.throttle).with_note(format!(
                                "dirty pages stable ({prev} -> {}), {} B remaining < {:.1} s of bandwidth: direct throttling {:.0}%",
                                obs.dirty_pages,
                                obs.remaining_dirty_bytes,
                                self.cfg.direct_window.as_secs_f64(),
                                self.throttle * 100.0
                            ))
                        } else {
                            let why = format!(
                                "dirty pages stable ({prev} -> {}), {} B remaining >= {:.1} s of bandwidth: ",
                                obs.dirty_pages,
                                obs.remaining_dirty_bytes,
                                self.cfg.direct_window.as_secs_f64()
                            );
                            self.staged_step(obs, 0.0, &why)
                        }
                    }
                    _ => Decision::iterate(0.0),
                }
            }
            Phase::DirectFirst { since } if held(since) => {
                self.phase = Phase::DirectSecond { since: obs.now };
                self.throttle = self.cfg.direct_second;
                Decision::iterate(self.throttle)
                    .with_note(format!("direct throttling {:.0}%", self.throttle * 100.0))
            }
            Phase::DirectSecond { since } if held(since) => {
                self.staged_step(obs, 0.0, "direct throttling did not reach the limit: ")
            }
            Phase::DirectFirst { .. } | Phase::DirectSecond { .. } => {
                Decision::iterate(self.throttle)
            }
            Phase::Staged { last } => self.staged_step(obs, last, ""),
            Phase::Hold { since } if held(since) => {
                self.phase = Phase::Forced;
                Decision::switch(self.throttle, SwitchReason::Forced).with_note(format!(
                    "throttle held at 99% for {:.1} s and the expected downtime is still {:.0} ms > limit {:.0} ms: forcing the switchover",
                    obs.now.saturating_sub(since).as_secs_f64(),
                    obs.expected_downtime().as_secs_f64() * 1e3,
                    obs.downtime_limit.as_secs_f64() * 1e3
                ))
            }
            Phase::Hold { .. } => Decision::iterate(self.throttle),
            Phase::Forced => Decision::switch(self.throttle, SwitchReason::Forced),
        }
    }
}

impl ThrottleStrategy for DirectStaged {
    fn observe(&mut self, obs: &RoundObservation) -> Decision {
        if obs.fits_downtime() && self.phase != Phase::Forced {
            // Still remember the count, should the caller keep iterating anyway.
            if let Phase::Iterating { .. } = self.phase {
                self.phase = Phase::Iterating {
                    prev_dirty_pages: Some(obs.dirty_pages),
                };
            }
            return Decision::switch(self.throttle, SwitchReason::Converged);
        }
        self.advance(obs)
    }

    fn name(&self) -> &'static str {
        "direct-staged"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A round ending at `now_ms`, `dirty_pages` dirtied over 1 s, bandwidth 100 MiB/s,
    /// `remaining` bytes left (never fitting 300 ms unless `remaining` < 30 MiB).
    fn round(now_ms: u64, dirty_pages: u64, remaining: u64) -> RoundObservation {
        RoundObservation {
            round: 1,
            now: Duration::from_millis(now_ms),
            dirty_pages,
            dirty_bytes: dirty_pages * 4096,
            bytes_sent: 100 * MIB,
            duration: Duration::from_secs(1),
            bandwidth_bytes_per_s: 100.0 * MIB as f64,
            avg_bandwidth: 100.0 * MIB as f64,
            remaining_dirty_bytes: remaining,
            downtime_limit: Duration::from_millis(300),
        }
    }

    #[test]
    fn enters_throttling_only_on_small_change() {
        let mut s = DirectStaged::new(DirectStagedConfig::default());
        // 10000 -> 9000 (-10%) -> 9500 (+5.6%) -> 10000 (+5.3%): keeps iterating.
        for (t, d) in [(1000, 10_000), (2000, 9000), (3000, 9500), (4000, 10_000)] {
            let dec = s.observe(&round(t, d, 200 * MIB));
            assert_eq!(dec, Decision::iterate(0.0), "at {t}");
        }
        // 10000 -> 10490 (+4.9%): stalled, remaining 200 MiB < 500 MiB: direct.
        let dec = s.observe(&round(5000, 10_490, 200 * MIB));
        assert_eq!(dec.throttle, 0.90);
        assert!(dec.note.unwrap().contains("direct throttling 90%"));
        assert_eq!(
            s.phase(),
            Phase::DirectFirst {
                since: Duration::from_secs(5)
            }
        );
    }

    #[test]
    fn direct_runs_90_then_99_for_3_s_each_then_staged_then_forced() {
        let mut s = DirectStaged::new(DirectStagedConfig::default());
        s.observe(&round(0, 1000, 200 * MIB));
        assert_eq!(s.observe(&round(1000, 1000, 200 * MIB)).throttle, 0.90);
        // 90% until 3 s have passed (rounds of 700 ms).
        for t in [1700, 2400, 3100, 3800] {
            assert_eq!(s.observe(&round(t, 1000, 200 * MIB)).throttle, 0.90, "{t}");
        }
        assert_eq!(s.observe(&round(4000, 1000, 200 * MIB)).throttle, 0.99);
        for t in [4500, 5000, 6999] {
            assert_eq!(s.observe(&round(t, 1000, 200 * MIB)).throttle, 0.99, "{t}");
        }
        // Staged: the guest still dirties 1000 pages/s under 99%, the bandwidth is 100
        // MiB/s: the estimate of the unthrottled rate (100000 pages/s = 390 MiB/s) needs
        // 1 - 20/390 = 94.9%.
        let d = s.observe(&round(7000, 1000, 200 * MIB));
        let want = 1.0 - (100.0 * MIB as f64 * 0.2 / (1000.0 * 4096.0)) * 0.01;
        assert!((d.throttle - want).abs() < 1e-9, "{}", d.throttle);
        assert!(matches!(s.phase(), Phase::Staged { .. }));
        // Then monotone, at least +5% a round, until it would exceed 99%.
        let mut last = d.throttle;
        let mut t = 7000;
        loop {
            t += 1000;
            let d = s.observe(&round(t, 1000, 200 * MIB));
            assert!(d.throttle >= last && d.throttle <= MAX_THROTTLE);
            last = d.throttle;
            if matches!(s.phase(), Phase::Hold { .. }) {
                assert_eq!(d.throttle, 0.99);
                assert!(d.note.unwrap().contains("holding 99%"));
                break;
            }
            assert!(t < 20_000, "never reached the hold");
        }
        let hold_start = t;
        // Held 3 s at 99%, then forced.
        for dt in [1000, 2000, 2999] {
            let d = s.observe(&round(hold_start + dt, 1000, 200 * MIB));
            assert_eq!(d, Decision::iterate(0.99));
        }
        let d = s.observe(&round(hold_start + 3000, 1000, 200 * MIB));
        assert_eq!(d.switchover, Some(SwitchReason::Forced));
        assert!(d.note.unwrap().contains("forcing the switchover"));
        assert_eq!(s.phase(), Phase::Forced);
        // Stays forced even if the next estimate fits.
        let d = s.observe(&round(hold_start + 4000, 1000, 0));
        assert_eq!(d.switchover, Some(SwitchReason::Forced));
    }

    #[test]
    fn large_remainder_goes_straight_to_staged() {
        let mut s = DirectStaged::new(DirectStagedConfig::default());
        // Dirtying 51200 pages/s = 200 MiB/s at 100 MiB/s: p = 1 - 20/200 = 0.9.
        s.observe(&round(0, 51_200, 600 * MIB));
        let d = s.observe(&round(1000, 51_200, 600 * MIB));
        assert!((d.throttle - 0.9).abs() < 1e-9, "{}", d.throttle);
        assert_eq!(s.phase(), Phase::Staged { last: d.throttle });
        let note = d.note.unwrap();
        assert!(
            note.starts_with("dirty pages stable (51200 -> 51200)"),
            "{note}"
        );
        assert!(note.contains("staged throttling: 0.0% -> 90.0%"), "{note}");
        // The guest dirties 10% of that under 90%: same estimate, but at least +5%.
        let d = s.observe(&round(2000, 5120, 600 * MIB));
        assert!((d.throttle - 0.95).abs() < 1e-9, "{}", d.throttle);
    }

    #[test]
    fn switches_over_when_it_fits_in_any_phase() {
        let mut s = DirectStaged::new(DirectStagedConfig::default());
        s.observe(&round(0, 1000, 200 * MIB));
        s.observe(&round(1000, 1000, 200 * MIB));
        let d = s.observe(&round(1500, 1000, 10 * MIB));
        assert_eq!(d, Decision::switch(0.90, SwitchReason::Converged));
    }

    #[test]
    fn formula_reading_is_monotone_in_the_dirty_rate_and_the_throttle() {
        let b = 100.0;
        let f = |d: f64, p: f64| DirectStaged::staged_formula(0.2, b, d, p);
        // More dirtying or a stronger throttle in force for the same observed rate: more
        // throttle.
        assert!(f(200.0, 0.0) < f(400.0, 0.0));
        assert!(f(200.0, 0.0) < f(200.0, 0.5));
        // At the target rate the throttle in force is kept.
        assert!((f(20.0, 0.5) - 0.5).abs() < 1e-12);
        assert_eq!(f(0.0, 0.5), f64::NEG_INFINITY);
        assert_eq!(f(f64::NAN, 0.5), f64::NEG_INFINITY);
    }

    #[test]
    fn validation() {
        DirectStagedConfig::default().validate().unwrap();
        let c = DirectStagedConfig {
            staged_min_step: 0.0,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = DirectStagedConfig {
            direct_second: 1.0,
            ..Default::default()
        };
        assert!(c.validate().is_err());
    }
}
