//! The kernel targets of the issue, measured as ratios to `memcmp` of two
//! identical 4 KiB pages, interleaved so that a busy machine slows both
//! sides alike: many short slices alternate baseline and kernel, and each
//! side keeps its fastest slice (interference only ever adds time).
//!
//! `cargo run --release -p vmstream-benches --example kernel_ratios [ROUNDS] [SET_KIB]`
//!
//! SET_KIB (default 4096, the warm set) sizes each buffer of the
//! XBZRLE and baseline sets; a small one (e.g. 256) shows the kernels'
//! compute cost with memory out of the way.

use std::hint::black_box;
use std::time::Instant;

use vmstream_benches::pages::{filled, PageSet, COLD, IS_ZERO_CASES, PAGE, WARM, XBZRLE_CASES};
use vmstream_benches::Corpus;
use vmstream_xbzrle::{decode, encode, encode_compact};

/// Pages per timed slice.
const SLICE: usize = 256;

/// Times `SLICE` calls of `f` (with a running page index), in ns per call.
fn slice(idx: &mut usize, pages: usize, f: &mut impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for _ in 0..SLICE {
        *idx = (*idx + 1) % pages;
        f(*idx);
    }
    t.elapsed().as_nanos() as f64 / SLICE as f64
}

/// Bytes per buffer of the warm sets.
fn warm_bytes() -> usize {
    std::env::args()
        .nth(2)
        .and_then(|a| a.parse::<usize>().ok())
        .map_or(WARM, |kib| kib << 10)
}

struct Baseline {
    set: PageSet,
    copy: vmstream_simd::AlignedBuf,
    idx: usize,
}

impl Baseline {
    fn new() -> Baseline {
        let set = PageSet::synthetic(warm_bytes(), |_, _| {});
        let copy = set.old.clone();
        Baseline { set, copy, idx: 0 }
    }

    /// Fastest slices of memcmp and of `f`, interleaved over `rounds`.
    fn ratio(&mut self, rounds: usize, pages: usize, mut f: impl FnMut(usize)) -> (f64, f64) {
        let (set, copy) = (&self.set, &self.copy);
        let mut memcmp = |i: usize| {
            black_box(black_box(set.old_page(i)) == black_box(&copy[i * PAGE..(i + 1) * PAGE]));
        };
        let (mut best_base, mut best_f) = (f64::MAX, f64::MAX);
        let mut idx = 0;
        for _ in 0..rounds {
            best_base = best_base.min(slice(&mut self.idx, set.pages, &mut memcmp));
            best_f = best_f.min(slice(&mut idx, pages, &mut f));
        }
        (best_base, best_f)
    }
}

struct Row {
    group: String,
    kernel: &'static str,
    base_ns: f64,
    ns: f64,
    target: Option<f64>,
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(400);
    println!(
        "SIMD backend: {}; {rounds} interleaved slices of {SLICE} pages per figure",
        vmstream_simd::Backend::active()
    );
    let mut base = Baseline::new();
    let mut rows = Vec::new();

    for (label, bytes) in [("warm", WARM), ("cold", COLD)] {
        for (name, fill) in IS_ZERO_CASES {
            let buf = filled(bytes, fill);
            let (b, t) = base.ratio(rounds, bytes / PAGE, |i| {
                black_box(vmstream_simd::is_zero(black_box(
                    &buf[i * PAGE..(i + 1) * PAGE],
                )));
            });
            let target = (label == "warm" && name == "all_zero").then_some(0.48);
            rows.push(Row {
                group: format!("is_zero/{label}/{name}"),
                kernel: "is_zero",
                base_ns: b,
                ns: t,
                target,
            });
        }
    }

    let mut sets: Vec<(String, PageSet)> = XBZRLE_CASES
        .iter()
        .map(|(name, m)| (name.to_string(), PageSet::synthetic(warm_bytes(), m)))
        .collect();
    for name in ["pg-pgbench", "linux-kvm-dbsim"] {
        if let Some(corpus) = Corpus::open_named(name) {
            sets.push((
                name.to_string(),
                PageSet::from_corpus(&corpus).expect("corpus readable"),
            ));
        }
    }
    for (name, set) in &sets {
        let targets = |kernel: &str| match (name.as_str(), kernel) {
            ("identical" | "1_byte" | "64_contiguous", "encode") => Some(1.0),
            ("16_scattered", "encode") => Some(3.3),
            ("5pct_random", "encode") => Some(18.7),
            ("16_scattered", "decode") => Some(1.3),
            ("5pct_random", "decode") => Some(12.3),
            _ => None,
        };
        let mut out = vec![0u8; PAGE];
        let (b, t) = base.ratio(rounds, set.pages, |i| {
            black_box(encode(set.old_page(i), set.new_page(i), &mut out).ok());
        });
        rows.push(Row {
            group: format!("xbzrle/{name}"),
            kernel: "encode",
            base_ns: b,
            ns: t,
            target: targets("encode"),
        });
        let (b, t) = base.ratio(rounds, set.pages, |i| {
            black_box(encode_compact(set.old_page(i), set.new_page(i), &mut out).ok());
        });
        rows.push(Row {
            group: format!("xbzrle/{name}"),
            kernel: "encode_compact",
            base_ns: b,
            ns: t,
            target: None,
        });
        let deltas: Vec<Vec<u8>> = (0..set.pages)
            .map(|i| {
                let n = encode(set.old_page(i), set.new_page(i), &mut out).unwrap_or(0);
                out[..n].to_vec()
            })
            .collect();
        let mut dst = set.old.clone();
        let (b, t) = base.ratio(rounds, set.pages, |i| {
            black_box(decode(&deltas[i], &mut dst[i * PAGE..(i + 1) * PAGE]).ok());
        });
        rows.push(Row {
            group: format!("xbzrle/{name}"),
            kernel: "decode",
            base_ns: b,
            ns: t,
            target: targets("decode"),
        });
    }

    println!("| case | kernel | memcmp ns | kernel ns | ratio | target | |");
    println!("|---|---|---:|---:|---:|---:|---|");
    for r in rows {
        let ratio = r.ns / r.base_ns;
        let (target, verdict) = match r.target {
            Some(t) => (format!("≤ {t}"), if ratio <= t { "ok" } else { "MISSED" }),
            None => ("-".into(), ""),
        };
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {} | {} |",
            r.group, r.kernel, r.base_ns, r.ns, ratio, target, verdict
        );
    }
}
