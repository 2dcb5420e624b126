//! Page classification and packetizing on the sender, one thread's worth.
//!
//! Cheapest first: zero page, delta against the page cache (XBZRLE or LZ4 of
//! the XOR, see [`DeltaMode`]), full page compressed with the configured
//! method, raw when compression does not shrink the page. Every path keeps
//! the page cache equal to what the destination will hold, following
//! [`vmstream_xbzrle::sender`]'s rules.
#![forbid(unsafe_code)]

use std::time::Instant;

use vmstream_simd::AlignedBuf;
use vmstream_xbzrle::{DeltaEncoder, PageCache, PageOutcome};

use crate::compress::{Compression, Compressor};
use crate::decoder::xor_into;
use crate::error::CodecError;
use crate::format::{Encoding, PacketWriter};
use crate::stats::{is_timed, ByEncoding, CacheOutcomes, TIMED_EVERY};
use crate::PAGE_SIZE;

/// Which delta encoding pages found in the cache use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeltaMode {
    /// QEMU's XBZRLE only (what a QEMU peer understands).
    Xbzrle,
    /// XBZRLE, then LZ4 of the delta when that is smaller (per page);
    /// vmstream peers only. The best ratio on the real corpora (DESIGN.md).
    XbzrleLz4,
    /// LZ4 of `old XOR new` (vmstream peers only).
    XorLz4,
    /// The smallest of XBZRLE, XBZRLE+LZ4 and XOR+LZ4 per page (vmstream
    /// peers only; costs both encodings).
    Smallest,
}

/// Delta (page cache) settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeltaConfig {
    /// Page cache size in bytes, for this encoder (the pipeline divides
    /// its total between workers).
    pub cache_bytes: usize,
    /// Largest delta worth sending, in bytes; a larger one sends the page
    /// whole (compressed). Must be below the page size.
    pub max_delta: usize,
    /// Which delta encoding to use.
    pub mode: DeltaMode,
    /// Whether pages sent whole in round 0 enter the cache. Filling it costs the sender a
    /// copy (and on a fresh cache a page fault) per page; not filling it (QEMU's bulk
    /// stage) sends a page the guest rewrites whole once more before deltas start. Worth
    /// it when the sender's CPU bounds round 0, not the link (no compression).
    #[serde(default = "fills_round0")]
    pub fill_in_round0: bool,
}

fn fills_round0() -> bool {
    true
}

impl Default for DeltaConfig {
    fn default() -> Self {
        DeltaConfig {
            cache_bytes: crate::DEFAULT_CACHE_BYTES,
            max_delta: PAGE_SIZE / 2,
            mode: DeltaMode::Xbzrle,
            fill_in_round0: true,
        }
    }
}

/// Settings of a [`PageEncoder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct EncoderConfig {
    /// Compressor for full pages.
    pub compression: Compression,
    /// Page cache and deltas; `None` sends every non-zero page whole.
    pub delta: Option<DeltaConfig>,
}

/// Classifies pages and writes them into packets. One per worker thread;
/// owns its compression context, page cache shard and scratch buffers.
pub struct PageEncoder {
    compressor: Compressor,
    full_encoding: Encoding,
    delta: Option<(DeltaEncoder, DeltaConfig)>,
    /// Whether pages sent whole enter the cache in this round (see
    /// [`DeltaConfig::fill_in_round0`]).
    filling: bool,
    /// XOR of old and new page.
    xor: AlignedBuf,
    /// XBZRLE delta before it is (maybe) LZ4-compressed.
    alt: AlignedBuf,
    /// A page copied from a [`PageSource`].
    snapshot: AlignedBuf,
    /// Pages encoded, by encoding.
    pub stats: ByEncoding,
    /// Cache outcomes.
    pub cache: CacheOutcomes,
    /// Time spent finishing packets (record table, header, CRC), ns.
    pub finish_ns: u64,
}

impl std::fmt::Debug for PageEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageEncoder")
            .field("compressor", &self.compressor)
            .field("delta", &self.delta.as_ref().map(|d| d.1))
            .finish()
    }
}

