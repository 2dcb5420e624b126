//! Tests of the dirty bitmap against a `Vec<bool>` model.

use super::*;
use quickcheck::{QuickCheck, TestResult};

/// Disk sizes in granules that put edges at every level: one word, one L1 word (4096
/// granules), one L2 word (262144 granules) and just past each.
const SIZES: [u64; 8] = [1, 63, 64, 65, 4095, 4097, 262_144, 300_001];

struct Model {
    bits: Vec<bool>,
}

impl Model {
    fn extents(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (g, &d) in self.bits.iter().enumerate() {
            let g = g as u64;
            if d {
                match out.last_mut() {
                    Some(l) if l.end == g => l.end += 1,
                    _ => out.push(g..g + 1),
                }
            }
        }
        out
    }

    fn next_extent(&self, from: u64) -> Option<Range<u64>> {
        let start = (from..self.bits.len() as u64).find(|&g| self.bits[g as usize])?;
        let end = (start..self.bits.len() as u64)
            .find(|&g| !self.bits[g as usize])
            .unwrap_or(self.bits.len() as u64);
        Some(start..end)
    }
}

/// Scales a random u32 into `0..n` (so ranges land anywhere on large disks).
fn scale(x: u32, n: u64) -> u64 {
    (x as u64 * n) >> 32
}

fn bitmap(granules: u64) -> DirtyBitmap {
    DirtyBitmap::in_memory(granules * 4096, 4096).unwrap()
}

/// Marks random ranges (short ones, some long), then checks every query against the model.
fn prop_mark_and_find(size: u8, marks: Vec<(u32, u16)>, probes: Vec<u32>) -> TestResult {
    let n = SIZES[size as usize % SIZES.len()];
    let b = bitmap(n);
    let mut m = Model {
        bits: vec![false; n as usize],
    };
    for &(at, len) in &marks {
        let start = scale(at, n);
        let end = (start + len as u64 % 300).min(n);
        b.mark(start..end);
        m.bits[start as usize..end as usize].fill(true);
    }
    for &p in &probes {
        let from = scale(p, n + 1);
        if b.next_dirty_extent(from) != m.next_extent(from) {
            return TestResult::error(format!("next_dirty_extent({from}) on {n}"));
        }
    }
    // Walking extent by extent gives the model's extents, and so does take_all.
    let mut walk = Vec::new();
    let mut from = 0;
    while let Some(r) = b.next_dirty_extent(from) {
        from = r.end;
        walk.push(r);
    }
    if walk != m.extents() || b.dirty_count() != m.bits.iter().filter(|&&d| d).count() as u64 {
        return TestResult::error("walk or count differs");
    }
    TestResult::from_bool(b.take_all() == m.extents() && b.next_dirty_extent(0).is_none())
}

/// Interleaves marks, clears and take_extent; the bitmap always answers like the model.
fn prop_clear_and_take(size: u8, ops: Vec<(u8, u32, u16)>) -> TestResult {
    let n = SIZES[size as usize % SIZES.len()];
    let b = bitmap(n);
    let mut m = Model {
        bits: vec![false; n as usize],
    };
    for &(op, at, len) in &ops {
        let start = scale(at, n);
        let end = (start + len as u64 % 200).min(n);
        match op % 3 {
            0 => {
                b.mark(start..end);
                m.bits[start as usize..end as usize].fill(true);
            }
            1 => {
                b.clear(start..end);
                m.bits[start as usize..end as usize].fill(false);
            }
            _ => {
                let want = m.next_extent(start);
                if let Some(r) = &want {
                    m.bits[r.start as usize..r.end as usize].fill(false);
                }
                if b.take_extent(start) != want {
                    return TestResult::error(format!("take_extent({start}) on {n}"));
                }
            }
        }
    }
    TestResult::from_bool(b.take_all() == m.extents())
}

#[test]
fn next_dirty_extent_and_take_all_match_the_model() {
    QuickCheck::new()
        .tests(300)
        .quickcheck(prop_mark_and_find as fn(u8, Vec<(u32, u16)>, Vec<u32>) -> TestResult);
}

#[test]
fn clear_and_take_extent_match_the_model() {
    QuickCheck::new()
        .tests(300)
        .quickcheck(prop_clear_and_take as fn(u8, Vec<(u8, u32, u16)>) -> TestResult);
}

