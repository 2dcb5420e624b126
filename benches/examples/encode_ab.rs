//! Interleaved timing of the XBZRLE encoders beside `memcmp` of two
//! identical pages on the synthetic sets: each round sweeps the whole set
//! once per variant (rotating the order), and the table reports the median
//! and fastest sweep and the median of per-round ratios to memcmp. Meant for
//! comparing encoder versions on a busy machine (add the candidate as a
//! variant).
//!
//! `VARIANTS=memcmp,encode` keeps only those variants. Use exactly two for
//! ratios to memcmp: memcmp reads the old pages and a copy of them, an
//! encoder reads the old and the new pages, so with two variants every
//! buffer is read once per round; with more encoders, the new pages are read
//! more often than the copy and stay warmer, which makes memcmp look slower
//! (ratios 5 to 15% too low at the 4 MiB set).
//!
//! `[OFFSET=0..63] [SET_KIB=4096] [VARIANTS=...] cargo run --release -p vmstream-benches --example encode_ab -- [ROUNDS] [CASE...]`
//! (`OFFSET` places every buffer that many bytes past a 64-byte boundary;
//! a small `SET_KIB` such as 128 keeps the data in L2 and shows compute cost.)

use std::hint::black_box;
use std::time::Instant;

use vmstream_benches::pages::{PageSet, PAGE, WARM, XBZRLE_CASES};

type Variant<'a> = (&'static str, Box<dyn FnMut(usize) + 'a>);

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A copy of `v` starting `OFFSET` bytes (env; default 0, as guest pages
/// and the page cache are) past a 64-byte boundary.
struct Placed {
    buf: Vec<u8>,
    at: usize,
}

impl Placed {
    fn new(v: &[u8]) -> Placed {
        let off = std::env::var("OFFSET")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut buf = vec![0u8; v.len() + 128];
        let at = (64 - buf.as_ptr() as usize % 64) % 64 + off;
        buf[at..at + v.len()].copy_from_slice(v);
        Placed { buf, at }
    }

    fn page(&self, i: usize) -> &[u8] {
        &self.buf[self.at + i * PAGE..self.at + (i + 1) * PAGE]
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let cases: Vec<String> = args.collect();
    println!("SIMD backend: {}", vmstream_simd::Backend::active());
    println!("| case | variant | median ns | min ns | median ratio to memcmp |");
    println!("|---|---|---:|---:|---:|");
    for (name, mutate) in XBZRLE_CASES {
        if !cases.is_empty() && !cases.iter().any(|c| c == name) {
            continue;
        }
        let bytes = std::env::var("SET_KIB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(WARM, |k| k << 10);
        let raw = PageSet::synthetic(bytes, mutate);
        let (old, new, copy) = (
            Placed::new(&raw.old),
            Placed::new(&raw.new),
            Placed::new(&raw.old),
        );
        let pages = raw.pages;
        drop(raw);
        println!(
            "<!-- {name}: old at {} mod 64 -->",
            old.page(0).as_ptr() as usize % 64
        );
        let mut out1 = vec![0u8; PAGE];
        let mut out2 = vec![0u8; PAGE];
        let (old, new, copy) = (&old, &new, &copy);
        let mut variants: Vec<Variant> = vec![
            (
                "memcmp",
                Box::new(move |i| {
                    black_box(black_box(old.page(i)) == black_box(copy.page(i)));
                }),
            ),
            (
                "encode",
                Box::new(|i| {
                    black_box(
                        vmstream_xbzrle::encode(
                            black_box(old.page(i)),
                            black_box(new.page(i)),
                            &mut out1,
                        )
                        .ok(),
                    );
                }),
            ),
            (
                "encode_compact",
                Box::new(|i| {
                    black_box(
                        vmstream_xbzrle::encode_compact(
                            black_box(old.page(i)),
                            black_box(new.page(i)),
                            &mut out2,
                        )
                        .ok(),
                    );
                }),
            ),
        ];
        if let Ok(keep) = std::env::var("VARIANTS") {
            variants.retain(|v| keep.split(',').any(|k| k == v.0));
        }
        let n = variants.len();
        let mut times = vec![Vec::with_capacity(rounds); n];
        for r in 0..rounds {
            for k in 0..n {
                let v = (r + k) % n;
                let f = &mut variants[v].1;
                let t = Instant::now();
                for i in 0..pages {
                    f(i);
                }
                times[v].push(t.elapsed().as_nanos() as f64 / pages as f64);
            }
        }
        for v in 0..n {
            let mut ratios: Vec<f64> = (0..rounds).map(|r| times[v][r] / times[0][r]).collect();
            let min = times[v].iter().cloned().fold(f64::MAX, f64::min);
            println!(
                "| {name} | {} | {:.1} | {:.1} | {:.3} |",
                variants[v].0,
                median(&mut times[v].clone()),
                min,
                median(&mut ratios)
            );
        }
    }
}
