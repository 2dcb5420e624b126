//! The hierarchical dirty bitmap of one disk: a bit per granule, set by the guest's block
//! layer after each write and found and cleared by the sender in time proportional to the
//! dirty data, through two levels of summary words (`STORAGE.md`, *The dirty bitmap*).
//!
//! Layout (little-endian u64 words; in a shared file mapping or on the heap):
//!
//! ```text
//! word 0..HEADER_WORDS   header: magic, version | granularity shift, disk size, granules,
//!                        write limit, bytes written, limiter wait, writes, in-flight slots,
//!                        the mirror's words (`disk::mirror`), write-latency histograms
//! then L2 words          bit j set: L1 word j is (or may be) non-zero
//! then L1 words          bit i set: leaf word i is (or may be) non-zero
//! then leaf words        bit g set: granule g was written since it was last cleared
//! ```
//!
//! Every operation is a sequentially consistent atomic. Writers set a leaf bit, then its L1
//! bit, then its L2 bit; a reader clears a summary bit before it looks at what it
//! summarises, and sets it again if that is not zero. So a set leaf bit is always found:
//! either the reader collects it, or the writer's summary bits land after the reader's
//! clears. A summary bit may be set over a zero word (a reader tidies it lazily).

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use crate::disk::shared::SharedWords;
use crate::memory::{MemoryError, PAGE_SIZE};

/// Smallest granularity (one page).
pub const MIN_GRANULARITY: u64 = 4 << 10;
/// Largest granularity.
pub const MAX_GRANULARITY: u64 = 1 << 20;
/// The default granularity: a 4 KiB write costs 16 times less than at QEMU's fixed 1 MiB.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// "VMSDIRTY" as a little-endian u64.
pub const BITMAP_MAGIC: u64 = u64::from_le_bytes(*b"VMSDIRTY");
/// Version of the bitmap file layout (2: a 1 KiB header with the mirror words and the
/// write-latency histograms).
pub const BITMAP_VERSION: u32 = 2;
/// Writes that can be in flight at once (each holds one slot while it runs).
pub const IN_FLIGHT_SLOTS: usize = 16;
/// Header length in words (1.5 KiB).
pub const HEADER_WORDS: usize = 192;
/// Buckets of a write-latency histogram: two per octave, bucket `b` counts writes that
/// took `[2^(b/2), 2^((b+1)/2))` microseconds (bucket 0 also the faster ones, the last the
/// slower): 1 us to over an hour, each bucket 41 % wide.
pub const LATENCY_BUCKETS: usize = 64;

/// Header word indices.
pub mod head {
    /// [`super::BITMAP_MAGIC`].
    pub const MAGIC: usize = 0;
    /// Low 32 bits: [`super::BITMAP_VERSION`]; high 32 bits: log2 of the granularity.
    pub const VERSION_SHIFT: usize = 1;
    /// Disk size in bytes.
    pub const DISK_SIZE: usize = 2;
    /// Number of granules (`ceil(disk size / granularity)`).
    pub const GRANULES: usize = 3;
    /// Guest write limit in bytes/s that the sender sets (0 = unlimited).
    pub const WRITE_LIMIT: usize = 4;
    /// Bytes the guest wrote through the block layer (ever).
    pub const BYTES_WRITTEN: usize = 5;
    /// Nanoseconds guest writes waited for the write limit (ever).
    pub const LIMIT_WAIT_NS: usize = 6;
    /// Writes the guest made through the block layer (ever).
    pub const WRITES: usize = 7;
    /// [`super::IN_FLIGHT_SLOTS`] words: `(first granule + 1) << 24 | granule count` of a
    /// write in progress, 0 = free.
    pub const IN_FLIGHT: usize = 8;
    /// Write-through mirroring (`disk::mirror`): non-zero while the sender mirrors writes.
    pub const MIRROR: usize = 24;
    /// The sender's heartbeat while it mirrors: a counter it keeps advancing.
    pub const MIRROR_HEARTBEAT: usize = 25;
    /// Mirror requests the writers published (ever): the sender looks at the slots when
    /// it changed.
    pub const MIRROR_PUBLISHED: usize = 26;
    /// Writes the sender acknowledged as mirrored (ever).
    pub const MIRRORED_WRITES: usize = 27;
    /// Bytes of those writes (ever).
    pub const MIRRORED_BYTES: usize = 28;
    /// Writes that gave up waiting for the mirror and were marked dirty instead (ever).
    pub const MIRROR_FALLBACKS: usize = 29;
    /// [`super::IN_FLIGHT_SLOTS`] words: the mirror request of the write in that slot (a
    /// sequence the writer advances after its `pwrite`).
    pub const MIRROR_REQUEST: usize = 32;
    /// [`super::IN_FLIGHT_SLOTS`] words: the last request of that slot the sender
    /// acknowledged (its data is at the destination).
    pub const MIRROR_ACK: usize = 48;
    /// [`super::LATENCY_BUCKETS`] words: the latency of every write through the block
    /// layer (`write_at`, the limit's wait and the mirror's included).
    pub const WRITE_LATENCY: usize = 64;
    /// [`super::LATENCY_BUCKETS`] words: the latency of the writes that were mirrored.
    pub const MIRROR_LATENCY: usize = 128;
}

