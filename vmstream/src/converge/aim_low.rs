//! Aiming the pause below the limit: once the expected pause fits `--downtime-limit`, decide
//! whether one more round pays off (it shrank the expected pause by a worthwhile share, the
//! guest is not throttled, the `--downtime-target` is not reached yet) or the migration
//! switches over now, and why.

use std::time::Duration;

use crate::converge::{RoundObservation, SwitchReason};

/// The pause the policy aims for when nothing else is asked (`--downtime-target`): about
/// what QEMU's switchover takes with XBZRLE on a real guest (9-15 ms), with room for the
/// fixed part of the pause.
pub const DEFAULT_DOWNTIME_TARGET: Duration = Duration::from_millis(30);

/// The share by which a round must shrink the best expected pause so far for another round
/// to be worth its bytes. A round costs about the bytes it would otherwise send in the
/// pause, and a round that shrinks by at least a quarter bounds all further rounds' bytes by
/// a geometric series: at most 3x the pause's bytes at the first fitting round (in practice
/// far less, since a round that shrinks by more than a quarter ends the series sooner).
pub const MIN_SHRINK: f64 = 0.25;

/// The share of the bytes sent so far that rounds after the first fitting one may cost
/// before a round that did not pay off ends them. A round that did not shrink the pause is
/// often a burst of the guest's writes, not its steady rate: stopping at the first switched
/// a 512 MiB QEMU guest at 25 MB/s over with 100-160 ms of pages where later rounds reached
/// 3 ms; a tenth still let half the runs stop at such a burst. Within this budget the policy
/// keeps trying; each round costs about the pause's bytes, so the budget bounds what aiming
/// low adds to the migration.
pub const AIM_BYTES_SHARE: f64 = 0.25;

/// The aiming settings: the target pause and the shrink a round must achieve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AimLowConfig {
    /// The pause to aim for, `None`: [`DEFAULT_DOWNTIME_TARGET`], or the downtime limit
    /// when that is lower. At most the limit; equal to the limit, the policy switches over
    /// as soon as the pause fits (the rule before aiming low).
    pub target: Option<Duration>,
    /// [`MIN_SHRINK`] unless a test asks otherwise; in `(0, 1)`.
    pub min_shrink: f64,
}

impl Default for AimLowConfig {
    fn default() -> Self {
        AimLowConfig {
            target: None,
            min_shrink: MIN_SHRINK,
        }
    }
}

impl AimLowConfig {
    /// The target pause under `limit`, or why the settings are refused.
    pub fn target(&self, limit: Duration) -> Result<Duration, String> {
        if !(self.min_shrink > 0.0 && self.min_shrink < 1.0) {
            return Err(format!(
                "the share a round must shrink the pause by is {}, not in (0, 1)",
                self.min_shrink
            ));
        }
        match self.target {
            None => Ok(DEFAULT_DOWNTIME_TARGET.min(limit)),
            Some(t) if t > limit => Err(format!(
                "--downtime-target {} ms is above --downtime-limit {} ms",
                t.as_millis(),
                limit.as_millis()
            )),
            Some(t) => Ok(t),
        }
    }
}

/// Whether another round pays off, judged after every round.
#[derive(Debug, Clone)]
pub struct AimLow {
    /// How far below the pages' share of the limit their share of the target lies: both
    /// lose the same fixed part (digest, latency), so the target's share of an observation
    /// is its `downtime_limit` less this.
    margin: Duration,
    min_shrink: f64,
    /// The smallest expected pause (pages' part) of the rounds judged so far.
    best: Option<Duration>,
    /// Bytes of all rounds judged, and of those after the first that fitted the limit.
    sent: u64,
    spent_aiming: Option<u64>,
}

impl AimLow {
    /// Aims the pages' part of the pause at `page_target` under the `page_limit` the
    /// observations' `downtime_limit` derive from (both before the switchover latency),
    /// with rounds that must shrink by `min_shrink`.
    pub fn new(page_limit: Duration, page_target: Duration, min_shrink: f64) -> AimLow {
        AimLow {
            margin: page_limit.saturating_sub(page_target),
            min_shrink,
            best: None,
            sent: 0,
            spent_aiming: None,
        }
    }

