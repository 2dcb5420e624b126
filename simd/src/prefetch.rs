//! Cache prefetch hints.
//!
//! The receiver checks a packet's CRC before decoding any of it, so that
//! pass is the first to read the packet: it arrived through another core
//! (the socket reader's) or from memory, and a checksum has no other work
//! to hide the misses behind (measured at a third of its in-cache speed).
//! Asking for the next packet while the current one decompresses turns that
//! pass into a read from L2.

/// Bytes covered by one prefetch (a cache line).
pub const PREFETCH_LINE: usize = 64;

/// Asks the CPU to start loading the cache lines of `bytes` into L2 (and
/// L3), without waiting for them. Only a hint: it never faults and changes
/// no result. A no-op where no prefetch instruction is wired up.
#[inline]
pub fn prefetch_l2(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let mut at = 0;
        while at < bytes.len() {
            // SAFETY: `prefetcht1` is in SSE, which every x86-64 CPU has;
            // the address is inside `bytes`, and a prefetch never faults or
            // writes anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(bytes.as_ptr().add(at).cast()) };
            at += PREFETCH_LINE;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = bytes;
    }
}
