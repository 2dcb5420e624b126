//! The file-backed guest's part of the background verify: each block's own checks
//! (number, checksum, fill) on background copies, and the verify at the pause that reuses
//! them for blocks whose pages still hash the same.

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use crate::guest::file::layout::{get_u64, sb};
use crate::guest::file::verify::{
    check_block_content, verify_sparse, BlockContent, ImageVerifyError, ImageVerifyReport,
    Superblock,
};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::migration::dest::verify::{block_page_hashes, BackgroundVerifier, BlockChecks};
use crate::migration::digest::PageHashes;

/// What the background pass learned about one block of the file-backed guest.
#[derive(Clone, Copy, Debug, Default)]
struct Checked {
    /// Hashes of the block's pages (at most 2) in the copy that was checked.
    hashes: [u128; 2],
    /// The copy passed the block's own checks.
    content: Option<BlockContent>,
}

/// What the background passes learned: the superblock they read and a result per block.
type Learned = (Superblock, Vec<Checked>);

/// The file-backed guest's background checks (number, checksum and fill of each block).
#[derive(Default)]
pub struct FileChecks {
    learned: Option<Learned>,
    head: Vec<u8>,
    block: Vec<u8>,
}

impl BlockChecks for FileChecks {
    fn pass(&mut self, view: &GuestMemory, pages: Vec<u64>, stop: &AtomicBool) {
        self.head.resize(PAGE_SIZE, 0);
        view.read_at(0, &mut self.head);
        let Ok(s) = Superblock::read_head(&self.head, view.len()) else {
            return; // not (yet) a consistent superblock: the pause decides
        };
        let g = s.geometry();
        if !matches!(&self.learned, Some((old, _)) if same_layout(old, &s)) {
            // First pass (or the layout changed): every block is unchecked.
            self.learned = Some((s.clone(), vec![Checked::default(); g.block_count as usize]));
        }
        let Some((_, checked)) = self.learned.as_mut() else {
            return;
        };
        let block = &mut self.block;
        block.resize(g.block_size as usize, 0);
        let mut last = u64::MAX;
        for p in pages {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Some(b) = block_of_page(&s, p) else {
                continue;
            };
            if b == last || b >= s.active_blocks {
                continue;
            }
            last = b;
            view.read_at(g.block_offset(b), block);
            checked[b as usize] = check_copy(block, b, &s);
        }
    }
}

/// Checks a copy of block `b` and records its page hashes.
fn check_copy(block: &[u8], b: u64, s: &Superblock) -> Checked {
    Checked {
        hashes: block_page_hashes(block),
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

/// The workload's whole verify of `mem` (its data pages `data`, holes skipped), after
/// recovering an interrupted transaction: nothing is known of it beforehand (a handover).
pub fn verify_full(
    mem: &mut [u8],
    data: Option<&[u64]>,
) -> Result<ImageVerifyReport, ImageVerifyError> {
    let replayed = crate::guest::file::workload::recover(mem)?;
    verify_sparse(mem, data).map(|mut r| {
        r.replayed_journal = replayed;
        r
    })
}

/// The verify at the pause: recovers the journal in `mem`, then checks every block using
/// what `background` learned, reading only blocks that changed since. `hashes` must describe
/// `mem` as the codec left it (before recovery); `data` is the image's data pages.
pub fn verify_at_pause(
    mem: &mut [u8],
    hashes: &PageHashes,
    background: Option<BackgroundVerifier<FileChecks>>,
    data: Option<&[u64]>,
) -> Result<ImageVerifyReport, ImageVerifyError> {
    let learned = background
        .and_then(BackgroundVerifier::finish)
        .and_then(|c| c.learned);
    let head = Superblock::read(mem)?;
    let journal_block =
        (get_u64(mem, sb::JOURNAL_SEQ) != 0).then(|| get_u64(mem, sb::JOURNAL_BLOCK));
    let replayed = crate::guest::file::workload::recover(mem)?;
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
        Ok(()) => Ok(ImageVerifyReport {
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
    use std::sync::Arc;

    use super::*;
    use crate::guest::file::workload::{format, Workload, WorkloadParams};
    use crate::migration::dest::verify::test_support::{rehash, run_pass};
    use crate::migration::dest::verify::{open_view, TouchedPages};

    const SIZE: u64 = 4 << 20;

    fn setup() -> (
        GuestMemory,
        Arc<PageHashes>,
        Arc<TouchedPages>,
        BackgroundVerifier<FileChecks>,
    ) {
        let mut mem = GuestMemory::memfd("dest-verify", SIZE).unwrap();
        format(
            mem.as_mut_slice(),
            &WorkloadParams::new(crate::guest::file::layout::ImageWorkloadKind::Dbsim),
        )
        .unwrap();
        let hashes = Arc::new(PageHashes::zeroed(mem.pages(), PAGE_SIZE));
        let touched = Arc::new(TouchedPages::new(mem.pages()));
        rehash(&mem, &hashes, &touched);
        let view = open_view(mem.path()).unwrap();
        let bg =
            BackgroundVerifier::start(Arc::new(view), Arc::clone(&touched), FileChecks::default())
                .unwrap();
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
        let full = crate::guest::file::verify::verify(mem.as_mut_slice()).unwrap();
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
        let expected = crate::guest::file::verify::verify_snapshot(&mut copy).unwrap_err();
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
        let full = crate::guest::file::verify::verify(mem.as_mut_slice()).unwrap();
        assert_eq!(
            verify_at_pause(mem.as_mut_slice(), &hashes, None, None).unwrap(),
            full
        );
    }
}
