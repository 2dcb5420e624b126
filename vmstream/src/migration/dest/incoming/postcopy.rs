//! The seam between post-copy (`migration::dest::postcopy`) and the kind of guest it resumes
//! before its last pages came: how each kind maps the committed image and registers that
//! mapping for MISSING faults ([`PostcopyLaunch`]), and what the placing loop asks of the
//! guest once it runs ([`PostcopyResumed`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::guest::file::layout::sb;
use crate::migration::dest::incoming::{KvmResumed, ResumedGuest};
use crate::migration::dest::machine::Received;
use crate::migration::error::RecvError;
use crate::migration::wire::GuestSamples;
use crate::telemetry::impact::sample_destination;
use crate::track::uffd_missing::MissingFaults;

/// Starts the guest; run on a thread of its own, since its first accesses fault and the
/// caller serves them meanwhile.
pub type PostcopyStart = Box<dyn FnOnce() -> Result<PostcopyResumed, RecvError> + Send>;

/// A guest ready to run on the committed image, its pages still owed: the mapping it runs
/// on is registered in `faults` (nothing touched it yet), and `start` runs it.
pub struct PostcopyLaunch {
    /// The userfaultfd of the mapping the guest runs on (the VMM's guest RAM for a KVM
    /// guest, the image's mapping for a guest process).
    pub faults: Arc<MissingFaults>,
    /// Runs the guest and waits until it runs.
    pub start: PostcopyStart,
}

/// A guest resumed by post-copy, of either kind.
#[derive(Debug)]
pub enum PostcopyResumed {
    /// A guest process run in this process.
    File(ResumedGuest),
    /// A KVM guest run by this process's VMM.
    Kvm(KvmResumed),
}

impl PostcopyResumed {
    /// Its transactions when it resumed.
    pub fn tx_at_resume(&self) -> u64 {
        match self {
            PostcopyResumed::File(g) => g.ready.tx_count,
            PostcopyResumed::Kvm(g) => g.tx_start,
        }
    }

    /// Whether it still runs (a guest process ends at `--run-for`; a KVM guest runs until
    /// the receive returns, unless a vCPU failed).
    pub fn is_running(&self) -> bool {
        match self {
            PostcopyResumed::File(g) => g.is_running(),
            PostcopyResumed::Kvm(g) => g.is_healthy(),
        }
    }

    /// Its transactions now; `file` is the committed image. Read with `pread` for a guest
    /// process (a read of a hole does not fill it, a fault through another mapping would);
    /// a KVM guest's counters are read through the VMM's registered mapping (a fault there
    /// is served): never call it on the thread that places pages before the last one.
    pub fn tx_count(&self, file: &File) -> u64 {
        match self {
            PostcopyResumed::File(_) => {
                let mut b = [0u8; 8];
                match file.read_exact_at(&mut b, sb::TX_COUNT as u64) {
                    Ok(()) => u64::from_le_bytes(b),
                    Err(_) => 0,
                }
            }
            PostcopyResumed::Kvm(g) => g.tx_count().unwrap_or(0),
        }
    }

    /// Every owed page landed and the digests matched: a KVM guest is paused for the
    /// ledger check of its now complete memory (as a pre-copy checks it before the
    /// resume), then runs on; returns that check's line. A guest process is checked by
    /// its own workload when it ends.
    pub fn check_complete(&mut self) -> Result<Option<String>, RecvError> {
        match self {
            PostcopyResumed::File(_) => Ok(None),
            PostcopyResumed::Kvm(g) => g.check_at_last_page().map(Some),
        }
    }

    /// Reads its transaction counter for `window`: the destination's part of the source's
    /// timeline. `target`: the committed image.
    pub fn sample(&self, target: &Path, window: Duration) -> Result<GuestSamples, String> {
        match self {
            PostcopyResumed::File(_) => {
                sample_destination(target, window, GuestSamples::MAX_SAMPLES)
                    .map(|samples| GuestSamples { samples })
                    .map_err(|e| e.to_string())
            }
            PostcopyResumed::Kvm(g) => g.sample(window).map_err(|e| e.to_string()),
        }
    }

    /// What the receive hands its caller.
    pub fn into_received(self) -> Received {
        let (guest, kvm) = match self {
            PostcopyResumed::File(g) => (Some(g), None),
            PostcopyResumed::Kvm(g) => (None, Some(g)),
        };
        Received {
            guest,
            kvm,
            handed_over: None,
            qemu: None,
        }
    }
}
