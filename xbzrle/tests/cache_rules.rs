//! The sender's cache consistency rules: after every send path, a cached
//! page equals what the destination holds.

use std::collections::HashMap;

use quickcheck::{Arbitrary, Gen, QuickCheck};
use vmstream_xbzrle::{decode, DeltaEncoder, InsertOutcome, Layout, PageCache, PageOutcome};

const PAGE: usize = 4096;

fn encoder(capacity_pages: usize, layout: Layout) -> DeltaEncoder {
    DeltaEncoder::new(PageCache::with_layout(capacity_pages * PAGE, PAGE, layout).unwrap())
}

/// A page of text-like bytes that varies with `seed`.
fn page(seed: u32) -> Vec<u8> {
    (0..PAGE as u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed.wrapping_mul(7)) % 251) as u8)
        .collect()
}

fn with_changes(base: &[u8], at: &[usize]) -> Vec<u8> {
    let mut p = base.to_vec();
    for &i in at {
        p[i] ^= 0x5a;
    }
    p
}

#[test]
fn miss_inserts_the_snapshot() {
    let mut enc = encoder(16, Layout::default());
    let mut out = vec![0u8; PAGE];
    let p = page(1);
    assert_eq!(enc.encode_page(9, &p, &mut out), PageOutcome::Miss);
    assert_eq!(enc.cache().peek(9), Some(&p[..]));
    let s = enc.stats();
    assert_eq!(
        (s.pages, s.misses, s.cache.misses, s.cache.inserts),
        (1, 1, 1, 1)
    );
}

#[test]
fn identical_page_leaves_the_entry_alone() {
    let mut enc = encoder(16, Layout::default());
    let mut out = vec![0xeeu8; PAGE];
    let p = page(2);
    enc.encode_page(3, &p, &mut out);
    assert_eq!(enc.encode_page(3, &p, &mut out), PageOutcome::Unchanged);
    assert_eq!(enc.cache().peek(3), Some(&p[..]));
    let s = enc.stats();
    assert_eq!(
        (s.unchanged, s.delta_pages, s.delta_bytes, s.cache.hits),
        (1, 0, 0, 1)
    );
    assert_eq!(s.cache.updates, 0);
}

#[test]
fn delta_updates_the_entry_and_decodes_to_the_snapshot() {
    let mut enc = encoder(16, Layout::default());
    let mut out = vec![0u8; PAGE];
    let old = page(3);
    let new = with_changes(&old, &[0, 1, 2, 100, 4095]);
    enc.encode_page(5, &old, &mut out);
    let PageOutcome::Delta(n) = enc.encode_page(5, &new, &mut out) else {
        panic!("expected a delta");
    };
    let mut dest = old.clone();
    assert_eq!(decode(&out[..n], &mut dest).unwrap(), PAGE);
    assert_eq!(dest, new);
    assert_eq!(enc.cache().peek(5), Some(&new[..]));
    let s = enc.stats();
    assert_eq!((s.delta_pages, s.delta_bytes), (1, n as u64));
    assert!(s.encoding_rate() > 1.0);
    assert_eq!(
        s.encode_time,
        std::time::Duration::ZERO,
        "timing is off by default"
    );
}

#[test]
fn entry_follows_the_encoded_snapshot_not_later_writes() {
    let mut enc = encoder(16, Layout::default());
    let mut out = vec![0u8; PAGE];
    let mut guest = page(4);
    enc.encode_page(1, &guest, &mut out);
    let sent = with_changes(&guest, &[10, 11]);
    guest.copy_from_slice(&sent);
    assert!(matches!(
        enc.encode_page(1, &guest, &mut out),
        PageOutcome::Delta(_)
    ));
    // The guest writes again after the page was encoded.
    guest[2000] ^= 0xff;
    assert_eq!(enc.cache().peek(1), Some(&sent[..]));
    // The next delta is against what was sent, so the destination (which
    // holds `sent`) reconstructs the new contents.
    let PageOutcome::Delta(n) = enc.encode_page(1, &guest, &mut out) else {
        panic!("expected a delta");
    };
    let mut dest = sent.clone();
    decode(&out[..n], &mut dest).unwrap();
    assert_eq!(dest, guest);
}

