//! Runs the property tests' kernel checks (every backend the CPU offers,
//! against naive versions) as a plain program, for targets where the test
//! harness cannot run: under qemu-user, the harness's test threads hang.
//! `.ci/aarch64` builds this for aarch64 and runs it under qemu-aarch64,
//! which is how the NEON backend is checked on an x86-64 machine.
//!
//! `cargo run --release -p vmstream-simd --example backend_check [RANDOM_PAIRS]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use support::{backends, check_all};

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

fn step(name: &str, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    println!("ok   {name} ({:.1} s)", t.elapsed().as_secs_f64());
}

fn main() {
    let pairs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let names: Vec<_> = backends().iter().map(|k| k.backend().name()).collect();
    println!(
        "backends: {} (dispatch picks {})",
        names.join(", "),
        vmstream_simd::Backend::active()
    );
    step("every length up to 300, single change anywhere", || {
        support::every_length_up_to_300_single_change_anywhere()
    });
    step("pages with data at head, middle, tail", || {
        support::pages_with_data_at_head_middle_tail()
    });
    step("every byte value is detected", || {
        support::every_byte_value_is_detected()
    });
    step("is_zero finds a single byte at every position", || {
        support::is_zero_finds_a_single_byte_at_every_position()
    });
    step(&format!("{pairs} random pairs, sparse to dense"), || {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..pairs {
            let len = rng.below(9000);
            let a: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let mut b = a.clone();
            // From one changed byte to every byte changed.
            let changes = rng.below(len.max(1)) >> rng.below(12);
            for _ in 0..changes.min(len) {
                let at = rng.below(len);
                b[at] = b[at].wrapping_add(1);
            }
            check_all(&a, &b);
        }
    });
    step("crc32c matches the bytewise reference", || {
        let mut rng = Rng(7);
        let data: Vec<u8> = (0..20_000).map(|_| rng.next() as u8).collect();
        for len in (0..2000).chain([4096, 8191, 20_000]) {
            let d = &data[..len];
            assert_eq!(
                vmstream_simd::crc32c(d),
                vmstream_simd::crc32c_portable(d),
                "len {len}"
            );
        }
    });
    println!("all checks passed");
}
