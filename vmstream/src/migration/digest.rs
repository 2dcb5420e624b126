//! The switchover digest: a 32-byte hash that proves the destination's memory equals the
//! source's memory at the pause.
//!
//! Definition (algorithm 3 on the wire, `PROTOCOL.md`): every page `i` of `page_size`
//! bytes gets `h_i = XXH3-128(page_i)` (16 bytes, little endian); every run of
//! [`DIGEST_GROUP_PAGES`] pages (the last one shorter) gets `g_j = XXH3-128(h_64j || ... )`,
//! and
//!
//! ```text
//! digest = BLAKE3( DOMAIN || le64(page_size) || le64(guest_size) || g_0 || g_1 || ... )
//! ```
//!
//! Why per-page hashes under groups under a root: the two sides compute the same value in
//! different ways, and both keep it nearly done before the pause. The destination keeps
//! [`PageHashes`] current as the codec's workers apply pages (the page is hot in their
//! cache); the incremental source keeps the hashes of the pages as it sent them. Each list
//! keeps its group hashes cached and marks the groups a page changed in, so at the pause
//! only the changed groups are hashed again, then the groups' list (a 256th of the pages'
//! list): the cost follows what the final round changed, not the guest's size. A full
//! source hashes all of its frozen memory (`--verify full`). BLAKE3 over the groups keeps
//! the root collision resistant in the list; XXH3-128 per page and per group detects
//! corruption, not adversaries (the stream is authenticated by the key, when there is one).

use rayon::prelude::*;

use crate::migration::dest::lazy_words::LazyWords;
use crate::migration::wire::{Audit, AuditStatus};
use crate::telemetry::verification::AuditStats;
/// What the statistics' `digest` says of a handover (`send --handover`): the memory
/// crossed no wire, so there is nothing to hash and compare.
pub const DIGEST_SKIPPED_HANDOVER: &str = "skipped-handover";

/// Domain separation for the root hash (bump with the definition).
const DOMAIN: &[u8] = b"vmstream memory digest v3: BLAKE3 over XXH3-128 of 64 page hashes";

/// Pages per group hash of the digest (64 x 16 bytes = 1 KiB of page hashes per group).
pub const DIGEST_GROUP_PAGES: usize = 64;

/// The hash of one group of page hashes (`hashes`: at most [`DIGEST_GROUP_PAGES`]).
fn group_hash(hashes: &[u128]) -> u128 {
    let mut bytes = [0u8; DIGEST_GROUP_PAGES * 16];
    for (b, h) in bytes.chunks_exact_mut(16).zip(hashes) {
        b.copy_from_slice(&h.to_le_bytes());
    }
    twox_hash::XxHash3_128::oneshot(&bytes[..hashes.len() * 16])
}

/// The digest under `domain` over the group hashes of a memory of `guest_size` bytes.
fn digest_of_group_hashes(
    domain: &[u8],
    page_size: usize,
    guest_size: u64,
    groups: impl IntoIterator<Item = u128>,
) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(domain);
    h.update(&(page_size as u64).to_le_bytes());
    h.update(&guest_size.to_le_bytes());
    // Batch the 16-byte hashes so BLAKE3 sees long inputs (its SIMD needs them).
    let mut buf = Vec::with_capacity(64 << 10);
    for x in groups {
        buf.extend_from_slice(&x.to_le_bytes());
        if buf.len() == buf.capacity() {
            h.update(&buf);
            buf.clear();
        }
    }
    h.update(&buf);
    *h.finalize().as_bytes()
}

/// Hash of one page: XXH3-128 (`twox-hash` picks AVX2 at run time where the CPU has it,
/// about 1.5x the SSE2 code of a baseline x86-64 build on one core; same output).
pub fn page_hash(page: &[u8]) -> u128 {
    twox_hash::XxHash3_128::oneshot(page)
}

/// Domain of a disk's digest: the memory digest's definition over the disk's pages.
const DISK_DOMAIN: &[u8] = b"vmstream disk digest v2: BLAKE3 over XXH3-128 of 64 page hashes";

