//! CPU-dispatched SIMD kernels for scanning guest memory pages.
//!
//! * [`is_zero`]: is a buffer all zero bytes (zero-page detection)?
//! * [`for_each_diff_window`]: the byte-difference mask of every changed
//!   64-byte window of two buffers, handed to a callback during one pass
//!   (the XBZRLE encoder's scan).
//! * [`diff_mask`]: one bit per byte where two buffers differ, plus one bit
//!   per non-zero mask word, written to buffers.
//! * [`find_diff`] / [`find_equal`]: position of the next differing / equal
//!   byte between two slices.
//!
//! * [`prefetch_l2`]: a cache hint for data needed soon (the receiver's
//!   next packet).
//! * [`crc32c`]: CRC-32C with `crc32` and carry-less multiplication
//!   running side by side (packet checksums).
//!
//! Each kernel is written once over a small vector abstraction (`Vector`)
//! and instantiated per ISA: AVX-512BW, AVX2 and SSE2 on x86-64, NEON on
//! aarch64, and a portable 64-bit-word (SWAR) fallback everywhere. The best
//! backend the CPU supports is chosen on first use and cached (on Intel CPUs
//! AVX2 is preferred over AVX-512: see `prefers_256_bit_vectors`); setting
//! `VMSTREAM_SIMD=avx512|avx2|sse2|neon|fallback` in the environment forces a
//! backend (ignored when the CPU lacks it). [`Backend`] lets tests and
//! benchmarks call any supported backend directly.
//!
//! All lengths and alignments are accepted; [`AlignedBuf`] gives buffers
//! the cache-line alignment guest pages have, which the scans run fastest
//! on.
#![warn(missing_docs)]

use std::fmt;
use std::sync::OnceLock;

mod aligned;
#[macro_use]
mod backend_kernels;
mod crc32c;
mod fallback;
mod generic;
mod prefetch;
mod vector;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use aligned::{AlignedBuf, BUF_ALIGN};
pub use crc32c::{crc32c, crc32c_portable};
pub use prefetch::{prefetch_l2, PREFETCH_LINE};

/// Bytes covered by one word of a [`diff_mask`] output.
pub const MASK_BYTES: usize = 64;

/// Number of `u64` mask words [`diff_mask`] needs for `len` bytes.
#[inline]
pub const fn mask_words(len: usize) -> usize {
    len.div_ceil(MASK_BYTES)
}

/// Number of `u64` summary words [`diff_mask`] needs for `len` bytes: one
/// bit per mask word.
#[inline]
pub const fn summary_words(len: usize) -> usize {
    mask_words(len).div_ceil(64)
}

/// True when every byte of `buf` is zero.
///
/// Rejects data in the first, middle or last vector of the buffer before
/// scanning the rest (from both ends), so typical non-zero pages cost three
/// loads.
#[inline]
pub fn is_zero(buf: &[u8]) -> bool {
    (active().is_zero)(buf)
}

/// Writes one bit per byte into `masks` (bit `i % 64` of word `i / 64` is set
/// when `a[i] != b[i]`; bits past the end are zero) and one bit per mask word
/// into `summary` (bit `w % 64` of word `w / 64` is set when `masks[w] != 0`),
/// and returns whether any byte differs.
///
/// The summary lets a run scanner skip unchanged stretches 4 KiB at a time.
///
/// # Panics
/// When `a` and `b` differ in length, `masks.len() != mask_words(a.len())` or
/// `summary.len() != summary_words(a.len())`.
#[inline]
pub fn diff_mask(a: &[u8], b: &[u8], masks: &mut [u64], summary: &mut [u64]) -> bool {
    active().diff_mask(a, b, masks, summary)
}

/// What [`for_each_diff_window`] hands each changed window to. Closures
/// `FnMut(isize, u64) -> Result<(), E>` are sinks. A type can also be one
/// itself: its `#[inline(always)]` `window` is then compiled into the SIMD
/// scan, where a large closure stays an out-of-line call per changed window
/// (the XBZRLE run walker does this).
pub trait DiffWindowSink<E> {
    /// The window starting at byte `start` differs where `mask` has bits.
    fn window(&mut self, start: isize, mask: u64) -> Result<(), E>;
}

impl<E, F: FnMut(isize, u64) -> Result<(), E>> DiffWindowSink<E> for F {
    #[inline(always)]
    fn window(&mut self, start: isize, mask: u64) -> Result<(), E> {
        self(start, mask)
    }
}

