//! Properties of hot-page deferral over random sequences of dirty sets, checked against a
//! model of which page contents have not been sent yet.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;

use quickcheck::{Arbitrary, Gen, QuickCheck, TestResult};
use vmstream::converge::{DeferConfig, DeferError, HotPageDeferral};
use vmstream::memory::PAGE_SIZE;

#[derive(Debug, Clone)]
struct Scenario {
    percent: f64,
    pages_per_segment: u64,
    guest_pages: u64,
    max_consecutive: u32,
    rounds: Vec<Vec<u64>>,
    last: Vec<u64>,
}

impl Arbitrary for Scenario {
    fn arbitrary(g: &mut Gen) -> Scenario {
        let pages_per_segment = *g.choose(&[1u64, 2, 4, 8]).unwrap();
        let guest_pages = 8 + u64::arbitrary(g) % 120;
        let pages = |g: &mut Gen| -> Vec<u64> {
            // Dense or sparse rounds, sometimes concentrated on a hot region.
            let n = usize::arbitrary(g) % (guest_pages as usize * 2);
            let hot = bool::arbitrary(g);
            (0..n)
                .map(|_| {
                    let p = u64::arbitrary(g);
                    if hot {
                        p % (guest_pages / 4 + 1)
                    } else {
                        p % guest_pages
                    }
                })
                .collect()
        };
        let n_rounds = usize::arbitrary(g) % 12;
        Scenario {
            percent: (u8::arbitrary(g) % 101) as f64,
            pages_per_segment,
            guest_pages,
            max_consecutive: 1 + u32::arbitrary(g) % 4,
            rounds: (0..n_rounds).map(|_| pages(g)).collect(),
            last: pages(g),
        }
    }

    fn shrink(&self) -> Box<dyn Iterator<Item = Scenario>> {
        let base = self.clone();
        Box::new(self.rounds.shrink().map(move |rounds| Scenario {
            rounds,
            ..base.clone()
        }))
    }
}

fn deferral(s: &Scenario) -> HotPageDeferral {
    let cfg = DeferConfig {
        percent: s.percent,
        segment_bytes: s.pages_per_segment * PAGE_SIZE as u64,
        page_size: PAGE_SIZE as u64,
        stop_below: 0.10,
        max_consecutive: s.max_consecutive,
    };
    HotPageDeferral::new(cfg, s.guest_pages).unwrap()
}

fn strictly_sorted(v: &[u64]) -> bool {
    v.windows(2).all(|w| w[0] < w[1])
}

