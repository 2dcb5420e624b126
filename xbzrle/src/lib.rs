//! QEMU-compatible XBZRLE page deltas, and the sender's generational page
//! cache.
//!
//! # Format
//! A delta is a sequence of `(zrun nzrun)` pairs:
//!
//! | field   | encoding                      | meaning                                   |
//! |---------|-------------------------------|-------------------------------------------|
//! | `zrun`  | ULEB128, 1 or 2 bytes         | count of unchanged bytes to skip          |
//! | `nzrun` | ULEB128, 1 or 2 bytes, then n | count `n` of changed bytes, then the NEW bytes |
//!
//! Lengths are at most `0x3fff` (two ULEB128 bytes), so pages are at most
//! [`MAX_PAGE_SIZE`] bytes. The canonical encoding, which [`encode`] emits
//! byte for byte like QEMU's encoder, uses maximal runs at byte granularity,
//! may start with a zero-length `zrun`, never ends with a `zrun`, and is empty
//! for identical pages. [`encode_compact`] may also merge short unchanged gaps
//! into literals; its output decodes with the same rules.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
mod decode;
mod encode;
pub mod sender;
mod uleb;

pub use cache::{
    CacheConfigError, CacheStats, InsertOutcome, Layout, PageCache, DEFAULT_CACHE_BYTES,
};
pub use decode::{decode, validate, DecodeError};
pub use encode::{encode, encode_compact, EncodeError};
pub use sender::{DeltaEncoder, DeltaStats, PageOutcome};

/// Largest page the format can describe: every run length must fit in two
/// ULEB128 bytes (`0x3fff`), and a page may be one long run.
pub const MAX_PAGE_SIZE: usize = 16 * 1024;

/// Largest run length a 2-byte ULEB128 can carry.
pub const MAX_RUN: usize = 0x3fff;
