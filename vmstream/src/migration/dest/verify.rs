//! The received workload's verify (`recv --resume`) without reading all of memory at the
//! pause.
//!
//! The destination runs the workload's verifier on the received image before it commits
//! (an image the guest could not resume from is never committed), and that check is
//! downtime. A full verify reads every block; here most of it happens during the live
//! rounds instead:
//!
//! - after each round's barrier a background thread ([`BackgroundVerifier`]) checks the
//!   blocks whose pages the codec applied since its last pass. It reads a copy of each block
//!   through a second, read-only mapping of the pending image (the next round may be writing
//!   meanwhile), runs the checks that need only the block on the copy and remembers the
//!   copy's page hashes with the result. What those checks are depends on the guest
//!   ([`BlockChecks`]): number, checksum and fill for the file-backed guest
//!   ([`FileChecks`]); header, checksum and zero test for the KVM guest's ledger check
//!   ([`KvmChecks`]);
//! - at the pause, a block whose pages still have those hashes (the codec workers keep the
//!   page hashes current: [`PageHashes`]) holds exactly the bytes that were checked, so only
//!   what involves the rest of memory is done then (versions against the ledger, sums).
//!   Other blocks, and the block the journal recovery rewrote, are checked from memory.
//!
//! The file-backed guest's quick path falls back to the full verifier on any failure, which
//! names the first bad block exactly; the KVM ledger check takes each block's facts from the
//! background or from memory, and reports what the full check would.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use rayon::prelude::*;

use crate::kvm::abi::BLOCK_SIZE as KVM_BLOCK_SIZE;
use crate::kvm::verify::BlockFacts;
use crate::kvm::GuestLayout;
use crate::layout::{get_u64, sb};
use crate::memory::{GuestMemory, MapMode, PAGE_SIZE};
use crate::migration::digest::PageHashes;
use crate::migration::wire::GuestKind;
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

/// How often the background checks what landed during round 0.
const FIRST_ROUND_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// One guest kind's part of the background verify: the checks of the blocks that hold the
/// pages the codec applied since the last pass, remembered with the hashes of the copies
/// they ran on (a block whose pages still hash the same at the pause need not be read).
pub trait BlockChecks: Send + 'static {
    /// Checks the blocks holding `pages`, reading them through `view` (a read-only mapping
    /// of the pending image, which the next round may be writing); returns early once
    /// `stop` is set.
    fn pass(&mut self, view: &GuestMemory, pages: Vec<u64>, stop: &AtomicBool);
}

/// The background half: block results gathered during the live rounds by a thread that
/// runs `C`'s checks after each round's barrier.
pub struct BackgroundVerifier<C> {
    kick: mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
    /// Passes completed after a barrier (tests wait on it).
    passes: Arc<AtomicU64>,
    thread: Option<JoinHandle<C>>,
}

impl<C: BlockChecks> BackgroundVerifier<C> {
    /// Starts the thread; `view` is a read-only mapping of the pending image. The caller
    /// decides when the mapping goes: unmapping a large mapping with its pages faulted in
    /// takes tens of ms, too long for the pause.
    pub fn start(
        view: Arc<GuestMemory>,
        touched: Arc<TouchedPages>,
        mut checks: C,
    ) -> std::io::Result<BackgroundVerifier<C>> {
        let (kick, kicks) = mpsc::channel::<()>();
        let stop = Arc::new(AtomicBool::new(false));
        let passes = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, passes) = (Arc::clone(&stop), Arc::clone(&passes));
            std::thread::Builder::new()
                .name("vmstream-verify".into())
                .spawn(move || {
                    // Round 0 carries most of memory, each page once: check it as it lands
                    // (every FIRST_ROUND_POLL) rather than all after its barrier, when the
                    // remaining rounds may be too short for the pass. From the first barrier
                    // on, pages may be rewritten within a round: check after barriers only.
                    let mut first_round = true;
                    loop {
                        let kicked = if first_round {
                            match kicks.recv_timeout(FIRST_ROUND_POLL) {
                                Ok(()) => true,
                                Err(mpsc::RecvTimeoutError::Timeout) => false,
                                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                            }
                        } else {
                            match kicks.recv() {
                                Ok(()) => true,
                                Err(_) => break,
                            }
                        };
                        first_round &= !kicked;
                        while kicks.try_recv().is_ok() {}
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        checks.pass(&view, touched.take(), &stop);
                        if kicked {
                            passes.fetch_add(1, Ordering::Release);
                        }
                    }
                    checks
                })?
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

    /// Passes completed after a barrier so far (each covers every page applied before
    /// its [`round_applied`](Self::round_applied)).
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Acquire)
    }

    /// Stops the thread (a pass in progress is cut short) and returns what it learned.
    pub fn finish(mut self) -> Option<C> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.kick.send(());
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl<C> Drop for BackgroundVerifier<C> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.kick.send(());
    }
}

