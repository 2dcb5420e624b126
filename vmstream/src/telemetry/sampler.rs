//! A TPS timeline: reads the guest's transaction counter from guest memory (the sender maps
//! the same file) at a fixed period.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::guest::file::layout::sb;
use crate::memory::{GuestMemory, MapMode, MemoryError};

/// Default sampling period.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(100);

/// One reading of the counter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Time since the sampler started.
    pub at: Duration,
    /// Committed transactions at that time.
    pub tx_count: u64,
    /// Transactions per second since the previous sample (0 for the first).
    pub tps: f64,
}

/// Samples the transaction counter in a background thread until stopped.
#[derive(Debug)]
pub struct TpsSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Sample>>,
}

/// Read the committed-transaction counter of a guest memory mapping. A transaction whose
/// redo record is armed (`JOURNAL_SEQ` one past the counter) is committed: the guest that
/// resumes this memory replays it, so a guest stopped mid-apply counts it too.
pub fn read_tx_count(mem: &GuestMemory) -> u64 {
    let tx = mem.load_u64(sb::TX_COUNT);
    let armed = mem.load_u64(sb::JOURNAL_SEQ);
    if armed == tx.wrapping_add(1) {
        armed
    } else {
        tx
    }
}

impl TpsSampler {
    /// Map the guest memory file read-only and sample it every `period`.
    pub fn start(path: &Path, period: Duration) -> Result<Self, MemoryError> {
        let mem = GuestMemory::open(path, MapMode::SharedReadOnly)?;
        Ok(Self::start_on(mem, period))
    }

    /// Sample an existing mapping every `period`.
    pub fn start_on(mem: GuestMemory, period: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut samples: Vec<Sample> = Vec::new();
            let mut next = start;
            loop {
                let at = start.elapsed();
                let tx_count = read_tx_count(&mem);
                let tps = samples.last().map_or(0.0, |p| {
                    let dt = (at - p.at).as_secs_f64();
                    if dt > 0.0 {
                        tx_count.saturating_sub(p.tx_count) as f64 / dt
                    } else {
                        0.0
                    }
                });
                samples.push(Sample { at, tx_count, tps });
                if flag.load(Ordering::Relaxed) {
                    return samples;
                }
                next += period;
                let now = Instant::now();
                if next > now {
                    std::thread::park_timeout(next - now);
                } else {
                    next = now;
                }
            }
        });
        Self { stop, thread }
    }

    /// Stop sampling (taking one last sample) and return the timeline.
    pub fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.thread().unpark();
        self.thread.join().expect("sampler thread")
    }
}
