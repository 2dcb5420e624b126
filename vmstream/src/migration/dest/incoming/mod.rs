//! The seam between the destination state machine and the kind of guest it receives: a
//! file-backed guest process ([`IncomingFileGuest`]), a KVM guest ([`IncomingKvmGuest`]) or a
//! QEMU VM ([`IncomingQemuGuest`]).
//! The machine receives the rounds, digests and commits the image the same way for either;
//! checking the guest, verifying its image before the commit and resuming it differ, and
//! are each kind's [`IncomingGuest`] operations.

use crate::telemetry::notice::Notices;
use crate::telemetry::settings::Settings;
use crate::telemetry::switchover::SwitchoverTimes;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::memory::GuestMemory;
use crate::migration::dest::machine::Received;
use crate::migration::dest::verify::{Backlog, DataPages, TouchedPages};
use crate::migration::digest::PageHashes;
use crate::migration::error::{GuestStateError, RecvError};
use crate::migration::image::PendingImage;
use crate::migration::wire::{GuestKind, GuestSamples, GuestState, Hello, RefuseCode};

mod file;
mod kvm;
mod postcopy;
mod qemu;

pub use file::{IncomingFileGuest, ResumedGuest};
pub use kvm::{IncomingKvmGuest, KvmResumed, KvmRunOutcome};
pub use postcopy::{PostcopyLaunch, PostcopyResumed, PostcopyStart};
pub use qemu::{IncomingQemuGuest, QemuLaunch, QemuResumed};

/// A guest on the destination side of a migration, from the handshake that named its kind
/// to the resume.
pub trait IncomingGuest {
    /// The kind the handshake announced.
    fn kind(&self) -> GuestKind;

    /// Refusals specific to this kind, checked with the rest of the `Hello`; `resume`:
    /// whether the guest is to run here.
    fn check_hello(&self, hello: &Hello, resume: bool) -> Option<(RefuseCode, String)>;

    /// Guest memory is several files (a QEMU VM's RAM backends): the temporary images of
    /// the regions after the first (whose image [`Self::start_background`] gets), in order,
    /// told before it. Kinds whose memory is one file never get it.
    fn memory_regions(&mut self, temp_images: Vec<std::path::PathBuf>) {
        let _ = temp_images;
    }

    /// With `--resume`: starts checking, during the live rounds, the blocks of the pending
    /// image (`view`, a read-only mapping of it) whose pages `touched` marks (see
    /// [`super::verify`]). On error the image is verified at the pause only.
    fn start_background(
        &mut self,
        view: GuestMemory,
        touched: Arc<TouchedPages>,
    ) -> std::io::Result<()>;

    /// A live round passed its barrier: the background checks what it changed.
    fn round_applied(&self);

    /// What the background verify has yet to check (the verify at the pause would check
    /// it), if this kind verifies in the background and has timed a pass.
    fn verify_backlog(&self) -> Option<Backlog> {
        None
    }

    /// With `--resume`, at the pause: the workload's verify of the final image (a guest
    /// that could not resume from it must not have it committed). `hashes` describe the
    /// image as the codec left it. The result is kept for [`Self::verify_failure`] and
    /// [`Self::resume`].
    fn verify_at_pause(&mut self, image: &mut PendingImage, hashes: &PageHashes);

    /// In a handover with `--resume`: starts checking the handed-over memory (`view`, a
    /// read-only mapping of it) in the background, the pages `touched` marks (every page
    /// first, then those each live round lists), so that [`Self::verify_handed_over`] reads
    /// only the last round's. Returns false for kinds that verify all of it at the pause.
    fn start_handover_checks(
        &mut self,
        view: GuestMemory,
        touched: Arc<TouchedPages>,
    ) -> std::io::Result<bool> {
        let _ = (view, touched);
        Ok(false)
    }

    /// Waits until the background took every page marked so far (a handover's live round);
    /// returns at once without a background.
    fn wait_checked(&self) {}