/// The digest of a memory whose page hashes are `hashes`, in page order.
pub fn digest_of_page_hashes(
    page_size: usize,
    guest_size: u64,
    hashes: impl IntoIterator<Item = u128>,
) -> [u8; 32] {
    grouped_root(DOMAIN, page_size, guest_size, hashes)
}

/// The digest of a disk of `disk_size` bytes whose page hashes are `hashes`, in page order
/// (`PROTOCOL.md`, *Disks*): grouped as memory's, under its own domain.
pub fn disk_digest(
    page_size: usize,
    disk_size: u64,
    hashes: impl IntoIterator<Item = u128>,
) -> [u8; 32] {
    grouped_root(DISK_DOMAIN, page_size, disk_size, hashes)
}

/// The root over the group hashes of `hashes` (groups of [`DIGEST_GROUP_PAGES`]).
fn grouped_root(
    domain: &[u8],
    page_size: usize,
    size: u64,
    hashes: impl IntoIterator<Item = u128>,
) -> [u8; 32] {
    let mut hashes = hashes.into_iter();
    let mut group = Vec::with_capacity(DIGEST_GROUP_PAGES);
    let groups = std::iter::from_fn(move || {
        group.clear();
        group.extend(hashes.by_ref().take(DIGEST_GROUP_PAGES));
        (!group.is_empty()).then(|| group_hash(&group))
    });
    digest_of_group_hashes(domain, page_size, size, groups)
}

/// The digest of `memory` (a whole number of `page_size` pages), hashed on every core.
pub fn memory_digest(memory: &[u8], page_size: usize) -> [u8; 32] {
    let hashes: Vec<u128> = memory.par_chunks(page_size).map(page_hash).collect();
    digest_of_page_hashes(page_size, memory.len() as u64, hashes)
}

/// [`memory_digest`] of `memory` whose pages with a clear bit in `data` (a bit per page,
/// [`crate::memory::GuestMemory::data_pages`]) are holes: they are zero and hashed as such
/// without being read (reading a hole of a shared mapping would allocate it).
pub fn memory_digest_sparse(memory: &[u8], page_size: usize, data: &[u64]) -> [u8; 32] {
    let zero = page_hash(&vec![0u8; page_size]);
    let hashes: Vec<u128> = memory
        .par_chunks(page_size)
        .enumerate()
        .map(|(p, page)| {
            if crate::memory::page_is_hole(data, p as u64) {
                zero
            } else {
                page_hash(page)
            }
        })
        .collect();
    digest_of_page_hashes(page_size, memory.len() as u64, hashes)
}

/// Per-page hashes of a memory that changes one page at a time (the destination's image,
/// the pages the source sent), updated from any thread as long as no two threads update the
/// same page at once, with the digest's group hashes cached: a page's update marks its group,
/// and [`Self::refresh`] (between rounds) or [`Self::digest`] hashes only the marked groups
/// again. Held in [`LazyWords`]: pages never written cost nothing, so a guest size a peer
/// claims allocates nothing here before its pages arrive.
pub struct PageHashes {
    page_size: usize,
    /// Two words per page: low and high half of its XXH3-128 (the zero page's until set).
    words: LazyWords,
    /// Two words per group: its cached hash (that of zero pages until set; the last,
    /// shorter group's is stored at creation).
    groups: LazyWords,
    /// A bit per group whose pages changed since its hash was cached.
    stale: LazyWords,
}

impl PageHashes {
    /// Hashes of `pages` zero-filled pages (a fresh image).
    pub fn zeroed(pages: u64, page_size: usize) -> PageHashes {
        let zero = page_hash(&vec![0u8; page_size]);
        let words = LazyWords::new(pages as usize * 2, &[zero as u64, (zero >> 64) as u64]);
        let group_count = (pages as usize).div_ceil(DIGEST_GROUP_PAGES);
        let full = group_hash(&[zero; DIGEST_GROUP_PAGES]);
        let groups = LazyWords::new(group_count * 2, &[full as u64, (full >> 64) as u64]);
        let tail = pages as usize % DIGEST_GROUP_PAGES;
        if tail != 0 {
            let last = group_hash(&vec![zero; tail]);
            groups.store((group_count - 1) * 2, last as u64);
            groups.store((group_count - 1) * 2 + 1, (last >> 64) as u64);
        }
        let stale = LazyWords::new(group_count.div_ceil(64), &[0]);
        PageHashes {
            page_size,
            words,
            groups,
            stale,
        }
    }

