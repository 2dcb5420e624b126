//! The guest-impact timeline: guest TPS and throttle over time, per-round dirty and sent
//! bytes, and the downtime window. Serialized under a top-level `timeline` key of the
//! statistics JSON; `vmstream plot` draws it.
//!
//! All times are milliseconds since the migration started (samples taken during a warm-up
//! before it have negative times).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::telemetry::sampler::Sample;

/// One guest TPS sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TimelineSample {
    /// Time, ms since the migration started.
    pub t_ms: f64,
    /// Guest transactions per second since the previous sample.
    pub tps: f64,
    /// Throttle fraction in force, 0..=0.99.
    pub throttle: f64,
    /// Disk write QoS cap in force on all the guest's disk writes, bytes/s (0: none).
    pub disk_write_limit: u64,
}

/// One migration round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TimelineRound {
    /// Round number (0 = full copy).
    pub round: u64,
    /// Start, ms since the migration started.
    pub start_ms: f64,
    /// Duration, ms.
    pub duration_ms: f64,
    /// Bytes the guest dirtied during the round.
    pub dirty_bytes: u64,
    /// Bytes sent in the round (on the wire).
    pub sent_bytes: u64,
    /// Dirty bytes held back by hot-page deferral in this round.
    pub deferred_bytes: u64,
    /// Throttle fraction in force during the round.
    pub throttle: f64,
    /// The final round, with the guest paused.
    pub paused: bool,
    /// Disk write QoS cap in force when the round started, bytes/s (0: none).
    pub disk_write_limit: u64,
}

/// A remark at a point in time (a strategy's state change).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TimelineNote {
    /// Time, ms since the migration started.
    pub t_ms: f64,
    /// The remark.
    pub text: String,
}

/// Guest impact of one migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Timeline {
    /// Guest TPS samples, in time order.
    pub samples: Vec<TimelineSample>,
    /// Rounds, in order.
    pub rounds: Vec<TimelineRound>,
    /// When the guest was paused on the source, ms.
    pub pause_ms: Option<f64>,
    /// When the guest ran again (on the destination), ms.
    pub resume_ms: Option<f64>,
    /// Strategy remarks.
    pub notes: Vec<TimelineNote>,
}

impl Timeline {
    /// The downtime window `(pause, resume)` in ms, when both ends are known and ordered.
    pub fn downtime(&self) -> Option<(f64, f64)> {
        match (self.pause_ms, self.resume_ms) {
            (Some(p), Some(r)) if p.is_finite() && r.is_finite() && r >= p => Some((p, r)),
            _ => None,
        }
    }

