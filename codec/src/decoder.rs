//! Applying validated page records to destination memory, and the
//! single-threaded [`PacketDecoder`] built on it.
#![forbid(unsafe_code)]

use std::time::Instant;

use vmstream_simd::AlignedBuf;

use crate::compress::Decompressor;
use crate::error::{CodecError, PacketError, PacketErrorKind};
use crate::format::{parse_packet, Encoding, Limits, PacketView, RecordRef};
use crate::memory::{page_bit, page_bitmap};
use crate::stats::{is_timed, ByEncoding, TIMED_EVERY};
use crate::PAGE_SIZE;

/// Decodes records straight into their destination pages. One per thread.
#[derive(Debug)]
pub struct PageDecoder {
    decompressor: Decompressor,
    /// Holds a decompressed delta (XOR or XBZRLE) before it is applied.
    xor_scratch: AlignedBuf,
    /// Pages decoded, by encoding.
    pub stats: ByEncoding,
}

/// Pulls the next packet into cache while the current one is applied, one
/// slice per record, so that the next packet's checksum pass (the first
/// read of it, before anything may be written) reads L2 instead of another
/// core's cache or memory, where it ran at a third of its in-cache speed.
#[derive(Debug)]
pub struct Readahead<'a> {
    rest: &'a [u8],
    slice: usize,
}

impl<'a> Readahead<'a> {
    /// Readahead of `next` (none: nothing to do) spread over `records` steps.
    pub fn new(next: Option<&'a [u8]>, records: usize) -> Readahead<'a> {
        let rest = next.unwrap_or(&[]);
        let slice = rest
            .len()
            .div_ceil(records.max(1))
            .next_multiple_of(vmstream_simd::PREFETCH_LINE);
        Readahead { rest, slice }
    }

    /// Requests the next slice (call once per record applied).
    #[inline]
    pub fn step(&mut self) {
        if self.rest.is_empty() {
            return;
        }
        let (now, rest) = self.rest.split_at(self.slice.min(self.rest.len()));
        vmstream_simd::prefetch_l2(now);
        self.rest = rest;
    }
}

impl PageDecoder {
    /// A decoder with fresh contexts.
    pub fn new() -> Result<PageDecoder, CodecError> {
        Ok(PageDecoder {
            decompressor: Decompressor::new().map_err(CodecError::Config)?,
            xor_scratch: AlignedBuf::zeroed(PAGE_SIZE),
            stats: ByEncoding::default(),
        })
    }

    /// Adds `nanos` of decode time to `encoding`.
    pub fn charge(&mut self, encoding: Encoding, nanos: u64) {
        self.stats.get_mut(encoding).nanos += nanos;
    }

    /// [`apply`](Self::apply), timing one record in
    /// [`TIMED_EVERY`] for the statistics (the
    /// timed one is charged that many times): a clock read per page would
    /// cost a few percent of an LZ4 page.
    pub fn apply_sampled(
        &mut self,
        seq: u64,
        record: &RecordRef<'_>,
        page: &mut [u8],
    ) -> Result<(), PacketError> {
        if !is_timed(seq, u64::from(record.index)) {
            return self.apply(seq, record, page);
        }
        let start = Instant::now();
        let result = self.apply(seq, record, page);
        self.charge(
            record.encoding,
            start.elapsed().as_nanos() as u64 * TIMED_EVERY,
        );
        result
    }

    /// Applies every record of the validated packet `view` to `memory`, the
    /// whole guest (record pages are inside it: the parser checked them),
    /// with [`apply_sampled`](Self::apply_sampled), reading each zero
    /// record's destination ahead (see [`prefetch_zero_target`]).
    pub fn apply_packet(
        &mut self,
        view: &PacketView<'_>,
        memory: &mut [u8],
    ) -> Result<(), PacketError> {
        let mut records = view.records().peekable();
        while let Some(r) = records.next() {
            if let Some(next) = records.peek().filter(|n| n.encoding == Encoding::Zero) {
                prefetch_zero_target(&memory[next.page as usize * PAGE_SIZE..][..PAGE_SIZE]);
            }
            let at = r.page as usize * PAGE_SIZE;
            self.apply_sampled(view.header.seq, &r, &mut memory[at..at + PAGE_SIZE])?;
        }
        Ok(())
    }

