//! LZ4 block compression through `lz4-sys`, with one heap-allocated state
//! per compressor (initialized on every call, like `LZ4_compress_fast` does
//! with its stack state). The `_fastReset` variant, which skips the 16 KiB
//! table clear, measured about 10% slower on the PostgreSQL corpus: stale
//! table entries cost more than the clear.

use std::ffi::{c_char, c_int, c_void};

// lz4-sys builds and links liblz4 but does not declare these entry points;
// they are part of lz4's stable API since 1.9.
extern "C" {
    fn LZ4_sizeofState() -> c_int;
    fn LZ4_compress_fast_extState(
        state: *mut c_void,
        src: *const c_char,
        dst: *mut c_char,
        src_size: c_int,
        dst_capacity: c_int,
        acceleration: c_int,
    ) -> c_int;
}

/// A per-thread LZ4 compressor.
pub struct Lz4Compressor {
    /// `LZ4_stream_t` storage; u64 elements give it the 8-byte alignment
    /// lz4 requires.
    state: Vec<u64>,
    acceleration: c_int,
}

impl std::fmt::Debug for Lz4Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lz4Compressor")
            .field("acceleration", &self.acceleration)
            .finish()
    }
}

impl Lz4Compressor {
    /// A compressor with LZ4's `acceleration` (1 = default ratio; higher is
    /// faster and compresses less).
    pub fn new(acceleration: i32) -> Lz4Compressor {
        // SAFETY: a pure query with no arguments.
        let size = unsafe { LZ4_sizeofState() } as usize;
        Lz4Compressor {
            state: vec![0u64; size.div_ceil(8)],
            acceleration: acceleration.max(1),
        }
    }

    /// Compresses `src` into `dst`; `None` when the result does not fit.
    pub fn compress(&mut self, src: &[u8], dst: &mut [u8]) -> Option<usize> {
        let (src_len, dst_len) = (
            c_int::try_from(src.len()).ok()?,
            c_int::try_from(dst.len()).ok()?,
        );
        let state = self.state.as_mut_ptr().cast::<c_void>();
        // SAFETY: `state` is LZ4_sizeofState() bytes, 8-aligned, owned by
        // `self`; this variant initializes it before use. src/dst pointers
        // and lengths come from live slices and lz4 writes at most `dst_len`
        // bytes.
        let n = unsafe {
            LZ4_compress_fast_extState(
                state,
                src.as_ptr().cast(),
                dst.as_mut_ptr().cast(),
                src_len,
                dst_len,
                self.acceleration,
            )
        };
        (n > 0).then_some(n as usize)
    }
}

/// Decompresses an LZ4 block into `dst`; returns the decompressed size, or
/// `None` for malformed input or output that would not fit `dst`.
pub fn decompress(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    let (src_len, dst_len) = (
        c_int::try_from(src.len()).ok()?,
        c_int::try_from(dst.len()).ok()?,
    );
    // SAFETY: LZ4_decompress_safe reads at most `src_len` bytes from `src`
    // and writes at most `dst_len` bytes into `dst`, whatever the input;
    // both come from live slices.
    let n = unsafe {
        lz4_sys::LZ4_decompress_safe(
            src.as_ptr().cast(),
            dst.as_mut_ptr().cast(),
            src_len,
            dst_len,
        )
    };
    (n >= 0).then_some(n as usize)
}

/// The one-shot library call (`LZ4_compress_fast`), for benchmarks.
pub fn compress_oneshot(src: &[u8], dst: &mut [u8], acceleration: i32) -> Option<usize> {
    let (src_len, dst_len) = (
        c_int::try_from(src.len()).ok()?,
        c_int::try_from(dst.len()).ok()?,
    );
    // SAFETY: reads `src_len` bytes of `src`, writes at most `dst_len` into `dst`.
    let n = unsafe {
        lz4_sys::LZ4_compress_fast(
            src.as_ptr().cast(),
            dst.as_mut_ptr().cast(),
            src_len,
            dst_len,
            acceleration,
        )
    };
    (n > 0).then_some(n as usize)
}
