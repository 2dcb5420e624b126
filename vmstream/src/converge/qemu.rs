//! QEMU-style auto-converge, written from its documented behaviour.
//!
//! Dirtying and transfer are accumulated over a *period* that ends at the first sync at
//! least [`AutoConvergeConfig::min_period`] (1 s) after it began. At the end of a period,
//! if the bytes dirtied in it exceed `trigger_threshold` (50%) of the bytes transferred in
//! it, the period is *high*; after `triggers` (2) high periods in a row the throttle steps:
//! to `initial` (20%) the first time, then `increment` (+10%) each time, capped at `max`
//! (99%). The count restarts after each step, so every step needs two more high periods.
//! The switchover happens when the expected downtime fits; auto-converge never forces it
//! (the migration's timeout rule does).

use std::time::Duration;

use crate::converge::{Decision, RoundObservation, SettingError, SwitchReason, ThrottleStrategy};

/// Auto-converge settings (QEMU parameter names in brackets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoConvergeConfig {
    /// First throttle (QEMU `cpu-throttle-initial`), in (0, 0.99].
    pub initial: f64,
    /// Step after the first (QEMU `cpu-throttle-increment`), in (0, 0.99].
    pub increment: f64,
    /// Cap (QEMU `max-cpu-throttle`), in (0, 0.99].
    pub max: f64,
    /// Dirtied / transferred ratio above which a period is high
    /// (QEMU `throttle-trigger-threshold`), in (0, 1].
    pub trigger_threshold: f64,
    /// Shortest period evaluated.
    pub min_period: Duration,
    /// High periods needed for one step.
    pub triggers: u32,
    /// A calm period resets the count of high periods (true: "in a row").
    pub consecutive: bool,
}

impl Default for AutoConvergeConfig {
    fn default() -> Self {
        AutoConvergeConfig {
            initial: 0.20,
            increment: 0.10,
            max: 0.99,
            trigger_threshold: 0.50,
            min_period: Duration::from_secs(1),
            triggers: 2,
            consecutive: true,
        }
    }
}

impl AutoConvergeConfig {
    /// Checks every setting's range.
    pub fn validate(&self) -> Result<(), SettingError> {
        let frac = |name: &'static str, v: f64, hi: f64| {
            if v > 0.0 && v <= hi {
                Ok(())
            } else {
                Err(SettingError::OutOfRange {
                    name,
                    value: v,
                    range: if hi < 1.0 { "(0, 0.99]" } else { "(0, 1]" },
                })
            }
        };
        frac(
            "cpu-throttle-initial",
            self.initial,
            crate::converge::MAX_THROTTLE,
        )?;
        frac(
            "cpu-throttle-increment",
            self.increment,
            crate::converge::MAX_THROTTLE,
        )?;
        frac("max-cpu-throttle", self.max, crate::converge::MAX_THROTTLE)?;
        frac("throttle-trigger-threshold", self.trigger_threshold, 1.0)?;
        if self.triggers == 0 {
            return Err(SettingError::OutOfRange {
                name: "triggers",
                value: 0.0,
                range: "[1, ...)",
            });
        }
        Ok(())
    }
}

/// The auto-converge strategy.
#[derive(Debug, Clone)]
pub struct AutoConverge {
    cfg: AutoConvergeConfig,
    period_start: Duration,
    period_dirty: u64,
    period_sent: u64,
    high: u32,
    throttle: f64,
}

impl AutoConverge {
    /// A strategy with `cfg` (see [`AutoConvergeConfig::validate`]); unthrottled at first.
    pub fn new(cfg: AutoConvergeConfig) -> AutoConverge {
        AutoConverge {
            cfg,
            period_start: Duration::ZERO,
            period_dirty: 0,
            period_sent: 0,
            high: 0,
            throttle: 0.0,
        }
    }

    /// The throttle now in force.
    pub fn throttle(&self) -> f64 {
        self.throttle
    }

