//! The parallel receiver: N workers decode packets straight into
//! destination memory, with a barrier per round.
//!
//! The submitting thread validates each packet's structure, its round and
//! that none of its pages already arrived this round, then hands it to the
//! worker(s) owning its pages (see [`crate::memory`]). A worker verifies the
//! checksum (unless the dispatcher already did) before writing anything.
//! [`Receiver::end_round`] sends a barrier message down every worker's FIFO
//! queue and waits for all replies: when it returns, every packet submitted
//! before it has been applied, and nothing of the next round can be applied
//! before that because the next round's packets are only submitted after
//! it returns.
#![forbid(unsafe_code)]

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::decoder::{prefetch_zero_target, PageDecoder, Readahead, RoundTracker};
use crate::error::CodecError;
use crate::format::{parse_packet, verify_checksum, Encoding, Limits};
use crate::memory::{owner, page_bit, page_bitmap, split, ShardMemory};
use crate::queue::{bounded, QueueReceiver, QueueSender};
use crate::run_writer::RunWriter;
use crate::stats::{PipelineStats, WorkerStats};
use crate::PAGE_SIZE;

/// Where a [`TestHook`] is called.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPoint {
    /// Before a worker applies a packet; the returned duration is slept.
    BeforeApply,
    /// After a worker applied a packet successfully (return value ignored).
    AfterApply,
}

/// A test hook called as `hook(point, worker, seq)`.
#[doc(hidden)]
pub type TestHook = Arc<dyn Fn(HookPoint, usize, u64) -> Duration + Send + Sync>;

/// Called by the worker that applied a page, with the page number and its
/// new content in destination memory, right after it was written (e.g. to
/// keep a per-page hash of destination memory up to date while rounds
/// arrive). Each page is applied by one worker, so calls for the same page
/// never overlap; a round's calls all happen before its `end_round` returns.
pub type PageObserver = Arc<dyn Fn(u64, &[u8]) + Send + Sync>;

/// Receiver settings.
#[derive(Clone)]
pub struct ReceiverConfig {
    /// Decode worker threads (at least 1).
    pub workers: usize,
    /// Packets queued per worker before `submit` blocks (default 32). A
    /// blocked `submit` is woken once the worker has drained half of its
    /// queue, so a deeper queue means fewer wake-ups, each an
    /// inter-processor interrupt; it bounds how far the dispatcher runs
    /// ahead of the workers.
    pub queue_depth: usize,
    /// Sees every page after it was applied (none: no call).
    pub page_observer: Option<PageObserver>,
    /// Destination memory is all zero when the pipeline starts (a fresh sparse file or
    /// memfd): a zero record for a page no record has written yet is counted but leaves
    /// the page untouched, since even reading a hole of a shared file mapping allocates it.
    pub zeroed_memory: bool,
    /// The file `memory` maps (shared, from its first byte). Whole pages (raw or
    /// compressed records) are then decoded into a buffer and written to the file, one
    /// positional write per run of consecutive pages, instead of through the mapping:
    /// writing a page of a fresh shared mapping first faults it in, and the kernel zeroes
    /// the new page before the decoder overwrites it, one 4 KiB page per fault; a write to
    /// the file allocates the run's pages without either. Deltas and zero records still go
    /// through the mapping (a delta reads the old page). A full file system is an error
    /// ([`CodecError::Write`]) rather than a `SIGBUS`. `None`: every page through the
    /// mapping.
    pub memory_file: Option<Arc<File>>,
    /// Test-only: observes (and delays) packet application.
    #[doc(hidden)]
    pub test_hook: Option<TestHook>,
}

impl std::fmt::Debug for ReceiverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("workers", &self.workers)
            .field("queue_depth", &self.queue_depth)
            .field("page_observer", &self.page_observer.is_some())
            .field("zeroed_memory", &self.zeroed_memory)
            .field("memory_file", &self.memory_file)
            .field("test_hook", &self.test_hook.is_some())
            .finish()
    }
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            workers: default_workers(),
            queue_depth: 32,
            page_observer: None,
            zeroed_memory: false,
            memory_file: None,
            test_hook: None,
        }
    }
}

/// One worker per available core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

enum Job {
    Apply {
        packet: Arc<Vec<u8>>,
        verify_crc: bool,
    },
    Barrier(SyncSender<(WorkerStats, PipelineStats)>),
}

/// State shared by the dispatcher and the workers.
struct Shared {
    failed: AtomicBool,
    error: Mutex<Option<CodecError>>,
}

