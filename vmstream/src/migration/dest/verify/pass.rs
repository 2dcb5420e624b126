//! How far and how fast the background verifier's passes go: what a pass in progress
//! shares with the verifier ([`PassControl`]) and the CPU time per page the backlog is
//! priced at ([`PassRates`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What a pass in progress shares with the verifier: the stop flag it obeys, and how far it
/// got (the backlog counts the rest).
#[derive(Default)]
pub struct PassControl {
    pub(super) stop: AtomicBool,
    /// Pages the pass in progress took (0 between passes), and how many of them (a
    /// prefix) it has checked.
    pub(super) pages: AtomicU64,
    pub(super) checked: AtomicU64,
    /// How far a timed pass in progress got, for the rate (see [`Self::progress`]).
    timing: std::sync::Mutex<Option<PassTiming>>,
}

/// A timed pass in progress: the thread's CPU time when it started, and its pages checked
/// and CPU time spent at the latest sample (with whether it runs during round 0).
#[derive(Clone, Copy)]
pub(super) struct PassTiming {
    pub(super) start_cpu: std::time::Duration,
    pub(super) sampled: TimedPass,
}

/// Pages between two samples of a pass's CPU time (a system call each).
const SAMPLE_PAGES: u64 = 1024;

impl PassControl {
    /// Whether the pass is to return now (the pause wants what it learned).
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The pass has checked the first `n` of its pages.
    pub fn checked(&self, n: usize) {
        let n = n as u64;
        let before = self.checked.swap(n, Ordering::Relaxed);
        if n / SAMPLE_PAGES != before / SAMPLE_PAGES {
            let mut timing = self.timing.lock().unwrap_or_else(|e| e.into_inner());
            if let (Some(t), Some(cpu)) = (timing.as_mut(), thread_cpu_time()) {
                t.sampled = TimedPass {
                    pages: n,
                    cpu: cpu.saturating_sub(t.start_cpu),
                    bulk: t.sampled.bulk,
                };
            }
        }
    }

    /// A timed pass starts (`None`: an untimed one, or none).
    pub(super) fn time(&self, timing: Option<PassTiming>) {
        *self.timing.lock().unwrap_or_else(|e| e.into_inner()) = timing;
    }

    /// What the timed pass in progress has shown of its rate so far, if it checked enough
    /// pages to say: a pass far slower than the earlier ones (the first after round 0,
    /// over the pages the guest rewrites) would otherwise count at their rate until it
    /// ends, which may be after the pause.
    pub(super) fn progress(&self) -> Option<TimedPass> {
        let timing = *self.timing.lock().unwrap_or_else(|e| e.into_inner());
        timing
            .map(|t| t.sampled)
            .filter(|p| p.pages >= RATE_MIN_PAGES as u64)
    }

    /// Pages of the pass in progress not checked yet.
    pub(super) fn unchecked(&self) -> u64 {
        let pages = self.pages.load(Ordering::Relaxed);
        pages.saturating_sub(self.checked.load(Ordering::Relaxed))
    }
}

/// The calling thread's CPU time so far (None if the clock fails).
pub(super) fn thread_cpu_time() -> Option<std::time::Duration> {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .ok()
        .map(std::time::Duration::from)
}

/// How fast the background's recent passes checked pages: their CPU time per page, over
/// the latest timed passes covering at least [`RATE_WINDOW_PAGES`].
///
/// CPU time, not the wall clock's: during the rounds a pass shares the two cores with the
/// codec's workers, and its wall time says more of them than of the pages (a 4 GiB KVM
/// guest's passes took 1.5-4x their CPU time), while the verify at the pause has the
/// cores (a migration's passes run on the verifier's thread alone, so its CPU time is
/// theirs). Recent passes, and none of round 0's once a later one is timed: round 0's passes
/// over pages the guest never wrote cost a third of later ones over its data. A window,
/// not the slowest pass: one pass of a few thousand pages at 3-5x the usual cost kept the
/// estimate several times too high for the rest of the migration.
#[derive(Default)]
pub(super) struct PassRates(std::sync::Mutex<std::collections::VecDeque<TimedPass>>);

