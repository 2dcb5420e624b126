//! SSE2 backend: 16-byte vectors, present on every x86-64 CPU.

use core::arch::x86_64::*;

use crate::vector::Vector;

impl Vector for __m128i {
    const BYTES: usize = 16;

    #[inline(always)]
    unsafe fn load_unaligned(p: *const u8) -> Self {
        // SAFETY: the caller guarantees SSE2 and 16 readable bytes at `p`.
        unsafe { _mm_loadu_si128(p.cast()) }
    }

    #[inline(always)]
    unsafe fn or(self, other: Self) -> Self {
        // SAFETY: the caller guarantees SSE2.
        unsafe { _mm_or_si128(self, other) }
    }

    #[inline(always)]
    unsafe fn xor(self, other: Self) -> Self {
        // SAFETY: the caller guarantees SSE2.
        unsafe { _mm_xor_si128(self, other) }
    }

    #[inline(always)]
    unsafe fn is_all_zero(self) -> bool {
        // SAFETY: the caller guarantees SSE2.
        unsafe { _mm_movemask_epi8(_mm_cmpeq_epi8(self, _mm_setzero_si128())) == 0xffff }
    }

    #[inline(always)]
    unsafe fn ne_mask(self, other: Self) -> u64 {
        // SAFETY: the caller guarantees SSE2.
        let eq = unsafe { _mm_movemask_epi8(_mm_cmpeq_epi8(self, other)) } as u32;
        u64::from(!eq & 0xffff)
    }
}

backend_kernels!(crate::Backend::Sse2, __m128i, "sse2");