/// Hashes of the pages of a block copy (blocks of one or two pages).
pub fn block_page_hashes(block: &[u8]) -> [u128; 2] {
    let mut hashes = [0u128; 2];
    for (h, page) in hashes.iter_mut().zip(block.chunks(PAGE_SIZE)) {
        *h = crate::migration::digest::page_hash(page);
    }
    hashes
}

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

/// Pages per KVM block (the block facts keep a hash for each).
const KVM_BLOCK_PAGES: usize = (KVM_BLOCK_SIZE as usize).div_ceil(PAGE_SIZE);

/// A KVM block's facts with the page hashes of the copy they were computed on.
type KvmChecked = ([u128; 2], BlockFacts);

/// The KVM guest's background checks: the facts of each block copy (header, checksum, zero;
/// see [`BlockFacts`]). The ledger check at the pause combines them with the ledger and the
/// vCPU records it reads then, reading only blocks whose pages changed since their copy.
#[derive(Default)]
pub struct KvmChecks {
    /// The block layout (it follows from the RAM size) and, per block, the page hashes of
    /// the copy checked and its facts.
    learned: Option<(GuestLayout, Vec<Option<KvmChecked>>)>,
    block: Vec<u8>,
}

impl BlockChecks for KvmChecks {
    fn pass(&mut self, view: &GuestMemory, pages: Vec<u64>, stop: &AtomicBool) {
        if self.learned.is_none() {
            let Ok(layout) = GuestLayout::for_memory(view.len() as u64) else {
                return; // not a KVM guest's RAM size: the pause reads everything
            };
            self.learned = Some((layout, vec![None; layout.block_count as usize]));
        }
        let Some((layout, facts)) = self.learned.as_mut() else {
            return;
        };
        let block = &mut self.block;
        block.resize(KVM_BLOCK_SIZE as usize, 0);
        let mut last = u64::MAX;
        for p in pages {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Some(b) = (p * PAGE_SIZE as u64)
                .checked_sub(layout.blocks_gpa)
                .map(|off| off / KVM_BLOCK_SIZE)
                .filter(|&b| b < layout.block_count)
            else {
                continue;
            };
            if b == last {
                continue;
            }
            last = b;
            view.read_at(layout.block_gpa(b) as usize, block);
            facts[b as usize] = Some((block_page_hashes(block), BlockFacts::of(block)));
        }
    }
}

/// What the KVM ledger check at the pause knows of each block without reading it, from
/// the image's current page hashes ([`PageHashes`]: the codec keeps them as it writes): a
/// block whose pages hash as zero pages is all zero (most never-written blocks), and a block
/// whose pages still hash as in the copy the background checked has that copy's facts.
pub struct KvmKnownFacts<'a> {
    /// The background's facts, when they are for this layout.
    learned: Option<Vec<Option<KvmChecked>>>,
    hashes: &'a PageHashes,
    zero: u128,
    layout: GuestLayout,
}

