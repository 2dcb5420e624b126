//! The packet wire format (version 1), see `FORMAT.md` for the byte table.
//!
//! A packet is `header | payloads | record table | crc32c`. All integers are
//! little-endian. The record table has a fixed size given by the header's
//! page count, so a reader finds it from the end of the packet and learns
//! every page number (for routing and duplicate checks) without walking the
//! payloads; a writer appends payloads as it encodes and writes the table
//! last, so pages that turn out to need no record leave no gap.
#![forbid(unsafe_code)]

use crate::error::{PacketError, PacketErrorKind};
use crate::PAGE_SIZE;

/// First four bytes of every packet.
pub const MAGIC: [u8; 4] = *b"VMSP";
/// The format version this crate writes and reads.
pub const VERSION: u16 = 1;
/// Size of the fixed packet header.
pub const HEADER_LEN: usize = 32;
/// Size of one page record in the record table.
pub const RECORD_LEN: usize = 12;
/// Size of the trailing CRC32C.
pub const TRAILER_LEN: usize = 4;
/// Largest page count a packet may declare.
pub const MAX_PAGES_PER_PACKET: usize = 4096;
/// Largest packet the format allows, in bytes: a full packet of raw pages.
/// A transport that frames whole packets can bound its reads with it.
pub const MAX_PACKET_LEN: usize = packet_capacity(MAX_PAGES_PER_PACKET);

/// Bytes a packet of `pages` pages can take at most (every page raw).
pub const fn packet_capacity(pages: usize) -> usize {
    HEADER_LEN + pages * (RECORD_LEN + PAGE_SIZE) + TRAILER_LEN
}

/// How one page travels. The discriminant is the wire tag.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[repr(u8)]
pub enum Encoding {
    /// All-zero page; no payload.
    Zero = 0,
    /// The page verbatim; payload is exactly `PAGE_SIZE` bytes.
    Raw = 1,
    /// LZ4 block format of the page.
    Lz4 = 2,
    /// One zstd frame of the page.
    Zstd = 3,
    /// Raw deflate (RFC 1951, no zlib header) of the page.
    Zlib = 4,
    /// QEMU XBZRLE delta against the page as last sent.
    Xbzrle = 5,
    /// LZ4 block of `old XOR new`, `old` being the page as last sent.
    XorLz4 = 6,
    /// LZ4 block of an XBZRLE delta (at most `PAGE_SIZE` bytes once
    /// decompressed).
    XbzrleLz4 = 7,
}

impl Encoding {
    /// Every encoding, in tag order.
    pub const ALL: [Encoding; 8] = [
        Encoding::Zero,
        Encoding::Raw,
        Encoding::Lz4,
        Encoding::Zstd,
        Encoding::Zlib,
        Encoding::Xbzrle,
        Encoding::XorLz4,
        Encoding::XbzrleLz4,
    ];

    /// The encoding with wire tag `tag`, if any.
    pub fn from_tag(tag: u8) -> Option<Encoding> {
        Encoding::ALL.get(tag as usize).copied()
    }

    /// The wire tag.
    pub fn tag(self) -> u8 {
        self as u8
    }

    /// Lower-case name used in statistics and docs.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Zero => "zero",
            Encoding::Raw => "raw",
            Encoding::Lz4 => "lz4",
            Encoding::Zstd => "zstd",
            Encoding::Zlib => "zlib",
            Encoding::Xbzrle => "xbzrle",
            Encoding::XorLz4 => "xor_lz4",
            Encoding::XbzrleLz4 => "xbzrle_lz4",
        }
    }

    /// Whether a record of this encoding carries the whole page (raw or compressed), so
    /// applying it needs nothing of what the page held before.
    pub fn is_whole_page(self) -> bool {
        matches!(
            self,
            Encoding::Raw | Encoding::Lz4 | Encoding::Zstd | Encoding::Zlib
        )
    }

    /// Whether a payload of `len` bytes is allowed for this encoding.
    /// Raw is exactly one page, zero is empty, everything else is 1 to
    /// `PAGE_SIZE - 1` bytes (a page that does not shrink travels raw).
    fn accepts_len(self, len: usize) -> bool {
        match self {
            Encoding::Zero => len == 0,
            Encoding::Raw => len == PAGE_SIZE,
            _ => (1..PAGE_SIZE).contains(&len),
        }
    }

    /// Whether decoding needs the destination page's previous content.
    pub fn is_delta(self) -> bool {
        matches!(
            self,
            Encoding::Xbzrle | Encoding::XorLz4 | Encoding::XbzrleLz4
        )
    }
}