impl Shared {
    /// Records the first error and stops the pipeline.
    fn fail(&self, e: CodecError) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    fn error(&self) -> CodecError {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or(CodecError::Stopped)
    }
}

/// Handle to a running receive pipeline, lent to the closure given to
/// [`receive`].
pub struct Receiver {
    queues: Vec<QueueSender<Job>>,
    shared: Arc<Shared>,
    tracker: RoundTracker,
    guest_pages: u64,
    round_stats: PipelineStats,
    total: PipelineStats,
    /// Scratch: which workers own pages of the packet being routed.
    owners: Vec<bool>,
}

/// Runs a receive pipeline over `memory` (guest RAM, a whole number of
/// pages) for the duration of `f`, then stops the workers.
///
/// Workers borrow disjoint chunks of `memory` (scoped threads), so the
/// pipeline needs no `unsafe` and nothing else can touch `memory` while it
/// runs. Packets submitted after the last `end_round` are applied before
/// this returns, but only `end_round` reports whether they succeeded.
pub fn receive<R>(
    config: &ReceiverConfig,
    memory: &mut [u8],
    f: impl FnOnce(&mut Receiver) -> R,
) -> Result<R, CodecError> {
    if config.workers == 0 || config.queue_depth == 0 {
        return Err(CodecError::Config(
            "receiver needs at least one worker and a queue depth of 1".into(),
        ));
    }
    if !memory.len().is_multiple_of(PAGE_SIZE) {
        return Err(CodecError::Config(format!(
            "memory of {} bytes is not a whole number of pages",
            memory.len()
        )));
    }
    if let Some(file) = &config.memory_file {
        let len = file
            .metadata()
            .map_err(|e| CodecError::Config(format!("memory file: {e}")))?
            .len();
        if len < memory.len() as u64 {
            return Err(CodecError::Config(format!(
                "memory file of {len} bytes is shorter than the {} bytes of memory",
                memory.len()
            )));
        }
    }
    let guest_pages = (memory.len() / PAGE_SIZE) as u64;
    let workers = config.workers;
    let mut decoders = Vec::with_capacity(workers);
    for _ in 0..workers {
        decoders.push(PageDecoder::new()?);
    }
    let shared = Arc::new(Shared {
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
    });
    std::thread::scope(|scope| {
        let mut queues = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for (index, (shard, decoder)) in
            split(memory, workers).into_iter().zip(decoders).enumerate()
        {
            let (tx, rx) = bounded(config.queue_depth);
            queues.push(tx);
            let worker = Worker {
                index,
                workers,
                guest_pages,
                shard,
                decoder,
                shared: Arc::clone(&shared),
                hook: config.test_hook.clone(),
                observer: config.page_observer.clone(),
                written: config.zeroed_memory.then(|| page_bitmap(guest_pages)),
                run: config.memory_file.clone().map(RunWriter::new),
                stats: WorkerStats::default(),
            };
            // Named, so profiles and `top -H` tell the decoders apart.
            let spawned = std::thread::Builder::new()
                .name(format!("vmstream-dec-{index}"))
                .spawn_scoped(scope, move || worker.run(rx));
            match spawned {
                Ok(handle) => handles.push(handle),
                // Dropping `queues` on return stops the workers already
                // running; the scope joins them.
                Err(e) => return Err(CodecError::Config(format!("spawning worker: {e}"))),
            }
        }
        let mut receiver = Receiver {
            queues,
            shared: Arc::clone(&shared),
            tracker: RoundTracker::new(guest_pages),
            guest_pages,
            round_stats: PipelineStats::default(),
            total: PipelineStats::default(),
            owners: vec![false; workers],
        };
        let result = f(&mut receiver);
        drop(receiver);
        let mut panicked = None;
        for (index, h) in handles.into_iter().enumerate() {
            if h.join().is_err() && panicked.is_none() {
                panicked = Some(CodecError::WorkerPanicked {
                    side: "receiver",
                    worker: index,
                });
            }
        }
        match panicked {
            Some(e) => Err(e),
            None => Ok(result),
        }
    })
}

impl Receiver {
    /// The round packets must belong to now.
    pub fn round(&self) -> u64 {
        self.tracker.round()
    }

    /// Guest size in pages.
    pub fn guest_pages(&self) -> u64 {
        self.guest_pages
    }

