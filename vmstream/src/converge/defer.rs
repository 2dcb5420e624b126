//! Hot-page deferral: hold back the pages of the hottest segments for a round.
//!
//! Guest memory is split into segments (2 MiB by default). Before each round the pages
//! dirtied since the last sync are counted per segment (the segment's *heat*); the dirty
//! pages of the hottest `percent` of all segments stay dirty and are not sent this round,
//! since they will most likely be written again before the round ends. A deferred page
//! written again while deferred is a page not sent twice: [`HotPageDeferral::saved_bytes`].
//!
//! Deferral stops for good once the remaining dirty data falls under `stop_below` (10%) of
//! guest memory, a segment is never deferred more than `max_consecutive` rounds in a row,
//! and [`HotPageDeferral::finish`] hands back everything at the switchover, so no page is
//! deferred forever.

use crate::converge::SettingError;
use crate::memory::merge_pages;

/// Deferral settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeferConfig {
    /// Percent of all guest segments deferred (the hottest ones with dirty pages), 0..=100.
    pub percent: f64,
    /// Segment size in bytes (a multiple of the page size).
    pub segment_bytes: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Deferral stops once the dirty data is under this fraction of guest memory.
    pub stop_below: f64,
    /// Largest number of consecutive rounds a segment is deferred.
    pub max_consecutive: u32,
}

impl DeferConfig {
    /// Defers the hottest `percent` of 2 MiB segments of 4 KiB pages, stops under 10%.
    pub fn new(percent: f64) -> DeferConfig {
        DeferConfig {
            percent,
            segment_bytes: 2 << 20,
            page_size: crate::memory::PAGE_SIZE as u64,
            stop_below: 0.10,
            max_consecutive: 8,
        }
    }
}

/// Bad deferral input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeferError {
    /// A setting is out of range.
    #[error(transparent)]
    Setting(#[from] SettingError),
    /// The segment size is not a positive multiple of the page size.
    #[error(
        "segment size {segment_bytes} is not a positive multiple of the page size {page_size}"
    )]
    SegmentSize {
        /// Segment size.
        segment_bytes: u64,
        /// Page size.
        page_size: u64,
    },
    /// A dirty page number beyond guest memory.
    #[error("dirty page {page} is beyond guest memory ({guest_pages} pages)")]
    PageOutOfRange {
        /// The page.
        page: u64,
        /// Pages of guest memory.
        guest_pages: u64,
    },
}

/// One round's split of the dirty pages (both sorted, disjoint).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    /// Send these this round.
    pub send_now: Vec<u64>,
    /// Keep these dirty for a later round.
    pub deferred: Vec<u64>,
}

/// Hot-page deferral across rounds; carries the deferred pages itself.
#[derive(Debug, Clone)]
pub struct HotPageDeferral {
    cfg: DeferConfig,
    guest_pages: u64,
    pages_per_segment: u64,
    /// Deferred last round, sorted: still dirty.
    carried: Vec<u64>,
    /// Consecutive rounds each segment has been deferred.
    streak: Vec<u32>,
    heat: Vec<u32>,
    stopped: bool,
    saved_pages: u64,
    deferred_pages: u64,
    rounds_deferring: u64,
}

impl HotPageDeferral {
    /// Deferral over `guest_pages` pages.
    pub fn new(cfg: DeferConfig, guest_pages: u64) -> Result<HotPageDeferral, DeferError> {
        if !(0.0..=100.0).contains(&cfg.percent) {
            return Err(SettingError::OutOfRange {
                name: "defer-hot percent",
                value: cfg.percent,
                range: "[0, 100]",
            }
            .into());
        }
        if !(0.0..=1.0).contains(&cfg.stop_below) {
            return Err(SettingError::OutOfRange {
                name: "stop_below",
                value: cfg.stop_below,
                range: "[0, 1]",
            }
            .into());
        }
        if cfg.page_size == 0
            || cfg.segment_bytes == 0
            || !cfg.segment_bytes.is_multiple_of(cfg.page_size)
        {
            return Err(DeferError::SegmentSize {
                segment_bytes: cfg.segment_bytes,
                page_size: cfg.page_size,
            });
        }
        let pages_per_segment = cfg.segment_bytes / cfg.page_size;
        let segments = guest_pages.div_ceil(pages_per_segment) as usize;
        Ok(HotPageDeferral {
            cfg,
            guest_pages,
            pages_per_segment,
            carried: Vec::new(),
            streak: vec![0; segments],
            heat: vec![0; segments],
            stopped: cfg.percent == 0.0,
            saved_pages: 0,
            deferred_pages: 0,
            rounds_deferring: 0,
        })
    }

