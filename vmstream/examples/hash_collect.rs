//! Measures what the hash tracker's final collect costs at the pause of a `--pid` guest
//! (nothing changed, every page must still be proved unchanged): `HashTracker::collect`
//! against one plain copy of the same data with the same threads (about the bound of any
//! content check) and the `SEEK_DATA` walk alone; for memory files fully written, half
//! written (2 MiB extents) and written every other page (the walk's worst case). Run it on
//! an older commit for the collect before holes were skipped.
//!
//! `cargo run --release -p vmstream --example hash_collect [SIZE...]` (default 512M 1G 2G)

use std::time::Instant;

use vmstream::memory::{page_is_hole, GuestMemory, PAGE_SIZE};
use vmstream::track::{DirtyTracker, HashTracker};

/// How the memory file is written before tracking starts.
#[derive(Clone, Copy)]
enum Layout {
    Full,
    HalfExtents,
    EveryOtherPage,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Full => "full",
            Layout::HalfExtents => "half (2 MiB extents)",
            Layout::EveryOtherPage => "every other page",
        }
    }

    fn written(self, page: usize) -> bool {
        match self {
            Layout::Full => true,
            Layout::HalfExtents => (page / 512).is_multiple_of(2),
            Layout::EveryOtherPage => page.is_multiple_of(2),
        }
    }
}

fn main() {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .map(|s| vmstream::units::parse_size(&s).expect("size"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![512 << 20, 1 << 30, 2 << 30]
    } else {
        sizes
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("{threads} threads; best of 3, ms");
    println!("| size | written | collect | plain copy of the data | SEEK_DATA walk | allocated MiB after |");
    println!("|---|---|---:|---:|---:|---:|");
    for size in sizes {
        for layout in [Layout::Full, Layout::HalfExtents, Layout::EveryOtherPage] {
            measure(size, layout, threads);
        }
    }
}

fn best_of_3(mut f: impl FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::MAX, f64::min)
}

fn measure(size: u64, layout: Layout, threads: usize) {
    let path = std::path::PathBuf::from(format!(
        "/dev/shm/vmstream-hash-collect-{}",
        std::process::id()
    ));
    let _cleanup = RemoveOnDrop(path.clone());
    let mut mem = GuestMemory::create(&path, size).expect("create");
    for (page, bytes) in mem.as_mut_slice().chunks_mut(PAGE_SIZE).enumerate() {
        if layout.written(page) {
            for (i, w) in bytes.chunks_mut(8).enumerate() {
                let v = (page as u64 * 512 + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                w.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    let mut t = HashTracker::open(&path).expect("open");
    t.set_threads(threads);
    let collect = best_of_3(|| assert!(t.collect().unwrap().is_empty()));
    let walk = best_of_3(|| drop(mem.data_pages().unwrap()));
    let data = mem.data_pages().unwrap();
    let read = best_of_3(|| {
        std::hint::black_box(read_all(t.memory(), &data, threads));
    });
    let allocated: u64 = data.iter().map(|w| w.count_ones() as u64).sum();
    println!(
        "| {} MiB | {} | {collect:.1} | {read:.1} | {walk:.2} | {} |",
        size >> 20,
        layout.name(),
        (allocated * PAGE_SIZE as u64) >> 20,
    );
}

/// Pages `0..pages` split in `threads` runs, each given to `f` on its own thread.
fn in_parallel<T: Send>(
    pages: usize,
    threads: usize,
    f: impl Fn(usize, usize) -> T + Sync,
) -> Vec<T> {
    let per = pages.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let f = &f;
                s.spawn(move || f(i * per, ((i + 1) * per).min(pages)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// One read of every data page (`data`: holes skipped), each copied into a buffer that
/// stays in L1 and one word of it folded so the read is not optimised away: about the least
/// any check of the contents costs.
fn read_all(mem: &GuestMemory, data: &[u64], threads: usize) -> u64 {
    in_parallel(mem.pages() as usize, threads, |from, to| {
        let mut buf = vec![0u8; PAGE_SIZE];
        let mut acc = 0u8;
        for page in from..to {
            if !page_is_hole(data, page as u64) {
                mem.read_page(page as u64, &mut buf);
                acc ^= buf[page % PAGE_SIZE];
            }
        }
        acc as u64
    })
    .into_iter()
    .fold(0, |a, b| a ^ b)
}

/// Removes the memory file even when printing fails (e.g. piped into `head`).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
