//! Sender/receiver pipelines: page sources, statistics, configuration
//! errors.

use std::sync::{Arc, RwLock};

use vmstream_codec::{
    receive, CodecError, Compression, DeltaConfig, DeltaMode, EncoderConfig, PageSource,
    PipelineStats, ReceiverConfig, Sender, SenderConfig, PAGE_SIZE,
};

/// Guest memory the test mutates between rounds.
struct Guest(RwLock<Vec<u8>>);

impl PageSource for Guest {
    fn read_page(&self, page: u64, out: &mut [u8]) {
        let g = self.0.read().unwrap();
        out.copy_from_slice(&g[page as usize * PAGE_SIZE..][..PAGE_SIZE]);
    }
}

const PAGES: u64 = 512;

fn config(workers: usize) -> SenderConfig {
    let mut c = SenderConfig::new(PAGES);
    c.workers = workers;
    c.batch_pages = 100;
    c.encoder = EncoderConfig {
        compression: Compression::Lz4 { acceleration: 1 },
        delta: Some(DeltaConfig {
            cache_bytes: PAGES as usize * PAGE_SIZE,
            max_delta: 2048,
            mode: DeltaMode::XbzrleLz4,
            ..DeltaConfig::default()
        }),
    };
    c
}

fn drain(sender: &mut Sender, rx: &mut vmstream_codec::Receiver) {
    while let Some(p) = sender.poll() {
        rx.submit(p.into_vec()).unwrap();
    }
}

#[test]
fn source_mode_migrates_a_changing_guest() {
    let guest = Arc::new(Guest(RwLock::new(vec![0u8; PAGES as usize * PAGE_SIZE])));
    {
        let mut g = guest.0.write().unwrap();
        for (i, page) in g.chunks_mut(PAGE_SIZE).enumerate() {
            if i % 3 != 0 {
                page.iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = (j / 16 + i) as u8);
            }
        }
    }
    let mut sender = Sender::with_source(config(2), guest.clone()).unwrap();
    let mut dest = vec![0xffu8; PAGES as usize * PAGE_SIZE];
    let mut sender_stats = PipelineStats::default();
    let mut receiver_stats = PipelineStats::default();
    receive(
        &ReceiverConfig {
            workers: 2,
            ..Default::default()
        },
        &mut dest,
        |rx| {
            for round in 0..4u64 {
                let dirty: Vec<u64> = if round == 0 {
                    (0..PAGES).collect()
                } else {
                    (0..PAGES).filter(|p| p % 5 == round % 5).collect()
                };
                if round > 0 {
                    let mut g = guest.0.write().unwrap();
                    for &p in &dirty {
                        g[p as usize * PAGE_SIZE + (round as usize * 37) % PAGE_SIZE] ^= 0x5a;
                    }
                }
                for &p in &dirty {
                    sender.push_page(p).unwrap();
                    drain(&mut sender, rx);
                }
                let s = sender.end_round().unwrap();
                drain(&mut sender, rx);
                let r = rx.end_round(round).unwrap();
                assert_eq!(s.pages(), r.pages(), "round {round}");
                assert_eq!(s.packet_bytes, r.packet_bytes, "round {round}");
                assert_eq!(s.packets, r.packets, "round {round}");
                assert_eq!(s.pages(), dirty.len() as u64);
                if round > 0 {
                    // Pages that were zero in round 0 were not cached (their
                    // first write is a miss); of the others, a few may have
                    // been refused a slot by the set-associative cache, and
                    // all the rest are delta hits.
                    assert_eq!(s.cache.hits + s.cache.misses, dirty.len() as u64);
                    let were_data = dirty.iter().filter(|&&p| p % 3 != 0).count() as u64;
                    assert!(s.cache.hits <= were_data, "{:?}", s.cache);
                    assert!(s.cache.hits * 10 > were_data * 8, "{:?}", s.cache);
                }
                sender_stats.add(&s);
                receiver_stats.add(&r);
            }
        },
    )
    .unwrap();
    assert!(dest == *guest.0.read().unwrap());
    assert_eq!(sender.total_stats(), &sender_stats);
    // Zero pages (every third page in round 0) and deltas were counted on
    // both sides alike.
    let zero = sender_stats.by_encoding.zero.pages;
    assert_eq!(zero, PAGES.div_ceil(3));
    assert_eq!(receiver_stats.by_encoding.zero.pages, zero);
    let deltas = sender_stats.by_encoding.xbzrle.pages + sender_stats.by_encoding.xbzrle_lz4.pages;
    assert!(deltas > 0);
    assert_eq!(
        receiver_stats.by_encoding.xbzrle.pages + receiver_stats.by_encoding.xbzrle_lz4.pages,
        deltas
    );
    assert!(sender_stats.compression_ratio() > 1.0);
    assert_eq!(sender_stats.workers.len(), 2);
    assert_eq!(
        sender_stats.workers.iter().map(|w| w.pages).sum::<u64>(),
        sender_stats.pages()
    );
}

