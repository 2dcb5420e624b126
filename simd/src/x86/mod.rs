//! x86-64 backends: SSE2 (baseline), AVX2 and AVX-512BW.

pub(crate) mod avx2;
pub(crate) mod avx512;
pub(crate) mod sse2;
