//! The file-backed guest's part of the background verify: what each page that lands
//! changes in every block's known state ([`KnownBlocks`]: own checks, ledger entry, sums),
//! so that the verify at the pause reads only what changed since the last pass.

use rayon::prelude::*;

use crate::guest::file::layout::{get_u64, sb};
use crate::guest::file::verify::{verify_sparse, ImageVerifyError, ImageVerifyReport, Superblock};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::migration::dest::verify::{
    block_page_hashes, BackgroundVerifier, BlockChecks, DataPages, Finished, PassControl,
};
use crate::migration::digest::PageHashes;

use super::known::KnownBlocks;

/// What the background passes learned.
#[derive(Default)]
enum Learned {
    /// No consistent superblock seen yet.
    #[default]
    Nothing,
    /// Every block's state, kept current with each pass.
    Known(Box<KnownBlocks>),
    /// The layout changed between passes, or its blocks are too large to keep hashes of:
    /// the pause runs the full verifier.
    Unusable,
}

/// The file-backed guest's background checks (number, checksum and fill of each block, the
/// ledger entries and their sum).
#[derive(Default)]
pub struct FileChecks {
    learned: Learned,
    /// The image's file, which copies are read from (see `pass`), also at the pause.
    file: Option<std::fs::File>,
    head: Vec<u8>,
    purpose: Purpose,
}

/// What the background checks serve.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Purpose {
    /// A copying migration: checks on the calling thread (the receiver's workers need the
    /// cores), remembering the page hashes of every block (the pause skips a block whose
    /// pages the codec left as they were).
    #[default]
    Copy,
    /// A handover: checks on all cores (they are all the work there is), without the active
    /// blocks' page hashes (no codec hashes the pages that change: the pause reads every
    /// block holding one).
    Handover,
}

impl FileChecks {
    /// The checks of a handover's memory (see [`Purpose::Handover`]).
    pub fn for_handover() -> FileChecks {
        FileChecks {
            purpose: Purpose::Handover,
            ..FileChecks::default()
        }
    }
}

/// Blocks read with one `pread` at most (contiguous blocks; 1 MiB of 8 KiB blocks).
const RUN_BLOCKS: u64 = 128;

/// Blocks taken between two looks at the stop flag.
const BATCH_BLOCKS: usize = 8192;

impl BlockChecks for FileChecks {
    fn pass(&mut self, view: &GuestMemory, pages: &[u64], control: &PassControl) -> usize {
        self.head.resize(PAGE_SIZE, 0);
        view.read_at(0, &mut self.head);
        let Ok(s) = Superblock::read_head(&self.head, view.len()) else {
            return 0; // not (yet) a consistent superblock: keep the pages for later
        };
        if matches!(self.learned, Learned::Nothing) {
            // The image started as zeros and every page written since is in `pages`.
            let zero = crate::migration::digest::page_hash(&[0u8; PAGE_SIZE]);
            self.learned = match KnownBlocks::new(s.clone(), zero) {
                Some(known) => Learned::Known(Box::new(known)),
                None => Learned::Unusable,
            };
        }
        let Learned::Known(known) = &mut self.learned else {
            return pages.len();
        };
        if !same_layout(&known.layout, &s) {
            self.learned = Learned::Unusable;
            return pages.len();
        }
        if self.file.is_none() {
            self.file = view.file().try_clone().ok();
        }
        let mut page = [0u8; PAGE_SIZE];
        let mut blocks: Vec<u64> = Vec::new();
        // Pages before `i` are taken once `blocks` is.
        let mut taken = 0;
        for (i, &p) in pages.iter().enumerate() {
            if blocks.len() >= BATCH_BLOCKS {
                if control.stopped() {
                    return taken;
                }
                check_blocks(view, &s, known, &blocks, self.purpose);
                blocks.clear();
                taken = i;
                control.checked(taken);
            }
            if known.is_ledger_page(p) {
                view.read_from_file_at(p as usize * PAGE_SIZE, &mut page);
                known.take_ledger_page(p, &page);
            } else if let Some(b) = known.block_of_page(p) {
                if blocks.last() != Some(&b) {
                    blocks.push(b);
                }
            }
        }
        if control.stopped() {
            return taken;
        }
        check_blocks(view, &s, known, &blocks, self.purpose);
        pages.len()
    }

