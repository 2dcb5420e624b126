//! The convergence model: after every round the source hands the [`DowntimePolicy`] one
//! [`RoundObservation`] and applies the [`Decision`] it answers with: switch over or not
//! (and why), the guest's throttle, and which dirty pages hot-page deferral holds back (see
//! `vmstream/CONVERGENCE.md`).
//!
//! Everything here is pure and deterministic: time comes from [`RoundObservation::now`],
//! never from a clock read, so scripted observation sequences drive it exactly.
//!
//! Modules: [`policy`] (the downtime policy: the limit, the timeout rule, and the strategies
//! inside it), [`aim_low`] (whether another round pays off once the pause fits), [`qemu`] (auto-converge), [`direct_staged`] (direct then staged throttling),
//! [`defer`] (hot-page deferral).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

pub mod aim_low;
pub mod config;
pub mod defer;
pub mod direct_staged;
pub mod policy;
pub mod qemu;

pub use aim_low::{AimLow, AimLowConfig};
pub use config::ConvergeConfig;
pub use defer::{DeferConfig, DeferError, HotPageDeferral, Split};
pub use direct_staged::{DirectStaged, DirectStagedConfig};
pub use policy::{switchover_latency, DowntimePolicy, OnTimeout};
pub use qemu::{AutoConverge, AutoConvergeConfig};

/// Largest throttle fraction any strategy asks for (the guest keeps 1% of its CPU time).
pub const MAX_THROTTLE: f64 = 0.99;

/// What the source measured in the round that just ended; the input of the model and of
/// every strategy in it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundObservation {
    /// The round just completed (0 = the full copy).
    pub round: u64,
    /// Time since the migration started, at the end of this round. Strategies take all
    /// time from here, so scripted sequences drive them deterministically.
    pub now: Duration,
    /// Pages the guest dirtied during this round (found at the sync that ended it).
    pub dirty_pages: u64,
    /// `dirty_pages` times the page size.
    pub dirty_bytes: u64,
    /// Bytes transferred in this round.
    pub bytes_sent: u64,
    /// How long this round took.
    pub duration: Duration,
    /// Bandwidth measured in this round, bytes per second.
    pub bandwidth_bytes_per_s: f64,
    /// Average bandwidth since the migration started, bytes per second.
    pub avg_bandwidth: f64,
    /// Bytes still to send if the switchover happened now (wire estimate).
    pub remaining_dirty_bytes: u64,
    /// How long the remaining bytes may take at the switchover: the downtime limit less
    /// what no bandwidth shortens (the switchover digest, the [`switchover_latency`]).
    pub downtime_limit: Duration,
}

impl RoundObservation {
    /// Bytes the guest dirtied per second during this round (under the throttle that was
    /// in force), 0 for an instantaneous round.
    pub fn dirty_rate(&self) -> f64 {
        let s = self.duration.as_secs_f64();
        if s > 0.0 {
            self.dirty_bytes as f64 / s
        } else {
            0.0
        }
    }

    /// Expected downtime if the switchover happened now: remaining bytes over this round's
    /// bandwidth. The fixed part of the pause is already off [`Self::downtime_limit`]; the
    /// whole pause expected is this plus the [`switchover_latency`].
    pub fn expected_downtime(&self) -> Duration {
        if self.remaining_dirty_bytes == 0 {
            return Duration::ZERO;
        }
        let bw = self.bandwidth_bytes_per_s;
        if bw <= 0.0 || !bw.is_finite() {
            return Duration::MAX;
        }
        Duration::try_from_secs_f64(self.remaining_dirty_bytes as f64 / bw).unwrap_or(Duration::MAX)
    }

    /// Whether the remaining data fits the downtime limit. With nothing remaining it always
    /// does: another round could not shorten the pause.
    pub fn fits_downtime(&self) -> bool {
        self.expected_downtime() <= self.downtime_limit
    }
}

