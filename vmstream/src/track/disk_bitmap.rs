//! [`BitmapDiskTracker`]: the [`DiskTracker`] of a disk the guest writes through vmstream's
//! block layer (`--disk-tracking builtin`): it takes the dirty granules the block layer
//! marked in the shared bitmap `<disk>.dirty`, and sets the guest's write limit there.

use std::io;
use std::ops::Range;
use std::path::Path;

use crate::disk::bitmap::{bitmap_path, DirtyBitmap};
use crate::track::disk::DiskTracker;

/// A disk's dirty granules as its guest's block layer marks them (`STORAGE.md`, *The dirty
/// bitmap*). Tracking starts when it is opened (the bitmap's older bits are taken and
/// dropped); a collection takes every marked granule (clearing it before the source reads
/// it, so a write racing with the read is marked again). With the guest stopped,
/// [`DiskTracker::collect_stopped`] adds the granules of writes that began but are not
/// marked yet (the bitmap's in-flight slots). The write limit is lifted on drop: a guest
/// left running after a failed migration is never left capped.
pub struct BitmapDiskTracker {
    bitmap: DirtyBitmap,
    /// The bitmap's bytes-written counter when last asked.
    written: u64,
    /// Whether this tracker set a write limit (lifted on drop).
    limited: bool,
    /// The bitmap's limiter-wait counter when tracking started.
    waited: std::time::Duration,
}

impl BitmapDiskTracker {
    /// Opens the bitmap of the disk at `path` of `size` bytes (the guest made it) and
    /// starts tracking from now.
    pub fn open(path: &Path, size: u64) -> io::Result<BitmapDiskTracker> {
        let bitmap = DirtyBitmap::open(&bitmap_path(path)).map_err(|e| {
            io::Error::other(format!(
                "{e} (does the guest write {} through vmstream's block layer?)",
                path.display()
            ))
        })?;
        if bitmap.disk_size() != size {
            return Err(io::Error::other(format!(
                "{}: the bitmap describes {} bytes, the disk has {size}",
                bitmap_path(path).display(),
                bitmap.disk_size()
            )));
        }
        Ok(Self::start(bitmap))
    }

    /// Tracks `bitmap` from now on.
    pub fn start(bitmap: DirtyBitmap) -> BitmapDiskTracker {
        // What was marked before this instant is in the disk file already (a mark follows
        // its write): the bulk copy reads it.
        let _ = bitmap.take_all();
        let written = bitmap.bytes_written();
        let waited = bitmap.limit_wait();
        BitmapDiskTracker {
            bitmap,
            written,
            limited: false,
            waited,
        }
    }

    /// The bitmap.
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.bitmap
    }
}

impl Drop for BitmapDiskTracker {
    fn drop(&mut self) {
        if self.limited {
            self.bitmap.set_write_limit(0);
        }
    }
}

/// `runs` with `more` added: sorted, disjoint, adjacent runs merged.
fn union(mut runs: Vec<Range<u64>>, more: Vec<Range<u64>>) -> Vec<Range<u64>> {
    runs.extend(more.into_iter().filter(|r| !r.is_empty()));
    runs.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(runs.len());
    for r in runs {
        match out.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

impl DiskTracker for BitmapDiskTracker {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn size(&self) -> u64 {
        self.bitmap.disk_size()
    }

    fn granularity(&self) -> u64 {
        self.bitmap.granularity()
    }

    fn collect(&mut self) -> io::Result<Vec<Range<u64>>> {
        Ok(self.bitmap.take_all())
    }

    fn collect_stopped(&mut self) -> io::Result<Vec<Range<u64>>> {
        // In-flight slots before the take: with the guest stopped neither changes, and a
        // write stopped between its pwrite and its mark is only in its slot.
        let in_flight = self.bitmap.in_flight();
        Ok(union(self.bitmap.take_all(), in_flight))
    }

    fn take_written_bytes(&mut self) -> Option<u64> {
        let now = self.bitmap.bytes_written();
        let delta = now.saturating_sub(self.written);
        self.written = now;
        Some(delta)
    }

    fn limit_writes(&mut self, bytes_per_s: Option<u64>) -> bool {
        // 0 is "unlimited" in the header: a limit of 0 bytes/s is 1.
        self.bitmap
            .set_write_limit(bytes_per_s.map_or(0, |b| b.max(1)));
        self.limited = bytes_per_s.is_some();
        true
    }

    fn limit_waited(&self) -> std::time::Duration {
        self.bitmap.limit_wait().saturating_sub(self.waited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collections_take_what_was_marked_since_and_stopped_adds_in_flight_writes() {
        let b = DirtyBitmap::in_memory(1 << 20, 4096).unwrap();
        b.mark(3..5);
        let mut t = BitmapDiskTracker::start(b);
        // Marked before tracking started: not reported.
        assert_eq!(t.collect().unwrap(), Vec::<Range<u64>>::new());
        t.bitmap().mark(10..12);
        t.bitmap().mark(12..13);
        t.bitmap().mark(40..41);
        assert_eq!(t.collect().unwrap(), vec![10..13, 40..41]);
        assert_eq!(t.collect().unwrap(), Vec::<Range<u64>>::new());
        // A write stopped after its pwrite, before its mark: only its slot names it.
        // (The writer never finishes here: its slot stays taken.)
        std::mem::forget(t.bitmap().begin_write(20..22));
        t.bitmap().mark(22..23);
        assert_eq!(t.collect().unwrap(), vec![22..23]);
        t.bitmap().mark(22..23);
        assert_eq!(t.collect_stopped().unwrap(), vec![20..23]);
        assert_eq!(t.collect_stopped().unwrap(), vec![20..22]);
        assert_eq!(
            union(vec![0..2, 8..9], vec![1..4, 4..5, 7..8]),
            vec![0..5, 7..9]
        );
    }

    #[test]
    fn written_bytes_are_counted_from_the_start_and_the_limit_is_lifted_on_drop() {
        let b = DirtyBitmap::in_memory(1 << 20, 4096).unwrap();
        b.count_write(5000);
        let mut t = BitmapDiskTracker::start(b);
        assert_eq!(t.take_written_bytes(), Some(0));
        t.bitmap().count_write(8192);
        t.bitmap().count_write(4096);
        assert_eq!(t.take_written_bytes(), Some(12288));
        assert_eq!(t.take_written_bytes(), Some(0));
        assert!(t.limit_writes(Some(2 << 20)));
        assert_eq!(t.bitmap().write_limit(), 2 << 20);
        assert!(t.limit_writes(Some(0)));
        assert_eq!(t.bitmap().write_limit(), 1);
        assert!(t.limit_writes(None));
        assert_eq!(t.bitmap().write_limit(), 0);
    }

    #[test]
    fn drop_lifts_a_limit_in_the_shared_file() {
        let dir = std::env::temp_dir().join(format!("vmstream-bmtrack-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("d.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let guest = DirtyBitmap::create(&bitmap_path(&disk), 1 << 20, 65536).unwrap();
        let mut t = BitmapDiskTracker::open(&disk, 1 << 20).unwrap();
        assert_eq!(t.granularity(), 65536);
        t.limit_writes(Some(1000));
        assert_eq!(guest.write_limit(), 1000);
        guest.mark(2..3);
        assert_eq!(t.collect().unwrap(), vec![2..3]);
        drop(t);
        assert_eq!(guest.write_limit(), 0);
        assert!(BitmapDiskTracker::open(&disk, 2 << 20).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
