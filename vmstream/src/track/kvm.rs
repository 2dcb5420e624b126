//! KVM's dirty log: three KVM mechanisms behind one [`DirtyLog`] interface, and
//! [`KvmDirtyTracker`], the crate's [`DirtyTracker`] over it that a migration uses.
//!
//! * `bitmap`: memslot flag KVM_MEM_LOG_DIRTY_PAGES + KVM_GET_DIRTY_LOG, which
//!   returns and clears (re-protects) the log in one call.
//! * `clear`: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG only reads;
//!   the sender re-arms each chunk with KVM_CLEAR_DIRTY_LOG right before
//!   reading it ([`DirtyLog::clear`], which the tracker calls from
//!   [`DirtyTracker::before_read`]), so pages written after that are caught.
//! * `ring`: per-vCPU dirty rings (KVM_CAP_DIRTY_LOG_RING_ACQ_REL) harvested
//!   by the collector; a vCPU whose ring fills harvests its own ring on the
//!   ring-full exit instead of waiting (no spinning, no stall).
//!
//! Every mode ORs in the VMM's own writes (vm-memory's atomic bitmap).
//! Exactness needs the vCPUs to have exited since the writes (a progress
//! exit, or the final pause), as hardware may buffer dirty GFNs until exit.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_gfn};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;

use crate::guest::kvm::error::{KvmError, Result};
use crate::guest::kvm::memory::GuestRam;
use crate::memory::PAGE_SIZE;
use crate::track::DirtyTracker;

/// ioctl numbers kvm-ioctls does not wrap.
mod ioctls {
    use kvm_bindings::kvm_clear_dirty_log;
    use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xAE;
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}
use ioctls::{KVM_CLEAR_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};

const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
const KVM_DIRTY_GFN_F_RESET: u32 = 2;

/// Memory slot of guest RAM (the only one).
pub(crate) const RAM_SLOT: u32 = 0;

/// Default dirty ring size in entries: 1024 hung vCPUs here (endless
/// ring-full exits), 8192 worked; 16384 leaves margin.
pub const DEFAULT_RING_ENTRIES: u32 = 16384;

/// Which KVM mechanism tracks dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// KVM_GET_DIRTY_LOG, clear on read.
    Bitmap,
    /// Manual protect: get, then KVM_CLEAR_DIRTY_LOG per chunk before sending.
    Clear,
    /// Per-vCPU dirty rings.
    Ring,
}

impl DirtyLogMode {
    /// Parses `bitmap`, `clear`, `ring`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "bitmap" => Some(DirtyLogMode::Bitmap),
            "clear" => Some(DirtyLogMode::Clear),
            "ring" => Some(DirtyLogMode::Ring),
            _ => None,
        }
    }

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            DirtyLogMode::Bitmap => "bitmap",
            DirtyLogMode::Clear => "clear",
            DirtyLogMode::Ring => "ring",
        }
    }
}

/// Set of dirty 4 KiB guest pages: bit `p % 64` of word `p / 64` is page `p`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    pages: u64,
    words: Vec<u64>,
}

impl DirtyBitmap {
    /// Empty bitmap over `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            pages,
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    fn from_words(pages: u64, mut words: Vec<u64>) -> Self {
        words.resize(pages.div_ceil(64) as usize, 0);
        Self { pages, words }
    }

    fn or_words(&mut self, other: &[u64]) {
        for (w, o) in self.words.iter_mut().zip(other) {
            *w |= o;
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The raw words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Whether page `p` is dirty.
    pub fn is_set(&self, p: u64) -> bool {
        p < self.pages && self.words[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    /// Marks page `p` dirty (ignored beyond the end).
    pub fn set(&mut self, p: u64) {
        if p < self.pages {
            self.words[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// Dirty page numbers in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + bit)
            })
        })
    }
}

/// Time spent in the dirty log, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyLogStats {
    /// Calls to [`DirtyLog::collect`].
    pub collections: u64,
    /// Total time in `collect`.
    pub collect_time: Duration,
    /// Time of the last `collect`.
    pub last_collect_time: Duration,
    /// Pages re-armed with [`DirtyLog::clear`] (clear mode).
    pub cleared_pages: u64,
    /// Total time in `clear`.
    pub clear_time: Duration,
    /// Ring-full exits handled by vCPU threads (ring mode).
    pub ring_full_exits: u64,
    /// Ring entries harvested (ring mode).
    pub ring_entries: u64,
}

/// A source of dirty pages of guest RAM.
pub trait DirtyLog: Send {
    /// Which mechanism this is.
    fn mode(&self) -> DirtyLogMode;