/// Refuses delta settings [`PageEncoder::new`] would refuse, allocating nothing.
pub(crate) fn check_delta(d: &DeltaConfig) -> Result<(), CodecError> {
    if d.max_delta < 2 || d.max_delta >= PAGE_SIZE {
        return Err(CodecError::Config(format!(
            "max_delta {} outside 2..{PAGE_SIZE}",
            d.max_delta
        )));
    }
    PageCache::check(d.cache_bytes, PAGE_SIZE)
        .map_err(|e| CodecError::Config(format!("page cache: {e}")))
}

impl PageEncoder {
    /// An encoder for `config`.
    pub fn new(config: &EncoderConfig) -> Result<PageEncoder, CodecError> {
        let compressor = Compressor::new(config.compression).map_err(CodecError::Config)?;
        let delta = match config.delta {
            None => None,
            Some(d) => {
                check_delta(&d)?;
                let cache = PageCache::new(d.cache_bytes, PAGE_SIZE)
                    .map_err(|e| CodecError::Config(format!("page cache: {e}")))?;
                Some((DeltaEncoder::new(cache), d))
            }
        };
        Ok(PageEncoder {
            compressor,
            full_encoding: config.compression.encoding(),
            filling: config.delta.is_none_or(|d| d.fill_in_round0),
            delta,
            xor: AlignedBuf::zeroed(PAGE_SIZE),
            alt: AlignedBuf::zeroed(PAGE_SIZE),
            snapshot: AlignedBuf::zeroed(PAGE_SIZE),
            stats: ByEncoding::default(),
            cache: CacheOutcomes::default(),
            finish_ns: 0,
        })
    }

    /// Starts round `round` (the page cache's generation).
    pub fn begin_round(&mut self, round: u64) {
        if let Some((d, cfg)) = &mut self.delta {
            d.set_generation(round);
            self.filling = round > 0 || cfg.fill_in_round0;
        }
    }

    /// Encodes page `page` from `snapshot` (exactly one page, a stable copy:
    /// the cache is updated from it) into `writer`. A page identical to its
    /// cached copy adds no record. Returns the encoding used, or `None`
    /// when nothing needs sending.
    pub fn encode_page(
        &mut self,
        page: u64,
        snapshot: &[u8],
        writer: &mut PacketWriter,
    ) -> Option<Encoding> {
        debug_assert_eq!(snapshot.len(), PAGE_SIZE);
        if is_zero_page(snapshot) {
            // Only a cached copy can disagree with the destination, so only
            // then must the cache learn about the zero page. Not caching
            // new zero pages (QEMU does the same during its first pass)
            // saves a 4 KiB clear per page and keeps slots for pages with
            // data.
            if let Some((d, _)) = &mut self.delta {
                if d.cache().contains(page) {
                    d.note_zero_page(page);
                }
            }
            writer.commit(page, Encoding::Zero, 0);
            self.stats.record(Encoding::Zero, PAGE_SIZE, 0, 0);
            return Some(Encoding::Zero);
        }
        // Not filling: a page not cached goes whole and stays out of the cache (the lookup
        // only then: it is the hot path).
        let stays_out = !self.filling
            && self
                .delta
                .as_ref()
                .is_some_and(|(d, _)| !d.cache().contains(page));
        let encoding = match self.delta.as_ref().map(|d| d.1.mode) {
            _ if stays_out => {
                self.cache.misses += 1;
                self.compress_full(page, snapshot, writer)
            }
            None => self.encode_full(page, snapshot, writer),
            Some(DeltaMode::Xbzrle) => self.encode_xbzrle(page, snapshot, writer)?,
            Some(DeltaMode::XbzrleLz4) => self.encode_xbzrle_lz4(page, snapshot, writer)?,
            Some(mode) => self.encode_xor(page, snapshot, writer, mode)?,
        };
        let len = writer.last_len();
        self.stats.record(encoding, PAGE_SIZE, len, 0);
        Some(encoding)
    }

