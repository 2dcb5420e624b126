//! The downtime policy: the model that turns each round's [`RoundObservation`] into the
//! [`Decision`] the source applies, with the throttle strategy and hot-page deferral inside.
//!
//! The strategy decides the throttle and when to switch over (every strategy switches over
//! once the remaining pages fit the downtime limit, the QEMU / Cloud Hypervisor rule); with
//! a target pause, [`AimLow`] keeps an unthrottled guest iterating while rounds still shrink
//! the pause; while the strategy keeps iterating past the timeout, [`OnTimeout`] cancels or
//! forces the switchover; and deferral splits the dirty pages of the next round.

use std::time::Duration;

use crate::converge::aim_low::AimLow;
use crate::converge::defer::{HotPageDeferral, Split};
use crate::converge::ThrottleStrategy;
use crate::converge::{Decision, DeferError, RoundObservation, Strategy, SwitchReason};

/// What happens when the migration timeout expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Abort the migration; the source keeps running.
    Cancel,
    /// Switch over anyway, accepting a longer downtime.
    Force,
}

/// The part of the downtime that no bandwidth shortens: half a `round_trip` for the last
/// pages, and a whole one more when the destination resumes the guest (its `CommitReply`
/// out, the source's `Handover` back).
pub fn switchover_latency(round_trip: Duration, destination_resumes: bool) -> Duration {
    let half = round_trip / 2;
    if destination_resumes {
        half.saturating_add(round_trip)
    } else {
        half
    }
}

/// Switch over when the remaining pages fit `limit` (as the strategy decides), or, with a
/// target, when they fit it or rounds stop paying off; after `timeout`, apply `on_timeout`;
/// split every round's pages with the deferral, if any.
pub struct DowntimePolicy {
    limit: Duration,
    timeout: Option<Duration>,
    on_timeout: OnTimeout,
    strategy: Box<dyn ThrottleStrategy>,
    deferral: Option<HotPageDeferral>,
    aim: Option<AimLow>,
    /// The throttle of the last decision: the guest's during the round observed next.
    throttle: f64,
}

impl std::fmt::Debug for DowntimePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DowntimePolicy")
            .field("limit", &self.limit)
            .field("timeout", &self.timeout)
            .field("on_timeout", &self.on_timeout)
            .field("strategy", &self.strategy.name())
            .field("deferral", &self.deferral)
            .field("aim", &self.aim)
            .finish()
    }
}

impl DowntimePolicy {
    /// `strategy` under the downtime `limit` (what the pages and the switchover latency may
    /// take together), with the timeout rule; no deferral.
    pub fn new(
        limit: Duration,
        timeout: Option<Duration>,
        on_timeout: OnTimeout,
        strategy: Box<dyn ThrottleStrategy>,
    ) -> DowntimePolicy {
        DowntimePolicy {
            limit,
            timeout,
            on_timeout,
            strategy,
            deferral: None,
            aim: None,
            throttle: 0.0,
        }
    }

    /// Aims the pause at `target` (in the terms of the `limit` given to [`Self::new`], at
    /// most it): once the pages fit the limit, an unthrottled guest keeps iterating while
    /// each round shrinks the best expected pause so far by `min_shrink`, until it fits the
    /// target. Without this the policy switches over as soon as the pages fit the limit.
    pub fn with_target(mut self, target: Duration, min_shrink: f64) -> DowntimePolicy {
        self.aim = Some(AimLow::new(self.limit, target.min(self.limit), min_shrink));
        self
    }

    /// Splits every round's pages with `deferral` (`None`: sends them all).
    pub fn with_deferral(mut self, deferral: Option<HotPageDeferral>) -> DowntimePolicy {
        self.deferral = deferral;
        self
    }

    /// The [`RoundObservation::downtime_limit`] when the switchover takes `latency` that no
    /// bandwidth shortens (see [`switchover_latency`]).
    pub fn page_limit(&self, latency: Duration) -> Duration {
        self.limit.saturating_sub(latency)
    }

    /// Pages still unsent after a round that found `newly_dirty` (sorted, without
    /// duplicates): those and the ones deferral holds back.
    pub fn unsent_pages(&self, newly_dirty: &[u64]) -> u64 {
        match &self.deferral {
            Some(d) => d.unsent_pages(newly_dirty),
            None => newly_dirty.len() as u64,
        }
    }