#[test]
fn extents_merge_across_words_and_stop_at_the_disk_end() {
    let b = bitmap(300);
    b.mark(60..200);
    b.mark(250..400);
    assert_eq!(b.next_dirty_extent(0), Some(60..200));
    assert_eq!(b.next_dirty_extent(100), Some(100..200));
    assert_eq!(b.next_dirty_extent(200), Some(250..300));
    assert_eq!(b.take_all(), vec![60..200, 250..300]);
}

#[test]
fn granules_of_covers_every_byte_written() {
    let b = DirtyBitmap::in_memory((1 << 20) + 100, 64 << 10).unwrap();
    assert_eq!(b.granules(), 17);
    assert_eq!(b.granules_of(0, 1), 0..1);
    assert_eq!(b.granules_of(65535, 2), 0..2);
    assert_eq!(b.granules_of(64 << 10, 64 << 10), 1..2);
    assert_eq!(b.granules_of(1 << 20, 100), 16..17);
    assert_eq!(b.granules_of(5, 0), 0..0);
    assert_eq!(b.bytes_of(&(16..17)), (1 << 20)..(1 << 20) + 100);
}

#[test]
fn bad_geometry_is_refused() {
    for g in [0, 2048, 3 << 12, 2 << 20] {
        assert!(matches!(
            DirtyBitmap::in_memory(1 << 20, g),
            Err(BitmapError::Granularity(x)) if x == g
        ));
    }
    assert!(matches!(
        DirtyBitmap::in_memory(0, 4096),
        Err(BitmapError::DiskSize(0))
    ));
}

/// A writer thread marks granules while the reader takes rounds: every mark is collected
/// exactly by some round or left for the last one (none lost).
#[test]
fn concurrent_marks_are_never_lost() {
    let n = 300_001u64;
    let b = std::sync::Arc::new(bitmap(n));
    let writer = {
        let b = b.clone();
        std::thread::spawn(move || {
            let mut s = 7u64;
            let mut marked = vec![false; n as usize];
            for _ in 0..200_000 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let g = (s >> 20) % n;
                b.mark(g..(g + 1 + (s >> 60)).min(n));
                marked[g as usize..(g + 1 + (s >> 60)).min(n) as usize].fill(true);
            }
            marked
        })
    };
    let mut seen = vec![false; n as usize];
    let mut rounds = 0;
    while !writer.is_finished() || rounds == 0 {
        for r in b.take_all() {
            seen[r.start as usize..r.end as usize].fill(true);
        }
        let mut from = 0;
        while let Some(r) = b.take_extent(from) {
            seen[r.start as usize..r.end as usize].fill(true);
            from = r.end;
        }
        rounds += 1;
    }
    let marked = writer.join().unwrap();
    for r in b.take_all() {
        seen[r.start as usize..r.end as usize].fill(true);
    }
    // Every granule marked was collected by some round, and nothing else was.
    assert!(seen == marked, "a mark was lost or invented");
    assert_eq!(b.next_dirty_extent(0), None);
    assert_eq!(b.dirty_count(), 0);
}

#[test]
fn a_shared_file_is_seen_by_a_second_mapping() {
    let dir = std::env::temp_dir().join(format!("vmstream-bitmap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.dirty");
    let writer = DirtyBitmap::create(&path, 10 << 20, 64 << 10).unwrap();
    let reader = DirtyBitmap::open(&path).unwrap();
    writer.mark(writer.granules_of(3 << 20, 8192));
    reader.set_write_limit(1234);
    assert_eq!(reader.take_all(), vec![48..49]);
    assert_eq!(writer.write_limit(), 1234);
    assert!(matches!(
        DirtyBitmap::open_or_create(&path, 10 << 20, Some(4096)),
        Err(BitmapError::Mismatch { .. })
    ));
    std::fs::write(dir.join("junk"), vec![1u8; 4096]).unwrap();
    assert!(matches!(
        DirtyBitmap::open(&dir.join("junk")),
        Err(BitmapError::BadHeader { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn in_flight_slots_name_the_writes_in_progress() {
    let b = bitmap(1000);
    let w1 = b.begin_write(10..12);
    let w2 = b.begin_write(0..1);
    assert_eq!(b.in_flight(), vec![10..12, 0..1]);
    drop(w1);
    assert_eq!(b.in_flight(), vec![0..1]);
    drop(w2);
    assert!(b.in_flight().is_empty());
}
