//! Dirty page tracking: which guest pages changed since the last collection.
//!
//! Every tracker follows the same contract: [`DirtyTracker::collect`] returns (sorted, page
//! indices relative to the start of guest memory) every page written since the previous
//! `collect` (or since the tracker was created), and resets tracking in the same step.
//! Call `collect` *before* reading the pages you send: a write racing with the read then
//! shows up again in the next round, never gets lost.
//!
//! - [`UffdWpTracker`] (`uffd_wp`): for guest processes vmstream starts, which armed
//!   userfaultfd async write-protect ([`uffd`]) on their memory.
//! - [`HashTracker`] (`hash`): for any writer; compares a hash of every page with the hash
//!   of what was last sent.

pub mod hash;
pub mod kvm;
pub mod kvm_tracker;
pub mod uffd;
pub mod uffd_wp;

use std::io;

pub use hash::HashTracker;
pub use uffd_wp::UffdWpTracker;

/// Something that reports the guest pages written since it was last asked.
pub trait DirtyTracker: Send {
    /// Pages written since the previous call (sorted page indices); resets tracking.
    fn collect(&mut self) -> io::Result<Vec<u64>>;
    /// Number of pages tracked.
    fn pages(&self) -> u64;
    /// Short name for logs ("uffd-wp", "hash").
    fn name(&self) -> &'static str;
    /// Tell the tracker the bytes of `page` that were actually sent. Content-based trackers
    /// compare against these (so a page that changes and changes back between `collect` and
    /// the read is not lost); write-tracking trackers ignore it.
    fn page_sent(&mut self, page: u64, data: &[u8]) {
        let _ = (page, data);
    }
    /// Whether [`Self::page_sent`] must see every page sent (content-based trackers): the
    /// sender then reads pages itself instead of letting its encode workers read them.
    fn needs_sent_pages(&self) -> bool {
        false
    }
}