/// Why a bitmap cannot be made or opened.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// The granularity is not a power of two from 4 KiB to 1 MiB.
    #[error("disk granularity {0} is not a power of two from 4 KiB to 1 MiB")]
    Granularity(u64),
    /// The disk size is zero or more granules than the in-flight slots can name.
    #[error("disk size {0} is not supported (1 byte to 2^40 granules)")]
    DiskSize(u64),
    /// The file does not hold a bitmap of this layout.
    #[error("{path}: not a dirty bitmap ({why})")]
    BadHeader {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The file holds a bitmap of another disk size or granularity.
    #[error("{path}: bitmap of {found_size} bytes at granularity {found_granularity}, expected {size} at {granularity}")]
    Mismatch {
        /// The file.
        path: String,
        /// Disk size it describes.
        found_size: u64,
        /// Its granularity.
        found_granularity: u64,
        /// Disk size wanted.
        size: u64,
        /// Granularity wanted.
        granularity: u64,
    },
    /// Creating or mapping the file failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

enum Words {
    Heap(Box<[AtomicU64]>),
    Shared(SharedWords),
}

/// A disk's dirty bitmap (see the module docs).
pub struct DirtyBitmap {
    words: Words,
    shift: u32,
    disk_size: u64,
    granules: u64,
    leaf_words: u64,
    l1_words: u64,
    l2: usize,
    l1: usize,
    leaf: usize,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("disk_size", &self.disk_size)
            .field("granularity", &self.granularity())
            .field("granules", &self.granules)
            .finish()
    }
}

/// Word offsets of the three levels and the words in all: `(l2, l1, leaf, total)`.
fn layout(granules: u64) -> (u64, u64, u64, u64, u64, u64) {
    let leaf_words = granules.div_ceil(64);
    let l1_words = leaf_words.div_ceil(64);
    let l2_words = l1_words.div_ceil(64);
    let l2 = HEADER_WORDS as u64;
    let l1 = l2 + l2_words;
    let leaf = l1 + l1_words;
    (leaf_words, l1_words, l2, l1, leaf, leaf + leaf_words)
}

/// Bits `from..64` of a word.
fn from_bit(from: u64) -> u64 {
    !0u64 << from
}

/// Bits of word `w` (granules `w*64..w*64+64`) inside `r`.
fn word_mask(w: u64, r: &Range<u64>) -> u64 {
    let lo = r.start.max(w * 64) - w * 64;
    let hi = r.end.min(w * 64 + 64) - w * 64;
    if hi <= lo {
        0
    } else if hi - lo == 64 {
        !0
    } else {
        ((1u64 << (hi - lo)) - 1) << lo
    }
}

fn check_geometry(disk_size: u64, granularity: u64) -> Result<(u32, u64), BitmapError> {
    if !granularity.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
    {
        return Err(BitmapError::Granularity(granularity));
    }
    let granules = disk_size.div_ceil(granularity);
    if granules == 0 || granules >= 1 << 40 {
        return Err(BitmapError::DiskSize(disk_size));
    }
    Ok((granularity.trailing_zeros(), granules))
}

