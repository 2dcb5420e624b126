//! The seam between the source state machine and the kind of guest it migrates: a
//! file-backed guest process ([`SourceGuest`]) or a KVM guest run by this process
//! ([`KvmSourceGuest`]). Both expose guest memory as a shared mapping of one file, so
//! `source.rs` reads pages, hashes the paused memory and drives convergence the same way
//! for either; only dirty tracking, pause/resume, throttling, state and the end differ.

use std::io;
use std::time::Duration;

use crate::guest::file::source::{DirtyTracking, GuestControlError, GuestSpec, SourceGuest};
use crate::guest::kvm::source::KvmSourceGuest;
use crate::guest::GuestKind;
use crate::memory::{GuestMemory, MemoryReader};
use crate::telemetry::notice::Notices;

/// A guest on the source side of a migration.
pub trait MigratableGuest {
    /// What the handshake and `GuestState` announce.
    fn kind(&self) -> GuestKind;

    /// One line for the operator (`guest pid=... path=... tracking=...`).
    fn describe(&self) -> String;

    /// Guest memory size in bytes.
    fn size(&self) -> u64;

    /// The shared mapping of guest memory.
    fn memory(&self) -> &GuestMemory;

    /// Transactions the guest has committed so far (read from guest memory).
    fn tx_count(&self) -> u64;

    /// The dirty tracker's name.
    fn tracker_name(&self) -> &'static str;

    /// Pages written since the previous call, sorted, without duplicates, all below
    /// `size() / 4096` (see [`crate::track::DirtyTracker::collect`]).
    fn collect_dirty(&mut self) -> io::Result<Vec<u64>>;

    /// Copies page `page` of the running guest into `buf` for sending. Pages of one round
    /// come in ascending order (a tracker that re-arms per chunk relies on it).
    fn read_page_for_send(&mut self, page: u64, buf: &mut [u8]) -> io::Result<()>;

    /// A reader of live guest memory for the codec's encode workers, which then copy the
    /// pages themselves, in parallel, instead of this thread copying each one
    /// ([`Self::read_page_for_send`]). `None` when every page sent must pass through the
    /// guest's own code (a content-based dirty tracker that hashes what was sent).
    fn page_reader(&self) -> Option<MemoryReader> {
        None
    }

    /// With a [`Self::page_reader`]: called for page `page` before it is queued for the
    /// workers to read (in ascending order within a round, like
    /// [`Self::read_page_for_send`]), so that whatever re-arms dirty tracking for it
    /// happens before that read.
    fn before_queue(&mut self, page: u64) -> io::Result<()> {
        let _ = page;
        Ok(())
    }

    /// Stands in for [`Self::read_page_for_send`] on a page that was a hole of the memory
    /// file when dirty tracking was last reset: `buf` becomes what the page holds. The
    /// default reads it (always correct); a guest whose tracker reports every later write
    /// to a hole fills zeros without touching the page (reading a hole allocates it).
    fn hole_page_for_send(&mut self, page: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_page_for_send(page, buf)
    }

    /// All of guest memory. Only while paused (the slice must not change while borrowed).
    fn paused_memory(&mut self) -> &[u8];

    /// Stops the guest; returns its non-memory state (empty for file-backed guests).
    fn pause(&mut self) -> Result<Vec<u8>, GuestControlError>;

    /// Continues a paused guest (no-op if running).
    fn resume(&mut self) -> Result<(), GuestControlError>;

    /// Whether the guest is paused.
    fn is_paused(&self) -> bool;

    /// Throttles the guest: stopped for `fraction` of every 10 ms period (0 = full speed).
    fn set_throttle(&mut self, fraction: f64);

    /// Time spent re-arming dirty tracking per chunk since the last call (KVM `clear`
    /// mode; zero for trackers that re-arm in `collect_dirty`).
    fn take_rearm_time(&mut self) -> Duration {
        Duration::ZERO
    }

    /// Ends the guest after a committed migration; its memory stays as at the pause.
    fn terminate(&mut self) -> Result<(), GuestControlError>;

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

    fn memory(&self) -> &GuestMemory {
        SourceGuest::memory(self)
    }

    fn tx_count(&self) -> u64 {
        crate::guest::file::source::tx_count(SourceGuest::memory(self))
    }

    fn tracker_name(&self) -> &'static str {
        SourceGuest::tracker_name(self)
    }

    fn collect_dirty(&mut self) -> io::Result<Vec<u64>> {
        SourceGuest::collect_dirty(self)
    }

    /// A write-tracking tracker re-arms in `collect_dirty`, before any read: nothing to
    /// do per page.
    fn page_reader(&self) -> Option<MemoryReader> {
        SourceGuest::page_reader(self)
    }

    fn read_page_for_send(&mut self, page: u64, buf: &mut [u8]) -> io::Result<()> {
        SourceGuest::read_page_for_send(self, page, buf);
        Ok(())
    }

    /// uffd-wp (with unpopulated-page protection) and hash tracking both report a later
    /// write to a hole.
    fn hole_page_for_send(&mut self, page: u64, buf: &mut [u8]) -> io::Result<()> {
        SourceGuest::hole_page_for_send(self, page, buf);
        Ok(())
    }

    fn paused_memory(&mut self) -> &[u8] {
        SourceGuest::paused_memory(self)
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
