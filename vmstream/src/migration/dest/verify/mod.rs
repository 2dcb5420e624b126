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
//!   ([`BlockChecks`], each [`IncomingGuest`](super::incoming::IncomingGuest) has its own):
//!   number, checksum and fill for the file-backed guest; header, checksum and zero test
//!   for the KVM guest's ledger check;
//!   Each guest kind keeps, per block, those hashes, the result and the block's ledger
//!   entry, and the sums the whole check needs (blocks failing, the ledger's sum, per vCPU
//!   for KVM) current as it takes each page;
//! - at the pause, only the pages applied since the last pass ([`Finished::pending`]: the
//!   final round's, and what a lagging pass left) are looked at: ledger pages are read, a
//!   block whose pages still hash as its state's (the codec workers keep the page hashes
//!   current: [`PageHashes`](crate::migration::digest::PageHashes)) is not, the others (and
//!   the block the journal recovery rewrote) are read on all cores. The cost at the pause
//!   is that of what changed, not of the guest's size.
//!
//! When something fails, both kinds run their full check (reading only blocks the hashes
//! cannot vouch for), which names the first bad block as a full verify would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::memory::{GuestMemory, MapMode, PAGE_SIZE};

mod pass;
use crate::migration::dest::lazy_words::LazyWords;
use crate::migration::wire::{Hello, Message, RoundEnd, VerifyBacklog, FEATURE_VERIFY_BACKLOG};
pub use pass::PassControl;
use pass::{thread_cpu_time, PassRates, PassTiming, TimedPass, RATE_MIN_PAGES};

/// Pages the codec applied since the background verifier last looked (a bit per page, in
/// [`LazyWords`]: nothing allocated for pages that never arrive).
pub struct TouchedPages(LazyWords);

impl TouchedPages {
    /// No page touched, for a memory of `pages` pages.
    pub fn new(pages: u64) -> TouchedPages {
        TouchedPages(LazyWords::new(pages.div_ceil(64) as usize, &[0]))
    }

    /// Records that `page` was written.
    pub fn mark(&self, page: u64) {
        self.0.fetch_or((page / 64) as usize, 1 << (page % 64));
    }

    /// How many pages are marked.
    fn count(&self) -> u64 {
        let mut n = 0;
        self.0
            .for_each_allocated(|_, w| n += u64::from(w.load(Ordering::Relaxed).count_ones()));
        n
    }

    /// Takes (and clears) the touched pages.
    fn take(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        self.0.for_each_allocated(|i, w| {
            let mut bits = w.swap(0, Ordering::Relaxed);
            while bits != 0 {
                pages.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        });
        pages
    }
}

/// Passes [`BackgroundVerifier::wait_covered`] asks for again when one leaves pages.
const MAX_RETRIES: u32 = 100;

/// How often the background checks what landed during round 0.
const FIRST_ROUND_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// One guest kind's part of the background verify: the checks of the blocks that hold the
/// pages the codec applied since the last pass, remembered with the hashes of the copies
/// they ran on (a block whose pages still hash the same at the pause need not be read).
pub trait BlockChecks: Send + 'static {
    /// Checks the blocks holding `pages` (ascending), reading them through `view` (a
    /// read-only mapping of the pending image, which the next round may be writing);
    /// says how far it got through `control` as it goes, and returns early once `control`
    /// is stopped. Returns how many of `pages` (a prefix) it took into account: the rest
    /// stay pending for the next pass or the pause.
    fn pass(&mut self, view: &GuestMemory, pages: &[u64], control: &PassControl) -> usize;

    /// Whether the checks have set up what they learn into (a table for every block of
    /// memory, built in the first pass that finds the guest's layout: 40 ms at 4 GiB). A
    /// pass that sets it up is not timed for the backlog's rate: that cost is paid once.
    fn set_up(&self) -> bool {
        true
    }
}

