//! One contiguous mapping of several pending images (guest memory, then each disk), so the
//! codec's receive pipeline, which writes one memory, writes them all: disk pages follow
//! memory's in its page numbers (`PROTOCOL.md`, *Disks*).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// Alignment of the span (and so of its first file): 2 MiB, a huge page.
const SPAN_ALIGN: usize = 2 << 20;

/// The files mapped shared, back to back, in one range of addresses.
pub struct SpanMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain shared file mappings owned by this value; the only `&mut` access is through
// `as_mut_slice`, which borrows the value mutably.
unsafe impl Send for SpanMapping {}

impl SpanMapping {
    /// Maps `files` (each with its length, a multiple of the page size) read-write and
    /// shared, one after the other from a 2 MiB-aligned address.
    pub fn map(files: &[(&File, u64)]) -> io::Result<SpanMapping> {
        let len = files.iter().try_fold(0usize, |sum, (_, l)| {
            usize::try_from(*l).ok().and_then(|l| sum.checked_add(l))
        });
        let len = len
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::other("span of no or too many bytes"))?;
        let reserve = len + SPAN_ALIGN;
        // SAFETY: a fresh inaccessible anonymous region (addr = NULL) aliases nothing; the
        // result is checked for MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = (base as usize).next_multiple_of(SPAN_ALIGN);
        let (head, tail) = (
            start - base as usize,
            reserve - (start - base as usize) - len,
        );
        // SAFETY: the head and tail lie inside the reservation just made, outside the span.
        unsafe {
            if head > 0 {
                libc::munmap(base, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        let span = SpanMapping {
            ptr: NonNull::new(start as *mut u8).expect("mmap never returns NULL on success"),
            len,
        };
        let mut at = start;
        for (file, l) in files {
            let l = *l as usize;
            // SAFETY: MAP_FIXED replaces part of our own reservation (nothing else lives
            // there); the result is checked.
            let p = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    l,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                // `span` drops: the whole range is unmapped.
                return Err(io::Error::last_os_error());
            }
            at += l;
        }
        Ok(span)
    }

    /// All files' bytes, in order.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the whole range is mapped read-write by `map` and lives as long as
        // `self`, which this borrow holds mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Writes what was written through the span to the files (msync).
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: msync of exactly the range we mapped.
        let rc = unsafe { libc::msync(self.ptr.as_ptr().cast(), self.len, libc::MS_SYNC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for SpanMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range `map` made ours.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn files_are_mapped_back_to_back_and_writes_reach_each_file() {
        let dir = std::env::temp_dir();
        let files: Vec<File> = [8192u64, 4096, 12288]
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let p = dir.join(format!("vmstream-span-{}-{i}", std::process::id()));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&p)
                    .unwrap();
                std::fs::remove_file(&p).unwrap();
                f.set_len(l).unwrap();
                f
            })
            .collect();
        let lens = [8192u64, 4096, 12288];
        let mut span = SpanMapping::map(&files.iter().zip(lens).collect::<Vec<_>>()).unwrap();
        let m = span.as_mut_slice();
        assert_eq!(m.len(), 24576);
        assert_eq!(m.as_ptr() as usize % SPAN_ALIGN, 0);
        m[8191] = 1;
        m[8192] = 2;
        m[12288 + 5] = 3;
        span.sync().unwrap();
        let byte = |f: &File, at| {
            let mut b = [0u8];
            f.read_exact_at(&mut b, at).unwrap();
            b[0]
        };
        assert_eq!(byte(&files[0], 8191), 1);
        assert_eq!(byte(&files[1], 0), 2);
        assert_eq!(byte(&files[2], 5), 3);
    }
}