#[test]
fn encode_guest_page_returns_the_snapshot_it_encoded() {
    let mut enc = encoder(16, Layout::default());
    let mut out = vec![0u8; PAGE];
    let mut guest = page(5);
    let (outcome, snapshot) = enc.encode_guest_page(8, &guest, &mut out);
    assert_eq!(outcome, PageOutcome::Miss);
    assert_eq!(snapshot, &guest[..]);
    let sent = guest.clone();
    guest[7] ^= 1; // later write, not seen by the cache
    assert_eq!(enc.cache().peek(8), Some(&sent[..]));
    let (outcome, _) = enc.encode_guest_page(8, &guest, &mut out);
    let PageOutcome::Delta(n) = outcome else {
        panic!("expected a delta, got {outcome:?}");
    };
    assert_eq!(&out[..n], &[7, 1, guest[7]]);
}

#[test]
fn overflow_updates_the_entry() {
    let mut enc = encoder(16, Layout::default());
    let old = page(6);
    let new = page(7); // differs almost everywhere
    let mut out = vec![0u8; 64]; // a small budget
    enc.encode_page(2, &old, &mut out);
    assert_eq!(enc.encode_page(2, &new, &mut out), PageOutcome::Overflow);
    assert_eq!(enc.cache().peek(2), Some(&new[..]));
    assert_eq!(enc.encode_page(2, &new, &mut out), PageOutcome::Unchanged);
    assert_eq!(enc.stats().overflows, 1);
}

#[test]
fn zero_page_updates_or_inserts_zeros() {
    let mut enc = encoder(16, Layout::default());
    let mut out = vec![0u8; PAGE];
    enc.encode_page(4, &page(8), &mut out);
    enc.note_zero_page(4);
    assert_eq!(enc.cache().peek(4), Some(&[0u8; PAGE][..]));
    enc.note_zero_page(40);
    assert_eq!(enc.cache().peek(40), Some(&[0u8; PAGE][..]));
    // The next delta is against zeros.
    let p = with_changes(&[0u8; PAGE], &[5]);
    let PageOutcome::Delta(n) = enc.encode_page(4, &p, &mut out) else {
        panic!("expected a delta");
    };
    assert_eq!(&out[..n], &[5, 1, 0x5a]);
    assert_eq!(enc.stats().zero_pages, 2);
}

#[test]
fn full_page_sent_elsewhere_updates_or_inserts() {
    let mut enc = encoder(16, Layout::default());
    let mut out = vec![0u8; PAGE];
    enc.encode_page(6, &page(9), &mut out);
    enc.note_full_page(6, &page(10));
    assert_eq!(enc.cache().peek(6), Some(&page(10)[..]));
    enc.note_full_page(60, &page(11));
    assert_eq!(enc.cache().peek(60), Some(&page(11)[..]));
    assert_eq!(enc.stats().full_pages, 2);
}

#[test]
fn protected_slot_refuses_a_missed_page() {
    // One direct-mapped slot: page 0 holds it through generations 0 and 1.
    let mut enc = encoder(1, Layout::DirectMapped);
    let mut out = vec![0u8; PAGE];
    enc.encode_page(0, &page(12), &mut out);
    enc.set_generation(1);
    assert_eq!(enc.encode_page(1, &page(13), &mut out), PageOutcome::Miss);
    enc.note_zero_page(2);
    enc.note_full_page(3, &page(14));
    assert!(!enc.cache().contains(1) && !enc.cache().contains(2) && !enc.cache().contains(3));
    assert_eq!(enc.cache().peek(0), Some(&page(12)[..]));
    assert_eq!(enc.stats().cache.refused, 3);
    enc.set_generation(2);
    assert_eq!(enc.encode_page(1, &page(13), &mut out), PageOutcome::Miss);
    assert_eq!(enc.cache().peek(1), Some(&page(13)[..]));
    assert_eq!(enc.stats().cache.evictions, 1);
    let mut cache = enc.into_cache();
    assert_eq!(cache.insert(0, &page(12)), InsertOutcome::Refused);
}

