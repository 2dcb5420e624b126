//! The uffd-wp dirty tracker, for guests vmstream starts: the guest armed userfaultfd async
//! write-protect on its mapping ([`crate::track::uffd`]); `PAGEMAP_SCAN` with
//! `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC` on `/proc/PID/pagemap` returns the written
//! pages and re-protects them atomically. Cost is proportional to the page tables, not to
//! memory contents.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::memory::PAGE_SIZE;
use crate::track::DirtyTracker;

const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// Dirty tracking through userfaultfd async write-protect + `PAGEMAP_SCAN`.
pub struct UffdWpTracker {
    pagemap: File,
    start: u64,
    len: u64,
    regions: Vec<PageRegion>,
    /// Ranges at least this long are scanned on several threads.
    split_from: u64,
}

impl UffdWpTracker {
    /// Track `[start, start+len)` in process `pid`, where that process armed
    /// [`crate::track::uffd::WpAsync`] (the guest prints both in its ready line).
    pub fn new(pid: u32, start: u64, len: u64) -> io::Result<Self> {
        Self::with_vec_len(pid, start, len, 1024)
    }

    /// Like [`UffdWpTracker::new`] with a given number of output regions per ioctl (small
    /// values exercise the resume-from-`walk_end` loop).
    pub fn with_vec_len(pid: u32, start: u64, len: u64, vec_len: usize) -> io::Result<Self> {
        if !start.is_multiple_of(PAGE_SIZE as u64)
            || !len.is_multiple_of(PAGE_SIZE as u64)
            || vec_len == 0
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unaligned range",
            ));
        }
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
        Ok(Self {
            pagemap,
            start,
            len,
            regions: vec![PageRegion::default(); vec_len],
            split_from: PARALLEL_SCAN_BYTES,
        })
    }
}

/// Scanning a range this large is split across threads: the walk costs per page-table
/// entry (about 8 ms per GiB of 4 KiB pages here), and a final collect is downtime.
const PARALLEL_SCAN_BYTES: u64 = 1 << 30;

