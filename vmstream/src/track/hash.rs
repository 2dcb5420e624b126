//! The hash dirty tracker, for any writer (another PID, `pwrite`, a VMM we did not start):
//! hashes every page with xxh3-64 and compares with the hash of what was last sent. Reads
//! all of the file's data each round, the final collect at the pause included: without
//! write tracking only a read proves a page unchanged (`CONVERGENCE.md`, *The hash
//! tracker's pause*). Holes of the file (`SEEK_DATA`, which every writer's data and
//! swapped-out pages count in) read as zeros and are neither read nor allocated.
//! The sender must report every page it sends with
//! [`DirtyTracker::page_sent`]: otherwise a page read as B after `collect` hashed it as A,
//! that changes back to A before the next round, would be missed (the receiver has B).

use std::io;
use std::ops::Range;
use std::path::Path;

use crate::memory::{GuestMemory, MapMode, MemoryError, PAGE_SIZE};
use crate::track::DirtyTracker;

/// Dirty tracking by comparing a per-page xxh3-64 hash with the previous round's.
pub struct HashTracker {
    mem: GuestMemory,
    hashes: Vec<u64>,
    threads: usize,
    /// The hash of a page of zeros: a hole's.
    zero_hash: u64,
    /// The file's data pages while a collect in parts runs (taken at its first part: the
    /// walk of the file's extents is done once).
    parts_data: Option<Option<Vec<u64>>>,
}

impl HashTracker {
    /// Map the file at `path` read-only (shared) and record the current hash of every page.
    pub fn open(path: &Path) -> Result<Self, MemoryError> {
        let mem = GuestMemory::open(path, MapMode::SharedReadOnly)?;
        Ok(Self::new(mem))
    }