    fn set_up(&self) -> bool {
        !matches!(self.learned, Learned::Nothing)
    }
}

/// Takes the current copies of `blocks` (ascending) into `known`: runs of contiguous
/// blocks are read with one `pread`, and checked as `purpose` says.
fn check_blocks(
    view: &GuestMemory,
    s: &Superblock,
    known: &mut KnownBlocks,
    blocks: &[u64],
    purpose: Purpose,
) {
    let g = s.geometry();
    let bs = g.block_size as usize;
    let mut runs: Vec<&[u64]> = Vec::new();
    let mut start = 0;
    for i in 1..=blocks.len() {
        let ends =
            i == blocks.len() || blocks[i] != blocks[i - 1] + 1 || (i - start) as u64 == RUN_BLOCKS;
        if ends {
            runs.push(&blocks[start..i]);
            start = i;
        }
    }
    let known_now: &KnownBlocks = known;
    let check_run = |buf: &mut Vec<u8>, run: &&[u64]| {
        buf.resize(run.len() * bs, 0);
        // From the file: the receiver writes the image with pwrite.
        view.read_from_file_at(g.block_offset(run[0]), buf);
        run.iter()
            .zip(buf.chunks(bs))
            .map(|(&b, bytes)| {
                // An inactive block passes by being zero, which its hashes tell.
                let hashes = if purpose == Purpose::Copy || b >= s.active_blocks {
                    block_page_hashes(bytes)
                } else {
                    [0; 2]
                };
                (b, hashes, known_now.content_of(b, bytes))
            })
            .collect::<Vec<_>>()
    };
    let checked: Vec<Vec<_>> = if purpose == Purpose::Handover {
        runs.par_iter().map_init(Vec::new, check_run).collect()
    } else {
        let mut buf = Vec::new();
        runs.iter().map(|r| check_run(&mut buf, r)).collect()
    };
    for (b, hashes, content) in checked.into_iter().flatten() {
        known.set_block(b, hashes, content);
    }
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
    data: DataPages<'_>,
) -> Result<ImageVerifyReport, ImageVerifyError> {
    let replayed = crate::guest::file::workload::recover(mem)?;
    verify_sparse(mem, data().as_deref()).map(|mut r| {
        r.replayed_journal = replayed;
        r
    })
}

/// The verify at the pause: recovers the journal in `mem`, then checks every block using
/// what `background` learned, reading only what changed since its last pass. `hashes` must
/// describe `mem` as the codec left it (before recovery).
pub fn verify_at_pause(
    mem: &mut [u8],
    hashes: &PageHashes,
    background: Option<BackgroundVerifier<FileChecks>>,
    data: DataPages<'_>,
) -> Result<ImageVerifyReport, ImageVerifyError> {
    let finished = background.and_then(BackgroundVerifier::finish);
    verify_finished(mem, Some(hashes), finished, data).map(|(report, _)| report)
}

/// The verify at the pause of a handover: as [`verify_at_pause`], but no codec hashed the
/// pages that changed since the background saw them, so every block holding one is read.
pub fn verify_handed_over(
    mem: &mut [u8],
    background: BackgroundVerifier<FileChecks>,
    data: DataPages<'_>,
) -> Result<ImageVerifyReport, ImageVerifyError> {
    verify_finished(mem, None, background.finish(), data).map(|(report, _)| report)
}

