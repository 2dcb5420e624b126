//! The decoder, with QEMU's acceptance rules and one error per rule.

use std::fmt;

use crate::uleb;

/// Why a delta was rejected. `offset` is the position in the delta where the
/// offending field starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer than two bytes remain where a run length starts.
    Truncated {
        /// Offset of the length field.
        offset: usize,
    },
    /// A run length uses three or more ULEB128 bytes.
    LengthTooLong {
        /// Offset of the length field.
        offset: usize,
    },
    /// An unchanged run of length 0 after the first position.
    EmptyZeroRun {
        /// Offset of the length field.
        offset: usize,
    },
    /// A changed run of length 0.
    EmptyLiteralRun {
        /// Offset of the length field.
        offset: usize,
    },
    /// A run reaches past the end of the page.
    RunPastPage {
        /// Offset of the length field.
        offset: usize,
    },
    /// A run's literal bytes reach past the end of the delta.
    LiteralPastDelta {
        /// Offset of the length field.
        offset: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, offset) = match *self {
            DecodeError::Truncated { offset } => {
                ("fewer than 2 bytes left for a run length", offset)
            }
            DecodeError::LengthTooLong { offset } => {
                ("run length longer than 2 ULEB128 bytes", offset)
            }
            DecodeError::EmptyZeroRun { offset } => {
                ("zero-length unchanged run after the start", offset)
            }
            DecodeError::EmptyLiteralRun { offset } => ("zero-length literal run", offset),
            DecodeError::RunPastPage { offset } => ("run reaches past the end of the page", offset),
            DecodeError::LiteralPastDelta { offset } => {
                ("literal bytes reach past the end of the delta", offset)
            }
        };
        write!(f, "malformed XBZRLE delta at byte {offset}: {what}")
    }
}

impl std::error::Error for DecodeError {}

/// Applies `delta` onto `page` in place and returns how many bytes of `page`
/// the runs cover (the end of the last literal run). Bytes the runs do not
/// reach keep their old value.
///
/// Rejects exactly the deltas QEMU's decoder rejects. On error, runs before
/// the faulty one have already been applied: call [`validate`] first when
/// the page must stay untouched.
pub fn decode(delta: &[u8], page: &mut [u8]) -> Result<usize, DecodeError> {
    walk(delta, page.len(), |at, literal| {
        copy_literal(&mut page[at..at + literal.len()], literal)
    })
}

/// Checks `delta` against a page of `page_len` bytes without applying it;
/// returns what [`decode`] would.
pub fn validate(delta: &[u8], page_len: usize) -> Result<usize, DecodeError> {
    walk(delta, page_len, |_, _| {})
}

/// Parses `delta`, calling `apply(page_offset, literal)` for every changed
/// run after checking that it fits both the page and the delta.
#[inline(always)]
fn walk(
    delta: &[u8],
    page_len: usize,
    mut apply: impl FnMut(usize, &[u8]),
) -> Result<usize, DecodeError> {
    let mut i = 0; // position in the delta
    let mut d = 0; // position in the page
    while i < delta.len() {
        let (zrun, at) = read_len(delta, i)?;
        if zrun == 0 && i != 0 {
            return Err(DecodeError::EmptyZeroRun { offset: i });
        }
        d += zrun;
        if d > page_len {
            return Err(DecodeError::RunPastPage { offset: i });
        }
        let (nzrun, lit) = read_len(delta, at)?;
        if nzrun == 0 {
            return Err(DecodeError::EmptyLiteralRun { offset: at });
        }
        if nzrun > page_len - d {
            return Err(DecodeError::RunPastPage { offset: at });
        }
        if nzrun > delta.len() - lit {
            return Err(DecodeError::LiteralPastDelta { offset: at });
        }
        apply(d, &delta[lit..lit + nzrun]);
        d += nzrun;
        i = lit + nzrun;
    }
    Ok(d)
}

/// Reads the run length at `delta[i..]`; returns it and the offset after it.
#[inline(always)]
fn read_len(delta: &[u8], i: usize) -> Result<(usize, usize), DecodeError> {
    match delta.get(i..i + 2) {
        Some(&[a, b]) => match uleb::get(a, b) {
            Some((value, n)) => Ok((value, i + n)),
            None => Err(DecodeError::LengthTooLong { offset: i }),
        },
        _ => Err(DecodeError::Truncated { offset: i }),
    }
}

/// Copies a literal run; runs of up to 16 bytes (the common case) use
/// overlapping fixed-size moves instead of a `memcpy` call.
#[inline(always)]
fn copy_literal(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    match n {
        0 => {}
        1 => dst[0] = src[0],
        2..=3 => {
            dst[..2].copy_from_slice(&src[..2]);
            dst[n - 2..n].copy_from_slice(&src[n - 2..n]);
        }
        4..=7 => {
            dst[..4].copy_from_slice(&src[..4]);
            dst[n - 4..n].copy_from_slice(&src[n - 4..n]);
        }
        8..=16 => {
            dst[..8].copy_from_slice(&src[..8]);
            dst[n - 8..n].copy_from_slice(&src[n - 8..n]);
        }
        _ => dst.copy_from_slice(src),
    }
}
