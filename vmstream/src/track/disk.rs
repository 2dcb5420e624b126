//! Disk dirty tracking: the [`DiskTracker`] seam the source migrates a disk through (which
//! granules changed since it last asked), and [`HashDiskTracker`], its content-hash
//! implementation for a disk file any process writes (`--disk-tracking hash`).

use std::io;
use std::ops::Range;
use std::path::Path;

use crate::memory::{MemoryError, PAGE_SIZE};
use crate::track::{DirtyTracker, HashTracker};

/// Something that reports the granules of one disk written since it was last asked. A
/// granule is `granularity` bytes (a power of two from 4 KiB to 1 MiB); granule `g` covers
/// bytes `g * granularity ..` of the disk (the last one may end at the disk's end).
///
/// What the source does with it, per round: [`Self::collect`] the dirty runs; for each run
/// it sends, [`Self::before_read`] and then read the run's bytes, and hand those bytes to
/// [`Self::granules_sent`]. A write racing with the read is thus reported by the next
/// collect, never lost. The block layer's bitmap (`--disk-tracking builtin`,
/// [`crate::track::BitmapDiskTracker`]) implements this with an atomic take of its dirty
/// words; the hash tracker by comparing hashes.
pub trait DiskTracker: Send {
    /// Short name for the statistics ("hash", "builtin").
    fn name(&self) -> &'static str;

    /// Bytes of the disk.
    fn size(&self) -> u64;

    /// Bytes per granule.
    fn granularity(&self) -> u64;

    /// Granule runs written since the previous call (or since the tracker was created):
    /// sorted, disjoint, not adjacent, in granule indices.
    fn collect(&mut self) -> io::Result<Vec<Range<u64>>>;

    /// The final collection, with the writer stopped: [`Self::collect`], plus whatever a
    /// writer stopped in the middle of a write may have changed without reporting it yet
    /// (the block layer's in-flight writes).
    fn collect_stopped(&mut self) -> io::Result<Vec<Range<u64>>> {
        self.collect()
    }

    /// Called for every run the source is about to read, before it reads it: a tracker that
    /// re-arms lazily (clears its dirty bits) does so here.
    fn before_read(&mut self, run: Range<u64>) -> io::Result<()> {
        let _ = run;
        Ok(())
    }

    /// The bytes of the granules from `first` on as they were read and sent (content-based
    /// trackers compare against these; write trackers ignore them).
    fn granules_sent(&mut self, first: u64, data: &[u8]) {
        let _ = (first, data);
    }

    /// Bytes the guest wrote to the disk since the previous call, if the tracker knows:
    /// the block layer counts writes; a content tracker counts the pages it saw change.
    fn take_written_bytes(&mut self) -> Option<u64> {
        None
    }

    /// Disk write QoS: caps the guest's writes to `bytes_per_s` (`None` lifts the cap).
    /// Returns whether the tracker's writer obeys (only the block layer can).
    fn limit_writes(&mut self, bytes_per_s: Option<u64>) -> bool {
        let _ = bytes_per_s;
        false
    }

    /// How long the guest's writes waited for [`Self::limit_writes`]' cap since the tracker
    /// was opened (zero for a writer that cannot be capped).
    fn limit_waited(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// The runs of granules (of `pages_per_granule` pages each) that hold the sorted `pages`.
pub fn granule_runs(pages: &[u64], pages_per_granule: u64) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for &p in pages {
        let g = p / pages_per_granule;
        match runs.last_mut() {
            Some(r) if r.end >= g => r.end = r.end.max(g + 1),
            _ => runs.push(g..g + 1),
        }
    }
    runs
}

/// Dirty granules by content: a hash per page of the disk file ([`HashTracker`], holes
/// skipped with `SEEK_DATA`), compared with the hash of what was last sent; a granule is
/// dirty when any of its pages changed. Reads all of the disk's data every collect.
pub struct HashDiskTracker {
    pages: HashTracker,
    size: u64,
    granularity: u64,
    /// Bytes of the pages seen changed since `take_written_bytes`.
    changed: u64,
}

impl HashDiskTracker {
    /// Tracks the disk at `path` (a multiple of the page size) from now on, in granules of
    /// `granularity` bytes.
    pub fn open(path: &Path, granularity: u64) -> Result<HashDiskTracker, MemoryError> {
        let pages = HashTracker::open(path)?;
        let size = pages.memory().len() as u64;
        Ok(HashDiskTracker {
            pages,
            size,
            granularity,
            changed: 0,
        })
    }

    fn pages_per_granule(&self) -> u64 {
        self.granularity / PAGE_SIZE as u64
    }
}

impl DiskTracker for HashDiskTracker {
    fn name(&self) -> &'static str {
        "hash"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        self.granularity
    }

    fn collect(&mut self) -> io::Result<Vec<Range<u64>>> {
        let pages = self.pages.collect()?;
        self.changed += pages.len() as u64 * PAGE_SIZE as u64;
        Ok(granule_runs(&pages, self.pages_per_granule()))
    }

    /// The dirty data observed: pages whose content changed between collections.
    fn take_written_bytes(&mut self) -> Option<u64> {
        Some(std::mem::take(&mut self.changed))
    }

    fn granules_sent(&mut self, first: u64, data: &[u8]) {
        let first_page = first * self.pages_per_granule();
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            self.pages.page_sent(first_page + i as u64, page);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn pages_become_granule_runs() {
        assert_eq!(granule_runs(&[], 16), Vec::<Range<u64>>::new());
        assert_eq!(granule_runs(&[0, 1, 15, 16, 40, 70], 16), vec![0..3, 4..5]);
        assert_eq!(granule_runs(&[3, 9], 1), vec![3..4, 9..10]);
    }

    #[test]
    fn hash_disk_tracker_reports_written_granules_and_sees_what_was_sent() {
        let p = std::env::temp_dir().join(format!("vmstream-disk-hash-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let mut t = HashDiskTracker::open(&p, 64 << 10).unwrap();
        assert_eq!(t.collect().unwrap(), Vec::<Range<u64>>::new());
        f.write_at(&[1], 5).unwrap();
        f.write_at(&[1], (64 << 10) + 4096 * 3).unwrap();
        f.write_at(&[1], (10 << 16) + 77).unwrap();
        assert_eq!(t.collect().unwrap(), vec![0..2, 10..11]);
        assert_eq!(t.collect().unwrap(), Vec::<Range<u64>>::new());
        // Read as B after collect hashed A, then back to A: sent B, so dirty again.
        f.write_at(&[2], 5).unwrap();
        let mut sent = vec![0u8; 64 << 10];
        f.read_exact_at(&mut sent, 0).unwrap();
        t.granules_sent(0, &sent);
        f.write_at(&[1], 5).unwrap();
        assert_eq!(t.collect().unwrap(), vec![0..1]);
        std::fs::remove_file(&p).unwrap();
    }
}