/// Calls `f(start, mask)` for every 64-byte window of `a` and `b` that
/// holds a difference, in increasing `start`; bit `i` of `mask` is set when
/// byte `start + i` differs. Stops at and returns the first error of `f`;
/// otherwise returns whether any byte differs.
///
/// The windows tile the buffers at 64-byte steps aligned on `a`'s address
/// (so the scan's loads do not split cache lines): the first window may
/// start up to 63 bytes before `a` (`start` negative) and the last may end
/// past it; bits for bytes outside the buffers are clear. A buffer shorter
/// than 64 bytes is one window at 0.
///
/// This is [`diff_mask`] without a mask buffer: unchanged stretches cost
/// what `memcmp` costs, and only changed windows are turned into masks, so a
/// page with a few changes costs one pass plus a few nanoseconds per
/// changed window.
///
/// # Panics
/// When `a` and `b` differ in length.
#[inline]
pub fn for_each_diff_window<E, F>(a: &[u8], b: &[u8], f: F) -> Result<bool, E>
where
    F: DiffWindowSink<E>,
{
    active().for_each_diff_window(a, b, f)
}

/// Index of the first byte at which `a` and `b` differ, or the length of the
/// shorter slice when they agree on all of it.
#[inline]
pub fn find_diff(a: &[u8], b: &[u8]) -> usize {
    active().find_diff(a, b)
}

/// Index of the first byte at which `a` and `b` are equal, or the length of
/// the shorter slice when they differ on all of it.
#[inline]
pub fn find_equal(a: &[u8], b: &[u8]) -> usize {
    active().find_equal(a, b)
}

fn check_mask_args(a: &[u8], b: &[u8], masks: &[u64], summary: &[u64]) {
    assert_eq!(a.len(), b.len(), "diff_mask: slices differ in length");
    assert_eq!(
        masks.len(),
        mask_words(a.len()),
        "diff_mask: mask slice must hold mask_words(len) words"
    );
    assert_eq!(
        summary.len(),
        summary_words(a.len()),
        "diff_mask: summary slice must hold summary_words(len) words"
    );
}

/// Signature of a backend's [`diff_mask`]: buffers, masks, summary.
type DiffMaskFn = fn(&[u8], &[u8], &mut [u64], &mut [u64]) -> bool;

/// One backend's kernels. Obtainable only through [`Backend::kernels`], which
/// checks that the CPU supports the backend.
pub struct Kernels {
    backend: Backend,
    is_zero: fn(&[u8]) -> bool,
    diff_mask: DiffMaskFn,
    find_diff: fn(&[u8], &[u8]) -> usize,
    find_equal: fn(&[u8], &[u8]) -> usize,
}

impl Kernels {
    /// The backend these kernels belong to.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// [`is_zero`] on this backend.
    #[inline]
    pub fn is_zero(&self, buf: &[u8]) -> bool {
        (self.is_zero)(buf)
    }

    /// [`diff_mask`] on this backend (same panics).
    #[inline]
    pub fn diff_mask(&self, a: &[u8], b: &[u8], masks: &mut [u64], summary: &mut [u64]) -> bool {
        check_mask_args(a, b, masks, summary);
        (self.diff_mask)(a, b, masks, summary)
    }

    /// [`for_each_diff_window`] on this backend (same panics).
    #[inline]
    pub fn for_each_diff_window<E, F>(&self, a: &[u8], b: &[u8], mut f: F) -> Result<bool, E>
    where
        F: DiffWindowSink<E>,
    {
        assert_eq!(
            a.len(),
            b.len(),
            "for_each_diff_window: slices differ in length"
        );
        let f = &mut f;
        // In every arm the lengths are equal (asserted above), and a
        // `Kernels` whose `backend` is a SIMD backend exists only as that
        // backend's `KERNELS`, which `Backend::kernels` hands out after
        // finding the CPU features at runtime.
        match self.backend {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `self` is `avx512::KERNELS`, so the CPU has AVX-512F
            // and AVX-512BW; `a.len() == b.len()`.
            Backend::Avx512 => unsafe { x86::avx512::for_each_diff(a, b, f) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `self` is `avx2::KERNELS`, so the CPU has AVX2;
            // `a.len() == b.len()`.
            Backend::Avx2 => unsafe { x86::avx2::for_each_diff(a, b, f) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `self` is `sse2::KERNELS`, so the CPU has SSE2;
            // `a.len() == b.len()`.
            Backend::Sse2 => unsafe { x86::sse2::for_each_diff(a, b, f) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `self` is `neon::KERNELS`, so the CPU has NEON;
            // `a.len() == b.len()`.
            Backend::Neon => unsafe { aarch64::neon::for_each_diff(a, b, f) },
            // SAFETY: `Word` uses no special instructions, so any CPU
            // supports it; `a.len() == b.len()`.
            _ => unsafe { generic::for_each_diff::<fallback::Word, E, F>(a, b, f) },
        }
    }

    /// [`find_diff`] on this backend.
    #[inline]
    pub fn find_diff(&self, a: &[u8], b: &[u8]) -> usize {
        let n = a.len().min(b.len());
        (self.find_diff)(&a[..n], &b[..n])
    }

    /// [`find_equal`] on this backend.
    #[inline]
    pub fn find_equal(&self, a: &[u8], b: &[u8]) -> usize {
        let n = a.len().min(b.len());
        (self.find_equal)(&a[..n], &b[..n])
    }
}

impl fmt::Debug for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kernels")
            .field("backend", &self.backend)
            .finish()
    }
}

/// An instruction-set backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// x86-64 AVX-512F + AVX-512BW, 64-byte vectors.
    Avx512,
    /// x86-64 AVX2, 32-byte vectors.
    Avx2,
    /// x86-64 SSE2, 16-byte vectors.
    Sse2,
    /// aarch64 NEON, 16-byte vectors.
    Neon,
    /// Portable 64-bit words.
    Fallback,
}

