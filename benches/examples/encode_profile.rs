//! Runs one XBZRLE case in a loop for profiling with `perf record`.
//!
//! `cargo run --release -p vmstream-benches --example encode_profile -- CASE [SET_KIB] [ITERS]`

use std::hint::black_box;

use vmstream_benches::pages::{PageSet, PAGE, XBZRLE_CASES};
use vmstream_xbzrle::encode;

fn main() {
    let mut args = std::env::args().skip(1);
    let case = args.next().unwrap_or_else(|| "1_byte".into());
    let kib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(128);
    let iters: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let (_, mutate) = XBZRLE_CASES
        .iter()
        .find(|(n, _)| *n == case)
        .expect("known case");
    let set = PageSet::synthetic(kib << 10, mutate);
    let mut out = vec![0u8; PAGE];
    let t = std::time::Instant::now();
    for i in 0..iters {
        let p = i % set.pages;
        black_box(encode(set.old_page(p), set.new_page(p), &mut out).ok());
    }
    println!(
        "{case}: {:.1} ns/page",
        t.elapsed().as_nanos() as f64 / iters as f64
    );
}
