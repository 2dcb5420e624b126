//! Page-kernel benchmarks: `is_zero` and XBZRLE encode/decode, each group
//! with `memcmp` of two identical 4 KiB pages as the in-run baseline.
//!
//! Every iteration works on the next page of a page set (4 MiB warm, 64 MiB
//! cold), so the figures include memory traffic the way a migration sees it.
//! `python3 benches/ratios.py` turns the results into ratio tables.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use vmstream_benches::{page_pairs, Corpus};
use vmstream_xbzrle::{decode, encode, encode_compact};

const PAGE: usize = 4096;
const WARM: usize = 4 << 20;
const COLD: usize = 64 << 20;

/// Fills or mutates one page of a set.
type PageFn<'a> = Box<dyn FnMut(&mut [u8], &mut Rng) + 'a>;

/// Deterministic xorshift, so every run measures the same bytes.
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

/// A set of page-sized pairs walked round-robin by the benchmarks.
struct PageSet {
    old: Vec<u8>,
    new: Vec<u8>,
    pages: usize,
}

impl PageSet {
    /// `pages` pairs whose new page is `mutate(old, rng)`.
    fn synthetic(bytes: usize, mut mutate: impl FnMut(&mut [u8], &mut Rng)) -> PageSet {
        let pages = bytes / PAGE;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let old: Vec<u8> = (0..bytes).map(|_| rng.next() as u8).collect();
        let mut new = old.clone();
        for p in new.chunks_exact_mut(PAGE) {
            mutate(p, &mut rng);
        }
        PageSet { old, new, pages }
    }

    fn from_pairs(pairs: &[(Vec<u8>, Vec<u8>)]) -> PageSet {
        PageSet {
            old: pairs.iter().flat_map(|p| p.0.iter().copied()).collect(),
            new: pairs.iter().flat_map(|p| p.1.iter().copied()).collect(),
            pages: pairs.len(),
        }
    }

    fn old_page(&self, i: usize) -> &[u8] {
        &self.old[i * PAGE..(i + 1) * PAGE]
    }

    fn new_page(&self, i: usize) -> &[u8] {
        &self.new[i * PAGE..(i + 1) * PAGE]
    }
}

fn flip(b: &mut u8, rng: &mut Rng) {
    *b = b.wrapping_add(1 + (rng.next() % 255) as u8);
}

/// Adds `memcmp` of two identical pages (walking a warm set) to `group`.
fn memcmp_baseline(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    set: &PageSet,
) {
    let copy = set.old.clone();
    let mut i = 0;
    group.bench_function("memcmp", |b| {
        b.iter(|| {
            i = (i + 1) % set.pages;
            black_box(black_box(set.old_page(i)) == black_box(&copy[i * PAGE..(i + 1) * PAGE]))
        })
    });
}

fn bench_is_zero(c: &mut Criterion) {
    let baseline = PageSet::synthetic(WARM, |_, _| {});
    for (label, bytes) in [("warm", WARM), ("cold", COLD)] {
        let mut group = c.benchmark_group(format!("is_zero/{label}"));
        memcmp_baseline(&mut group, &baseline);
        let pages = bytes / PAGE;
        let cases: [(&str, PageFn); 4] = [
            ("all_zero", Box::new(|_, _| {})),
            ("first_byte", Box::new(|p, _| p[0] = 1)),
            ("byte_3800", Box::new(|p, _| p[3800] = 1)),
            (
                "random",
                Box::new(|p, r| p.iter_mut().for_each(|b| *b = r.next() as u8 | 1)),
            ),
        ];
        for (name, mut fill) in cases {
            let mut buf = vec![0u8; bytes];
            let mut rng = Rng(1);
            buf.chunks_exact_mut(PAGE).for_each(|p| fill(p, &mut rng));
            let mut i = 0;
            group.bench_function(name, |b| {
                b.iter(|| {
                    i = (i + 1) % pages;
                    vmstream_simd::is_zero(black_box(&buf[i * PAGE..(i + 1) * PAGE]))
                })
            });
        }
        group.finish();
    }
}

fn bench_xbzrle_set(c: &mut Criterion, name: &str, set: &PageSet) {
    let mut group = c.benchmark_group(format!("xbzrle/{name}"));
    memcmp_baseline(&mut group, &PageSet::synthetic(WARM, |_, _| {}));
    let mut out = vec![0u8; PAGE];
    let mut i = 0;
    group.bench_function("encode", |b| {
        b.iter(|| {
            i = (i + 1) % set.pages;
            black_box(
                encode(
                    black_box(set.old_page(i)),
                    black_box(set.new_page(i)),
                    &mut out,
                )
                .ok(),
            )
        })
    });
    group.bench_function("encode_compact", |b| {
        b.iter(|| {
            i = (i + 1) % set.pages;
            black_box(
                encode_compact(
                    black_box(set.old_page(i)),
                    black_box(set.new_page(i)),
                    &mut out,
                )
                .ok(),
            )
        })
    });
    // Deltas of every page (overflowing pages decode nothing: they go raw).
    let deltas: Vec<Vec<u8>> = (0..set.pages)
        .map(|i| {
            let n = encode(set.old_page(i), set.new_page(i), &mut out).unwrap_or(0);
            out[..n].to_vec()
        })
        .collect();
    let mut dst = set.old.clone();
    group.bench_function("decode", |b| {
        b.iter(|| {
            i = (i + 1) % set.pages;
            black_box(decode(black_box(&deltas[i]), &mut dst[i * PAGE..(i + 1) * PAGE]).ok())
        })
    });
    group.finish();
}

fn bench_xbzrle(c: &mut Criterion) {
    let scattered = |p: &mut [u8], r: &mut Rng| {
        for _ in 0..16 {
            let k = r.below(PAGE);
            flip(&mut p[k], r);
        }
    };
    let percent = |pct: usize| {
        move |p: &mut [u8], r: &mut Rng| {
            for b in p.iter_mut() {
                if r.below(100) < pct {
                    flip(b, r);
                }
            }
        }
    };
    let synthetic: [(&str, PageFn); 6] = [
        ("identical", Box::new(|_, _| {})),
        ("1_byte", Box::new(|p, r| flip(&mut p[r.below(PAGE)], r))),
        ("16_scattered", Box::new(scattered)),
        (
            "64_contiguous",
            Box::new(|p, r| {
                let s = r.below(PAGE - 64);
                p[s..s + 64].iter_mut().for_each(|b| flip(b, r));
            }),
        ),
        ("5pct_random", Box::new(percent(5))),
        ("50pct_random", Box::new(percent(50))),
    ];
    for (name, mutate) in synthetic {
        bench_xbzrle_set(c, name, &PageSet::synthetic(WARM, mutate));
    }
    for corpus in ["pg-pgbench", "linux-kvm-dbsim"] {
        let Some(corpus) = Corpus::open_named(corpus) else {
            continue;
        };
        let pairs = page_pairs(&corpus, None).expect("corpus readable");
        // Evenly spaced pairs over all rounds, 4 MiB of them.
        let want = (WARM / PAGE).min(pairs.len());
        let picked: Vec<_> = (0..want)
            .map(|k| pairs[k * pairs.len() / want].clone())
            .collect();
        bench_xbzrle_set(c, &corpus.name, &PageSet::from_pairs(&picked));
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(40)
}

criterion_group! {
    name = kernels;
    config = config();
    targets = bench_is_zero, bench_xbzrle
}
criterion_main!(kernels);