/// What the background learned, and the pages applied since it last looked (the verify at
/// the pause reads those).
pub struct Finished<C> {
    /// The guest kind's checks, with what they learned.
    pub checks: C,
    /// Pages the codec applied after the last pass took its list, or that a pass left.
    pub pending: Vec<u64>,
}

/// The background half: block results gathered during the live rounds by a thread that
/// runs `C`'s checks after each round's barrier.
pub struct BackgroundVerifier<C> {
    kick: mpsc::Sender<u64>,
    control: Arc<PassControl>,
    /// Passes completed after a barrier (tests wait on it).
    passes: Arc<AtomicU64>,
    /// Kicks sent ([`Self::round_applied`]); the last kick a finished pass started from,
    /// and the last whose pages a pass took all of (see [`Self::wait_covered`]).
    kicks: AtomicU64,
    taken: Arc<AtomicU64>,
    covered: Arc<AtomicU64>,
    touched: Arc<TouchedPages>,
    rates: Arc<PassRates>,
    thread: Option<JoinHandle<C>>,
}

/// What the background has not checked yet: the verify at the pause would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Pages applied and not checked (those a pass in progress has not reached included).
    pub pages: u64,
    /// Checking them at the CPU time per page of the recent timed passes.
    pub expected: std::time::Duration,
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
        let (kick, kicks) = mpsc::channel::<u64>();
        let control = Arc::new(PassControl::default());
        let passes = Arc::new(AtomicU64::new(0));
        let covered = Arc::new(AtomicU64::new(0));
        let taken = Arc::new(AtomicU64::new(0));
        let rates = Arc::new(PassRates::default());
        let thread = {
            let (control, passes) = (Arc::clone(&control), Arc::clone(&passes));
            let (covered, taken) = (Arc::clone(&covered), Arc::clone(&taken));
            let rates = Arc::clone(&rates);
            let touched = Arc::clone(&touched);
            std::thread::Builder::new()
                .name("vmstream-verify".into())
                .spawn(move || {
                    // Round 0 carries most of memory, each page once: check it as it lands
                    // (every FIRST_ROUND_POLL) rather than all after its barrier, when the
                    // remaining rounds may be too short for the pass. From the first barrier
                    // on, pages may be rewritten within a round: check after barriers only.
                    let mut first_round = true;
                    loop {
                        // The latest kick: every page marked before it is taken below.
                        let mut kicked = if first_round {
                            match kicks.recv_timeout(FIRST_ROUND_POLL) {
                                Ok(k) => Some(k),
                                Err(mpsc::RecvTimeoutError::Timeout) => None,
                                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                            }
                        } else {
                            match kicks.recv() {
                                Ok(k) => Some(k),
                                Err(_) => break,
                            }
                        };
                        let bulk = first_round;
                        first_round &= kicked.is_none();
                        while let Ok(k) = kicks.try_recv() {
                            kicked = Some(k);
                        }
                        if control.stopped() {
                            break;
                        }
                        let t = std::time::Instant::now();
                        // Counted in the pass before they leave `touched`: a backlog asked
                        // for meanwhile counts them twice rather than not at all.
                        control.checked(0);
                        control.pages.store(touched.count(), Ordering::Relaxed);
                        let pages = touched.take();
                        control.pages.store(pages.len() as u64, Ordering::Relaxed);
                        let timed = checks.set_up();
                        let cpu = thread_cpu_time();
                        control.time(cpu.filter(|_| timed).map(|start_cpu| PassTiming {
                            start_cpu,
                            sampled: TimedPass {
                                pages: 0,
                                cpu: std::time::Duration::ZERO,
                                bulk,
                            },
                        }));
                        let done = checks.pass(&view, &pages, &control);
                        if timed && done >= RATE_MIN_PAGES {
                            // A clock that fails leaves the wall time.
                            let cpu = match (cpu, thread_cpu_time()) {
                                (Some(a), Some(b)) => b.saturating_sub(a),
                                _ => t.elapsed(),
                            };
                            rates.record(TimedPass {
                                pages: done as u64,
                                cpu,
                                bulk,
                            });
                        }
                        let left = pages.get(done..).unwrap_or_default();
                        for &page in left {
                            touched.mark(page);
                        }
                        control.time(None);
                        control.pages.store(0, Ordering::Relaxed);
                        if let Some(k) = kicked {
                            if left.is_empty() {
                                covered.fetch_max(k, Ordering::Release);
                            }
                            taken.fetch_max(k, Ordering::Release);
                            passes.fetch_add(1, Ordering::Release);
                        }
                    }
                    checks
                })?
        };
        Ok(BackgroundVerifier {
            kick,
            control,
            passes,
            kicks: AtomicU64::new(0),
            taken,
            covered,
            touched,
            rates,
            thread: Some(thread),
        })
    }

    /// A round passed its barrier: check what it changed. Returns the kick's number, for
    /// [`Self::wait_covered`].
    pub fn round_applied(&self) -> u64 {
        let k = self.kicks.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.kick.send(k);
        k
    }

    /// Waits until a pass completed that took every page marked before kick `k` (a pass
    /// in progress when `k` was sent does not count: it took its pages earlier). A pass that
    /// started from `k` but left pages (the image was not consistent to read yet, e.g. a
    /// superblock caught mid-update) is kicked again, up to 100 times. False if
    /// that did not get them all (they stay pending for the next pass or the pause) or the
    /// thread has stopped.
    pub fn wait_covered(&self, mut k: u64) -> bool {
        let mut retries = 0;
        while self.covered.load(Ordering::Acquire) < k {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return false;
            }
            if self.taken.load(Ordering::Acquire) >= k {
                if retries == MAX_RETRIES {
                    return false;
                }
                retries += 1;
                k = self.round_applied();
                continue;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        true
    }

    /// What is left to check now, or None before a pass large enough to time ran.
    pub fn backlog(&self) -> Option<Backlog> {
        let ps = self.rates.cpu_ps_per_page(self.control.progress())?;
        let pages = self.touched.count() + self.control.unchecked();
        let ns = (u128::from(pages) * u128::from(ps) / 1000).min(u64::MAX as u128) as u64;
        Some(Backlog {
            pages,
            expected: std::time::Duration::from_nanos(ns),
        })
    }

    /// Passes completed after a barrier so far (each covers every page applied before
    /// its [`round_applied`](Self::round_applied)).
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Acquire)
    }

    /// Stops the thread (a pass in progress is cut short) and returns what it learned with
    /// the pages it has not looked at.
    pub fn finish(mut self) -> Option<Finished<C>> {
        self.control.stop.store(true, Ordering::Relaxed);
        let _ = self.kick.send(u64::MAX);
        let checks = self.thread.take().and_then(|t| t.join().ok())?;
        Some(Finished {
            checks,
            pending: self.touched.take(),
        })
    }
}

