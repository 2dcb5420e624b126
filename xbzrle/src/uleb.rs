//! The 1- or 2-byte ULEB128 lengths of the XBZRLE format.

use crate::MAX_RUN;

/// Writes `value` (at most [`MAX_RUN`]) at `out[pos..]`, returning the new
/// position. The caller has checked that two bytes are free.
#[inline(always)]
pub(crate) fn put(out: &mut [u8], pos: usize, value: usize) -> usize {
    debug_assert!(value <= MAX_RUN);
    if value < 0x80 {
        out[pos] = value as u8;
        pos + 1
    } else {
        out[pos] = (value as u8) | 0x80;
        out[pos + 1] = (value >> 7) as u8;
        pos + 2
    }
}

/// Encoded size of `value`.
#[inline(always)]
pub(crate) fn len(value: usize) -> usize {
    1 + usize::from(value >= 0x80)
}

/// Reads a length from the first bytes of `two`, returning `(value, bytes)`,
/// or `None` when the second byte also has its continuation bit set (a
/// length of three or more bytes).
#[inline(always)]
pub(crate) fn get(first: u8, second: u8) -> Option<(usize, usize)> {
    if first & 0x80 == 0 {
        Some((usize::from(first), 1))
    } else if second & 0x80 == 0 {
        Some((usize::from(first & 0x7f) | usize::from(second) << 7, 2))
    } else {
        None
    }
}