    /// Ends the current period at `now`; returns a note when the throttle stepped.
    fn end_period(&mut self, now: Duration) -> Option<String> {
        let dirty = self.period_dirty;
        let sent = self.period_sent;
        let length = now.saturating_sub(self.period_start);
        self.period_start = now;
        self.period_dirty = 0;
        self.period_sent = 0;
        if dirty as f64 > sent as f64 * self.cfg.trigger_threshold {
            self.high += 1;
        } else if self.cfg.consecutive {
            self.high = 0;
        }
        if self.high < self.cfg.triggers {
            return None;
        }
        self.high = 0;
        let before = self.throttle;
        self.throttle = if before == 0.0 {
            self.cfg.initial.min(self.cfg.max)
        } else {
            (before + self.cfg.increment).min(self.cfg.max)
        };
        // Round to whole percent steps so 0.2 + 7 * 0.1 reads 0.9, not 0.8999999.
        self.throttle = (self.throttle * 1e6).round() / 1e6;
        (self.throttle != before).then(|| {
            format!(
                "auto-converge: throttle {:.0}% -> {:.0}% (dirtied {} B > {:.0}% of {} B sent in {:.2} s, {} periods in a row)",
                before * 100.0,
                self.throttle * 100.0,
                dirty,
                self.cfg.trigger_threshold * 100.0,
                sent,
                length.as_secs_f64(),
                self.cfg.triggers
            )
        })
    }
}

impl ThrottleStrategy for AutoConverge {
    fn observe(&mut self, obs: &RoundObservation) -> Decision {
        self.period_dirty = self.period_dirty.saturating_add(obs.dirty_bytes);
        self.period_sent = self.period_sent.saturating_add(obs.bytes_sent);
        let note = if obs.now.saturating_sub(self.period_start) >= self.cfg.min_period {
            self.end_period(obs.now)
        } else {
            None
        };
        let d = if obs.fits_downtime() {
            Decision::switch(self.throttle, SwitchReason::Converged)
        } else {
            Decision::iterate(self.throttle)
        };
        match note {
            Some(n) => d.with_note(n),
            None => d,
        }
    }

    fn name(&self) -> &'static str {
        "qemu"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A round ending at `now_ms` that dirtied `dirty` bytes and sent `sent` bytes, never
    /// fitting the downtime.
    fn round(now_ms: u64, dirty: u64, sent: u64) -> RoundObservation {
        RoundObservation {
            round: 1,
            now: Duration::from_millis(now_ms),
            dirty_pages: dirty / 4096,
            dirty_bytes: dirty,
            bytes_sent: sent,
            duration: Duration::from_millis(500),
            bandwidth_bytes_per_s: 1e6,
            avg_bandwidth: 1e6,
            remaining_dirty_bytes: u64::MAX,
            downtime_limit: Duration::from_millis(300),
        }
    }

    #[test]
    fn needs_two_high_periods_in_a_row() {
        let mut s = AutoConverge::new(AutoConvergeConfig::default());
        // High, calm, high: not twice in a row.
        assert_eq!(s.observe(&round(1000, 600, 1000)).throttle, 0.0);
        assert_eq!(s.observe(&round(2000, 400, 1000)).throttle, 0.0);
        assert_eq!(s.observe(&round(3000, 600, 1000)).throttle, 0.0);
        // Exactly 50% is not "exceeds".
        assert_eq!(s.observe(&round(4000, 500, 1000)).throttle, 0.0);
        assert_eq!(s.observe(&round(5000, 501, 1000)).throttle, 0.0);
        let d = s.observe(&round(6000, 501, 1000));
        assert_eq!(d.throttle, 0.20);
        assert!(d.note.unwrap().contains("0% -> 20%"));
    }

