//! The parallel sender: pages are sharded over N workers by page number
//! (the same 64-page chunks as the receiver, see [`crate::memory`]), so a
//! page's cache entry is only ever touched by one worker, in push order.
//! Each worker batches its pages into packets; the caller collects them
//! with [`Sender::poll`].
#![forbid(unsafe_code)]

use std::sync::mpsc::{
    channel, sync_channel, Receiver as ChannelReceiver, Sender as ChannelSender, SyncSender,
};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::compress::Compressor;
use crate::encoder::{check_delta, Batch, EncoderConfig, PageEncoder, PageSource};
use crate::error::CodecError;
use crate::format::{PacketWriter, MAX_PAGES_PER_PACKET};
use crate::memory::{owner, page_bit, page_bitmap};
use crate::queue::{bounded, QueueReceiver, QueueSender};
use crate::receiver::default_workers;
use crate::stats::{PipelineStats, WorkerStats};
use crate::PAGE_SIZE;

/// Sender settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderConfig {
    /// Encode worker threads (at least 1).
    pub workers: usize,
    /// Pages per packet (1 to [`MAX_PAGES_PER_PACKET`]; 64 to 256 is the
    /// useful range).
    pub batch_pages: usize,
    /// Batches queued per worker before `push` blocks (default 8; a
    /// blocked `push` is woken when the worker has drained half, so deeper
    /// queues mean fewer wake-ups: 4 -> 8 cut the scaling bench's context
    /// switches from 12.9 k to 7.9 k).
    pub queue_depth: usize,
    /// Guest size in pages (pushes beyond it are refused).
    pub guest_pages: u64,
    /// Classification and compression; a delta `cache_bytes` here is the
    /// total, split evenly between workers.
    pub encoder: EncoderConfig,
}

impl SenderConfig {
    /// Checks the settings a [`Sender`] would refuse, without starting one or allocating
    /// its page cache (an application validating its options before it starts anything
    /// else).
    pub fn validate(&self) -> Result<(), CodecError> {
        let per_worker = self.per_worker_encoder()?;
        Compressor::new(per_worker.compression).map_err(CodecError::Config)?;
        per_worker.delta.as_ref().map_or(Ok(()), check_delta)
    }

    /// Each worker's encoder settings (its share of the page cache), once the
    /// counts are checked.
    fn per_worker_encoder(&self) -> Result<EncoderConfig, CodecError> {
        if self.workers == 0 || self.queue_depth == 0 {
            return Err(CodecError::Config(
                "sender needs at least one worker and a queue depth of 1".into(),
            ));
        }
        if !(1..=MAX_PAGES_PER_PACKET).contains(&self.batch_pages) {
            return Err(CodecError::Config(format!(
                "batch_pages {} outside 1..={MAX_PAGES_PER_PACKET}",
                self.batch_pages
            )));
        }
        let mut per_worker = self.encoder;
        if let Some(d) = &mut per_worker.delta {
            d.cache_bytes /= self.workers;
        }
        Ok(per_worker)
    }

    /// Defaults for a guest of `guest_pages` pages: one worker per core,
    /// 128-page packets, LZ4, XBZRLE+LZ4 deltas with a 64 MiB page cache.
    pub fn new(guest_pages: u64) -> SenderConfig {
        SenderConfig {
            workers: default_workers(),
            batch_pages: 128,
            queue_depth: 8,
            guest_pages,
            encoder: EncoderConfig {
                delta: Some(Default::default()),
                ..Default::default()
            },
        }
    }
}

/// An encoded packet.
#[derive(Debug)]
pub struct Packet {
    /// Sequence number (also in the header).
    pub seq: u64,
    /// Round (also in the header).
    pub round: u64,
    buf: Vec<u8>,
    len: usize,
}

impl Packet {
    /// The packet's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The packet as an exact-length vector.
    pub fn into_vec(mut self) -> Vec<u8> {
        self.buf.truncate(self.len);
        self.buf
    }
}

enum Job {
    Encode { batch: Batch, round: u64, seq: u64 },
    Barrier(SyncSender<(WorkerStats, PipelineStats)>),
}

/// Handle to a running send pipeline.
pub struct Sender {
    config: SenderConfig,
    queues: Vec<QueueSender<Job>>,
    handles: Vec<JoinHandle<()>>,
    pending: Vec<Batch>,
    spare_batches: ChannelReceiver<Batch>,
    spare_buffers: Arc<Mutex<Vec<Vec<u8>>>>,
    packets: ChannelReceiver<Packet>,
    next_seq: u64,
    round: u64,
    failed: Option<CodecError>,
    total: PipelineStats,
    /// Pages pushed in the open round (one bit per guest page).
    pushed: Vec<u64>,
    has_source: bool,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("config", &self.config)
            .field("round", &self.round)
            .finish()
    }
}