    /// XBZRLE through the DeltaEncoder, which updates the cache itself.
    fn encode_xbzrle(
        &mut self,
        page: u64,
        snapshot: &[u8],
        writer: &mut PacketWriter,
    ) -> Option<Encoding> {
        let (d, cfg) = self.delta.as_mut().expect("delta configured");
        let out = &mut writer.payload_space()[..cfg.max_delta];
        match d.encode_page(page, snapshot, out) {
            PageOutcome::Unchanged => {
                self.cache.unchanged += 1;
                return None;
            }
            PageOutcome::Delta(n) => {
                self.cache.hits += 1;
                writer.commit(page, Encoding::Xbzrle, n);
                return Some(Encoding::Xbzrle);
            }
            PageOutcome::Overflow => self.cache.overflows += 1,
            PageOutcome::Miss => self.cache.misses += 1,
        }
        Some(self.compress_full(page, snapshot, writer))
    }

    /// XBZRLE through the DeltaEncoder with the whole page as budget, then
    /// LZ4 of the delta when smaller; sent only if within `max_delta`.
    fn encode_xbzrle_lz4(
        &mut self,
        page: u64,
        snapshot: &[u8],
        writer: &mut PacketWriter,
    ) -> Option<Encoding> {
        let (d, cfg) = self.delta.as_mut().expect("delta configured");
        let max = cfg.max_delta;
        match d.encode_page(page, snapshot, &mut self.alt[..PAGE_SIZE - 1]) {
            PageOutcome::Unchanged => {
                self.cache.unchanged += 1;
                return None;
            }
            PageOutcome::Delta(n) => {
                // The cache already equals `snapshot`, whatever goes out.
                let out = &mut writer.payload_space()[..max];
                if let Some(m) = self
                    .compressor
                    .compress_delta(&self.alt[..n], out)
                    .filter(|&m| m < n)
                {
                    self.cache.hits += 1;
                    writer.commit(page, Encoding::XbzrleLz4, m);
                    return Some(Encoding::XbzrleLz4);
                }
                if n <= max {
                    self.cache.hits += 1;
                    writer.push(page, Encoding::Xbzrle, &self.alt[..n]);
                    return Some(Encoding::Xbzrle);
                }
                self.cache.overflows += 1;
            }
            PageOutcome::Overflow => self.cache.overflows += 1,
            PageOutcome::Miss => self.cache.misses += 1,
        }
        Some(self.compress_full(page, snapshot, writer))
    }

    /// LZ4 of the XOR (or the smallest candidate); the cache is
    /// updated with `note_full_page` whatever was sent.
    fn encode_xor(
        &mut self,
        page: u64,
        snapshot: &[u8],
        writer: &mut PacketWriter,
        mode: DeltaMode,
    ) -> Option<Encoding> {
        let (d, cfg) = self.delta.as_mut().expect("delta configured");
        let max = cfg.max_delta;
        let Some(old) = d.cache().peek(page) else {
            self.cache.misses += 1;
            return Some(self.encode_full(page, snapshot, writer));
        };
        self.xor.copy_from_slice(old);
        xor_into(&mut self.xor, snapshot);
        if vmstream_simd::is_zero(&self.xor) {
            self.cache.unchanged += 1;
            return None;
        }
        let out = &mut writer.payload_space()[..max];
        let mut chosen = self
            .compressor
            .compress_delta(&self.xor, out)
            .map(|n| (Encoding::XorLz4, n));
        if mode == DeltaMode::Smallest {
            // XBZRLE into `alt`; its LZ4 into `xor`, which is free now.
            if let Ok(n) = vmstream_xbzrle::encode(old, snapshot, &mut self.alt[..PAGE_SIZE - 1]) {
                let lz = self
                    .compressor
                    .compress_delta(&self.alt[..n], &mut self.xor[..max]);
                let best = chosen.map_or(max + 1, |c| c.1);
                match lz {
                    Some(m) if m < n && m < best => {
                        out[..m].copy_from_slice(&self.xor[..m]);
                        chosen = Some((Encoding::XbzrleLz4, m));
                    }
                    _ if n < best && n <= max => {
                        out[..n].copy_from_slice(&self.alt[..n]);
                        chosen = Some((Encoding::Xbzrle, n));
                    }
                    _ => {}
                }
            }
        }
        match chosen {
            Some((encoding, n)) => {
                self.cache.hits += 1;
                d.note_full_page(page, snapshot);
                writer.commit(page, encoding, n);
                Some(encoding)
            }
            None => {
                self.cache.overflows += 1;
                Some(self.encode_full(page, snapshot, writer))
            }
        }
    }

