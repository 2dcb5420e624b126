//! A zero-initialised byte buffer whose start is aligned to a cache line.
//!
//! The scan kernels tile their loads on the first buffer's 64-byte
//! alignment; a second buffer at another alignment makes every one of its
//! loads split two cache lines. Guest pages are page-aligned, so the buffers
//! they are compared with (page caches, snapshots) should be aligned too:
//! `vec![0; n]` gives only 16-byte alignment (glibc's chunk header), which
//! cost the XBZRLE encoder about 10% on unchanged pages.

use std::fmt;
use std::ops::{Deref, DerefMut};

/// Alignment of [`AlignedBuf`]'s first byte.
pub const BUF_ALIGN: usize = 64;

/// `len` zero bytes starting on a [`BUF_ALIGN`]-byte boundary.
///
/// Safe code only: a `Vec` over-allocated by `BUF_ALIGN - 1` bytes and an
/// offset to its first aligned byte (a `Vec`'s heap buffer never moves
/// unless it is resized, which this type never does).
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + BUF_ALIGN - 1];
        let start = storage.as_ptr().align_offset(BUF_ALIGN);
        assert!(start < BUF_ALIGN, "u8 pointers can always be aligned");
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// A buffer holding a copy of `bytes`.
    pub fn copy_of(bytes: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(bytes.len());
        buf.copy_from_slice(bytes);
        buf
    }
}

impl Default for AlignedBuf {
    /// An empty buffer (no allocation).
    fn default() -> AlignedBuf {
        AlignedBuf {
            storage: Vec::new(),
            start: 0,
            len: 0,
        }
    }
}

impl Clone for AlignedBuf {
    /// A fresh allocation has its own alignment offset, so a clone is
    /// rebuilt rather than field-copied.
    fn clone(&self) -> AlignedBuf {
        AlignedBuf::copy_of(self)
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    #[inline]
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    #[inline]
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_sized() {
        for len in [0, 1, 63, 64, 4096, 4097, 1 << 20] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn copy_and_clone_keep_contents_and_alignment() {
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let a = AlignedBuf::copy_of(&bytes);
        let b = a.clone();
        for buf in [&a, &b] {
            assert_eq!(&buf[..], &bytes[..]);
        }
        assert_eq!(a.as_ptr() as usize % BUF_ALIGN, 0);
        assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
    }
}
