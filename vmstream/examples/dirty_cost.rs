//! Measures the cost of one dirty-tracking round on a 1 GiB tmpfs guest memory file:
//! the hash tracker (1 and N threads, xxh3-64 per 4 KiB page) and the uffd-wp tracker
//! (PAGEMAP_SCAN) with few and with all pages written.
//!
//! `cargo run --release -p vmstream --example dirty_cost [SIZE]`

use std::time::Instant;

use vmstream::memory::{GuestMemory, PAGE_SIZE};
use vmstream::track::uffd::WpAsync;
use vmstream::track::{DirtyTracker, HashTracker, UffdWpTracker};

fn main() {
    let size = std::env::args()
        .nth(1)
        .map(|s| vmstream::units::parse_size(&s).expect("size"))
        .unwrap_or(1 << 30);
    let path = std::path::PathBuf::from(format!(
        "/dev/shm/vmstream-dirty-cost-{}",
        std::process::id()
    ));
    let _cleanup = RemoveOnDrop(path.clone());
    let mut mem = GuestMemory::create(&path, size).expect("create");
    // Non-trivial contents so hashing reads real data.
    for (i, chunk) in mem.as_mut_slice().chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    }
    let gib = size as f64 / (1u64 << 30) as f64;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for threads in [1, cores] {
        let mut t = HashTracker::open(&path).expect("open");
        t.set_threads(threads);
        let mut best = f64::MAX;
        for _ in 0..3 {
            let s = Instant::now();
            let d = t.collect().unwrap();
            best = best.min(s.elapsed().as_secs_f64());
            assert!(d.is_empty());
        }
        println!(
            "hash xxh3-64, {threads} thread(s): {:.1} ms per round for {:.2} GiB = {:.2} GB/s",
            best * 1e3,
            gib,
            size as f64 / best / 1e9
        );
    }
    // SAFETY: the range is `mem`'s mapping, which outlives `wp`.
    let wp = unsafe { WpAsync::arm(mem.addr(), size) }.expect("arm");
    let mut t = UffdWpTracker::new(std::process::id(), mem.addr(), size).expect("tracker");
    t.collect().unwrap();
    let pages = size as usize / PAGE_SIZE;
    for (label, step) in [
        ("0 pages written", 0usize),
        ("1% written", 100),
        ("all written", 1),
    ] {
        if step > 0 {
            let m = mem.as_mut_slice();
            for p in (0..pages).step_by(step) {
                m[p * PAGE_SIZE] ^= 1;
            }
        }
        let s = Instant::now();
        let d = t.collect().unwrap();
        let dt = s.elapsed().as_secs_f64();
        println!(
            "uffd-wp PAGEMAP_SCAN, {label}: {} pages reported in {:.2} ms",
            d.len(),
            dt * 1e3
        );
    }
    drop(wp);
}

/// Removes the 1 GiB file even when printing fails (e.g. piped into `head`).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
