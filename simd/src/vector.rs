//! The small vector abstraction every kernel is written against.
//!
//! Each ISA backend implements [`Vector`] for its register type; the
//! algorithms in [`crate::generic`] are written once over it and instantiated
//! inside `#[target_feature]` functions, so every backend gets the same,
//! fully inlined algorithm.

/// A SIMD register of `BYTES` bytes.
///
/// # Safety
/// Implementations may only be used when the CPU supports the instructions
/// they use; callers of the unsafe methods guarantee that, and that pointers
/// are valid for reads of `BYTES` bytes.
pub(crate) trait Vector: Copy {
    /// Register width in bytes (a power of two, at most 64).
    const BYTES: usize;

    /// Loads `BYTES` bytes from `p`, which need not be aligned.
    unsafe fn load_unaligned(p: *const u8) -> Self;

    /// Bitwise OR.
    unsafe fn or(self, other: Self) -> Self;

    /// Bitwise XOR.
    unsafe fn xor(self, other: Self) -> Self;

    /// True when every byte is zero.
    unsafe fn is_all_zero(self) -> bool;

    /// Bit `i` (for `i < BYTES`) is set when byte `i` of `self` differs from
    /// byte `i` of `other`; higher bits are zero.
    unsafe fn ne_mask(self, other: Self) -> u64;
}
