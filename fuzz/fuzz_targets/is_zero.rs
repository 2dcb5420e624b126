//! `is_zero`, the diff scanners and `crc32c` on every backend against naive
//! versions (and the `crc32c` crate).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmstream_simd::{mask_words, summary_words, Backend};

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    let (a, b) = input;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let zero = a.iter().all(|&x| x == 0);
    let first_diff = (0..n).find(|&i| a[i] != b[i]).unwrap_or(n);
    let first_eq = (0..n).find(|&i| a[i] == b[i]).unwrap_or(n);
    assert_eq!(vmstream_simd::is_zero(a), zero);
    assert_eq!(vmstream_simd::crc32c(a), crc32c::crc32c(a));
    for backend in Backend::available() {
        let k = backend.kernels().unwrap();
        assert_eq!(k.is_zero(a), zero, "{backend}");
        assert_eq!(k.find_diff(a, b), first_diff, "{backend}");
        assert_eq!(k.find_equal(a, b), first_eq, "{backend}");
        let mut masks = vec![0u64; mask_words(n)];
        let mut summary = vec![0u64; summary_words(n)];
        assert_eq!(k.diff_mask(a, b, &mut masks, &mut summary), first_diff < n, "{backend}");
        for i in 0..n {
            assert_eq!(masks[i / 64] >> (i % 64) & 1 == 1, a[i] != b[i], "{backend} bit {i}");
        }
        for (w, &m) in masks.iter().enumerate() {
            assert_eq!(summary[w / 64] >> (w % 64) & 1 == 1, m != 0, "{backend} summary bit {w}");
        }
        // The windows of for_each_diff_window give back the same bits.
        let mut bits = vec![false; n];
        let mut last = None;
        let any = k
            .for_each_diff_window(a, b, |start, mask| {
                assert_ne!(mask, 0, "{backend} empty window");
                assert!(last.is_none_or(|l| start >= l + 64), "{backend} window order");
                last = Some(start);
                for i in 0..64 {
                    if mask >> i & 1 == 1 {
                        let pos = usize::try_from(start + i).expect("bit before the buffer");
                        bits[pos] = true;
                    }
                }
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(any, first_diff < n, "{backend} window any");
        for i in 0..n {
            assert_eq!(bits[i], a[i] != b[i], "{backend} window bit {i}");
        }
    }
});
