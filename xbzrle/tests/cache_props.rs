//! Quickcheck properties of the page cache, checked against a model after
//! every operation of random operation sequences, for every layout.

use std::collections::HashMap;

use quickcheck::{Arbitrary, Gen, QuickCheck};
use vmstream_xbzrle::{InsertOutcome, Layout, PageCache};

const PAGE: usize = 64;

#[derive(Clone, Debug)]
enum Op {
    Insert(u64),
    Get(u64),
    NextGeneration,
}

/// Page numbers from a small universe (so pages collide in small caches),
/// half of them near `u64::MAX`.
fn page_number(g: &mut Gen) -> u64 {
    let n = u64::from(u8::arbitrary(g) % 24);
    if bool::arbitrary(g) {
        n
    } else {
        u64::MAX - n
    }
}

impl Arbitrary for Op {
    fn arbitrary(g: &mut Gen) -> Op {
        match u8::arbitrary(g) % 10 {
            0..=4 => Op::Insert(page_number(g)),
            5..=8 => Op::Get(page_number(g)),
            _ => Op::NextGeneration,
        }
    }
}

#[derive(Clone, Debug)]
struct Config {
    capacity_pages: usize,
    layout: Layout,
}

impl Arbitrary for Config {
    fn arbitrary(g: &mut Gen) -> Config {
        let capacity_pages = 1 + usize::from(u8::arbitrary(g) % 16);
        let layout = match u8::arbitrary(g) % 5 {
            0 => Layout::DirectMapped,
            n => Layout::SetAssociative { ways: 1 << (n - 1) },
        };
        Config {
            capacity_pages,
            layout,
        }
    }
}

/// Page contents naming the page and a version, so a wrong entry shows.
fn contents(page: u64, version: u64) -> Vec<u8> {
    let mut data = vec![0u8; PAGE];
    data[..8].copy_from_slice(&page.to_le_bytes());
    data[8..16].copy_from_slice(&version.to_le_bytes());
    data
}

/// Everything the cache should know, kept the simple way.
#[derive(Default)]
struct Model {
    /// Last contents given for each page (whether or not it was cached).
    latest: HashMap<u64, Vec<u8>>,
    /// Generation each cached page was last used in.
    used: HashMap<u64, u64>,
}

fn universe() -> impl Iterator<Item = u64> {
    (0..24).chain((0..24).map(|n| u64::MAX - n))
}