impl Sender {
    /// Starts the workers; pages are pushed with their contents
    /// ([`push`](Self::push)).
    pub fn new(config: SenderConfig) -> Result<Sender, CodecError> {
        Sender::start(config, None)
    }

    /// Starts workers that copy page snapshots from `source` themselves, in
    /// parallel; pages are pushed by number ([`push_page`](Self::push_page)).
    pub fn with_source(
        config: SenderConfig,
        source: Arc<dyn PageSource>,
    ) -> Result<Sender, CodecError> {
        Sender::start(config, Some(source))
    }

    fn start(
        config: SenderConfig,
        source: Option<Arc<dyn PageSource>>,
    ) -> Result<Sender, CodecError> {
        let per_worker = config.per_worker_encoder()?;
        let (batch_tx, spare_batches) = channel();
        let (packet_tx, packets) = channel();
        let spare_buffers = Arc::new(Mutex::new(Vec::new()));
        let mut queues = Vec::new();
        let mut handles = Vec::new();
        for index in 0..config.workers {
            let encoder = PageEncoder::new(&per_worker)?;
            let (tx, rx) = bounded(config.queue_depth);
            queues.push(tx);
            let worker = Worker {
                encoder,
                writer: PacketWriter::default(),
                batches: batch_tx.clone(),
                packets: packet_tx.clone(),
                buffers: Arc::clone(&spare_buffers),
                stats: WorkerStats::default(),
                packet_bytes: 0,
                round: None,
                source: source.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("vmstream-enc-{index}"))
                .spawn(move || worker.run(rx))
                .map_err(|e| CodecError::Config(format!("spawning worker: {e}")))?;
            handles.push(handle);
        }
        Ok(Sender {
            pending: (0..config.workers)
                .map(|_| Batch::with_capacity(config.batch_pages))
                .collect(),
            config,
            queues,
            handles,
            spare_batches,
            spare_buffers,
            packets,
            next_seq: 0,
            round: 0,
            failed: None,
            total: PipelineStats::default(),
            pushed: page_bitmap(config.guest_pages),
            has_source: source.is_some(),
        })
    }

    /// The open round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Queues page `page` with contents `snapshot` (one page, copied; the
    /// copy is the snapshot the cache is updated from). Blocks while the
    /// owning worker's queue is full.
    pub fn push(&mut self, page: u64, snapshot: &[u8]) -> Result<(), CodecError> {
        if snapshot.len() != PAGE_SIZE {
            return Err(CodecError::SnapshotLength {
                len: snapshot.len(),
                expected: PAGE_SIZE,
            });
        }
        let w = self.admit(page)?;
        self.pending[w].push(page, snapshot);
        self.after_push(w)
    }

    /// Like [`push`](Self::push), but `fill` writes the page's contents
    /// straight into the batch (one copy of the page fewer for the caller).
    /// When `fill` fails, the page is not queued and its error is returned.
    pub fn push_with<E: From<CodecError>>(
        &mut self,
        page: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let w = self.admit(page)?;
        if let Err(e) = self.pending[w].push_with(page, fill) {
            let (word, bit) = page_bit(page);
            self.pushed[word] &= !bit;
            return Err(e);
        }
        Ok(self.after_push(w)?)
    }

    /// Queues page `page`, to be copied from the [`PageSource`] by a worker
    /// (only for a sender made with [`with_source`](Self::with_source)).
    pub fn push_page(&mut self, page: u64) -> Result<(), CodecError> {
        if !self.has_source {
            return Err(CodecError::Config(
                "push_page needs a sender made with_source".into(),
            ));
        }
        let w = self.admit(page)?;
        self.pending[w].push_number(page);
        self.after_push(w)
    }

