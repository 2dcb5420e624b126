//! How destination memory is shared between receiver workers without
//! `unsafe`: guest memory is cut into chunks of [`CHUNK_PAGES`] pages and
//! chunk `c` belongs to worker `c % workers`. Each worker holds `&mut`
//! slices of its own chunks only, so two workers can never write the same
//! byte, and all writes to one page happen in one worker in submission
//! order. The sender shards pages with the same function, so with equal
//! worker counts each packet lands on exactly one receiver worker.

use crate::PAGE_SIZE;

/// Pages per ownership chunk (256 KiB).
pub const CHUNK_PAGES: u64 = 64;

/// The worker, out of `workers`, that owns `page`.
pub fn owner(page: u64, workers: usize) -> usize {
    ((page / CHUNK_PAGES) % workers as u64) as usize
}

/// One worker's share of guest memory.
#[derive(Debug)]
pub struct ShardMemory<'a> {
    chunks: Vec<&'a mut [u8]>,
    workers: u64,
}

impl ShardMemory<'_> {
    /// The bytes of `page`, which must be in range and owned by this shard.
    pub fn page_mut(&mut self, page: u64) -> &mut [u8] {
        let chunk = page / CHUNK_PAGES;
        let local = (chunk / self.workers) as usize;
        let at = (page % CHUNK_PAGES) as usize * PAGE_SIZE;
        &mut self.chunks[local][at..at + PAGE_SIZE]
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