    /// Track `mem` (any mapping that sees the writer's updates); hashes all pages now.
    pub fn new(mem: GuestMemory) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut t = Self {
            hashes: vec![0; mem.pages() as usize],
            mem,
            threads,
            zero_hash: twox_hash::XxHash3_64::oneshot(&[0; PAGE_SIZE]),
            parts_data: None,
        };
        let data = t.mem.data_pages().ok();
        t.rehash(0..t.mem.pages(), data.as_deref(), &mut |_| {});
        t
    }

    /// Number of hashing threads (default: available parallelism).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// The mapping being hashed.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Rehashes the pages of `range` (`data`: the file's data pages, holes being zeros;
    /// None: read every page), calling `changed` with each page whose hash changed, in
    /// ascending order.
    fn rehash(&mut self, range: Range<u64>, data: Option<&[u64]>, changed: &mut dyn FnMut(u64)) {
        let base = self.mem.as_ptr() as usize;
        let zero_hash = self.zero_hash;
        let first = range.start;
        let hashes = &mut self.hashes[range.start as usize..range.end as usize];
        // Chunks of whole 64-page words of the data bitmap.
        let per = hashes.len().div_ceil(self.threads).div_ceil(64).max(1) * 64;
        let results: Vec<Vec<u64>> = std::thread::scope(|s| {
            let handles: Vec<_> = hashes
                .chunks_mut(per)
                .enumerate()
                .map(|(c, hashes)| {
                    s.spawn(move || {
                        let mut dirty = Vec::new();
                        for (i, h) in hashes.iter_mut().enumerate() {
                            let page = first + (c * per + i) as u64;
                            let hole = data
                                .is_some_and(|d| (d[page as usize / 64] >> (page % 64)) & 1 == 0);
                            let new = if hole {
                                zero_hash
                            } else {
                                // SAFETY: the page lies inside the mapping, which outlives
                                // the scope. Another process may write it concurrently;
                                // the hash then covers a mix, and the next round sees the
                                // final bytes.
                                let bytes = unsafe {
                                    std::slice::from_raw_parts(
                                        (base + page as usize * PAGE_SIZE) as *const u8,
                                        PAGE_SIZE,
                                    )
                                };
                                twox_hash::XxHash3_64::oneshot(bytes)
                            };
                            if new != *h {
                                *h = new;
                                dirty.push(page);
                            }
                        }
                        dirty
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("hash thread"))
                .collect()
        });
        for page in results.into_iter().flatten() {
            changed(page);
        }
    }
}

impl DirtyTracker for HashTracker {
    fn collect(&mut self) -> io::Result<Vec<u64>> {
        let mut pages = Vec::new();
        // Holes are zeros now. Asked before the pages are read: a write after this is a
        // write after the read, which the next round sees. Unknown: read every page.
        let data = self.mem.data_pages().ok();
        self.rehash(0..self.mem.pages(), data.as_deref(), &mut |p| pages.push(p));
        Ok(pages)
    }

    /// Rehashes only `range`; the file's data pages are found at a part starting at 0 and
    /// kept until the part that ends memory.
    fn collect_range(&mut self, range: Range<u64>) -> Option<io::Result<Vec<u64>>> {
        let pages = self.mem.pages();
        if range.start > range.end || range.end > pages {
            return Some(Err(io::Error::other(format!(
                "pages {range:?} are not within the {pages} tracked"
            ))));
        }
        if range.start == 0 || self.parts_data.is_none() {
            self.parts_data = Some(self.mem.data_pages().ok());
        }
        let data = self.parts_data.take().flatten();
        let mut dirty = Vec::new();
        self.rehash(range.clone(), data.as_deref(), &mut |p| dirty.push(p));
        if range.end < pages {
            self.parts_data = Some(data);
        }
        Some(Ok(dirty))
    }

    fn pages(&self) -> u64 {
        self.mem.pages()
    }

    fn name(&self) -> &'static str {
        "hash"
    }

    fn page_sent(&mut self, page: u64, data: &[u8]) {
        self.hashes[page as usize] = twox_hash::XxHash3_64::oneshot(data);
    }

    fn needs_sent_pages(&self) -> bool {
        true
    }

    /// A hole hashes as zeros (sent as zeros, told with `page_sent`): any write changes that.
    fn reports_writes_to_holes(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tracker_sees_pwrite() {
        let p = std::env::temp_dir().join(format!("vmstream-hash-{}", std::process::id()));
        let mem = GuestMemory::create(&p, 32 * PAGE_SIZE as u64).unwrap();
        let mut t = HashTracker::open(&p).unwrap();
        t.set_threads(3);
        assert_eq!(t.collect().unwrap(), Vec::<u64>::new());
        use std::os::unix::fs::FileExt;
        for pg in [1u64, 17, 31] {
            mem.file()
                .write_at(&[9], pg * PAGE_SIZE as u64 + 5)
                .unwrap();
        }
        assert_eq!(t.collect().unwrap(), vec![1, 17, 31]);
        assert_eq!(t.collect().unwrap(), Vec::<u64>::new());
        // A-B-A: collect hashed A, the sender read B, the page went back to A. Without
        // page_sent the page would never be resent.
        let mut sent = vec![0u8; PAGE_SIZE];
        mem.file().write_at(&[1], 2 * PAGE_SIZE as u64).unwrap();
        assert_eq!(t.collect().unwrap(), vec![2]);
        mem.file().write_at(&[2], 2 * PAGE_SIZE as u64).unwrap();
        mem.read_page(2, &mut sent);
        t.page_sent(2, &sent);
        mem.file().write_at(&[1], 2 * PAGE_SIZE as u64).unwrap();
        assert_eq!(t.collect().unwrap(), vec![2]);
        std::fs::remove_file(&p).unwrap();
    }

    /// Pages of `mem`'s file that hold data.
    fn allocated_pages(mem: &GuestMemory) -> u64 {
        let bits = mem.data_pages().unwrap();
        bits.iter().map(|w| w.count_ones() as u64).sum()
    }

    #[test]
    fn holes_are_neither_read_nor_allocated_and_writes_into_them_are_seen() {
        // tmpfs, where guest memory lives and where a read through a shared mapping
        // allocates a hole (a disk file system maps a zero page instead).
        let p = std::path::Path::new("/dev/shm")
            .join(format!("vmstream-hash-holes-{}", std::process::id()));
        let mem = GuestMemory::create(&p, 200 * PAGE_SIZE as u64).unwrap();
        use std::os::unix::fs::FileExt;
        mem.file().write_at(&[7], 3 * PAGE_SIZE as u64).unwrap();
        let data_before = allocated_pages(&mem);
        let mut t = HashTracker::open(&p).unwrap();
        t.set_threads(2);
        assert_eq!(t.collect().unwrap(), Vec::<u64>::new());
        // Hashing read no hole (a read through the shared mapping would allocate it).
        assert_eq!(allocated_pages(&mem), data_before);
        assert!(data_before < 200, "the file system reports no holes");
        // Writes into holes, on both threads' halves, and one writing zeros (allocated,
        // unchanged content).
        for pg in [0u64, 150, 199] {
            mem.file()
                .write_at(&[1], pg * PAGE_SIZE as u64 + 9)
                .unwrap();
        }
        mem.file().write_at(&[0], 120 * PAGE_SIZE as u64).unwrap();
        assert_eq!(t.collect().unwrap(), vec![0, 150, 199]);
        // Punched back into a hole: zeros again, a change from the 1 written.
        nix::fcntl::fallocate(
            mem.file(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            150 * PAGE_SIZE as i64,
            PAGE_SIZE as i64,
        )
        .unwrap();
        assert_eq!(t.collect().unwrap(), vec![150]);
        assert_eq!(t.collect().unwrap(), Vec::<u64>::new());
        std::fs::remove_file(&p).unwrap();
    }

    /// A collect in parts reports what one collect would, part by part (holes included:
    /// the file's data pages are found once, at the first part), and refuses a range
    /// outside memory.
    #[test]
    fn a_collect_in_parts_reports_what_one_collect_would() {
        let p = std::path::Path::new("/dev/shm")
            .join(format!("vmstream-hash-parts-{}", std::process::id()));
        let mem = GuestMemory::create(&p, 300 * PAGE_SIZE as u64).unwrap();
        use std::os::unix::fs::FileExt;
        mem.file().write_at(&[7], 10 * PAGE_SIZE as u64).unwrap();
        let mut t = HashTracker::open(&p).unwrap();
        t.set_threads(2);
        // Into data (page 10) and into holes, at part boundaries and inside parts.
        for pg in [0u64, 10, 63, 64, 127, 128, 200, 299] {
            mem.file()
                .write_at(&[1], pg * PAGE_SIZE as u64 + 3)
                .unwrap();
        }
        let mut parts = Vec::new();
        for start in (0..300).step_by(128) {
            let range = start..(start + 128).min(300);
            let part = t.collect_range(range.clone()).unwrap().unwrap();
            assert!(
                part.iter().all(|p| range.contains(p)),
                "{part:?} outside {range:?}"
            );
            parts.extend(part);
        }
        assert_eq!(parts, vec![0, 10, 63, 64, 127, 128, 200, 299]);
        // The parts re-armed every page, as a collect does.
        assert_eq!(t.collect().unwrap(), Vec::<u64>::new());
        assert!(t.collect_range(200..301).unwrap().is_err());
        std::fs::remove_file(&p).unwrap();
    }
}
