//! How the source proves what the destination holds (`--verify`, `PROTOCOL.md`, *Memory
//! digest*):
//!
//! - `full`: the digest reads all of the paused memory (its cost grows with the guest).
//! - `incremental`: the digest comes from the hash of every page as it was sent
//!   ([`SentPages`], recorded from the very snapshot the codec encoded), so the pause hashes
//!   only the final round's pages. What that digest cannot see, a write the dirty tracker
//!   missed, is looked for twice: during the rounds by the [`scrub`]ber (a mismatch is a
//!   tracking error once the tracker failed to report the page at two collections: the
//!   page is sent again, counted and reported), and after the commit by the [`audit`] of
//!   all frozen memory against what was sent.
//! - `strict`: incremental, but the switchover waits for a complete scrub pass after round
//!   0, and a tracking error fails the migration (the guest keeps running here).
//! - `auto` (the default): `full` when its measured cost fits in a fifth of the pause the
//!   migration aims at (`--downtime-target`, at most the limit: 30 ms by default),
//!   `incremental` otherwise.

pub mod audit;
pub mod scrub;
pub mod sent;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::memory::{merge_pages, GuestMemory};

pub use sent::{RecordingReader, SentPages};

use scrub::{Scrubber, Shared, Suspect};

/// `--verify`: how the memory the destination holds is proven equal to the source's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum VerifyMode {
    /// `full` when hashing all memory takes at most a fifth of the pause aimed at (the
    /// downtime target), `incremental` otherwise.
    #[default]
    Auto,
    /// Hash all memory at the pause.
    Full,
    /// Digest of the pages as sent, a background scrubber, and a post-commit audit.
    Incremental,
    /// `incremental`, waiting for a full scrub pass before the switchover and failing on
    /// a tracking error.
    Strict,
}

impl VerifyMode {
    /// The mode's name, as the CLI and the statistics spell it.
    pub fn name(self) -> &'static str {
        match self {
            VerifyMode::Auto => "auto",
            VerifyMode::Full => "full",
            VerifyMode::Incremental => "incremental",
            VerifyMode::Strict => "strict",
        }
    }

    /// The mode this migration uses: `auto` decided by `digest_estimate`, the measured
    /// time to hash all memory, against the pause aimed at (`aim`).
    pub fn resolve(self, digest_estimate: Duration, aim: Duration) -> VerifyMode {
        match self {
            VerifyMode::Auto if digest_estimate <= aim / 5 => VerifyMode::Full,
            VerifyMode::Auto => VerifyMode::Incremental,
            m => m,
        }
    }
}

/// Settings of the incremental modes' scrubber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrubSettings {
    /// Bytes per second the scrubber reads at most (None: as fast as it can).
    pub bytes_per_s: Option<u64>,
    /// Switch over only after a complete scrub pass that started after round 0 (always in
    /// `strict`).
    pub pass_before_switchover: bool,
}

impl Default for ScrubSettings {
    fn default() -> ScrubSettings {
        ScrubSettings {
            bytes_per_s: Some(DEFAULT_SCRUB_BYTES_PER_S),
            pass_before_switchover: false,
        }
    }
}

/// The scrubber's default pace: about a tenth of what one core hashes, so that it takes
/// little from the encoders on a busy host and still passes over 8 GiB in 8 s.
pub const DEFAULT_SCRUB_BYTES_PER_S: u64 = 1 << 30;

/// A tracking error: the tracker did not report a page the scrubber saw written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the dirty tracker missed writes to {} page(s) (first: {:?}); --verify strict fails the \
     migration",
    pages.len(),
    &pages[..pages.len().min(8)]
)]
pub struct TrackingError {
    /// The pages, ascending.
    pub pages: Vec<u64>,
}

/// The incremental verification of one migration on the source.
pub struct Verification {
    sent: Arc<SentPages>,
    strict: bool,
    settings: ScrubSettings,
    shared: Arc<Shared>,
    scrubber: Option<Scrubber>,
    /// Suspects waiting for the tracker's next collection.
    suspects: Vec<Suspect>,
    /// Every tracking error found, ascending.
    errors: Vec<u64>,
    /// When round 0 was acknowledged.
    round0_done: Option<Instant>,
}

impl Verification {
    /// Verification of a guest of `pages` pages; `strict`: a tracking error is fatal.
    pub fn new(pages: u64, strict: bool, settings: ScrubSettings) -> Verification {
        Verification {
            sent: Arc::new(SentPages::new(pages)),
            strict,
            settings: ScrubSettings {
                pass_before_switchover: settings.pass_before_switchover || strict,
                ..settings
            },
            shared: Arc::new(Shared::default()),
            scrubber: None,
            suspects: Vec::new(),
            errors: Vec::new(),
            round0_done: None,
        }
    }

    /// The hashes of what was sent, shared with whoever records them.
    pub fn sent(&self) -> &Arc<SentPages> {
        &self.sent
    }

    /// Round 0 is acknowledged: every page was sent once; the scrubber starts on `memory`.
    pub fn round0_done(&mut self, memory: &GuestMemory) -> std::io::Result<()> {
        self.round0_done = Some(Instant::now());
        self.scrubber = Some(Scrubber::start(
            Arc::clone(&self.sent),
            memory.reader(),
            memory.files()?,
            self.settings.bytes_per_s,
            Arc::clone(&self.shared),
        )?);
        Ok(())
    }