    /// A full page outside the DeltaEncoder: compress, then tell the cache.
    fn encode_full(&mut self, page: u64, snapshot: &[u8], writer: &mut PacketWriter) -> Encoding {
        let encoding = self.compress_full(page, snapshot, writer);
        if let Some((d, _)) = &mut self.delta {
            d.note_full_page(page, snapshot);
        }
        encoding
    }

    /// Compressed when that shrinks the page, raw otherwise.
    fn compress_full(&mut self, page: u64, snapshot: &[u8], writer: &mut PacketWriter) -> Encoding {
        let out = &mut writer.payload_space()[..PAGE_SIZE - 1];
        match self.compressor.compress(snapshot, out) {
            Some(n) => {
                writer.commit(page, self.full_encoding, n);
                self.full_encoding
            }
            None => {
                writer.push(page, Encoding::Raw, snapshot);
                Encoding::Raw
            }
        }
    }

    /// Encodes every page of `batch` into one packet of round `round` with
    /// sequence number `seq`; returns the packet length (the packet is
    /// `writer.buffer()[..len]`).
    pub fn encode_batch(
        &mut self,
        round: u64,
        seq: u64,
        batch: &Batch,
        writer: &mut PacketWriter,
    ) -> usize {
        self.encode_batch_from(round, seq, batch, None, writer)
    }

    /// Like [`encode_batch`](Self::encode_batch); pages pushed by number
    /// ([`Batch::push_number`]) are copied from `source` into a scratch
    /// page (the snapshot the cache is updated from) and encoded from
    /// there.
    ///
    /// # Panics
    /// When the batch holds pages pushed by number and `source` is `None`.
    pub fn encode_batch_from(
        &mut self,
        round: u64,
        seq: u64,
        batch: &Batch,
        source: Option<&dyn PageSource>,
        writer: &mut PacketWriter,
    ) -> usize {
        writer.begin(batch.len());
        let mut snapshot = std::mem::take(&mut self.snapshot);
        for (index, (page, entry)) in batch.entries().enumerate() {
            // One page in TIMED_EVERY is timed for the per-encoding times
            // (a clock read per page would cost a few percent of an LZ4
            // page on a VM).
            let start = is_timed(seq, index as u64).then(Instant::now);
            let data = match entry {
                Entry::Data(data) => data,
                Entry::Zero => &ZERO_PAGE[..],
                Entry::Source => {
                    source
                        .expect("a page pushed by number needs a PageSource")
                        .read_page(page, &mut snapshot);
                    &snapshot[..]
                }
            };
            let encoding = self.encode_page(page, data, writer);
            if let (Some(start), Some(e)) = (start, encoding) {
                self.stats.get_mut(e).nanos += start.elapsed().as_nanos() as u64 * TIMED_EVERY;
            }
        }
        self.snapshot = snapshot;
        let start = Instant::now();
        let len = writer.finish(round, seq);
        self.finish_ns += start.elapsed().as_nanos() as u64;
        len
    }

    /// Takes the counters accumulated since the last call.
    pub fn take_stats(&mut self) -> (ByEncoding, CacheOutcomes) {
        (
            std::mem::take(&mut self.stats),
            std::mem::take(&mut self.cache),
        )
    }
}

/// Whether `page` is all zeros. Most non-zero pages have data in their first
/// word; checking it with a scalar load first keeps the wide-vector scan
/// (and, on Intel, its frequency cost for the scalar compressor that
/// follows) for pages that are likely zero.
fn is_zero_page(page: &[u8]) -> bool {
    let word = |at: usize| u64::from_ne_bytes(page[at..at + 8].try_into().expect("8 bytes"));
    // The first word alone decides most pages and touches only the line the
    // compressor reads first, leaving its sequential prefetch undisturbed.
    if page.len() >= 8 && word(0) != 0 {
        return false;
    }
    vmstream_simd::is_zero(page)
}