    /// The pages' share of the target pause in `obs`.
    pub fn page_target(&self, obs: &RoundObservation) -> Duration {
        obs.downtime_limit.saturating_sub(self.margin)
    }

    /// Judges the round `obs` (call after every round: it remembers the best pause): when
    /// the pause fits the limit, why to switch over now, or `None` for one more round;
    /// `None` as well when it does not fit (the strategy decides then). `throttled`: the
    /// guest ran throttled in this round.
    pub fn judge(&mut self, obs: &RoundObservation, throttled: bool) -> Option<SwitchReason> {
        let expected = obs.expected_downtime();
        let best = self
            .best
            .replace(self.best.map_or(expected, |b| b.min(expected)));
        self.sent = self.sent.saturating_add(obs.bytes_sent);
        if let Some(spent) = &mut self.spent_aiming {
            *spent = spent.saturating_add(obs.bytes_sent);
        }
        if !obs.fits_downtime() {
            return None;
        }
        let spent = *self.spent_aiming.get_or_insert(0);
        if expected <= self.page_target(obs) {
            return Some(SwitchReason::TargetReached);
        }
        if throttled {
            // The throttle costs the guest more than a longer pause within the limit.
            return Some(SwitchReason::ThrottledFits);
        }
        let worth = best
            .is_none_or(|b| expected.as_secs_f64() <= b.as_secs_f64() * (1.0 - self.min_shrink));
        let budget_left = (spent as f64) < AIM_BYTES_SHARE * self.sent as f64;
        (!worth && !budget_left).then_some(SwitchReason::StoppedShrinking)
    }

    /// The timeline's note on a switchover for `reason` after `obs`.
    pub fn note(&self, obs: &RoundObservation, reason: SwitchReason) -> String {
        let ms = obs.expected_downtime().as_secs_f64() * 1e3;
        let why = match reason {
            SwitchReason::TargetReached => "fit the target".to_string(),
            SwitchReason::StoppedShrinking => format!(
                "fit the limit, and the round shrank them by less than {:.0}%",
                self.min_shrink * 100.0
            ),
            SwitchReason::ThrottledFits => "fit the limit with the guest throttled".into(),
            SwitchReason::Converged => "fit the limit".into(),
            SwitchReason::Forced => "exceed the limit".into(),
        };
        format!("the pause's pages, {ms:.1} ms expected, {why}: switching over")
    }

