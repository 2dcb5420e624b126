//! The bridge from a [`ThrottleStrategy`] to the migration's
//! [`ConvergencePolicy`] seam.
//!
//! [`Converger`] turns the migration's per-round observation into a
//! [`RoundObservation`], asks the strategy, hands the [`Decision`] (throttle, note) to a
//! callback the migration loop supplies (which sets the guest's throttle and records the
//! timeline), and maps the switchover to the migration's decision. When the strategy keeps
//! iterating, the migration's timeout rule still applies.

use std::time::Duration;

use crate::converge::policy::{self as mc, ConvergencePolicy, DowntimePolicy, OnTimeout};
use crate::converge::{Decision, RoundObservation, SwitchReason, ThrottleStrategy};

/// Called with every observation and the strategy's decision.
pub type DecisionHook = Box<dyn FnMut(&RoundObservation, &Decision) + Send>;

/// A [`ThrottleStrategy`] as a [`ConvergencePolicy`].
pub struct Converger {
    strategy: Box<dyn ThrottleStrategy>,
    limit: Duration,
    timeout: Option<Duration>,
    on_timeout: OnTimeout,
    page_size: u64,
    prev_elapsed: Duration,
    total_bytes: f64,
    total_secs: f64,
    last: Option<Decision>,
    hook: Option<DecisionHook>,
}

impl std::fmt::Debug for Converger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Converger")
            .field("strategy", &self.strategy.name())
            .field("limit", &self.limit)
            .field("last", &self.last)
            .finish()
    }
}

impl Converger {
    /// `strategy` under the downtime limit and timeout rule of `downtime`, for pages of
    /// `page_size` bytes.
    pub fn new(
        strategy: Box<dyn ThrottleStrategy>,
        downtime: DowntimePolicy,
        page_size: u64,
    ) -> Converger {
        Converger {
            strategy,
            limit: downtime.limit,
            timeout: downtime.timeout,
            on_timeout: downtime.on_timeout,
            page_size,
            prev_elapsed: Duration::ZERO,
            total_bytes: 0.0,
            total_secs: 0.0,
            last: None,
            hook: None,
        }
    }

    /// Calls `hook` after every decision (e.g. to set the guest's throttle).
    pub fn with_hook(
        mut self,
        hook: impl FnMut(&RoundObservation, &Decision) + Send + 'static,
    ) -> Converger {
        self.hook = Some(Box::new(hook));
        self
    }

    /// The throttle the last decision asked for (0 before the first).
    pub fn throttle(&self) -> f64 {
        self.last.as_ref().map_or(0.0, |d| d.throttle)
    }

    /// The last decision.
    pub fn last_decision(&self) -> Option<&Decision> {
        self.last.as_ref()
    }

    /// Translates the migration's observation. The round's duration is the time since the
    /// previous observation, its bytes that duration times the measured bandwidth.
    pub fn translate(&mut self, obs: &mc::RoundObservation) -> RoundObservation {
        let duration = obs.elapsed.saturating_sub(self.prev_elapsed);
        self.prev_elapsed = obs.elapsed;
        let bw = if obs.bandwidth.is_finite() && obs.bandwidth > 0.0 {
            obs.bandwidth
        } else {
            0.0
        };
        // The bandwidth is the transfer's: the round trip the round waited carried nothing.
        let bytes_sent = bw * duration.saturating_sub(obs.round_trip).as_secs_f64();
        self.total_bytes += bytes_sent;
        self.total_secs += duration.as_secs_f64();
        let remaining = obs.pending_pages as f64 * obs.bytes_per_page.max(0.0);
        RoundObservation {
            round: obs.round,
            now: obs.elapsed,
            dirty_pages: obs.pending_pages,
            dirty_bytes: obs.pending_pages.saturating_mul(self.page_size),
            bytes_sent: bytes_sent as u64,
            duration,
            bandwidth_bytes_per_s: bw,
            avg_bandwidth: if self.total_secs > 0.0 {
                self.total_bytes / self.total_secs
            } else {
                bw
            },
            remaining_dirty_bytes: if remaining.is_finite() {
                remaining as u64
            } else {
                u64::MAX
            },
            // The strategies weigh bytes against bandwidth; the switchover's latency comes
            // off their limit.
            downtime_limit: self.limit.saturating_sub(obs.switchover_latency()),
        }
    }
}