#[derive(Clone, Debug)]
enum Send {
    /// Encode the page with a few bytes changed, under a delta budget.
    Dirty {
        page: u64,
        changes: Vec<u16>,
        budget: u16,
    },
    Zero {
        page: u64,
    },
    Full {
        page: u64,
        seed: u32,
    },
    NextGeneration,
}

impl Arbitrary for Send {
    fn arbitrary(g: &mut Gen) -> Send {
        let page = u64::from(u8::arbitrary(g) % 12);
        match u8::arbitrary(g) % 8 {
            0..=4 => Send::Dirty {
                page,
                changes: Vec::<u16>::arbitrary(g),
                budget: u16::arbitrary(g) % 600,
            },
            5 => Send::Zero { page },
            6 => Send::Full {
                page,
                seed: u32::arbitrary(g),
            },
            _ => Send::NextGeneration,
        }
    }
}

/// Replays random sends to a destination and checks that every cached page
/// equals the destination's copy, and that every delta decodes to the page.
fn cache_tracks_destination(layout_pick: u8, capacity: u8, sends: Vec<Send>) -> Result<(), String> {
    let layout = match layout_pick % 3 {
        0 => Layout::DirectMapped,
        1 => Layout::SetAssociative { ways: 2 },
        _ => Layout::SetAssociative { ways: 4 },
    };
    let mut enc = encoder(1 + usize::from(capacity % 8), layout);
    enc.set_compact(layout_pick & 0x80 != 0);
    let mut guest: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut dest: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut generation = 0;
    for (step, send) in sends.into_iter().enumerate() {
        match send {
            Send::Dirty {
                page,
                changes,
                budget,
            } => {
                let current = guest.entry(page).or_insert_with(|| vec![0; PAGE]);
                for c in changes {
                    current[usize::from(c) % PAGE] = (c >> 8) as u8 ^ 0xa5;
                }
                let snapshot = current.clone();
                let mut out = vec![0u8; usize::from(budget)];
                match enc.encode_page(page, &snapshot, &mut out) {
                    PageOutcome::Unchanged => {
                        if dest.get(&page) != Some(&snapshot) {
                            return Err(format!("step {step}: unchanged but destination differs"));
                        }
                    }
                    PageOutcome::Delta(n) => {
                        let Some(target) = dest.get_mut(&page) else {
                            return Err(format!("step {step}: delta for a page never sent"));
                        };
                        decode(&out[..n], target).map_err(|e| format!("step {step}: {e}"))?;
                        if *target != snapshot {
                            return Err(format!("step {step}: delta decodes to other bytes"));
                        }
                    }
                    PageOutcome::Overflow | PageOutcome::Miss => {
                        dest.insert(page, snapshot);
                    }
                }
            }
            Send::Zero { page } => {
                guest.insert(page, vec![0; PAGE]);
                dest.insert(page, vec![0; PAGE]);
                enc.note_zero_page(page);
            }
            Send::Full { page, seed } => {
                guest.insert(page, self::page(seed));
                dest.insert(page, self::page(seed));
                enc.note_full_page(page, &self::page(seed));
            }
            Send::NextGeneration => {
                generation += 1;
                enc.set_generation(generation);
            }
        }
        for p in 0..12 {
            if let Some(cached) = enc.cache().peek(p) {
                if dest.get(&p).map(Vec::as_slice) != Some(cached) {
                    return Err(format!(
                        "step {step}: cached page {p} differs from destination"
                    ));
                }
            }
        }
        if enc.cache().len() > enc.cache().capacity_pages() {
            return Err(format!("step {step}: capacity exceeded"));
        }
    }
    Ok(())
}

#[test]
fn cache_always_equals_destination() {
    QuickCheck::new()
        .tests(1000)
        .quickcheck(cache_tracks_destination as fn(u8, u8, Vec<Send>) -> Result<(), String>);
}
