//! Adapter from a KVM [`DirtyLog`] to the crate's [`DirtyTracker`] contract
//! (collect returns sorted pages and resets tracking in the same step), so
//! migration code written for file-backed guests can track a KVM guest.
//!
//! In `clear` mode the adapter re-arms every collected page right after the
//! collect, which satisfies the contract but gives up clearing per chunk just
//! before sending; senders that want that use [`DirtyLog::clear`] directly.

use std::io;

use crate::track::DirtyTracker;

use crate::track::kvm::{DirtyLog, DirtyLogMode};

/// A KVM dirty log seen as a [`DirtyTracker`].
pub struct KvmDirtyTracker {
    log: Box<dyn DirtyLog>,
    pages: u64,
}

impl KvmDirtyTracker {
    /// Wraps `log` (from [`KvmGuest::dirty_log`](crate::guest::kvm::KvmGuest::dirty_log))
    /// of a guest with `pages` 4 KiB pages.
    pub fn new(log: Box<dyn DirtyLog>, pages: u64) -> Self {
        Self { log, pages }
    }

    /// The wrapped log (for its statistics).
    pub fn log(&self) -> &dyn DirtyLog {
        self.log.as_ref()
    }
}

impl DirtyTracker for KvmDirtyTracker {
    fn collect(&mut self) -> io::Result<Vec<u64>> {
        let map = self.log.collect().map_err(io::Error::other)?;
        self.log.clear(0, self.pages).map_err(io::Error::other)?;
        Ok(map.iter().collect())
    }

    fn pages(&self) -> u64 {
        self.pages
    }

    fn name(&self) -> &'static str {
        match self.log.mode() {
            DirtyLogMode::Bitmap => "kvm-bitmap",
            DirtyLogMode::Clear => "kvm-clear",
            DirtyLogMode::Ring => "kvm-ring",
        }
    }
}
