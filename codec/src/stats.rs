//! Counters the pipelines report per round and in total. All structs are
//! serde-serializable so they can feed migration statistics directly.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

use crate::format::Encoding;

/// One page in this many is timed for [`EncodingStats::nanos`].
pub const TIMED_EVERY: u64 = 16;

/// Whether the page at `index` of packet `seq` is one of the timed ones
/// (the packet's sequence number shifts the choice, so that every position
/// of a packet gets timed).
#[inline]
pub(crate) fn is_timed(seq: u64, index: u64) -> bool {
    seq.wrapping_add(index).is_multiple_of(TIMED_EVERY)
}

/// Pages and bytes of one encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodingStats {
    /// Pages sent with this encoding.
    pub pages: u64,
    /// Page bytes in (pages × page size).
    pub bytes_in: u64,
    /// Payload bytes on the wire (record headers excluded).
    pub bytes_out: u64,
    /// Time spent encoding (sender, including the snapshot copy from a
    /// page source) or decoding (receiver) these pages, in nanoseconds.
    /// Estimated: one page in [`TIMED_EVERY`] is timed and counts that many
    /// times (a clock read costs 40 to 90 ns on a VM, a few percent of an
    /// LZ4 page).
    pub nanos: u64,
}

impl EncodingStats {
    fn add(&mut self, o: &EncodingStats) {
        self.pages += o.pages;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.nanos += o.nanos;
    }
}

/// [`EncodingStats`] for every encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByEncoding {
    /// All-zero pages.
    pub zero: EncodingStats,
    /// Raw pages.
    pub raw: EncodingStats,
    /// LZ4 pages.
    pub lz4: EncodingStats,
    /// zstd pages.
    pub zstd: EncodingStats,
    /// Deflate pages.
    pub zlib: EncodingStats,
    /// XBZRLE deltas.
    pub xbzrle: EncodingStats,
    /// LZ4 of XOR deltas.
    pub xor_lz4: EncodingStats,
    /// LZ4 of XBZRLE deltas.
    pub xbzrle_lz4: EncodingStats,
}

impl ByEncoding {
    /// The entry for `e`.
    pub fn get(&self, e: Encoding) -> &EncodingStats {
        match e {
            Encoding::Zero => &self.zero,
            Encoding::Raw => &self.raw,
            Encoding::Lz4 => &self.lz4,
            Encoding::Zstd => &self.zstd,
            Encoding::Zlib => &self.zlib,
            Encoding::Xbzrle => &self.xbzrle,
            Encoding::XorLz4 => &self.xor_lz4,
            Encoding::XbzrleLz4 => &self.xbzrle_lz4,
        }
    }

    /// The mutable entry for `e`.
    pub fn get_mut(&mut self, e: Encoding) -> &mut EncodingStats {
        match e {
            Encoding::Zero => &mut self.zero,
            Encoding::Raw => &mut self.raw,
            Encoding::Lz4 => &mut self.lz4,
            Encoding::Zstd => &mut self.zstd,
            Encoding::Zlib => &mut self.zlib,
            Encoding::Xbzrle => &mut self.xbzrle,
            Encoding::XorLz4 => &mut self.xor_lz4,
            Encoding::XbzrleLz4 => &mut self.xbzrle_lz4,
        }
    }

    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &ByEncoding) {
        for e in Encoding::ALL {
            self.get_mut(e).add(o.get(e));
        }
    }

    /// Sum over all encodings.
    pub fn total(&self) -> EncodingStats {
        let mut t = EncodingStats::default();
        for e in Encoding::ALL {
            t.add(self.get(e));
        }
        t
    }

    /// Records one page.
    pub fn record(&mut self, e: Encoding, bytes_in: usize, bytes_out: usize, nanos: u64) {
        let s = self.get_mut(e);
        s.pages += 1;
        s.bytes_in += bytes_in as u64;
        s.bytes_out += bytes_out as u64;
        s.nanos += nanos;
    }
}

/// How each dirty page the sender offered to its XBZRLE/XOR page cache ended: sent as a
/// delta, sent whole (not cached, or its delta too large) or not sent (unchanged). Not
/// the cache's own counters (lookups, inserts, evictions): those are
/// [`vmstream_xbzrle::CacheStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheOutcomes {
    /// Pages found in the cache and sent as a delta.
    pub hits: u64,
    /// Pages not in the cache (sent full).
    pub misses: u64,
    /// Pages in the cache whose delta was too large (sent full).
    pub overflows: u64,
    /// Dirty pages identical to the cached copy (nothing sent).
    pub unchanged: u64,
}

impl CacheOutcomes {
    fn add(&mut self, o: &CacheOutcomes) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.overflows += o.overflows;
        self.unchanged += o.unchanged;
    }
}

/// Time per stage, in nanoseconds, summed over workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTimes {
    /// Sender: whole-batch encode time (classification, deltas,
    /// compression, packet assembly). Receiver: whole-packet apply time.
    pub busy_ns: u64,
    /// Sender: packet finishing (record table, header, CRC). Receiver:
    /// CRC verification.
    pub checksum_ns: u64,
    /// Receiver only: validation and routing in the submitting thread.
    pub dispatch_ns: u64,
    /// Time the caller waited in `end_round` for the workers.
    pub barrier_wait_ns: u64,
}

impl StageTimes {
    fn add(&mut self, o: &StageTimes) {
        self.busy_ns += o.busy_ns;
        self.checksum_ns += o.checksum_ns;
        self.dispatch_ns += o.dispatch_ns;
        self.barrier_wait_ns += o.barrier_wait_ns;
    }
}

/// What one worker did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Pages handled.
    pub pages: u64,
    /// Packets produced (sender) or applied (receiver).
    pub packets: u64,
    /// Time spent working, in nanoseconds.
    pub busy_ns: u64,
}

impl WorkerStats {
    fn add(&mut self, o: &WorkerStats) {
        self.pages += o.pages;
        self.packets += o.packets;
        self.busy_ns += o.busy_ns;
    }
}

/// Statistics of a pipeline over one round or a whole migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineStats {
    /// Rounds covered.
    pub rounds: u64,
    /// Pages by encoding.
    pub by_encoding: ByEncoding,
    /// Page cache outcomes (sender only).
    pub cache: CacheOutcomes,
    /// Packets.
    pub packets: u64,
    /// Packet bytes on the wire (headers, tables, payloads, CRCs).
    pub packet_bytes: u64,
    /// Time per stage.
    pub times: StageTimes,
    /// Per worker.
    pub workers: Vec<WorkerStats>,
}

impl PipelineStats {
    /// Adds `o` into `self` (worker lists are added index by index).
    pub fn add(&mut self, o: &PipelineStats) {
        self.rounds += o.rounds;
        self.by_encoding.add(&o.by_encoding);
        self.cache.add(&o.cache);
        self.packets += o.packets;
        self.packet_bytes += o.packet_bytes;
        self.times.add(&o.times);
        if self.workers.len() < o.workers.len() {
            self.workers.resize(o.workers.len(), WorkerStats::default());
        }
        for (a, b) in self.workers.iter_mut().zip(&o.workers) {
            a.add(b);
        }
    }

    /// Page bytes in divided by packet bytes out (0 when nothing was sent).
    pub fn compression_ratio(&self) -> f64 {
        if self.packet_bytes == 0 {
            0.0
        } else {
            self.by_encoding.total().bytes_in as f64 / self.packet_bytes as f64
        }
    }

    /// Pages counted over all encodings.
    pub fn pages(&self) -> u64 {
        self.by_encoding.total().pages
    }
}
