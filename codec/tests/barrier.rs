//! Round barriers: no page of a round is applied after `end_round` of that
//! round returns, no page of the next round before it, and after the last
//! barrier the destination equals the last content sent for every page.
//! `cargo test -p vmstream-codec barrier` runs all of these.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quickcheck::{quickcheck, Arbitrary, Gen};
use vmstream_codec::receiver::HookPoint;
use vmstream_codec::{
    receive, Compression, DeltaConfig, DeltaMode, EncoderConfig, Receiver, ReceiverConfig, Sender,
    SenderConfig, PAGE_SIZE,
};

/// Content kinds a page can be rewritten with.
fn fill(kind: u8, seed: u32, page: &mut [u8]) {
    let mut x = seed as u64 | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    match kind % 5 {
        0 => page.fill(0),
        1 => page.iter_mut().for_each(|b| *b = next() as u8),
        2 => {
            for (i, b) in page.iter_mut().enumerate() {
                *b = b"round and round "[(i + seed as usize) % 16];
            }
        }
        3 => {
            // Small edit of the current content: an XBZRLE / XOR hit.
            for _ in 0..4 {
                let at = (next() % PAGE_SIZE as u64) as usize;
                page[at] = page[at].wrapping_add(1 + (seed % 200) as u8);
            }
        }
        _ => page.fill(seed as u8), // one repeated byte (zero when seed % 256 == 0)
    }
}

/// Sends one round: pushes, drains packets to the receiver, ends both
/// rounds. Returns the packets' sequence numbers.
fn send_round(
    sender: &mut Sender,
    rx: &mut Receiver,
    round: u64,
    pages: &[(u64, Vec<u8>)],
) -> Vec<u64> {
    let mut seqs = Vec::new();
    for (p, data) in pages {
        sender.push(*p, data).unwrap();
        // Interleave: forward packets while pushing.
        while let Some(pkt) = sender.poll() {
            seqs.push(pkt.seq);
            rx.submit(pkt.into_vec()).unwrap();
        }
    }
    let sent = sender.end_round().unwrap();
    assert_eq!(
        sent.pages() + sent.cache.unchanged,
        pages.len() as u64,
        "round {round}: pages encoded"
    );
    while let Some(pkt) = sender.poll() {
        seqs.push(pkt.seq);
        rx.submit(pkt.into_vec()).unwrap();
    }
    let stats = rx.end_round(round).unwrap();
    assert_eq!(
        stats.pages(),
        sent.pages(),
        "round {round}: pages applied by the barrier"
    );
    seqs
}

fn stress(receiver_workers: usize) {
    const PAGES: u64 = 1024;
    const ROUNDS: u64 = 40;
    let clock = Arc::new(AtomicU64::new(1));
    let before: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let after: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let hook = {
        let (clock, before, after) = (Arc::clone(&clock), Arc::clone(&before), Arc::clone(&after));
        Arc::new(move |point: HookPoint, worker: usize, seq: u64| {
            let t = clock.fetch_add(1, Ordering::SeqCst);
            match point {
                HookPoint::BeforeApply => {
                    // A packet spread over workers: keep its earliest start.
                    before.lock().unwrap().entry(seq).or_insert(t);
                    // Worker 0 is slow, and every third packet slower still.
                    match (worker, seq % 3) {
                        (0, 0) => Duration::from_millis(3),
                        (0, _) => Duration::from_micros(300),
                        _ => Duration::ZERO,
                    }
                }
                HookPoint::AfterApply => {
                    // ...and its latest completion.
                    let mut after = after.lock().unwrap();
                    let done = after.entry(seq).or_insert(t);
                    *done = (*done).max(t);
                    Duration::ZERO
                }
            }
        })
    };
    let rconfig = ReceiverConfig {
        workers: receiver_workers,
        queue_depth: 4,
        page_observer: None,
        zeroed_memory: false,
        memory_file: None,
        test_hook: Some(hook),
    };
    let mut sconfig = SenderConfig::new(PAGES);
    sconfig.workers = 2;
    sconfig.batch_pages = 64;
    sconfig.encoder = EncoderConfig {
        compression: Compression::Lz4 { acceleration: 1 },
        delta: Some(DeltaConfig {
            cache_bytes: 2 << 20,
            max_delta: 2048,
            mode: DeltaMode::Xbzrle,
            ..DeltaConfig::default()
        }),
    };
    let mut sender = Sender::new(sconfig).unwrap();
    let mut image = vec![0u8; PAGES as usize * PAGE_SIZE];
    let mut dest = vec![0u8; PAGES as usize * PAGE_SIZE];
    let mut round_of_seq = HashMap::new();
    let mut barrier_at = Vec::new();
    receive(&rconfig, &mut dest, |rx| {
        for round in 0..ROUNDS {
            // Every round rewrites the first 256 pages (the same pages over
            // and over) plus a moving window.
            let mut pages = Vec::new();
            let window = round * 97 % PAGES;
            for p in (0..256).chain(window..(window + 64).min(PAGES)) {
                let at = p as usize * PAGE_SIZE;
                let page = &mut image[at..at + PAGE_SIZE];
                fill((p + round) as u8, (p * 1000 + round) as u32, page);
                if !pages.iter().any(|(q, _)| *q == p) {
                    pages.push((p, page.to_vec()));
                }
            }
            for seq in send_round(&mut sender, rx, round, &pages) {
                round_of_seq.insert(seq, round);
            }
            barrier_at.push(clock.fetch_add(1, Ordering::SeqCst));
        }
    })
    .unwrap();
    // Pages pushed twice in a round would have been refused, and the
    // dedup above keeps the last content: the image is what was sent last.
    assert_eq!(
        crc32c::crc32c(&dest),
        crc32c::crc32c(&image),
        "destination digest"
    );
    assert!(dest == image);
    let (before, after) = (before.lock().unwrap(), after.lock().unwrap());
    assert_eq!(after.len(), round_of_seq.len(), "every packet was applied");
    for (seq, &round) in &round_of_seq {
        let done = after[seq];
        assert!(
            done < barrier_at[round as usize],
            "packet {seq} of round {round} applied after its barrier"
        );
        if round > 0 {
            let start = before[seq];
            assert!(
                start > barrier_at[round as usize - 1],
                "packet {seq} of round {round} started before the previous barrier"
            );
        }
    }
}

