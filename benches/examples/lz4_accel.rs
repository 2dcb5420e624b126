//! LZ4 per 4 KiB page of a memory file at several accelerations, beside `memcpy`.
//!
//! `cargo run --release -p vmstream-benches --example lz4_accel -- FILE [ACCEL...]`

use std::time::Instant;

use vmstream_codec::compress::lz4::compress_oneshot;

const PAGE: usize = 4096;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("FILE");
    let accels: Vec<i32> = args.map(|a| a.parse().unwrap()).collect();
    let accels = if accels.is_empty() {
        vec![1, 2, 4, 8, 16, 32, 64]
    } else {
        accels
    };
    let data = std::fs::read(&path).unwrap();
    let pages = data.len() / PAGE;
    let mut out = vec![0u8; PAGE];
    let mut copy = vec![0u8; data.len()];
    let t = Instant::now();
    copy.copy_from_slice(&data);
    let memcpy = t.elapsed().as_secs_f64();
    println!(
        "{pages} pages; memcpy {:.0} MB/s",
        data.len() as f64 / memcpy / 1e6
    );
    for &a in &accels {
        for _ in 0..2 {
            let t = Instant::now();
            let mut bytes = 0usize;
            let mut zero = 0usize;
            for p in 0..pages {
                let src = &data[p * PAGE..(p + 1) * PAGE];
                if vmstream_simd::is_zero(src) {
                    zero += 1;
                    continue;
                }
                bytes += compress_oneshot(src, &mut out[..PAGE - 1], a).unwrap_or(PAGE);
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "accel {a:3}: {:6.0} MB/s  ratio {:.3}  (zero pages {zero})",
                data.len() as f64 / s / 1e6,
                bytes as f64 / data.len() as f64
            );
        }
    }
}