/// Guest memory the sender's workers copy page snapshots from, so the
/// copy happens in parallel in the workers rather than in the caller.
///
/// An implementation over live guest memory must copy with whatever care
/// concurrent guest writes need (e.g. volatile or atomic reads); the codec
/// only ever uses the copied bytes, so a racing write cannot make the page
/// cache disagree with what was sent.
pub trait PageSource: Send + Sync {
    /// Copies page `page` (guaranteed below the configured guest size)
    /// into `out`, which is exactly one page.
    fn read_page(&self, page: u64, out: &mut [u8]);
}

impl PageSource for [u8] {
    fn read_page(&self, page: u64, out: &mut [u8]) {
        let at = page as usize * PAGE_SIZE;
        out.copy_from_slice(&self[at..at + PAGE_SIZE]);
    }
}

impl PageSource for Vec<u8> {
    fn read_page(&self, page: u64, out: &mut [u8]) {
        self.as_slice().read_page(page, out)
    }
}

/// An all-zero page, standing in for zero pages a [`Batch`] did not copy.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Slot value of a zero page (nothing copied).
const ZERO_SLOT: u32 = u32::MAX;
/// Slot value of a page to be read from a [`PageSource`].
const SOURCE_SLOT: u32 = u32::MAX - 1;

/// What a batch holds for one page.
enum Entry<'a> {
    /// The snapshot.
    Data(&'a [u8]),
    /// The page was all zeros when pushed (not copied).
    Zero,
    /// To be read from a [`PageSource`].
    Source,
}

/// A batch of pages for one packet: page numbers and their snapshots,
/// stored contiguously. A zero page is recognized when pushed and not
/// copied, which keeps the zero-page path cheap for the caller. Reused
/// across rounds.
///
/// Snapshots start on cache lines, like the guest pages they copy: the
/// XBZRLE scan compares them with aligned cache entries, and a snapshot
/// 16 bytes off (where `Vec` storage starts) split every load.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pages: Vec<u64>,
    /// Per page: index of its snapshot in `data`, or `ZERO_SLOT` /
    /// `SOURCE_SLOT`.
    slots: Vec<u32>,
    /// Room for `data.len() / PAGE_SIZE` snapshots; the first `stored` hold
    /// data.
    data: AlignedBuf,
    stored: usize,
}

impl Batch {
    /// An empty batch with room for `pages` pages.
    pub fn with_capacity(pages: usize) -> Batch {
        Batch {
            pages: Vec::with_capacity(pages),
            slots: Vec::with_capacity(pages),
            data: AlignedBuf::zeroed(pages * PAGE_SIZE),
            stored: 0,
        }
    }

    /// Appends page `page` with contents `snapshot` (one page).
    pub fn push(&mut self, page: u64, snapshot: &[u8]) {
        assert_eq!(snapshot.len(), PAGE_SIZE, "a snapshot is one page");
        let zero = is_zero_page(snapshot);
        if !zero {
            self.next_slot().copy_from_slice(snapshot);
        }
        self.record(page, zero);
    }

    /// Appends page `page`, whose contents `fill` writes straight into the
    /// batch (saving the caller a copy of the page); a zero page is then
    /// recognized as in [`Batch::push`]. When `fill` fails, the batch is
    /// unchanged.
    pub fn push_with<E>(
        &mut self,
        page: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let slot = self.next_slot();
        fill(slot)?;
        let zero = is_zero_page(slot);
        self.record(page, zero);
        Ok(())
    }

    /// The free snapshot slot after the stored ones (grown if needed).
    fn next_slot(&mut self) -> &mut [u8] {
        let at = self.stored * PAGE_SIZE;
        if at + PAGE_SIZE > self.data.len() {
            let mut grown = AlignedBuf::zeroed((self.stored + 1).max(2 * self.stored) * PAGE_SIZE);
            grown[..at].copy_from_slice(&self.data[..at]);
            self.data = grown;
        }
        &mut self.data[at..at + PAGE_SIZE]
    }

    /// Records page `page`: a zero page, or the snapshot just written to
    /// the next slot.
    fn record(&mut self, page: u64, zero: bool) {
        self.pages.push(page);
        if zero {
            self.slots.push(ZERO_SLOT);
        } else {
            self.slots.push(self.stored as u32);
            self.stored += 1;
        }
    }