/// [`verify_at_pause`] with what the background `finished` with, also returning how many
/// blocks and ledger pages the quick path read (`None`: the full verifier ran). `hashes`:
/// the pages' hashes as the codec left them, if it did (a block whose pages still hash as
/// its known state's is not read).
fn verify_finished(
    mem: &mut [u8],
    hashes: Option<&PageHashes>,
    finished: Option<Finished<FileChecks>>,
    data: DataPages<'_>,
) -> Result<(ImageVerifyReport, Option<u64>), ImageVerifyError> {
    let head = Superblock::read(mem)?;
    let journal_block =
        (get_u64(mem, sb::JOURNAL_SEQ) != 0).then(|| get_u64(mem, sb::JOURNAL_BLOCK));
    let replayed = crate::guest::file::workload::recover(mem)?;
    let full = |mem: &mut [u8]| {
        verify_sparse(mem, data().as_deref()).map(|mut r| {
            r.replayed_journal = replayed;
            (r, None)
        })
    };
    let s = Superblock::read(mem)?;
    let Some((mut known, pending, file)) = finished.and_then(|f| match f.checks.learned {
        Learned::Known(k) => Some((k, f.pending, f.checks.file)),
        _ => None,
    }) else {
        return full(mem);
    };
    if !same_layout(&known.layout, &s) || !same_layout(&head, &s) || s.journal_seq != 0 {
        return full(mem);
    }
    let rewritten = replayed.then_some(journal_block).flatten();
    let read = catch_up(
        mem,
        file.as_ref(),
        &s,
        hashes,
        &mut known,
        &pending,
        rewritten,
    );
    if known.all_pass(&s) && tail_is_zero(mem, &s) {
        Ok((
            ImageVerifyReport {
                kind: s.kind,
                blocks: s.block_count,
                active_blocks: s.active_blocks,
                tx_count: s.tx_count,
                replayed_journal: replayed,
            },
            Some(read),
        ))
    } else {
        // The full verifier names the first bad block (and is the ground truth).
        full(mem)
    }
}

/// Brings `known` up to date with `mem` for the `pending` pages and the block the journal
/// recovery `rewritten` (with its ledger page); returns how many blocks and ledger pages it
/// read. A pending block whose pages still hash as its state's (`hashes`, if known) is not
/// read.
fn catch_up(
    mem: &[u8],
    file: Option<&std::fs::File>,
    s: &Superblock,
    hashes: Option<&PageHashes>,
    known: &mut KnownBlocks,
    pending: &[u64],
    rewritten: Option<u64>,
) -> u64 {
    let g = s.geometry();
    let bs = g.block_size as usize;
    let pages_per_block = bs / PAGE_SIZE;
    let mut ledger_pages: Vec<u64> = pending
        .iter()
        .copied()
        .filter(|&p| known.is_ledger_page(p))
        .collect();
    let mut blocks: Vec<u64> = pending
        .iter()
        .filter_map(|&p| known.block_of_page(p))
        .collect();
    if let Some(b) = rewritten.filter(|&b| b < g.block_count) {
        ledger_pages.push(known.ledger_page_of(b));
        blocks.push(b);
    }
    ledger_pages.sort_unstable();
    ledger_pages.dedup();
    blocks.sort_unstable();
    blocks.dedup();
    let mut read = ledger_pages.len() as u64;
    for &p in &ledger_pages {
        let at = p as usize * PAGE_SIZE;
        known.take_ledger_page(p, &mem[at..at + PAGE_SIZE]);
    }
    // Blocks whose pages changed since their state, read on all cores (a lagging background
    // can leave many).
    let stale: Vec<(u64, Option<[u128; 2]>)> = blocks
        .into_iter()
        .map(|b| {
            let first = (g.block_offset(b) / PAGE_SIZE) as u64;
            let now = hashes.map(|hashes| {
                let mut now = [0u128; 2];
                for (j, h) in now.iter_mut().take(pages_per_block).enumerate() {
                    *h = hashes.get(first + j as u64);
                }
                now
            });
            (b, now)
        })
        // The recovery wrote the rewritten block after the codec hashed it.
        .filter(|&(b, now)| Some(b) == rewritten || now.is_none_or(|now| !known.has_hashes(b, now)))
        .collect();
    let known_now: &KnownBlocks = known;
    // Read from the file when there is one: the receiver wrote the image with pwrite, and
    // reading through the mapping would fault its page tables in, 4 KiB at a time. Not the
    // block the recovery rewrote: in a handover `mem` is a private view, which alone has it.
    let fresh: Vec<_> = stale
        .par_iter()
        .map_init(
            || vec![0u8; bs],
            |buf, &(b, now)| {
                use std::os::unix::fs::FileExt;
                let off = g.block_offset(b);
                let file = file.filter(|_| Some(b) != rewritten);
                let bytes = match file.map(|f| f.read_exact_at(buf, off as u64)) {
                    Some(Ok(())) => &buf[..],
                    _ => &mem[off..off + bs],
                };
                let now = now.unwrap_or_else(|| block_page_hashes(bytes));
                (b, now, known_now.content_of(b, bytes))
            },
        )
        .collect();
    read += fresh.len() as u64;
    for (b, now, content) in fresh {
        known.set_block(b, now, content);
    }
    read
}