#[test]
fn stats_serialize_to_json_and_back() {
    let mut sender = Sender::new(config(1)).unwrap();
    sender.push(1, &vec![7u8; PAGE_SIZE]).unwrap();
    sender.push(2, &vec![0u8; PAGE_SIZE]).unwrap();
    let stats = sender.end_round().unwrap();
    let json = serde_json::to_string(&stats).unwrap();
    assert!(
        json.contains("\"zero\"") && json.contains("\"lz4\"") && json.contains("\"hits\""),
        "{json}"
    );
    let back: PipelineStats = serde_json::from_str(&json).unwrap();
    assert_eq!(back, stats);
    assert_eq!(stats.by_encoding.zero.pages, 1);
    assert_eq!(stats.by_encoding.lz4.pages, 1);
    assert_eq!(stats.cache.misses, 1);
    assert_eq!(stats.rounds, 1);
    // One page in TIMED_EVERY is timed: in packet 0, the first page (lz4)
    // is, the second (zero) is not.
    assert!(stats.by_encoding.lz4.nanos > 0);
    assert_eq!(
        stats.by_encoding.lz4.nanos % vmstream_codec::stats::TIMED_EVERY,
        0
    );
    assert_eq!(stats.by_encoding.zero.nanos, 0);
}

#[test]
fn bad_configuration_and_pushes_are_refused() {
    let mut bad_level = config(1);
    bad_level.encoder.compression = Compression::Zlib { level: 12 };
    let mut bad_delta = config(1);
    bad_delta.encoder.delta.as_mut().unwrap().max_delta = PAGE_SIZE;
    let mut no_cache = config(1);
    no_cache.encoder.delta.as_mut().unwrap().cache_bytes = 0;
    for bad in [
        SenderConfig {
            workers: 0,
            ..config(1)
        },
        SenderConfig {
            batch_pages: 0,
            ..config(1)
        },
        SenderConfig {
            batch_pages: 100_000,
            ..config(1)
        },
        bad_level,
        bad_delta,
        no_cache,
    ] {
        // `validate` refuses what `Sender::new` refuses, without starting workers.
        assert!(
            matches!(bad.validate(), Err(CodecError::Config(_))),
            "{bad:?}"
        );
        assert!(matches!(Sender::new(bad), Err(CodecError::Config(_))));
    }
    assert!(config(2).validate().is_ok());

    let mut s = Sender::new(config(2)).unwrap();
    assert_eq!(
        s.push(PAGES, &vec![0; PAGE_SIZE]),
        Err(CodecError::PageOutOfRange {
            page: PAGES,
            guest_pages: PAGES
        })
    );
    assert_eq!(
        s.push(0, &[0; 100]),
        Err(CodecError::SnapshotLength {
            len: 100,
            expected: PAGE_SIZE
        })
    );
    assert!(matches!(s.push_page(0), Err(CodecError::Config(_))));

    let mut odd = vec![0u8; PAGE_SIZE + 1];
    assert!(matches!(
        receive(&ReceiverConfig::default(), &mut odd, |_| ()),
        Err(CodecError::Config(_))
    ));
    let mut mem = vec![0u8; PAGE_SIZE];
    let r = receive(
        &ReceiverConfig {
            workers: 1,
            ..Default::default()
        },
        &mut mem,
        |rx| rx.end_round(5),
    );
    assert_eq!(
        r.unwrap(),
        Err(CodecError::RoundMismatch {
            expected: 0,
            got: 5
        })
    );
}

#[test]
fn worker_panic_fails_the_round_without_hanging() {
    use vmstream_codec::receiver::HookPoint;
    // Worker 1 panics on its first packet; everything else is fine.
    let hook = Arc::new(|point: HookPoint, worker: usize, _seq: u64| {
        if point == HookPoint::BeforeApply && worker == 1 {
            panic!("injected worker failure");
        }
        std::time::Duration::ZERO
    });
    let rconfig = ReceiverConfig {
        workers: 2,
        queue_depth: 1,
        page_observer: None,
        zeroed_memory: false,
        memory_file: None,
        test_hook: Some(hook),
    };
    let mut sender = Sender::new(config(2)).unwrap();
    for p in 0..PAGES {
        sender.push(p, &vec![p as u8; PAGE_SIZE]).unwrap();
    }
    sender.end_round().unwrap();
    let mut dest = vec![0u8; PAGES as usize * PAGE_SIZE];
    let result = receive(&rconfig, &mut dest, |rx| {
        let mut first_error: Option<CodecError> = None;
        while let Some(p) = sender.poll() {
            // Submitting may already fail once the worker is gone.
            if let Err(e) = rx.submit(p.into_vec()) {
                first_error.get_or_insert(e);
            }
        }
        let e = rx.end_round(0).unwrap_err();
        assert!(
            matches!(
                e,
                CodecError::WorkerPanicked {
                    side: "receiver",
                    ..
                }
            ),
            "{e}"
        );
        if let Some(f) = first_error {
            assert!(matches!(f, CodecError::WorkerPanicked { .. }), "{f}");
        }
    });
    // The scope reports the panic too.
    assert!(
        matches!(
            result,
            Err(CodecError::WorkerPanicked {
                side: "receiver",
                worker: 1
            })
        ),
        "{result:?}"
    );
}

