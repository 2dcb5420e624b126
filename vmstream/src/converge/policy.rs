//! The downtime policy: the model that turns each round's [`RoundObservation`] into the
//! [`Decision`] the source applies, with the throttle strategy and hot-page deferral inside.
//!
//! The strategy decides the throttle and when to switch over (every strategy switches over
//! once the remaining pages fit the downtime limit, the QEMU / Cloud Hypervisor rule); while
//! it keeps iterating past the timeout, [`OnTimeout`] cancels or forces the switchover; and
//! deferral splits the dirty pages of the next round.

use std::time::Duration;

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

/// Switch over when the remaining pages fit `limit` (as the strategy decides); after
/// `timeout`, apply `on_timeout`; split every round's pages with the deferral, if any.
pub struct DowntimePolicy {
    limit: Duration,
    timeout: Option<Duration>,
    on_timeout: OnTimeout,
    strategy: Box<dyn ThrottleStrategy>,
    deferral: Option<HotPageDeferral>,
}

impl std::fmt::Debug for DowntimePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DowntimePolicy")
            .field("limit", &self.limit)
            .field("timeout", &self.timeout)
            .field("on_timeout", &self.on_timeout)
            .field("strategy", &self.strategy.name())
            .field("deferral", &self.deferral)
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
        }
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
    use crate::converge::{DeferConfig, DirectStaged, DirectStagedConfig, NoThrottle};

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
}