    /// The best expected pause (pages' part) seen so far.
    pub fn best(&self) -> Option<Duration> {
        self.best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::converge::test_support::obs;

    const MS: Duration = Duration::from_millis(1);

    /// An observation whose pages take `ms` at 1 MB/s (1000 bytes per ms), under the test
    /// support's 300 ms page limit.
    fn pause(ms: u64) -> RoundObservation {
        obs(0, 1, 1e6, ms * 1000)
    }

    #[test]
    fn the_target_defaults_to_30_ms_or_the_limit_and_never_exceeds_it() {
        let c = AimLowConfig::default();
        assert_eq!(c.target(300 * MS), Ok(30 * MS));
        assert_eq!(c.target(20 * MS), Ok(20 * MS));
        let set = |t| AimLowConfig {
            target: Some(t),
            ..c
        };
        assert_eq!(set(50 * MS).target(300 * MS), Ok(50 * MS));
        assert_eq!(set(300 * MS).target(300 * MS), Ok(300 * MS));
        assert!(set(301 * MS).target(300 * MS).is_err());
        for bad in [0.0, 1.0, -0.5, f64::NAN] {
            let c = AimLowConfig {
                min_shrink: bad,
                ..c
            };
            assert!(c.target(300 * MS).is_err(), "{bad}");
        }
    }

    #[test]
    fn shrinking_rounds_iterate_until_the_target() {
        let mut a = AimLow::new(300 * MS, 30 * MS, MIN_SHRINK);
        // Over the limit: the strategy's call; then each round a quarter or more below the
        // best so far.
        for ms in [900, 280, 210, 150, 60, 45] {
            assert_eq!(a.judge(&pause(ms), false), None, "{ms} ms");
        }
        assert_eq!(a.best(), Some(45 * MS));
        assert_eq!(
            a.judge(&pause(30), false),
            Some(SwitchReason::TargetReached)
        );
    }

    #[test]
    fn a_round_that_shrinks_less_than_the_share_switches_over() {
        let mut a = AimLow::new(300 * MS, 30 * MS, MIN_SHRINK);
        assert_eq!(a.judge(&pause(200), false), None);
        // 151 ms is 24.5% below 200 ms.
        assert_eq!(
            a.judge(&pause(151), false),
            Some(SwitchReason::StoppedShrinking)
        );
        // The best is what counts, not the previous round: a round that grew back does not
        // make its successor look shrinking.
        let mut a = AimLow::new(300 * MS, 30 * MS, MIN_SHRINK);
        assert_eq!(a.judge(&pause(100), false), None);
        assert_eq!(a.judge(&pause(400), false), None);
        assert_eq!(
            a.judge(&pause(90), false),
            Some(SwitchReason::StoppedShrinking)
        );
    }

    /// Rounds that do not pay off go on while the rounds after the first fitting one cost
    /// less than a quarter of all bytes sent.
    #[test]
    fn rounds_that_do_not_pay_off_go_on_within_the_aiming_budget() {
        assert_eq!(AIM_BYTES_SHARE, 0.25);
        let round = |ms: u64, bytes: u64| RoundObservation {
            bytes_sent: bytes,
            ..pause(ms)
        };
        let mut a = AimLow::new(300 * MS, 30 * MS, MIN_SHRINK);
        // Round 0 sent 1000 bytes and did not fit; the first fitting round starts the count.
        assert_eq!(a.judge(&round(900, 1000), false), None);
        assert_eq!(a.judge(&round(200, 30), false), None);
        // Misses of 100 bytes each: 100 of 1130, 200 of 1230, 300 of 1330 are within 25%.
        for ms in [190, 180, 170] {
            assert_eq!(a.judge(&round(ms, 100), false), None, "{ms} ms");
        }
        // 400 of 1430 is not: this miss switches over.
        assert_eq!(
            a.judge(&round(165, 100), false),
            Some(SwitchReason::StoppedShrinking)
        );
    }

    #[test]
    fn the_limit_is_never_exceeded_and_a_throttled_guest_switches_once_it_fits() {
        let mut a = AimLow::new(300 * MS, 30 * MS, MIN_SHRINK);
        // Growing or flat over the limit: never a switchover from here.
        for ms in [301, 1000, 5000, 5000, 301] {
            assert_eq!(a.judge(&pause(ms), true), None, "{ms} ms");
        }
        assert_eq!(
            a.judge(&pause(299), true),
            Some(SwitchReason::ThrottledFits)
        );
        // The target wins over the throttle.
        assert_eq!(a.judge(&pause(10), true), Some(SwitchReason::TargetReached));
    }

    #[test]
    fn the_fixed_part_of_the_pause_comes_off_the_target_as_off_the_limit() {
        // Limit 300 ms, target 30 ms, so a margin of 270 ms: with 20 ms of latency the
        // observation's page limit is 280 ms and the page target 10 ms.
        let mut a = AimLow::new(300 * MS, 30 * MS, MIN_SHRINK);
        let mut o = pause(11);
        o.downtime_limit = 280 * MS;
        assert_eq!(a.page_target(&o), 10 * MS);
        assert_eq!(a.judge(&o, false), None);
        o.remaining_dirty_bytes = 10_000;
        assert_eq!(a.judge(&o, false), Some(SwitchReason::TargetReached));
        // A latency above the target: only an empty round reaches it.
        o.downtime_limit = 250 * MS;
        assert_eq!(a.page_target(&o), Duration::ZERO);
        o.remaining_dirty_bytes = 0;
        assert_eq!(a.judge(&o, false), Some(SwitchReason::TargetReached));
    }

    #[test]
    fn aiming_ends_within_a_logarithmic_number_of_rounds() {
        // Each iterating round must beat the best by a quarter, so from a fitting 300 ms
        // to a 1 ms target takes at most log(300) / log(4/3) + 1 rounds, whatever the
        // guest does in between.
        let mut a = AimLow::new(300 * MS, MS, MIN_SHRINK);
        let mut ms = 300.0_f64;
        let mut rounds = 0;
        while a.judge(&pause(ms as u64), false).is_none() {
            rounds += 1;
            ms *= 0.75;
        }
        assert!(rounds <= 21, "{rounds}");
    }
}