#[test]
fn cache_outcomes_are_counted() {
    let mut c = config(1);
    c.encoder.delta = Some(DeltaConfig {
        cache_bytes: 64 * PAGE_SIZE,
        max_delta: 512,
        mode: DeltaMode::Xbzrle,
        ..DeltaConfig::default()
    });
    let mut sender = Sender::new(c).unwrap();
    let text =
        |seed: u8| -> Vec<u8> { (0..PAGE_SIZE).map(|i| b"abcdefgh"[i % 8] ^ seed).collect() };
    let noise = |seed: u64| -> Vec<u8> {
        let mut x = seed | 1;
        (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    // Round 0: three pages, all misses.
    for p in 0..3 {
        sender.push(p, &text(p as u8)).unwrap();
    }
    let s = sender.end_round().unwrap();
    assert_eq!(
        (
            s.cache.misses,
            s.cache.hits,
            s.cache.overflows,
            s.cache.unchanged
        ),
        (3, 0, 0, 0)
    );
    // Round 1: page 0 unchanged, page 1 small edit (hit), page 2 rewritten
    // with noise (overflow: the delta exceeds 512 bytes).
    sender.push(0, &text(0)).unwrap();
    let mut edited = text(1);
    edited[100] ^= 0xff;
    sender.push(1, &edited).unwrap();
    sender.push(2, &noise(7)).unwrap();
    let s = sender.end_round().unwrap();
    assert_eq!(
        (
            s.cache.misses,
            s.cache.hits,
            s.cache.overflows,
            s.cache.unchanged
        ),
        (0, 1, 1, 1)
    );
    assert_eq!(s.by_encoding.xbzrle.pages, 1);
    assert_eq!(s.by_encoding.raw.pages, 1, "noise does not compress");
    assert_eq!(s.pages(), 2, "the unchanged page sends nothing");
}

/// The page observer sees every applied page with its final content: a copy
/// built only from observer calls equals destination memory after the last
/// barrier, over rounds that rewrite pages with delta, zero and lz4 records.
#[test]
fn page_observer_sees_every_page_as_applied() {
    observer_run(false);
}

/// The same over zeroed destination memory with `zeroed_memory`: zero records for pages
/// never written are skipped, and the result (and what the observer saw) is the same.
#[test]
fn zeroed_memory_skips_untouched_zero_pages_and_stays_exact() {
    observer_run(true);
}

fn observer_run(zeroed: bool) {
    use std::sync::Mutex;
    let seen = Arc::new(Mutex::new(vec![0x33u8; PAGES as usize * PAGE_SIZE]));
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let observer = {
        let seen = Arc::clone(&seen);
        let calls = Arc::clone(&calls);
        Arc::new(move |page: u64, bytes: &[u8]| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            seen.lock().unwrap()[page as usize * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(bytes);
        })
    };
    let mut memory = vec![0u8; PAGES as usize * PAGE_SIZE];
    let mut sender = Sender::new(config(2)).unwrap();
    let mut dest = vec![if zeroed { 0 } else { 0xffu8 }; PAGES as usize * PAGE_SIZE];
    let mut expected_calls = 0;
    receive(
        &ReceiverConfig {
            workers: 2,
            page_observer: Some(observer),
            zeroed_memory: zeroed,
            ..Default::default()
        },
        &mut dest,
        |rx| {
            for round in 0..5u64 {
                let dirty: Vec<u64> = if round == 0 {
                    (0..PAGES).collect()
                } else {
                    (0..PAGES).filter(|p| p % 4 == round % 4).collect()
                };
                for &p in &dirty {
                    let page = &mut memory[p as usize * PAGE_SIZE..][..PAGE_SIZE];
                    match (p + round) % 3 {
                        0 => page.fill(0),
                        1 => page[(round as usize * 131) % PAGE_SIZE] ^= 0xa5,
                        _ => page
                            .iter_mut()
                            .enumerate()
                            .for_each(|(j, b)| *b = (j / 8) as u8 ^ round as u8),
                    }
                    sender.push(p, page).unwrap();
                    drain(&mut sender, rx);
                }
                expected_calls += dirty.len() as u64;
                sender.end_round().unwrap();
                drain(&mut sender, rx);
                rx.end_round(round).unwrap();
            }
        },
    )
    .unwrap();
    assert_eq!(dest, memory);
    assert!(*seen.lock().unwrap() == dest, "observer copy differs");
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::Relaxed),
        expected_calls
    );
}