impl DirtyBitmap {
    /// A bitmap on the heap (one process; tests and benchmarks).
    pub fn in_memory(disk_size: u64, granularity: u64) -> Result<Self, BitmapError> {
        let (shift, granules) = check_geometry(disk_size, granularity)?;
        let total = layout(granules).5 as usize;
        let words = (0..total).map(|_| AtomicU64::new(0)).collect();
        Ok(Self::with_words(
            Words::Heap(words),
            shift,
            disk_size,
            granules,
        ))
    }

    /// Creates the bitmap file `path` (its old contents discarded), all clean.
    pub fn create(path: &Path, disk_size: u64, granularity: u64) -> Result<Self, BitmapError> {
        let (shift, granules) = check_geometry(disk_size, granularity)?;
        let bytes = (layout(granules).5 * 8).next_multiple_of(PAGE_SIZE as u64);
        let words = SharedWords::create(path, bytes)?;
        let b = Self::with_words(Words::Shared(words), shift, disk_size, granules);
        let w = b.words();
        w[head::DISK_SIZE].store(disk_size, SeqCst);
        w[head::GRANULES].store(granules, SeqCst);
        w[head::VERSION_SHIFT].store(BITMAP_VERSION as u64 | (shift as u64) << 32, SeqCst);
        // The magic last: a reader that sees it sees the geometry.
        w[head::MAGIC].store(BITMAP_MAGIC, SeqCst);
        Ok(b)
    }

    /// Opens the bitmap file at `path` that [`Self::create`] made (the sender's side).
    pub fn open(path: &Path) -> Result<Self, BitmapError> {
        let bad = |why: String| BitmapError::BadHeader {
            path: path.display().to_string(),
            why,
        };
        let words = SharedWords::open(path)?;
        let w = words.words();
        if w.len() < HEADER_WORDS {
            return Err(bad(format!("{} bytes", w.len() * 8)));
        }
        let magic = w[head::MAGIC].load(SeqCst);
        if magic != BITMAP_MAGIC {
            return Err(bad(format!("magic {magic:#018x}")));
        }
        let vs = w[head::VERSION_SHIFT].load(SeqCst);
        if vs as u32 != BITMAP_VERSION {
            return Err(bad(format!("version {}", vs as u32)));
        }
        let (disk_size, granules) = (
            w[head::DISK_SIZE].load(SeqCst),
            w[head::GRANULES].load(SeqCst),
        );
        let (shift, g) =
            check_geometry(disk_size, 1u64.checked_shl((vs >> 32) as u32).unwrap_or(0))
                .map_err(|e| bad(e.to_string()))?;
        if g != granules || layout(granules).5 as usize > w.len() {
            return Err(bad(format!("{granules} granules in {} bytes", w.len() * 8)));
        }
        Ok(Self::with_words(
            Words::Shared(words),
            shift,
            disk_size,
            granules,
        ))
    }

    /// Opens the bitmap at `path` if it exists (it must describe this disk size and, if
    /// one is given, this granularity; its dirty bits are kept), else creates it clean at
    /// `granularity` or [`DEFAULT_GRANULARITY`] (the guest's side).
    pub fn open_or_create(
        path: &Path,
        disk_size: u64,
        granularity: Option<u64>,
    ) -> Result<Self, BitmapError> {
        if !path.exists() {
            return Self::create(path, disk_size, granularity.unwrap_or(DEFAULT_GRANULARITY));
        }
        let b = Self::open(path)?;
        let granularity = granularity.unwrap_or(b.granularity());
        if b.disk_size != disk_size || b.granularity() != granularity {
            return Err(BitmapError::Mismatch {
                path: path.display().to_string(),
                found_size: b.disk_size,
                found_granularity: b.granularity(),
                size: disk_size,
                granularity,
            });
        }
        Ok(b)
    }