    /// Splits the dirty pages for the next round: `newly_dirty` (pages written since the
    /// last sync, any order, duplicates allowed) plus the pages deferred last round.
    pub fn split(&mut self, newly_dirty: &[u64]) -> Result<Split, DeferError> {
        let newly = self.normalise(newly_dirty)?;
        self.saved_pages += count_common(&self.carried, &newly);
        let dirty = merge_pages(&self.carried, &newly);
        let remaining = dirty.len() as f64 * self.cfg.page_size as f64;
        let memory = self.guest_pages as f64 * self.cfg.page_size as f64;
        if !self.stopped && remaining < self.cfg.stop_below * memory {
            self.stopped = true;
        }
        if self.stopped {
            self.carried.clear();
            self.streak.iter_mut().for_each(|s| *s = 0);
            return Ok(Split {
                send_now: dirty,
                deferred: Vec::new(),
            });
        }
        let hot = self.hottest(&newly);
        let mut split = Split::default();
        for p in dirty {
            if hot[self.segment(p)] {
                split.deferred.push(p);
            } else {
                split.send_now.push(p);
            }
        }
        for (s, h) in self.streak.iter_mut().zip(&hot) {
            *s = if *h { *s + 1 } else { 0 };
        }
        if !split.deferred.is_empty() {
            self.rounds_deferring += 1;
        }
        self.deferred_pages += split.deferred.len() as u64;
        self.carried.clone_from(&split.deferred);
        Ok(split)
    }

    /// At the switchover: everything still dirty (deferred pages included), sorted; no
    /// deferral afterwards.
    pub fn finish(&mut self, newly_dirty: &[u64]) -> Result<Vec<u64>, DeferError> {
        self.stopped = true;
        self.split(newly_dirty).map(|s| s.send_now)
    }

    /// Pages still unsent after a round that found `newly_dirty` (sorted, without
    /// duplicates): those and the pages deferred last round.
    pub fn unsent_pages(&self, newly_dirty: &[u64]) -> u64 {
        (self.carried.len() + newly_dirty.len()) as u64 - count_common(&self.carried, newly_dirty)
    }

    /// Bytes not sent twice: deferred pages written again before they were sent.
    pub fn saved_bytes(&self) -> u64 {
        self.saved_pages * self.cfg.page_size
    }

    /// Page-rounds of deferral so far (a page deferred in two rounds counts twice).
    pub fn deferred_pages(&self) -> u64 {
        self.deferred_pages
    }

    /// Rounds in which something was deferred.
    pub fn rounds_deferring(&self) -> u64 {
        self.rounds_deferring
    }

    /// Whether deferral has stopped for good.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Pages deferred last round (still dirty), sorted.
    pub fn carried(&self) -> &[u64] {
        &self.carried
    }

    fn segment(&self, page: u64) -> usize {
        (page / self.pages_per_segment) as usize
    }

    fn normalise(&self, pages: &[u64]) -> Result<Vec<u64>, DeferError> {
        if let Some(&page) = pages.iter().find(|&&p| p >= self.guest_pages) {
            return Err(DeferError::PageOutOfRange {
                page,
                guest_pages: self.guest_pages,
            });
        }
        let mut v = pages.to_vec();
        v.sort_unstable();
        v.dedup();
        Ok(v)
    }

