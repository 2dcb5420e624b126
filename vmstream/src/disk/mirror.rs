//! Write-through mirroring on a disk's shared bitmap header (`STORAGE.md`, *Mirroring*): a
//! guest write publishes its in-flight slot and waits until the sender says the slot's
//! granules reached the destination, bounded so that a dead or stuck sender never holds the
//! guest; and the guest's write-latency histograms the sender reads.
//!
//! The handshake per slot: the writer, after its `pwrite`, advances the slot's request
//! word and the published counter; the sender, seeing the counter move, reads each slot
//! whose request is ahead of its acknowledgement (the request first, then the slot's
//! granules), reads those granules from the disk, sends them, and once the destination
//! acknowledged stores the request it read as the slot's acknowledgement. The data sent was
//! read after the request was published, so after the `pwrite`: the destination has the
//! write. A writer that gives up (mirroring switched off, the sender's heartbeat stopped,
//! or [`MIRROR_WAIT_MAX`] passed) marks its granules dirty as without mirroring.

use std::ops::Range;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use crate::disk::bitmap::{head, DirtyBitmap, IN_FLIGHT_SLOTS, LATENCY_BUCKETS};

/// A heartbeat that did not move for this long means the sender is gone: the writer stops
/// waiting and switches mirroring off for the writes after it.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(1);
/// Longest a write waits for the mirror, heartbeat or not (a stuck link).
pub const MIRROR_WAIT_MAX: Duration = Duration::from_secs(10);
/// How often the sender's heartbeat should advance (well inside [`HEARTBEAT_STALE`]).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(20);

/// How a write's wait for the mirror ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorWait {
    /// Mirroring is off: the write is marked dirty as usual.
    Off,
    /// The destination has the write.
    Mirrored,
    /// The writer gave up waiting (sender gone or stuck): the write is marked dirty.
    GaveUp,
}

/// The writer's side: after the `pwrite` of the write holding in-flight slot `slot`,
/// publishes it and waits for the sender's acknowledgement (see the module docs).
pub fn await_mirrored(b: &DirtyBitmap, slot: usize) -> MirrorWait {
    let generation = b.head(head::MIRROR).load(SeqCst);
    if generation == 0 {
        return MirrorWait::Off;
    }
    let request = b.head(head::MIRROR_REQUEST + slot).load(SeqCst) + 1;
    b.head(head::MIRROR_REQUEST + slot).store(request, SeqCst);
    b.head(head::MIRROR_PUBLISHED).fetch_add(1, SeqCst);
    let start = Instant::now();
    let (mut beat, mut beat_at) = (b.head(head::MIRROR_HEARTBEAT).load(SeqCst), start);
    let mut spins = 0u32;
    loop {
        if b.head(head::MIRROR_ACK + slot).load(SeqCst) >= request {
            return MirrorWait::Mirrored;
        }
        if b.head(head::MIRROR).load(SeqCst) != generation {
            return MirrorWait::GaveUp;
        }
        let now = Instant::now();
        let current = b.head(head::MIRROR_HEARTBEAT).load(SeqCst);
        if current != beat {
            (beat, beat_at) = (current, now);
        } else if now.duration_since(beat_at) >= HEARTBEAT_STALE {
            // The sender is gone: the writes after this one do not wait for it either.
            let _ = b
                .head(head::MIRROR)
                .compare_exchange(generation, 0, SeqCst, SeqCst);
            return MirrorWait::GaveUp;
        }
        if now.duration_since(start) >= MIRROR_WAIT_MAX {
            return MirrorWait::GaveUp;
        }
        // A round trip on a fast link is tens of microseconds: spin a little, then sleep
        // in growing steps (at most 200 us, a small part of any real round trip).
        spins += 1;
        if spins < 50 {
            std::thread::yield_now();
        } else {
            let step = 10u64 << ((spins - 50) / 20).min(4);
            std::thread::sleep(Duration::from_micros(step.min(200)));
        }
    }
}

/// Counts a write that ended its mirror wait (`bytes`, `outcome`, its latency).
pub(crate) fn count_mirror_outcome(
    b: &DirtyBitmap,
    bytes: u64,
    outcome: MirrorWait,
    latency: Duration,
) {
    match outcome {
        MirrorWait::Off => {}
        MirrorWait::Mirrored => {
            b.head(head::MIRRORED_WRITES).fetch_add(1, SeqCst);
            b.head(head::MIRRORED_BYTES).fetch_add(bytes, SeqCst);
            record_latency(b, head::MIRROR_LATENCY, latency);
        }
        MirrorWait::GaveUp => {
            b.head(head::MIRROR_FALLBACKS).fetch_add(1, SeqCst);
        }
    }
}