    /// Pages written since the previous `collect` (or since logging started).
    /// In `clear` mode pages stay armed-off until [`DirtyLog::clear`].
    fn collect(&mut self) -> Result<DirtyBitmap>;

    /// Re-arms write tracking for the pages in `[first_page, first_page + count)`
    /// that the last [`collect`](DirtyLog::collect) reported, just before
    /// their contents are read for sending. Pages dirtied after that collect
    /// stay dirty for the next one. Only `clear` mode needs it; the others
    /// do nothing.
    fn clear(&mut self, first_page: u64, count: u64) -> Result<()> {
        let _ = (first_page, count);
        Ok(())
    }

    /// Time spent and work done so far.
    fn stats(&self) -> DirtyLogStats;
}

/// Creates the dirty log of `mode` for a guest whose memslot was registered
/// for it (see `KvmGuest::dirty_log`).
pub(crate) fn open(
    mode: DirtyLogMode,
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
    rings: Option<Arc<DirtyRings>>,
) -> Result<Box<dyn DirtyLog>> {
    Ok(match mode {
        DirtyLogMode::Bitmap | DirtyLogMode::Clear => Box::new(KvmBitmapLog {
            mode,
            vm,
            ram,
            uncleared: Vec::new(),
            stats: DirtyLogStats::default(),
        }),
        DirtyLogMode::Ring => Box::new(RingLog {
            ram,
            rings: rings.ok_or(KvmError::Config(
                "guest was started without dirty rings".into(),
            ))?,
            stats: DirtyLogStats::default(),
        }),
    })
}

/// `bitmap` and `clear` modes (they differ only in what GET does and `clear`).
struct KvmBitmapLog {
    mode: DirtyLogMode,
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
    /// Clear mode: KVM's bits reported by the last collect and not yet
    /// cleared. Only these may be cleared: clearing a bit set after the
    /// collect would lose that write.
    uncleared: Vec<u64>,
    stats: DirtyLogStats,
}

impl DirtyLog for KvmBitmapLog {
    fn mode(&self) -> DirtyLogMode {
        self.mode
    }

    fn collect(&mut self) -> Result<DirtyBitmap> {
        let t = Instant::now();
        let words = self
            .vm
            .get_dirty_log(RAM_SLOT, self.ram.size() as usize)
            .map_err(KvmError::ioctl("KVM_GET_DIRTY_LOG"))?;
        let mut map = DirtyBitmap::from_words(self.ram.pages(), words);
        if self.mode == DirtyLogMode::Clear {
            self.uncleared = map.words.clone();
        }
        map.or_words(&self.ram.vmm_dirty().get_and_reset());
        record(&mut self.stats, t.elapsed());
        Ok(map)
    }

    fn clear(&mut self, first_page: u64, count: u64) -> Result<()> {
        if self.mode != DirtyLogMode::Clear || count == 0 {
            return Ok(());
        }
        let t = Instant::now();
        let total = self.ram.pages();
        // KVM wants first_page in multiples of 64; the mask limits the clear
        // to collected pages, so widening the range is harmless.
        let first = first_page / 64 * 64;
        let end = (first_page + count).min(total);
        if first >= end {
            return Ok(());
        }
        let words = (first / 64) as usize..(end.div_ceil(64) as usize).min(self.uncleared.len());
        let mut mask: Vec<u64> = self.uncleared.get(words.clone()).unwrap_or(&[]).to_vec();
        // Only the requested pages: trim bits outside [first_page, end).
        for (i, w) in mask.iter_mut().enumerate() {
            let base = first + i as u64 * 64;
            for bit in 0..64 {
                let p = base + bit;
                if p < first_page || p >= end {
                    *w &= !(1u64 << bit);
                }
            }
        }
        if mask.iter().all(|&w| w == 0) {
            return Ok(());
        }
        for (u, m) in self.uncleared[words].iter_mut().zip(&mask) {
            *u &= !m;
        }
        let num_pages = (mask.len() as u64 * 64).min(total - first);
        let arg = kvm_clear_dirty_log {
            slot: RAM_SLOT,
            num_pages: num_pages as u32,
            first_page: first,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: mask.as_ptr() as *mut libc::c_void,
            },
        };
        // SAFETY: `arg` points at a bitmap of num_pages bits that outlives the
        // call; KVM only reads it. The VM fd is valid.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&*self.vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
        if ret < 0 {
            return Err(KvmError::Ioctl {
                op: "KVM_CLEAR_DIRTY_LOG",
                source: vmm_sys_util::errno::Error::last(),
            });
        }
        self.stats.cleared_pages += mask.iter().map(|w| w.count_ones() as u64).sum::<u64>();
        self.stats.clear_time += t.elapsed();
        Ok(())
    }

