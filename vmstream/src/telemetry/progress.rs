//! The sender's progress through its rounds (pages of the current round, the last round's
//! bandwidth), told as [`ProgressEvent`] notices; the CLI draws them as a progress bar.

use crate::telemetry::notice::{Notice, Notices};

/// A step of the sender's progress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ProgressEvent {
    /// The migration started sending.
    Started,
    /// Round `round` of `pages` pages started; `paused`: the final one, guest paused.
    Round {
        /// Round number.
        round: u64,
        /// Pages to send in it.
        pages: u64,
        /// Whether the guest is paused (the final round).
        paused: bool,
    },
    /// This many more pages of the round were queued.
    Pages(u64),
    /// A round ended, sent at this rate (wire bytes per second).
    Bandwidth(f64),
    /// The migration ended.
    Finished,
}

/// Tells the sender's progress, when enabled.
#[derive(Debug, Clone)]
pub struct Progress {
    notices: Option<Notices>,
}

impl Progress {
    /// Progress told to `notices` if `enabled` (else nothing is told).
    pub fn new(enabled: bool, notices: &Notices) -> Progress {
        let progress = Progress {
            notices: enabled.then(|| notices.clone()),
        };
        progress.tell(ProgressEvent::Started);
        progress
    }

    fn tell(&self, event: ProgressEvent) {
        if let Some(n) = &self.notices {
            n.tell(Notice::Progress(event));
        }
    }

    /// Starts round `round` of `pages` pages.
    pub fn round(&self, round: u64, pages: u64, paused: bool) {
        self.tell(ProgressEvent::Round {
            round,
            pages,
            paused,
        });
    }

    /// Advances by `n` pages.
    pub fn inc(&self, n: u64) {
        self.tell(ProgressEvent::Pages(n));
    }

    /// A round ended at `bytes_per_s` on the wire.
    pub fn bandwidth(&self, bytes_per_s: f64) {
        self.tell(ProgressEvent::Bandwidth(bytes_per_s));
    }

    /// The migration ended.
    pub fn finish(&self) {
        self.tell(ProgressEvent::Finished);
    }
}