    /// Applies `record` of packet `seq` to `page` (its `PAGE_SIZE` bytes of
    /// destination memory). Compressed payloads decompress directly into
    /// `page` and must produce exactly one page; an XBZRLE payload is fully
    /// validated before the page is touched. A compressed payload that
    /// passed the CRC but is malformed can leave `page` partly written; the
    /// error then fails the round.
    pub fn apply(
        &mut self,
        seq: u64,
        record: &RecordRef<'_>,
        page: &mut [u8],
    ) -> Result<(), PacketError> {
        let size_error = |got: String| {
            PacketError::new(
                Some(seq),
                PacketErrorKind::DecompressedSize {
                    record: record.index,
                    page: record.page,
                    encoding: record.encoding,
                    expected: PAGE_SIZE,
                    got,
                },
            )
        };
        match record.encoding {
            Encoding::Zero => {
                // Reading first keeps untouched destination pages unallocated.
                if !vmstream_simd::is_zero(page) {
                    page.fill(0);
                }
            }
            Encoding::Raw => page.copy_from_slice(record.payload),
            Encoding::Lz4 | Encoding::Zstd | Encoding::Zlib => {
                match self
                    .decompressor
                    .decompress(record.encoding, record.payload, page)
                {
                    Ok(PAGE_SIZE) => {}
                    Ok(n) => return Err(size_error(format!("{n} bytes"))),
                    Err(e) => return Err(size_error(e)),
                }
            }
            Encoding::XorLz4 => {
                let delta = &mut self.xor_scratch[..];
                match self
                    .decompressor
                    .decompress(Encoding::XorLz4, record.payload, delta)
                {
                    Ok(PAGE_SIZE) => xor_into(page, delta),
                    Ok(n) => return Err(size_error(format!("{n} bytes"))),
                    Err(e) => return Err(size_error(e)),
                }
            }
            Encoding::Xbzrle => apply_xbzrle(seq, record, record.payload, page)?,
            Encoding::XbzrleLz4 => {
                // Bounded by the scratch page: a delta never decompresses
                // past PAGE_SIZE bytes.
                match self.decompressor.decompress(
                    Encoding::XbzrleLz4,
                    record.payload,
                    &mut self.xor_scratch,
                ) {
                    Ok(n) => apply_xbzrle(seq, record, &self.xor_scratch[..n], page)?,
                    Err(e) => return Err(size_error(e)),
                }
            }
        }
        self.stats
            .record(record.encoding, PAGE_SIZE, record.payload.len(), 0);
        Ok(())
    }
}

/// Starts reading `page`, the destination of an upcoming zero record, into
/// cache. Applying a zero record reads the page first (it is left alone,
/// and unallocated, when already zero), and on a cold destination that
/// read stalls; issued one record ahead, it overlaps the record before.
#[inline]
pub fn prefetch_zero_target(page: &[u8]) {
    vmstream_simd::prefetch_l2(page);
}

/// Validates, then applies, an XBZRLE delta, so a malformed delta leaves
/// the page untouched.
fn apply_xbzrle(
    seq: u64,
    record: &RecordRef<'_>,
    delta: &[u8],
    page: &mut [u8],
) -> Result<(), PacketError> {
    let bad = |e: vmstream_xbzrle::DecodeError| {
        PacketError::new(
            Some(seq),
            PacketErrorKind::BadDelta {
                record: record.index,
                page: record.page,
                reason: e.to_string(),
            },
        )
    };
    vmstream_xbzrle::validate(delta, PAGE_SIZE).map_err(bad)?;
    vmstream_xbzrle::decode(delta, page).map_err(bad)?;
    Ok(())
}

/// `page ^= delta`, 8 bytes at a time (the compiler vectorizes it).
pub fn xor_into(page: &mut [u8], delta: &[u8]) {
    for (p, d) in page.chunks_exact_mut(8).zip(delta.chunks_exact(8)) {
        let x = u64::from_ne_bytes(p[..8].try_into().unwrap())
            ^ u64::from_ne_bytes(d[..8].try_into().unwrap());
        p.copy_from_slice(&x.to_ne_bytes());
    }
}

/// Round bookkeeping on the receiver: which round is open and which pages
/// already arrived in it (a bitmap over guest pages).
#[derive(Debug)]
pub struct RoundTracker {
    round: u64,
    seen: Vec<u64>,
    /// The words of `seen` this round marked lie in `marked.0..marked.1`:
    /// only those are cleared at its end, so a round of few pages (or none,
    /// from a peer that claimed a huge guest) never touches, and never makes
    /// resident, the rest of a bitmap sized from the claimed guest.
    marked: (usize, usize),
}

impl RoundTracker {
    /// A tracker for a guest of `guest_pages` pages, in round 0.
    pub fn new(guest_pages: u64) -> RoundTracker {
        RoundTracker {
            round: 0,
            seen: page_bitmap(guest_pages),
            marked: (usize::MAX, 0),
        }
    }

