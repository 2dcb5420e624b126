//! The kernels, written once over [`Vector`].
//!
//! Every function here is `#[inline(always)]` so that it is compiled inside
//! the `#[target_feature]` wrapper of each backend, with that backend's
//! instructions.

use crate::vector::Vector;
use crate::{fallback, MASK_BYTES};

/// Bytes ORed together per test by [`is_zero`].
const ZERO_BLOCK: usize = 256;

/// True when every byte of `buf` is zero.
///
/// Tests the first, middle and last vectors together before scanning, so a
/// page whose head, middle or tail holds data is rejected after three
/// loads (one cache miss each); then scans from both ends.
///
/// # Safety
/// The CPU supports `V`.
#[inline(always)]
pub(crate) unsafe fn is_zero<V: Vector>(buf: &[u8]) -> bool {
    let len = buf.len();
    if len < V::BYTES {
        return fallback::is_zero(buf);
    }
    let start = buf.as_ptr();
    // SAFETY: `len >= V::BYTES`, so the first, last and middle vectors
    // (`mid <= len - V::BYTES`) are in bounds.
    unsafe {
        let last = start.add(len - V::BYTES);
        let mid = start.add((len / 2) & !(V::BYTES - 1)).min(last);
        if !V::load_unaligned(start)
            .or(V::load_unaligned(mid))
            .or(V::load_unaligned(last))
            .is_all_zero()
        {
            return false;
        }
    }
    // A 256-byte block from each end per step (8 AVX2 vectors or 4 AVX-512
    // ones apiece), ORed, one test. A forward plus a backward stream is
    // what the L2 prefetcher follows within a 4 KiB page: on all-zero pages
    // this ran as fast as a plain forward pass (within 1-4%), bound by
    // memory. (Folding the probes into the first step instead made pages
    // with data at their head 2-3x slower to reject: 9 lines fetched
    // before the first test instead of 3.)
    let (mut lo, mut hi) = (0, len);
    while hi - lo >= 2 * ZERO_BLOCK {
        hi -= ZERO_BLOCK;
        // SAFETY: `lo + ZERO_BLOCK <= hi` and `hi + ZERO_BLOCK <= len`.
        unsafe {
            let (p, q) = (start.add(lo), start.add(hi));
            let mut acc = V::load_unaligned(p).or(V::load_unaligned(q));
            let mut k = V::BYTES;
            while k < ZERO_BLOCK {
                acc = acc
                    .or(V::load_unaligned(p.add(k)))
                    .or(V::load_unaligned(q.add(k)));
                k += V::BYTES;
            }
            if !acc.is_all_zero() {
                return false;
            }
        }
        lo += ZERO_BLOCK;
    }
    while lo + V::BYTES <= hi {
        // SAFETY: `lo + V::BYTES <= hi <= len`.
        if unsafe { !V::load_unaligned(start.add(lo)).is_all_zero() } {
            return false;
        }
        lo += V::BYTES;
    }
    if lo < hi {
        // Fewer than `V::BYTES` bytes left: test the vector ending at `hi`.
        // SAFETY: `V::BYTES <= hi <= len` (`hi` starts at `len` and only
        // drops while at least a block stays below it).
        return unsafe { V::load_unaligned(start.add(hi - V::BYTES)).is_all_zero() };
    }
    true
}

/// Chunks tested together by the equality fast path of [`diff_mask`].
const QUICK_CHUNKS: usize = 8;

/// True when the `bytes` bytes at `a` and `b` are equal (`bytes` a multiple
/// of `V::BYTES`).
///
/// # Safety
/// The CPU supports `V`; `a` and `b` are valid for `bytes`-byte reads.
#[inline(always)]
unsafe fn block_equal<V: Vector>(a: *const u8, b: *const u8, bytes: usize) -> bool {
    // SAFETY: every offset read is below `bytes`, as the caller vouched.
    unsafe {
        let mut acc = V::load_unaligned(a).xor(V::load_unaligned(b));
        let mut k = V::BYTES;
        while k < bytes {
            acc = acc.or(V::load_unaligned(a.add(k)).xor(V::load_unaligned(b.add(k))));
            k += V::BYTES;
        }
        acc.is_all_zero()
    }
}

