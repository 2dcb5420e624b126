//! The guest-impact timeline of a migration: the `timeline` key of `--stats-json` (see
//! [`crate::telemetry::timeline`]) that `vmstream plot` draws.
//!
//! The source samples the guest's transaction counter (it lives in guest memory) every
//! 100 ms from the migration's start ([`ImpactRecorder`]), and records each round's start,
//! dirtied and sent bytes, the throttle whenever it changes, the strategies' notes, and the
//! pause. After the commit the destination samples the resumed guest the same way for a
//! short window ([`DESTINATION_WINDOW`], or its `--run-for` if shorter) and sends the
//! readings in a `GuestSamples` message after `Resumed` ([`sample_destination`]); the
//! source places them on its own time axis through the CLOCK_REALTIME instants, as it does
//! for the downtime (same host, or synchronized clocks).
//!
//! ```text
//!                                 <- Resumed { at, running, .. }
//!   (destination, if running: sample the guest for min(2 s, --run-for))
//!                                 <- GuestSamples { (at, tx count)* }
//! ```

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use crate::memory::PAGE_SIZE;
use crate::telemetry::notice::Notices;
use crate::telemetry::sampler::{TpsSampler, SAMPLE_PERIOD};
use crate::telemetry::stats::{unix_ns, RoundStats};
use crate::telemetry::timeline::{Timeline, TimelineRecorder, TimelineSample};

/// How long the destination samples the resumed guest before reporting.
pub const DESTINATION_WINDOW: Duration = Duration::from_secs(2);

/// Longest the source waits for the destination's samples after `Resumed`.
pub const REPORT_WAIT: Duration = Duration::from_secs(10);

