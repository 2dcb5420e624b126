//! The received workload's verify (`recv --resume`) without reading all of memory at the
//! pause.
//!
//! The destination runs the workload's verifier on the received image before it commits
//! (an image the guest could not resume from is never committed), and that check is
//! downtime. A full verify reads every block; here most of it happens during the live
//! rounds instead:
//!
//! - after each round's barrier a background thread checks the active blocks whose pages
//!   the codec applied since its last pass. It reads a copy of each block through a second,
//!   read-only mapping of the pending image (the next round may be writing meanwhile), runs
//!   the checks that need only the block (number, checksum, fill) on the copy and remembers
//!   the copy's page hashes with the result;
//! - at the pause, a block whose pages still have those hashes (the codec workers keep the
//!   page hashes current: [`PageHashes`]) holds exactly the bytes that were checked, so only
//!   its version is compared with the ledger. Other blocks, and the block the journal
//!   recovery rewrote, are checked from memory. Inactive blocks must hash as zero pages.
//!
//! Any failure falls back to the full verifier, which names the first bad block exactly.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use rayon::prelude::*;

use crate::layout::{get_u64, sb};
use crate::memory::{GuestMemory, MapMode, PAGE_SIZE};
use crate::migration::digest::PageHashes;
use crate::verify::{
    check_block_content, verify_sparse, BlockContent, Superblock, VerifyError, VerifyReport,
};

/// Pages the codec applied since the background verifier last looked (a bit per page).
pub struct TouchedPages(Vec<AtomicU64>);

impl TouchedPages {
    /// No page touched, for a memory of `pages` pages.
    pub fn new(pages: u64) -> TouchedPages {
        TouchedPages((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    /// Records that `page` was written.
    pub fn mark(&self, page: u64) {
        if let Some(w) = self.0.get((page / 64) as usize) {
            w.fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }

    /// Takes (and clears) the touched pages.
    fn take(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        for (i, w) in self.0.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::Relaxed);
            while bits != 0 {
                pages.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        pages
    }
}

/// What the background pass learned about one block.
#[derive(Clone, Copy, Debug, Default)]
struct Checked {
    /// Hashes of the block's pages (at most 2) in the copy that was checked.
    hashes: [u128; 2],
    /// The copy passed the block's own checks.
    content: Option<BlockContent>,
}

/// What the background passes learned: the superblock they read and a result per block.
type Learned = (Superblock, Vec<Checked>);

/// The background half: block results gathered during the live rounds.
pub struct BackgroundVerifier {
    kick: mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
    /// Passes completed (tests wait on it).
    passes: Arc<AtomicU64>,
    thread: Option<JoinHandle<Option<Learned>>>,
}

impl BackgroundVerifier {
    /// Starts the thread; `view` is a read-only mapping of the pending image.
    pub fn start(
        view: GuestMemory,
        touched: Arc<TouchedPages>,
    ) -> std::io::Result<BackgroundVerifier> {
        let (kick, kicks) = mpsc::channel::<()>();
        let stop = Arc::new(AtomicBool::new(false));
        let passes = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, passes) = (Arc::clone(&stop), Arc::clone(&passes));
            std::thread::Builder::new()
                .name("vmstream-verify".into())
                .spawn(move || background(view, &touched, &kicks, &stop, &passes))?
        };
        Ok(BackgroundVerifier {
            kick,
            stop,
            passes,
            thread: Some(thread),
        })
    }

    /// A round passed its barrier: check what it changed.
    pub fn round_applied(&self) {
        let _ = self.kick.send(());
    }

    /// Passes completed so far.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Acquire)
    }

    /// Stops the thread (a pass in progress is cut short) and returns what it learned.
    fn finish(mut self) -> Option<Learned> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.kick.send(());
        self.thread.take().and_then(|t| t.join().ok()).flatten()
    }
}

impl Drop for BackgroundVerifier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.kick.send(());
    }
}

fn background(
    view: GuestMemory,
    touched: &TouchedPages,
    kicks: &mpsc::Receiver<()>,
    stop: &AtomicBool,
    passes: &AtomicU64,
) -> Option<Learned> {
    let mut state: Option<Learned> = None;
    let mut head = vec![0u8; PAGE_SIZE];
    let mut block = Vec::new();
    while kicks.recv().is_ok() {
        while kicks.try_recv().is_ok() {}
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let pages = touched.take();
        view.read_at(0, &mut head);
        let Ok(s) = Superblock::read_head(&head, view.len()) else {
            continue; // not (yet) a consistent superblock: the pause decides
        };
        let g = s.geometry();
        if !matches!(&state, Some((old, _)) if same_layout(old, &s)) {
            // First pass (or the layout changed): every block is unchecked.
            state = Some((s.clone(), vec![Checked::default(); g.block_count as usize]));
        }
        let Some((_, checked)) = state.as_mut() else {
            continue;
        };
        let bs = g.block_size as usize;
        block.resize(bs, 0);
        let mut last = u64::MAX;
        for p in pages {
            if stop.load(Ordering::Relaxed) {
                return state;
            }
            let Some(b) = block_of_page(&s, p) else {
                continue;
            };
            if b == last || b >= s.active_blocks {
                continue;
            }
            last = b;
            view.read_at(g.block_offset(b), &mut block);
            checked[b as usize] = check_copy(&block, b, &s);
        }
        passes.fetch_add(1, Ordering::Release);
    }
    state
}