/// A guest kind's background checks (with `--resume`) and the read-only view of the pending
/// image they read. The view is unmapped only when the destination is done: unmapping it at
/// the pause would be downtime.
pub struct BackgroundSlot<C> {
    verifier: Option<BackgroundVerifier<C>>,
    view: Option<Arc<GuestMemory>>,
}

impl<C> Default for BackgroundSlot<C> {
    fn default() -> Self {
        BackgroundSlot {
            verifier: None,
            view: None,
        }
    }
}

impl<C: BlockChecks> BackgroundSlot<C> {
    /// Starts `checks` on the pending image through `view`, a read-only mapping of it.
    pub fn start(
        &mut self,
        view: GuestMemory,
        touched: Arc<TouchedPages>,
        checks: C,
    ) -> std::io::Result<()> {
        let view = Arc::new(view);
        self.verifier = Some(BackgroundVerifier::start(
            Arc::clone(&view),
            touched,
            checks,
        )?);
        self.view = Some(view);
        Ok(())
    }

    /// [`BackgroundVerifier::round_applied`], if the checks run.
    pub fn round_applied(&self) {
        if let Some(bg) = &self.verifier {
            bg.round_applied();
        }
    }

    /// [`BackgroundVerifier::backlog`], if the checks run.
    pub fn backlog(&self) -> Option<Backlog> {
        self.verifier.as_ref()?.backlog()
    }

