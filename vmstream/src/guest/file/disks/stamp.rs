//! The bytes a guest writes to its disks: stamped blocks (the memory blocks' 64-byte
//! header: number, version, checksum, last write; then the payload), redo log blocks,
//! and the checkpoint region with a copy of the disk's ledger.

use crate::disk::block::{Disk, DiskError};
use crate::guest::file::disks::area::{ckpt, DiskGeometry, CHECKPOINT_MAGIC};
use crate::guest::file::layout::{self, get_u64, hdr, put_u64, BLOCK_HEADER_SIZE};
use crate::memory::PAGE_SIZE;

/// Disk writes between two checkpoints.
pub const CHECKPOINT_EVERY: u64 = 256;

/// Writes block `b`'s header (number, version, last write) and then its checksum.
pub fn seal(block: &mut [u8], b: u64, version: u64, last: u64) {
    block[..BLOCK_HEADER_SIZE].fill(0);
    put_u64(block, hdr::BLOCK, b);
    put_u64(block, hdr::VERSION, version);
    put_u64(block, hdr::LAST_TX, last);
    let sum = layout::block_checksum(block);
    put_u64(block, hdr::CHECKSUM, sum);
}

/// A diskio block: the fill pattern of `(seed, b, version)` after the stamp.
pub fn stamped_fill(block: &mut [u8], seed: u64, b: u64, version: u64, write_seq: u64) {
    layout::fill_payload(&mut block[BLOCK_HEADER_SIZE..], seed, b, version);
    seal(block, b, version, write_seq);
}

/// A redo log block: `records` (transaction, then its journal record, each) after the
/// stamp, zero to the end; `last_tx` is the last transaction in it.
pub fn log_block(block: &mut [u8], records: &[u8], b: u64, version: u64, last_tx: u64) {
    let body = &mut block[BLOCK_HEADER_SIZE..];
    body[..records.len()].copy_from_slice(records);
    body[records.len()..].fill(0);
    seal(block, b, version, last_tx);
}

/// Checksum of a checkpoint's ledger pages (the stamps' FNV-1a lanes, which the KVM
/// guest program computes too).
pub fn ledger_checksum(pages: &[u8]) -> u64 {
    layout::words_checksum(pages)
}

/// Writes disk `d`'s checkpoint `seq` (its `ledger` bytes after a header page) in one
/// write, so a copy holds the old checkpoint or the new one, never a mix.
pub fn write_checkpoint(
    disk: &mut Disk,
    g: &DiskGeometry,
    d: usize,
    seq: u64,
    writes: u64,
    ledger: &[u8],
) -> Result<(), DiskError> {
    let mut buf = vec![0u8; g.checkpoint_len() as usize];
    buf[PAGE_SIZE..PAGE_SIZE + ledger.len()].copy_from_slice(ledger);
    let sum = ledger_checksum(&buf[PAGE_SIZE..]);
    put_u64(&mut buf, ckpt::MAGIC, CHECKPOINT_MAGIC);
    put_u64(&mut buf, ckpt::DISK, d as u64);
    put_u64(&mut buf, ckpt::SEQ, seq);
    put_u64(&mut buf, ckpt::WRITES, writes);
    put_u64(&mut buf, ckpt::BLOCKS, g.blocks);
    put_u64(&mut buf, ckpt::CHECKSUM, sum);
    disk.write_at(g.checkpoint, &buf)
}

/// A checkpoint as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Its sequence number.
    pub seq: u64,
    /// Disk writes committed when it was taken.
    pub writes: u64,
    /// The ledger it holds.
    pub ledger: Vec<u64>,
}

/// Parses disk `d`'s checkpoint region `region`; `Err` says what is wrong.
pub fn read_checkpoint(region: &[u8], g: &DiskGeometry, d: usize) -> Result<Checkpoint, String> {
    if get_u64(region, ckpt::MAGIC) != CHECKPOINT_MAGIC {
        return Err(format!(
            "no checkpoint (magic {:#018x})",
            get_u64(region, ckpt::MAGIC)
        ));
    }
    let (disk, blocks) = (get_u64(region, ckpt::DISK), get_u64(region, ckpt::BLOCKS));
    if disk != d as u64 || blocks != g.blocks {
        return Err(format!("checkpoint of disk {disk} with {blocks} blocks"));
    }
    let pages = &region[PAGE_SIZE..];
    if ledger_checksum(pages) != get_u64(region, ckpt::CHECKSUM) {
        return Err("torn checkpoint: its ledger does not match its checksum".into());
    }
    Ok(Checkpoint {
        seq: get_u64(region, ckpt::SEQ),
        writes: get_u64(region, ckpt::WRITES),
        ledger: (0..g.blocks as usize)
            .map(|b| get_u64(pages, b * 8))
            .collect(),
    })
}