/// One timed pass: its pages and CPU time, and whether it ran during round 0.
#[derive(Clone, Copy)]
pub(super) struct TimedPass {
    pub(super) pages: u64,
    pub(super) cpu: std::time::Duration,
    pub(super) bulk: bool,
}

/// The pages the rate is taken over (256 MiB).
const RATE_WINDOW_PAGES: u64 = 65536;

impl PassRates {
    pub(super) fn record(&self, pass: TimedPass) {
        let mut passes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !pass.bulk {
            passes.retain(|p| !p.bulk);
        }
        passes.push_back(pass);
        // Drop the oldest while the rest still cover the window.
        let mut total: u64 = passes.iter().map(|p| p.pages).sum();
        while passes.len() > 1 && total - passes[0].pages >= RATE_WINDOW_PAGES {
            total -= passes[0].pages;
            passes.pop_front();
        }
    }

    /// Picoseconds of CPU time per page over the window and `in_progress` (a pass not
    /// done yet, as far as it got), or None before a pass was timed.
    pub(super) fn cpu_ps_per_page(&self, in_progress: Option<TimedPass>) -> Option<u64> {
        let passes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let after_round0 = in_progress.is_some_and(|p| !p.bulk);
        let counted = || {
            passes
                .iter()
                .filter(move |p| !(after_round0 && p.bulk))
                .chain(in_progress.iter())
        };
        let pages: u64 = counted().map(|p| p.pages).sum();
        if pages == 0 {
            return None;
        }
        let cpu: std::time::Duration = counted().map(|p| p.cpu).sum();
        // At least 1: a backlog is never free.
        Some((cpu.as_nanos() * 1000 / u128::from(pages)).clamp(1, u128::from(u64::MAX)) as u64)
    }
}

/// A pass of fewer pages says little about the rate (fixed costs dominate).
pub(super) const RATE_MIN_PAGES: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    /// The rate is that of the latest passes covering the window: round 0's cheap passes
    /// over pages the guest never wrote go once a later pass is timed, and a slow outlier
    /// ages out.
    #[test]
    fn the_rate_follows_the_passes_of_the_window() {
        let ms = std::time::Duration::from_millis;
        let rates = PassRates::default();
        assert_eq!(rates.cpu_ps_per_page(None), None);
        let pass = |pages, cpu, bulk| TimedPass { pages, cpu, bulk };
        // Round 0: 100,000 pages at 10 ns a page.
        rates.record(pass(100_000, ms(1), true));
        assert_eq!(rates.cpu_ps_per_page(None), Some(10_000));
        // The first pass after it replaces it, however small.
        rates.record(pass(1_000, ms(10), false));
        assert_eq!(rates.cpu_ps_per_page(None), Some(10_000_000));
        // Passes at about 1 µs a page: once they cover the window alone, the outlier is out.
        let half = RATE_WINDOW_PAGES / 2;
        rates.record(pass(half, ms(32), false));
        let cpu = rates.cpu_ps_per_page(None).unwrap();
        assert!(cpu > 976_562, "the outlier no longer counts: {cpu}");
        rates.record(pass(half, ms(32), false));
        assert_eq!(rates.cpu_ps_per_page(None), Some(976_562));
    }

    /// A pass in progress counts as far as it got, and the first after round 0 puts round
    /// 0's passes out of the rate at once.
    #[test]
    fn a_pass_in_progress_counts_in_the_rate() {
        let ms = std::time::Duration::from_millis;
        let rates = PassRates::default();
        let pass = |pages, cpu, bulk| TimedPass { pages, cpu, bulk };
        rates.record(pass(100_000, ms(1), true));
        assert_eq!(rates.cpu_ps_per_page(None), Some(10_000));
        // Another round 0 pass, at 1 µs a page, in progress.
        assert_eq!(
            rates.cpu_ps_per_page(Some(pass(100_000, ms(100), true))),
            Some(505_000)
        );
        // The first pass after round 0, at 2 µs a page so far.
        assert_eq!(
            rates.cpu_ps_per_page(Some(pass(5_000, ms(10), false))),
            Some(2_000_000)
        );
    }
}
