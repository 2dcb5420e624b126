//! Dirty page tracking: which guest pages changed since the last collection. Every tracker
//! implements the one trait [`DirtyTracker`]:
//!
//! - [`UffdWpTracker`] (`uffd_wp`): for guest processes vmstream starts, which armed
//!   userfaultfd async write-protect ([`uffd`]) on their memory; `PAGEMAP_SCAN` reports and
//!   re-protects the written pages.
//! - [`HashTracker`] (`hash`): for any writer; compares a hash of every page with the hash
//!   of what was last sent.
//! - [`KvmDirtyTracker`] (`kvm`): KVM's dirty log of a guest this process runs, in one of
//!   its three modes (bitmap, manual clear, per-vCPU rings).
//!
//! Disks have their own seam, [`DiskTracker`] (`disk`): dirty granules rather than pages.
//!
//! What the sender does with a tracker each round: [`DirtyTracker::collect`] the dirty
//! pages; for every page it sends, in ascending order, call [`DirtyTracker::before_read`]
//! before the page's contents are read (a tracker that re-arms lazily re-arms there); and,
//! when [`DirtyTracker::needs_sent_pages`], hand the bytes it sent to
//! [`DirtyTracker::page_sent`]. Tracking thus restarts for a page before the page is read:
//! a write racing with the read shows up again in the next round, never gets lost.
//!
//! [`uffd_missing`] is not a tracker: it is the userfaultfd MISSING mode a post-copy
//! destination places the guest's owed pages with.

pub mod disk;
pub mod disk_bitmap;
pub mod hash;
pub mod kvm;
pub mod uffd;
pub mod uffd_missing;
pub mod uffd_wp;

use std::io;
use std::time::Duration;

pub use disk::{DiskTracker, HashDiskTracker};
pub use disk_bitmap::BitmapDiskTracker;
pub use hash::HashTracker;
pub use kvm::KvmDirtyTracker;
pub use uffd_wp::UffdWpTracker;

/// Something that reports the guest pages written since it was last asked.
pub trait DirtyTracker: Send {
    /// Short name for logs and statistics ("uffd-wp", "hash", "kvm-clear", ...).
    fn name(&self) -> &'static str;

    /// Number of pages tracked.
    fn pages(&self) -> u64;

    /// Pages written since the previous call (or since the tracker was created): page
    /// indices from the start of guest memory, sorted, without duplicates. Tracking of
    /// these pages restarts here, or at the latest in [`Self::before_read`].
    fn collect(&mut self) -> io::Result<Vec<u64>>;

    /// The pages of `range` (a part of memory) written since they were last collected, as
    /// [`Self::collect`] reports them, or None if this tracker collects only all at once.
    /// The pause's collect goes part by part, ascending, over all of memory, so that each
    /// part's pages travel while the next part is collected (the hash tracker reads all of
    /// memory at the pause).
    fn collect_range(&mut self, range: std::ops::Range<u64>) -> Option<io::Result<Vec<u64>>> {
        let _ = range;
        None
    }

    /// Called for each page the sender sends from the running guest, in ascending order
    /// within a round, before the page's contents are read: a tracker that re-arms
    /// tracking lazily (KVM's manual-clear mode, per chunk) re-arms it here, so a write
    /// after the read is reported by the next [`Self::collect`].
    fn before_read(&mut self, page: u64) -> io::Result<()> {
        let _ = page;
        Ok(())
    }

    /// Whether [`Self::page_sent`] must see every page sent (content-based trackers): the
    /// sender then reads pages itself instead of letting its encode workers read them.
    fn needs_sent_pages(&self) -> bool {
        false
    }

    /// Tell the tracker the bytes of `page` that were actually sent. Content-based trackers
    /// compare against these (so a page that changes and changes back between `collect` and
    /// the read is not lost); write-tracking trackers ignore it.
    fn page_sent(&mut self, page: u64, data: &[u8]) {
        let _ = (page, data);
    }

    /// Whether a later write to a page that is a hole of the memory file now is reported by
    /// [`Self::collect`], so the sender may send the hole as zeros without reading it
    /// (reading a hole allocates it). If not, the sender reads every page.
    fn reports_writes_to_holes(&self) -> bool {
        false
    }

    /// Time spent re-arming tracking in [`Self::before_read`] since the last call (zero for
    /// trackers that re-arm in [`Self::collect`]).
    fn take_rearm_time(&mut self) -> Duration {
        Duration::ZERO
    }
}