/// The fixed 32-byte packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    /// Flags; must be 0 in version 1.
    pub flags: u16,
    /// Length of the whole packet, header and CRC included.
    pub packet_len: u32,
    /// Number of page records.
    pub page_count: u32,
    /// Migration round the pages belong to.
    pub round: u64,
    /// Sender-assigned sequence number, unique per migration.
    pub seq: u64,
}

impl PacketHeader {
    /// Serializes the header into `out[..HEADER_LEN]`.
    pub fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..12].copy_from_slice(&self.packet_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.page_count.to_le_bytes());
        out[16..24].copy_from_slice(&self.round.to_le_bytes());
        out[24..32].copy_from_slice(&self.seq.to_le_bytes());
    }
}

/// One entry of the record table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRecord {
    /// Guest page number (byte offset / `PAGE_SIZE`).
    pub page: u64,
    /// How the payload encodes the page.
    pub encoding: Encoding,
    /// Payload length in bytes.
    pub len: u16,
}

impl PageRecord {
    /// Serializes the record into `out[..RECORD_LEN]`.
    pub fn write(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.page.to_le_bytes());
        out[8] = self.encoding.tag();
        out[9] = 0;
        out[10..12].copy_from_slice(&self.len.to_le_bytes());
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A packet whose header and record table passed validation; payloads are
/// addressed by [`PacketView::records`].
#[derive(Debug, Clone, Copy)]
pub struct PacketView<'a> {
    /// The parsed header.
    pub header: PacketHeader,
    bytes: &'a [u8],
}

/// A validated record and its payload.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    /// Index of the record in the packet.
    pub index: u32,
    /// Guest page number, checked against the guest size.
    pub page: u64,
    /// How `payload` encodes the page.
    pub encoding: Encoding,
    /// The payload, length checked against the encoding.
    pub payload: &'a [u8],
}

/// What [`parse_packet`] checks pages against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Guest size in pages: every page number must be below it.
    pub guest_pages: u64,
    /// Whether to verify the CRC32C (a caller that verified it already, or
    /// will verify it before writing, may skip it here).
    pub verify_checksum: bool,
}

impl<'a> PacketView<'a> {
    /// The records in table order, with their payloads.
    pub fn records(&self) -> impl Iterator<Item = RecordRef<'a>> + 'a {
        let bytes = self.bytes;
        let count = self.header.page_count as usize;
        let table = table_start(bytes.len(), count);
        let mut payload_at = HEADER_LEN;
        (0..count).map(move |i| {
            let at = table + i * RECORD_LEN;
            let len = u16_at(bytes, at + 10) as usize;
            let payload = &bytes[payload_at..payload_at + len];
            payload_at += len;
            RecordRef {
                index: i as u32,
                page: u64_at(bytes, at),
                encoding: Encoding::from_tag(bytes[at + 8]).expect("validated tag"),
                payload,
            }
        })
    }