    /// Records the new content of `page`. Pages outside the memory are ignored (the codec
    /// validated page numbers before applying).
    pub fn update(&self, page: u64, content: &[u8]) {
        self.set(page, page_hash(content));
    }

    /// Records `hash` as the hash of `page` (ignored outside the memory).
    pub fn set(&self, page: u64, hash: u128) {
        let i = page as usize * 2;
        if i < self.words.len() {
            // Readers run after the round barrier, which orders these stores; a refresh
            // between rounds that reads a half-stored hash finds its group marked again.
            self.words.store(i, hash as u64);
            self.words.store(i + 1, (hash >> 64) as u64);
            let g = page as usize / DIGEST_GROUP_PAGES;
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            self.stale.fetch_or(g / 64, 1 << (g % 64));
        }
    }

    /// The hash of `page` (zero for pages outside the memory).
    pub fn get(&self, page: u64) -> u128 {
        let i = page as usize * 2;
        match (self.words.get(i), self.words.get(i + 1)) {
            (Some(lo), Some(hi)) => u128::from(lo) | (u128::from(hi) << 64),
            _ => 0,
        }
    }

    /// The hashes of `pages`, in order (a disk's, when disk pages follow memory's).
    pub fn range(&self, pages: std::ops::Range<u64>) -> impl Iterator<Item = u128> + '_ {
        pages.map(|p| self.get(p))
    }

    /// The hash of a zero page of this size.
    pub fn zero_page_hash(&self) -> u128 {
        page_hash(&vec![0u8; self.page_size])
    }

    /// Bytes the hashes hold so far (they grow as pages are written).
    pub fn allocated_bytes(&self) -> usize {
        (self.words.allocated() + self.groups.allocated() + self.stale.allocated()) * 8
    }

    /// Hashes again the groups whose pages changed since (each group's mark is taken before
    /// its pages are read, so a page updated meanwhile marks it again). Returns how many.
    pub fn refresh(&self) -> usize {
        let pages = (self.words.len() / 2) as u64;
        let mut marked = Vec::new();
        self.stale.for_each_allocated(|i, w| {
            let mut bits = w.swap(0, std::sync::atomic::Ordering::Acquire);
            while bits != 0 {
                marked.push(i * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        });
        let fresh: Vec<(usize, u128)> = marked
            .par_iter()
            .map(|&g| {
                let first = (g * DIGEST_GROUP_PAGES) as u64;
                let end = (first + DIGEST_GROUP_PAGES as u64).min(pages);
                let hashes: Vec<u128> = (first..end).map(|p| self.get(p)).collect();
                (g, group_hash(&hashes))
            })
            .collect();
        for &(g, h) in &fresh {
            self.groups.store(g * 2, h as u64);
            self.groups.store(g * 2 + 1, (h >> 64) as u64);
        }
        fresh.len()
    }

    /// The digest of the memory these hashes describe (hashing only the groups whose pages
    /// changed since the last refresh).
    pub fn digest(&self) -> [u8; 32] {
        self.digest_first(self.words.len() as u64 / 2)
    }

    /// The digest of the disk whose pages are `pages` (after guest memory's): from the
    /// cached groups when the disk starts a group (every disk does after a memory of whole
    /// groups and disks of whole groups), its last shorter group from its page hashes; else
    /// from the page hashes alone. Reading every page hash of a 16 GiB disk at the pause
    /// took about 100 ms; the cached groups leave only those the final round changed.
    pub fn disk_digest(&self, pages: std::ops::Range<u64>) -> [u8; 32] {
        let size = (pages.end - pages.start) * self.page_size as u64;
        let group = DIGEST_GROUP_PAGES as u64;
        if !pages.start.is_multiple_of(group) || pages.end > (self.words.len() / 2) as u64 {
            return disk_digest(self.page_size, size, self.range(pages));
        }
        self.refresh();
        let whole_end = pages.start + (pages.end - pages.start) / group * group;
        let cached = (pages.start / group..whole_end / group).map(|g| {
            let g = g as usize;
            let lo = self.groups.get(g * 2).unwrap_or(0);
            let hi = self.groups.get(g * 2 + 1).unwrap_or(0);
            u128::from(lo) | (u128::from(hi) << 64)
        });
        let tail = (whole_end < pages.end)
            .then(|| group_hash(&self.range(whole_end..pages.end).collect::<Vec<_>>()));
        digest_of_group_hashes(DISK_DOMAIN, self.page_size, size, cached.chain(tail))
    }

    /// The digest of the memory made of the first `pages` pages (guest memory, when disk
    /// pages follow it): from the cached groups when `pages` ends a group (guest sizes are
    /// multiples of 256 KiB), else from the page hashes.
    pub fn digest_first(&self, pages: u64) -> [u8; 32] {
        let all = self.words.len() / 2;
        let pages = (pages as usize).min(all);
        let size = (pages * self.page_size) as u64;
        if pages != all && !pages.is_multiple_of(DIGEST_GROUP_PAGES) {
            return digest_of_page_hashes(
                self.page_size,
                size,
                (0..pages as u64).map(|p| self.get(p)),
            );
        }
        self.refresh();
        let mut words = self
            .groups
            .iter()
            .take(pages.div_ceil(DIGEST_GROUP_PAGES) * 2);
        let groups = std::iter::from_fn(|| {
            let lo = words.next()?;
            let hi = words.next()?;
            Some(u128::from(lo) | (u128::from(hi) << 64))
        });
        digest_of_group_hashes(DOMAIN, self.page_size, size, groups)
    }
}

/// The statistics' account of a post-commit `audit` (both sides report it).
pub fn audit_stats(audit: &Audit) -> AuditStats {
    AuditStats {
        result: match audit.status {
            AuditStatus::Match => "match",
            AuditStatus::Mismatch => "mismatch",
            AuditStatus::Incomplete => "incomplete",
        }
        .into(),
        pages_checked: audit.pages_checked,
        mismatched: audit.mismatched,
        pages: audit.pages.clone(),
        duration_ms: None,
    }
}

/// Lower-case hex of a digest.
pub fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PAGE_SIZE;

    fn memory(pages: usize, seed: u8) -> Vec<u8> {
        (0..pages * PAGE_SIZE)
            .map(|i| ((i * 7 + seed as usize) % 251) as u8)
            .collect()
    }

    #[test]
    fn page_hash_is_the_reference_xxh3_128() {
        // Known answers of the reference C implementation (python-xxhash 3.x, seed 0).
        assert_eq!(page_hash(b""), 0x99aa06d3014798d86001c324468d497f);
        let page: Vec<u8> = (0..PAGE_SIZE).map(|i| i as u8).collect();
        assert_eq!(page_hash(&page), 0x03916578969f7a66eb4b7c3707879151);
    }

    #[test]
    fn parallel_digest_equals_the_definition() {
        let mem = memory(37, 1);
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        h.update(&(PAGE_SIZE as u64).to_le_bytes());
        h.update(&(mem.len() as u64).to_le_bytes());
        // 37 pages: one group, shorter than 64.
        let mut group = Vec::new();
        for p in mem.chunks(PAGE_SIZE) {
            group.extend_from_slice(&twox_hash::XxHash3_128::oneshot(p).to_le_bytes());
        }
        h.update(&twox_hash::XxHash3_128::oneshot(&group).to_le_bytes());
        assert_eq!(memory_digest(&mem, PAGE_SIZE), *h.finalize().as_bytes());
        // 130 pages: groups of 64, 64 and 2.
        let mem = memory(130, 2);
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        h.update(&(PAGE_SIZE as u64).to_le_bytes());
        h.update(&(mem.len() as u64).to_le_bytes());
        for pages in mem.chunks(64 * PAGE_SIZE) {
            let group: Vec<u8> = pages
                .chunks(PAGE_SIZE)
                .flat_map(|p| twox_hash::XxHash3_128::oneshot(p).to_le_bytes())
                .collect();
            h.update(&twox_hash::XxHash3_128::oneshot(&group).to_le_bytes());
        }
        assert_eq!(memory_digest(&mem, PAGE_SIZE), *h.finalize().as_bytes());
    }

    /// Updates from several threads with refreshes between (and during) them: the cached
    /// group hashes always give the digest of the memory, and a refresh hashes only the
    /// groups whose pages changed.
    #[test]
    fn cached_group_hashes_give_the_memory_digest() {
        let pages = 64 * 40 + 5;
        let mut mem = memory(pages, 3);
        let hashes = PageHashes::zeroed(pages as u64, PAGE_SIZE);
        for p in 0..pages {
            hashes.update(p as u64, &mem[p * PAGE_SIZE..][..PAGE_SIZE]);
        }
        assert_eq!(hashes.refresh(), 41);
        assert_eq!(hashes.digest(), memory_digest(&mem, PAGE_SIZE));
        let mut rng = 7u64;
        for round in 0..20u8 {
            let mut touched = std::collections::BTreeSet::new();
            for _ in 0..(round as usize * 3 + 1) {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let p = (rng >> 33) as usize % pages;
                mem[p * PAGE_SIZE + round as usize] ^= 0x5a;
                touched.insert(p);
            }
            let mem_ref = &mem;
            std::thread::scope(|s| {
                for part in [0, 1] {
                    let (hashes, touched) = (&hashes, &touched);
                    s.spawn(move || {
                        for &p in touched.iter().filter(|p| *p % 2 == part) {
                            hashes.update(p as u64, &mem_ref[p * PAGE_SIZE..][..PAGE_SIZE]);
                        }
                    });
                }
                s.spawn(|| hashes.refresh());
            });
            let groups: std::collections::BTreeSet<usize> =
                touched.iter().map(|p| p / DIGEST_GROUP_PAGES).collect();
            assert!(hashes.refresh() <= groups.len());
            assert_eq!(
                hashes.digest(),
                memory_digest(&mem, PAGE_SIZE),
                "round {round}"
            );
        }
    }

    /// A disk's digest from the cached groups equals the definition over its page hashes,
    /// for disks that start a group (their last group shorter or not) and one that does
    /// not, after writes between refreshes.
    #[test]
    fn cached_group_hashes_give_each_disks_digest() {
        // Memory of 3 groups, a disk of 5 groups + 7 pages, one of 2 groups, a last of 9 pages.
        let bounds = [0u64, 192, 192 + 327, 192 + 327 + 128, 192 + 327 + 128 + 9];
        let pages = *bounds.last().unwrap() as usize;
        let mut mem = memory(pages, 5);
        let hashes = PageHashes::zeroed(pages as u64, PAGE_SIZE);
        let check = |mem: &[u8], hashes: &PageHashes| {
            for w in bounds[1..].windows(2) {
                let (a, b) = (w[0] as usize, w[1] as usize);
                let definition: Vec<u128> = mem[a * PAGE_SIZE..b * PAGE_SIZE]
                    .chunks(PAGE_SIZE)
                    .map(page_hash)
                    .collect();
                assert_eq!(
                    hashes.disk_digest(w[0]..w[1]),
                    disk_digest(PAGE_SIZE, ((b - a) * PAGE_SIZE) as u64, definition),
                    "disk {a}..{b}"
                );
            }
        };
        for p in 0..pages {
            hashes.update(p as u64, &mem[p * PAGE_SIZE..][..PAGE_SIZE]);
        }
        check(&mem, &hashes);
        for (i, p) in [200usize, 518, 519, 600, 650, 655].into_iter().enumerate() {
            mem[p * PAGE_SIZE + i] ^= 0xa5;
            hashes.update(p as u64, &mem[p * PAGE_SIZE..][..PAGE_SIZE]);
            if i % 2 == 0 {
                hashes.refresh();
            }
            check(&mem, &hashes);
        }
    }

    #[test]
    fn sparse_digest_equals_the_full_digest_over_zero_holes() {
        let mut mem = vec![0u8; 130 * PAGE_SIZE];
        for p in [1usize, 64, 129] {
            mem[p * PAGE_SIZE + 9] = p as u8;
        }
        let mut data = vec![0u64; 3];
        for p in [1usize, 64, 129, 5] {
            data[p / 64] |= 1 << (p % 64);
        }
        assert_eq!(
            memory_digest_sparse(&mem, PAGE_SIZE, &data),
            memory_digest(&mem, PAGE_SIZE)
        );
        // A short bitmap treats the pages past it as data.
        assert_eq!(
            memory_digest_sparse(&mem, PAGE_SIZE, &data[..1]),
            memory_digest(&mem, PAGE_SIZE)
        );
    }

    #[test]
    fn incremental_hashes_track_page_writes() {
        let mut mem = vec![0u8; 300 * PAGE_SIZE];
        let hashes = PageHashes::zeroed(300, PAGE_SIZE);
        assert_eq!(hashes.digest(), memory_digest(&mem, PAGE_SIZE));
        for (round, page) in [(1u8, 0usize), (2, 299), (3, 17), (4, 17), (5, 150)] {
            mem[page * PAGE_SIZE + round as usize] = round;
            hashes.update(page as u64, &mem[page * PAGE_SIZE..][..PAGE_SIZE]);
            assert_eq!(hashes.digest(), memory_digest(&mem, PAGE_SIZE));
        }
        // A page written without an update shows as a mismatch.
        mem[5 * PAGE_SIZE] ^= 1;
        assert_ne!(hashes.digest(), memory_digest(&mem, PAGE_SIZE));
        // Out-of-range updates are ignored, not a panic.
        hashes.update(300, &mem[..PAGE_SIZE]);
    }

    /// The hashes of a huge claimed memory cost nothing until pages are written, and then
    /// only a chunk around each (a peer's Hello must not make the receiver allocate).
    #[test]
    fn hashes_of_a_huge_memory_are_allocated_as_pages_arrive() {
        let pages = 1u64 << 28; // 1 TiB of 4 KiB pages: 4 GiB of hashes if allocated
        let hashes = PageHashes::zeroed(pages, PAGE_SIZE);
        assert_eq!(hashes.allocated_bytes(), 0);
        let zero = hashes.zero_page_hash();
        assert_eq!((hashes.get(0), hashes.get(pages - 1)), (zero, zero));
        let page = memory(1, 5);
        hashes.update(pages - 1, &page);
        assert_eq!(hashes.get(pages - 1), page_hash(&page));
        assert!(
            hashes.allocated_bytes() <= 1 << 20,
            "{}",
            hashes.allocated_bytes()
        );
    }

    #[test]
    fn digest_depends_on_every_byte_order_and_size() {
        let a = memory(8, 3);
        let d = memory_digest(&a, PAGE_SIZE);
        let mut b = a.clone();
        b[8 * PAGE_SIZE - 1] ^= 0x80;
        assert_ne!(memory_digest(&b, PAGE_SIZE), d);
        // Swapped pages differ.
        let mut c = a.clone();
        c[..PAGE_SIZE].copy_from_slice(&a[PAGE_SIZE..2 * PAGE_SIZE]);
        c[PAGE_SIZE..2 * PAGE_SIZE].copy_from_slice(&a[..PAGE_SIZE]);
        assert_ne!(memory_digest(&c, PAGE_SIZE), d);
        assert_ne!(memory_digest(&a[..7 * PAGE_SIZE], PAGE_SIZE), d);
        assert_eq!(hex(&[0xab; 32]).len(), 64);
    }
}
