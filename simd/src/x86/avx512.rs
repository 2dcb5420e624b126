//! AVX-512BW backend: 64-byte vectors whose compares yield a 64-bit mask
//! directly (one bit per byte), which is exactly the diff-mask layout.

use core::arch::x86_64::*;

use crate::vector::Vector;

impl Vector for __m512i {
    const BYTES: usize = 64;

    #[inline(always)]
    unsafe fn load_unaligned(p: *const u8) -> Self {
        // SAFETY: the caller guarantees AVX-512F and 64 readable bytes at `p`.
        unsafe { _mm512_loadu_si512(p.cast()) }
    }

    #[inline(always)]
    unsafe fn or(self, other: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe { _mm512_or_si512(self, other) }
    }

    #[inline(always)]
    unsafe fn xor(self, other: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe { _mm512_xor_si512(self, other) }
    }

    #[inline(always)]
    unsafe fn is_all_zero(self) -> bool {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe { _mm512_test_epi64_mask(self, self) == 0 }
    }

    #[inline(always)]
    unsafe fn ne_mask(self, other: Self) -> u64 {
        // SAFETY: the caller guarantees AVX-512BW.
        unsafe { _mm512_cmpneq_epi8_mask(self, other) }
    }
}

backend_kernels!(crate::Backend::Avx512, __m512i, "avx512f", "avx512bw");
