//! The sender's generational page cache: each page as it was last sent, so
//! the next XBZRLE delta is computed against exactly what the destination
//! holds.
//!
//! Entries are keyed by page number and remember the generation (dirty-sync
//! round) they were last used in. An entry used in the current or the
//! previous generation is *protected*: a different page never evicts it, and
//! an insert that could only succeed by evicting a protected entry is refused.
//!
//! Two layouts share that rule:
//! * [`Layout::SetAssociative`] (the default): sets of `ways` entries chosen
//!   by a hash of the page number. A new page takes a free way, else an
//!   unprotected way: one never reused since it was inserted if there is one
//!   (least recently used first), else the least recently used one. An entry
//!   with proven reuse is only displaced by a page that has itself missed
//!   recently: each set remembers the last `ways` pages it turned away, and a
//!   page's first miss only records it there ([`InsertOutcome::Deferred`]).
//!   So a burst of pages dirtied once cannot flush the pages dirtied round
//!   after round.
//! * [`Layout::DirectMapped`]: one slot per page number (`page % slots`), the
//!   design of QEMU's XBZRLE cache, kept as a baseline.
//!
//! Page data lives in one contiguous buffer (`capacity_pages * page_size`
//! bytes) with the metadata in separate arrays, so lookups scan a few words
//! and inserts never allocate.

use std::fmt;

use vmstream_simd::AlignedBuf;

use crate::MAX_PAGE_SIZE;

/// Default cache capacity in bytes (QEMU's default XBZRLE cache size).
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Default page size in bytes.
pub const DEFAULT_PAGE_SIZE: usize = 4096;

/// Ways per set of the default [`Layout`].
pub const DEFAULT_WAYS: usize = 16;

/// Smallest page size a cache accepts.
const MIN_PAGE_SIZE: usize = 64;

/// How entries are placed in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One possible slot per page (`page % slots`), like QEMU's cache.
    DirectMapped,
    /// Sets of `ways` entries indexed by a hash of the page number, with
    /// reuse-aware least-recently-used replacement among unprotected entries.
    SetAssociative {
        /// Entries per set (at least 1; clamped to the capacity).
        ways: usize,
    },
}

impl Default for Layout {
    fn default() -> Self {
        Layout::SetAssociative { ways: DEFAULT_WAYS }
    }
}

/// Why a cache could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheConfigError {
    /// The page size is not a power of two in `64..=MAX_PAGE_SIZE`.
    BadPageSize {
        /// Requested page size.
        page_size: usize,
    },
    /// The capacity holds less than one page.
    TooSmall {
        /// Requested capacity in bytes.
        capacity_bytes: usize,
        /// Page size in bytes.
        page_size: usize,
    },
    /// A set-associative layout with zero ways.
    ZeroWays,
}

impl fmt::Display for CacheConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheConfigError::BadPageSize { page_size } => write!(
                f,
                "cache page size {page_size} is not a power of two between {MIN_PAGE_SIZE} and {MAX_PAGE_SIZE}"
            ),
            CacheConfigError::TooSmall { capacity_bytes, page_size } => write!(
                f,
                "cache capacity of {capacity_bytes} bytes holds no {page_size}-byte page"
            ),
            CacheConfigError::ZeroWays => f.write_str("a set-associative cache needs at least one way"),
        }
    }
}

impl std::error::Error for CacheConfigError {}

/// What [`PageCache::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    /// The page was cached already; its data was overwritten.
    Updated,
    /// The page took a free slot.
    Inserted,
    /// The page replaced the entry of the page given (not used in the current
    /// or previous generation).
    Evicted(u64),
    /// Every slot the page may use holds a protected entry; nothing changed.
    Refused,
    /// The only victim is an entry that has been reused, and the page has not
    /// missed recently: it is remembered instead, so a second miss soon
    /// admits it (set-associative layout only). The page is not cached.
    Deferred,
}

impl InsertOutcome {
    /// True when the page is now cached with the given data.
    pub fn is_cached(self) -> bool {
        !matches!(self, InsertOutcome::Refused | InsertOutcome::Deferred)
    }
}

