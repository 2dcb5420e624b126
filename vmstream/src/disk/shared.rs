//! A file mapped shared and seen as atomic 64-bit words: how the guest process (writer) and
//! the sender (reader) share a disk's dirty bitmap.

use std::path::Path;
use std::sync::atomic::AtomicU64;

use crate::memory::{GuestMemory, MapMode, MemoryError};

/// A shared mapping of a whole file, read and written only through atomics.
pub struct SharedWords {
    // Keeps the mapping (and its file) alive while `words` points into it.
    mem: GuestMemory,
}

impl SharedWords {
    /// Creates `path` as `len` zero bytes (a non-zero multiple of the page size) and maps it.
    pub fn create(path: &Path, len: u64) -> Result<Self, MemoryError> {
        Ok(Self {
            mem: GuestMemory::create(path, len)?,
        })
    }

    /// Maps the existing file at `path`, all of it, read-write.
    pub fn open(path: &Path) -> Result<Self, MemoryError> {
        Ok(Self {
            mem: GuestMemory::open(path, MapMode::Shared)?,
        })
    }

    /// The mapped file as words.
    pub fn words(&self) -> &[AtomicU64] {
        let len = self.mem.len() / 8;
        // SAFETY: the mapping is page aligned (so 8-byte aligned), `len * 8` bytes long and
        // lives as long as `self` (the returned slice borrows it). Every access, in this
        // process and in others mapping the same file, goes through these atomics (never
        // through `&mut` or plain loads), so shared mutation is sound; AtomicU64 has the
        // size and alignment of u64.
        unsafe { std::slice::from_raw_parts(self.mem.as_ptr().cast::<AtomicU64>(), len) }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.mem.path()
    }
}