    /// Decides what follows the observed round, after which the guest wrote `newly_dirty`
    /// (sorted, without duplicates; the next round's pages).
    pub fn decide(
        &mut self,
        obs: &RoundObservation,
        newly_dirty: Vec<u64>,
    ) -> Result<Decision, DeferError> {
        let mut d = self.strategy.observe(obs);
        let timed_out = self.timeout.is_some_and(|t| obs.now >= t);
        let throttled = self.throttle > 0.0;
        let aimed = self
            .aim
            .as_mut()
            .map(|a| a.judge(obs, throttled).map(|r| (r, a.note(obs, r))));
        if let (Some(SwitchReason::Converged), Some(aimed)) = (d.switchover, aimed) {
            match aimed {
                // The guest keeps the throttle it ran with until the pause.
                Some((reason, note)) => {
                    d.throttle = self.throttle;
                    d.note = Some(match d.note {
                        Some(n) => format!("{n}; {note}"),
                        None => note,
                    });
                    d.switchover = Some(reason);
                }
                // Past the timeout the fitting pause is taken (`Converged`).
                None if timed_out => {}
                // One more round, without a throttle: throttling starts only when rounds
                // stop fitting the limit.
                None => d = Decision::iterate(self.throttle),
            }
        }
        if d.switchover.is_none() && timed_out {
            match self.on_timeout {
                OnTimeout::Cancel => d.cancel = true,
                OnTimeout::Force => d.switchover = Some(SwitchReason::Forced),
            }
        }
        d.pages = match (&mut self.deferral, d.switchover) {
            // Cancelled: nothing more is sent, and deferral's counts stay as they are.
            _ if d.cancel => Split::default(),
            (Some(deferral), None) => deferral.split(&newly_dirty)?,
            (Some(deferral), Some(_)) => Split {
                send_now: deferral.finish(&newly_dirty)?,
                deferred: Vec::new(),
            },
            (None, _) => Split {
                send_now: newly_dirty,
                deferred: Vec::new(),
            },
        };
        self.throttle = d.throttle;
        Ok(d)
    }

    /// Hot-page deferral, if enabled (for its counts).
    pub fn deferral(&self) -> Option<&HotPageDeferral> {
        self.deferral.as_ref()
    }