    /// The whole packet.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// Offset of the record table in a packet of `len` bytes and `count` records.
fn table_start(len: usize, count: usize) -> usize {
    len - TRAILER_LEN - count * RECORD_LEN
}

/// The CRC32C stored in a packet's last four bytes.
fn stored_crc(bytes: &[u8]) -> u32 {
    u32_at(bytes, bytes.len() - TRAILER_LEN)
}

/// Verifies the trailing CRC32C of a packet at least `HEADER_LEN +
/// TRAILER_LEN` bytes long.
pub fn verify_checksum(bytes: &[u8], seq: Option<u64>) -> Result<(), PacketError> {
    let body = &bytes[..bytes.len() - TRAILER_LEN];
    let computed = vmstream_simd::crc32c(body);
    let stored = stored_crc(bytes);
    if computed != stored {
        return Err(PacketError::new(
            seq,
            PacketErrorKind::Checksum { stored, computed },
        ));
    }
    Ok(())
}

/// Validates a whole packet: length, magic, version, flags, checksum (per
/// `limits`), page count, every record's page number, encoding tag,
/// reserved byte and length, and that the payload lengths add up to what
/// arrived. Nothing here looks inside payloads; decoding checks the
/// decompressed size.
///
/// When the checksum is not verified here and a structural check fails, the
/// checksum is verified before reporting, so corruption is reported as a
/// checksum error rather than as whatever field it happened to hit.
pub fn parse_packet(bytes: &[u8], limits: Limits) -> Result<PacketView<'_>, PacketError> {
    let result = parse_unchecked(bytes, limits);
    match result {
        Err(e) if !limits.verify_checksum && bytes.len() >= HEADER_LEN + TRAILER_LEN => {
            let seq = e.seq;
            // Only meaningful when the declared length matched what arrived.
            if !matches!(
                e.kind,
                PacketErrorKind::Truncated { .. } | PacketErrorKind::PacketLength { .. }
            ) {
                verify_checksum(bytes, seq)?;
            }
            Err(e)
        }
        other => other,
    }
}

fn parse_unchecked(bytes: &[u8], limits: Limits) -> Result<PacketView<'_>, PacketError> {
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(PacketError::new(
            None,
            PacketErrorKind::Truncated {
                len: bytes.len(),
                needed: HEADER_LEN + TRAILER_LEN,
            },
        ));
    }
    let seq_number = u64_at(bytes, 24);
    let seq = Some(seq_number);
    let err = |kind| PacketError::new(seq, kind);
    let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(err(PacketErrorKind::BadMagic { found: magic }));
    }
    let version = u16_at(bytes, 4);
    if version != VERSION {
        return Err(err(PacketErrorKind::UnsupportedVersion { found: version }));
    }
    let packet_len = u32_at(bytes, 8);
    if (packet_len as usize) > bytes.len() {
        return Err(err(PacketErrorKind::Truncated {
            len: bytes.len(),
            needed: packet_len as usize,
        }));
    }
    if (packet_len as usize) < bytes.len() {
        return Err(err(PacketErrorKind::PacketLength {
            declared: packet_len,
            actual: bytes.len(),
        }));
    }
    if limits.verify_checksum {
        verify_checksum(bytes, seq)?;
    }
    let flags = u16_at(bytes, 6);
    if flags != 0 {
        return Err(err(PacketErrorKind::UnknownFlags { flags }));
    }
    let header = PacketHeader {
        flags,
        packet_len,
        page_count: u32_at(bytes, 12),
        round: u64_at(bytes, 16),
        seq: seq_number,
    };
    let count = header.page_count as usize;
    if count > MAX_PAGES_PER_PACKET {
        return Err(err(PacketErrorKind::TooManyPages {
            count: header.page_count,
            max: MAX_PAGES_PER_PACKET as u32,
        }));
    }
    let needed = HEADER_LEN + count * RECORD_LEN + TRAILER_LEN;
    if bytes.len() < needed {
        return Err(err(PacketErrorKind::Truncated {
            len: bytes.len(),
            needed,
        }));
    }
    let table = table_start(bytes.len(), count);
    let mut payload_sum = 0usize;
    for i in 0..count {
        let at = table + i * RECORD_LEN;
        let record = i as u32;
        let page = u64_at(bytes, at);
        if page >= limits.guest_pages {
            return Err(err(PacketErrorKind::PageOutOfRange {
                record,
                page,
                guest_pages: limits.guest_pages,
            }));
        }
        let tag = bytes[at + 8];
        let Some(encoding) = Encoding::from_tag(tag) else {
            return Err(err(PacketErrorKind::UnknownEncoding { record, tag }));
        };
        if bytes[at + 9] != 0 {
            return Err(err(PacketErrorKind::ReservedNonZero {
                record,
                value: bytes[at + 9],
            }));
        }
        let len = u16_at(bytes, at + 10) as usize;
        if len > PAGE_SIZE {
            return Err(err(PacketErrorKind::OversizedLength {
                record,
                len,
                max: PAGE_SIZE,
            }));
        }
        if !encoding.accepts_len(len) {
            return Err(err(PacketErrorKind::BadRecordLength {
                record,
                encoding,
                len,
            }));
        }
        payload_sum += len;
    }
    let actual = table - HEADER_LEN;
    if payload_sum != actual {
        return Err(err(PacketErrorKind::PayloadLength {
            declared: payload_sum,
            actual,
        }));
    }
    Ok(PacketView { header, bytes })
}