/// Every invariant, round by round.
fn invariants(s: Scenario) -> TestResult {
    let mut d = deferral(&s);
    let segments = s.guest_pages.div_ceil(s.pages_per_segment);
    let quota = (s.percent / 100.0 * segments as f64).ceil() as usize;
    // Pages whose latest content has not been sent.
    let mut unsent: BTreeSet<u64> = BTreeSet::new();
    let mut prev_deferred: BTreeSet<u64> = BTreeSet::new();
    let mut saved = 0u64;
    let mut streak = vec![0u32; s.guest_pages as usize];
    let mut stopped = false;
    // Page sends and page-dirtying events (a page in a round's new set).
    let (mut sends, mut events) = (0u64, 0u64);
    for newly in &s.rounds {
        let newly_set: BTreeSet<u64> = newly.iter().copied().collect();
        saved += newly_set.intersection(&prev_deferred).count() as u64;
        unsent.extend(&newly_set);
        let split = d.split(newly).unwrap();
        events += newly_set.len() as u64;
        sends += split.send_now.len() as u64;
        if !strictly_sorted(&split.send_now) || !strictly_sorted(&split.deferred) {
            return TestResult::error("output not sorted and deduplicated");
        }
        let send: BTreeSet<u64> = split.send_now.iter().copied().collect();
        let deferred: BTreeSet<u64> = split.deferred.iter().copied().collect();
        // send_now and deferred partition the dirty pages: newly dirtied plus carried.
        let dirty: BTreeSet<u64> = newly_set.union(&prev_deferred).copied().collect();
        if !send.is_disjoint(&deferred) {
            return TestResult::error("send_now and deferred overlap");
        }
        if send.union(&deferred).copied().collect::<BTreeSet<_>>() != dirty {
            return TestResult::error("send_now + deferred != dirty");
        }
        // Only sending clears a page; what is not sent is exactly what is deferred.
        for p in &send {
            unsent.remove(p);
        }
        if unsent != deferred {
            return TestResult::error(format!("unsent {unsent:?} != deferred {deferred:?}"));
        }
        // Under 10% of memory dirty: stop for good.
        if (dirty.len() as u64 * 10) < s.guest_pages {
            stopped = true;
        }
        if stopped && (!deferred.is_empty() || !d.is_stopped()) {
            return TestResult::error("deferred after the 10% stop");
        }
        // Only hot segments (with new writes), at most the quota of them.
        let segs: BTreeSet<u64> = deferred.iter().map(|p| p / s.pages_per_segment).collect();
        if segs.len() > quota {
            return TestResult::error("more segments deferred than the quota");
        }
        if segs
            .iter()
            .any(|&g| !newly_set.iter().any(|p| p / s.pages_per_segment == g))
        {
            return TestResult::error("a segment without new writes was deferred");
        }
        // No page deferred more than max_consecutive rounds in a row.
        for p in 0..s.guest_pages {
            let st = &mut streak[p as usize];
            *st = if deferred.contains(&p) { *st + 1 } else { 0 };
            if *st > s.max_consecutive {
                return TestResult::error(format!("page {p} deferred {st} rounds in a row"));
            }
        }
        if d.carried() != split.deferred.as_slice() {
            return TestResult::error("carried != deferred");
        }
        prev_deferred = deferred;
    }
    if d.saved_bytes() != saved * PAGE_SIZE as u64 {
        return TestResult::error(format!(
            "saved {} B, model {} B",
            d.saved_bytes(),
            saved * PAGE_SIZE as u64
        ));
    }
    // Switchover: everything still dirty is sent, nothing stays deferred.
    let last: BTreeSet<u64> = s.last.iter().copied().collect();
    let all = d.finish(&s.last).unwrap();
    unsent.extend(&last);
    if all.iter().copied().collect::<BTreeSet<_>>() != unsent || !strictly_sorted(&all) {
        return TestResult::error("finish did not return everything unsent");
    }
    if !d.carried().is_empty() || !d.is_stopped() {
        return TestResult::error("deferral continues after finish");
    }
    // Every dirtying is sent once, except those merged into a later send while deferred:
    // the savings are exactly the sends avoided.
    events += last.len() as u64;
    sends += all.len() as u64;
    if sends * PAGE_SIZE as u64 + d.saved_bytes() != events * PAGE_SIZE as u64 {
        return TestResult::error(format!(
            "{sends} sends + {} saved != {events} dirtyings",
            d.saved_bytes() / PAGE_SIZE as u64
        ));
    }
    TestResult::passed()
}

#[test]
fn deferral_invariants_hold_on_random_rounds() {
    QuickCheck::new()
        .tests(2000)
        .quickcheck(invariants as fn(Scenario) -> TestResult);
}

#[test]
fn deferral_saves_bytes_on_a_hot_region() {
    // 64 segments of 2 MiB (128 MiB); every round rewrites the first 4 segments fully and
    // 50 pages in each of 30 others (over 10% of memory dirty). Deferring 5% (4 segments)
    // saves the hot region every round after the first.
    let mut d = HotPageDeferral::new(DeferConfig::new(5.0), 64 * 512).unwrap();
    let hot: Vec<u64> = (0..4 * 512).collect();
    let cold = |r: u64| (10..40).flat_map(move |s| (0..50).map(move |i| s * 512 + r * 50 + i));
    let mut sent_hot = 0;
    for r in 0..5u64 {
        let newly: Vec<u64> = hot.iter().copied().chain(cold(r)).collect();
        let split = d.split(&newly).unwrap();
        sent_hot += split.send_now.iter().filter(|&&p| p < 4 * 512).count();
    }
    // max_consecutive = 8 > 5 rounds: the hot pages never went out.
    assert_eq!(sent_hot, 0);
    assert_eq!(d.saved_bytes(), 4 * 4 * 512 * PAGE_SIZE as u64);
    assert_eq!(d.finish(&[]).unwrap(), hot);
}