    /// Short name for statistics: the strategy's, or `downtime-limit` when it never
    /// throttles (the downtime rule alone decides).
    pub fn name(&self) -> &'static str {
        match self.strategy.name() {
            n if n == Strategy::None.name() => "downtime-limit",
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::converge::{
        AutoConverge, AutoConvergeConfig, DeferConfig, DirectStaged, DirectStagedConfig, NoThrottle,
    };

    const LIMIT: Duration = Duration::from_millis(300);

    fn policy(timeout_s: Option<u64>, on_timeout: OnTimeout) -> DowntimePolicy {
        DowntimePolicy::new(
            LIMIT,
            timeout_s.map(Duration::from_secs),
            on_timeout,
            Box::new(NoThrottle),
        )
    }

    /// `pending` pages of 1000 wire bytes at `bandwidth`, `now_s` into the migration, with
    /// the switchover taking `latency`.
    fn obs(p: &DowntimePolicy, pending: u64, bandwidth: f64, now_s: u64) -> RoundObservation {
        obs_after(p, pending, bandwidth, now_s, Duration::ZERO)
    }

    fn obs_after(
        p: &DowntimePolicy,
        pending: u64,
        bandwidth: f64,
        now_s: u64,
        latency: Duration,
    ) -> RoundObservation {
        RoundObservation {
            round: 1,
            now: Duration::from_secs(now_s),
            dirty_pages: pending,
            dirty_bytes: pending * 4096,
            bytes_sent: 0,
            duration: Duration::from_secs(1),
            bandwidth_bytes_per_s: bandwidth,
            avg_bandwidth: bandwidth,
            remaining_dirty_bytes: pending * 1000,
            downtime_limit: p.page_limit(latency),
        }
    }

    fn decide(p: &mut DowntimePolicy, o: &RoundObservation) -> Decision {
        p.decide(o, Vec::new()).unwrap()
    }

    #[test]
    fn latency_is_half_a_round_trip_and_one_more_when_resuming() {
        let ms = Duration::from_millis;
        assert_eq!(switchover_latency(ms(600), false), ms(300));
        assert_eq!(switchover_latency(ms(600), true), ms(900));
        assert_eq!(switchover_latency(Duration::MAX, true), Duration::MAX);
    }

    #[test]
    fn the_latency_comes_off_the_pages_share_of_the_limit() {
        let mut p = policy(None, OnTimeout::Cancel);
        // 300 ms of pages and 300 ms of latency: 600 ms > 300 ms.
        let far = obs_after(&p, 300, 1_000_000.0, 0, Duration::from_millis(300));
        assert_eq!(far.expected_downtime(), Duration::from_millis(300));
        assert_eq!(far.downtime_limit, Duration::ZERO);
        assert_eq!(decide(&mut p, &far), Decision::iterate(0.0));
        // Nothing left to send: only the latency is left, and no round can shorten it,
        // even when it exceeds the limit (iterating would only spin).
        let done = obs_after(&p, 0, 1_000_000.0, 0, Duration::from_secs(1));
        assert_eq!(done.expected_downtime(), Duration::ZERO);
        assert_eq!(
            decide(&mut p, &done),
            Decision::switch(0.0, SwitchReason::Converged)
        );
    }

    #[test]
    fn decides_by_limit_then_timeout() {
        let mut p = policy(Some(10), OnTimeout::Cancel);
        let o = obs(&p, 300, 1_000_000.0, 0);
        assert_eq!(o.expected_downtime(), Duration::from_millis(300));
        assert_eq!(decide(&mut p, &o).switchover, Some(SwitchReason::Converged));
        let o = obs(&p, 301, 1_000_000.0, 9);
        let d = decide(&mut p, &o);
        assert_eq!((d.switchover, d.cancel), (None, false));
        let o = obs(&p, 301, 1_000_000.0, 10);
        let d = decide(&mut p, &o);
        assert_eq!((d.switchover, d.cancel), (None, true));
        let mut p = policy(Some(10), OnTimeout::Force);
        let o = obs(&p, 301, 1_000_000.0, 10);
        let d = decide(&mut p, &o);
        assert_eq!(
            (d.switchover, d.cancel),
            (Some(SwitchReason::Forced), false)
        );
        let mut p = policy(None, OnTimeout::Force);
        let o = obs(&p, 10_000, 1.0, 1_000_000);
        let d = decide(&mut p, &o);
        assert_eq!((d.switchover, d.cancel), (None, false));
        assert_eq!(p.name(), "downtime-limit");
    }

    #[test]
    fn a_strategy_runs_out_of_throttle_and_forces_the_switchover() {
        let mut p = DowntimePolicy::new(
            LIMIT,
            None,
            OnTimeout::Cancel,
            Box::new(DirectStaged::new(DirectStagedConfig::default())),
        );
        assert_eq!(p.name(), "direct-staged");
        let mut seen = Vec::new();
        let mut now = 0;
        let d = loop {
            now += 1;
            // 100000 pages pending every second (400 MB at 10 MB/s): never fits.
            let mut o = obs(&p, 100_000, 10e6, now);
            o.remaining_dirty_bytes = 100_000 * 4096;
            let d = decide(&mut p, &o);
            seen.push(d.throttle);
            if d.switchover.is_some() {
                break d;
            }
            assert!(now < 120, "never switched over");
        };
        assert_eq!(d.switchover, Some(SwitchReason::Forced));
        assert!(!d.cancel);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        assert_eq!(seen.last(), Some(&0.99));
    }

    #[test]
    fn deferral_splits_iterating_rounds_and_hands_back_everything_at_the_switchover() {
        // 4 segments of 4 pages; the hottest quarter is deferred.
        let cfg = DeferConfig {
            percent: 25.0,
            segment_bytes: 4 * 4096,
            page_size: 4096,
            stop_below: 0.10,
            max_consecutive: 2,
        };
        let deferral = HotPageDeferral::new(cfg, 16).unwrap();
        let mut p = policy(Some(10), OnTimeout::Cancel).with_deferral(Some(deferral));
        let iterating = obs(&p, 10_000, 1_000_000.0, 0);
        let d = p.decide(&iterating, vec![0, 5, 6, 7, 12, 13]).unwrap();
        assert_eq!(d.pages.deferred, vec![5, 6, 7]);
        assert_eq!(d.pages.send_now, vec![0, 12, 13]);
        // The deferred pages are still unsent, with the new ones.
        assert_eq!(p.unsent_pages(&[0, 5, 8]), 5);
        // Cancelled: nothing is split, nothing counted.
        let late = obs(&p, 10_000, 1_000_000.0, 10);
        let d = p.decide(&late, vec![5, 6]).unwrap();
        assert!(d.cancel);
        assert_eq!(d.pages, Split::default());
        assert_eq!(p.deferral().unwrap().saved_bytes(), 0);
        // Switching over: everything, the held pages included.
        let fits = obs(&p, 0, 1_000_000.0, 1);
        let d = p.decide(&fits, vec![1]).unwrap();
        assert_eq!(d.switchover, Some(SwitchReason::Converged));
        assert_eq!(d.pages.send_now, vec![1, 5, 6, 7]);
        assert!(d.pages.deferred.is_empty());
        // Without deferral the pages pass through.
        let mut p = policy(None, OnTimeout::Cancel);
        assert_eq!(p.unsent_pages(&[3, 4]), 2);
        let d = p.decide(&iterating, vec![3, 4]).unwrap();
        assert_eq!(d.pages.send_now, vec![3, 4]);
        assert!(p.deferral().is_none());
    }

    /// A policy aiming at 30 ms under the 300 ms limit, with `strategy`.
    fn aiming(strategy: Box<dyn ThrottleStrategy>, timeout_s: Option<u64>) -> DowntimePolicy {
        DowntimePolicy::new(
            LIMIT,
            timeout_s.map(Duration::from_secs),
            OnTimeout::Cancel,
            strategy,
        )
        .with_target(
            Duration::from_millis(30),
            crate::converge::aim_low::MIN_SHRINK,
        )
    }

    /// The switchovers of `p` fed rounds whose pages take `ms` each (1 MB/s, one per
    /// second): `None` while it iterates.
    fn run(p: &mut DowntimePolicy, ms: &[u64]) -> Vec<Option<SwitchReason>> {
        ms.iter()
            .enumerate()
            .map(|(i, &ms)| {
                let d = decide(p, &obs(p, ms, 1_000_000.0, i as u64));
                assert!(!d.cancel);
                d.switchover
            })
            .collect()
    }

    #[test]
    fn aiming_low_iterates_while_rounds_shrink_and_switches_at_the_target() {
        let mut p = aiming(Box::new(NoThrottle), None);
        // 2 s does not fit; 250 ms fits but the first fitting round may still shrink;
        // 120 and 60 ms shrink by half; 30 ms is the target.
        assert_eq!(
            run(&mut p, &[2000, 250, 120, 60, 30]),
            [None, None, None, None, Some(SwitchReason::TargetReached)]
        );
        // Nothing left to send reaches any target.
        let mut p = aiming(Box::new(NoThrottle), None);
        assert_eq!(run(&mut p, &[0]), [Some(SwitchReason::TargetReached)]);
    }

    #[test]
    fn a_round_that_shrinks_less_than_the_share_switches_over_under_the_limit() {
        let mut p = aiming(Box::new(NoThrottle), None);
        // 200 -> 160 ms is 20%, less than a quarter.
        assert_eq!(run(&mut p, &[900, 200]), [None, None]);
        let d = {
            let o = obs(&p, 160, 1_000_000.0, 2);
            decide(&mut p, &o)
        };
        assert_eq!(d.switchover, Some(SwitchReason::StoppedShrinking));
        assert!(d.note.unwrap().contains("less than 25%"));
        // A target equal to the limit is the rule before aiming low: the first fitting
        // round switches over.
        let mut p = policy(None, OnTimeout::Cancel).with_target(LIMIT, 0.25);
        assert_eq!(
            run(&mut p, &[900, 299]),
            [None, Some(SwitchReason::TargetReached)]
        );
    }

    #[test]
    fn aiming_low_never_exceeds_the_limit() {
        // Pseudo-random pauses around the limit, for each strategy: every switchover but a
        // forced one happens on a round that fits.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for strategy in Strategy::ALL {
            for _ in 0..200 {
                let mut p = aiming(strategy.build(), None);
                for now in 0..60 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let o = obs(&p, seed % 600, 1_000_000.0, now);
                    let d = decide(&mut p, &o);
                    match d.switchover {
                        None => continue,
                        Some(SwitchReason::Forced) => {}
                        Some(_) => assert!(o.fits_downtime(), "{strategy}: {o:?}"),
                    }
                    break;
                }
            }
        }
    }

    #[test]
    fn a_throttled_guest_switches_over_as_soon_as_it_fits() {
        let mut p = aiming(
            Box::new(DirectStaged::new(DirectStagedConfig::default())),
            None,
        );
        // A flat dirty count over the limit starts direct-staged's throttle.
        let mut now = 0;
        loop {
            now += 1;
            let d = {
                let o = obs(&p, 400, 1_000_000.0, now);
                decide(&mut p, &o)
            };
            assert_eq!(d.switchover, None);
            if d.throttle > 0.0 {
                break;
            }
        }
        let d = {
            let o = obs(&p, 250, 1_000_000.0, now + 1);
            decide(&mut p, &o)
        };
        assert_eq!(d.switchover, Some(SwitchReason::ThrottledFits));
        assert!(d.throttle > 0.0);
    }

    #[test]
    fn auto_converge_does_not_throttle_the_rounds_that_aim_low() {
        let mut p = aiming(
            Box::new(AutoConverge::new(AutoConvergeConfig::default())),
            None,
        );
        // Every period dirties far more than it sends ("high"), so auto-converge steps
        // its throttle after two periods, but every round fits and shrinks by a third.
        let mut ms = 290.0_f64;
        let mut throttles = Vec::new();
        let d = loop {
            let mut o = obs(&p, ms as u64, 1_000_000.0, throttles.len() as u64 + 1);
            o.bytes_sent = 1000;
            let d = decide(&mut p, &o);
            throttles.push(d.throttle);
            if d.switchover.is_some() {
                break d;
            }
            ms *= 0.66;
        };
        assert_eq!(d.switchover, Some(SwitchReason::TargetReached));
        assert!(throttles.len() > 3, "{throttles:?}");
        assert!(throttles.iter().all(|&t| t == 0.0), "{throttles:?}");
    }

    #[test]
    fn the_timeout_takes_a_fitting_pause_instead_of_cancelling() {
        let mut p = aiming(Box::new(NoThrottle), Some(10));
        assert_eq!(run(&mut p, &[900, 200]), [None, None]);
        // Still shrinking, but the timeout has passed: the pause that fits is taken.
        let d = {
            let o = obs(&p, 100, 1_000_000.0, 10);
            decide(&mut p, &o)
        };
        assert_eq!(
            (d.switchover, d.cancel),
            (Some(SwitchReason::Converged), false)
        );
        // Not fitting at the timeout: cancelled as before.
        let mut p = aiming(Box::new(NoThrottle), Some(10));
        let d = {
            let o = obs(&p, 400, 1_000_000.0, 10);
            decide(&mut p, &o)
        };
        assert_eq!((d.switchover, d.cancel), (None, true));
    }

    #[test]
    fn aiming_low_rounds_keep_deferring_and_the_switchover_hands_everything_back() {
        let cfg = DeferConfig {
            percent: 25.0,
            segment_bytes: 4 * 4096,
            page_size: 4096,
            stop_below: 0.10,
            max_consecutive: 2,
        };
        let deferral = HotPageDeferral::new(cfg, 16).unwrap();
        let mut p = aiming(Box::new(NoThrottle), None).with_deferral(Some(deferral));
        // Fits the limit, far from the target: iterating, the hot segment held back.
        let d = p
            .decide(&obs(&p, 200, 1_000_000.0, 0), vec![0, 5, 6, 7, 12])
            .unwrap();
        assert_eq!(d.switchover, None);
        assert_eq!(d.pages.deferred, vec![5, 6, 7]);
        let d = p.decide(&obs(&p, 190, 1_000_000.0, 1), vec![1]).unwrap();
        assert_eq!(d.switchover, Some(SwitchReason::StoppedShrinking));
        assert_eq!(d.pages.send_now, vec![1, 5, 6, 7]);
    }
}
