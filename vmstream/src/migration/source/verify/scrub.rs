//! The scrubber: a background thread that re-reads, pass after pass, the pages of the
//! running guest the tracker calls clean and compares them with what was sent. A page that
//! differs is a suspect: a write the tracker must report at one of its next two
//! collections (see [`super::Verification::after_collect`]), or a tracking error.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::memory::{page_is_hole, MemoryFiles, MemoryReader, PAGE_SIZE};
use crate::migration::transport::TokenBucket;

use super::sent::{ScrubRead, SentPages};

/// A page that differed from what was sent, and the number of collections that had
/// completed when the scrubber saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suspect {
    /// The page.
    pub page: u64,
    /// Collections completed before the difference was seen.
    pub epoch: u64,
}

/// State shared by the scrubber thread and the source.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) stop: AtomicBool,
    /// Collections completed ([`super::Verification::after_collect`] counts them).
    pub(super) epoch: AtomicU64,
    pub(super) suspects: Mutex<Vec<Suspect>>,
    /// When the last complete pass started.
    pub(super) last_pass_start: Mutex<Option<Instant>>,
    /// Pages read (or checked as holes), for the statistics.
    pub(super) pages_scrubbed: AtomicU64,
}

/// The running scrubber thread.
pub(super) struct Scrubber {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Scrubber {
    /// Starts scrubbing the guest memory `reader` reads (its files `files`, for the holes)
    /// against `sent`, at most `bytes_per_s` (None: as fast as it can).
    pub(super) fn start(
        sent: Arc<SentPages>,
        reader: MemoryReader,
        files: MemoryFiles,
        bytes_per_s: Option<u64>,
        shared: Arc<Shared>,
    ) -> std::io::Result<Scrubber> {
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("vmstream-scrub".into())
            .spawn(move || run(&sent, &reader, &files, bytes_per_s, &s))?;
        Ok(Scrubber {
            shared,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it (within one page).
    pub(super) fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Scrubber {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Pages scrubbed between checks of the clock (and of the stop flag).
const CHUNK: u64 = 256;

fn run(
    sent: &SentPages,
    reader: &MemoryReader,
    files: &MemoryFiles,
    bytes_per_s: Option<u64>,
    shared: &Shared,
) {
    let pages = sent.pages();
    let len = pages as usize * PAGE_SIZE;
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut pace = bytes_per_s.filter(|&r| r > 0).map(TokenBucket::new);
    while !shared.stop.load(Ordering::Acquire) {
        let pass_start = Instant::now();
        // Holes read as zero without being read (reading one would allocate it); a page
        // written since this bitmap was taken is read on the next pass.
        // (pages past the memory's files, if any, count as holes, as they always did)
        let data = files.data_pages().ok().map(|mut d| {
            d.resize(len.div_ceil(PAGE_SIZE).div_ceil(64), 0);
            d
        });
        let mut p = 0;
        while p < pages {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            let end = (p + CHUNK).min(pages);
            for page in p..end {
                let hole = data.as_deref().is_some_and(|d| page_is_hole(d, page));
                let r = sent.scrub(page, hole, &mut buf, |pg, b| reader.read_page(pg, b));
                if r == ScrubRead::Differs {
                    let epoch = shared.epoch.load(Ordering::Acquire);
                    let mut s = shared.suspects.lock().expect("suspects");
                    s.push(Suspect { page, epoch });
                }
            }
            shared.pages_scrubbed.fetch_add(end - p, Ordering::Relaxed);
            if let Some(bucket) = &mut pace {
                let now = Instant::now();
                let until = now + bucket.take_at((end - p) as usize * PAGE_SIZE, now);
                while let Some(wait) = until
                    .checked_duration_since(Instant::now())
                    .filter(|w| !w.is_zero())
                {
                    if shared.stop.load(Ordering::Acquire) {
                        return;
                    }
                    std::thread::sleep(wait.min(Duration::from_millis(20)));
                }
            }
            p = end;
        }
        *shared.last_pass_start.lock().expect("pass start") = Some(pass_start);
    }
}