    fn with_words(words: Words, shift: u32, disk_size: u64, granules: u64) -> Self {
        let (leaf_words, l1_words, l2, l1, leaf, _) = layout(granules);
        Self {
            words,
            shift,
            disk_size,
            granules,
            leaf_words,
            l1_words,
            l2: l2 as usize,
            l1: l1 as usize,
            leaf: leaf as usize,
        }
    }

    fn words(&self) -> &[AtomicU64] {
        match &self.words {
            Words::Heap(w) => w,
            Words::Shared(s) => s.words(),
        }
    }

    fn leaf(&self, i: u64) -> &AtomicU64 {
        &self.words()[self.leaf + i as usize]
    }

    fn l1(&self, i: u64) -> &AtomicU64 {
        &self.words()[self.l1 + i as usize]
    }

    fn l2(&self, i: u64) -> &AtomicU64 {
        &self.words()[self.l2 + i as usize]
    }

    /// Bytes per granule.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Number of granules.
    pub fn granules(&self) -> u64 {
        self.granules
    }

    /// Size of the disk it tracks.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// The granules that bytes `offset..offset + len` touch (clamped to the disk).
    pub fn granules_of(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        let start = (offset >> self.shift).min(self.granules);
        start..end.div_ceil(self.granularity()).max(start)
    }

    /// The byte range of granules `r` on the disk (the last one clamped to the disk's end).
    pub fn bytes_of(&self, r: &Range<u64>) -> Range<u64> {
        (r.start << self.shift).min(self.disk_size)..(r.end << self.shift).min(self.disk_size)
    }

    /// Marks granules `r` dirty (the writer's side: call it after the write completed).
    pub fn mark(&self, r: Range<u64>) {
        let r = r.start.min(self.granules)..r.end.min(self.granules);
        if r.is_empty() {
            return;
        }
        for w in r.start / 64..r.end.div_ceil(64) {
            let mask = word_mask(w, &r);
            if self.leaf(w).load(SeqCst) & mask != mask {
                self.leaf(w).fetch_or(mask, SeqCst);
            }
            self.mark_summary(w);
        }
    }

    /// Sets leaf word `w`'s L1 bit, then that word's L2 bit (each only if not set: a set
    /// bit is cleared by a reader only before it looks at the word below).
    fn mark_summary(&self, w: u64) {
        let (l1w, l1bit) = (w / 64, 1u64 << (w % 64));
        if self.l1(l1w).load(SeqCst) & l1bit == 0 {
            self.l1(l1w).fetch_or(l1bit, SeqCst);
        }
        let (l2w, l2bit) = (l1w / 64, 1u64 << (l1w % 64));
        if self.l2(l2w).load(SeqCst) & l2bit == 0 {
            self.l2(l2w).fetch_or(l2bit, SeqCst);
        }
    }

    /// Whether granule `g` is dirty.
    pub fn is_dirty(&self, g: u64) -> bool {
        g < self.granules && self.leaf(g / 64).load(SeqCst) & (1 << (g % 64)) != 0
    }

    /// Number of dirty granules (reads every leaf word).
    pub fn dirty_count(&self) -> u64 {
        (0..self.leaf_words)
            .map(|w| self.leaf(w).load(SeqCst).count_ones() as u64)
            .sum()
    }

    /// The first run of consecutive dirty granules at or after granule `from`, skipping
    /// clean regions through the summaries. Clears nothing but stale summary bits.
    pub fn next_dirty_extent(&self, from: u64) -> Option<Range<u64>> {
        let start = self.next_dirty(from)?;
        let mut end = start;
        loop {
            let w = end / 64;
            let bits = self.leaf(w).load(SeqCst) >> (end % 64);
            let run = (!bits).trailing_zeros() as u64;
            end += run;
            if end % 64 != 0 || run == 0 || end >= self.granules {
                break;
            }
        }
        Some(start..end.min(self.granules))
    }

    fn next_dirty(&self, from: u64) -> Option<u64> {
        if from >= self.granules {
            return None;
        }
        let w = from / 64;
        let bits = self.leaf(w).load(SeqCst) & from_bit(from % 64);
        if bits != 0 {
            return Some(w * 64 + bits.trailing_zeros() as u64);
        }
        let mut next = w + 1;
        loop {
            let w = self.next_leaf_word(next)?;
            let bits = self.leaf(w).load(SeqCst);
            if bits != 0 {
                return Some(w * 64 + bits.trailing_zeros() as u64);
            }
            next = w + 1;
        }
    }