/// Checks a copy of block `b` and records its page hashes.
fn check_copy(block: &[u8], b: u64, s: &Superblock) -> Checked {
    let mut hashes = [0u128; 2];
    for (h, page) in hashes.iter_mut().zip(block.chunks(PAGE_SIZE)) {
        *h = crate::migration::digest::page_hash(page);
    }
    Checked {
        hashes,
        content: check_block_content(block, b, s).ok(),
    }
}

/// The block page `p` belongs to (None: superblock, ledger or tail).
fn block_of_page(s: &Superblock, p: u64) -> Option<u64> {
    let at = p * PAGE_SIZE as u64;
    let g = s.geometry();
    let b = at.checked_sub(g.data_offset)? / g.block_size;
    (b < g.block_count).then_some(b)
}

/// Whether two superblocks describe the same blocks (only the counters may differ).
fn same_layout(a: &Superblock, b: &Superblock) -> bool {
    a.kind == b.kind
        && a.geometry() == b.geometry()
        && a.active_blocks == b.active_blocks
        && a.seed == b.seed
}

/// Opens the read-only view the background verifier reads through.
pub fn open_view(path: &std::path::Path) -> Result<GuestMemory, crate::memory::MemoryError> {
    GuestMemory::open(path, MapMode::SharedReadOnly)
}

/// The verify at the pause: recovers the journal in `mem`, then checks every block using
/// what `background` learned, reading only blocks that changed since. `hashes` must describe
/// `mem` as the codec left it (before recovery); `data` is the image's data pages.
pub fn verify_at_pause(
    mem: &mut [u8],
    hashes: &PageHashes,
    background: Option<BackgroundVerifier>,
    data: Option<&[u64]>,
) -> Result<VerifyReport, VerifyError> {
    let learned = background.and_then(BackgroundVerifier::finish);
    let head = Superblock::read(mem)?;
    let journal_block =
        (get_u64(mem, sb::JOURNAL_SEQ) != 0).then(|| get_u64(mem, sb::JOURNAL_BLOCK));
    let replayed = crate::workload::recover(mem)?;
    let full = |mem: &mut [u8]| {
        verify_sparse(mem, data).map(|mut r| {
            r.replayed_journal = replayed;
            r
        })
    };
    let s = Superblock::read(mem)?;
    let Some((seen, checked)) = learned else {
        return full(mem);
    };
    if !same_layout(&seen, &s) || !same_layout(&head, &s) || s.journal_seq != 0 {
        return full(mem);
    }
    match quick(
        mem,
        &s,
        hashes,
        &checked,
        replayed.then_some(journal_block).flatten(),
    ) {
        Ok(()) => Ok(VerifyReport {
            kind: s.kind,
            blocks: s.block_count,
            active_blocks: s.active_blocks,
            tx_count: s.tx_count,
            replayed_journal: replayed,
        }),
        // The full verifier names the first bad block (and is the ground truth).
        Err(()) => full(mem),
    }
}