    /// Validates `packet` and queues it for decoding; blocks while the
    /// owning workers' queues are full. Any error stops the pipeline: this
    /// and every later call, and `end_round`, return it.
    pub fn submit(&mut self, packet: Vec<u8>) -> Result<(), CodecError> {
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(self.shared.error());
        }
        let start = Instant::now();
        let result = self.dispatch(packet);
        self.round_stats.times.dispatch_ns += start.elapsed().as_nanos() as u64;
        if let Err(e) = &result {
            self.shared.fail(e.clone());
        }
        result
    }

    fn dispatch(&mut self, packet: Vec<u8>) -> Result<(), CodecError> {
        let view = parse_packet(
            &packet,
            Limits {
                guest_pages: self.guest_pages,
                verify_checksum: false,
            },
        )?;
        self.tracker.admit(&view)?;
        self.round_stats.packets += 1;
        self.round_stats.packet_bytes += packet.len() as u64;
        let workers = self.queues.len();
        self.owners.fill(false);
        let mut owner_count = 0;
        for r in view.records() {
            let w = owner(r.page, workers);
            if !self.owners[w] {
                self.owners[w] = true;
                owner_count += 1;
            }
        }
        if owner_count == 0 {
            // An empty packet: nothing to write, but its checksum still counts.
            verify_checksum(&packet, Some(view.header.seq))?;
            return Ok(());
        }
        // One owner verifies the CRC itself, in parallel with other
        // packets; a packet spread over several workers is verified here
        // once, before any of them may write.
        let verify_crc = owner_count == 1;
        if !verify_crc {
            verify_checksum(&packet, Some(view.header.seq))?;
        }
        let packet = Arc::new(packet);
        for w in 0..workers {
            if self.owners[w] {
                let job = Job::Apply {
                    packet: Arc::clone(&packet),
                    verify_crc,
                };
                if self.queues[w].send(job).is_err() {
                    return Err(CodecError::WorkerPanicked {
                        side: "receiver",
                        worker: w,
                    });
                }
            }
        }
        Ok(())
    }

    /// Waits until every packet of round `round` (the open round) has been
    /// applied, then opens round `round + 1`. Returns the round's
    /// statistics, or the first error of the pipeline, in which case the
    /// round must be considered not applied.
    pub fn end_round(&mut self, round: u64) -> Result<PipelineStats, CodecError> {
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(self.shared.error());
        }
        if round != self.tracker.round() {
            return Err(CodecError::RoundMismatch {
                expected: self.tracker.round(),
                got: round,
            });
        }
        let start = Instant::now();
        let mut replies = Vec::with_capacity(self.queues.len());
        for (w, q) in self.queues.iter().enumerate() {
            let (tx, rx) = sync_channel(1);
            if q.send(Job::Barrier(tx)).is_err() {
                self.shared.fail(CodecError::WorkerPanicked {
                    side: "receiver",
                    worker: w,
                });
            }
            replies.push(rx);
        }
        let mut stats = std::mem::take(&mut self.round_stats);
        stats.workers = vec![WorkerStats::default(); self.queues.len()];
        for (w, rx) in replies.into_iter().enumerate() {
            match rx.recv() {
                Ok((worker, pages)) => {
                    stats.workers[w] = worker;
                    stats.add(&PipelineStats {
                        workers: Vec::new(),
                        ..pages
                    });
                }
                Err(_) => self.shared.fail(CodecError::WorkerPanicked {
                    side: "receiver",
                    worker: w,
                }),
            }
        }
        stats.times.barrier_wait_ns += start.elapsed().as_nanos() as u64;
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(self.shared.error());
        }
        self.tracker.end_round(round)?;
        stats.rounds = 1;
        self.total.add(&stats);
        Ok(stats)
    }

    /// Statistics over all completed rounds.
    pub fn total_stats(&self) -> &PipelineStats {
        &self.total
    }
}

struct Worker<'a> {
    index: usize,
    workers: usize,
    guest_pages: u64,
    shard: ShardMemory<'a>,
    decoder: PageDecoder,
    shared: Arc<Shared>,
    hook: Option<TestHook>,
    observer: Option<PageObserver>,
    /// With `zeroed_memory`: a bit per guest page this worker has written.
    written: Option<Vec<u64>>,
    /// With `memory_file`: whole pages decoded and not yet written.
    run: Option<RunWriter>,
    stats: WorkerStats,
}

/// Writes `run` to the memory file and shows its pages to `observer`.
fn flush(run: &mut RunWriter, observer: &Option<PageObserver>) -> Result<(), CodecError> {
    run.flush(|page, content| {
        if let Some(observe) = observer {
            observe(page, content);
        }
    })
    .map_err(|(first, len, e)| CodecError::Write {
        first,
        end: first + len as u64,
        reason: e.to_string(),
    })
}

/// What a never-written page of zeroed memory holds.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