    /// The first leaf word at or after `from` whose L1 bit is set (its word is non-zero,
    /// or was when it was looked at: the caller checks).
    fn next_leaf_word(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.leaf_words {
            let l1w = i / 64;
            let bits = self.l1(l1w).load(SeqCst) & from_bit(i % 64);
            if bits != 0 {
                let cand = l1w * 64 + bits.trailing_zeros() as u64;
                if self.leaf(cand).load(SeqCst) != 0 || !self.tidy_l1(cand) {
                    return Some(cand);
                }
                i = cand + 1;
                continue;
            }
            i = self.next_l1_word(l1w + 1)? * 64;
        }
        None
    }

    /// The first L1 word at or after `from` whose L2 bit is set and that is non-zero.
    fn next_l1_word(&self, from: u64) -> Option<u64> {
        let mut j = from;
        while j < self.l1_words {
            let l2w = j / 64;
            let bits = self.l2(l2w).load(SeqCst) & from_bit(j % 64);
            if bits != 0 {
                let cand = l2w * 64 + bits.trailing_zeros() as u64;
                if self.l1(cand).load(SeqCst) != 0 || !self.tidy_l2(cand) {
                    return Some(cand);
                }
                j = cand + 1;
                continue;
            }
            j = (l2w + 1) * 64;
        }
        None
    }

    /// Clears leaf word `w`'s L1 bit if the word is zero; returns whether it stayed clear.
    /// Clear first, then look: a writer that set the word before the look is seen (and
    /// the bit set again), one that set it after sets the bit itself.
    fn tidy_l1(&self, w: u64) -> bool {
        self.l1(w / 64).fetch_and(!(1 << (w % 64)), SeqCst);
        if self.leaf(w).load(SeqCst) != 0 {
            self.mark_summary(w);
            return false;
        }
        true
    }

    /// [`Self::tidy_l1`] one level up: L1 word `j`'s L2 bit.
    fn tidy_l2(&self, j: u64) -> bool {
        self.l2(j / 64).fetch_and(!(1 << (j % 64)), SeqCst);
        if self.l1(j).load(SeqCst) != 0 {
            self.l2(j / 64).fetch_or(1 << (j % 64), SeqCst);
            return false;
        }
        true
    }

    /// Clears granules `r` (the sender's side: before it reads them).
    pub fn clear(&self, r: Range<u64>) {
        let r = r.start.min(self.granules)..r.end.min(self.granules);
        if r.is_empty() {
            return;
        }
        for w in r.start / 64..r.end.div_ceil(64) {
            let mask = word_mask(w, &r);
            let old = self.leaf(w).fetch_and(!mask, SeqCst);
            if old != 0 && old & !mask == 0 {
                self.tidy_l1(w);
            }
        }
    }

    /// [`Self::next_dirty_extent`] from `from`, cleared: the sender reads the extent's
    /// granules after this returns.
    pub fn take_extent(&self, from: u64) -> Option<Range<u64>> {
        let r = self.next_dirty_extent(from)?;
        self.clear(r.clone());
        Some(r)
    }

    /// Takes every dirty granule (clearing it) as merged extents in order: a round's
    /// collection. Each summary word is swapped to zero before the words below it.
    pub fn take_all(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut push = |g: u64| match out.last_mut() {
            Some(last) if last.end == g => last.end += 1,
            _ => out.push(g..g + 1),
        };
        for k in 0..self.l1_words.div_ceil(64) {
            let mut l2 = self.l2(k).swap(0, SeqCst);
            while l2 != 0 {
                let j = k * 64 + l2.trailing_zeros() as u64;
                l2 &= l2 - 1;
                let mut l1 = self.l1(j).swap(0, SeqCst);
                while l1 != 0 {
                    let w = j * 64 + l1.trailing_zeros() as u64;
                    l1 &= l1 - 1;
                    let mut leaf = self.leaf(w).swap(0, SeqCst);
                    while leaf != 0 {
                        push(w * 64 + leaf.trailing_zeros() as u64);
                        leaf &= leaf - 1;
                    }
                }
            }
        }
        out
    }