/// Writes packets into a reusable buffer: [`begin`](Self::begin), append
/// payloads, then [`finish`](Self::finish) appends the record table, fills
/// in the header and appends the CRC.
///
/// The buffer is only ever grown, never shrunk, so a recycled buffer is
/// written without re-zeroing; the packet is `buffer()[..len]`.
#[derive(Debug, Default)]
pub struct PacketWriter {
    buf: Vec<u8>,
    records: Vec<PageRecord>,
    /// Where the next payload byte goes.
    pos: usize,
}

impl PacketWriter {
    /// A writer reusing `buf` as its packet buffer.
    pub fn new(buf: Vec<u8>) -> PacketWriter {
        PacketWriter {
            buf,
            records: Vec::new(),
            pos: HEADER_LEN,
        }
    }

    /// Starts a packet of up to `max_pages` records.
    pub fn begin(&mut self, max_pages: usize) {
        let cap = packet_capacity(max_pages);
        if self.buf.len() < cap {
            self.buf.resize(cap, 0);
        }
        self.records.clear();
        self.pos = HEADER_LEN;
    }

    /// Records written so far.
    pub fn count(&self) -> usize {
        self.records.len()
    }

    /// Payload length of the last record committed (0 when none).
    pub fn last_len(&self) -> usize {
        self.records.last().map_or(0, |r| r.len as usize)
    }

    /// Room for the next payload: exactly `PAGE_SIZE` bytes.
    pub fn payload_space(&mut self) -> &mut [u8] {
        &mut self.buf[self.pos..self.pos + PAGE_SIZE]
    }

    /// Commits a record whose `len`-byte payload was written at the start
    /// of [`payload_space`](Self::payload_space).
    pub fn commit(&mut self, page: u64, encoding: Encoding, len: usize) {
        debug_assert!(encoding.accepts_len(len), "{encoding:?} with {len} bytes");
        self.records.push(PageRecord {
            page,
            encoding,
            len: len as u16,
        });
        self.pos += len;
    }

    /// Appends a record and copies its payload.
    pub fn push(&mut self, page: u64, encoding: Encoding, payload: &[u8]) {
        self.payload_space()[..payload.len()].copy_from_slice(payload);
        self.commit(page, encoding, payload.len());
    }

    /// Completes the packet; returns its length, the packet being
    /// [`buffer`](Self::buffer)`[..len]`.
    pub fn finish(&mut self, round: u64, seq: u64) -> usize {
        let table = self.pos;
        let body = table + self.records.len() * RECORD_LEN;
        let len = body + TRAILER_LEN;
        for (i, r) in self.records.iter().enumerate() {
            let at = table + i * RECORD_LEN;
            r.write(&mut self.buf[at..at + RECORD_LEN]);
        }
        PacketHeader {
            flags: 0,
            packet_len: len as u32,
            page_count: self.records.len() as u32,
            round,
            seq,
        }
        .write(&mut self.buf[..HEADER_LEN]);
        let crc = vmstream_simd::crc32c(&self.buf[..body]);
        self.buf[body..len].copy_from_slice(&crc.to_le_bytes());
        len
    }

    /// The underlying buffer.
    pub fn buffer(&self) -> &[u8] {
        &self.buf
    }

    /// Swaps the packet buffer for `buf` (e.g. a recycled one) and returns
    /// the old one.
    pub fn swap_buffer(&mut self, buf: Vec<u8>) -> Vec<u8> {
        std::mem::replace(&mut self.buf, buf)
    }
}
