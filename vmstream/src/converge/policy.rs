//! When to stop iterating and switch over.
//!
//! After every round the source measures the bandwidth it achieved and collects the pages
//! dirtied meanwhile; the [`ConvergencePolicy`] turns that [`RoundObservation`] into a
//! [`Decision`]. [`DowntimePolicy`] is the QEMU / Cloud Hypervisor rule: switch over once
//! `remaining bytes / bandwidth` fits in the downtime limit, and apply the timeout strategy
//! when the migration runs too long. Other strategies (throttling, hot-page deferral) plug
//! in by implementing the trait.

use std::time::Duration;

/// What the source knows after a round, when the policy is asked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundObservation {
    /// The round just completed (0 = the full copy).
    pub round: u64,
    /// Time since the migration started.
    pub elapsed: Duration,
    /// Pages dirtied since the round's start, still to send.
    pub pending_pages: u64,
    /// Expected wire bytes per pending page (from the last round's encoding).
    pub bytes_per_page: f64,
    /// Transfer bandwidth, bytes per second: wire bytes over the time they took, without
    /// the round trips spent waiting for acknowledgements.
    pub bandwidth: f64,
    /// The round trip to the destination. The last pages arrive half of it after the
    /// pause at best.
    pub round_trip: Duration,
    /// The destination resumes the guest, which it does one more round trip later (its
    /// `CommitReply` out, the source's `Handover` back).
    pub destination_resumes: bool,
    /// Pages the guest dirtied per second during the last round.
    pub dirty_rate: f64,
}

impl RoundObservation {
    /// The part of the downtime that no bandwidth shortens: half a round trip for the last
    /// pages, and a whole one more when the destination resumes the guest.
    pub fn switchover_latency(&self) -> Duration {
        let half = self.round_trip / 2;
        if self.destination_resumes {
            half.saturating_add(self.round_trip)
        } else {
            half
        }
    }

    /// Expected downtime if the switchover happened now: remaining bytes / bandwidth plus
    /// the [`switchover_latency`](Self::switchover_latency).
    pub fn expected_downtime(&self) -> Duration {
        let bytes = self.pending_pages as f64 * self.bytes_per_page;
        if bytes <= 0.0 {
            return self.switchover_latency();
        }
        if self.bandwidth <= 0.0 || !self.bandwidth.is_finite() {
            return Duration::MAX;
        }
        Duration::try_from_secs_f64(bytes / self.bandwidth)
            .ok()
            .and_then(|t| t.checked_add(self.switchover_latency()))
            .unwrap_or(Duration::MAX)
    }
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send the pending pages as another round with the guest running.
    Continue,
    /// Pause the guest and send the rest; `forced` when the estimate did not fit the limit.
    Switchover {
        /// The switchover happens because time ran out, not because it converged.
        forced: bool,
    },
    /// Give up; the source guest keeps running.
    Cancel,
}

/// Consulted after every round.
pub trait ConvergencePolicy: Send {
    /// Decides what follows the observed round.
    fn decide(&mut self, obs: &RoundObservation) -> Decision;
    /// Short name for statistics.
    fn name(&self) -> &'static str;
}

/// What happens when the migration timeout expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Abort the migration; the source keeps running.
    Cancel,
    /// Switch over anyway, accepting a longer downtime.
    Force,
}

/// Switch over when the expected downtime fits `limit`; after `timeout`, apply `on_timeout`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DowntimePolicy {
    /// Largest acceptable expected downtime.
    pub limit: Duration,
    /// Total migration time after which `on_timeout` applies.
    pub timeout: Option<Duration>,
    /// The strategy at timeout.
    pub on_timeout: OnTimeout,
}

impl ConvergencePolicy for DowntimePolicy {
    fn decide(&mut self, obs: &RoundObservation) -> Decision {
        // With nothing pending another round cannot shorten the downtime.
        if obs.expected_downtime() <= self.limit || obs.pending_pages == 0 {
            return Decision::Switchover { forced: false };
        }
        match self.timeout {
            Some(t) if obs.elapsed >= t => match self.on_timeout {
                OnTimeout::Cancel => Decision::Cancel,
                OnTimeout::Force => Decision::Switchover { forced: true },
            },
            _ => Decision::Continue,
        }
    }

    fn name(&self) -> &'static str {
        "downtime-limit"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(pending: u64, bandwidth: f64, elapsed_s: u64) -> RoundObservation {
        RoundObservation {
            round: 1,
            elapsed: Duration::from_secs(elapsed_s),
            pending_pages: pending,
            bytes_per_page: 1000.0,
            bandwidth,
            round_trip: Duration::ZERO,
            destination_resumes: false,
            dirty_rate: 0.0,
        }
    }

    #[test]
    fn expected_downtime_is_bytes_over_bandwidth() {
        assert_eq!(
            obs(300, 1_000_000.0, 0).expected_downtime(),
            Duration::from_millis(300)
        );
        assert_eq!(obs(0, 0.0, 0).expected_downtime(), Duration::ZERO);
        assert_eq!(obs(1, 0.0, 0).expected_downtime(), Duration::MAX);
    }

    #[test]
    fn expected_downtime_adds_half_the_round_trip() {
        let far = RoundObservation {
            round_trip: Duration::from_millis(600),
            ..obs(300, 1_000_000.0, 0)
        };
        assert_eq!(far.expected_downtime(), Duration::from_millis(600));
        // Resuming there waits for the handover: one round trip more.
        let resuming = RoundObservation {
            destination_resumes: true,
            ..far
        };
        assert_eq!(resuming.expected_downtime(), Duration::from_millis(1200));
        // Nothing left to send: only the latency is left, and no round can shorten it.
        let done = RoundObservation {
            pending_pages: 0,
            ..far
        };
        assert_eq!(done.expected_downtime(), Duration::from_millis(300));
        let mut p = DowntimePolicy {
            limit: Duration::from_millis(300),
            timeout: None,
            on_timeout: OnTimeout::Cancel,
        };
        assert_eq!(p.decide(&far), Decision::Continue);
        assert_eq!(p.decide(&done), Decision::Switchover { forced: false });
        // Even when that latency exceeds the limit: iterating would only spin.
        let beyond = RoundObservation {
            round_trip: Duration::from_secs(1),
            ..done
        };
        assert!(beyond.expected_downtime() > p.limit);
        assert_eq!(p.decide(&beyond), Decision::Switchover { forced: false });
    }

    #[test]
    fn decides_by_limit_then_timeout() {
        let mut p = DowntimePolicy {
            limit: Duration::from_millis(300),
            timeout: Some(Duration::from_secs(10)),
            on_timeout: OnTimeout::Cancel,
        };
        assert_eq!(
            p.decide(&obs(300, 1_000_000.0, 0)),
            Decision::Switchover { forced: false }
        );
        assert_eq!(p.decide(&obs(301, 1_000_000.0, 9)), Decision::Continue);
        assert_eq!(p.decide(&obs(301, 1_000_000.0, 10)), Decision::Cancel);
        p.on_timeout = OnTimeout::Force;
        assert_eq!(
            p.decide(&obs(301, 1_000_000.0, 10)),
            Decision::Switchover { forced: true }
        );
        p.timeout = None;
        assert_eq!(p.decide(&obs(10_000, 1.0, 1_000_000)), Decision::Continue);
    }
}