/// Mask of the bytes that differ in one 64-byte chunk at `a` and `b`.
///
/// # Safety
/// The CPU supports `V`; `a` and `b` are valid for 64-byte reads.
#[inline(always)]
unsafe fn chunk_ne_mask<V: Vector>(a: *const u8, b: *const u8) -> u64 {
    let mut mask = 0u64;
    let mut k = 0;
    while k < MASK_BYTES {
        // SAFETY: `k + V::BYTES <= 64`, inside the chunk the caller vouched for.
        unsafe {
            let m = V::load_unaligned(a.add(k)).ne_mask(V::load_unaligned(b.add(k)));
            mask |= m << k;
        }
        k += V::BYTES;
    }
    mask
}

/// Fills `masks` with one bit per byte (set where `a` and `b` differ) and
/// `summary` with one bit per mask word (set where that word is non-zero);
/// returns whether any byte differs. See [`crate::diff_mask`].
///
/// # Safety
/// The CPU supports `V`; `a.len() == b.len()`,
/// `masks.len() == mask_words(a.len())` and
/// `summary.len() == summary_words(a.len())` (checked by the caller).
#[inline(always)]
pub(crate) unsafe fn diff_mask<V: Vector>(
    a: &[u8],
    b: &[u8],
    masks: &mut [u64],
    summary: &mut [u64],
) -> bool {
    let len = a.len();
    let full = len / MASK_BYTES;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    summary.fill(0);
    let mut w = 0;
    while w < full {
        let base = w * MASK_BYTES;
        // Unchanged stretches (most of a page) cost what memcmp costs:
        // XOR, OR and one test per QUICK_CHUNKS chunks.
        if w + QUICK_CHUNKS <= full
            // SAFETY: the caller guarantees `V`'s features and
            // `a.len() == b.len()`; `w + QUICK_CHUNKS <= full`, so chunks
            // `w..w + QUICK_CHUNKS` (bytes `base..base + QUICK_CHUNKS * 64`)
            // lie inside both slices.
            && unsafe { block_equal::<V>(pa.add(base), pb.add(base), QUICK_CHUNKS * MASK_BYTES) }
        {
            masks[w..w + QUICK_CHUNKS].fill(0);
            w += QUICK_CHUNKS;
            continue;
        }
        let stop = (w + QUICK_CHUNKS).min(full);
        while w < stop {
            // SAFETY: chunk `w < full` lies inside both slices.
            let m = unsafe { chunk_ne_mask::<V>(pa.add(w * MASK_BYTES), pb.add(w * MASK_BYTES)) };
            masks[w] = m;
            summary[w / 64] |= u64::from(m != 0) << (w % 64);
            w += 1;
        }
    }
    if full < masks.len() {
        let tail = fallback::ne_mask_bytes(&a[full * MASK_BYTES..], &b[full * MASK_BYTES..]);
        masks[full] = tail;
        summary[full / 64] |= u64::from(tail != 0) << (full % 64);
    }
    summary.iter().any(|&s| s != 0)
}

/// Bytes tested together by the equality fast path of [`for_each_diff`].
const SCAN_BLOCK: usize = 256;

/// Windows per [`SCAN_BLOCK`].
const BLOCK_WINDOWS: usize = SCAN_BLOCK / MASK_BYTES;

