//! Round trips and agreement with a naive byte-at-a-time reference encoder,
//! over random and structured page pairs, plus one test per decode error.

#[path = "support/naive.rs"]
mod naive;

use naive::naive_encode;
use quickcheck::{quickcheck, Arbitrary, Gen, TestResult};
use vmstream_xbzrle::{
    decode, encode, encode_compact, validate, DecodeError, EncodeError, MAX_PAGE_SIZE,
};

/// A page pair of one of the shapes migrations see.
#[derive(Clone, Debug)]
struct Pair {
    old: Vec<u8>,
    new: Vec<u8>,
    dlen: usize,
}

impl Arbitrary for Pair {
    fn arbitrary(g: &mut Gen) -> Pair {
        let len = *g
            .choose(&[4096usize, 4096, 4096, 8192, 16384, 1, 7, 64, 100, 1000])
            .unwrap();
        let old: Vec<u8> = match u8::arbitrary(g) % 3 {
            0 => vec![0; len],
            1 => (0..len).map(|i| (i * 31 % 253) as u8).collect(),
            _ => (0..len).map(|_| u8::arbitrary(g)).collect(),
        };
        let mut new = old.clone();
        let flip = |b: &mut u8, g: &mut Gen| *b = b.wrapping_add(1 + u8::arbitrary(g) % 255);
        match u8::arbitrary(g) % 7 {
            0 => {} // identical
            1 => {
                // few scattered bytes
                for _ in 0..1 + usize::arbitrary(g) % 20 {
                    let p = usize::arbitrary(g) % len;
                    flip(&mut new[p], g);
                }
            }
            2 => {
                // contiguous runs
                for _ in 0..1 + usize::arbitrary(g) % 4 {
                    let s = usize::arbitrary(g) % len;
                    let e = (s + 1 + usize::arbitrary(g) % 300).min(len);
                    new[s..e].iter_mut().for_each(|b| flip(b, g));
                }
            }
            3 => {
                // half the page
                new.iter_mut().take(len / 2 + 1).for_each(|b| flip(b, g));
            }
            4 => new.iter_mut().for_each(|b| flip(b, g)), // all bytes
            5 => {
                // random density
                let pct = 1 + usize::arbitrary(g) % 60;
                for b in new.iter_mut() {
                    if usize::arbitrary(g) % 100 < pct {
                        flip(b, g);
                    }
                }
            }
            _ => {
                // alternating changed / unchanged bytes: the worst case for run pairs
                let stride = 2 + usize::arbitrary(g) % 3;
                new.iter_mut().step_by(stride).for_each(|b| flip(b, g));
            }
        }
        let dlen = match u8::arbitrary(g) % 4 {
            0 => usize::arbitrary(g) % (len + 16),
            _ => len,
        };
        Pair { old, new, dlen }
    }
}

quickcheck! {
    fn prop_matches_naive_encoder(p: Pair) -> bool {
        let mut out = vec![0u8; p.dlen];
        let got = encode(&p.old, &p.new, &mut out);
        match naive_encode(&p.old, &p.new, p.dlen) {
            // An empty encoding with room for nothing overflows (QEMU's check
            // comes first), except for empty pages.
            Some(want) => got == Ok(want.len()) && out[..want.len()] == want[..],
            None => got == Err(EncodeError::Overflow),
        }
    }

    /// The scan works in windows aligned on the old page's address: every
    /// placement of both pages must give the same bytes.
    fn prop_matches_naive_at_any_alignment(p: Pair, oa: u8, ob: u8) -> bool {
        let (oa, ob) = (oa as usize % 64, ob as usize % 64);
        let n = p.old.len();
        let mut old = vec![0xa5u8; n + 64];
        let mut new = vec![0x5au8; n + 64];
        old[oa..oa + n].copy_from_slice(&p.old);
        new[ob..ob + n].copy_from_slice(&p.new);
        let (old, new) = (&old[oa..oa + n], &new[ob..ob + n]);
        let want = naive_encode(old, new, p.dlen);
        let mut out = vec![0u8; p.dlen];
        let got = encode(old, new, &mut out);
        let canonical_ok = match &want {
            Some(want) => got == Ok(want.len()) && out[..want.len()] == want[..],
            None => got == Err(EncodeError::Overflow),
        };
        let mut compact = vec![0u8; 2 * n + 64];
        let round_trip_ok = match encode_compact(old, new, &mut compact) {
            Ok(k) => {
                let mut page = old.to_vec();
                decode(&compact[..k], &mut page).is_ok() && page == new
            }
            Err(_) => n == MAX_PAGE_SIZE,
        };
        canonical_ok && round_trip_ok
    }

    fn prop_round_trip(p: Pair) -> TestResult {
        let mut out = vec![0u8; 2 * p.old.len() + 64];
        let n = match encode(&p.old, &p.new, &mut out) {
            Ok(n) => n,
            Err(EncodeError::Overflow) if p.old.len() == MAX_PAGE_SIZE => return TestResult::discard(),
            Err(e) => return TestResult::error(format!("{e}")),
        };
        let mut page = p.old.clone();
        let covered = decode(&out[..n], &mut page).unwrap();
        TestResult::from_bool(page == p.new && covered <= page.len() && validate(&out[..n], page.len()) == Ok(covered))
    }

    fn prop_compact_round_trip_and_never_larger(p: Pair) -> TestResult {
        let mut canon = vec![0u8; 2 * p.old.len() + 64];
        let mut compact = vec![0u8; 2 * p.old.len() + 64];
        let (Ok(a), Ok(b)) = (encode(&p.old, &p.new, &mut canon), encode_compact(&p.old, &p.new, &mut compact)) else {
            return TestResult::discard();
        };
        let mut page = p.old.clone();
        decode(&compact[..b], &mut page).unwrap();
        TestResult::from_bool(page == p.new && b <= a)
    }

    /// Arbitrary bytes never panic and never touch bytes past the page.
    fn prop_decode_arbitrary_input(delta: Vec<u8>, len: u16) -> bool {
        let len = len as usize % 5000;
        let mut buf = vec![0x5au8; len + 32];
        let res = decode(&delta, &mut buf[..len]);
        buf[len..].iter().all(|&b| b == 0x5a) && res.is_ok() == validate(&delta, len).is_ok()
    }
}

