//! Every kernel on every backend this CPU supports, against naive versions.

mod support;

use quickcheck::{quickcheck, TestResult};
use support::{backends, check_all};
use vmstream_simd::Backend;

#[test]
fn fallback_is_always_available() {
    assert!(Backend::available().contains(&Backend::Fallback));
    assert!(Backend::available().contains(&Backend::active()));
}

#[test]
#[cfg(target_arch = "x86_64")]
fn x86_backends_match_cpu_features() {
    let avail = Backend::available();
    assert_eq!(
        avail.contains(&Backend::Avx2),
        std::is_x86_feature_detected!("avx2")
    );
    assert_eq!(
        avail.contains(&Backend::Avx512),
        std::is_x86_feature_detected!("avx512bw")
    );
    assert!(avail.contains(&Backend::Sse2));
}

#[test]
fn every_length_up_to_300_single_change_anywhere() {
    support::every_length_up_to_300_single_change_anywhere();
}

#[test]
fn pages_with_data_at_head_middle_tail() {
    support::pages_with_data_at_head_middle_tail();
}

#[test]
fn every_byte_value_is_detected() {
    support::every_byte_value_is_detected();
}

#[test]
fn find_on_unequal_lengths_uses_shorter() {
    let a = [1u8, 2, 3, 4];
    let b = [1u8, 2, 3];
    for k in backends() {
        assert_eq!(k.find_diff(&a, &b), 3);
        assert_eq!(k.find_equal(&a, &b), 0);
        assert_eq!(k.find_equal(&[9, 9], &b), 2);
    }
    assert_eq!(vmstream_simd::find_diff(&a, &b), 3);
}

/// An error from the callback stops the scan at once and is returned.
#[test]
fn for_each_diff_window_stops_at_first_error() {
    let a = vec![0u8; 4096];
    let b = vec![1u8; 4096];
    for k in backends() {
        let mut calls = 0;
        let r = k.for_each_diff_window(&a, &b, |start, _| {
            calls += 1;
            if calls == 3 {
                Err(start)
            } else {
                Ok(())
            }
        });
        assert!(r.is_err(), "{}", k.backend());
        assert_eq!(calls, 3, "{}", k.backend());
    }
    let mut calls = 0;
    let r = vmstream_simd::for_each_diff_window(&a, &a, |_, _| {
        calls += 1;
        Err(())
    });
    assert_eq!((r, calls), (Ok(false), 0));
}

#[test]
#[should_panic(expected = "slices differ in length")]
fn for_each_diff_window_rejects_unequal_lengths() {
    let _ = vmstream_simd::for_each_diff_window(&[0u8; 3], &[0u8; 4], |_, _| Ok::<(), ()>(()));
}

#[test]
#[should_panic(expected = "mask slice")]
fn diff_mask_rejects_short_mask() {
    let a = [0u8; 65];
    vmstream_simd::diff_mask(&a, &a, &mut [0u64; 1], &mut [0u64; 1]);
}

#[test]
#[should_panic(expected = "summary slice")]
fn diff_mask_rejects_short_summary() {
    let a = [0u8; 64 * 65];
    vmstream_simd::diff_mask(&a, &a, &mut [0u64; 65], &mut [0u64; 1]);
}

/// Summary words past the first (pages over 4 KiB), with the change in
/// every possible mask word.
#[test]
fn summary_spans_several_words() {
    for len in [4096usize, 4097, 8192, 16384, 16383] {
        for pos in (0..len).step_by(61).chain([len - 1]) {
            let a = vec![0u8; len];
            let mut b = a.clone();
            b[pos] = 1;
            check_all(&a, &b);
        }
    }
}

quickcheck! {
    /// The two-engine CRC-32C against the `crc32c` crate, at any length
    /// and start offset (long inputs take the folded path).
    fn prop_crc32c_matches_reference(data: Vec<u8>, reps: u8, off: u8) -> bool {
        let long: Vec<u8> = data.iter().cycle().take(data.len() * (usize::from(reps) % 40 + 1)).copied().collect();
        let d = &long[usize::from(off).min(long.len())..];
        vmstream_simd::crc32c(d) == crc32c::crc32c(d)
            && vmstream_simd::crc32c_portable(d) == crc32c::crc32c(d)
    }

    fn prop_random_pairs(a: Vec<u8>, b: Vec<u8>) -> bool {
        check_all(&a, &b);
        true
    }

    /// Sparse differences over page-sized buffers: the XBZRLE case.
    fn prop_sparse_page_diffs(seed: Vec<(u16, u8)>, len: u16) -> TestResult {
        let len = (len as usize % 16384) + 1;
        let old: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut new = old.clone();
        for (pos, v) in seed {
            new[pos as usize % len] = v;
        }
        check_all(&old, &new);
        TestResult::passed()
    }

    fn prop_mostly_zero(positions: Vec<u16>) -> bool {
        let mut page = vec![0u8; 4096];
        for p in &positions {
            page[*p as usize % 4096] = 0xff;
        }
        let want = positions.is_empty();
        backends().iter().all(|k| k.is_zero(&page) == want) && vmstream_simd::is_zero(&page) == want
    }
}

/// Dispatch honours `VMSTREAM_SIMD` and otherwise picks a supported backend
/// (the choice between AVX2 and AVX-512 depends on the CPU vendor).
#[test]
fn active_backend_is_supported_and_overridable() {
    let active = Backend::active();
    assert!(Backend::available().contains(&active));
    if let Ok(forced) = std::env::var("VMSTREAM_SIMD") {
        if let Some(b) = Backend::ALL.into_iter().find(|b| b.name() == forced) {
            if b.kernels().is_some() {
                assert_eq!(active, b);
            }
        }
    }
}

#[test]
fn is_zero_finds_a_single_byte_at_every_position() {
    support::is_zero_finds_a_single_byte_at_every_position();
}
