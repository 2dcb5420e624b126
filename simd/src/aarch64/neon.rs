//! NEON backend: 16-byte vectors. NEON has no byte movemask, so `ne_mask`
//! weights each lane by its bit and sums each half horizontally.

use core::arch::aarch64::*;

use crate::vector::Vector;

const LANE_BITS: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];

impl Vector for uint8x16_t {
    const BYTES: usize = 16;

    #[inline(always)]
    unsafe fn load_unaligned(p: *const u8) -> Self {
        // SAFETY: the caller guarantees NEON and 16 readable bytes at `p`.
        unsafe { vld1q_u8(p) }
    }

    #[inline(always)]
    unsafe fn or(self, other: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { vorrq_u8(self, other) }
    }

    #[inline(always)]
    unsafe fn xor(self, other: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { veorq_u8(self, other) }
    }

    #[inline(always)]
    unsafe fn is_all_zero(self) -> bool {
        // SAFETY: the caller guarantees NEON.
        unsafe { vmaxvq_u8(self) == 0 }
    }

    #[inline(always)]
    unsafe fn ne_mask(self, other: Self) -> u64 {
        // SAFETY: the caller guarantees NEON; LANE_BITS is 16 bytes.
        unsafe {
            let ne = vmvnq_u8(vceqq_u8(self, other));
            let bits = vandq_u8(ne, vld1q_u8(LANE_BITS.as_ptr()));
            // Distinct powers of two per half: the sums cannot overflow a byte.
            let lo = u64::from(vaddv_u8(vget_low_u8(bits)));
            let hi = u64::from(vaddv_u8(vget_high_u8(bits)));
            lo | (hi << 8)
        }
    }
}

backend_kernels!(crate::Backend::Neon, uint8x16_t, "neon");