    /// The open round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Checks that `view` belongs to the open round and repeats no page of
    /// it, then marks its pages as seen. On error no page is marked.
    pub fn admit(&mut self, view: &PacketView<'_>) -> Result<(), PacketError> {
        let seq = Some(view.header.seq);
        if view.header.round != self.round {
            return Err(PacketError::new(
                seq,
                PacketErrorKind::WrongRound {
                    expected: self.round,
                    found: view.header.round,
                },
            ));
        }
        for (n, r) in view.records().enumerate() {
            let (word, bit) = page_bit(r.page);
            if self.seen[word] & bit != 0 {
                // Undo this packet's marks so the tracker stays exact.
                for u in view.records().take(n) {
                    let (word, bit) = page_bit(u.page);
                    self.seen[word] &= !bit;
                }
                return Err(PacketError::new(
                    seq,
                    PacketErrorKind::DuplicatePage {
                        record: r.index,
                        page: r.page,
                        round: self.round,
                    },
                ));
            }
            self.seen[word] |= bit;
            self.marked = (self.marked.0.min(word), self.marked.1.max(word + 1));
        }
        Ok(())
    }

    /// Closes round `round` (must be the open one) and opens the next.
    pub fn end_round(&mut self, round: u64) -> Result<(), CodecError> {
        if round != self.round {
            return Err(CodecError::RoundMismatch {
                expected: self.round,
                got: round,
            });
        }
        let (lo, hi) = std::mem::replace(&mut self.marked, (usize::MAX, 0));
        if lo < hi {
            self.seen[lo..hi].fill(0);
        }
        self.round += 1;
        Ok(())
    }
}

/// Single-threaded receiver: validates a packet completely (checksum,
/// header, records, round, duplicates) and then applies it to `memory`.
#[derive(Debug)]
pub struct PacketDecoder {
    pages: PageDecoder,
    tracker: RoundTracker,
    guest_pages: u64,
}

impl PacketDecoder {
    /// A decoder for a guest of `guest_pages` pages.
    pub fn new(guest_pages: u64) -> Result<PacketDecoder, CodecError> {
        Ok(PacketDecoder {
            pages: PageDecoder::new()?,
            tracker: RoundTracker::new(guest_pages),
            guest_pages,
        })
    }

    /// Validates `packet` and applies it to `memory` (`guest_pages` pages).
    pub fn apply(&mut self, packet: &[u8], memory: &mut [u8]) -> Result<(), PacketError> {
        assert_eq!(
            memory.len() as u64,
            self.guest_pages * PAGE_SIZE as u64,
            "memory size"
        );
        let view = parse_packet(
            packet,
            Limits {
                guest_pages: self.guest_pages,
                verify_checksum: true,
            },
        )?;
        self.tracker.admit(&view)?;
        self.pages.apply_packet(&view, memory)
    }

    /// Ends round `round`: later packets must carry `round + 1`.
    pub fn end_round(&mut self, round: u64) -> Result<(), CodecError> {
        self.tracker.end_round(round)
    }

    /// Pages decoded so far, by encoding.
    pub fn stats(&self) -> &ByEncoding {
        &self.pages.stats
    }
}