impl UffdWpTracker {
    /// The written pages of `[from, to)` (page numbers from `self.start`), write-protecting
    /// them again; `regions` is the ioctl's output buffer.
    fn scan(&self, from: u64, to: u64, regions: &mut [PageRegion]) -> io::Result<Vec<u64>> {
        let mut cursor = from;
        let mut pages = Vec::new();
        while cursor < to {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: cursor,
                end: to,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len` regions into
            // `regions`, which outlives the call; it updates `arg.walk_end`.
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(e.kind(), format!("PAGEMAP_SCAN: {e}")));
            }
            for r in &regions[..n as usize] {
                let first = (r.start - self.start) / PAGE_SIZE as u64;
                let last = (r.end - self.start) / PAGE_SIZE as u64;
                pages.extend(first..last);
            }
            if arg.walk_end <= cursor {
                return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
            }
            cursor = arg.walk_end;
        }
        Ok(pages)
    }
}

impl DirtyTracker for UffdWpTracker {
    fn collect(&mut self) -> io::Result<Vec<u64>> {
        let end = self.start + self.len;
        let threads = if self.len >= self.split_from {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
        } else {
            1
        };
        let mut regions = std::mem::take(&mut self.regions);
        let mut pages = if threads == 1 {
            self.scan(self.start, end, &mut regions)
        } else {
            // Parts on page boundaries; the first on this thread with our buffer.
            let part = (self.len / threads as u64).next_multiple_of(PAGE_SIZE as u64);
            let bounds: Vec<(u64, u64)> = (0..threads as u64)
                .map(|i| {
                    (
                        self.start + i * part,
                        (self.start + (i + 1) * part).min(end),
                    )
                })
                .filter(|(a, b)| a < b)
                .collect();
            let this = &*self;
            std::thread::scope(|scope| {
                let others: Vec<_> = bounds[1..]
                    .iter()
                    .map(|&(a, b)| {
                        let mut own = vec![PageRegion::default(); regions.len()];
                        scope.spawn(move || this.scan(a, b, &mut own))
                    })
                    .collect();
                let mut pages = this.scan(bounds[0].0, bounds[0].1, &mut regions)?;
                for h in others {
                    pages.extend(
                        h.join()
                            .map_err(|_| io::Error::other("scan thread panicked"))??,
                    );
                }
                Ok(pages)
            })
        };
        self.regions = regions;
        // A walk resumed mid-region can report a page twice (the codec refuses a page
        // twice in one round).
        if let Ok(pages) = &mut pages {
            pages.sort_unstable();
            pages.dedup();
        }
        pages
    }

    fn pages(&self) -> u64 {
        self.len / PAGE_SIZE as u64
    }

    fn name(&self) -> &'static str {
        "uffd-wp"
    }

    /// The guest armed write-protection of unpopulated pages too: a write to a hole faults.
    fn reports_writes_to_holes(&self) -> bool {
        true
    }
}

/// Find where process `pid` maps the file at `path` (offset 0, matched by device and inode,
/// so memfds and `/proc/PID/fd/N` paths work): returns `(start, len)` of the largest such
/// mapping. For guests that did not print a ready line.
pub fn find_mapping(pid: u32, path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    let want_dev = format!(
        "{:02x}:{:02x}",
        libc::major(meta.dev()),
        libc::minor(meta.dev())
    );
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut best: Option<(u64, u64)> = None;
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [range, _perms, offset, dev, inode, ..] = f.as_slice() else {
            continue;
        };
        if *dev != want_dev || inode.parse::<u64>().ok() != Some(meta.ino()) {
            continue;
        }
        if u64::from_str_radix(offset, 16).ok() != Some(0) {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        if best.is_none_or(|(_, len)| b - a > len) {
            best = Some((a, b - a));
        }
    }
    best.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {pid} does not map {}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemory;

    #[test]
    fn pagemap_scan_ioctl_number() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }

    #[test]
    fn uffd_wp_tracks_own_writes_across_small_vectors() {
        tracks_own_writes(u64::MAX);
    }

    /// The same, with the range scanned in parts on several threads (as for large guests).
    #[test]
    fn uffd_wp_tracks_own_writes_scanned_in_parallel() {
        tracks_own_writes(PAGE_SIZE as u64);
    }

    fn tracks_own_writes(split_from: u64) {
        let p = std::env::temp_dir().join(format!(
            "vmstream-dirty-{}-{split_from}",
            std::process::id()
        ));
        let mut mem = GuestMemory::create(&p, 64 * PAGE_SIZE as u64).unwrap();
        // SAFETY: the range is `mem`'s mapping, which outlives `wp`.
        let wp = unsafe { crate::track::uffd::WpAsync::arm(mem.addr(), mem.len() as u64) }.unwrap();
        let mut t =
            UffdWpTracker::with_vec_len(std::process::id(), mem.addr(), mem.len() as u64, 2)
                .unwrap();
        t.split_from = split_from;
        assert_eq!(t.collect().unwrap(), Vec::<u64>::new());
        let written = [0u64, 3, 4, 5, 9, 20, 40, 63];
        for &pg in &written {
            mem.as_mut_slice()[pg as usize * PAGE_SIZE + 100] = 1;
        }
        assert_eq!(t.collect().unwrap(), written);
        assert_eq!(t.collect().unwrap(), Vec::<u64>::new());
        // pwrite does not go through the mapping: not tracked (documented limitation).
        use std::os::unix::fs::FileExt;
        mem.file().write_at(&[7], 10 * PAGE_SIZE as u64).unwrap();
        assert_eq!(t.collect().unwrap(), Vec::<u64>::new());
        drop(wp);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn find_mapping_locates_files_and_memfds() {
        let p = std::env::temp_dir().join(format!("vmstream-maps-{}", std::process::id()));
        let mem = GuestMemory::create(&p, 8 * PAGE_SIZE as u64).unwrap();
        let me = std::process::id();
        assert_eq!(
            find_mapping(me, &p).unwrap(),
            (mem.addr(), mem.len() as u64)
        );
        let fd = GuestMemory::memfd("vmstream-maps", 4 * PAGE_SIZE as u64).unwrap();
        assert_eq!(
            find_mapping(me, fd.path()).unwrap(),
            (fd.addr(), fd.len() as u64)
        );
        drop(mem);
        let e = find_mapping(me, &p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        std::fs::remove_file(&p).unwrap();
    }
}