#[test]
fn out_of_range_page_is_an_error_and_changes_nothing() {
    let mut d = HotPageDeferral::new(DeferConfig::new(50.0), 1024).unwrap();
    let before = d.split(&(0..600).collect::<Vec<_>>()).unwrap();
    assert!(!before.deferred.is_empty());
    assert_eq!(
        d.split(&[3, 1024]),
        Err(DeferError::PageOutOfRange {
            page: 1024,
            guest_pages: 1024
        })
    );
    assert_eq!(d.carried(), before.deferred.as_slice());
}

/// The changed-page lists of a corpus's rounds (`round-NNN.zst`: u32 LE count, then the
/// ascending u32 LE page indices, then the contents, which are not read).
fn corpus_rounds(dir: &Path) -> std::io::Result<Vec<Vec<u64>>> {
    let mut rounds = Vec::new();
    for n in 1.. {
        let path = dir.join(format!("round-{n:03}.zst"));
        if !path.exists() {
            break;
        }
        let mut dec = zstd::stream::read::Decoder::new(std::fs::File::open(&path)?)?;
        dec.window_log_max(27)?;
        let mut word = [0u8; 4];
        dec.read_exact(&mut word)?;
        let k = u32::from_le_bytes(word) as usize;
        let mut idx = vec![0u8; k * 4];
        dec.read_exact(&mut idx)?;
        rounds.push(
            idx.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as u64)
                .collect(),
        );
    }
    Ok(rounds)
}

#[test]
fn deferral_on_the_real_corpora() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus");
    if !root.is_dir() {
        println!("skipped: no corpus at {}", root.display());
        return;
    }
    println!("| corpus | defer % | segment | pages sent | saved (MiB) | saved % |");
    println!("|---|---|---|---|---|---|");
    for name in ["pg-pgbench", "linux-kvm-dbsim"] {
        let dir = root.join(name);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let pages = meta["pages"].as_u64().unwrap();
        let rounds = corpus_rounds(&dir).unwrap();
        assert!(!rounds.is_empty(), "{name}: no rounds");
        let events: u64 = rounds.iter().map(|r| r.len() as u64).sum();
        for segment_kib in [64u64, 2048] {
            for percent in [0.0, 5.0, 10.0, 25.0] {
                // The corpora dirty only 1..22% of memory per round: the 10% stop is off
                // here so the effect of deferral itself shows.
                let cfg = DeferConfig {
                    percent,
                    segment_bytes: segment_kib << 10,
                    page_size: PAGE_SIZE as u64,
                    stop_below: 0.0,
                    max_consecutive: 8,
                };
                let mut d = HotPageDeferral::new(cfg, pages).unwrap();
                let mut sent = 0u64;
                for r in &rounds {
                    sent += d.split(r).unwrap().send_now.len() as u64;
                }
                sent += d.finish(&[]).unwrap().len() as u64;
                // Real data obeys the same identity as the property test.
                assert_eq!(
                    sent * PAGE_SIZE as u64 + d.saved_bytes(),
                    events * PAGE_SIZE as u64,
                    "{name}"
                );
                println!(
                    "| {name} | {percent} | {segment_kib} KiB | {sent} | {:.1} | {:.1} |",
                    d.saved_bytes() as f64 / (1u64 << 20) as f64,
                    d.saved_bytes() as f64 / (events * PAGE_SIZE as u64) as f64 * 100.0
                );
            }
        }
    }
}