    /// Whether the switchover may happen now: in `strict` (or when asked), once a
    /// complete scrub pass started after round 0.
    pub fn may_switch_over(&self) -> bool {
        if !self.settings.pass_before_switchover {
            return true;
        }
        let last = *self.shared.last_pass_start.lock().expect("pass start");
        matches!((last, self.round0_done), (Some(l), Some(r)) if l >= r)
    }

    /// After the tracker's collection `pages` (sorted): marks them pending, and settles the
    /// scrubber's suspects. A suspect the tracker reported here is a tracked write; one it
    /// failed to report at the two collections after the scrubber saw it (or at the final
    /// collection, `last`, the scrubber being stopped) is a tracking error: it is added to
    /// `pages`, so it is sent again. In `strict` mode a tracking error is returned instead.
    pub fn after_collect(&mut self, pages: &mut Vec<u64>, last: bool) -> Result<(), TrackingError> {
        self.sent.mark_pending(pages);
        self.settle_suspects(pages, last)
    }

    /// [`Self::after_collect`] for a collection in parts whose pages were each marked
    /// pending ([`SentPages::mark_pending`]) before they were sent: settles the suspects
    /// against all of `pages`; the tracking errors it adds are marked pending here.
    pub fn settle_suspects(
        &mut self,
        pages: &mut Vec<u64>,
        last: bool,
    ) -> Result<(), TrackingError> {
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let mut fresh = std::mem::take(&mut *self.shared.suspects.lock().expect("suspects"));
        self.suspects.append(&mut fresh);
        let mut missed = Vec::new();
        self.suspects.retain(|s| {
            if pages.binary_search(&s.page).is_ok() {
                return false;
            }
            // This collection is the `epoch`-th; the suspect's write preceded the start of
            // collection `s.epoch + 1` at the latest.
            if last || epoch > s.epoch {
                missed.push(s.page);
                return false;
            }
            true
        });
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        missed.sort_unstable();
        missed.dedup();
        if missed.is_empty() {
            return Ok(());
        }
        self.errors = merge_pages(&self.errors, &missed);
        if self.strict {
            return Err(TrackingError { pages: missed });
        }
        self.sent.mark_pending(&missed);
        *pages = merge_pages(pages, &missed);
        Ok(())
    }

    /// Stops the scrubber (before the pause) and returns the scrub coverage: the share of
    /// pages verified since they were last sent.
    pub fn stop_scrubber(&mut self) -> f64 {
        if let Some(mut s) = self.scrubber.take() {
            s.stop();
        }
        let pages = self.sent.pages().max(1);
        self.sent.verified_pages() as f64 / pages as f64
    }

    /// Tracking errors found so far, ascending.
    pub fn tracking_errors(&self) -> &[u64] {
        &self.errors
    }

    /// Pages the scrubber read or checked, over all passes.
    pub fn pages_scrubbed(&self) -> u64 {
        self.shared.pages_scrubbed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verification() -> Verification {
        Verification::new(16, false, ScrubSettings::default())
    }

    fn suspect(v: &Verification, page: u64) {
        let epoch = v.shared.epoch.load(Ordering::Acquire);
        v.shared
            .suspects
            .lock()
            .unwrap()
            .push(Suspect { page, epoch });
    }

    #[test]
    fn auto_is_full_when_the_digest_fits_in_a_fifth_of_the_pause_aimed_at() {
        let ms = Duration::from_millis;
        assert_eq!(VerifyMode::Auto.resolve(ms(60), ms(300)), VerifyMode::Full);
        assert_eq!(
            VerifyMode::Auto.resolve(ms(61), ms(300)),
            VerifyMode::Incremental
        );
        assert_eq!(
            VerifyMode::Strict.resolve(ms(1), ms(300)),
            VerifyMode::Strict
        );
        assert_eq!(VerifyMode::Full.resolve(ms(900), ms(300)), VerifyMode::Full);
    }

    #[test]
    fn a_suspect_the_tracker_reports_is_no_error() {
        let mut v = verification();
        suspect(&v, 3);
        let mut pages = vec![3, 5];
        v.after_collect(&mut pages, false).unwrap();
        assert_eq!(pages, vec![3, 5]);
        let mut pages = vec![];
        v.after_collect(&mut pages, false).unwrap();
        assert!(pages.is_empty() && v.tracking_errors().is_empty());
    }

    #[test]
    fn a_suspect_missed_by_two_collections_is_resent_and_counted() {
        let mut v = verification();
        suspect(&v, 7);
        let mut pages = vec![1];
        v.after_collect(&mut pages, false).unwrap();
        // The first collection may have started before the write.
        assert_eq!(pages, vec![1]);
        let mut pages = vec![2, 9];
        v.after_collect(&mut pages, false).unwrap();
        assert_eq!(pages, vec![2, 7, 9]);
        assert_eq!(v.tracking_errors(), &[7]);
    }

    #[test]
    fn the_final_collection_settles_every_suspect() {
        let mut v = verification();
        suspect(&v, 4);
        let mut pages = vec![];
        v.after_collect(&mut pages, true).unwrap();
        assert_eq!(pages, vec![4]);
    }

    #[test]
    fn strict_fails_on_a_tracking_error() {
        let mut v = Verification::new(16, true, ScrubSettings::default());
        suspect(&v, 2);
        let err = v.after_collect(&mut vec![], true).unwrap_err();
        assert_eq!(err.pages, vec![2]);
        assert!(!v.may_switch_over(), "strict waits for a scrub pass");
    }
}
