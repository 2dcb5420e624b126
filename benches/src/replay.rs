//! Replays a corpus through the sender's XBZRLE page cache the way a pre-copy
//! migration would, to measure cache hit rates and bytes on the wire.
//!
//! Generation `r` is round `r`. Round 0 sends every page (zero pages as zero
//! pages, the rest whole) and, when [`Replay::bulk_insert`] is set, caches
//! them all; QEMU instead skips its cache during that first bulk pass.
//! Rounds `1..` send only the pages the round changed: zero pages as zero
//! pages, the others through [`DeltaEncoder::encode_page`] with a delta
//! budget of one page (QEMU's): a hit sends the delta, a miss or an overflow
//! sends the page whole.

use std::io;

use vmstream_simd::is_zero;
use vmstream_xbzrle::{DeltaEncoder, DeltaStats, Layout, PageCache, PageOutcome};

use crate::corpus::{Corpus, Round};

/// A corpus held in memory: its base image and every delta round.
pub struct LoadedCorpus {
    /// The corpus's metadata.
    pub corpus: Corpus,
    /// Round-0 image.
    pub base: Vec<u8>,
    /// Rounds `1..=round_count`, in order.
    pub rounds: Vec<Round>,
}

impl LoadedCorpus {
    /// Reads the base image and all rounds of `corpus`.
    pub fn load(corpus: Corpus) -> io::Result<LoadedCorpus> {
        let base = corpus.base()?;
        let rounds = (1..=corpus.round_count())
            .map(|i| corpus.round(i))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(LoadedCorpus {
            corpus,
            base,
            rounds,
        })
    }

    /// Page-sized delta-round pages that are not all zero.
    pub fn nonzero_dirty_pages(&self) -> u64 {
        self.rounds
            .iter()
            .map(|r| r.iter().filter(|(_, p)| !is_zero(p)).count() as u64)
            .sum()
    }
}

/// How to replay.
#[derive(Debug, Clone, Copy)]
pub struct Replay {
    /// Cache capacity in bytes.
    pub capacity_bytes: usize,
    /// Cache layout.
    pub layout: Layout,
    /// Cache every page sent in round 0 (else the cache starts in round 1).
    pub bulk_insert: bool,
}

/// What a replay sent in rounds `1..`.
#[derive(Debug, Clone, Copy)]
pub struct ReplayResult {
    /// Encoder and cache counters at the end (round-0 inserts included in
    /// the cache's insert counts; lookups happen only in rounds `1..`).
    pub stats: DeltaStats,
    /// Changed pages that were all zero (sent as zero pages).
    pub zero_pages: u64,
    /// Payload bytes of rounds `1..`: deltas, plus a whole page for every
    /// miss and overflow; zero pages count 0.
    pub wire_bytes: u64,
    /// Payload bytes of rounds `1..` without XBZRLE (a whole page for every
    /// non-zero changed page).
    pub raw_bytes: u64,
}

impl ReplayResult {
    /// Cache hits over lookups in rounds `1..`.
    pub fn hit_rate(&self) -> f64 {
        self.stats.cache.hit_rate()
    }
}

/// Runs one replay of `data` with `config`.
pub fn replay(data: &LoadedCorpus, config: Replay) -> ReplayResult {
    let page_size = data.corpus.page_size;
    let cache = PageCache::with_layout(config.capacity_bytes, page_size, config.layout)
        .expect("replay cache configuration");
    let mut encoder = DeltaEncoder::new(cache);
    if config.bulk_insert {
        for (i, page) in data.base.chunks_exact(page_size).enumerate() {
            if is_zero(page) {
                encoder.note_zero_page(i as u64);
            } else {
                encoder.note_full_page(i as u64, page);
            }
        }
    }
    let mut out = vec![0u8; page_size];
    let mut result = ReplayResult {
        stats: DeltaStats::default(),
        zero_pages: 0,
        wire_bytes: 0,
        raw_bytes: 0,
    };
    for round in &data.rounds {
        encoder.set_generation(round.index as u64);
        for (page, contents) in round.iter() {
            if is_zero(contents) {
                encoder.note_zero_page(u64::from(page));
                result.zero_pages += 1;
                continue;
            }
            result.raw_bytes += page_size as u64;
            result.wire_bytes += match encoder.encode_page(u64::from(page), contents, &mut out) {
                PageOutcome::Unchanged => 0,
                PageOutcome::Delta(n) => n as u64,
                PageOutcome::Overflow | PageOutcome::Miss => page_size as u64,
            };
        }
    }
    result.stats = encoder.stats();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real corpora replayed with a cache that holds every page hit on
    /// every non-zero dirty page after round 0, and never overflows more
    /// pages than it encodes.
    #[test]
    fn unbounded_cache_hits_every_dirty_page() {
        let Some(corpus) = Corpus::open_named("pg-pgbench") else {
            eprintln!("skipping: corpus pg-pgbench not available");
            return;
        };
        let data = LoadedCorpus::load(corpus).unwrap();
        let pages = data.corpus.pages;
        let config = Replay {
            capacity_bytes: pages * data.corpus.page_size,
            layout: Layout::DirectMapped,
            bulk_insert: true,
        };
        let r = replay(&data, config);
        let nonzero = data.nonzero_dirty_pages();
        assert_eq!(r.stats.cache.hits, nonzero);
        assert_eq!(r.stats.cache.misses, 0);
        assert_eq!(r.stats.cache.evictions + r.stats.cache.refused, 0);
        assert_eq!(r.raw_bytes, nonzero * 4096);
        assert_eq!(r.stats.unchanged, 0, "listed pages always differ");
        assert!(r.wire_bytes < r.raw_bytes);
    }
}