impl Worker<'_> {
    /// With `zeroed_memory`: `page` was never written, so it still reads
    /// as zeros.
    #[inline]
    fn is_hole(&self, page: u64) -> bool {
        let (word, bit) = page_bit(page);
        self.written.as_ref().is_some_and(|w| w[word] & bit == 0)
    }

    fn run(mut self, jobs: QueueReceiver<Job>) {
        let mut checksum_ns = 0u64;
        // A job taken early from the queue (to read its packet ahead); it
        // is still handled next, so the order is the queue's.
        let mut taken: Option<Job> = None;
        while let Some(job) = taken.take().or_else(|| jobs.recv()) {
            match job {
                Job::Apply { packet, verify_crc } => {
                    if self.shared.failed.load(Ordering::SeqCst) {
                        continue; // the round is lost anyway; just drain
                    }
                    taken = jobs.try_recv();
                    let next = match &taken {
                        Some(Job::Apply { packet, .. }) => Some(&packet[..]),
                        _ => None,
                    };
                    let start = Instant::now();
                    if let Err(e) = self.apply(&packet, verify_crc, next, &mut checksum_ns) {
                        self.shared.fail(e);
                    }
                    self.stats.busy_ns += start.elapsed().as_nanos() as u64;
                }
                Job::Barrier(reply) => {
                    let mut pages = PipelineStats {
                        by_encoding: std::mem::take(&mut self.decoder.stats),
                        ..Default::default()
                    };
                    pages.times.busy_ns = self.stats.busy_ns;
                    pages.times.checksum_ns = std::mem::take(&mut checksum_ns);
                    // The dispatcher may have stopped waiting after an error.
                    let _ = reply.send((std::mem::take(&mut self.stats), pages));
                }
            }
        }
    }

    fn apply(
        &mut self,
        packet: &[u8],
        verify_crc: bool,
        next: Option<&[u8]>,
        checksum_ns: &mut u64,
    ) -> Result<(), CodecError> {
        let view = parse_packet(
            packet,
            Limits {
                guest_pages: self.guest_pages,
                verify_checksum: false,
            },
        )?;
        let seq = view.header.seq;
        if let Some(hook) = &self.hook {
            std::thread::sleep(hook(HookPoint::BeforeApply, self.index, seq));
        }
        if verify_crc {
            let start = Instant::now();
            verify_checksum(packet, Some(seq))?;
            *checksum_ns += start.elapsed().as_nanos() as u64;
        }
        self.stats.packets += 1;
        let mut readahead = Readahead::new(next, view.header.page_count as usize);
        let mut records = view.records().peekable();
        while let Some(r) = records.next() {
            readahead.step();
            if owner(r.page, self.workers) != self.index {
                continue;
            }
            if let Some(n) = records.peek() {
                if n.encoding == Encoding::Zero
                    && owner(n.page, self.workers) == self.index
                    && !self.is_hole(n.page)
                {
                    prefetch_zero_target(self.shard.page(n.page));
                }
            }
            let hole = r.encoding == Encoding::Zero && self.is_hole(r.page);
            if r.encoding != Encoding::Zero {
                if let Some(w) = &mut self.written {
                    let (word, bit) = page_bit(r.page);
                    w[word] |= bit;
                }
            }
            if hole {
                // Still zero and unallocated: count it, do not touch it.
                self.decoder.stats.record(Encoding::Zero, PAGE_SIZE, 0, 0);
                if let Some(observe) = &self.observer {
                    observe(r.page, &ZERO_PAGE);
                }
            } else if let Some(run) = self.run.as_mut().filter(|_| r.encoding.is_whole_page()) {
                if !run.extends(r.page) {
                    flush(run, &self.observer)?;
                }
                if let Err(e) = self.decoder.apply_sampled(seq, &r, run.push(r.page)) {
                    run.pop();
                    return Err(e.into());
                }
            } else {
                // Through the mapping, after the pages decoded before it.
                if let Some(run) = &mut self.run {
                    flush(run, &self.observer)?;
                }
                let page = self.shard.page_mut(r.page);
                self.decoder.apply_sampled(seq, &r, page)?;
                if let Some(observe) = &self.observer {
                    observe(r.page, page);
                }
            }
            self.stats.pages += 1;
        }
        // A packet's pages are all written when it is done: the barrier that follows the
        // round's last packet finds them in memory.
        if let Some(run) = &mut self.run {
            flush(run, &self.observer)?;
        }
        if let Some(hook) = &self.hook {
            hook(HookPoint::AfterApply, self.index, seq);
        }
        Ok(())
    }
}
