//! The switchover digest: a 32-byte hash that proves the destination's memory equals the
//! source's memory at the pause.
//!
//! Definition (algorithm 2 on the wire, `PROTOCOL.md`): every page `i` of `page_size`
//! bytes gets `h_i = XXH3-128(page_i)` (16 bytes, little endian), and
//!
//! ```text
//! digest = BLAKE3( DOMAIN || le64(page_size) || le64(guest_size) || h_0 || h_1 || ... )
//! ```
//!
//! Why per-page hashes under a root: the two sides compute the same value in different
//! ways. The source hashes all of its frozen memory at the pause, on every core (XXH3 runs
//! at memory speed, a third of BLAKE3's cost here); it must read everything then, because a
//! digest derived from its dirty tracking would not catch a tracking error. The
//! destination keeps [`PageHashes`] current as the codec's workers apply pages (the page is
//! hot in their cache), so at the pause it only hashes the list (4 MiB per GiB of guest).
//! BLAKE3 over the list keeps the root collision resistant in the list; XXH3-128 per page
//! detects corruption, not adversaries (the stream is not authenticated anyway).

use rayon::prelude::*;

use crate::migration::dest::lazy_words::LazyWords;
use crate::migration::wire::{Audit, AuditStatus};
use crate::telemetry::verification::AuditStats;
/// What the statistics' `digest` says of a handover (`send --handover`): the memory
/// crossed no wire, so there is nothing to hash and compare.
pub const DIGEST_SKIPPED_HANDOVER: &str = "skipped-handover";

/// Domain separation for the root hash (bump with the definition).
const DOMAIN: &[u8] = b"vmstream memory digest v2: BLAKE3 over XXH3-128 of each page";

/// Hash of one page: XXH3-128 (`twox-hash` picks AVX2 at run time where the CPU has it,
/// about 1.5x the SSE2 code of a baseline x86-64 build on one core; same output).
pub fn page_hash(page: &[u8]) -> u128 {
    twox_hash::XxHash3_128::oneshot(page)
}

/// Domain of a disk's digest: the memory digest's definition over the disk's pages.
const DISK_DOMAIN: &[u8] = b"vmstream disk digest v1: BLAKE3 over XXH3-128 of each page";

/// The digest of a memory whose page hashes are `hashes`, in page order.
pub fn digest_of_page_hashes(
    page_size: usize,
    guest_size: u64,
    hashes: impl IntoIterator<Item = u128>,
) -> [u8; 32] {
    root_of_page_hashes(DOMAIN, page_size, guest_size, hashes)
}

/// The digest of a disk of `disk_size` bytes whose page hashes are `hashes`, in page order
/// (`PROTOCOL.md`, *Disks*).
pub fn disk_digest(
    page_size: usize,
    disk_size: u64,
    hashes: impl IntoIterator<Item = u128>,
) -> [u8; 32] {
    root_of_page_hashes(DISK_DOMAIN, page_size, disk_size, hashes)
}

fn root_of_page_hashes(
    domain: &[u8],
    page_size: usize,
    guest_size: u64,
    hashes: impl IntoIterator<Item = u128>,
) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(domain);
    h.update(&(page_size as u64).to_le_bytes());
    h.update(&guest_size.to_le_bytes());
    // Batch the 16-byte hashes so BLAKE3 sees long inputs (its SIMD needs them).
    let mut buf = Vec::with_capacity(64 << 10);
    for x in hashes {
        buf.extend_from_slice(&x.to_le_bytes());
        if buf.len() == buf.capacity() {
            h.update(&buf);
            buf.clear();
        }
    }
    h.update(&buf);
    *h.finalize().as_bytes()
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

/// Per-page hashes of a memory that changes one page at a time (the destination's image),
/// updated from any thread as long as no two threads update the same page at once. Held in
/// [`LazyWords`]: pages never written cost nothing, so a guest size a peer claims allocates
/// nothing here before its pages arrive.
pub struct PageHashes {
    page_size: usize,
    /// Two words per page: low and high half of its XXH3-128 (the zero page's until set).
    words: LazyWords,
}

impl PageHashes {
    /// Hashes of `pages` zero-filled pages (a fresh image).
    pub fn zeroed(pages: u64, page_size: usize) -> PageHashes {
        let zero = page_hash(&vec![0u8; page_size]);
        let words = LazyWords::new(pages as usize * 2, &[zero as u64, (zero >> 64) as u64]);
        PageHashes { page_size, words }
    }

    /// Records the new content of `page`. Pages outside the memory are ignored (the codec
    /// validated page numbers before applying).
    pub fn update(&self, page: u64, content: &[u8]) {
        let h = page_hash(content);
        let i = page as usize * 2;
        if i < self.words.len() {
            // Relaxed: readers run after the round barrier, which orders these stores.
            self.words.store(i, h as u64);
            self.words.store(i + 1, (h >> 64) as u64);
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
        self.words.allocated() * 8
    }

    /// The digest of the memory these hashes describe.
    pub fn digest(&self) -> [u8; 32] {
        self.digest_first(self.words.len() as u64 / 2)
    }

    /// The digest of the memory made of the first `pages` pages (guest memory, when disk
    /// pages follow it).
    pub fn digest_first(&self, pages: u64) -> [u8; 32] {
        let pages = (pages as usize).min(self.words.len() / 2);
        let mut words = self.words.iter().take(pages * 2);
        let hashes = std::iter::from_fn(|| {
            let lo = words.next()?;
            let hi = words.next()?;
            Some(u128::from(lo) | (u128::from(hi) << 64))
        });
        digest_of_page_hashes(self.page_size, (pages * self.page_size) as u64, hashes)
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
        for p in mem.chunks(PAGE_SIZE) {
            h.update(&twox_hash::XxHash3_128::oneshot(p).to_le_bytes());
        }
        assert_eq!(memory_digest(&mem, PAGE_SIZE), *h.finalize().as_bytes());
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