    /// The running checks, if any.
    pub fn verifier(&self) -> Option<&BackgroundVerifier<C>> {
        self.verifier.as_ref()
    }

    /// The checks, for the verify at the pause to finish (the view stays mapped).
    pub fn take(&mut self) -> Option<BackgroundVerifier<C>> {
        self.verifier.take()
    }
}

impl<C> Drop for BackgroundVerifier<C> {
    fn drop(&mut self) {
        self.control.stop.store(true, Ordering::Relaxed);
        let _ = self.kick.send(u64::MAX);
    }
}

/// The `VerifyBacklog` to send before acknowledging the round `end` ends, if the source
/// asked for them (`hello`) and it is a live round: what the verify at the pause would
/// have to check if the source switched over now (None too if `guest` does not verify in
/// the background or has not timed a pass yet).
pub(super) fn backlog_message(
    guest: &dyn super::incoming::IncomingGuest,
    hello: &Hello,
    end: &RoundEnd,
) -> Option<Message> {
    if hello.features & FEATURE_VERIFY_BACKLOG == 0 || end.is_final() {
        return None;
    }
    let b = guest.verify_backlog()?;
    Some(Message::VerifyBacklog(VerifyBacklog {
        round: end.round,
        pages: b.pages,
        expected_ns: b.expected.as_nanos().min(u128::from(u64::MAX)) as u64,
    }))
}

/// A memory's data pages (a bit per page; holes clear), asked for only when a verifier
/// reads all of memory: finding them walks the whole file, too slow for the pause otherwise.
pub type DataPages<'a> = &'a dyn Fn() -> Option<Vec<u64>>;

/// Hashes of the pages of a block copy (blocks of one or two pages).
pub fn block_page_hashes(block: &[u8]) -> [u128; 2] {
    let mut hashes = [0u128; 2];
    for (h, page) in hashes.iter_mut().zip(block.chunks(PAGE_SIZE)) {
        *h = crate::migration::digest::page_hash(page);
    }
    hashes
}

/// A read-only view of the image at `path`, as the background verifier reads (the receiver
/// maps its image's own file instead, [`crate::migration::image::PendingImage::read_only_view`]).
pub fn open_view(path: &std::path::Path) -> Result<GuestMemory, crate::memory::MemoryError> {
    GuestMemory::open(path, MapMode::SharedReadOnly)
}

/// Test support shared by the guest kinds' tests.
#[cfg(test)]
pub(super) mod test_support {
    use super::*;
    use crate::migration::digest::PageHashes;