/// Why the switchover happens (the stats' `switchover_reason`). A strategy says
/// `Converged` or `Forced`; with a target pause ([`DowntimePolicy::with_target`]) the
/// policy tells a fitting pause's reason apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchReason {
    /// The expected downtime fits the limit (no target pause set, or the timeout ended
    /// the rounds aiming lower).
    Converged,
    /// The expected downtime fits the target pause (`--downtime-target`).
    TargetReached,
    /// The expected downtime fits the limit and the last round shrank it by less than
    /// [`aim_low::MIN_SHRINK`] below the best so far: more rounds would not pay off.
    StoppedShrinking,
    /// The expected downtime fits the limit while the guest is throttled: the policy does
    /// not keep a throttled guest iterating for a shorter pause.
    ThrottledFits,
    /// The downtime will exceed the limit: the strategy ran out of throttle, or the
    /// timeout expired under [`OnTimeout::Force`].
    Forced,
}

impl SwitchReason {
    /// The name in the statistics (`target-reached`, ...).
    pub fn name(self) -> &'static str {
        match self {
            SwitchReason::Converged => "converged",
            SwitchReason::TargetReached => "target-reached",
            SwitchReason::StoppedShrinking => "stopped-shrinking",
            SwitchReason::ThrottledFits => "throttled-fits",
            SwitchReason::Forced => "forced",
        }
    }
}

/// What to do after a round. A [`ThrottleStrategy`] decides the throttle and the
/// switchover; the [`DowntimePolicy`] around it adds the timeout rule (`cancel`, or a forced
/// switchover) and hot-page deferral (`pages`).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Throttle fraction for the next round, in `[0, MAX_THROTTLE]`: the guest gets about
    /// `1 - throttle` of its CPU time.
    pub throttle: f64,
    /// Switch over now, and why; `None` keeps iterating (unless `cancel`).
    pub switchover: Option<SwitchReason>,
    /// Give up, the source guest keeps running: the timeout expired while iterating under
    /// [`OnTimeout::Cancel`]. Only the [`DowntimePolicy`] sets it, never with `switchover`.
    pub cancel: bool,
    /// The dirty pages, split for the next round: `send_now` goes in it (everything still
    /// dirty when switching over), `deferred` stays dirty. The [`DowntimePolicy`] fills it;
    /// a strategy's decision leaves it empty.
    pub pages: Split,
    /// A human-readable remark on a state change (for logs and the timeline).
    pub note: Option<String>,
}

impl Decision {
    /// Keep iterating with `throttle`.
    pub fn iterate(throttle: f64) -> Decision {
        Decision {
            throttle: clamp_throttle(throttle),
            switchover: None,
            cancel: false,
            pages: Split::default(),
            note: None,
        }
    }

    /// Switch over for `reason`, keeping `throttle` until the pause.
    pub fn switch(throttle: f64, reason: SwitchReason) -> Decision {
        Decision {
            switchover: Some(reason),
            ..Decision::iterate(throttle)
        }
    }

    /// Attaches a note.
    pub fn with_note(mut self, note: impl Into<String>) -> Decision {
        self.note = Some(note.into());
        self
    }
}

/// A strategy setting outside its range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SettingError {
    /// `name` = `value` is not in `range`.
    #[error("{name} = {value} is out of range {range}")]
    OutOfRange {
        /// The setting.
        name: &'static str,
        /// The rejected value.
        value: f64,
        /// The accepted range, as text.
        range: &'static str,
    },
}

/// Clamps to `[0, MAX_THROTTLE]`; NaN becomes 0 (no throttle).
pub fn clamp_throttle(p: f64) -> f64 {
    if p.is_nan() {
        0.0
    } else {
        p.clamp(0.0, MAX_THROTTLE)
    }
}

/// A throttling strategy, consulted once per round.
pub trait ThrottleStrategy: Send {
    /// Decides the throttle (and possibly the switchover) after the observed round.
    fn observe(&mut self, obs: &RoundObservation) -> Decision;
    /// Short name for statistics.
    fn name(&self) -> &'static str;
}

/// No throttling: switch over when the downtime fits, otherwise keep iterating (the
/// downtime rule alone).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoThrottle;

impl ThrottleStrategy for NoThrottle {
    fn observe(&mut self, obs: &RoundObservation) -> Decision {
        if obs.fits_downtime() {
            Decision::switch(0.0, SwitchReason::Converged)
        } else {
            Decision::iterate(0.0)
        }
    }

