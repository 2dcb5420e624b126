//! The seam between the source state machine and the kind of guest it migrates: a
//! file-backed guest process ([`SourceGuest`]) or a KVM guest run by this process
//! ([`KvmSourceGuest`]). Both expose guest memory as a shared mapping of one file and hand
//! out their dirty tracker, so the source reads pages, tracks them, hashes the paused memory
//! and drives convergence the same way for either; only pause/resume, throttling, state and
//! the end differ.

use crate::guest::file::source::{DirtyTracking, GuestControlError, GuestSpec, SourceGuest};
use crate::guest::kvm::source::KvmSourceGuest;
use crate::guest::GuestKind;
use crate::memory::GuestMemory;
use crate::telemetry::notice::Notices;
use crate::track::DirtyTracker;

/// A guest on the source side of a migration: what it is, its memory and the tracker of
/// writes to it, and its control (pause, resume, throttle, end).
pub trait MigratableGuest {
    /// What the handshake and `GuestState` announce.
    fn kind(&self) -> GuestKind;

    /// One line for the operator (`guest pid=... path=... tracking=...`).
    fn describe(&self) -> String;

    /// Guest memory size in bytes.
    fn size(&self) -> u64;

    /// Transactions the guest has committed so far (read from guest memory).
    fn tx_count(&self) -> u64;

    /// The shared mapping of guest memory. The running guest's pages are read from it (by
    /// the sending thread, or by the codec's encode workers through a
    /// [`reader`](GuestMemory::reader) of it) after the tracker's
    /// [`before_read`](DirtyTracker::before_read).
    fn memory(&self) -> &GuestMemory;

    /// All of guest memory. Only while paused (the slice must not change while borrowed).
    fn paused_memory(&mut self) -> &[u8];

    /// The tracker of writes to guest memory.
    fn tracker(&mut self) -> &mut dyn DirtyTracker;

    /// Stops the guest; returns its non-memory state (empty for file-backed guests).
    fn pause(&mut self) -> Result<Vec<u8>, GuestControlError>;

    /// Continues a paused guest (no-op if running).
    fn resume(&mut self) -> Result<(), GuestControlError>;

    /// Whether the guest is paused.
    fn is_paused(&self) -> bool;

    /// Throttles the guest: stopped for `fraction` of every 10 ms period (0 = full speed).
    fn set_throttle(&mut self, fraction: f64);

    /// A QEMU guest: where the destination's QEMU takes the device state (the
    /// destination's `QemuIncoming`), for [`Self::terminate`]. Other guests ignore it.
    fn set_qemu_incoming(&mut self, _uri: &str) {}

    /// Ends the guest after a committed migration; its memory stays as at the pause.
    fn terminate(&mut self) -> Result<(), GuestControlError>;

    /// After the destination was told our guest ended (`Handover`): what the ending left
    /// (a QEMU guest's `quit`, out of the downtime). Errors are the caller's warnings.
    fn after_handover(&mut self) -> Result<(), GuestControlError> {
        Ok(())
    }

    /// Ends the guest after a committed handover and returns once nothing of its memory is
    /// mapped or open in any process this one controls (the guest process has exited,
    /// the mappings and descriptors here are dropped): the destination runs the guest on
    /// that same memory next.
    fn end_for_handover(mut self: Box<Self>) -> Result<(), GuestControlError> {
        self.terminate()
    }

    /// Fails if the guest ended by itself (a guest process killed or crashed); cheap enough
    /// to call every few pages. A guest in this process cannot end without us.
    fn check_alive(&mut self) -> Result<(), GuestControlError> {
        Ok(())
    }

    /// After a failed or cancelled migration (the guest runs again): what becomes of the
    /// guest, for the error message.
    fn failure_note(&self) -> String;

    /// After a failed or cancelled migration: leave the guest running (a file-backed guest
    /// process is detached; a KVM guest keeps running in this process as configured).
    fn keep_after_failure(self: Box<Self>);
}

/// Starts (or attaches to) the guest `spec` describes; what it has to tell (a guest
/// process's stderr, a KVM guest's warnings and lines) goes to `notices`.
pub fn open_guest(
    spec: &GuestSpec,
    tracking: Option<DirtyTracking>,
    notices: &Notices,
) -> Result<Box<dyn MigratableGuest>, GuestControlError> {
    Ok(match spec {
        GuestSpec::Kvm(k) => Box::new(KvmSourceGuest::start(k, notices)?),
        GuestSpec::Qemu(q) => Box::new(crate::guest::qemu::QemuSourceGuest::open(q, notices)?),
        _ => Box::new(SourceGuest::open(spec, tracking, notices)?),
    })
}

impl MigratableGuest for SourceGuest {
    fn kind(&self) -> GuestKind {
        GuestKind::File
    }

    fn describe(&self) -> String {
        format!(
            "guest pid={} path={} tracking={}",
            self.pid(),
            self.path().display(),
            self.tracker_name()
        )
    }

    fn size(&self) -> u64 {
        SourceGuest::size(self)
    }

    fn tx_count(&self) -> u64 {
        crate::guest::file::source::tx_count(SourceGuest::memory(self))
    }

    fn memory(&self) -> &GuestMemory {
        SourceGuest::memory(self)
    }

    fn paused_memory(&mut self) -> &[u8] {
        SourceGuest::paused_memory(self)
    }

    fn tracker(&mut self) -> &mut dyn DirtyTracker {
        SourceGuest::tracker(self)
    }

    fn pause(&mut self) -> Result<Vec<u8>, GuestControlError> {
        SourceGuest::pause(self).map(|()| Vec::new())
    }

    fn resume(&mut self) -> Result<(), GuestControlError> {
        SourceGuest::resume(self)
    }

    fn is_paused(&self) -> bool {
        SourceGuest::is_paused(self)
    }

    fn set_throttle(&mut self, fraction: f64) {
        SourceGuest::set_throttle(self, fraction)
    }

    fn terminate(&mut self) -> Result<(), GuestControlError> {
        SourceGuest::terminate(self)
    }

    fn check_alive(&mut self) -> Result<(), GuestControlError> {
        SourceGuest::check_alive(self)
    }

    fn end_for_handover(self: Box<Self>) -> Result<(), GuestControlError> {
        SourceGuest::end_and_release(*self)
    }

    fn failure_note(&self) -> String {
        if self.has_exited() {
            format!("guest pid {} had exited", self.pid())
        } else {
            format!("guest pid {} keeps running", self.pid())
        }
    }

    fn keep_after_failure(self: Box<Self>) {
        self.detach();
    }
}
