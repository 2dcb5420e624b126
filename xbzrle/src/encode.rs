//! The encoder: a vectorized diff mask of the whole page, then a scalar walk
//! over its bits that emits one `(zrun nzrun)` pair per changed run.
//!
//! Computing the mask in one dispatched call reads both pages once (like
//! `memcmp`) and leaves run finding to bit tricks on 64-bit words, so each
//! run costs a few instructions however short it is.

use std::cell::RefCell;
use std::fmt;

use vmstream_simd::{diff_mask, mask_words, summary_words, MASK_BYTES};

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
    // The mask is per-thread scratch: diff_mask writes every word it uses,
    // so it needs no clearing per page (a 512-byte memset per call showed
    // up at about 5% of the encoder's time).
    let mut run = |masks: &mut [u64], summary: &mut [u64]| {
        encode_runs::<COMPACT>(
            old,
            new,
            out,
            &mut masks[..mask_words(len)],
            &mut summary[..summary_words(len)],
        )
    };
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => {
            let Scratch { masks, summary } = &mut *scratch;
            run(masks, summary)
        }
        // Unreachable (encoding never re-enters), but stay correct anyway.
        Err(_) => run(
            &mut [0; mask_words(MAX_PAGE_SIZE)],
            &mut [0; summary_words(MAX_PAGE_SIZE)],
        ),
    })
}

/// The encoder's per-thread diff mask.
struct Scratch {
    masks: [u64; mask_words(MAX_PAGE_SIZE)],
    summary: [u64; summary_words(MAX_PAGE_SIZE)],
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch {
            masks: [0; mask_words(MAX_PAGE_SIZE)],
            summary: [0; summary_words(MAX_PAGE_SIZE)],
        })
    };
}

#[inline(always)]
fn encode_runs<const COMPACT: bool>(
    old: &[u8],
    new: &[u8],
    out: &mut [u8],
    masks: &mut [u64],
    summary: &mut [u64],
) -> Result<usize, EncodeError> {
    if !diff_mask(old, new, masks, summary) {
        return Ok(0);
    }
    let mut emit = Emitter::<COMPACT> {
        out,
        new,
        d: 0,
        pos: 0,
        pending: None,
    };
    // Walk the changed runs word by word, visiting only non-zero mask words
    // (through the summary). In a word `m` whose previous bit is `carry`,
    // runs start where `m & !(m << 1 | carry)` and end where
    // `!m & (m << 1 | carry)`; starts and ends alternate, so pairing them
    // needs no comparisons.
    let mut open = false; // a run reaches the end of the last visited word
    let mut start = 0;
    let mut last_word = usize::MAX;
    for (s, &sum) in summary.iter().enumerate() {
        let mut sum = sum;
        while sum != 0 {
            let w = s * 64 + sum.trailing_zeros() as usize;
            sum &= sum - 1;
            let carry = if open && last_word.wrapping_add(1) == w {
                1
            } else {
                if open {
                    // The word after the run's last word is unchanged.
                    emit.run(start, (last_word + 1) * MASK_BYTES)?;
                    open = false;
                }
                0
            };
            let m = masks[w];
            let shifted = (m << 1) | carry;
            let mut starts = m & !shifted;
            let mut ends = !m & shifted;
            let base = w * MASK_BYTES;
            if open && ends != 0 {
                emit.run(start, base + ends.trailing_zeros() as usize)?;
                ends &= ends - 1;
                open = false;
            }
            while starts != 0 {
                let run_start = base + starts.trailing_zeros() as usize;
                starts &= starts - 1;
                if ends == 0 {
                    open = true;
                    start = run_start;
                    break;
                }
                emit.run(run_start, base + ends.trailing_zeros() as usize)?;
                ends &= ends - 1;
            }
            last_word = w;
        }
    }
    if open {
        // Mask bits past the page are clear, so a run still open reached
        // the end of a whole word: the page's end or an unchanged word.
        emit.run(start, (last_word + 1) * MASK_BYTES)?;
    }
    emit.finish()
}

/// Writes `(zrun nzrun literal)` triples with QEMU's overflow rule. In
/// compact mode it holds the last run back until the next one shows whether
/// merging the gap between them is cheaper.
struct Emitter<'a, const COMPACT: bool> {
    out: &'a mut [u8],
    new: &'a [u8],
    /// Bytes written to `out`.
    d: usize,
    /// End of the last run written (start of the next zero run).
    pos: usize,
    /// Compact mode: a run not yet written.
    pending: Option<(usize, usize)>,
}

impl<const COMPACT: bool> Emitter<'_, COMPACT> {
    /// A maximal changed run `start..end`.
    #[inline(always)]
    fn run(&mut self, start: usize, end: usize) -> Result<(), EncodeError> {
        if !COMPACT {
            return self.write(start, end);
        }
        match self.pending {
            Some((ps, pe)) => {
                let gap = start - pe;
                let split = uleb::len(pe - ps) + uleb::len(gap) + uleb::len(end - start);
                let merged = uleb::len(end - ps) + gap;
                if merged < split && end - ps <= MAX_RUN {
                    self.pending = Some((ps, end));
                } else {
                    self.write(ps, pe)?;
                    self.pending = Some((start, end));
                }
                Ok(())
            }
            None => {
                self.pending = Some((start, end));
                Ok(())
            }
        }
    }

    /// Flushes a pending run and applies QEMU's check before the trailing
    /// zero run; returns the delta length.
    #[inline(always)]
    fn finish(mut self) -> Result<usize, EncodeError> {
        if let Some((ps, pe)) = self.pending.take() {
            self.write(ps, pe)?;
        }
        if self.pos < self.new.len() && self.out.len() - self.d < 2 {
            return Err(EncodeError::Overflow);
        }
        Ok(self.d)
    }

    #[inline(always)]
    fn write(&mut self, start: usize, end: usize) -> Result<(), EncodeError> {
        let (zrun, nzrun) = (start - self.pos, end - start);
        if nzrun > MAX_RUN {
            return Err(EncodeError::Overflow); // a whole 16 KiB page changed
        }
        let room = self.out.len() - self.d;
        let mut d = self.d;
        if room >= nzrun + 4 {
            // Room for the worst case: none of QEMU's checks can fail.
            d = uleb::put(self.out, d, zrun);
            d = uleb::put(self.out, d, nzrun);
        } else {
            if room < 2 {
                return Err(EncodeError::Overflow);
            }
            d = uleb::put(self.out, d, zrun);
            if self.out.len() - d < 2 {
                return Err(EncodeError::Overflow);
            }
            d = uleb::put(self.out, d, nzrun);
            if self.out.len() - d < nzrun {
                return Err(EncodeError::Overflow);
            }
        }
        if nzrun <= SHORT_LITERAL
            && start + SHORT_LITERAL <= self.new.len()
            && d + SHORT_LITERAL <= self.out.len()
        {
            // One fixed-size move; the bytes past the run in `out` are
            // scratch (overwritten by the next run, or past the delta).
            self.out[d..d + SHORT_LITERAL].copy_from_slice(&self.new[start..start + SHORT_LITERAL]);
        } else {
            self.out[d..d + nzrun].copy_from_slice(&self.new[start..end]);
        }
        self.d = d + nzrun;
        self.pos = end;
        Ok(())
    }
}

/// Literal runs up to this length are copied with one fixed-size move.
const SHORT_LITERAL: usize = 16;
