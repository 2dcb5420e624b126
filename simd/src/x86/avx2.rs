//! AVX2 backend: 32-byte vectors.

use core::arch::x86_64::*;

use crate::vector::Vector;

impl Vector for __m256i {
    const BYTES: usize = 32;

    #[inline(always)]
    unsafe fn load_unaligned(p: *const u8) -> Self {
        // SAFETY: the caller guarantees AVX2 and 32 readable bytes at `p`.
        unsafe { _mm256_loadu_si256(p.cast()) }
    }

    #[inline(always)]
    unsafe fn or(self, other: Self) -> Self {
        // SAFETY: the caller guarantees AVX2.
        unsafe { _mm256_or_si256(self, other) }
    }

    #[inline(always)]
    unsafe fn xor(self, other: Self) -> Self {
        // SAFETY: the caller guarantees AVX2.
        unsafe { _mm256_xor_si256(self, other) }
    }

    #[inline(always)]
    unsafe fn is_all_zero(self) -> bool {
        // SAFETY: the caller guarantees AVX2.
        unsafe { _mm256_testz_si256(self, self) != 0 }
    }

    #[inline(always)]
    unsafe fn ne_mask(self, other: Self) -> u64 {
        // SAFETY: the caller guarantees AVX2.
        let eq = unsafe { _mm256_movemask_epi8(_mm256_cmpeq_epi8(self, other)) } as u32;
        u64::from(!eq)
    }
}

backend_kernels!(crate::Backend::Avx2, __m256i, "avx2");
