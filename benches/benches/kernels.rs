//! Page-kernel benchmarks: `is_zero` and XBZRLE encode/decode, each group
//! with `memcmp` of two identical 4 KiB pages as the in-run baseline.
//!
//! Every iteration works on the next page of a page set (4 MiB warm, 64 MiB
//! cold), so the figures include memory traffic the way a migration sees it.
//! `python3 benches/ratios.py` turns the results into ratio tables; on a
//! busy machine `--example kernel_ratios` measures the same ratios
//! interleaved, which is steadier.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use vmstream_benches::pages::{filled, PageSet, COLD, IS_ZERO_CASES, PAGE, WARM, XBZRLE_CASES};
use vmstream_benches::Corpus;
use vmstream_xbzrle::{decode, encode, encode_compact};

/// Adds `memcmp` of two identical pages (walking a warm set) to `group`.
fn memcmp_baseline(group: &mut BenchmarkGroup<'_, WallTime>) {
    let set = PageSet::synthetic(WARM, |_, _| {});
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
    for (label, bytes) in [("warm", WARM), ("cold", COLD)] {
        let mut group = c.benchmark_group(format!("is_zero/{label}"));
        memcmp_baseline(&mut group);
        let pages = bytes / PAGE;
        for (name, fill) in IS_ZERO_CASES {
            let buf = filled(bytes, fill);
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
    memcmp_baseline(&mut group);
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
    for (name, mutate) in XBZRLE_CASES {
        bench_xbzrle_set(c, name, &PageSet::synthetic(WARM, mutate));
    }
    for corpus in ["pg-pgbench", "linux-kvm-dbsim"] {
        let Some(corpus) = Corpus::open_named(corpus) else {
            continue;
        };
        let set = PageSet::from_corpus(&corpus).expect("corpus readable");
        bench_xbzrle_set(c, &corpus.name, &set);
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