    /// With `--resume`, in a handover: the workload's verify of the guest's own memory,
    /// handed over by descriptor (`memory`: a private view of it, whose writes, a journal
    /// replay, stay here; `data`: its data pages, holes clear, asked for only if the whole
    /// memory is read). Uses what the background learned, if it ran. Kept as
    /// [`Self::verify_at_pause`] keeps its result; [`Self::resume`] then redoes on the
    /// shared memory whatever the verify changed in its view.
    fn verify_handed_over(&mut self, memory: &mut [u8], data: DataPages<'_>);

    /// Why the verify at the pause failed, if it did: then nothing is committed.
    fn verify_failure(&self) -> Option<String>;

    /// Validates this kind's `GuestState` (its kind already matches) against the received
    /// `memory`; records what it learnt in the statistics' `settings`.
    fn accept_state(
        &mut self,
        state: &GuestState,
        memory: &[u8],
        settings: &mut Settings,
    ) -> Result<(), GuestStateError>;

    /// The disks committed with the image (`recv --disk`, in the source's order), told
    /// before [`Self::resume`]: the guest that resumes verifies them against its memory
    /// and writes them (a process guest; other kinds have no disks yet and ignore them).
    fn committed_disks(&mut self, disks: &[std::path::PathBuf]) {
        let _ = disks;
    }

    /// Runs the guest on the committed image (`memory`, mapped from `target`), verified at
    /// the pause; `run_for` bounds how long it runs (None: until stopped).
    fn resume(
        &mut self,
        memory: GuestMemory,
        target: &Path,
        run_for: Option<Duration>,
    ) -> Result<Resumption, RecvError>;

    /// Post-copy: readies the guest to run on the committed image `memory` (mapped from
    /// its path) whose owed pages are holes: maps it as the guest will run on it and
    /// registers that mapping for MISSING faults before anything touches it. The guest's
    /// state was accepted ([`Self::accept_state`]); `run_for` bounds how long it runs.
    fn postcopy_launch(
        &mut self,
        memory: GuestMemory,
        run_for: Option<Duration>,
    ) -> Result<PostcopyLaunch, RecvError> {
        let _ = (memory, run_for);
        Err(RecvError::Resume(format!(
            "post-copy of {:?} guests is not built",
            self.kind()
        )))
    }

    /// Reads the resumed guest's transaction counter for `window`: the destination's part
    /// of the source's timeline.
    fn sample(&self, target: &Path, window: Duration) -> Result<GuestSamples, String>;

    /// A QEMU guest: where the destination's QEMU takes the device state, told to the
    /// source right after the commit (`QemuIncoming`). None for other guests.
    fn qemu_incoming(&self) -> Option<String> {
        None
    }

    /// What the receive hands its caller: the resumed guest, if any.
    fn into_received(self: Box<Self>) -> Received;
}

/// A guest running again on the destination.
#[derive(Debug)]
pub struct Resumption {
    /// Its transactions when it resumed.
    pub tx_count: u64,
    /// When it ran again (CLOCK_REALTIME ns): the end of the downtime.
    pub at_unix_ns: u64,
    /// Time of the resume's phases, ms (only those fields are set).
    pub phases: SwitchoverTimes,
}

/// The incoming guest of `kind`; once resumed, the lines it reports go to `notices`. A
/// QEMU guest is run with `qemu` (None: refused at the hello).
pub fn incoming_guest(
    kind: GuestKind,
    notices: &Notices,
    qemu: Option<&QemuLaunch>,
) -> Box<dyn IncomingGuest> {
    match kind {
        GuestKind::File => Box::new(IncomingFileGuest::new(notices.clone())),
        GuestKind::Kvm => Box::new(IncomingKvmGuest::new(notices.clone())),
        GuestKind::Qemu => Box::new(IncomingQemuGuest::new(qemu.cloned())),
    }
}

/// Checks a `GuestState` against the kind the handshake announced, then lets `guest`
/// validate it against the received `memory`; returns the settings to record.
pub fn check_guest_state(
    guest: &mut dyn IncomingGuest,
    state: &GuestState,
    memory: &[u8],
    settings: &mut Settings,
) -> Result<(), GuestStateError> {
    if state.guest_kind != guest.kind() {
        return Err(GuestStateError::KindMismatch {
            hello: guest.kind(),
            state: state.guest_kind,
        });
    }
    guest.accept_state(state, memory, settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(kind: GuestKind, blob: Vec<u8>) -> GuestState {
        GuestState {
            guest_kind: kind,
            tx_count: 0,
            blob,
        }
    }

    #[test]
    fn kind_must_match_the_handshake() {
        let mut file = incoming_guest(GuestKind::File, &Notices::silent(), None);
        let mut settings = Settings::default();
        let e = check_guest_state(
            &mut *file,
            &state(GuestKind::Kvm, vec![]),
            &[],
            &mut settings,
        );
        assert!(matches!(e, Err(GuestStateError::KindMismatch { .. })));
        assert!(matches!(
            check_guest_state(
                &mut *file,
                &state(GuestKind::File, vec![]),
                &[],
                &mut settings
            ),
            Ok(())
        ));
        // A guest process has no state to record.
        assert_eq!(settings, Settings::default());
    }

    /// `PROTOCOL.md`: a file-backed guest's state blob is empty; one that is not is refused.
    #[test]
    fn a_file_guest_state_with_a_blob_is_refused() {
        let mut file = incoming_guest(GuestKind::File, &Notices::silent(), None);
        let e = check_guest_state(
            &mut *file,
            &state(GuestKind::File, vec![1; 9]),
            &[],
            &mut Settings::default(),
        );
        assert!(
            matches!(e, Err(GuestStateError::UnexpectedBlob { len: 9 })),
            "{e:?}"
        );
    }

    #[test]
    fn garbage_kvm_state_is_refused_with_the_state_error() {
        let mut kvm = incoming_guest(GuestKind::Kvm, &Notices::silent(), None);
        let mut settings = Settings::default();
        let e = check_guest_state(
            &mut *kvm,
            &state(GuestKind::Kvm, vec![7; 100]),
            &[],
            &mut settings,
        );
        assert!(matches!(e, Err(GuestStateError::Invalid(_))), "{e:?}");
    }
}
