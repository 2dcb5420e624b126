//! Dirty trackers against a real guest process: they must report exactly the pages the
//! guest wrote, no more, none missing.

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::{Guest, TmpFile};
use vmstream::guest::file::layout::Geometry;
use vmstream::guest::file::throttle::Throttle;
use vmstream::memory::{GuestMemory, MapMode, PAGE_SIZE};
use vmstream::track::{DirtyTracker, HashTracker, UffdWpTracker};

/// Pages a filling transaction on each of `blocks` writes: the superblock (journal and
/// counter), the ledger page of each block, and the block's page.
fn expected_pages(g: &Geometry, blocks: &[u64]) -> Vec<u64> {
    let mut set = BTreeSet::from([0u64]);
    for &b in blocks {
        set.insert(g.ledger_entry(b) as u64 / PAGE_SIZE as u64);
        set.extend(g.block_pages(b));
    }
    set.into_iter().collect()
}

/// Commit a `tx B` on each block through the guest's control channel.
fn write_blocks(g: &mut Guest, blocks: &[u64]) {
    for &b in blocks {
        let reply = g.command(&format!("tx {b}"));
        assert!(reply.starts_with("ok tx="), "{reply}");
    }
}

fn scattered_blocks(count: u64, n: u64) -> Vec<u64> {
    (0..n)
        .map(|i| (i * 7919) % count)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn uffd_tracker_is_exact(memory_args: &[&str], vec_len: usize) {
    let mut args = vec![
        "--size",
        "8M",
        "--workload",
        "idle",
        "--init",
        "--control-stdin",
    ];
    args.extend_from_slice(memory_args);
    let mut guest = Guest::spawn(&args);
    let r = guest.ready.clone();
    let geo = Geometry::new(r.len, 4096).unwrap();
    let mut t = UffdWpTracker::with_vec_len(r.pid, r.addr, r.len, vec_len).unwrap();
    assert_eq!(t.pages(), r.len / 4096);
    assert_eq!(
        t.collect().unwrap(),
        Vec::<u64>::new(),
        "idle guest wrote nothing yet"
    );

    let first = [3u64, 17, 100];
    write_blocks(&mut guest, &first);
    assert_eq!(t.collect().unwrap(), expected_pages(&geo, &first));
    assert_eq!(
        t.collect().unwrap(),
        Vec::<u64>::new(),
        "collect re-protects"
    );

    // Many scattered pages (spread over several ledger pages) with a small output vector.
    let many = scattered_blocks(geo.block_count, 700);
    write_blocks(&mut guest, &many);
    assert_eq!(t.collect().unwrap(), expected_pages(&geo, &many));

    // A stopped guest can be scanned; writes after SIGCONT show up.
    let throttle = Throttle::new(r.pid).unwrap();
    throttle.pause().unwrap();
    assert_eq!(t.collect().unwrap(), Vec::<u64>::new());
    throttle.resume().unwrap();
    write_blocks(&mut guest, &[1]);
    assert_eq!(t.collect().unwrap(), expected_pages(&geo, &[1]));
}

#[test]
fn uffd_wp_reports_exactly_the_written_pages_of_a_file_guest() {
    let mem = TmpFile::new("uffd-file");
    uffd_tracker_is_exact(&["--memory-file", mem.str()], 1024);
}

#[test]
fn uffd_wp_handles_a_full_output_vector() {
    let mem = TmpFile::new("uffd-vec");
    uffd_tracker_is_exact(&["--memory-file", mem.str()], 3);
}

#[test]
fn uffd_wp_works_on_a_memfd_guest() {
    uffd_tracker_is_exact(&["--memfd"], 16);
}

#[test]
fn uffd_wp_tracks_a_running_workload_without_missing_pages() {
    // A hotset guest rewrites blocks 0..hot; every page it changed between two collects
    // must be reported (compare against a shadow copy), and nothing outside its pages.
    let mem = TmpFile::new("uffd-hot");
    let guest = Guest::spawn(&[
        "--memory-file",
        mem.str(),
        "--size",
        "4M",
        "--workload",
        "hotset",
        "--hot-set",
        "256K",
        "--init",
        "--rate",
        "20000",
    ]);
    let r = guest.ready.clone();
    let view = GuestMemory::open(&mem.0, MapMode::SharedReadOnly).unwrap();
    let mut t = UffdWpTracker::new(r.pid, r.addr, r.len).unwrap();
    let throttle = Throttle::new(r.pid).unwrap();
    let mut shadow = vec![0u8; r.len as usize];
    throttle.pause().unwrap();
    t.collect().unwrap();
    view.read_at(0, &mut shadow);
    throttle.resume().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    throttle.pause().unwrap();
    let dirty: BTreeSet<u64> = t.collect().unwrap().into_iter().collect();
    let mut now = vec![0u8; r.len as usize];
    view.read_at(0, &mut now);
    let changed: BTreeSet<u64> = (0..r.len / 4096)
        .filter(|&p| {
            let o = p as usize * 4096;
            shadow[o..o + 4096] != now[o..o + 4096]
        })
        .collect();
    assert!(!changed.is_empty(), "guest made progress");
    assert!(
        changed.is_subset(&dirty),
        "missed pages: {:?}",
        changed.difference(&dirty)
    );
    let geo = Geometry::new(r.len, 4096).unwrap();
    let hot_pages: BTreeSet<u64> = (0..64).flat_map(|b| geo.block_pages(b)).collect();
    for p in &dirty {
        assert!(
            *p <= 1 || hot_pages.contains(p),
            "page {p} is outside the hot set"
        );
    }
    drop(throttle);
    drop(guest);
}

#[test]
fn hash_tracker_sees_another_process_and_pwrite() {
    let mem = TmpFile::new("hash");
    let mut guest = Guest::spawn(&[
        "--memory-file",
        mem.str(),
        "--size",
        "8M",
        "--workload",
        "idle",
        "--init",
        "--control-stdin",
        "--no-track",
    ]);
    let geo = Geometry::new(guest.ready.len, 4096).unwrap();
    let mut t = HashTracker::open(&mem.0).unwrap();
    assert_eq!(t.collect().unwrap(), Vec::<u64>::new());
    let blocks = scattered_blocks(geo.block_count, 300);
    write_blocks(&mut guest, &blocks);
    assert_eq!(t.collect().unwrap(), expected_pages(&geo, &blocks));
    assert_eq!(t.collect().unwrap(), Vec::<u64>::new());

    // A writer that does not go through any mapping.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&mem.0)
        .unwrap();
    f.write_at(b"x", 2000 * 4096 + 9).unwrap();
    assert_eq!(t.collect().unwrap(), vec![2000]);
}