impl<'a> KvmKnownFacts<'a> {
    /// Stops the background checks (if any) and takes what they learned; `layout` is the
    /// guest's, as read from its parameter block.
    pub fn new(
        background: Option<BackgroundVerifier<KvmChecks>>,
        hashes: &'a PageHashes,
        layout: GuestLayout,
    ) -> KvmKnownFacts<'a> {
        let learned = background
            .and_then(BackgroundVerifier::finish)
            .and_then(|c| c.learned)
            .filter(|(l, _)| *l == layout)
            .map(|(_, facts)| facts);
        KvmKnownFacts {
            learned,
            hashes,
            zero: hashes.zero_page_hash(),
            layout,
        }
    }

    /// The facts of block `b`, when they follow from the page hashes.
    pub fn get(&self, b: u64) -> Option<BlockFacts> {
        let first = self.layout.block_gpa(b) / PAGE_SIZE as u64;
        let mut now = [0u128; 2];
        for (j, h) in now.iter_mut().enumerate().take(KVM_BLOCK_PAGES) {
            *h = self.hashes.get(first + j as u64);
        }
        if now[..KVM_BLOCK_PAGES].iter().all(|&h| h == self.zero) {
            return Some(BlockFacts {
                zero: true,
                ..BlockFacts::default()
            });
        }
        let (copy, facts) = self.learned.as_ref()?.get(b as usize)?.as_ref()?;
        (*copy == now).then_some(*facts)
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

/// The background verify of the guest kind being received.
pub enum Background {
    /// A file-backed guest's workload.
    File(BackgroundVerifier<FileChecks>),
    /// A KVM guest's ledger check.
    Kvm(BackgroundVerifier<KvmChecks>),
}

impl Background {
    /// Starts the background checks for `kind` on the pending image at `path`; returns them
    /// with the read-only view they read through (see [`BackgroundVerifier::start`]).
    pub fn start(
        kind: GuestKind,
        path: &std::path::Path,
        touched: Arc<TouchedPages>,
    ) -> std::io::Result<(Background, Arc<GuestMemory>)> {
        let view = Arc::new(open_view(path).map_err(std::io::Error::other)?);
        let v = Arc::clone(&view);
        let background = match kind {
            GuestKind::File => Background::File(BackgroundVerifier::start(
                v,
                touched,
                FileChecks::default(),
            )?),
            GuestKind::Kvm => {
                Background::Kvm(BackgroundVerifier::start(v, touched, KvmChecks::default())?)
            }
        };
        Ok((background, view))
    }

    /// A round passed its barrier: check what it changed.
    pub fn round_applied(&self) {
        match self {
            Background::File(bg) => bg.round_applied(),
            Background::Kvm(bg) => bg.round_applied(),
        }
    }
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
    background: Option<BackgroundVerifier<FileChecks>>,
    data: Option<&[u64]>,
) -> Result<VerifyReport, VerifyError> {
    let learned = background
        .and_then(BackgroundVerifier::finish)
        .and_then(|c| c.learned);
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

    fn run_pass<C: BlockChecks>(bg: &BackgroundVerifier<C>) {
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
        BackgroundVerifier<FileChecks>,
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

    /// Runs the KVM guest until it committed `more` further transactions, then pauses it.
    fn run_kvm(guest: &mut crate::kvm::KvmGuest, more: u64) {
        let start = guest.total_transactions().unwrap();
        guest.resume().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while guest.total_transactions().unwrap() < start + more
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        guest.pause().unwrap();
    }

    /// The KVM ledger check at the pause, with block facts from a background pass taken
    /// before more transactions ran, gives the full check's result: blocks changed since are
    /// read again (through the page hashes), and a block corrupted after its background check
    /// is reported as the full check reports it.
    #[test]
    fn kvm_ledger_check_with_background_facts_equals_the_full_check() {
        use crate::kvm::verify::{verify, verify_known};
        use crate::kvm::{kvm_available, GuestConfig, GuestRam, KvmGuest};
        if let Err(why) = kvm_available() {
            eprintln!("skipping: {why}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("vmstream-kvm-bg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ram");
        let size = 16u64 << 20;
        let cfg = GuestConfig {
            vcpus: 2,
            ..GuestConfig::default()
        };
        let mut guest = KvmGuest::start(GuestRam::open(&path, size).unwrap(), &cfg).unwrap();
        guest.pause().unwrap();
        let mem = open_view(&path).unwrap();
        let hashes = PageHashes::zeroed(mem.pages(), PAGE_SIZE);
        let touched = Arc::new(TouchedPages::new(mem.pages()));
        let bg = BackgroundVerifier::start(
            Arc::new(open_view(&path).unwrap()),
            Arc::clone(&touched),
            KvmChecks::default(),
        )
        .unwrap();
        run_kvm(&mut guest, 50_000);
        rehash(&mem, &hashes, &touched);
        run_pass(&bg);
        // More transactions after the pass: their blocks' facts are stale.
        run_kvm(&mut guest, 20_000);
        rehash(&mem, &hashes, &touched);
        let (ram, params) = (Arc::clone(guest.ram()), guest.params().clone());
        let known = KvmKnownFacts::new(Some(bg), &hashes, params.layout);
        let from_background = AtomicU64::new(0);
        let get = |b: u64| {
            let f = known.get(b);
            if f.is_some_and(|f| !f.zero) {
                from_background.fetch_add(1, Ordering::Relaxed);
            }
            f
        };
        let full = verify(&ram, &params).unwrap();
        assert_eq!(verify_known(&*ram, &params, None, &get).unwrap(), full);
        let used = from_background.load(Ordering::Relaxed);
        assert!(
            used > 0 && used < full.written_blocks,
            "background facts used for {used} of {} written blocks",
            full.written_blocks
        );
        // Corrupt a block whose background facts were current.
        let b = (0..params.layout.block_count)
            .find(|&b| known.get(b).is_some_and(|f| !f.zero))
            .unwrap();
        let gpa = params.layout.block_gpa(b) + 5000;
        ram.write_u64(gpa, ram.read_u64(gpa).unwrap() ^ 4).unwrap();
        rehash(&mem, &hashes, &touched);
        let expected = verify(&ram, &params).unwrap_err().to_string();
        assert!(expected.contains(&format!("block {b}")), "{expected}");
        let got = verify_known(&*ram, &params, None, &get).unwrap_err();
        assert_eq!(got.to_string(), expected);
        ram.write_u64(gpa, ram.read_u64(gpa).unwrap() ^ 4).unwrap();
        // A block that must stay zero and holds data is found although its neighbours'
        // facts come from the hashes.
        let tail = params.layout.block_count - 1;
        assert!(known.get(tail).is_some_and(|f| f.zero));
        ram.write_u64(params.layout.block_gpa(tail) + 64, 1)
            .unwrap();
        rehash(&mem, &hashes, &touched);
        let expected = verify(&ram, &params).unwrap_err().to_string();
        assert!(expected.contains("should be all zero"), "{expected}");
        assert_eq!(
            verify_known(&*ram, &params, None, &get)
                .unwrap_err()
                .to_string(),
            expected
        );
        guest.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