    fn name(&self) -> &'static str {
        "none"
    }
}

/// The `--converge STRATEGY` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// No throttling.
    #[default]
    None,
    /// QEMU-style auto-converge.
    Qemu,
    /// Direct then staged throttling.
    DirectStaged,
}

impl Strategy {
    /// All strategies, in CLI order.
    pub const ALL: [Strategy; 3] = [Strategy::None, Strategy::Qemu, Strategy::DirectStaged];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::None => "none",
            Strategy::Qemu => "qemu",
            Strategy::DirectStaged => "direct-staged",
        }
    }

    /// The strategy with its default settings.
    pub fn build(self) -> Box<dyn ThrottleStrategy> {
        match self {
            Strategy::None => Box::new(NoThrottle),
            Strategy::Qemu => Box::new(AutoConverge::new(AutoConvergeConfig::default())),
            Strategy::DirectStaged => Box::new(DirectStaged::new(DirectStagedConfig::default())),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown `--converge` name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown convergence strategy {0:?} (one of none, qemu, direct-staged)")]
pub struct UnknownStrategy(pub String);

impl FromStr for Strategy {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Strategy, UnknownStrategy> {
        Strategy::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownStrategy(s.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// An observation at `now_ms` with the given dirty pages (4 KiB), bandwidth (also the
    /// average), remaining bytes and a round of `round_ms`.
    pub fn obs(now_ms: u64, dirty_pages: u64, bw: f64, remaining: u64) -> RoundObservation {
        RoundObservation {
            round: 1,
            now: Duration::from_millis(now_ms),
            dirty_pages,
            dirty_bytes: dirty_pages * 4096,
            bytes_sent: 0,
            duration: Duration::from_secs(1),
            bandwidth_bytes_per_s: bw,
            avg_bandwidth: bw,
            remaining_dirty_bytes: remaining,
            downtime_limit: Duration::from_millis(300),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::obs;
    use super::*;

    #[test]
    fn strategy_names_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(s.name().parse::<Strategy>(), Ok(s));
            assert_eq!(s.build().name(), s.name());
        }
        assert_eq!(
            "fast".parse::<Strategy>(),
            Err(UnknownStrategy("fast".into()))
        );
    }

    #[test]
    fn expected_downtime_and_rate() {
        let o = obs(0, 250, 1e6, 300_000);
        assert_eq!(o.expected_downtime(), Duration::from_millis(300));
        assert!(o.fits_downtime());
        assert_eq!(o.dirty_rate(), 250.0 * 4096.0);
        let o = obs(0, 250, 1e6, 300_001);
        assert!(!o.fits_downtime());
        assert_eq!(obs(0, 0, 0.0, 0).expected_downtime(), Duration::ZERO);
        assert_eq!(obs(0, 0, 0.0, 1).expected_downtime(), Duration::MAX);
        assert_eq!(obs(0, 0, f64::NAN, 1).expected_downtime(), Duration::MAX);
    }

    #[test]
    fn none_only_switches_when_it_fits() {
        let mut s = NoThrottle;
        assert_eq!(s.observe(&obs(0, 9, 1e6, 400_000)), Decision::iterate(0.0));
        assert_eq!(
            s.observe(&obs(0, 9, 1e6, 200_000)),
            Decision::switch(0.0, SwitchReason::Converged)
        );
    }

    #[test]
    fn switch_reasons_are_written_by_name() {
        for r in [
            SwitchReason::Converged,
            SwitchReason::TargetReached,
            SwitchReason::StoppedShrinking,
            SwitchReason::ThrottledFits,
            SwitchReason::Forced,
        ] {
            let json = serde_json::to_value(r).unwrap();
            assert_eq!(json, r.name());
            assert_eq!(serde_json::from_value::<SwitchReason>(json).unwrap(), r);
        }
    }

    #[test]
    fn clamp_handles_nan_and_range() {
        assert_eq!(clamp_throttle(f64::NAN), 0.0);
        assert_eq!(clamp_throttle(-1.0), 0.0);
        assert_eq!(clamp_throttle(1.5), MAX_THROTTLE);
        assert_eq!(clamp_throttle(0.5), 0.5);
    }
}