impl Backend {
    /// Every backend, best first.
    pub const ALL: [Backend; 5] = [
        Backend::Avx512,
        Backend::Avx2,
        Backend::Sse2,
        Backend::Neon,
        Backend::Fallback,
    ];

    /// The backends this CPU supports, best first (always ends with
    /// [`Backend::Fallback`]).
    pub fn available() -> Vec<Backend> {
        Self::ALL
            .into_iter()
            .filter(|b| b.kernels().is_some())
            .collect()
    }

    /// The backend the dispatched functions use.
    pub fn active() -> Backend {
        active().backend
    }

    /// Lower-case name, as accepted by `VMSTREAM_SIMD`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Avx512 => "avx512",
            Backend::Avx2 => "avx2",
            Backend::Sse2 => "sse2",
            Backend::Neon => "neon",
            Backend::Fallback => "fallback",
        }
    }

    /// This backend's kernels, or `None` when the CPU does not support it.
    pub fn kernels(self) -> Option<&'static Kernels> {
        match self {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => (std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw"))
            .then_some(&x86::avx512::KERNELS),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => std::is_x86_feature_detected!("avx2").then_some(&x86::avx2::KERNELS),
            #[cfg(target_arch = "x86_64")]
            Backend::Sse2 => std::is_x86_feature_detected!("sse2").then_some(&x86::sse2::KERNELS),
            #[cfg(target_arch = "aarch64")]
            Backend::Neon => {
                std::arch::is_aarch64_feature_detected!("neon").then_some(&aarch64::neon::KERNELS)
            }
            Backend::Fallback => Some(&FALLBACK),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

static FALLBACK: Kernels = Kernels {
    backend: Backend::Fallback,
    // `Word` uses no special instructions, so every CPU supports it. The
    // table's functions are called only through `Kernels`' methods, which
    // check or equalize the lengths first.
    // SAFETY: `Word` runs on any CPU; `is_zero` has no other requirement.
    is_zero: |buf| unsafe { generic::is_zero::<fallback::Word>(buf) },
    // SAFETY: `Word` runs on any CPU; `Kernels::diff_mask` checked the
    // lengths of all four slices (`check_mask_args`).
    diff_mask: |a, b, m, s| unsafe { generic::diff_mask::<fallback::Word>(a, b, m, s) },
    // SAFETY: `Word` runs on any CPU; `Kernels::find_diff` cut both slices
    // to the same length.
    find_diff: |a, b| unsafe { generic::find::<fallback::Word, false>(a, b) },
    // SAFETY: `Word` runs on any CPU; `Kernels::find_equal` cut both slices
    // to the same length.
    find_equal: |a, b| unsafe { generic::find::<fallback::Word, true>(a, b) },
};

/// The cached dispatch point: chosen once, on first use.
#[inline]
fn active() -> &'static Kernels {
    static ACTIVE: OnceLock<&'static Kernels> = OnceLock::new();
    ACTIVE.get_or_init(select)
}

fn select() -> &'static Kernels {
    let forced = std::env::var("VMSTREAM_SIMD").ok();
    if let Some(name) = forced.as_deref() {
        if let Some(k) = Backend::ALL
            .into_iter()
            .find(|b| b.name() == name)
            .and_then(Backend::kernels)
        {
            return k;
        }
    }
    Backend::ALL
        .into_iter()
        .filter(|&b| !(b == Backend::Avx512 && prefers_256_bit_vectors()))
        .find_map(Backend::kernels)
        .unwrap_or(&FALLBACK)
}

/// True on CPUs where 512-bit instructions cost clock frequency (Intel's
/// AVX-512 power licences), so memory-bound scans run faster with 256-bit
/// vectors, as glibc's own `memcmp` chooses there. Measured on this
/// project's Intel Xeon: XBZRLE encode of identical pages at 0.95x
/// `memcmp` with AVX2 against 1.07-1.20x with AVX-512 (BENCHMARKS.md).
/// AMD's Zen 4 runs AVX-512 without that penalty and keeps it.
fn prefers_256_bit_vectors() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let vendor = std::arch::x86_64::__cpuid(0);
        // "GenuineIntel" in EBX, EDX, ECX.
        (vendor.ebx, vendor.edx, vendor.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
