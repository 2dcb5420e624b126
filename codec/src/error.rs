//! Typed errors. Every packet failure names the packet (its sequence number,
//! when the header was long enough to hold one) and the offending field.
#![forbid(unsafe_code)]

use crate::format::Encoding;

/// A packet was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("packet {}: {kind}", match seq { Some(s) => format!("seq {s}"), None => "(no header)".to_string() })]
pub struct PacketError {
    /// The packet's sequence number, if its header arrived.
    pub seq: Option<u64>,
    /// What was wrong, naming the field.
    pub kind: PacketErrorKind,
}

impl PacketError {
    /// An error for packet `seq`.
    pub fn new(seq: Option<u64>, kind: PacketErrorKind) -> PacketError {
        PacketError { seq, kind }
    }
}

/// What was wrong with a packet; each variant names the field it checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketErrorKind {
    /// Fewer bytes than the header (or the declared record table) needs.
    #[error("truncated: {len} bytes, need at least {needed}")]
    Truncated {
        /// Bytes that arrived.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// Field `magic` is not `VMSP`.
    #[error("magic: found {found:02x?}")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// Field `version` is not one this crate reads.
    #[error("version: unsupported {found}")]
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// Field `packet_len` differs from the bytes that arrived.
    #[error("packet_len: declares {declared} bytes, {actual} arrived")]
    PacketLength {
        /// The declared length.
        declared: u32,
        /// Bytes that arrived.
        actual: usize,
    },
    /// The trailing `crc32c` does not match the packet.
    #[error("crc32c: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// Checksum in the packet.
        stored: u32,
        /// Checksum of what arrived.
        computed: u32,
    },
    /// Field `flags` has bits this version does not define.
    #[error("flags: unknown bits {flags:#06x}")]
    UnknownFlags {
        /// The flags found.
        flags: u16,
    },
    /// Field `page_count` is above the format's limit.
    #[error("page_count: {count} exceeds {max}")]
    TooManyPages {
        /// Declared count.
        count: u32,
        /// Limit.
        max: u32,
    },
    /// A record's `page` lies outside guest memory.
    #[error("record {record} page: {page} outside guest of {guest_pages} pages")]
    PageOutOfRange {
        /// Record index.
        record: u32,
        /// Page number found.
        page: u64,
        /// Guest size in pages.
        guest_pages: u64,
    },
    /// A record's `encoding` tag is unknown.
    #[error("record {record} encoding: unknown tag {tag}")]
    UnknownEncoding {
        /// Record index.
        record: u32,
        /// The tag found.
        tag: u8,
    },
    /// A record's `reserved` byte is not zero.
    #[error("record {record} reserved: {value} (must be 0)")]
    ReservedNonZero {
        /// Record index.
        record: u32,
        /// The value found.
        value: u8,
    },
    /// A record's `length` exceeds the page size.
    #[error("record {record} length: {len} exceeds the page size {max}")]
    OversizedLength {
        /// Record index.
        record: u32,
        /// Declared payload length.
        len: usize,
        /// The page size.
        max: usize,
    },
    /// A record's `length` is impossible for its encoding (zero pages carry
    /// nothing, raw pages exactly one page, others 1 to page size - 1).
    #[error("record {record} length: {len} invalid for encoding {encoding:?}")]
    BadRecordLength {
        /// Record index.
        record: u32,
        /// The record's encoding.
        encoding: Encoding,
        /// Declared payload length.
        len: usize,
    },
    /// The records' `length`s do not add up to the payload bytes that
    /// arrived.
    #[error("record lengths: sum to {declared}, payload area holds {actual}")]
    PayloadLength {
        /// Sum of declared lengths.
        declared: usize,
        /// Payload bytes present.
        actual: usize,
    },
    /// Field `round` is not the round the receiver is in.
    #[error("round: packet of round {found}, receiver is in round {expected}")]
    WrongRound {
        /// The receiver's round.
        expected: u64,
        /// The packet's round.
        found: u64,
    },
    /// A record's `page` already arrived in this round.
    #[error("record {record} page: {page} already sent in round {round}")]
    DuplicatePage {
        /// Record index.
        record: u32,
        /// The page number.
        page: u64,
        /// The round.
        round: u64,
    },
    /// A compressed payload did not decompress to exactly one page.
    #[error("record {record} payload: {encoding:?} for page {page} decompressed to {got}, need exactly {expected} bytes")]
    DecompressedSize {
        /// Record index.
        record: u32,
        /// The page number.
        page: u64,
        /// The record's encoding.
        encoding: Encoding,
        /// The page size.
        expected: usize,
        /// What decompression produced (a description on failure).
        got: String,
    },
    /// An XBZRLE payload is malformed.
    #[error("record {record} payload: bad XBZRLE delta for page {page}: {reason}")]
    BadDelta {
        /// Record index.
        record: u32,
        /// The page number.
        page: u64,
        /// The decoder's reason.
        reason: String,
    },
}

/// A pipeline failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A packet was rejected.
    #[error(transparent)]
    Packet(#[from] PacketError),
    /// A worker thread panicked; the pipeline is stopped.
    #[error("{side} worker {worker} panicked")]
    WorkerPanicked {
        /// "sender" or "receiver".
        side: &'static str,
        /// Worker index.
        worker: usize,
    },
    /// `end_round` was called for a round other than the current one.
    #[error("end_round({got}) while in round {expected}")]
    RoundMismatch {
        /// The current round.
        expected: u64,
        /// The round passed.
        got: u64,
    },
    /// A page number outside the configured guest size was pushed.
    #[error("page {page} outside guest of {guest_pages} pages")]
    PageOutOfRange {
        /// Page number.
        page: u64,
        /// Guest size in pages.
        guest_pages: u64,
    },
    /// A page was pushed twice in one round (the receiver would reject the
    /// second copy).
    #[error("page {page} pushed twice in round {round}")]
    DuplicatePage {
        /// Page number.
        page: u64,
        /// The round.
        round: u64,
    },
    /// A page snapshot that is not exactly one page long was pushed.
    #[error("page snapshot of {len} bytes, need {expected}")]
    SnapshotLength {
        /// Bytes given.
        len: usize,
        /// The page size.
        expected: usize,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Writing decoded pages to the destination memory file failed (e.g. no space left
    /// on its file system).
    #[error("writing pages {first}..{end} to the memory file: {reason}")]
    Write {
        /// The first page of the run.
        first: u64,
        /// One past its last page.
        end: u64,
        /// The system's error, in words.
        reason: String,
    },
    /// The pipeline stopped after an earlier error, reported before.
    #[error("pipeline stopped after an earlier error")]
    Stopped,
}
