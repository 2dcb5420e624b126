//! The sender's delta layer: XBZRLE-encodes dirty pages against a
//! [`PageCache`] and keeps the cache equal to what the destination holds.
//!
//! Consistency rules (every send path must follow one):
//! * identical page (delta of 0 bytes): nothing is sent, the entry's bytes are
//!   left alone ([`PageOutcome::Unchanged`]);
//! * delta sent: the entry becomes the encoded snapshot ([`PageOutcome::Delta`]);
//! * delta too large for the budget: the caller sends the page whole and the
//!   entry becomes the snapshot ([`PageOutcome::Overflow`]);
//! * page not cached: the caller sends it whole and the snapshot is inserted
//!   when its slot allows ([`PageOutcome::Miss`]);
//! * page sent as a zero page: [`DeltaEncoder::note_zero_page`];
//! * page sent raw or compressed by another path: [`DeltaEncoder::note_full_page`].
//!
//! The cache is always updated from the same snapshot that was encoded (the
//! caller passes it in; guest memory is never read twice), so a guest write
//! racing with the send cannot make the cache disagree with the destination.

use std::time::{Duration, Instant};

use vmstream_simd::AlignedBuf;

use crate::cache::{CacheStats, PageCache};
use crate::{encode, encode_compact};

/// What the sender must do with a page after [`DeltaEncoder::encode_page`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageOutcome {
    /// Identical to the cached copy: send nothing.
    Unchanged,
    /// Send the delta in `out[..n]`.
    Delta(usize),
    /// The delta does not fit the budget: send the page whole.
    Overflow,
    /// The page is not cached: send it whole.
    Miss,
}

impl PageOutcome {
    /// True when the caller must send the page's full contents.
    pub fn needs_full_page(self) -> bool {
        matches!(self, PageOutcome::Overflow | PageOutcome::Miss)
    }
}

/// Counters of a [`DeltaEncoder`] (QEMU's XBZRLE statistics and a few more).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaStats {
    /// The cache's counters.
    pub cache: CacheStats,
    /// Pages given to [`DeltaEncoder::encode_page`].
    pub pages: u64,
    /// Pages sent as a delta.
    pub delta_pages: u64,
    /// Bytes of the deltas sent.
    pub delta_bytes: u64,
    /// Pages identical to their cached copy.
    pub unchanged: u64,
    /// Pages whose delta did not fit the budget.
    pub overflows: u64,
    /// Pages not found in the cache.
    pub misses: u64,
    /// Zero pages noted.
    pub zero_pages: u64,
    /// Full pages noted from other send paths.
    pub full_pages: u64,
    /// Time spent encoding cache hits; measured only after
    /// [`DeltaEncoder::set_timing`]`(true)`.
    pub encode_time: Duration,
}

impl DeltaStats {
    /// QEMU's "encoding rate": page bytes sent as deltas per delta byte
    /// (0 when no delta was sent).
    pub fn encoding_rate(&self) -> f64 {
        if self.delta_bytes == 0 {
            0.0
        } else {
            (self.delta_pages * self.cache.page_size as u64) as f64 / self.delta_bytes as f64
        }
    }

    /// Page bytes encoded per second of encoding time (0 before any, or when
    /// timing is off).
    pub fn encode_bytes_per_sec(&self) -> f64 {
        let secs = self.encode_time.as_secs_f64();
        let encoded = self.delta_pages + self.unchanged + self.overflows;
        if secs == 0.0 {
            0.0
        } else {
            (encoded * self.cache.page_size as u64) as f64 / secs
        }
    }
}

/// Encodes pages against a [`PageCache`] following the module's consistency
/// rules. One per sending worker (it is `Send`; shard pages between workers so
/// each page always goes through the same encoder).
#[derive(Debug, Clone)]
pub struct DeltaEncoder {
    cache: PageCache,
    compact: bool,
    timing: bool,
    /// Reusable copy of a guest page for [`DeltaEncoder::encode_guest_page`].
    snapshot: AlignedBuf,
    stats: DeltaStats,
}

impl DeltaEncoder {
    /// An encoder over `cache` emitting QEMU's canonical encoding.
    pub fn new(cache: PageCache) -> Self {
        let snapshot = AlignedBuf::zeroed(cache.page_size());
        DeltaEncoder {
            cache,
            compact: false,
            timing: false,
            snapshot,
            stats: DeltaStats::default(),
        }
    }

    /// Chooses [`crate::encode_compact`] (smaller deltas, still decodable by
    /// QEMU) instead of QEMU's canonical [`crate::encode`].
    pub fn set_compact(&mut self, compact: bool) {
        self.compact = compact;
    }