    #[test]
    fn periods_shorter_than_a_second_accumulate() {
        let mut s = AutoConverge::new(AutoConvergeConfig::default());
        // Four 300 ms rounds: the first period ends at 1200 ms with 4 x 300 dirtied over
        // 4 x 1000 sent (30%): calm, although the last round alone was 100%.
        for (t, dirty) in [(300, 300), (600, 300), (900, 300), (1200, 300)] {
            assert_eq!(s.observe(&round(t, dirty, 1000)).throttle, 0.0);
        }
        // Two high rounds only 500 ms apart are one period, not two.
        assert_eq!(s.observe(&round(1700, 2000, 1000)).throttle, 0.0);
        assert_eq!(s.observe(&round(2200, 2000, 1000)).throttle, 0.0);
        assert_eq!(s.high, 1);
        assert_eq!(s.observe(&round(2700, 2000, 1000)).throttle, 0.0);
        assert_eq!(s.observe(&round(3200, 2000, 1000)).throttle, 0.20);
    }

    #[test]
    fn steps_twenty_thirty_up_to_ninety_nine() {
        let mut s = AutoConverge::new(AutoConvergeConfig::default());
        let mut seen = Vec::new();
        for i in 1..=30u64 {
            let d = s.observe(&round(i * 1000, 900, 1000));
            if seen.last() != Some(&d.throttle) {
                seen.push(d.throttle);
            }
            // A step every second high period only.
            let steps = (i / 2).min(9) as usize;
            assert_eq!(seen.len() - 1, steps, "after {i} periods");
        }
        assert_eq!(
            seen,
            vec![0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99]
        );
    }

    #[test]
    fn settings_are_configurable() {
        let cfg = AutoConvergeConfig {
            initial: 0.5,
            increment: 0.25,
            max: 0.9,
            trigger_threshold: 0.1,
            min_period: Duration::from_millis(100),
            triggers: 1,
            consecutive: true,
        };
        cfg.validate().unwrap();
        let mut s = AutoConverge::new(cfg);
        assert_eq!(s.observe(&round(100, 200, 1000)).throttle, 0.5);
        assert_eq!(s.observe(&round(200, 200, 1000)).throttle, 0.75);
        assert_eq!(s.observe(&round(300, 200, 1000)).throttle, 0.9);
        assert_eq!(s.observe(&round(400, 200, 1000)).throttle, 0.9);
        // 10% threshold: 100 of 1000 is not above it.
        let mut s = AutoConverge::new(cfg);
        assert_eq!(s.observe(&round(100, 100, 1000)).throttle, 0.0);
    }

    #[test]
    fn non_consecutive_mode_counts_all_high_periods() {
        let cfg = AutoConvergeConfig {
            consecutive: false,
            ..Default::default()
        };
        let mut s = AutoConverge::new(cfg);
        assert_eq!(s.observe(&round(1000, 600, 1000)).throttle, 0.0);
        assert_eq!(s.observe(&round(2000, 100, 1000)).throttle, 0.0);
        assert_eq!(s.observe(&round(3000, 600, 1000)).throttle, 0.2);
    }

    #[test]
    fn switches_over_when_it_fits_without_forcing() {
        let mut s = AutoConverge::new(AutoConvergeConfig::default());
        let mut o = round(1000, 900, 1000);
        o.remaining_dirty_bytes = 1000;
        let d = s.observe(&o);
        assert_eq!(d.switchover, Some(SwitchReason::Converged));
        // At the cap it keeps iterating; it never forces.
        for i in 2..100 {
            let d = s.observe(&round(i * 1000, 900, 1000));
            assert_eq!(d.switchover, None);
        }
        assert_eq!(s.throttle(), 0.99);
    }

    #[test]
    fn validation_rejects_bad_settings() {
        let bad = [
            AutoConvergeConfig {
                initial: 0.0,
                ..Default::default()
            },
            AutoConvergeConfig {
                max: 1.0,
                ..Default::default()
            },
            AutoConvergeConfig {
                trigger_threshold: f64::NAN,
                ..Default::default()
            },
            AutoConvergeConfig {
                triggers: 0,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
        AutoConvergeConfig::default().validate().unwrap();
    }
}