    /// Marks the hottest segments to defer: the top `percent` of all segments by pages
    /// written since the last sync (ties to the lower address), among those with heat and
    /// under the consecutive-round cap.
    fn hottest(&mut self, newly: &[u64]) -> Vec<bool> {
        self.heat.iter_mut().for_each(|h| *h = 0);
        for &p in newly {
            let s = self.segment(p);
            self.heat[s] += 1;
        }
        let quota = (self.cfg.percent / 100.0 * self.heat.len() as f64).ceil() as usize;
        let mut candidates: Vec<usize> = (0..self.heat.len())
            .filter(|&s| self.heat[s] > 0 && self.streak[s] < self.cfg.max_consecutive)
            .collect();
        candidates.sort_by(|&a, &b| self.heat[b].cmp(&self.heat[a]).then(a.cmp(&b)));
        let mut hot = vec![false; self.heat.len()];
        for s in candidates.into_iter().take(quota) {
            hot[s] = true;
        }
        hot
    }
}

/// Elements in both sorted, deduplicated lists.
fn count_common(a: &[u64], b: &[u64]) -> u64 {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4 segments of 4 pages.
    fn small(percent: f64) -> HotPageDeferral {
        let cfg = DeferConfig {
            percent,
            segment_bytes: 4 * 4096,
            page_size: 4096,
            stop_below: 0.10,
            max_consecutive: 2,
        };
        HotPageDeferral::new(cfg, 16).unwrap()
    }

    #[test]
    fn defers_the_hottest_segment_and_counts_savings() {
        let mut d = small(25.0); // one segment of four
                                 // Segment 1 has 3 dirty pages, segment 0 one, segment 3 two.
        let s = d.split(&[5, 0, 6, 7, 12, 13]).unwrap();
        assert_eq!(s.deferred, vec![5, 6, 7]);
        assert_eq!(s.send_now, vec![0, 12, 13]);
        // Page 5 and 6 written again while deferred: two pages saved. Segment 3 is
        // hottest now (3 pages); segment 1 has 2 new.
        let s = d.split(&[5, 6, 12, 14, 15]).unwrap();
        assert_eq!(d.saved_bytes(), 2 * 4096);
        assert_eq!(s.deferred, vec![12, 14, 15]);
        assert_eq!(s.send_now, vec![5, 6, 7]);
        assert_eq!(d.carried(), &[12, 14, 15]);
        // Switchover: everything.
        assert_eq!(d.finish(&[1]).unwrap(), vec![1, 12, 14, 15]);
        assert!(d.carried().is_empty());
        assert!(d.is_stopped());
    }

    #[test]
    fn stops_under_ten_percent_for_good() {
        let mut d = small(50.0);
        // One dirty page of 16 (6.25%) < 10%: stop.
        let s = d.split(&[3]).unwrap();
        assert_eq!(s.send_now, vec![3]);
        assert!(d.is_stopped());
        let s = d.split(&[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
        assert!(s.deferred.is_empty());
    }

    #[test]
    fn consecutive_cap_releases_a_segment() {
        let mut d = small(25.0);
        for round in 0..6 {
            let s = d.split(&[0, 1, 2, 8]).unwrap();
            // Deferred two rounds, then sent once, and so on.
            let deferred = round % 3 != 2;
            assert_eq!(s.deferred.contains(&0), deferred, "round {round}");
        }
    }

    #[test]
    fn bad_input_gives_typed_errors() {
        let mut d = small(25.0);
        assert_eq!(
            d.split(&[16]),
            Err(DeferError::PageOutOfRange {
                page: 16,
                guest_pages: 16
            })
        );
        let mut cfg = DeferConfig::new(10.0);
        cfg.segment_bytes = 5000;
        assert!(matches!(
            HotPageDeferral::new(cfg, 100),
            Err(DeferError::SegmentSize { .. })
        ));
        assert!(matches!(
            HotPageDeferral::new(DeferConfig::new(101.0), 100),
            Err(DeferError::Setting(_))
        ));
        assert!(matches!(
            HotPageDeferral::new(DeferConfig::new(f64::NAN), 100),
            Err(DeferError::Setting(_))
        ));
    }

    #[test]
    fn zero_percent_never_defers() {
        let mut d = small(0.0);
        let s = d.split(&[0, 1, 2, 3, 4, 5, 6]).unwrap();
        assert!(s.deferred.is_empty());
        assert_eq!(s.send_now.len(), 7);
    }
}