/// Calls `f(start, mask)`, in increasing `start`, for every 64-byte window
/// of `a` and `b` that holds a difference (bit `i` of `mask` set when byte
/// `start + i` differs); stops at the first error. Returns whether any byte
/// differs. See [`crate::for_each_diff_window`].
///
/// # Safety
/// The CPU supports `V`; `a.len() == b.len()` (checked by the caller).
#[inline(always)]
pub(crate) unsafe fn for_each_diff<V: Vector, E, F>(
    a: &[u8],
    b: &[u8],
    f: &mut F,
) -> Result<bool, E>
where
    F: crate::DiffWindowSink<E>,
{
    let len = a.len();
    if len < MASK_BYTES {
        let m = fallback::ne_mask_bytes(a, b);
        if m != 0 {
            f.window(0, m)?;
        }
        return Ok(m != 0);
    }
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut any = false;
    // Windows are aligned on `a`'s address, so the loads never split a
    // cache line of `a` (nor of `b` when it shares the alignment, as
    // page-aligned pages do). The bytes before the first aligned window form
    // the top of a window that starts before `a`.
    let head = (MASK_BYTES - pa as usize % MASK_BYTES) % MASK_BYTES;
    if head > 0 {
        // SAFETY: `len >= 64`.
        let m = unsafe { chunk_ne_mask::<V>(pa, pb) } << (MASK_BYTES - head);
        if m != 0 {
            any = true;
            f.window(head as isize - MASK_BYTES as isize, m)?;
        }
    }
    // Unchanged stretches cost what memcmp costs: XOR, OR and one test per
    // block. Only a block that differs is compared window by window (from
    // L1: it was just read), and only its changed windows reach `f`.
    let mut s = head;
    // Two moving pointers rather than one index: base + offset addressing
    // keeps the XOR's memory operand fused with it (an indexed address
    // costs an extra uop per load on Intel cores).
    let (mut ca, mut cb) = (pa.wrapping_add(s), pb.wrapping_add(s));
    while s + SCAN_BLOCK <= len {
        // SAFETY: bytes `s..s + SCAN_BLOCK` (at `ca`, `cb`) lie inside both
        // slices.
        let equal = unsafe { block_equal::<V>(ca, cb, SCAN_BLOCK) };
        ca = ca.wrapping_add(SCAN_BLOCK);
        cb = cb.wrapping_add(SCAN_BLOCK);
        if !equal {
            any = true;
            // Reload the block through opaque pointers. Otherwise the
            // compiler reuses the fast path's loaded vectors here, keeps
            // them alive across the loop and spills them to the stack on
            // every block (8 stores per 256 bytes with AVX2), which made
            // the unchanged-page pass twice as slow as memcmp from L1.
            let (qa, qb) = std::hint::black_box((pa.wrapping_add(s), pb.wrapping_add(s)));
            let mut masks = [0u64; BLOCK_WINDOWS];
            let mut changed = 0u32;
            for (k, m) in masks.iter_mut().enumerate() {
                let at = k * MASK_BYTES;
                // SAFETY: window `k` of the block lies inside both slices
                // (`qa`, `qb` are `pa + s`, `pb + s`).
                *m = unsafe { chunk_ne_mask::<V>(qa.add(at), qb.add(at)) };
                changed |= u32::from(*m != 0) << k;
            }
            while changed != 0 {
                let k = changed.trailing_zeros() as usize;
                changed &= changed - 1;
                f.window((s + k * MASK_BYTES) as isize, masks[k])?;
            }
        }
        s += SCAN_BLOCK;
    }
    while s < len {
        // The last window may end past `len`: take the page's last 64 bytes
        // and shift out the ones before `s`.
        let at = s.min(len - MASK_BYTES);
        // SAFETY: `at + 64 <= len`.
        let m = unsafe { chunk_ne_mask::<V>(pa.add(at), pb.add(at)) } >> (s - at);
        if m != 0 {
            any = true;
            f.window(s as isize, m)?;
        }
        s += MASK_BYTES;
    }
    Ok(any)
}

/// Index of the first byte where `a` and `b` differ (`EQUAL == false`) or are
/// equal (`EQUAL == true`), or `a.len()` when there is none.
///
/// # Safety
/// The CPU supports `V`; `a.len() == b.len()`.
#[inline(always)]
pub(crate) unsafe fn find<V: Vector, const EQUAL: bool>(a: &[u8], b: &[u8]) -> usize {
    let len = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut off = 0;
    while off + V::BYTES <= len {
        // SAFETY: `off + V::BYTES <= len` for both slices.
        let ne = unsafe { V::load_unaligned(pa.add(off)).ne_mask(V::load_unaligned(pb.add(off))) };
        let hits = if EQUAL { !ne & lane_bits::<V>() } else { ne };
        if hits != 0 {
            return off + hits.trailing_zeros() as usize;
        }
        off += V::BYTES;
    }
    off + fallback::find::<EQUAL>(&a[off..], &b[off..])
}

#[inline(always)]
fn lane_bits<V: Vector>() -> u64 {
    if V::BYTES >= 64 {
        u64::MAX
    } else {
        (1u64 << V::BYTES) - 1
    }
}