    /// Measures the time spent encoding ([`DeltaStats::encode_time`]); off by
    /// default because it costs two clock reads per encoded page, a sizeable
    /// fraction of encoding a page with few changes.
    pub fn set_timing(&mut self, timing: bool) {
        self.timing = timing;
    }

    /// Starts generation `generation` (the dirty-sync round).
    pub fn set_generation(&mut self, generation: u64) {
        self.cache.set_generation(generation);
    }

    /// Encodes `snapshot`, the contents of page `page` being sent, against
    /// the cached copy into `out`, whose length is the delta budget.
    ///
    /// * `Unchanged`: nothing to send; the entry's bytes are untouched.
    /// * `Delta(n)`: send `out[..n]`; the entry now equals `snapshot`.
    /// * `Overflow`: send `snapshot` whole; the entry now equals `snapshot`.
    /// * `Miss`: send `snapshot` whole; it was cached if its slot allowed.
    ///
    /// # Panics
    /// When `snapshot.len()` is not the cache's page size.
    pub fn encode_page(&mut self, page: u64, snapshot: &[u8], out: &mut [u8]) -> PageOutcome {
        assert_eq!(
            snapshot.len(),
            self.cache.page_size(),
            "snapshot is not one page"
        );
        self.stats.pages += 1;
        let Some(slot) = self.cache.lookup(page) else {
            self.stats.misses += 1;
            if let (_, Some(slot)) = self.cache.claim(page) {
                self.cache.slot_data_mut(slot).copy_from_slice(snapshot);
            }
            return PageOutcome::Miss;
        };
        let cached = self.cache.slot_data_mut(slot);
        let start = self.timing.then(Instant::now);
        let result = if self.compact {
            encode_compact(cached, snapshot, out)
        } else {
            encode(cached, snapshot, out)
        };
        if let Some(start) = start {
            self.stats.encode_time += start.elapsed();
        }
        match result {
            Ok(0) => {
                self.stats.unchanged += 1;
                PageOutcome::Unchanged
            }
            Ok(n) => {
                cached.copy_from_slice(snapshot);
                self.stats.delta_pages += 1;
                self.stats.delta_bytes += n as u64;
                PageOutcome::Delta(n)
            }
            // Overflow, or any other refusal: the page goes whole, so the
            // destination will hold exactly `snapshot`.
            Err(_) => {
                cached.copy_from_slice(snapshot);
                self.stats.overflows += 1;
                PageOutcome::Overflow
            }
        }
    }

    /// Copies `guest` (live guest memory that may change concurrently) into
    /// an internal snapshot, encodes that like [`DeltaEncoder::encode_page`],
    /// and returns the outcome with the snapshot, which is what the caller
    /// must send when the page goes whole.
    ///
    /// # Panics
    /// When `guest.len()` is not the cache's page size.
    pub fn encode_guest_page(
        &mut self,
        page: u64,
        guest: &[u8],
        out: &mut [u8],
    ) -> (PageOutcome, &[u8]) {
        let mut snapshot = std::mem::take(&mut self.snapshot);
        snapshot.copy_from_slice(guest);
        let outcome = self.encode_page(page, &snapshot, out);
        self.snapshot = snapshot;
        (outcome, &self.snapshot)
    }

    /// Records that `page` was sent as a zero page: its entry becomes zeros
    /// (inserted when its slot allows).
    pub fn note_zero_page(&mut self, page: u64) {
        self.stats.zero_pages += 1;
        if let (_, Some(slot)) = self.cache.claim(page) {
            self.cache.slot_data_mut(slot).fill(0);
        }
    }

    /// Records that `snapshot` was sent whole for `page` by a path other than
    /// [`DeltaEncoder::encode_page`] (raw or compressed): its entry becomes
    /// `snapshot` (inserted when its slot allows).
    ///
    /// # Panics
    /// When `snapshot.len()` is not the cache's page size.
    pub fn note_full_page(&mut self, page: u64, snapshot: &[u8]) {
        self.stats.full_pages += 1;
        self.cache.insert(page, snapshot);
    }

    /// Counters so far, including the cache's.
    pub fn stats(&self) -> DeltaStats {
        DeltaStats {
            cache: self.cache.stats(),
            ..self.stats
        }
    }

    /// The cache.
    pub fn cache(&self) -> &PageCache {
        &self.cache
    }

    /// Gives the cache back.
    pub fn into_cache(self) -> PageCache {
        self.cache
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn encoder_is_send() {
        assert_send::<DeltaEncoder>();
    }
}
