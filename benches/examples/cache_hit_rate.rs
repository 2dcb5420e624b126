//! Replays the real corpora through the sender's XBZRLE page cache at several
//! capacities and prints hit rates and bytes on the wire as markdown, comparing
//! the set-associative age-aware layout with QEMU's direct-mapped design.
//!
//! `cargo run --release -p vmstream-benches --example cache_hit_rate [CORPUS...]`

use vmstream_benches::corpus::Corpus;
use vmstream_benches::replay::{replay, LoadedCorpus, Replay, ReplayResult};
use vmstream_xbzrle::Layout;

const MIB: usize = 1 << 20;
const CAPACITIES_MIB: [usize; 5] = [4, 8, 16, 32, 64];
const LAYOUTS: [Layout; 3] = [
    Layout::DirectMapped,
    Layout::SetAssociative { ways: 8 },
    Layout::SetAssociative { ways: 16 },
];

fn layout_name(layout: Layout) -> String {
    match layout {
        Layout::DirectMapped => "direct-mapped".into(),
        Layout::SetAssociative { ways } => format!("{ways}-way"),
    }
}

fn row(name: &str, capacity: &str, layout: &str, r: &ReplayResult) {
    let c = &r.stats.cache;
    println!(
        "| {name} | {capacity} | {layout} | {} | {} | {:.1}% | {} | {} | {} | {} | {:.2} | {:.3} |",
        c.hits,
        c.misses,
        100.0 * r.hit_rate(),
        c.evictions,
        c.refused,
        c.deferred,
        r.stats.overflows,
        r.wire_bytes as f64 / MIB as f64,
        r.wire_bytes as f64 / r.raw_bytes as f64,
    );
}

fn main() {
    let mut names: Vec<String> = std::env::args().skip(1).collect();
    if names.is_empty() {
        names = vec!["pg-pgbench".into(), "linux-kvm-dbsim".into()];
    }
    for bulk_insert in [true, false] {
        println!();
        if bulk_insert {
            println!("Round 0 caches every page it sends (generation 0); rounds 1-6 look up each dirty page.");
        } else {
            println!("Round 0 bypasses the cache (QEMU's bulk stage); rounds 1-6 look up each dirty page.");
        }
        println!();
        println!(
            "| corpus | cache | layout | hits | misses | hit rate | evictions | refused | deferred \
             | overflows | wire MiB | wire / raw |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        for name in &names {
            let Some(corpus) = Corpus::open_named(name) else {
                continue;
            };
            let data = match LoadedCorpus::load(corpus) {
                Ok(data) => data,
                Err(e) => {
                    eprintln!("corpus {name}: {e}");
                    continue;
                }
            };
            for mib in CAPACITIES_MIB {
                for layout in LAYOUTS {
                    let config = Replay {
                        capacity_bytes: mib * MIB,
                        layout,
                        bulk_insert,
                    };
                    row(
                        name,
                        &format!("{mib} MiB"),
                        &layout_name(layout),
                        &replay(&data, config),
                    );
                }
            }
            // Reference: a cache with a slot for every page never misses
            // after round 0 (when round 0 fills it).
            let image = data.corpus.image_bytes();
            let config = Replay {
                capacity_bytes: image,
                layout: Layout::DirectMapped,
                bulk_insert,
            };
            let label = format!("{} MiB (all)", image.div_ceil(MIB));
            row(name, &label, "unbounded", &replay(&data, config));
        }
    }
}
