//! How destination memory is shared between receiver workers without
//! `unsafe`: guest memory is cut into chunks of [`CHUNK_PAGES`] pages and
//! chunk `c` belongs to worker `c % workers`. Each worker holds `&mut`
//! slices of its own chunks only, so two workers can never write the same
//! byte, and all writes to one page happen in one worker in submission
//! order. The sender shards pages with the same function, so with equal
//! worker counts each packet lands on exactly one receiver worker.
#![forbid(unsafe_code)]

use crate::PAGE_SIZE;

/// Pages per ownership chunk (256 KiB).
pub const CHUNK_PAGES: u64 = 64;

/// The worker, out of `workers`, that owns `page`.
#[inline]
pub fn owner(page: u64, workers: usize) -> usize {
    let (chunk, w) = (page / CHUNK_PAGES, workers as u64);
    // Called for every page on both sides: the usual worker counts (powers
    // of two) take a mask instead of a 64-bit division (40 to 90 cycles on
    // Skylake-class cores, a few percent of decoding a page).
    if w.is_power_of_two() {
        (chunk & (w - 1)) as usize
    } else {
        (chunk % w) as usize
    }
}

/// An all-clear bitmap with a bit per page of a `guest_pages`-page guest
/// (bit [`page_bit`]`(page)`).
pub(crate) fn page_bitmap(guest_pages: u64) -> Vec<u64> {
    vec![0; guest_pages.div_ceil(64) as usize]
}

/// Word and bit of `page` in a [`page_bitmap`].
#[inline]
pub(crate) fn page_bit(page: u64) -> (usize, u64) {
    ((page / 64) as usize, 1u64 << (page % 64))
}

/// One worker's share of guest memory.
#[derive(Debug)]
pub struct ShardMemory<'a> {
    chunks: Vec<&'a mut [u8]>,
    workers: u64,
}

impl ShardMemory<'_> {
    /// The bytes of `page`, which must be in range and owned by this shard.
    #[inline]
    pub fn page_mut(&mut self, page: u64) -> &mut [u8] {
        let (local, at) = self.locate(page);
        &mut self.chunks[local][at..at + PAGE_SIZE]
    }

    /// [`page_mut`](Self::page_mut), read-only.
    #[inline]
    pub fn page(&self, page: u64) -> &[u8] {
        let (local, at) = self.locate(page);
        &self.chunks[local][at..at + PAGE_SIZE]
    }

    /// Index of `page`'s chunk in this shard, and the page's offset in it.
    #[inline]
    fn locate(&self, page: u64) -> (usize, usize) {
        let chunk = page / CHUNK_PAGES;
        // As in `owner`: a shift rather than a division when it can.
        let local = if self.workers.is_power_of_two() {
            (chunk >> self.workers.trailing_zeros()) as usize
        } else {
            (chunk / self.workers) as usize
        };
        (local, (page % CHUNK_PAGES) as usize * PAGE_SIZE)
    }
}

/// Splits `memory` (a whole number of pages) into `workers` shards.
pub fn split(memory: &mut [u8], workers: usize) -> Vec<ShardMemory<'_>> {
    let mut shards: Vec<ShardMemory<'_>> = (0..workers)
        .map(|_| ShardMemory {
            chunks: Vec::new(),
            workers: workers as u64,
        })
        .collect();
    for (c, chunk) in memory
        .chunks_mut(CHUNK_PAGES as usize * PAGE_SIZE)
        .enumerate()
    {
        shards[c % workers].chunks.push(chunk);
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_and_page_mut_match_the_chunk_layout_for_any_worker_count() {
        let pages = 7 * CHUNK_PAGES + 5;
        for workers in 1..=6usize {
            let mut memory = vec![0u8; pages as usize * PAGE_SIZE];
            // Tag each page with its number through its owner's shard...
            {
                let mut shards = split(&mut memory, workers);
                for page in 0..pages {
                    let w = owner(page, workers);
                    assert_eq!(w as u64, (page / CHUNK_PAGES) % workers as u64);
                    shards[w].page_mut(page)[..8].copy_from_slice(&page.to_le_bytes());
                }
                for page in 0..pages {
                    let w = owner(page, workers);
                    assert_eq!(shards[w].page(page)[..8], page.to_le_bytes());
                }
            }
            // ...and find every tag where the flat layout puts the page.
            for page in 0..pages {
                let at = page as usize * PAGE_SIZE;
                assert_eq!(memory[at..at + 8], page.to_le_bytes(), "workers {workers}");
            }
        }
    }
}
