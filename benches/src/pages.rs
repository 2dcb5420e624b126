//! Page sets for the kernel benchmarks: synthetic (old, new) pairs of the
//! shapes the issue names, and pairs sampled from the real corpora. Each set
//! is walked round-robin, one page per iteration, so timings include memory
//! traffic the way a migration sees it.

use std::io;

use vmstream_simd::AlignedBuf;

use crate::{page_pairs, Corpus};

/// Page size of every set.
pub const PAGE: usize = 4096;
/// Bytes per buffer of a warm set (the 4 MiB).
pub const WARM: usize = 4 << 20;
/// Bytes of a cold set (the 64 MiB).
pub const COLD: usize = 64 << 20;

/// Deterministic xorshift, so every run measures the same bytes.
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Changes `b` to a different value.
    pub fn flip(&mut self, b: &mut u8) {
        *b = b.wrapping_add(1 + (self.next_u64() % 255) as u8);
    }
}

/// Pairs of pages, `pages` of them, stored back to back.
///
/// Both buffers start on a cache line, like the pages the encoder sees in a
/// migration (page-aligned guest memory against vmstream's aligned page
/// cache); `vec!` would place them 16 bytes past one.
pub struct PageSet {
    /// Old pages.
    pub old: AlignedBuf,
    /// New pages.
    pub new: AlignedBuf,
    /// Number of pairs.
    pub pages: usize,
}

impl PageSet {
    /// `bytes / PAGE` pairs of random old pages whose new page is `mutate(old)`.
    pub fn synthetic(bytes: usize, mut mutate: impl FnMut(&mut [u8], &mut Rng)) -> PageSet {
        let pages = bytes / PAGE;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let old: Vec<u8> = (0..bytes).map(|_| rng.next_u64() as u8).collect();
        let old = AlignedBuf::copy_of(&old);
        let mut new = old.clone();
        for p in new.chunks_exact_mut(PAGE) {
            mutate(p, &mut rng);
        }
        PageSet { old, new, pages }
    }

    /// A warm set of evenly spaced consecutive-round pairs of `corpus`.
    pub fn from_corpus(corpus: &Corpus) -> io::Result<PageSet> {
        let pairs = page_pairs(corpus, None)?;
        let want = (WARM / PAGE).min(pairs.len());
        let picked = (0..want).map(|k| &pairs[k * pairs.len() / want]);
        let (mut old, mut new) = (
            AlignedBuf::zeroed(want * PAGE),
            AlignedBuf::zeroed(want * PAGE),
        );
        for (k, (o, n)) in picked.enumerate() {
            old[k * PAGE..(k + 1) * PAGE].copy_from_slice(o);
            new[k * PAGE..(k + 1) * PAGE].copy_from_slice(n);
        }
        Ok(PageSet {
            old,
            new,
            pages: want,
        })
    }

    /// Old page `i`.
    pub fn old_page(&self, i: usize) -> &[u8] {
        &self.old[i * PAGE..(i + 1) * PAGE]
    }

    /// New page `i`.
    pub fn new_page(&self, i: usize) -> &[u8] {
        &self.new[i * PAGE..(i + 1) * PAGE]
    }
}

/// A named way to derive a new page from an old one.
pub type Mutation = (&'static str, fn(&mut [u8], &mut Rng));

/// The synthetic XBZRLE cases of the issue: identical, 1 byte, 16 scattered
/// bytes, 64 contiguous bytes, 5% and 50% of the bytes at random.
pub const XBZRLE_CASES: [Mutation; 6] = [
    ("identical", |_, _| {}),
    ("1_byte", |p, r| {
        let k = r.below(p.len());
        r.flip(&mut p[k]);
    }),
    ("16_scattered", |p, r| {
        for _ in 0..16 {
            let k = r.below(p.len());
            r.flip(&mut p[k]);
        }
    }),
    ("64_contiguous", |p, r| {
        let s = r.below(p.len() - 64);
        for b in &mut p[s..s + 64] {
            r.flip(b);
        }
    }),
    ("5pct_random", |p, r| percent(p, r, 5)),
    ("50pct_random", |p, r| percent(p, r, 50)),
];

fn percent(p: &mut [u8], r: &mut Rng, pct: usize) {
    for b in p.iter_mut() {
        if r.below(100) < pct {
            r.flip(b);
        }
    }
}

/// The `is_zero` cases: how each page of the set is filled.
pub const IS_ZERO_CASES: [Mutation; 4] = [
    ("all_zero", |_, _| {}),
    ("first_byte", |p, _| p[0] = 1),
    ("byte_3800", |p, _| p[3800] = 1),
    ("random", |p, r| {
        p.iter_mut().for_each(|b| *b = r.next_u64() as u8 | 1)
    }),
];

/// A buffer of `bytes / PAGE` pages, each filled by `fill` from zero.
///
/// Every byte is written, zeros included: an untouched zeroed allocation is
/// backed by the kernel's shared zero page (4 KiB, always in L1) or huge
/// zero page (2 MiB), so scanning it would measure neither a warm nor a
/// cold set of distinct pages the way guest memory is.
pub fn filled(bytes: usize, fill: fn(&mut [u8], &mut Rng)) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(bytes);
    buf.fill(1);
    std::hint::black_box(&mut buf[..]).fill(0);
    let mut rng = Rng(1);
    buf.chunks_exact_mut(PAGE).for_each(|p| fill(p, &mut rng));
    buf
}
