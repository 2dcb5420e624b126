//! What the source sent: the hash of every page as its last snapshot was encoded, recorded
//! by whoever copied the snapshot (an encode worker, the sending thread, or the final round
//! from frozen memory), with the per-page state the scrubber needs to read pages without
//! racing a send.

use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Arc;

use vmstream_codec::PageSource;

use crate::memory::{MemoryReader, PAGE_SIZE};
use crate::migration::digest::{page_hash, PageHashes};

/// The page was collected dirty and not sent since: its sent hash is stale on purpose.
const PENDING: u32 = 1;
/// A send is recording the page's hash right now.
const WRITING: u32 = 2;
/// The scrubber found the page equal to its sent hash since it was last sent.
const VERIFIED: u32 = 4;
/// The rest of the word counts the page's sends (wrapping): a scrub read that saw the same
/// count before and after read no send in between.
const SEND_ONE: u32 = 8;

/// The result of comparing one page of the running guest with its sent hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScrubRead {
    /// Equal to what was sent (now marked verified).
    Clean,
    /// Different from what was sent, with no send or collection in between: a write the
    /// tracker must still report.
    Differs,
    /// Pending, or sent while it was read: nothing learnt.
    Skipped,
}

/// Per-page hashes of what was sent, and per-page send state.
pub struct SentPages {
    hashes: PageHashes,
    state: Vec<AtomicU32>,
}

impl SentPages {
    /// `pages` pages, all taken as sent zero (what the destination's fresh image holds).
    pub fn new(pages: u64) -> SentPages {
        SentPages {
            hashes: PageHashes::zeroed(pages, PAGE_SIZE),
            state: (0..pages).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.state.len() as u64
    }

    /// Records that `snapshot` is what was sent of `page` (the bytes the encoder saw).
    /// Pages are recorded by one thread at a time each (a round sends a page once).
    pub fn record(&self, page: u64, snapshot: &[u8]) {
        let Some(st) = self.state.get(page as usize) else {
            return;
        };
        let before = st.fetch_or(WRITING, Ordering::AcqRel);
        self.hashes.update(page, snapshot);
        // A new send count, neither pending nor verified.
        let sends = (before & !(SEND_ONE - 1)).wrapping_add(SEND_ONE);
        st.store(sends, Ordering::Release);
    }

    /// Marks `pages` (collected dirty) pending until they are sent again.
    pub fn mark_pending(&self, pages: &[u64]) {
        for &p in pages {
            if let Some(st) = self.state.get(p as usize) {
                st.fetch_or(PENDING, Ordering::AcqRel);
            }
        }
    }

    /// Compares page `page` as `read` copies it now with its sent hash (a seqlock read:
    /// a send during the copy makes the result [`ScrubRead::Skipped`]). `is_hole`: the page
    /// is a hole of the memory file, zero without being read.
    pub fn scrub(
        &self,
        page: u64,
        is_hole: bool,
        buf: &mut [u8],
        read: impl FnOnce(u64, &mut [u8]),
    ) -> ScrubRead {
        let Some(st) = self.state.get(page as usize) else {
            return ScrubRead::Skipped;
        };
        let before = st.load(Ordering::Acquire);
        if before & (PENDING | WRITING) != 0 {
            return ScrubRead::Skipped;
        }
        let now = if is_hole {
            self.hashes.zero_page_hash()
        } else {
            read(page, buf);
            page_hash(buf)
        };
        let sent = self.hashes.get(page);
        fence(Ordering::Acquire);
        let after = st.load(Ordering::Relaxed);
        if after & !VERIFIED != before & !VERIFIED {
            return ScrubRead::Skipped;
        }
        if now != sent {
            return ScrubRead::Differs;
        }
        // Fails only if a send or a collection came in between: then nothing is learnt.
        let _ = st.compare_exchange(after, after | VERIFIED, Ordering::AcqRel, Ordering::Relaxed);
        ScrubRead::Clean
    }

    /// Pages the scrubber verified since their last send.
    pub fn verified_pages(&self) -> u64 {
        self.state
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) & VERIFIED != 0)
            .count() as u64
    }

    /// The hash of `page` as last sent.
    pub fn hash(&self, page: u64) -> u128 {
        self.hashes.get(page)
    }

    /// The hashes (for the digest of what was sent).
    pub fn hashes(&self) -> &PageHashes {
        &self.hashes
    }
}

/// A page source for the encode workers that records the hash of each snapshot it copies:
/// the worker hashes the page while it is in its cache.
pub struct RecordingReader {
    /// Where pages are copied from.
    pub reader: MemoryReader,
    /// Where their hashes go.
    pub sent: Arc<SentPages>,
}

impl PageSource for RecordingReader {
    fn read_page(&self, page: u64, out: &mut [u8]) {
        self.reader.read_page(page, out);
        self.sent.record(page, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    #[test]
    fn scrub_compares_with_what_was_sent_and_skips_pending_pages() {
        let sent = SentPages::new(4);
        let mut buf = page(0);
        // Never sent: taken as zero, so a zero page is clean and a hole too.
        assert_eq!(
            sent.scrub(0, false, &mut buf, |_, b| b.fill(0)),
            ScrubRead::Clean
        );
        assert_eq!(
            sent.scrub(1, true, &mut buf, |_, _| panic!("read a hole")),
            ScrubRead::Clean
        );
        assert_eq!(sent.verified_pages(), 2);
        sent.record(0, &page(7));
        assert_eq!(sent.verified_pages(), 1, "a send clears verified");
        assert_eq!(
            sent.scrub(0, false, &mut buf, |_, b| b.fill(7)),
            ScrubRead::Clean
        );
        assert_eq!(
            sent.scrub(0, false, &mut buf, |_, b| b.fill(8)),
            ScrubRead::Differs
        );
        sent.mark_pending(&[0]);
        assert_eq!(
            sent.scrub(0, false, &mut buf, |_, b| b.fill(8)),
            ScrubRead::Skipped
        );
        sent.record(0, &page(8));
        assert_eq!(
            sent.scrub(0, false, &mut buf, |_, b| b.fill(8)),
            ScrubRead::Clean
        );
        // Out of range: nothing, no panic.
        assert_eq!(
            sent.scrub(9, false, &mut buf, |_, _| ()),
            ScrubRead::Skipped
        );
        sent.record(9, &page(1));
    }

    #[test]
    fn a_send_during_the_read_makes_the_scrub_inconclusive() {
        let sent = SentPages::new(2);
        sent.record(1, &page(3));
        let mut buf = page(0);
        // The page changes and is sent again while the scrubber copies it.
        let r = sent.scrub(1, false, &mut buf, |p, b| {
            b.fill(4);
            sent.record(p, &page(4));
        });
        assert_eq!(r, ScrubRead::Skipped);
        assert_eq!(sent.hash(1), page_hash(&page(4)));
    }
}
