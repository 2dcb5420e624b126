//! The XBZRLE tests' byte-exact checks as a plain program, for targets where
//! the test harness cannot run (under qemu-user its test threads hang):
//! QEMU's vectors, and `encode` against the naive reference encoder on
//! random page pairs at any alignment, with round trips through `decode`.
//! `.ci/aarch64` runs it under qemu-aarch64, so the NEON scan behind
//! `encode` is checked on an x86-64 machine.
//!
//! `cargo run --release -p vmstream-xbzrle --example xbzrle_check [PAIRS]`

#[path = "../tests/support/naive.rs"]
mod naive;
#[path = "../tests/support/vectors.rs"]
mod vectors;

use naive::naive_encode;
use vmstream_xbzrle::{decode, encode, encode_compact, EncodeError};

/// Deterministic xorshift, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A page and a changed copy: a few scattered bytes, contiguous runs, half
/// the page or every byte, as migrations see them.
fn pair(rng: &mut Rng) -> (Vec<u8>, Vec<u8>) {
    let len = [4096, 4096, 4096, 1 + rng.below(16384)][rng.below(4)];
    let old: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    let mut new = old.clone();
    match rng.below(4) {
        0 => {
            for _ in 0..rng.below(20) {
                let at = rng.below(len);
                new[at] = new[at].wrapping_add(1);
            }
        }
        1 => {
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(len);
                let run = 1 + rng.below(300);
                for b in &mut new[at..(at + run).min(len)] {
                    *b = !*b;
                }
            }
        }
        2 => new[..len / 2].iter_mut().for_each(|b| *b ^= 0x5a),
        _ => new.iter_mut().for_each(|b| *b = b.wrapping_add(1)),
    }
    (old, new)
}

fn main() {
    let pairs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    println!("scan backend: {}", vmstream_simd::Backend::active());
    match vectors::check_qemu_vectors() {
        Some(summary) => println!("ok   QEMU vectors: {summary}"),
        None => println!("skip QEMU vectors (not found)"),
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for i in 0..pairs {
        let (p_old, p_new) = pair(&mut rng);
        let n = p_old.len();
        // Both pages at their own offset from a cache line.
        let (oa, ob) = (rng.below(64), rng.below(64));
        let mut old = vec![0xa5u8; n + 64];
        let mut new = vec![0x5au8; n + 64];
        old[oa..oa + n].copy_from_slice(&p_old);
        new[ob..ob + n].copy_from_slice(&p_new);
        let (old, new) = (&old[oa..oa + n], &new[ob..ob + n]);
        let dlen = [n, n / 8, 2 * n + 64, rng.below(n + 2)][rng.below(4)];
        let mut out = vec![0u8; dlen];
        let got = encode(old, new, &mut out);
        match naive_encode(old, new, dlen) {
            Some(want) => {
                assert_eq!(got, Ok(want.len()), "pair {i}: length");
                assert!(out[..want.len()] == want[..], "pair {i}: delta bytes");
                let mut page = old.to_vec();
                decode(&want, &mut page).unwrap();
                assert!(page == new, "pair {i}: round trip");
            }
            None => assert_eq!(got, Err(EncodeError::Overflow), "pair {i}: overflow"),
        }
        let mut compact = vec![0u8; 2 * n + 64];
        if let Ok(k) = encode_compact(old, new, &mut compact) {
            let mut page = old.to_vec();
            decode(&compact[..k], &mut page).unwrap();
            assert!(page == new, "pair {i}: compact round trip");
        }
    }
    println!("ok   {pairs} random pairs match the naive encoder and round-trip");
    println!("all checks passed");
}