    /// Brings `hashes` up to date with `mem` and marks the pages that changed, as the
    /// codec's workers do when they apply pages.
    pub fn rehash(mem: &GuestMemory, hashes: &PageHashes, touched: &TouchedPages) {
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

    /// Kicks a pass and waits until it is done.
    pub fn run_pass<C: BlockChecks>(bg: &BackgroundVerifier<C>) {
        let before = bg.passes();
        bg.round_applied();
        while bg.passes() == before {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that take nothing for their first `refusals` passes (an image not yet
    /// consistent to read), then everything; counts the pages taken.
    struct Reluctant {
        refusals: u32,
        taken: Arc<AtomicU64>,
    }

    impl BlockChecks for Reluctant {
        fn pass(&mut self, _view: &GuestMemory, pages: &[u64], _: &PassControl) -> usize {
            if self.refusals > 0 {
                self.refusals -= 1;
                return 0;
            }
            self.taken.fetch_add(pages.len() as u64, Ordering::Relaxed);
            pages.len()
        }
    }

    fn started(
        refusals: u32,
    ) -> (
        BackgroundVerifier<Reluctant>,
        Arc<TouchedPages>,
        Arc<AtomicU64>,
    ) {
        let mem = GuestMemory::memfd("wait-covered", 16 * PAGE_SIZE as u64).unwrap();
        let touched = Arc::new(TouchedPages::new(mem.pages()));
        let taken = Arc::new(AtomicU64::new(0));
        let checks = Reluctant {
            refusals,
            taken: Arc::clone(&taken),
        };
        let bg = BackgroundVerifier::start(Arc::new(mem), Arc::clone(&touched), checks).unwrap();
        (bg, touched, taken)
    }

    /// A pass that leaves the pages it was kicked for is kicked again: the wait returns
    /// once they are taken, instead of waiting for a kick nobody sends.
    #[test]
    fn a_wait_outlasts_passes_that_leave_pages() {
        let (bg, touched, taken) = started(3);
        for p in [1, 5, 9] {
            touched.mark(p);
        }
        // Bounded, so that a wait that never ends fails the test instead of hanging it.
        let (done, waited) = mpsc::channel();
        let bg = std::thread::spawn(move || {
            let covered = bg.wait_covered(bg.round_applied());
            let _ = done.send(covered);
            bg
        });
        let covered = waited.recv_timeout(std::time::Duration::from_secs(30));
        assert_eq!(covered, Ok(true), "the wait did not end");
        assert_eq!(taken.load(Ordering::Relaxed), 3);
        assert!(bg.join().unwrap().finish().unwrap().pending.is_empty());
    }

    /// Checks that never take their pages end the wait (false) rather than hang it, and
    /// the pages stay pending for the pause.
    #[test]
    fn a_wait_on_checks_that_never_take_the_pages_gives_up() {
        let (bg, touched, _) = started(u32::MAX);
        touched.mark(4);
        assert!(!bg.wait_covered(bg.round_applied()));
        assert_eq!(bg.finish().unwrap().pending, vec![4]);
    }

    /// Checks that spend `cpu_us` µs of the thread's CPU time and wait `wait_us` µs (as
    /// for a core) per page.
    struct Timed {
        cpu_us: u64,
        wait_us: u64,
    }

    impl BlockChecks for Timed {
        fn pass(&mut self, _view: &GuestMemory, pages: &[u64], _: &PassControl) -> usize {
            let n = pages.len() as u64;
            std::thread::sleep(std::time::Duration::from_micros(self.wait_us * n));
            let start = thread_cpu_time().unwrap();
            let spend = std::time::Duration::from_micros(self.cpu_us * n);
            while thread_cpu_time().unwrap() - start < spend {
                std::hint::spin_loop();
            }
            pages.len()
        }
    }

    fn timed(cpu_us: u64, wait_us: u64) -> (BackgroundVerifier<Timed>, Arc<TouchedPages>) {
        let mem = GuestMemory::memfd("backlog", 2048 * PAGE_SIZE as u64).unwrap();
        let touched = Arc::new(TouchedPages::new(mem.pages()));
        let checks = Timed { cpu_us, wait_us };
        let bg = BackgroundVerifier::start(Arc::new(mem), Arc::clone(&touched), checks).unwrap();
        // A first kick ends round 0's polling: from here on passes run only when kicked.
        super::test_support::run_pass(&bg);
        (bg, touched)
    }

    /// The backlog is the pages not checked yet, at the CPU rate of the recent large
    /// enough passes; before such a pass there is no estimate.
    #[test]
    fn the_backlog_counts_unchecked_pages_at_the_rate_passes_ran() {
        use super::test_support::run_pass;
        let (bg, touched) = timed(20, 0);
        (0..100).for_each(|p| touched.mark(p));
        run_pass(&bg);
        assert_eq!(bg.backlog(), None, "a pass of 100 pages sets no rate");
        (0..1000).for_each(|p| touched.mark(p));
        run_pass(&bg);
        let none_left = bg.backlog().unwrap();
        assert_eq!(none_left.pages, 0);
        (500..1000).for_each(|p| touched.mark(p));
        let b = bg.backlog().unwrap();
        assert_eq!(b.pages, 500);
        // 20 µs of CPU a page at least: the checks spin until they have spent it.
        assert!(
            b.expected >= std::time::Duration::from_micros(20 * 500),
            "{b:?}"
        );
        assert_eq!(bg.finish().unwrap().pending.len(), 500);
    }

    /// Time a pass spends off the CPU (waiting for a core the codec's workers hold during
    /// the rounds) is not counted: the verify at the pause does not wait for one.
    #[test]
    fn the_backlog_rate_leaves_out_time_a_pass_waited() {
        use super::test_support::run_pass;
        let (bg, touched) = timed(1, 50);
        (0..1000).for_each(|p| touched.mark(p));
        run_pass(&bg);
        (0..1000).for_each(|p| touched.mark(p));
        let b = bg.backlog().unwrap();
        assert_eq!(b.pages, 1000);
        // 1 µs of CPU a page and 50 µs of waiting: at the wall clock's rate it would say
        // 51 ms.
        let expected = b.expected;
        assert!(
            expected >= std::time::Duration::from_millis(1)
                && expected < std::time::Duration::from_millis(20),
            "{b:?}"
        );
        assert_eq!(bg.finish().unwrap().pending.len(), 1000);
    }

    /// Checks that check as many of their pages as they are told, saying so, until they
    /// have all or are stopped.
    struct Gated(mpsc::Receiver<usize>);

    impl BlockChecks for Gated {
        fn pass(&mut self, _view: &GuestMemory, pages: &[u64], control: &PassControl) -> usize {
            // Spends some CPU so the pass sets a rate.
            let start = thread_cpu_time().unwrap();
            while thread_cpu_time().unwrap() - start < std::time::Duration::from_millis(1) {
                std::hint::spin_loop();
            }
            let mut checked = 0;
            loop {
                control.checked(checked);
                if checked >= pages.len() || control.stopped() {
                    return checked;
                }
                match self.0.recv_timeout(std::time::Duration::from_millis(10)) {
                    Ok(n) => checked = n.min(pages.len()),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return 0,
                }
            }
        }
    }

    /// Waits for `cond`, failing the test after 30 s rather than hanging it.
    fn until(cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// A pass in progress counts the pages it has not reached yet, whatever its time.
    #[test]
    fn the_backlog_counts_what_a_pass_in_progress_has_not_reached() {
        use super::test_support::run_pass;
        let mem = GuestMemory::memfd("in-pass", 4096 * PAGE_SIZE as u64).unwrap();
        let touched = Arc::new(TouchedPages::new(mem.pages()));
        let (go, gate) = mpsc::channel();
        let bg =
            BackgroundVerifier::start(Arc::new(mem), Arc::clone(&touched), Gated(gate)).unwrap();
        run_pass(&bg);
        (0..1000).for_each(|p| touched.mark(p));
        go.send(1000).unwrap();
        run_pass(&bg);
        assert_eq!(bg.backlog().unwrap().pages, 0);
        // A pass of 3000 pages that has checked 1000 of them: 2000 left, and 10 pages
        // marked since.
        (0..3000).for_each(|p| touched.mark(p));
        go.send(1000).unwrap();
        bg.round_applied();
        let c = &bg.control;
        until(|| {
            c.pages.load(Ordering::Relaxed) == 3000 && c.checked.load(Ordering::Relaxed) == 1000
        });
        (3000..3010).for_each(|p| touched.mark(p));
        assert_eq!(bg.backlog().unwrap().pages, 2010);
        go.send(3000).unwrap();
        until(|| bg.backlog().unwrap().pages == 10);
        assert_eq!(
            bg.finish().unwrap().pending,
            (3000..3010).collect::<Vec<_>>()
        );
    }
}
