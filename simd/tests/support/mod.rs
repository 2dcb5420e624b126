//! Checks of every kernel on every backend the CPU offers against naive
//! versions, shared by the property tests and by `examples/backend_check.rs`
//! (which runs them where the test harness cannot, e.g. under qemu-user).

use vmstream_simd::{mask_words, summary_words, Backend, Kernels};

/// Every backend this CPU supports (always including the fallback).
pub fn backends() -> Vec<&'static Kernels> {
    let all: Vec<_> = Backend::available()
        .into_iter()
        .map(|b| b.kernels().unwrap())
        .collect();
    assert!(all.iter().any(|k| k.backend() == Backend::Fallback));
    all
}

fn naive_diff_mask(a: &[u8], b: &[u8]) -> Vec<u64> {
    let mut m = vec![0u64; mask_words(a.len())];
    for i in 0..a.len() {
        if a[i] != b[i] {
            m[i / 64] |= 1 << (i % 64);
        }
    }
    m
}

fn naive_summary(masks: &[u64]) -> Vec<u64> {
    let mut s = vec![0u64; masks.len().div_ceil(64)];
    for (w, &m) in masks.iter().enumerate() {
        if m != 0 {
            s[w / 64] |= 1 << (w % 64);
        }
    }
    s
}

/// The per-byte difference bits that `for_each_diff_window` reports, checked
/// for the window rules on the way: increasing 64-byte steps aligned on
/// `a`'s address (one window at 0 under 64 bytes), no bits outside the buffers, only changed windows.
fn windows_as_bits(k: &Kernels, a: &[u8], b: &[u8]) -> (Vec<bool>, bool) {
    let n = a.len();
    let mut bits = vec![false; n];
    let mut last: Option<isize> = None;
    let name = k.backend();
    let any = k
        .for_each_diff_window(a, b, |start, mask| {
            assert_ne!(mask, 0, "{name}: unchanged window reported");
            if n >= 64 {
                assert_eq!(
                    (a.as_ptr() as isize + start) % 64,
                    0,
                    "{name}: window not aligned on a (len {n})"
                );
            } else {
                assert_eq!(start, 0, "{name}: short buffers are one window");
            }
            assert!(
                start > -64 && start < n as isize,
                "{name}: window {start} outside"
            );
            if let Some(prev) = last {
                assert!(start >= prev + 64, "{name}: windows out of order");
            }
            last = Some(start);
            for i in 0..64 {
                if mask >> i & 1 == 1 {
                    let pos = start + i;
                    assert!(
                        pos >= 0 && pos < n as isize,
                        "{name}: bit outside the buffer"
                    );
                    bits[pos as usize] = true;
                }
            }
            Ok::<(), ()>(())
        })
        .unwrap();
    (bits, any)
}

fn naive_find(a: &[u8], b: &[u8], equal: bool) -> usize {
    let n = a.len().min(b.len());
    (0..n).find(|&i| (a[i] == b[i]) == equal).unwrap_or(n)
}

/// Checks all kernels on `buf` placed at every offset 0..64 of a larger,
/// poisoned allocation (alignment coverage).
pub fn check_all(a: &[u8], b: &[u8]) {
    let n = a.len().min(b.len());
    let mut abuf = vec![0xa5u8; n + 128];
    let mut bbuf = vec![0x5au8; n + 128];
    for off in [0usize, 1, 3, 7, 15, 31, 33, 63] {
        abuf[off..off + n].copy_from_slice(&a[..n]);
        bbuf[off..off + n].copy_from_slice(&b[..n]);
        let (sa, sb) = (&abuf[off..off + n], &bbuf[off..off + n]);
        let want_mask = naive_diff_mask(sa, sb);
        for k in backends() {
            let name = k.backend();
            assert_eq!(
                k.is_zero(sa),
                sa.iter().all(|&x| x == 0),
                "{name} is_zero len {n} off {off}"
            );
            let mut m = vec![!0u64; mask_words(n)];
            let mut summary = vec![!0u64; summary_words(n)];
            let any = k.diff_mask(sa, sb, &mut m, &mut summary);
            assert_eq!(m, want_mask, "{name} diff_mask len {n} off {off}");
            assert_eq!(
                summary,
                naive_summary(&want_mask),
                "{name} summary len {n} off {off}"
            );
            assert_eq!(any, sa != sb, "{name} diff_mask any");
            let (bits, any) = windows_as_bits(k, sa, sb);
            let want_bits: Vec<bool> = sa.iter().zip(sb).map(|(x, y)| x != y).collect();
            assert_eq!(
                bits, want_bits,
                "{name} for_each_diff_window len {n} off {off}"
            );
            assert_eq!(any, sa != sb, "{name} for_each_diff_window any");
            assert_eq!(
                k.find_diff(sa, sb),
                naive_find(sa, sb, false),
                "{name} find_diff"
            );
            assert_eq!(
                k.find_equal(sa, sb),
                naive_find(sa, sb, true),
                "{name} find_equal"
            );
        }
    }
}

/// A single changed byte at every position of every length below 300.
pub fn every_length_up_to_300_single_change_anywhere() {
    for len in 0..300usize {
        let zero = vec![0u8; len];
        check_all(&zero, &zero);
        for pos in 0..len {
            let mut one = zero.clone();
            one[pos] = 1 << (pos % 8);
            check_all(&one, &zero);
            check_all(&zero, &one);
        }
    }
}

/// Pages with one non-zero byte at the head, middle or tail.
pub fn pages_with_data_at_head_middle_tail() {
    for len in [4096usize, 8192, 16384, 4095, 4097] {
        for pos in [
            0,
            len / 2,
            len / 2 - 1,
            len / 2 + 1,
            len - 1,
            64,
            63,
            65,
            1000,
        ] {
            let mut page = vec![0u8; len];
            page[pos] = 0x80;
            for k in backends() {
                assert!(!k.is_zero(&page), "{} len {len} pos {pos}", k.backend());
            }
        }
        let zero = vec![0u8; len];
        for k in backends() {
            assert!(k.is_zero(&zero));
        }
    }
}

/// Every non-zero byte value, at a few positions.
pub fn every_byte_value_is_detected() {
    for v in 1..=255u8 {
        for pos in [0usize, 13, 64, 100, 4095] {
            let mut page = vec![0u8; 4096];
            page[pos] = v;
            let zero = vec![0u8; 4096];
            for k in backends() {
                assert!(!k.is_zero(&page));
                assert_eq!(k.find_diff(&page, &zero), pos);
            }
        }
    }
}

/// `is_zero` sees a single byte at every position of lengths around the
/// two-ended scan's block pairs, its vector tail and its last vector.
pub fn is_zero_finds_a_single_byte_at_every_position() {
    // Every position of lengths around the two-ended scan's block pairs,
    // its vector tail and its final overlapping vector.
    for len in [4096, 4095, 1000, 777, 576, 513, 512, 511, 300, 257, 100] {
        let mut page = vec![0u8; len];
        for pos in 0..len {
            page[pos] = 1;
            for k in backends() {
                assert!(!k.is_zero(&page), "{} len {len} pos {pos}", k.backend());
            }
            page[pos] = 0;
        }
        for k in backends() {
            assert!(k.is_zero(&page), "{} len {len}", k.backend());
        }
    }
}
