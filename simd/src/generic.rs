//! The kernels, written once over [`Vector`].
//!
//! Every function here is `#[inline(always)]` so that it is compiled inside
//! the `#[target_feature]` wrapper of each backend, with that backend's
//! instructions.

use crate::vector::Vector;
use crate::{fallback, MASK_BYTES};

/// True when every byte of `buf` is zero.
///
/// Checks the first, middle and last vectors before scanning, so a page whose
/// head, middle or tail holds data is rejected after three loads.
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
    // Four vectors per step, ORed, one test: the loop is bound by loads.
    let step = 4 * V::BYTES;
    let mut off = 0;
    while off + step <= len {
        // SAFETY: `off + step <= len`.
        unsafe {
            let p = start.add(off);
            let a = V::load_unaligned(p).or(V::load_unaligned(p.add(V::BYTES)));
            let b =
                V::load_unaligned(p.add(2 * V::BYTES)).or(V::load_unaligned(p.add(3 * V::BYTES)));
            if !a.or(b).is_all_zero() {
                return false;
            }
        }
        off += step;
    }
    while off + V::BYTES <= len {
        // SAFETY: `off + V::BYTES <= len`.
        if unsafe { !V::load_unaligned(start.add(off)).is_all_zero() } {
            return false;
        }
        off += V::BYTES;
    }
    // The tail was already covered by the `last` vector above.
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
        // SAFETY: chunks `w..w + QUICK_CHUNKS` lie inside both slices.
        if w + QUICK_CHUNKS <= full
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