    /// Appends page `page` without contents, to be read from a
    /// [`PageSource`] by the encoder.
    pub fn push_number(&mut self, page: u64) {
        self.pages.push(page);
        self.slots.push(SOURCE_SLOT);
    }

    /// Pages in the batch.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.pages.clear();
        self.slots.clear();
        self.stored = 0;
    }

    /// The page numbers.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    fn entries(&self) -> impl Iterator<Item = (u64, Entry<'_>)> + '_ {
        self.pages
            .iter()
            .zip(&self.slots)
            .map(move |(&page, &slot)| {
                let entry = match slot {
                    ZERO_SLOT => Entry::Zero,
                    SOURCE_SLOT => Entry::Source,
                    i => Entry::Data(
                        &self.data[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE],
                    ),
                };
                (page, entry)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(batch: &Batch) -> Vec<(u64, Option<Vec<u8>>)> {
        batch
            .entries()
            .map(|(page, e)| match e {
                Entry::Data(d) => {
                    assert_eq!(d.as_ptr() as usize % vmstream_simd::BUF_ALIGN, 0);
                    (page, Some(d.to_vec()))
                }
                Entry::Zero => (page, None),
                Entry::Source => panic!("no source pages pushed"),
            })
            .collect()
    }

    #[test]
    fn push_with_fills_in_place_grows_and_undoes_a_failed_fill() {
        let page = |b: u8| vec![b; PAGE_SIZE];
        let mut batch = Batch::with_capacity(2);
        batch.push(10, &page(1));
        batch
            .push_with(11, |slot| {
                slot.fill(0);
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(
            batch.push_with(12, |slot| {
                slot.fill(9);
                Err("read failed")
            }),
            Err("read failed")
        );
        // Past the capacity of 2 snapshots: the batch grows, earlier
        // snapshots move along.
        for (p, b) in [(13, 2u8), (14, 3), (15, 4)] {
            batch
                .push_with(p, |slot| {
                    slot.fill(b);
                    Ok::<(), ()>(())
                })
                .unwrap();
        }
        batch.push(16, &page(0));
        assert_eq!(
            contents(&batch),
            vec![
                (10, Some(page(1))),
                (11, None),
                (13, Some(page(2))),
                (14, Some(page(3))),
                (15, Some(page(4))),
                (16, None),
            ]
        );
        batch.clear();
        batch.push(20, &page(5));
        assert_eq!(contents(&batch), vec![(20, Some(page(5)))]);
    }

    /// The encodings of `page` sent in rounds 0, 1 and 2, slightly changed each time.
    fn encodings_over_rounds(fill_in_round0: bool) -> Vec<Option<Encoding>> {
        let config = EncoderConfig {
            compression: Compression::None,
            delta: Some(DeltaConfig {
                cache_bytes: 64 * PAGE_SIZE,
                fill_in_round0,
                ..DeltaConfig::default()
            }),
        };
        let mut enc = PageEncoder::new(&config).unwrap();
        let mut writer = PacketWriter::new(Vec::new());
        let mut page = vec![7u8; PAGE_SIZE];
        (0..3u64)
            .map(|round| {
                enc.begin_round(round);
                writer.begin(1);
                page[round as usize] = 1;
                enc.encode_page(5, &page, &mut writer)
            })
            .collect()
    }

    /// Round 0 fills the cache unless told not to; then the first resend goes whole and
    /// deltas start with the next.
    #[test]
    fn round0_fills_the_cache_only_when_told_to() {
        let (raw, delta) = (Some(Encoding::Raw), Some(Encoding::Xbzrle));
        assert_eq!(encodings_over_rounds(true), [raw, delta, delta]);
        assert_eq!(encodings_over_rounds(false), [raw, raw, delta]);
    }

    #[test]
    fn zero_check_sees_every_byte() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero_page(&page));
        for at in [
            0,
            7,
            8,
            100,
            PAGE_SIZE / 2,
            PAGE_SIZE / 2 + 3,
            PAGE_SIZE - 9,
            PAGE_SIZE - 1,
        ] {
            page[at] = 1;
            assert!(!is_zero_page(&page), "byte {at}");
            page[at] = 0;
        }
    }
}