#[test]
fn barrier_stress_slow_workers_same_worker_count() {
    stress(2);
}

#[test]
fn barrier_stress_slow_workers_spread_packets() {
    // 3 receiver workers against 2 sender shards: packets span workers.
    stress(3);
}

#[test]
fn barrier_stress_slow_workers_single() {
    stress(1);
}

/// A random migration: rounds of page rewrites and pipeline settings.
#[derive(Debug, Clone)]
struct Scenario {
    sender_workers: usize,
    receiver_workers: usize,
    batch_pages: usize,
    compression: Compression,
    delta: Option<DeltaMode>,
    cache_pages: usize,
    /// Per round: (page, content kind, seed).
    rounds: Vec<Vec<(u8, u8, u32)>>,
}

impl Arbitrary for Scenario {
    fn arbitrary(g: &mut Gen) -> Self {
        let pick = |g: &mut Gen, n: u32| u32::arbitrary(g) % n;
        let compression = match pick(g, 4) {
            0 => Compression::Lz4 {
                acceleration: 1 + pick(g, 4) as i32,
            },
            1 => Compression::Zstd {
                level: 1 + pick(g, 3) as i32,
            },
            2 => Compression::Zlib {
                level: pick(g, 10) as i32,
            },
            _ => Compression::None,
        };
        let delta = match pick(g, 5) {
            0 => None,
            1 => Some(DeltaMode::Xbzrle),
            2 => Some(DeltaMode::XbzrleLz4),
            3 => Some(DeltaMode::XorLz4),
            _ => Some(DeltaMode::Smallest),
        };
        let rounds = (0..1 + pick(g, 6))
            .map(|_| {
                (0..pick(g, 60))
                    .map(|_| (u8::arbitrary(g), u8::arbitrary(g), u32::arbitrary(g)))
                    .collect()
            })
            .collect();
        Scenario {
            sender_workers: 1 + pick(g, 3) as usize,
            receiver_workers: 1 + pick(g, 3) as usize,
            batch_pages: 1 + pick(g, 80) as usize,
            compression,
            delta,
            cache_pages: 1 + pick(g, 300) as usize,
            rounds,
        }
    }
}

fn last_write_wins(s: Scenario) -> bool {
    const PAGES: u64 = 256;
    let mut sconfig = SenderConfig::new(PAGES);
    sconfig.workers = s.sender_workers;
    sconfig.batch_pages = s.batch_pages;
    sconfig.encoder = EncoderConfig {
        compression: s.compression,
        delta: s.delta.map(|mode| DeltaConfig {
            cache_bytes: s.cache_pages * PAGE_SIZE * s.sender_workers,
            max_delta: 2048,
            mode,
            ..DeltaConfig::default()
        }),
    };
    let mut sender = Sender::new(sconfig).unwrap();
    let rconfig = ReceiverConfig {
        workers: s.receiver_workers,
        ..Default::default()
    };
    let mut image = vec![0u8; PAGES as usize * PAGE_SIZE];
    let mut dest = vec![0xEEu8; PAGES as usize * PAGE_SIZE];
    receive(&rconfig, &mut dest, |rx| {
        // Round 0 sends the whole guest, like a first pass.
        let all: Vec<_> = (0..PAGES)
            .map(|p| (p, image[p as usize * PAGE_SIZE..][..PAGE_SIZE].to_vec()))
            .collect();
        send_round(&mut sender, rx, 0, &all);
        for (i, ops) in s.rounds.iter().enumerate() {
            let mut touched = Vec::new();
            for &(p, kind, seed) in ops {
                let at = p as usize * PAGE_SIZE;
                fill(kind, seed, &mut image[at..at + PAGE_SIZE]);
                if !touched.contains(&(p as u64)) {
                    touched.push(p as u64);
                }
            }
            let pages: Vec<_> = touched
                .iter()
                .map(|&p| (p, image[p as usize * PAGE_SIZE..][..PAGE_SIZE].to_vec()))
                .collect();
            send_round(&mut sender, rx, i as u64 + 1, &pages);
        }
    })
    .unwrap();
    dest == image
}

#[test]
fn barrier_quickcheck_last_write_wins() {
    quickcheck(last_write_wins as fn(Scenario) -> bool);
}

#[test]
fn barrier_sender_refuses_duplicate_page_in_round() {
    let mut sender = Sender::new(SenderConfig {
        workers: 1,
        ..SenderConfig::new(8)
    })
    .unwrap();
    let page = vec![1u8; PAGE_SIZE];
    sender.push(3, &page).unwrap();
    assert!(matches!(
        sender.push(3, &page),
        Err(vmstream_codec::CodecError::DuplicatePage { page: 3, round: 0 })
    ));
    assert_eq!(sender.end_round().unwrap().pages(), 1);
    sender.push(3, &page).unwrap();
}