#[test]
fn identical_pages_encode_to_nothing() {
    let page = vec![7u8; 4096];
    assert_eq!(encode(&page, &page, &mut [0u8; 4096]), Ok(0));
    assert_eq!(encode(&[], &[], &mut []), Ok(0));
}

#[test]
fn canonical_shapes() {
    let old = vec![0u8; 4096];
    let mut new = old.clone();
    new[0] = 1;
    new[1] = 2;
    new[3] = 3; // one equal byte splits the run
    new[300] = 4;
    let mut out = [0u8; 64];
    let n = encode(&old, &new, &mut out).unwrap();
    // zrun 0, nzrun 2 [1 2], zrun 1, nzrun 1 [3], zrun 296 (2-byte ULEB), nzrun 1 [4]
    assert_eq!(&out[..n], &[0, 2, 1, 2, 1, 1, 3, 0xa8, 0x02, 1, 4]);
    let c = encode_compact(&old, &new, &mut out).unwrap();
    assert_eq!(&out[..c], &[0, 4, 1, 2, 0, 3, 0xa8, 0x02, 1, 4]);
}

#[test]
fn size_errors() {
    let big = vec![0u8; MAX_PAGE_SIZE + 1];
    assert_eq!(
        encode(&big, &big, &mut [0; 8]),
        Err(EncodeError::PageTooLarge {
            len: MAX_PAGE_SIZE + 1
        })
    );
    assert_eq!(
        encode(&[0; 4], &[0; 5], &mut [0; 8]),
        Err(EncodeError::LengthMismatch { old: 4, new: 5 })
    );
    // A fully changed 16 KiB page is one run too long for two ULEB128 bytes.
    let old = vec![0u8; MAX_PAGE_SIZE];
    let new = vec![1u8; MAX_PAGE_SIZE];
    assert_eq!(
        encode(&old, &new, &mut vec![0; 2 * MAX_PAGE_SIZE]),
        Err(EncodeError::Overflow)
    );
}

#[test]
fn overflow_rules() {
    let old = vec![0u8; 4096];
    let mut new = old.clone();
    new[10] = 1;
    // Literal does not fit.
    assert_eq!(
        encode(&old, &new, &mut [0u8; 2]),
        Err(EncodeError::Overflow)
    );
    // zrun(1) nzrun(1) literal(1) fits in 3 or 4 bytes, but QEMU's rule wants
    // two free bytes before scanning the trailing unchanged bytes.
    assert_eq!(
        encode(&old, &new, &mut [0u8; 3]),
        Err(EncodeError::Overflow)
    );
    assert_eq!(
        encode(&old, &new, &mut [0u8; 4]),
        Err(EncodeError::Overflow)
    );
    assert_eq!(encode(&old, &new, &mut [0u8; 5]), Ok(3));
    // A change at the very end needs no trailing check.
    let mut tail = old.clone();
    tail[4095] = 9;
    assert_eq!(encode(&old, &tail, &mut [0u8; 4]), Ok(4));
}

#[test]
fn each_decode_error() {
    let mut page = vec![0u8; 100];
    let cases: &[(&[u8], DecodeError)] = &[
        (&[5], DecodeError::Truncated { offset: 0 }),
        (&[5, 1, 9, 3], DecodeError::Truncated { offset: 3 }),
        (&[5, 1, 9, 3, 1], DecodeError::Truncated { offset: 4 }),
        (
            &[0x80, 0x80, 0x01, 1, 1],
            DecodeError::LengthTooLong { offset: 0 },
        ),
        (
            &[1, 0xff, 0xff, 0],
            DecodeError::LengthTooLong { offset: 1 },
        ),
        (&[1, 1, 9, 0, 1, 9], DecodeError::EmptyZeroRun { offset: 3 }),
        (&[1, 0, 9], DecodeError::EmptyLiteralRun { offset: 1 }),
        (&[101, 1, 9], DecodeError::RunPastPage { offset: 0 }),
        (&[99, 2, 9, 9], DecodeError::RunPastPage { offset: 1 }),
        (&[1, 3, 9, 9], DecodeError::LiteralPastDelta { offset: 1 }),
    ];
    for (delta, want) in cases {
        assert_eq!(decode(delta, &mut page), Err(*want), "{delta:?}");
        assert_eq!(validate(delta, 100), Err(*want), "{delta:?}");
        assert!(!want.to_string().is_empty());
    }
    // Valid: first zrun of 0, untouched bytes keep their value.
    let mut page = vec![7u8; 10];
    assert_eq!(decode(&[0, 2, 1, 2, 3, 1, 9], &mut page), Ok(6));
    assert_eq!(page, [1, 2, 7, 7, 7, 9, 7, 7, 7, 7]);
    assert_eq!(decode(&[], &mut page), Ok(0));
}
