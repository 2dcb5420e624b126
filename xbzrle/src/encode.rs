//! The encoder: one vectorized pass over both pages that hands each changed
//! 64-byte window's byte mask to a scalar walker, which emits one
//! `(zrun nzrun)` pair per changed run.
//!
//! The pass reads both pages once, like `memcmp`, and unchanged stretches
//! cost what `memcmp` costs; run finding is bit tricks on the 64-bit masks,
//! so each run costs a few instructions however short it is. No mask buffer
//! is written or walked.

use std::fmt;

use vmstream_simd::MASK_BYTES;

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
    encode_scan::<false>(old, new, out)
}

/// Like [`encode`], but merges a short unchanged gap into the surrounding
/// literal whenever that makes the delta smaller (a one-byte gap always
/// does). The output is not QEMU's canonical encoding but decodes under the
/// same rules, by QEMU's decoder too.
pub fn encode_compact(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, EncodeError> {
    encode_scan::<true>(old, new, out)
}

#[inline(always)]
fn check_args(old: &[u8], new: &[u8], out: &[u8]) -> Result<(), EncodeError> {
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
    Ok(())
}

/// One pass over both pages: the SIMD scan hands over each changed 64-byte
/// chunk's byte mask, and the runs are emitted from it right away.
#[inline(always)]
fn encode_scan<const COMPACT: bool>(
    old: &[u8],
    new: &[u8],
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    check_args(old, new, out)?;
    let mut walker = RunWalker {
        emit: Emitter::<COMPACT> {
            out,
            new,
            d: 0,
            pos: 0,
            pending: None,
        },
        open: false,
        start: 0,
        next: 0,
    };
    if !vmstream_simd::for_each_diff_window(old, new, &mut walker)? {
        return Ok(0);
    }
    walker.finish()
}

/// Turns the changed windows' byte masks into maximal runs, in order.
///
/// In a window's mask `m` whose previous bit is `carry`, runs start where
/// `m & !(m << 1 | carry)` and end where `!m & (m << 1 | carry)`; starts and
/// ends alternate, so pairing them needs no comparisons. A run may stay open
/// across windows.
struct RunWalker<'a, const COMPACT: bool> {
    emit: Emitter<'a, COMPACT>,
    /// A run reaches the end of the window that ends at `next`.
    open: bool,
    /// Start of the open run.
    start: usize,
    /// End of the last window visited.
    next: isize,
}

/// The walker is the scan's sink itself, so its window handling is
/// compiled into the SIMD loop rather than called per changed window.
impl<const COMPACT: bool> vmstream_simd::DiffWindowSink<EncodeError>
    for &mut RunWalker<'_, COMPACT>
{
    #[inline(always)]
    fn window(&mut self, at: isize, m: u64) -> Result<(), EncodeError> {
        self.changed_window(at, m)
    }
}

impl<const COMPACT: bool> RunWalker<'_, COMPACT> {
    /// Changed window starting at byte `at` (negative for a window that
    /// starts before the page), with byte mask `m`.
    #[inline(always)]
    fn changed_window(&mut self, at: isize, m: u64) -> Result<(), EncodeError> {
        let carry = if self.open && self.next == at {
            1
        } else {
            if self.open {
                // The window after the run's last window is unchanged.
                self.emit.run(self.start, self.next as usize)?;
                self.open = false;
            }
            0
        };
        let shifted = (m << 1) | carry;
        let mut starts = m & !shifted;
        let mut ends = !m & shifted;
        // Set bits are inside the page, so `base + bit` is never negative.
        let base = at as usize;
        if self.open && ends != 0 {
            self.emit.run(
                self.start,
                base.wrapping_add(ends.trailing_zeros() as usize),
            )?;
            ends &= ends - 1;
            self.open = false;
        }
        while starts != 0 {
            let run_start = base.wrapping_add(starts.trailing_zeros() as usize);
            starts &= starts - 1;
            if ends == 0 {
                self.open = true;
                self.start = run_start;
                break;
            }
            self.emit
                .run(run_start, base.wrapping_add(ends.trailing_zeros() as usize))?;
            ends &= ends - 1;
        }
        self.next = at + MASK_BYTES as isize;
        Ok(())
    }

    /// Closes a run still open and finishes the delta.
    #[inline(always)]
    fn finish(mut self) -> Result<usize, EncodeError> {
        if self.open {
            // Mask bits past the page are clear, so a run still open reached
            // the end of its window: the page's end or an unchanged window.
            self.emit.run(self.start, self.next as usize)?;
        }
        self.emit.finish()
    }
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