/// Whether the ledger's slack (inside its last page) and the memory after the last block
/// are zero, as the full verifier requires.
fn tail_is_zero(mem: &[u8], s: &Superblock) -> bool {
    let g = s.geometry();
    let ledger_end = g.ledger_entry(g.block_count);
    let tail = g.block_offset(g.block_count);
    let zero = |r: &[u8]| r.iter().all(|&x| x == 0);
    zero(&mem[ledger_end..g.data_offset as usize]) && zero(&mem[tail..])
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::guest::file::workload::{format, Workload, WorkloadParams};
    use crate::migration::dest::verify::test_support::{rehash, run_pass};
    use crate::migration::dest::verify::{open_view, TouchedPages};

    const SIZE: u64 = 4 << 20;

    type Setup = (
        GuestMemory,
        Arc<PageHashes>,
        Arc<TouchedPages>,
        BackgroundVerifier<FileChecks>,
    );

    fn setup() -> Setup {
        setup_with(FileChecks::default())
    }

    /// A formatted guest memory, its page hashes and touched pages (every page written so
    /// far), and a background running `checks` on it.
    fn setup_with(checks: FileChecks) -> Setup {
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
        let bg = BackgroundVerifier::start(Arc::new(view), Arc::clone(&touched), checks).unwrap();
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
        let quick = verify_at_pause(mem.as_mut_slice(), &hashes, Some(bg), &|| None).unwrap();
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
        let got = verify_at_pause(mem.as_mut_slice(), &hashes, Some(bg), &|| None).unwrap_err();
        assert_eq!(got, expected);
    }

    /// The pause reads nothing when nothing landed since the last pass, and only the blocks
    /// and ledger pages that changed otherwise (not every block, as a full verify does).
    #[test]
    fn the_pause_reads_only_what_changed() {
        let (mut mem, hashes, touched, bg) = setup();
        run_pass(&bg);
        let full =
            crate::guest::file::verify::verify_snapshot(&mut mem.as_mut_slice().to_vec()).unwrap();
        let (quick, read) =
            verify_finished(mem.as_mut_slice(), Some(&hashes), bg.finish(), &|| None).unwrap();
        assert_eq!((quick, read), (full, Some(0)));

        let (mut mem, hashes, touched2, bg) = setup();
        drop(touched);
        run_pass(&bg);
        {
            let mut w = Workload::attach(mem.as_mut_slice()).unwrap();
            for _ in 0..5 {
                w.step();
            }
        }
        rehash(&mem, &hashes, &touched2);
        let blocks = Superblock::read(mem.as_mut_slice()).unwrap().block_count;
        let full =
            crate::guest::file::verify::verify_snapshot(&mut mem.as_mut_slice().to_vec()).unwrap();
        let (quick, read) =
            verify_finished(mem.as_mut_slice(), Some(&hashes), bg.finish(), &|| None).unwrap();
        assert_eq!(quick, full);
        // Five transactions touch at most five blocks and their ledger pages.
        let read = read.expect("the quick path ran");
        assert!((1..=10).contains(&read), "read {read} of {blocks} blocks");
    }

    /// Random interleavings of transactions, background passes and damage (a flipped byte, a
    /// stale ledger entry, a zeroed block, each "sent" so the page hashes and the touched
    /// pages know it): the pause's verdict is always the full verifier's, in copying
    /// migrations and in handovers.
    #[test]
    fn pause_verdicts_equal_the_full_verifiers_under_random_damage() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for case in 0..80 {
            // Even cases as in a copying migration, odd ones as in a handover (no hashes of
            // the changed pages at the pause).
            let handover = case % 2 == 1;
            let (mut mem, hashes, touched, bg) = if handover {
                setup_with(FileChecks::for_handover())
            } else {
                setup()
            };
            let s = Superblock::read(mem.as_mut_slice()).unwrap();
            let g = s.geometry();
            // At most one damage per case (at step 0-3; 4: none), so that a quick pass that
            // misses it would show; the last step's changes are left to the pause.
            let damaged_step = next(5);
            for step in 0..4 {
                {
                    let mut w = Workload::attach(mem.as_mut_slice()).unwrap();
                    for _ in 0..next(200) {
                        w.step();
                    }
                }
                let b = next(s.active_blocks);
                let m = mem.as_mut_slice();
                match if step == damaged_step { next(3) } else { 3 } {
                    0 => m[g.block_offset(b) + 100] ^= 1,
                    1 => {
                        let e = g.ledger_entry(b);
                        let v = get_u64(m, e);
                        crate::guest::file::layout::put_u64(m, e, v.wrapping_sub(1));
                    }
                    2 => m[g.block_offset(b)..g.block_offset(b + 1)].fill(0),
                    _ => {}
                }
                rehash(&mem, &hashes, &touched);
                if step < 3 && next(2) == 0 {
                    run_pass(&bg);
                }
            }
            let mut copy = mem.as_mut_slice().to_vec();
            let expected = crate::guest::file::verify::verify_snapshot(&mut copy);
            let got = if handover {
                verify_handed_over(mem.as_mut_slice(), bg, &|| None)
            } else {
                verify_at_pause(mem.as_mut_slice(), &hashes, Some(bg), &|| None)
            };
            assert_eq!(got, expected, "case {case}");
        }
    }

    /// A handover: the background reads the guest's whole memory, then the pages a live
    /// round changed; the guest is left mid-transaction (journal armed, block not yet
    /// written), and the pause's verify through a private view (whose recovery stays there)
    /// equals the full verifier's, reading only the blocks that changed.
    #[test]
    fn a_handed_over_memory_is_verified_from_the_background_and_the_last_round() {
        use crate::guest::file::layout::{get_u32, put_u32, put_u64, JOURNAL_UPDATE_SIZE};
        let (mut mem, hashes, touched, bg) = setup_with(FileChecks::for_handover());
        for p in 0..mem.pages() {
            touched.mark(p);
        }
        run_pass(&bg);
        let steps = |mem: &mut GuestMemory, n| {
            let mut w = Workload::attach(mem.as_mut_slice()).unwrap();
            for _ in 0..n {
                w.step();
            }
        };
        steps(&mut mem, 100);
        rehash(&mem, &hashes, &touched);
        run_pass(&bg);
        steps(&mut mem, 20);
        // One more transaction, stopped after arming its journal record.
        let before = mem.as_mut_slice().to_vec();
        steps(&mut mem, 1);
        let after = mem.as_mut_slice().to_vec();
        let m = mem.as_mut_slice();
        m.copy_from_slice(&before);
        let count = get_u32(&after, sb::JOURNAL_COUNT) as usize;
        put_u64(m, sb::JOURNAL_BLOCK, get_u64(&after, sb::JOURNAL_BLOCK));
        put_u64(m, sb::JOURNAL_VERSION, get_u64(&after, sb::JOURNAL_VERSION));
        put_u32(m, sb::JOURNAL_KIND, get_u32(&after, sb::JOURNAL_KIND));
        put_u32(m, sb::JOURNAL_COUNT, count as u32);
        let updates = sb::JOURNAL_UPDATES..sb::JOURNAL_UPDATES + count * JOURNAL_UPDATE_SIZE;
        m[updates.clone()].copy_from_slice(&after[updates]);
        put_u64(m, sb::JOURNAL_SEQ, get_u64(&before, sb::TX_COUNT) + 1);
        rehash(&mem, &hashes, &touched);
        let mut view = GuestMemory::open(mem.path(), crate::memory::MapMode::Private).unwrap();
        let full =
            crate::guest::file::verify::verify_snapshot(&mut mem.as_mut_slice().to_vec()).unwrap();
        assert!(full.replayed_journal);
        let (quick, read) =
            verify_finished(view.as_mut_slice(), None, bg.finish(), &|| None).unwrap();
        assert_eq!(quick, full);
        let read = read.expect("the quick path ran");
        let blocks = Superblock::read(mem.as_mut_slice()).unwrap().block_count;
        assert!(read < 60, "read {read} of {blocks} blocks");
        // The recovery stayed in the private view.
        assert_ne!(get_u64(mem.as_mut_slice(), sb::JOURNAL_SEQ), 0);
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
            verify_at_pause(mem.as_mut_slice(), &hashes, None, &|| None).unwrap(),
            full
        );
    }
}