/// Every check of the full verifier, from page hashes and earlier results where they
/// still apply. `Err(())`: something failed (the caller finds out what).
fn quick(
    mem: &[u8],
    s: &Superblock,
    hashes: &PageHashes,
    checked: &[Checked],
    rewritten: Option<u64>,
) -> Result<(), ()> {
    let g = s.geometry();
    let bs = g.block_size as usize;
    let pages_per_block = bs / PAGE_SIZE;
    if pages_per_block > 2 {
        // Results remember two page hashes per block: larger blocks take the full verifier.
        return Err(());
    }
    let zero = hashes.zero_page_hash();
    const RANGE: u64 = 4096;
    let ranges: Vec<u64> = (0..g.block_count.div_ceil(RANGE)).collect();
    let sums: Vec<Result<u64, ()>> = ranges
        .par_iter()
        .map(|&r| {
            let mut sum = 0u64;
            for b in r * RANGE..((r + 1) * RANGE).min(g.block_count) {
                let ledger = get_u64(mem, g.ledger_entry(b));
                let off = g.block_offset(b);
                let first = (off / PAGE_SIZE) as u64;
                let mut now = [0u128; 2];
                for (j, h) in now.iter_mut().take(pages_per_block).enumerate() {
                    *h = hashes.get(first + j as u64);
                }
                if b >= s.active_blocks {
                    if ledger != 0 || now[..pages_per_block].iter().any(|&h| h != zero) {
                        return Err(());
                    }
                    continue;
                }
                let cached = checked
                    .get(b as usize)
                    .filter(|c| c.hashes == now && Some(b) != rewritten)
                    .and_then(|c| c.content);
                let content = match cached {
                    Some(c) => c,
                    None => check_block_content(&mem[off..off + bs], b, s).map_err(|_| ())?,
                };
                if content.version != ledger || ledger == 0 || content.last_tx > s.tx_count {
                    return Err(());
                }
                sum = sum.wrapping_add(ledger);
            }
            Ok(sum)
        })
        .collect();
    let mut ledger_sum = 0u64;
    for sum in sums {
        ledger_sum = ledger_sum.wrapping_add(sum?);
    }
    // Ledger slack (inside the last ledger page) and the tail after the last block: read.
    let ledger_end = g.ledger_entry(g.block_count);
    let tail = g.block_offset(g.block_count);
    let zero_bytes = |r: &[u8]| r.iter().all(|&x| x == 0);
    if !zero_bytes(&mem[ledger_end..g.data_offset as usize]) || !zero_bytes(&mem[tail..]) {
        return Err(());
    }
    if ledger_sum != s.active_blocks.wrapping_add(s.tx_count) {
        return Err(());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{format, Workload, WorkloadParams};

    const SIZE: u64 = 4 << 20;

    fn rehash(mem: &GuestMemory, hashes: &PageHashes, touched: &TouchedPages) {
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..mem.pages() {
            mem.read_at(p as usize * PAGE_SIZE, &mut page);
            let h = crate::migration::digest::page_hash(&page);
            if hashes.get(p) != h {
                hashes.update(p, &page);
                touched.mark(p);
            }
        }
    }

    fn run_pass(bg: &BackgroundVerifier) {
        let before = bg.passes();
        bg.round_applied();
        while bg.passes() == before {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn setup() -> (
        GuestMemory,
        Arc<PageHashes>,
        Arc<TouchedPages>,
        BackgroundVerifier,
    ) {
        let mut mem = GuestMemory::memfd("dest-verify", SIZE).unwrap();
        format(
            mem.as_mut_slice(),
            &WorkloadParams::new(crate::layout::WorkloadKind::Dbsim),
        )
        .unwrap();
        let hashes = Arc::new(PageHashes::zeroed(mem.pages(), PAGE_SIZE));
        let touched = Arc::new(TouchedPages::new(mem.pages()));
        rehash(&mem, &hashes, &touched);
        let view = open_view(mem.path()).unwrap();
        let bg = BackgroundVerifier::start(view, Arc::clone(&touched)).unwrap();
        (mem, hashes, touched, bg)
    }

    /// After background passes and more transactions, the pause-time verify agrees with the
    /// full verifier, for blocks checked in the background and blocks changed since.
    #[test]
    fn pause_verify_equals_the_full_verify() {
        let (mut mem, hashes, touched, bg) = setup();
        run_pass(&bg);
        {
            let mut w = Workload::attach(mem.as_mut_slice()).unwrap();
            for _ in 0..300 {
                w.step();
            }
        }
        rehash(&mem, &hashes, &touched);
        run_pass(&bg);
        {
            let mut w = Workload::attach(mem.as_mut_slice()).unwrap();
            for _ in 0..50 {
                w.step();
            }
        }
        rehash(&mem, &hashes, &touched);
        let full = crate::verify::verify(mem.as_mut_slice()).unwrap();
        let quick = verify_at_pause(mem.as_mut_slice(), &hashes, Some(bg), None).unwrap();
        assert_eq!(quick, full);
    }

    /// A block corrupted after the background checked it is caught, with the full
    /// verifier's error.
    #[test]
    fn a_block_corrupted_after_its_check_is_caught() {
        let (mut mem, hashes, touched, bg) = setup();
        run_pass(&bg);
        let s = Superblock::read(mem.as_mut_slice()).unwrap();
        let off = s.geometry().block_offset(3) + 200;
        mem.as_mut_slice()[off] ^= 0x10;
        rehash(&mem, &hashes, &touched);
        let mut copy = mem.as_mut_slice().to_vec();
        let expected = crate::verify::verify_snapshot(&mut copy).unwrap_err();
        let got = verify_at_pause(mem.as_mut_slice(), &hashes, Some(bg), None).unwrap_err();
        assert_eq!(got, expected);
    }

    /// Stale page hashes are what the quick path trusts: a byte changed behind the codec's
    /// back (no hash update) is the one thing it cannot see, so the list must be exact. This
    /// pins that contract: the full verifier still runs when the list says "changed".
    #[test]
    fn without_background_results_the_full_verifier_runs() {
        let (mut mem, hashes, _touched, bg) = setup();
        drop(bg);
        let full = crate::verify::verify(mem.as_mut_slice()).unwrap();
        assert_eq!(
            verify_at_pause(mem.as_mut_slice(), &hashes, None, None).unwrap(),
            full
        );
    }
}