    /// Header word `i` (`head::*`).
    pub(crate) fn head(&self, i: usize) -> &AtomicU64 {
        &self.words()[i]
    }

    /// The guest's write limit in bytes/s (0 = unlimited).
    pub fn write_limit(&self) -> u64 {
        self.head(head::WRITE_LIMIT).load(SeqCst)
    }

    /// Sets the guest's write limit (the sender's QoS; 0 = unlimited).
    pub fn set_write_limit(&self, bytes_per_s: u64) {
        self.head(head::WRITE_LIMIT).store(bytes_per_s, SeqCst);
    }

    /// Bytes the guest wrote through its block layer (ever).
    pub fn bytes_written(&self) -> u64 {
        self.head(head::BYTES_WRITTEN).load(SeqCst)
    }

    /// Writes the guest made through its block layer (ever).
    pub fn writes(&self) -> u64 {
        self.head(head::WRITES).load(SeqCst)
    }

    /// Time the guest's writes waited for the write limit (ever).
    pub fn limit_wait(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.head(head::LIMIT_WAIT_NS).load(SeqCst))
    }

    /// Counts a completed write of `bytes` (the block layer, after [`Self::mark`]).
    pub(crate) fn count_write(&self, bytes: u64) {
        self.head(head::BYTES_WRITTEN).fetch_add(bytes, SeqCst);
        self.head(head::WRITES).fetch_add(1, SeqCst);
    }

    /// Counts time a write waited for the limit.
    pub(crate) fn count_wait(&self, nanos: u64) {
        self.head(head::LIMIT_WAIT_NS).fetch_add(nanos, SeqCst);
    }

    /// Claims an in-flight slot for a write to granules `r` (waits while all are taken);
    /// the slot is released when the returned guard drops, after the write is marked.
    pub fn begin_write(&self, r: Range<u64>) -> InFlight<'_> {
        let value = (r.start + 1) << 24 | (r.end - r.start).min((1 << 24) - 1);
        loop {
            for i in 0..IN_FLIGHT_SLOTS {
                let slot = self.head(head::IN_FLIGHT + i);
                if slot.compare_exchange(0, value, SeqCst, SeqCst).is_ok() {
                    return InFlight { slot, index: i };
                }
            }
            std::thread::yield_now();
        }
    }

    /// The granules of writes in progress: with the guest stopped, a write whose data may
    /// be in the file but whose granules are not marked yet. The final round sends them too.
    pub fn in_flight(&self) -> Vec<Range<u64>> {
        (0..IN_FLIGHT_SLOTS)
            .filter_map(|i| self.slot_granules(i))
            .collect()
    }

    /// The granules of the write holding in-flight slot `i`, if one does.
    pub fn slot_granules(&self, i: usize) -> Option<Range<u64>> {
        let v = self.head(head::IN_FLIGHT + i).load(SeqCst);
        (v != 0).then(|| {
            let start = (v >> 24) - 1;
            start..(start + (v & ((1 << 24) - 1))).min(self.granules)
        })
    }

    /// The bitmap file's path (`None` on the heap).
    pub fn path(&self) -> Option<&Path> {
        match &self.words {
            Words::Heap(_) => None,
            Words::Shared(s) => Some(s.path()),
        }
    }
}

/// A write in progress (see [`DirtyBitmap::begin_write`]).
#[derive(Debug)]
pub struct InFlight<'a> {
    slot: &'a AtomicU64,
    index: usize,
}

impl InFlight<'_> {
    /// The slot's index (`0..IN_FLIGHT_SLOTS`).
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.slot.store(0, SeqCst);
    }
}

/// The conventional bitmap path of a disk: `<disk path>.dirty`.
pub fn bitmap_path(disk: &Path) -> std::path::PathBuf {
    let mut p = disk.as_os_str().to_owned();
    p.push(".dirty");
    p.into()
}

#[cfg(test)]
#[path = "bitmap_tests.rs"]
mod tests;