    fn stats(&self) -> DirtyLogStats {
        self.stats
    }
}

fn record(stats: &mut DirtyLogStats, took: Duration) {
    stats.collections += 1;
    stats.collect_time += took;
    stats.last_collect_time = took;
}

/// One vCPU's mapped dirty ring.
struct Ring {
    entries: *mut kvm_dirty_gfn,
    count: u32,
    /// Next entry to harvest (free-running).
    fetch: u32,
}

// SAFETY: the ring is a shared mapping owned by this struct; all access goes
// through the Mutex in DirtyRings.
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in DirtyRings::map.
        unsafe {
            libc::munmap(
                self.entries as *mut libc::c_void,
                self.count as usize * std::mem::size_of::<kvm_dirty_gfn>(),
            );
        }
    }
}

/// The dirty rings of all vCPUs plus the pages harvested but not yet collected.
pub(crate) struct DirtyRings {
    vm: Arc<VmFd>,
    rings: Vec<Mutex<Ring>>,
    harvested: AtomicBitmap,
    pages: u64,
    full_exits: AtomicU64,
    entries_seen: AtomicU64,
    ring_entries: AtomicU32,
}

impl DirtyRings {
    /// Maps each vCPU's ring (after KVM_CAP_DIRTY_LOG_RING_ACQ_REL was enabled
    /// with `entries` entries, before the vCPUs were created).
    pub(crate) fn map(
        vm: Arc<VmFd>,
        vcpus: &[VcpuFd],
        entries: u32,
        ram_size: u64,
    ) -> Result<Self> {
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let offset = kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as i64 * PAGE_SIZE as i64;
        let mut rings = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            // SAFETY: maps the vCPU's dirty ring as KVM documents (shared,
            // read/write, at KVM_DIRTY_LOG_PAGE_OFFSET pages); the result is
            // checked and unmapped in Ring::drop.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    vcpu.as_raw_fd(),
                    offset,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(KvmError::Memory(std::io::Error::last_os_error()));
            }
            rings.push(Mutex::new(Ring {
                entries: ptr as *mut kvm_dirty_gfn,
                count: entries,
                fetch: 0,
            }));
        }
        let pages = ram_size / PAGE_SIZE as u64;
        Ok(Self {
            vm,
            rings,
            harvested: AtomicBitmap::new(
                ram_size as usize,
                std::num::NonZeroUsize::new(PAGE_SIZE).unwrap(),
            ),
            pages,
            full_exits: AtomicU64::new(0),
            entries_seen: AtomicU64::new(0),
            ring_entries: AtomicU32::new(entries),
        })
    }

    /// Moves ring `i`'s dirty entries into the harvested set and marks them
    /// for reset. Returns how many entries were taken.
    fn harvest_ring(&self, i: usize) -> u64 {
        let mut ring = self.rings[i].lock().unwrap_or_else(|e| e.into_inner());
        let mask = ring.count - 1;
        let mut taken = 0;
        loop {
            // SAFETY: the index is masked into the mapped ring; `flags` is an
            // aligned u32 that KVM publishes with release semantics (ACQ_REL
            // ring), so an atomic acquire load pairs with it.
            let entry = unsafe { ring.entries.add((ring.fetch & mask) as usize) };
            // SAFETY: as above; the entry lives as long as the mapping.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: the entry is published (DIRTY seen with acquire).
            let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
            if slot == RAM_SLOT && offset < self.pages {
                self.harvested.set_bit(offset as usize);
            }
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            ring.fetch = ring.fetch.wrapping_add(1);
            taken += 1;
        }
        self.entries_seen.fetch_add(taken, Ordering::Relaxed);
        taken
    }

    fn reset(&self) -> Result<()> {
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; the VM fd is valid.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(&*self.vm, KVM_RESET_DIRTY_RINGS()) };
        if ret < 0 {
            return Err(KvmError::Ioctl {
                op: "KVM_RESET_DIRTY_RINGS",
                source: vmm_sys_util::errno::Error::last(),
            });
        }
        Ok(())
    }

    /// Ring-full exit of vCPU `i`: harvest its ring and reset, so it can run on.
    pub(crate) fn on_ring_full(&self, i: usize) -> Result<()> {
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        self.harvest_ring(i);
        self.reset()
    }

    fn harvest_all(&self) -> Result<()> {
        let mut taken = 0;
        for i in 0..self.rings.len() {
            taken += self.harvest_ring(i);
        }
        if taken > 0 {
            self.reset()?;
        }
        Ok(())
    }

    /// Ring size in entries.
    pub(crate) fn entries(&self) -> u32 {
        self.ring_entries.load(Ordering::Relaxed)
    }
}