impl ConvergencePolicy for Converger {
    fn decide(&mut self, obs: &mc::RoundObservation) -> mc::Decision {
        let o = self.translate(obs);
        let d = self.strategy.observe(&o);
        if let Some(h) = &mut self.hook {
            h(&o, &d);
        }
        let out = match d.switchover {
            Some(SwitchReason::Converged) => mc::Decision::Switchover { forced: false },
            Some(SwitchReason::Forced) => mc::Decision::Switchover { forced: true },
            None => match self.timeout {
                Some(t) if obs.elapsed >= t => match self.on_timeout {
                    OnTimeout::Cancel => mc::Decision::Cancel,
                    OnTimeout::Force => mc::Decision::Switchover { forced: true },
                },
                _ => mc::Decision::Continue,
            },
        };
        self.last = Some(d);
        out
    }

    fn name(&self) -> &'static str {
        self.strategy.name()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::converge::{DirectStaged, DirectStagedConfig, NoThrottle};

    fn mobs(elapsed_ms: u64, pending: u64) -> mc::RoundObservation {
        mc::RoundObservation {
            round: 1,
            elapsed: Duration::from_millis(elapsed_ms),
            pending_pages: pending,
            bytes_per_page: 4096.0,
            bandwidth: 10e6,
            round_trip: Duration::ZERO,
            destination_resumes: false,
            dirty_rate: 0.0,
        }
    }

    fn downtime(timeout: Option<u64>, on: OnTimeout) -> DowntimePolicy {
        DowntimePolicy {
            limit: Duration::from_millis(300),
            timeout: timeout.map(Duration::from_secs),
            on_timeout: on,
        }
    }

    #[test]
    fn translates_and_agrees_with_the_downtime_rule() {
        let mut c = Converger::new(
            Box::new(NoThrottle),
            downtime(None, OnTimeout::Cancel),
            4096,
        );
        let o = c.translate(&mobs(2000, 100));
        assert_eq!(o.duration, Duration::from_secs(2));
        assert_eq!(o.bytes_sent, 20_000_000);
        assert_eq!(o.dirty_bytes, 409_600);
        assert_eq!(o.remaining_dirty_bytes, 409_600);
        let o = c.translate(&mobs(3000, 100));
        assert_eq!(o.duration, Duration::from_secs(1));
        assert_eq!(o.avg_bandwidth, 10e6);
        // 732 pages at 10 MB/s = 299.8 ms fits; 733 = 300.2 ms does not.
        for pending in [732, 733, 0, 5000] {
            let m = mobs(4000, pending);
            let mut ours = Converger::new(
                Box::new(NoThrottle),
                downtime(None, OnTimeout::Cancel),
                4096,
            );
            let mut theirs = downtime(None, OnTimeout::Cancel);
            assert_eq!(ours.decide(&m), theirs.decide(&m), "{pending}");
        }
    }

    #[test]
    fn timeout_applies_while_the_strategy_iterates() {
        let mut c = Converger::new(
            Box::new(NoThrottle),
            downtime(Some(5), OnTimeout::Force),
            4096,
        );
        assert_eq!(c.decide(&mobs(4000, 1_000_000)), mc::Decision::Continue);
        assert_eq!(
            c.decide(&mobs(5000, 1_000_000)),
            mc::Decision::Switchover { forced: true }
        );
        let mut c = Converger::new(
            Box::new(NoThrottle),
            downtime(Some(5), OnTimeout::Cancel),
            4096,
        );
        assert_eq!(c.decide(&mobs(5000, 1_000_000)), mc::Decision::Cancel);
    }

    #[test]
    fn hook_sees_throttle_and_forced_switchover_maps() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let strategy = DirectStaged::new(DirectStagedConfig::default());
        let mut c = Converger::new(Box::new(strategy), downtime(None, OnTimeout::Cancel), 4096)
            .with_hook(move |_, d| s2.lock().unwrap().push(d.throttle));
        let mut t = 0;
        let out = loop {
            t += 1000;
            // 100000 pages pending every second (400 MB at 10 MB/s): never fits.
            match c.decide(&mobs(t, 100_000)) {
                mc::Decision::Continue => {}
                other => break other,
            }
            assert!(t < 120_000, "never switched over");
        };
        assert_eq!(out, mc::Decision::Switchover { forced: true });
        assert_eq!(c.name(), "direct-staged");
        assert_eq!(c.throttle(), 0.99);
        let seen = seen.lock().unwrap();
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        assert_eq!(seen.last(), Some(&0.99));
    }
}