    /// The time span covered by samples, rounds and the downtime, ms (`None` when empty).
    pub fn span_ms(&self) -> Option<(f64, f64)> {
        let times = self
            .samples
            .iter()
            .map(|s| s.t_ms)
            .chain(
                self.rounds
                    .iter()
                    .flat_map(|r| [r.start_ms, r.start_ms + r.duration_ms]),
            )
            .chain(self.pause_ms)
            .chain(self.resume_ms)
            .filter(|t| t.is_finite());
        times.fold(None, |acc, t| match acc {
            None => Some((t, t)),
            Some((lo, hi)) => Some((f64::min(lo, t), f64::max(hi, t))),
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Collects a timeline while a migration runs; times are [`Duration`]s since its start.
#[derive(Debug, Clone, Default)]
pub struct TimelineRecorder {
    throttle: Vec<(f64, f64)>,
    /// Disk write caps as they changed: (ms, bytes/s, 0 = none).
    disk_write_limit: Vec<(f64, u64)>,
    timeline: Timeline,
}

impl TimelineRecorder {
    /// An empty recorder.
    pub fn new() -> TimelineRecorder {
        TimelineRecorder::default()
    }

    /// The throttle became `p` at `at`.
    pub fn throttle(&mut self, at: Duration, p: f64) {
        if self.throttle.last().map(|&(_, q)| q) != Some(p) {
            self.throttle.push((ms(at), p));
        }
    }

    /// The throttle in force at `t_ms` (0 before the first change).
    pub fn throttle_at(&self, t_ms: f64) -> f64 {
        self.throttle
            .iter()
            .take_while(|&&(t, _)| t <= t_ms)
            .last()
            .map_or(0.0, |&(_, p)| p)
    }

    /// The disk write cap became `bytes_per_s` (0: lifted) at `at`.
    pub fn disk_write_limit(&mut self, at: Duration, bytes_per_s: u64) {
        if self.disk_write_limit.last().map(|&(_, b)| b) != Some(bytes_per_s) {
            self.disk_write_limit.push((ms(at), bytes_per_s));
        }
    }

    /// The disk write cap in force at `t_ms` (0 before the first change).
    pub fn disk_write_limit_at(&self, t_ms: f64) -> u64 {
        self.disk_write_limit
            .iter()
            .take_while(|&&(t, _)| t <= t_ms)
            .last()
            .map_or(0, |&(_, b)| b)
    }

    /// A round that ran from `start` for `duration`.
    #[allow(clippy::too_many_arguments)]
    pub fn round(
        &mut self,
        round: u64,
        start: Duration,
        duration: Duration,
        dirty_bytes: u64,
        sent_bytes: u64,
        deferred_bytes: u64,
        paused: bool,
    ) {
        let start_ms = ms(start);
        let throttle = if paused {
            0.0
        } else {
            self.throttle_at(start_ms)
        };
        self.timeline.rounds.push(TimelineRound {
            round,
            start_ms,
            duration_ms: ms(duration),
            dirty_bytes,
            sent_bytes,
            deferred_bytes,
            throttle,
            paused,
            disk_write_limit: if paused {
                0
            } else {
                self.disk_write_limit_at(start_ms)
            },
        });
    }

    /// A strategy remark at `at`.
    pub fn note(&mut self, at: Duration, text: impl Into<String>) {
        self.timeline.notes.push(TimelineNote {
            t_ms: ms(at),
            text: text.into(),
        });
    }

    /// The guest paused at `at`.
    pub fn pause(&mut self, at: Duration) {
        self.timeline.pause_ms = Some(ms(at));
    }

    /// The guest ran again `downtime` after the pause.
    pub fn resumed_after(&mut self, downtime: Duration) {
        if let Some(p) = self.timeline.pause_ms {
            self.timeline.resume_ms = Some(p + ms(downtime));
        }
    }

    /// The timeline, with TPS `samples` from a [`crate::telemetry::sampler::TpsSampler`] that started
    /// `sampler_offset_ms` after the migration (negative: before it). Each sample carries
    /// the throttle in force at its time (the first sample, which has no rate, is dropped);
    /// from the pause on (paused, then running unthrottled
    /// on the destination) they carry 0.
    pub fn finish(mut self, samples: &[Sample], sampler_offset_ms: f64) -> Timeline {
        let pause = self.timeline.pause_ms.unwrap_or(f64::INFINITY);
        // The sampler's first sample has no previous one, so no rate: skip it.
        self.timeline.samples = samples
            .iter()
            .skip(1)
            .map(|s| {
                let t_ms = ms(s.at) + sampler_offset_ms;
                TimelineSample {
                    t_ms,
                    tps: s.tps,
                    throttle: if t_ms >= pause {
                        0.0
                    } else {
                        self.throttle_at(t_ms)
                    },
                    disk_write_limit: if t_ms >= pause {
                        0
                    } else {
                        self.disk_write_limit_at(t_ms)
                    },
                }
            })
            .collect();
        self.timeline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_tags_samples_with_the_throttle_in_force() {
        let mut r = TimelineRecorder::new();
        r.throttle(Duration::from_millis(1000), 0.2);
        r.throttle(Duration::from_millis(1000), 0.2); // unchanged: not recorded twice
        r.throttle(Duration::from_millis(2000), 0.3);
        r.round(
            0,
            Duration::ZERO,
            Duration::from_millis(1500),
            10,
            20,
            0,
            false,
        );
        r.round(
            1,
            Duration::from_millis(1500),
            Duration::from_millis(100),
            1,
            2,
            0,
            false,
        );
        r.pause(Duration::from_millis(2500));
        r.resumed_after(Duration::from_millis(200));
        r.note(Duration::from_millis(1000), "x");
        let samples: Vec<Sample> = [0u64, 0, 1000, 1500, 2100, 2600, 2800]
            .iter()
            .map(|&t| Sample {
                at: Duration::from_millis(t + 500),
                tx_count: 0,
                tps: t as f64,
            })
            .collect();
        let t = r.finish(&samples, -500.0);
        let th: Vec<f64> = t.samples.iter().map(|s| s.throttle).collect();
        assert_eq!(th, vec![0.0, 0.2, 0.2, 0.3, 0.0, 0.0]);
        assert_eq!(t.samples[1].t_ms, 1000.0);
        assert_eq!(t.rounds[1].throttle, 0.2);
        assert_eq!(t.downtime(), Some((2500.0, 2700.0)));
        assert_eq!(t.span_ms(), Some((0.0, 2800.0)));
        assert_eq!(t.notes.len(), 1);
    }

    #[test]
    fn serde_round_trip_and_tolerant_defaults() {
        let mut t = Timeline::default();
        t.samples.push(TimelineSample {
            t_ms: 1.0,
            tps: 2.0,
            throttle: 0.5,
            disk_write_limit: 0,
        });
        t.pause_ms = Some(3.0);
        let json = serde_json::to_string(&t).unwrap();
        let back: Timeline = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        // Missing fields default.
        let partial: Timeline =
            serde_json::from_str(r#"{"rounds":[{"round":3,"sent_bytes":7}]}"#).unwrap();
        assert_eq!(partial.rounds[0].round, 3);
        assert_eq!(partial.rounds[0].sent_bytes, 7);
        assert_eq!(partial.pause_ms, None);
        assert_eq!(Timeline::default().span_ms(), None);
    }
}