/// Counters of a [`PageCache`], in the spirit of QEMU's XBZRLE statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Capacity in bytes (`capacity_pages * page_size`).
    pub cache_bytes: usize,
    /// Capacity in pages.
    pub cache_pages: usize,
    /// Bytes per page.
    pub page_size: usize,
    /// Pages cached now.
    pub cached_pages: usize,
    /// Lookups that found the page.
    pub hits: u64,
    /// Lookups that did not find the page.
    pub misses: u64,
    /// New entries (into a free slot or an evicted one).
    pub inserts: u64,
    /// Overwrites of an entry already cached.
    pub updates: u64,
    /// Entries replaced by a different page.
    pub evictions: u64,
    /// Inserts refused because every candidate slot was protected.
    pub refused: u64,
    /// Inserts deferred to protect a reused entry (see
    /// [`InsertOutcome::Deferred`]).
    pub deferred: u64,
}

impl CacheStats {
    /// Fraction of lookups that hit (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        let lookups = self.hits + self.misses;
        if lookups == 0 {
            0.0
        } else {
            self.hits as f64 / lookups as f64
        }
    }

    /// Fraction of lookups that missed (QEMU's "cache miss rate").
    pub fn miss_rate(&self) -> f64 {
        let lookups = self.hits + self.misses;
        if lookups == 0 {
            0.0
        } else {
            self.misses as f64 / lookups as f64
        }
    }
}

/// Stamp of a free slot; used slots carry a positive stamp.
const FREE: u64 = 0;

/// A generational cache of page contents, keyed by page number.
#[derive(Clone)]
pub struct PageCache {
    page_size: usize,
    layout: Layout,
    /// Number of sets (`slots` for the direct-mapped layout).
    sets: usize,
    /// Entries per set (1 for the direct-mapped layout).
    ways: usize,
    generation: u64,
    /// Source of recency stamps; the next stamp handed out.
    clock: u64,
    /// Page number held by each slot (meaningful when `stamps[slot] != FREE`).
    keys: Vec<u64>,
    /// Generation each slot was last used in.
    used_in: Vec<u64>,
    /// Recency of each slot's last use; `FREE` when empty.
    stamps: Vec<u64>,
    /// Whether each slot's entry was used again after it was inserted.
    reused: Vec<bool>,
    /// Per set, the last `ways` pages it turned away (set-associative only).
    ghosts: Vec<Option<u64>>,
    /// Per set, the next `ghosts` position to overwrite.
    ghost_next: Vec<usize>,
    /// `slots * page_size` bytes of page data, slot `i` at `i * page_size`.
    data: AlignedBuf,
    stats: CacheStats,
}