struct RingLog {
    ram: Arc<GuestRam>,
    rings: Arc<DirtyRings>,
    stats: DirtyLogStats,
}

impl DirtyLog for RingLog {
    fn mode(&self) -> DirtyLogMode {
        DirtyLogMode::Ring
    }

    fn collect(&mut self) -> Result<DirtyBitmap> {
        let t = Instant::now();
        self.rings.harvest_all()?;
        let mut map =
            DirtyBitmap::from_words(self.ram.pages(), self.rings.harvested.get_and_reset());
        map.or_words(&self.ram.vmm_dirty().get_and_reset());
        record(&mut self.stats, t.elapsed());
        Ok(map)
    }

    fn stats(&self) -> DirtyLogStats {
        DirtyLogStats {
            ring_full_exits: self.rings.full_exits.load(Ordering::Relaxed),
            ring_entries: self.rings.entries_seen.load(Ordering::Relaxed),
            ..self.stats
        }
    }
}

/// Pages re-armed together in `clear` mode (2 MiB: one `KVM_CLEAR_DIRTY_LOG` per chunk).
pub const CLEAR_CHUNK_PAGES: u64 = 512;

/// A KVM dirty log as the crate's [`DirtyTracker`]. In `clear` mode the pages a collect
/// reported stay unprotected until [`DirtyTracker::before_read`] re-arms their 2 MiB chunk,
/// right before the chunk's first page is read: a write between the collect and that read
/// is sent with the page, not again next round; a write after the re-arm is reported.
pub struct KvmDirtyTracker {
    log: Box<dyn DirtyLog>,
    pages: u64,
    /// Clear mode: the chunk re-armed last in the current round.
    armed_chunk: Option<u64>,
    rearm_time: Duration,
}

impl KvmDirtyTracker {
    /// Tracks with `log` (from [`KvmGuest::dirty_log`](crate::guest::kvm::KvmGuest::dirty_log))
    /// a guest of `pages` 4 KiB pages.
    pub fn new(log: Box<dyn DirtyLog>, pages: u64) -> Self {
        Self {
            log,
            pages,
            armed_chunk: None,
            rearm_time: Duration::ZERO,
        }
    }
}

impl DirtyTracker for KvmDirtyTracker {
    fn name(&self) -> &'static str {
        match self.log.mode() {
            DirtyLogMode::Bitmap => "kvm-bitmap",
            DirtyLogMode::Clear => "kvm-clear",
            DirtyLogMode::Ring => "kvm-ring",
        }
    }

    fn pages(&self) -> u64 {
        self.pages
    }

    fn collect(&mut self) -> io::Result<Vec<u64>> {
        let map = self.log.collect().map_err(io::Error::other)?;
        // A new round starts: in clear mode every chunk must be re-armed again.
        self.armed_chunk = None;
        Ok(map.iter().collect())
    }

    /// In `clear` mode, re-arms the page's chunk when the round's pages enter it.
    fn before_read(&mut self, page: u64) -> io::Result<()> {
        if self.log.mode() != DirtyLogMode::Clear {
            return Ok(());
        }
        let chunk = page / CLEAR_CHUNK_PAGES;
        if self.armed_chunk != Some(chunk) {
            let t = Instant::now();
            self.log
                .clear(chunk * CLEAR_CHUNK_PAGES, CLEAR_CHUNK_PAGES)
                .map_err(io::Error::other)?;
            self.rearm_time += t.elapsed();
            self.armed_chunk = Some(chunk);
        }
        Ok(())
    }

    fn take_rearm_time(&mut self) -> Duration {
        std::mem::take(&mut self.rearm_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_iterates_set_pages_in_order() {
        let mut m = DirtyBitmap::new(200);
        for p in [0, 63, 64, 130, 199, 500] {
            m.set(p);
        }
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![0, 63, 64, 130, 199]);
        assert_eq!(m.count(), 5);
        assert!(m.is_set(130) && !m.is_set(131) && !m.is_set(500));
    }
}
