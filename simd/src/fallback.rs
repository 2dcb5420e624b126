//! Portable backend: 64-bit words used as 8-lane vectors (SWAR), plus the
//! byte-wise helpers the SIMD backends use for short inputs and tails.

use crate::vector::Vector;

const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const HIGH: u64 = 0x8080_8080_8080_8080;
/// Multiplier that gathers bit 8k of a word into bit 56 + k (k = 0..8): the
/// partial products land on distinct bits, so nothing carries into the top
/// byte.
const GATHER: u64 = 0x0102_0408_1020_4080;

/// A `u64` word standing in for an 8-byte vector register.
#[derive(Clone, Copy)]
pub(crate) struct Word(u64);

impl Vector for Word {
    const BYTES: usize = 8;

    #[inline(always)]
    unsafe fn load_unaligned(p: *const u8) -> Self {
        // SAFETY: the caller guarantees `p` is valid for 8 bytes.
        Word(u64::from_le(unsafe { p.cast::<u64>().read_unaligned() }))
    }

    #[inline(always)]
    unsafe fn or(self, other: Self) -> Self {
        Word(self.0 | other.0)
    }

    #[inline(always)]
    unsafe fn xor(self, other: Self) -> Self {
        Word(self.0 ^ other.0)
    }

    #[inline(always)]
    unsafe fn is_all_zero(self) -> bool {
        self.0 == 0
    }

    #[inline(always)]
    unsafe fn ne_mask(self, other: Self) -> u64 {
        let x = self.0 ^ other.0;
        // High bit of each byte set when that byte is non-zero; no carry
        // crosses a byte because (b & 0x7f) + 0x7f <= 0xfe.
        let nonzero = (x | ((x & LOW7) + LOW7)) & HIGH;
        (nonzero >> 7).wrapping_mul(GATHER) >> 56
    }
}

/// Byte-wise zero test, for inputs shorter than one vector.
#[inline]
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}

/// Bit `i` set where `a[i] != b[i]`, for inputs of at most 64 bytes.
#[inline]
pub(crate) fn ne_mask_bytes(a: &[u8], b: &[u8]) -> u64 {
    debug_assert!(a.len() <= 64 && a.len() == b.len());
    a.iter()
        .zip(b)
        .enumerate()
        .fold(0u64, |m, (i, (x, y))| m | (u64::from(x != y) << i))
}

/// Byte-wise search for the first equal (`EQUAL`) or differing byte.
#[inline]
pub(crate) fn find<const EQUAL: bool>(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| (x == y) == EQUAL)
        .unwrap_or(a.len().min(b.len()))
}
