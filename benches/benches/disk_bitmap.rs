//! The dirty search of issue 20: one round's walk over a 1 TiB disk's dirty bitmap (in
//! memory) at 64 KiB granularity, 0.1 %, 1 % and 10 % dirty, the granules random or in
//! clusters of 16; the hierarchical `next_dirty_extent` walk against a linear walk that
//! asks every granule (QEMU's block migration). Both walks count the dirty granules and
//! extents they find (the same numbers), and clear nothing.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use vmstream::disk::bitmap::DirtyBitmap;

const DISK: u64 = 1 << 40;
const GRANULARITY: u64 = 64 << 10;
/// Clustered: runs of this many granules (1 MiB at 64 KiB).
const CLUSTER: u64 = 16;

fn marked(per_mille: u64, cluster: u64) -> DirtyBitmap {
    let b = DirtyBitmap::in_memory(DISK, GRANULARITY).unwrap();
    let n = b.granules();
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let want = n * per_mille / 1000;
    while b.dirty_count() < want {
        for _ in 0..(want - b.dirty_count()).div_ceil(cluster) {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let g = (s >> 16) % n;
            b.mark(g..(g + cluster).min(n));
        }
    }
    b
}

fn hierarchical(b: &DirtyBitmap) -> (u64, u64) {
    let (mut granules, mut extents, mut from) = (0, 0, 0);
    while let Some(r) = b.next_dirty_extent(from) {
        granules += r.end - r.start;
        extents += 1;
        from = r.end;
    }
    (granules, extents)
}

fn linear(b: &DirtyBitmap) -> (u64, u64) {
    let (mut granules, mut extents, mut prev) = (0, 0, false);
    for g in 0..b.granules() {
        let d = b.is_dirty(g);
        granules += d as u64;
        extents += (d && !prev) as u64;
        prev = d;
    }
    (granules, extents)
}

fn bench_dirty_search(c: &mut Criterion) {
    for (pattern, cluster) in [("random", 1), ("clustered", CLUSTER)] {
        for per_mille in [1, 10, 100] {
            let b = marked(per_mille, cluster);
            assert_eq!(hierarchical(&b), linear(&b));
            let mut group = c.benchmark_group(format!(
                "dirty_search/1TiB-64K/{pattern}/{}.{}%",
                per_mille / 10,
                per_mille % 10
            ));
            group.bench_function("hierarchical", |i| i.iter(|| hierarchical(black_box(&b))));
            group.bench_function("linear", |i| i.iter(|| linear(black_box(&b))));
            group.finish();
        }
    }
}

criterion_group! {
    name = disk_bitmap;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .sample_size(10);
    targets = bench_dirty_search
}
criterion_main!(disk_bitmap);