/// Builds the timeline on the source while the migration runs.
#[derive(Debug)]
pub struct ImpactRecorder {
    start: Instant,
    start_unix_ns: u64,
    sampler: Option<(TpsSampler, f64)>,
    recorder: TimelineRecorder,
    destination: Vec<(u64, u64)>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl ImpactRecorder {
    /// Starts sampling the guest memory file `path` for a migration that started at
    /// `start`. Without a file (`None`: a KVM guest), a readable one, or for memory that is
    /// not a vmstream workload's (no transaction counter), the timeline has no source samples
    /// (for a file, with a note to `notices` saying why).
    pub fn start(path: Option<&Path>, start: Instant, notices: &Notices) -> ImpactRecorder {
        let start_unix_ns =
            unix_ns(SystemTime::now()).saturating_sub(start.elapsed().as_nanos() as u64);
        let sampler = match path.map(start_sampler) {
            Some(Ok(s)) => Some((s, ms(start.elapsed()))),
            Some(Err(e)) => {
                notices.note(format!("no guest TPS samples: {e}"));
                None
            }
            None => None,
        };
        ImpactRecorder {
            start,
            start_unix_ns,
            sampler,
            recorder: TimelineRecorder::new(),
            destination: Vec::new(),
        }
    }

    /// A strategy's remark at `at` (since the migration started).
    pub fn note(&mut self, at: Duration, text: impl Into<String>) {
        self.recorder.note(at, text);
    }

    /// A round just ended (`rs` as the source measured it); `dirtied_pages` were written
    /// by the guest while it ran.
    pub fn round(&mut self, rs: &RoundStats, dirtied_pages: u64) {
        let duration = Duration::from_secs_f64(rs.duration_ms.max(0.0) / 1e3);
        let page = PAGE_SIZE as u64;
        self.recorder.round(
            rs.round,
            self.start.elapsed().saturating_sub(duration),
            duration,
            dirtied_pages * page,
            rs.wire_bytes,
            rs.deferred_pages * page,
            rs.paused,
        );
    }

    /// The guest's throttle is `fraction` from now on.
    pub fn throttle(&mut self, fraction: f64) {
        self.recorder.throttle(self.start.elapsed(), fraction);
    }

    /// The guest's disk write cap (disk write QoS) became `bytes_per_s` now (0: lifted).
    pub fn disk_write_limit(&mut self, bytes_per_s: u64) {
        self.recorder
            .disk_write_limit(self.start.elapsed(), bytes_per_s);
    }

    /// The guest was paused now.
    pub fn pause(&mut self) {
        self.recorder.pause(self.start.elapsed());
    }

    /// The guest ran again at the destination at `resumed_ns`, having paused at
    /// `paused_ns` (both CLOCK_REALTIME).
    pub fn resumed(&mut self, paused_ns: u64, resumed_ns: u64) {
        self.recorder
            .resumed_after(Duration::from_nanos(resumed_ns.saturating_sub(paused_ns)));
    }

    /// The destination's readings of the resumed guest: (CLOCK_REALTIME ns, transactions).
    pub fn destination(&mut self, samples: &[(u64, u64)]) {
        self.destination = samples.to_vec();
    }

    /// Transactions per second of the resumed guest over the destination's samples.
    pub fn destination_tps(&self) -> Option<f64> {
        samples_tps(&self.destination)
    }

    /// The timeline: source samples up to the resume, then the destination's. Stops the
    /// sampler; call once.
    pub fn finish(&mut self) -> Timeline {
        let recorder = std::mem::take(&mut self.recorder);
        let (samples, offset) = match self.sampler.take() {
            Some((s, offset)) => (s.stop(), offset),
            None => (Vec::new(), 0.0),
        };
        let mut t = recorder.finish(&samples, offset);
        if let Some(resume) = t.resume_ms {
            // The source guest ended at the commit: its counter stands still from then on.
            t.samples.retain(|s| s.t_ms <= resume);
        }
        let start = self.start_unix_ns;
        let at_ms = |ns: u64| (ns as f64 - start as f64) / 1e6;
        for w in self.destination.windows(2) {
            let (a, b) = (w[0], w[1]);
            let secs = b.0.saturating_sub(a.0) as f64 / 1e9;
            if secs > 0.0 {
                t.samples.push(TimelineSample {
                    t_ms: at_ms(b.0),
                    tps: b.1.saturating_sub(a.1) as f64 / secs,
                    throttle: 0.0,
                    disk_write_limit: 0,
                });
            }
        }
        t
    }
}

/// A sampler of the transaction counter of the workload in `path`, if it holds one.
fn start_sampler(path: &Path) -> std::io::Result<TpsSampler> {
    let mut magic = [0u8; 8];
    std::fs::File::open(path)?.read_exact(&mut magic)?;
    if u64::from_le_bytes(magic) != crate::guest::file::layout::MAGIC {
        return Err(std::io::Error::other(
            "the guest memory does not hold a vmstream workload",
        ));
    }
    TpsSampler::start(path, SAMPLE_PERIOD).map_err(std::io::Error::other)
}

/// Samples the transaction counter of the guest running on `path` every 100 ms for
/// `window`; at most `max` readings with their CLOCK_REALTIME instants.
pub fn sample_destination(
    path: &Path,
    window: Duration,
    max: usize,
) -> std::io::Result<Vec<(u64, u64)>> {
    let t0 = unix_ns(SystemTime::now());
    let sampler = start_sampler(path)?;
    std::thread::sleep(window);
    let samples = sampler
        .stop()
        .into_iter()
        .take(max)
        .map(|s| (t0 + s.at.as_nanos() as u64, s.tx_count))
        .collect();
    Ok(samples)
}

/// Transactions per second over `(CLOCK_REALTIME ns, transactions)` samples, first to last.
pub fn samples_tps(samples: &[(u64, u64)]) -> Option<f64> {
    let (first, last) = (samples.first()?, samples.last()?);
    let secs = last.0.saturating_sub(first.0) as f64 / 1e9;
    (secs > 0.0).then(|| last.1.saturating_sub(first.1) as f64 / secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::notice::Notice;
    use std::sync::{Arc, Mutex};

    #[test]
    fn destination_samples_follow_the_source_and_replace_its_tail() {
        let dir = std::env::temp_dir().join(format!("vmstream-impact-{}", std::process::id()));
        // No such file: the recorder still works, without source samples, and says so.
        let start = Instant::now();
        let told = Arc::new(Mutex::new(Vec::new()));
        let notices = Notices::new({
            let told = told.clone();
            move |n: &Notice| told.lock().unwrap().push(n.clone())
        });
        let mut r = ImpactRecorder::start(Some(&dir.join("absent")), start, &notices);
        let told = told.lock().unwrap().clone();
        let said_why = |t: &str| t.starts_with("no guest TPS samples: ");
        assert!(
            matches!(&told[..], [Notice::Note(t)] if said_why(t)),
            "{told:?}"
        );
        r.throttle(0.5);
        r.round(
            &RoundStats {
                round: 0,
                duration_ms: 0.0,
                wire_bytes: 10,
                ..Default::default()
            },
            3,
        );
        r.pause();
        let paused = r.start_unix_ns + 1_000_000_000;
        r.resumed(paused, paused + 50_000_000);
        r.destination(&[
            (paused + 60_000_000, 100),
            (paused + 160_000_000, 110),
            (paused + 260_000_000, 130),
        ]);
        assert_eq!(r.destination_tps(), Some(150.0));
        r.note(Duration::from_millis(5), "x");
        let t = r.finish();
        assert!(r.finish().rounds.is_empty());
        assert_eq!(t.rounds[0].dirty_bytes, 3 * 4096);
        assert_eq!(t.rounds[0].sent_bytes, 10);
        assert_eq!(t.rounds[0].throttle, 0.5);
        assert_eq!(t.samples.len(), 2);
        assert!((t.samples[0].t_ms - 1160.0).abs() < 1e-6, "{:?}", t.samples);
        assert!((t.samples[0].tps - 100.0).abs() < 1e-6);
        assert!((t.samples[1].tps - 200.0).abs() < 1e-6);
        assert_eq!(t.notes[0].text, "x");
        let (p, q) = t.downtime().unwrap();
        assert!((q - p - 50.0).abs() < 1e-6);
    }
}