/// One write that waits for the mirror: its slot, its request, its granules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorRequest {
    /// The in-flight slot.
    pub slot: usize,
    /// The request the writer published (acknowledged with [`acknowledge`]).
    pub request: u64,
    /// The granules it wrote.
    pub granules: Range<u64>,
}

/// The sender's side: writes wait for the mirror from now on (`generation`: non-zero,
/// different from the previous one).
pub fn start_mirroring(b: &DirtyBitmap, generation: u64) {
    beat(b);
    b.head(head::MIRROR).store(generation.max(1), SeqCst);
}

/// Writes no longer wait for the mirror (those waiting mark their granules dirty).
pub fn stop_mirroring(b: &DirtyBitmap) {
    b.head(head::MIRROR).store(0, SeqCst);
}

/// Whether writes wait for the mirror.
pub fn mirroring(b: &DirtyBitmap) -> bool {
    b.head(head::MIRROR).load(SeqCst) != 0
}

/// Advances the sender's heartbeat.
pub fn beat(b: &DirtyBitmap) {
    b.head(head::MIRROR_HEARTBEAT).fetch_add(1, SeqCst);
}

/// The published counter: when it did not change, no new request waits.
pub fn published(b: &DirtyBitmap) -> u64 {
    b.head(head::MIRROR_PUBLISHED).load(SeqCst)
}

/// The writes waiting for the mirror now. Each request is read before its granules: data
/// read after this call returns was written before the request was published.
pub fn pending_requests(b: &DirtyBitmap) -> Vec<MirrorRequest> {
    (0..IN_FLIGHT_SLOTS)
        .filter_map(|slot| {
            let request = b.head(head::MIRROR_REQUEST + slot).load(SeqCst);
            if request <= b.head(head::MIRROR_ACK + slot).load(SeqCst) {
                return None;
            }
            let granules = b.slot_granules(slot)?;
            Some(MirrorRequest {
                slot,
                request,
                granules,
            })
        })
        .collect()
}

/// The destination has `r`'s granules as read after `r` was taken: its writer may return.
pub fn acknowledge(b: &DirtyBitmap, r: &MirrorRequest) {
    b.head(head::MIRROR_ACK + r.slot)
        .fetch_max(r.request, SeqCst);
}

/// Writes mirrored, their bytes, and writes that gave up waiting (ever).
pub fn mirror_counts(b: &DirtyBitmap) -> (u64, u64, u64) {
    (
        b.head(head::MIRRORED_WRITES).load(SeqCst),
        b.head(head::MIRRORED_BYTES).load(SeqCst),
        b.head(head::MIRROR_FALLBACKS).load(SeqCst),
    )
}

/// The histogram bucket of `latency` (see [`LATENCY_BUCKETS`]).
fn bucket(latency: Duration) -> usize {
    let us = latency.as_secs_f64() * 1e6;
    if us < 1.0 {
        return 0;
    }
    ((2.0 * us.log2()) as usize).min(LATENCY_BUCKETS - 1)
}

/// Counts a write of `latency` in the histogram at header word `at`.
pub(crate) fn record_latency(b: &DirtyBitmap, at: usize, latency: Duration) {
    b.head(at + bucket(latency)).fetch_add(1, SeqCst);
}

/// Which of the guest's write latencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatencyOf {
    /// Every write through the block layer.
    AllWrites,
    /// The writes that were mirrored.
    MirroredWrites,
}

/// A write-latency histogram as read from a bitmap header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latencies(pub [u64; LATENCY_BUCKETS]);

impl Latencies {
    /// The histogram `of` in `b` now.
    pub fn read(b: &DirtyBitmap, of: LatencyOf) -> Latencies {
        let at = match of {
            LatencyOf::AllWrites => head::WRITE_LATENCY,
            LatencyOf::MirroredWrites => head::MIRROR_LATENCY,
        };
        Latencies(std::array::from_fn(|i| b.head(at + i).load(SeqCst)))
    }

    /// The writes counted since `earlier` was read.
    pub fn since(&self, earlier: &Latencies) -> Latencies {
        Latencies(std::array::from_fn(|i| {
            self.0[i].saturating_sub(earlier.0[i])
        }))
    }

    /// Writes counted.
    pub fn count(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The `q` quantile (0..=1) in microseconds: the geometric middle of its bucket (within
    /// 20 %); `None` without writes.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &c) in self.0.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(2f64.powf((b as f64 + 0.5) / 2.0));
            }
        }
        None
    }
}

#[cfg(test)]
#[path = "mirror_tests.rs"]
mod tests;
