//! The encoder: a vectorized diff mask of the whole page, then a scalar walk
//! over its bits that emits one `(zrun nzrun)` pair per changed run.
//!
//! Computing the mask in one dispatched call reads both pages once (like
//! `memcmp`) and leaves run finding to bit tricks on 64-bit words, so each
//! run costs a few instructions however short it is.

use std::fmt;

use vmstream_simd::{diff_mask, mask_words, MASK_BYTES};

use crate::{uleb, MAX_PAGE_SIZE, MAX_RUN};

/// Why a page could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The delta does not fit in the output buffer: send the page whole.
    Overflow,
    /// `old` and `new` differ in length.
    LengthMismatch {
        /// Length of the old page.
        old: usize,
        /// Length of the new page.
        new: usize,
    },
    /// The page is longer than [`MAX_PAGE_SIZE`].
    PageTooLarge {
        /// Length of the page.
        len: usize,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::Overflow => f.write_str("XBZRLE delta does not fit in the output buffer"),
            EncodeError::LengthMismatch { old, new } => {
                write!(
                    f,
                    "XBZRLE pages differ in length: old {old} bytes, new {new} bytes"
                )
            }
            EncodeError::PageTooLarge { len } => {
                write!(
                    f,
                    "XBZRLE page of {len} bytes exceeds the {MAX_PAGE_SIZE}-byte limit"
                )
            }
        }
    }
}

impl std::error::Error for EncodeError {}

/// Encodes `new` against `old` (same length, at most [`MAX_PAGE_SIZE`]) into
/// `out`, exactly as QEMU's encoder does.
///
/// Returns `Ok(0)` when the pages are identical and `Ok(n)` for an `n`-byte
/// delta in `out[..n]`. Fails with [`EncodeError::Overflow`] under QEMU's
/// rule: each time a run pair starts, fewer than two bytes left in `out`
/// fails (even if only unchanged bytes follow), as do literal bytes that do
/// not fit. (Hence an `out` shorter than two bytes overflows even for
/// identical pages.)
pub fn encode(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, EncodeError> {
    encode_with::<false>(old, new, out)
}

/// Like [`encode`], but merges a short unchanged gap into the surrounding
/// literal whenever that makes the delta smaller (a one-byte gap always
/// does). The output is not QEMU's canonical encoding but decodes under the
/// same rules, by QEMU's decoder too.
pub fn encode_compact(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, EncodeError> {
    encode_with::<true>(old, new, out)
}

#[inline(always)]
fn encode_with<const COMPACT: bool>(
    old: &[u8],
    new: &[u8],
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let len = new.len();
    if old.len() != len {
        return Err(EncodeError::LengthMismatch {
            old: old.len(),
            new: len,
        });
    }
    if len > MAX_PAGE_SIZE {
        return Err(EncodeError::PageTooLarge { len });
    }
    if len > 0 && out.len() < 2 {
        return Err(EncodeError::Overflow);
    }
    // The mask lives on the stack; size it for the common 4 KiB page so the
    // array costs a few stores, not a 2 KiB memset.
    if len <= SMALL_PAGE {
        let mut masks = [0u64; mask_words(SMALL_PAGE)];
        encode_runs::<COMPACT>(old, new, out, &mut masks[..mask_words(len)])
    } else {
        let mut masks = [0u64; mask_words(MAX_PAGE_SIZE)];
        encode_runs::<COMPACT>(old, new, out, &mut masks[..mask_words(len)])
    }
}

/// Pages up to this size use a smaller mask array.
const SMALL_PAGE: usize = 4096;

#[inline(always)]
fn encode_runs<const COMPACT: bool>(
    old: &[u8],
    new: &[u8],
    out: &mut [u8],
    masks: &mut [u64],
) -> Result<usize, EncodeError> {
    let len = new.len();
    if !diff_mask(old, new, masks) {
        return Ok(0);
    }
    let runs = Runs { masks, len };
    let mut pos = 0; // next unencoded byte of the page
    let mut d = 0; // bytes written to `out`
    while pos < len {
        if out.len() - d < 2 {
            return Err(EncodeError::Overflow);
        }
        let start = runs.next_changed(pos);
        if start == len {
            break; // a trailing zero run is never written
        }
        let mut end = runs.next_unchanged(start);
        if COMPACT {
            end = runs.extend_over_short_gaps(start, end);
        }
        let zrun = start - pos;
        let nzrun = end - start;
        if nzrun > MAX_RUN {
            return Err(EncodeError::Overflow); // a whole 16 KiB page changed
        }
        d = uleb::put(out, d, zrun);
        if out.len() - d < 2 {
            return Err(EncodeError::Overflow);
        }
        d = uleb::put(out, d, nzrun);
        if out.len() - d < nzrun {
            return Err(EncodeError::Overflow);
        }
        copy_literal(&mut out[d..d + nzrun], &new[start..end]);
        d += nzrun;
        pos = end;
    }
    Ok(d)
}

/// Copies a literal run; short runs (the common case) avoid a `memcpy` call.
#[inline(always)]
fn copy_literal(dst: &mut [u8], src: &[u8]) {
    match src.len() {
        1 => dst[0] = src[0],
        2 => dst[..2].copy_from_slice(&src[..2]),
        _ => dst.copy_from_slice(src),
    }
}

/// Run boundaries over a diff mask: bit `i` set when byte `i` changed.
struct Runs<'a> {
    masks: &'a [u64],
    len: usize,
}

impl Runs<'_> {
    /// First changed byte at or after `from`, or `len`.
    #[inline(always)]
    fn next_changed(&self, from: usize) -> usize {
        let mut w = from / MASK_BYTES;
        let mut bits = self.masks[w] & (u64::MAX << (from % MASK_BYTES));
        while bits == 0 {
            w += 1;
            if w == self.masks.len() {
                return self.len;
            }
            bits = self.masks[w];
        }
        w * MASK_BYTES + bits.trailing_zeros() as usize
    }

    /// First unchanged byte at or after `from`, or `len`. (Mask bits past
    /// `len` are clear, so they read as unchanged.)
    #[inline(always)]
    fn next_unchanged(&self, from: usize) -> usize {
        let mut w = from / MASK_BYTES;
        let mut bits = !self.masks[w] & (u64::MAX << (from % MASK_BYTES));
        while bits == 0 {
            w += 1;
            if w == self.masks.len() {
                return self.len;
            }
            bits = !self.masks[w];
        }
        (w * MASK_BYTES + bits.trailing_zeros() as usize).min(self.len)
    }

    /// Grows the changed run `start..end` over every following unchanged gap
    /// that costs more as a separate run pair than as literal bytes.
    #[inline(always)]
    fn extend_over_short_gaps(&self, start: usize, mut end: usize) -> usize {
        while end < self.len {
            let next = self.next_changed(end);
            if next == self.len {
                break;
            }
            let next_end = self.next_unchanged(next);
            let gap = next - end;
            let split = uleb::len(end - start) + uleb::len(gap) + uleb::len(next_end - next);
            let merged = uleb::len(next_end - start) + gap;
            if merged >= split || next_end - start > MAX_RUN {
                break;
            }
            end = next_end;
        }
        end
    }
}