impl fmt::Debug for PageCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageCache")
            .field("page_size", &self.page_size)
            .field("layout", &self.layout)
            .field("sets", &self.sets)
            .field("ways", &self.ways)
            .field("generation", &self.generation)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl PageCache {
    /// A set-associative cache of [`DEFAULT_WAYS`] ways holding as many
    /// `page_size`-byte pages as fit in `capacity_bytes` (rounded down to
    /// whole sets; a capacity below one set becomes a single smaller set).
    pub fn new(capacity_bytes: usize, page_size: usize) -> Result<Self, CacheConfigError> {
        Self::with_layout(capacity_bytes, page_size, Layout::default())
    }

    /// Refuses what [`PageCache::new`] refuses for `capacity_bytes` and `page_size`,
    /// allocating nothing (a caller checking its settings before it starts).
    pub fn check(capacity_bytes: usize, page_size: usize) -> Result<(), CacheConfigError> {
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(CacheConfigError::BadPageSize { page_size });
        }
        if capacity_bytes / page_size == 0 {
            return Err(CacheConfigError::TooSmall {
                capacity_bytes,
                page_size,
            });
        }
        Ok(())
    }

    /// A cache with the given layout; see [`PageCache::new`].
    pub fn with_layout(
        capacity_bytes: usize,
        page_size: usize,
        layout: Layout,
    ) -> Result<Self, CacheConfigError> {
        Self::check(capacity_bytes, page_size)?;
        let pages = capacity_bytes / page_size;
        let (sets, ways) = match layout {
            Layout::DirectMapped => (pages, 1),
            Layout::SetAssociative { ways: 0 } => return Err(CacheConfigError::ZeroWays),
            Layout::SetAssociative { ways } => {
                let ways = ways.min(pages);
                (pages / ways, ways)
            }
        };
        let slots = sets * ways;
        let remembers = matches!(layout, Layout::SetAssociative { .. });
        let stats = CacheStats {
            cache_bytes: slots * page_size,
            cache_pages: slots,
            page_size,
            ..CacheStats::default()
        };
        Ok(PageCache {
            page_size,
            layout,
            sets,
            ways,
            generation: 0,
            clock: FREE + 1,
            keys: vec![0; slots],
            used_in: vec![0; slots],
            stamps: vec![FREE; slots],
            reused: vec![false; slots],
            ghosts: vec![None; if remembers { slots } else { 0 }],
            ghost_next: vec![0; if remembers { sets } else { 0 }],
            data: AlignedBuf::zeroed(slots * page_size),
            stats,
        })
    }

    /// Starts generation `generation` (normally the dirty-sync round number).
    /// Entries used in this or the previous generation are protected.
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Looks `page` up, counting a hit or a miss; a hit marks the entry used
    /// in the current generation.
    pub fn get(&mut self, page: u64) -> Option<&[u8]> {
        let slot = self.lookup(page)?;
        Some(self.slot_data(slot))
    }

    /// True when `page` is cached (no statistics, no change of age).
    pub fn contains(&self, page: u64) -> bool {
        self.find(page).is_some()
    }

    /// The cached data of `page` without counting a lookup or changing its
    /// age.
    pub fn peek(&self, page: u64) -> Option<&[u8]> {
        self.find(page).map(|slot| self.slot_data(slot))
    }

    /// Caches `data` as the contents of `page`, marking it used in the
    /// current generation: overwrites the entry when `page` is cached, else
    /// takes a free or unprotected slot, else refuses or defers (leaving the
    /// cached pages as they were).
    ///
    /// # Panics
    /// When `data.len()` is not the page size.
    pub fn insert(&mut self, page: u64, data: &[u8]) -> InsertOutcome {
        assert_eq!(
            data.len(),
            self.page_size,
            "cached pages are {} bytes",
            self.page_size
        );
        let (outcome, slot) = self.claim(page);
        if let Some(slot) = slot {
            self.slot_data_mut(slot).copy_from_slice(data);
        }
        outcome
    }

    /// Touches the memory of every free slot now, so that inserts during the
    /// migration do not each pay a page fault (the zeroed buffer is otherwise
    /// committed lazily, as it is first written). Cached pages are kept.
    pub fn prefault(&mut self) {
        for slot in 0..self.capacity_pages() {
            if self.stamps[slot] == FREE {
                // Writing (not just reading) makes the kernel back the page.
                self.slot_data_mut(slot).fill(0);
            }
        }
    }

    /// Counters so far, with the current size.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Pages the cache can hold.
    pub fn capacity_pages(&self) -> usize {
        self.stamps.len()
    }

    /// Bytes of page data the cache can hold.
    pub fn capacity_bytes(&self) -> usize {
        self.data.len()
    }

    /// Bytes per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The layout given at creation.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Entries per set (1 when direct-mapped).
    pub fn ways(&self) -> usize {
        self.ways
    }

    /// Pages cached now.
    pub fn len(&self) -> usize {
        self.stats.cached_pages
    }

    /// True when no page is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The generation `page` was last used in, when cached.
    pub fn last_used(&self, page: u64) -> Option<u64> {
        self.find(page).map(|slot| self.used_in[slot])
    }

    // ---- slot-level API for the sender: find a slot once, then read and
    // overwrite its bytes without a second lookup.

    /// Slot of `page`, counting a hit or miss; a hit marks the entry used.
    pub(crate) fn lookup(&mut self, page: u64) -> Option<usize> {
        match self.find(page) {
            Some(slot) => {
                self.stats.hits += 1;
                self.reuse(slot);
                Some(slot)
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Finds or makes the slot for `page` (marking it used), updating the
    /// insert statistics; the caller then writes the slot's bytes. `None`
    /// when the insert is refused or deferred.
    pub(crate) fn claim(&mut self, page: u64) -> (InsertOutcome, Option<usize>) {
        if let Some(slot) = self.find(page) {
            self.stats.updates += 1;
            self.reuse(slot);
            return (InsertOutcome::Updated, Some(slot));
        }
        let Some(slot) = self.victim(page) else {
            self.stats.refused += 1;
            self.remember(page);
            return (InsertOutcome::Refused, None);
        };
        if self.reused[slot] && !self.ghosts.is_empty() && !self.forget(page) {
            self.stats.deferred += 1;
            self.remember(page);
            return (InsertOutcome::Deferred, None);
        }
        let outcome = if self.stamps[slot] == FREE {
            self.stats.cached_pages += 1;
            InsertOutcome::Inserted
        } else {
            self.stats.evictions += 1;
            InsertOutcome::Evicted(self.keys[slot])
        };
        self.stats.inserts += 1;
        self.keys[slot] = page;
        self.reused[slot] = false;
        self.touch(slot);
        (outcome, Some(slot))
    }

    /// Bytes of `slot`.
    pub(crate) fn slot_data(&self, slot: usize) -> &[u8] {
        &self.data[slot * self.page_size..(slot + 1) * self.page_size]
    }

    /// Bytes of `slot`, writable.
    pub(crate) fn slot_data_mut(&mut self, slot: usize) -> &mut [u8] {
        &mut self.data[slot * self.page_size..(slot + 1) * self.page_size]
    }

    // ---- placement

    /// First slot of the set `page` maps to.
    fn set_start(&self, page: u64) -> usize {
        let set = match self.layout {
            Layout::DirectMapped => (page % self.sets as u64) as usize,
            // Fibonacci hashing scatters runs of consecutive page numbers;
            // the multiply-high maps the hash onto `0..sets` without a
            // division and without needing a power-of-two set count.
            Layout::SetAssociative { .. } => {
                let hash = page.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                ((u128::from(hash) * self.sets as u128) >> 64) as usize
            }
        };
        set * self.ways
    }

    fn find(&self, page: u64) -> Option<usize> {
        let start = self.set_start(page);
        let end = start + self.ways;
        (start..end).find(|&slot| self.keys[slot] == page && self.stamps[slot] != FREE)
    }

    /// The slot a new `page` should take: a free way, else among the ways
    /// not used in the current or previous generation, the least recently
    /// used one never reused since its insert, else the least recently used.
    fn victim(&self, page: u64) -> Option<usize> {
        let start = self.set_start(page);
        let rank = |slot: usize| (self.reused[slot], self.stamps[slot]);
        let mut best: Option<usize> = None;
        for slot in start..start + self.ways {
            if self.stamps[slot] == FREE {
                return Some(slot);
            }
            if self.is_protected(slot) {
                continue;
            }
            match best {
                Some(b) if rank(b) <= rank(slot) => {}
                _ => best = Some(slot),
            }
        }
        best
    }

    /// Records that `page` was turned away by its set (no-op when
    /// direct-mapped or already recorded).
    fn remember(&mut self, page: u64) {
        if self.ghosts.is_empty() {
            return;
        }
        let start = self.set_start(page);
        let ghosts = &mut self.ghosts[start..start + self.ways];
        if ghosts.contains(&Some(page)) {
            return;
        }
        let set = start / self.ways;
        let next = self.ghost_next[set];
        ghosts[next] = Some(page);
        self.ghost_next[set] = (next + 1) % self.ways;
    }

    /// Removes `page` from its set's turned-away list, returning whether it
    /// was there.
    fn forget(&mut self, page: u64) -> bool {
        let start = self.set_start(page);
        let ghosts = &mut self.ghosts[start..start + self.ways];
        match ghosts.iter().position(|&g| g == Some(page)) {
            Some(i) => {
                ghosts[i] = None;
                true
            }
            None => false,
        }
    }

    fn is_protected(&self, slot: usize) -> bool {
        self.used_in[slot].saturating_add(1) >= self.generation
    }

    /// Marks a cached entry used again.
    fn reuse(&mut self, slot: usize) {
        self.reused[slot] = true;
        self.touch(slot);
    }

    fn touch(&mut self, slot: usize) {
        self.used_in[slot] = self.generation;
        self.stamps[slot] = self.clock;
        self.clock += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE]
    }

    #[test]
    fn rejects_bad_configuration() {
        assert_eq!(
            PageCache::new(1 << 20, 3000).unwrap_err(),
            CacheConfigError::BadPageSize { page_size: 3000 }
        );
        assert_eq!(
            PageCache::new(1 << 20, 32 << 10).unwrap_err(),
            CacheConfigError::BadPageSize {
                page_size: 32 << 10
            }
        );
        assert_eq!(
            PageCache::new(PAGE - 1, PAGE).unwrap_err(),
            CacheConfigError::TooSmall {
                capacity_bytes: PAGE - 1,
                page_size: PAGE
            }
        );
        assert_eq!(
            PageCache::with_layout(1 << 20, PAGE, Layout::SetAssociative { ways: 0 }).unwrap_err(),
            CacheConfigError::ZeroWays
        );
    }

    #[test]
    fn every_slot_starts_on_a_cache_line() {
        // Guest pages are page-aligned; a cached page at another alignment
        // makes the encoder's loads of one of the two split cache lines.
        let cache = PageCache::new(64 * PAGE, PAGE).unwrap();
        for slot in 0..cache.capacity_pages() {
            assert_eq!(
                cache.slot_data(slot).as_ptr() as usize % vmstream_simd::BUF_ALIGN,
                0
            );
        }
    }

    #[test]
    fn capacity_rounds_down_to_whole_sets() {
        let cache = PageCache::new(DEFAULT_CACHE_BYTES, PAGE).unwrap();
        assert_eq!(cache.capacity_pages(), 16384);
        assert_eq!(cache.capacity_bytes(), DEFAULT_CACHE_BYTES);
        let cache = PageCache::new(20 * PAGE + 100, PAGE).unwrap();
        assert_eq!(cache.capacity_pages(), 16);
        let cache = PageCache::new(5 * PAGE, PAGE).unwrap();
        assert_eq!((cache.capacity_pages(), cache.ways()), (5, 5));
        let cache = PageCache::with_layout(20 * PAGE, PAGE, Layout::DirectMapped).unwrap();
        assert_eq!((cache.capacity_pages(), cache.ways()), (20, 1));
        let cache = PageCache::new(16 * 16384, 16384).unwrap();
        assert_eq!(cache.stats().cache_bytes, 16 * 16384);
    }

    #[test]
    fn insert_get_update() {
        let mut cache = PageCache::new(64 * PAGE, PAGE).unwrap();
        assert_eq!(cache.get(7), None);
        assert_eq!(cache.insert(7, &page(1)), InsertOutcome::Inserted);
        assert_eq!(cache.get(7), Some(&page(1)[..]));
        assert_eq!(cache.insert(7, &page(2)), InsertOutcome::Updated);
        assert_eq!(cache.peek(7), Some(&page(2)[..]));
        assert!(cache.contains(7) && !cache.contains(8));
        let s = cache.stats();
        assert_eq!(
            (s.hits, s.misses, s.inserts, s.updates, s.cached_pages),
            (1, 1, 1, 1, 1)
        );
    }

    #[test]
    fn protected_entries_refuse_other_pages() {
        // A single set of two ways: every page competes for the same slots.
        let mut cache =
            PageCache::with_layout(2 * PAGE, PAGE, Layout::SetAssociative { ways: 2 }).unwrap();
        cache.set_generation(5);
        assert_eq!(cache.insert(1, &page(1)), InsertOutcome::Inserted);
        assert_eq!(cache.insert(2, &page(2)), InsertOutcome::Inserted);
        assert_eq!(cache.insert(3, &page(3)), InsertOutcome::Refused);
        cache.set_generation(6); // generation 5 is now the previous one
        assert_eq!(cache.insert(3, &page(3)), InsertOutcome::Refused);
        assert!(cache.get(1).is_some()); // page 1 used in generation 6
        cache.set_generation(7); // page 2 (generation 5) is now evictable
        assert_eq!(cache.insert(3, &page(3)), InsertOutcome::Evicted(2));
        assert_eq!(cache.insert(4, &page(4)), InsertOutcome::Refused);
        assert_eq!(cache.peek(1), Some(&page(1)[..]));
        assert_eq!(cache.peek(3), Some(&page(3)[..]));
        assert_eq!(cache.stats().refused, 3);
        assert_eq!(cache.stats().evictions, 1);
    }

    #[test]
    fn evicts_never_reused_entries_first_then_defers() {
        let mut cache =
            PageCache::with_layout(4 * PAGE, PAGE, Layout::SetAssociative { ways: 4 }).unwrap();
        for p in 0..4 {
            cache.insert(p, &page(p as u8));
        }
        cache.get(2);
        cache.get(0);
        cache.set_generation(2);
        // Pages 1 and 3 were never reused: they go first, oldest first.
        assert_eq!(cache.insert(10, &page(10)), InsertOutcome::Evicted(1));
        assert_eq!(cache.insert(11, &page(11)), InsertOutcome::Evicted(3));
        // In generation 3, 10 and 11 are protected and only the reused 0 and
        // 2 are candidates: a first miss is deferred, a second one evicts
        // the least recently used of them.
        cache.set_generation(3);
        assert_eq!(cache.insert(12, &page(12)), InsertOutcome::Deferred);
        assert!(!cache.contains(12));
        assert_eq!(cache.insert(12, &page(12)), InsertOutcome::Evicted(2));
        assert_eq!(cache.peek(12), Some(&page(12)[..]));
        // Never-reused 10 goes before reused 0 even though 0 is older.
        cache.set_generation(5);
        assert_eq!(cache.insert(13, &page(13)), InsertOutcome::Evicted(10));
        assert_eq!(cache.stats().deferred, 1);
    }

    #[test]
    fn refused_pages_are_remembered() {
        let mut cache =
            PageCache::with_layout(2 * PAGE, PAGE, Layout::SetAssociative { ways: 2 }).unwrap();
        cache.insert(0, &page(0));
        cache.insert(1, &page(1));
        cache.get(0);
        cache.get(1);
        assert_eq!(cache.insert(5, &page(5)), InsertOutcome::Refused);
        cache.set_generation(2);
        assert_eq!(cache.insert(5, &page(5)), InsertOutcome::Evicted(0));
    }

    #[test]
    fn direct_mapped_uses_page_modulo_slots() {
        let mut cache = PageCache::with_layout(8 * PAGE, PAGE, Layout::DirectMapped).unwrap();
        assert_eq!(cache.insert(3, &page(3)), InsertOutcome::Inserted);
        assert_eq!(cache.insert(4, &page(4)), InsertOutcome::Inserted);
        assert_eq!(cache.insert(11, &page(11)), InsertOutcome::Refused);
        cache.set_generation(2);
        assert_eq!(cache.insert(11, &page(11)), InsertOutcome::Evicted(3));
        assert!(cache.contains(4));
        // QEMU's rule only: a reused entry is replaced without deferral.
        cache.get(4);
        cache.set_generation(4);
        assert_eq!(cache.insert(12, &page(12)), InsertOutcome::Evicted(4));
        assert_eq!(cache.stats().deferred, 0);
    }

    #[test]
    fn prefault_keeps_cached_pages() {
        let mut cache = PageCache::new(32 * PAGE, PAGE).unwrap();
        cache.insert(3, &page(3));
        cache.prefault();
        assert_eq!(cache.peek(3), Some(&page(3)[..]));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn page_numbers_near_u64_max_work() {
        let mut cache = PageCache::new(32 * PAGE, PAGE).unwrap();
        for p in [u64::MAX, u64::MAX - 1, 0] {
            assert_eq!(cache.insert(p, &page(p as u8)), InsertOutcome::Inserted);
        }
        assert_eq!(cache.peek(u64::MAX), Some(&page(0xff)[..]));
        assert_eq!(cache.peek(0), Some(&page(0)[..]));
    }
}