    /// Checks a pushed page and returns the worker owning it.
    fn admit(&mut self, page: u64) -> Result<usize, CodecError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if page >= self.config.guest_pages {
            return Err(CodecError::PageOutOfRange {
                page,
                guest_pages: self.config.guest_pages,
            });
        }
        let (word, bit) = page_bit(page);
        if self.pushed[word] & bit != 0 {
            return Err(CodecError::DuplicatePage {
                page,
                round: self.round,
            });
        }
        self.pushed[word] |= bit;
        Ok(owner(page, self.config.workers))
    }

    fn after_push(&mut self, w: usize) -> Result<(), CodecError> {
        if self.pending[w].len() >= self.config.batch_pages {
            self.dispatch(w)?;
        }
        Ok(())
    }

    fn dispatch(&mut self, w: usize) -> Result<(), CodecError> {
        let fresh = self
            .spare_batches
            .try_recv()
            .unwrap_or_else(|_| Batch::with_capacity(self.config.batch_pages));
        let batch = std::mem::replace(&mut self.pending[w], fresh);
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.queues[w]
            .send(Job::Encode {
                batch,
                round: self.round,
                seq,
            })
            .is_err()
        {
            let e = CodecError::WorkerPanicked {
                side: "sender",
                worker: w,
            };
            self.failed = Some(e.clone());
            return Err(e);
        }
        Ok(())
    }

    /// The next finished packet, if any (packets of one round may come out
    /// of sequence order).
    pub fn poll(&mut self) -> Option<Packet> {
        self.packets.try_recv().ok()
    }

    /// Returns a packet's buffer for reuse by the workers.
    pub fn recycle(&mut self, packet: Packet) {
        let mut spare = self.spare_buffers.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < 4 * self.config.workers * self.config.queue_depth {
            spare.push(packet.buf);
        }
    }

    /// Flushes partial batches and waits until every page pushed in this
    /// round is encoded; afterwards [`poll`](Self::poll) yields all of the
    /// round's remaining packets. Opens the next round and returns the
    /// finished round's statistics.
    pub fn end_round(&mut self) -> Result<PipelineStats, CodecError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let start = Instant::now();
        for w in 0..self.config.workers {
            if !self.pending[w].is_empty() {
                self.dispatch(w)?;
            }
        }
        let mut replies = Vec::new();
        for (w, q) in self.queues.iter().enumerate() {
            let (tx, rx) = sync_channel(1);
            if q.send(Job::Barrier(tx)).is_err() {
                self.failed = Some(CodecError::WorkerPanicked {
                    side: "sender",
                    worker: w,
                });
            }
            replies.push(rx);
        }
        let mut stats = PipelineStats {
            rounds: 1,
            workers: vec![WorkerStats::default(); self.config.workers],
            ..Default::default()
        };
        for (w, rx) in replies.into_iter().enumerate() {
            match rx.recv() {
                Ok((worker, part)) => {
                    stats.workers[w] = worker;
                    stats.add(&PipelineStats {
                        workers: Vec::new(),
                        ..part
                    });
                }
                Err(_) => {
                    if self.failed.is_none() {
                        self.failed = Some(CodecError::WorkerPanicked {
                            side: "sender",
                            worker: w,
                        });
                    }
                }
            }
        }
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        stats.times.barrier_wait_ns = start.elapsed().as_nanos() as u64;
        self.round += 1;
        self.pushed.fill(0);
        self.total.add(&stats);
        Ok(stats)
    }

    /// Statistics over all completed rounds.
    pub fn total_stats(&self) -> &PipelineStats {
        &self.total
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.queues.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

struct Worker {
    encoder: PageEncoder,
    writer: PacketWriter,
    batches: ChannelSender<Batch>,
    packets: ChannelSender<Packet>,
    buffers: Arc<Mutex<Vec<Vec<u8>>>>,
    stats: WorkerStats,
    packet_bytes: u64,
    round: Option<u64>,
    source: Option<Arc<dyn PageSource>>,
}

impl Worker {
    fn run(mut self, jobs: QueueReceiver<Job>) {
        while let Some(job) = jobs.recv() {
            match job {
                Job::Encode {
                    mut batch,
                    round,
                    seq,
                } => {
                    let start = Instant::now();
                    if self.round != Some(round) {
                        self.encoder.begin_round(round);
                        self.round = Some(round);
                    }
                    let source = self.source.as_deref();
                    let len = self.encoder.encode_batch_from(
                        round,
                        seq,
                        &batch,
                        source,
                        &mut self.writer,
                    );
                    let spare = self
                        .buffers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .pop()
                        .unwrap_or_default();
                    let buf = self.writer.swap_buffer(spare);
                    self.stats.pages += batch.len() as u64;
                    self.stats.packets += 1;
                    self.packet_bytes += len as u64;
                    batch.clear();
                    // The caller may have gone; nothing to do then.
                    let _ = self.batches.send(batch);
                    let _ = self.packets.send(Packet {
                        seq,
                        round,
                        buf,
                        len,
                    });
                    self.stats.busy_ns += start.elapsed().as_nanos() as u64;
                }
                Job::Barrier(reply) => {
                    let (by_encoding, cache) = self.encoder.take_stats();
                    let mut part = PipelineStats {
                        by_encoding,
                        cache,
                        packets: self.stats.packets,
                        packet_bytes: std::mem::take(&mut self.packet_bytes),
                        ..Default::default()
                    };
                    part.times.busy_ns = self.stats.busy_ns;
                    part.times.checksum_ns = std::mem::take(&mut self.encoder.finish_ns);
                    let _ = reply.send((std::mem::take(&mut self.stats), part));
                }
            }
        }
    }
}