fn run(config: Config, ops: Vec<Op>) -> Result<(), String> {
    let mut cache =
        PageCache::with_layout(config.capacity_pages * PAGE, PAGE, config.layout).unwrap();
    let capacity = cache.capacity_pages();
    if capacity == 0 || capacity > config.capacity_pages {
        return Err(format!("capacity {capacity} for {config:?}"));
    }
    let mut model = Model::default();
    let mut generation = 0u64;
    let mut deferred: Option<u64> = None;
    for (step, op) in ops.into_iter().enumerate() {
        // Pages used in this or the previous generation must survive the op.
        let protected: Vec<u64> = universe()
            .filter(|&p| cache.contains(p) && model.used[&p] + 1 >= generation)
            .collect();
        match op {
            Op::Insert(page) => {
                let data = contents(page, step as u64);
                let was_cached = cache.contains(page);
                let outcome = cache.insert(page, &data);
                match outcome {
                    InsertOutcome::Updated if !was_cached => {
                        return Err(format!("step {step}: updated uncached page {page}"));
                    }
                    InsertOutcome::Inserted | InsertOutcome::Evicted(_) if was_cached => {
                        return Err(format!("step {step}: {outcome:?} for cached page {page}"));
                    }
                    InsertOutcome::Refused | InsertOutcome::Deferred if was_cached => {
                        return Err(format!("step {step}: {outcome:?} for cached page {page}"));
                    }
                    InsertOutcome::Deferred
                        if deferred == Some(page) || config.layout == Layout::DirectMapped =>
                    {
                        return Err(format!("step {step}: page {page} deferred again"));
                    }
                    InsertOutcome::Evicted(victim) => {
                        let last = model.used.remove(&victim);
                        let Some(last) = last else {
                            return Err(format!("step {step}: evicted uncached page {victim}"));
                        };
                        if last + 1 >= generation {
                            return Err(format!(
                                "step {step}: evicted page {victim} used in generation {last} \
                                 during generation {generation}"
                            ));
                        }
                        if victim == page || cache.contains(victim) {
                            return Err(format!("step {step}: victim {victim} still cached"));
                        }
                    }
                    _ => {}
                }
                if outcome.is_cached() {
                    model.used.insert(page, generation);
                } else if cache.contains(page) {
                    return Err(format!("step {step}: refused page {page} is cached"));
                }
                model.latest.insert(page, data);
                deferred = (outcome == InsertOutcome::Deferred).then_some(page);
            }
            Op::Get(page) => {
                let hits = cache.stats().hits;
                match cache.get(page) {
                    Some(data) => {
                        if model.latest.get(&page).map(Vec::as_slice) != Some(data) {
                            return Err(format!("step {step}: page {page} returned wrong data"));
                        }
                        model.used.insert(page, generation);
                        if cache.stats().hits != hits + 1 {
                            return Err(format!("step {step}: hit not counted"));
                        }
                    }
                    None if model.used.contains_key(&page) => {
                        return Err(format!("step {step}: cached page {page} not found"));
                    }
                    None => {}
                }
            }
            Op::NextGeneration => {
                generation += 1;
                cache.set_generation(generation);
            }
        }

        for &p in &protected {
            if !cache.contains(p) {
                return Err(format!("step {step}: protected page {p} disappeared"));
            }
        }
        // The cache holds exactly the model's pages, with their last data
        // and generation, within capacity.
        let cached: Vec<u64> = universe().filter(|&p| cache.contains(p)).collect();
        if cached.len() != model.used.len() || cached.iter().any(|p| !model.used.contains_key(p)) {
            return Err(format!(
                "step {step}: cached {cached:?}, model {:?}",
                model.used
            ));
        }
        if cached.len() > capacity || cache.len() != cached.len() {
            return Err(format!(
                "step {step}: {} pages cached, capacity {capacity}",
                cached.len()
            ));
        }
        for &p in &cached {
            if cache.peek(p) != Some(&model.latest[&p][..]) {
                return Err(format!("step {step}: page {p} holds stale or foreign data"));
            }
            if cache.last_used(p) != Some(model.used[&p]) {
                return Err(format!("step {step}: page {p} has the wrong generation"));
            }
        }
        let s = cache.stats();
        if s.inserts - s.evictions != cache.len() as u64 {
            return Err(format!(
                "step {step}: stats {s:?} disagree with {} pages",
                cache.len()
            ));
        }
    }
    Ok(())
}

#[test]
fn cache_matches_model() {
    fn prop(config: Config, ops: Vec<Op>) -> Result<(), String> {
        run(config, ops)
    }
    QuickCheck::new()
        .tests(1000)
        .rng(Gen::new(200))
        .quickcheck(prop as fn(Config, Vec<Op>) -> Result<(), String>);
}

/// A fully associative cache (one set), once protection lapses, evicts the
/// entries never reused since their insert first and then the reused ones,
/// each in least-recently-used order; a reused entry only goes on the second
/// miss of the newcomer.
#[test]
fn full_associativity_evicts_cold_then_lru() {
    fn prop(order: Vec<u8>) -> bool {
        let ways = 8;
        let mut cache =
            PageCache::with_layout(ways * PAGE, PAGE, Layout::SetAssociative { ways }).unwrap();
        for p in 0..ways as u64 {
            assert!(cache.insert(p, &contents(p, 0)).is_cached());
        }
        // Touch pages in the given order: recency follows the last touch.
        let mut touched: Vec<u64> = Vec::new();
        for b in order {
            let p = u64::from(b) % ways as u64;
            cache.get(p).unwrap();
            touched.retain(|&q| q != p);
            touched.push(p);
        }
        let cold = (0..ways as u64).filter(|p| !touched.contains(p));
        let expected: Vec<(u64, bool)> = cold
            .map(|p| (p, false))
            .chain(touched.iter().map(|&p| (p, true)))
            .collect();
        cache.set_generation(2);
        expected.iter().enumerate().all(|(i, &(victim, reused))| {
            let new = 100 + i as u64;
            let data = contents(new, 0);
            if reused && cache.insert(new, &data) != InsertOutcome::Deferred {
                return false;
            }
            cache.insert(new, &data) == InsertOutcome::Evicted(victim)
        })
    }
    QuickCheck::new()
        .tests(500)
        .quickcheck(prop as fn(Vec<u8>) -> bool);
}
