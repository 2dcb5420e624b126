//! Where a process guest's disk state lives: the disk area at the end of guest memory
//! (header, per-disk geometry, the intent of the write in progress, one ledger per disk),
//! the stamp every disk block carries, and each disk's checkpoint region (`STORAGE.md`,
//! *Stamps and ledgers*).
//!
//! ```text
//! guest memory:  [memory workload (superblock DISK_AREA = its size)][disk area]
//! disk area:     page 0: header, disk sizes, block counts, ledger offsets
//!                then one ledger per disk: a u64 per disk block = its latest version on disk
//! a disk:        [blocks of block_size bytes, each: 64-byte stamp + payload][checkpoint]
//! checkpoint:    one page header (magic, disk, seq, writes, blocks, ledger checksum)
//!                + the disk's ledger as of the checkpoint
//! ```

use crate::guest::file::layout::{get_u32, get_u64, put_u32, put_u64};
use crate::memory::PAGE_SIZE;

/// "VMSDISKA" as a little-endian u64.
pub const AREA_MAGIC: u64 = u64::from_le_bytes(*b"VMSDISKA");
/// Version of the disk area layout.
pub const AREA_VERSION: u32 = 1;
/// "VMSDCKPT" as a little-endian u64.
pub const CHECKPOINT_MAGIC: u64 = u64::from_le_bytes(*b"VMSDCKPT");
/// The superblock field (u64 at this offset of guest memory) that holds the disk area's
/// offset, 0 = no disks; the memory workload's own size is that offset.
pub const SB_DISK_AREA: usize = 112;
/// Most disks (the block layer's limit).
pub const MAX_DISKS: usize = crate::disk::MAX_DISKS;

/// Disk area header field offsets (bytes from the area's start). All u64 unless noted.
pub mod da {
    /// [`super::AREA_MAGIC`].
    pub const MAGIC: usize = 0;
    /// u32 [`super::AREA_VERSION`].
    pub const VERSION: usize = 8;
    /// u32 [`super::DiskWorkloadKind`] code.
    pub const KIND: usize = 12;
    /// Number of disks.
    pub const DISKS: usize = 16;
    /// Stamp block size: every disk write is one or more whole blocks of this size.
    pub const BLOCK_SIZE: usize = 24;
    /// Target disk write rate in bytes/s (0 = unlimited).
    pub const IO_RATE: usize = 32;
    /// Seed of the fill patterns.
    pub const SEED: usize = 40;
    /// splitmix64 state of the disk workload's RNG.
    pub const RNG_STATE: usize = 48;
    /// Disk writes committed (a write is committed once its ledger entry is updated).
    pub const WRITES: usize = 56;
    /// Checkpoints begun (each writes every disk's ledger to its checkpoint region).
    pub const CHECKPOINT_SEQ: usize = 64;
    /// Intent of the write in progress: its sequence (`WRITES + 1`), 0 = none.
    pub const INTENT_SEQ: usize = 72;
    /// Intent: the disk.
    pub const INTENT_DISK: usize = 80;
    /// Intent: the block.
    pub const INTENT_BLOCK: usize = 88;
    /// Intent: the version being written.
    pub const INTENT_VERSION: usize = 96;
    /// dbsim: redo log records appended (ever).
    pub const LOG_NEXT: usize = 104;
    /// dbsim: log blocks (at the end of the last disk's blocks).
    pub const LOG_BLOCKS: usize = 112;
    /// dbsim: disks holding data blocks (the first ones).
    pub const DATA_DISKS: usize = 120;
    /// [`super::MAX_DISKS`] disk sizes.
    pub const DISK_SIZE: usize = 128;
    /// [`super::MAX_DISKS`] block counts.
    pub const DISK_BLOCKS: usize = 256;
    /// [`super::MAX_DISKS`] ledger offsets (bytes from the area's start).
    pub const LEDGER: usize = 384;
}

/// Checkpoint header field offsets (bytes from the region's start). All u64.
pub mod ckpt {
    /// [`super::CHECKPOINT_MAGIC`].
    pub const MAGIC: usize = 0;
    /// The disk's index.
    pub const DISK: usize = 8;
    /// The checkpoint's sequence number (1, 2, ...).
    pub const SEQ: usize = 16;
    /// Disk writes committed when it was taken.
    pub const WRITES: usize = 24;
    /// Ledger entries that follow the header page.
    pub const BLOCKS: usize = 32;
    /// [`crate::guest::file::layout::words_checksum`] of the ledger pages.
    pub const CHECKSUM: usize = 40;
}

/// What a guest does with its disks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskWorkloadKind {
    /// Random whole-block writes of the I/O size across all disks at the I/O rate.
    Diskio,
    /// dbsim's disk mode: the buffer pool's dirty 8 KiB blocks written back to the data
    /// disks, a redo log appended to the last disk.
    Dbsim,
}

impl DiskWorkloadKind {
    /// The u32 stored in the area.
    pub fn code(self) -> u32 {
        match self {
            DiskWorkloadKind::Diskio => 1,
            DiskWorkloadKind::Dbsim => 2,
        }
    }

    /// Decodes a stored code.
    pub fn from_code(c: u32) -> Option<Self> {
        match c {
            1 => Some(DiskWorkloadKind::Diskio),
            2 => Some(DiskWorkloadKind::Dbsim),
            _ => None,
        }
    }

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DiskWorkloadKind::Diskio => "diskio",
            DiskWorkloadKind::Dbsim => "dbsim",
        }
    }
}

/// Where blocks and the checkpoint are on one disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskGeometry {
    /// Disk size in bytes.
    pub size: u64,
    /// Stamp block size.
    pub block_size: u64,
    /// Blocks before the checkpoint region.
    pub blocks: u64,
    /// Byte offset of the checkpoint region.
    pub checkpoint: u64,
}

impl DiskGeometry {
    /// The most blocks that fit with their checkpoint region; `None` if not one does.
    pub fn new(size: u64, block_size: u64) -> Option<Self> {
        let page = PAGE_SIZE as u64;
        let region = |n: u64| page + (n * 8).next_multiple_of(page);
        let mut blocks = size.checked_sub(page)? / (block_size + 8);
        while blocks > 0 && blocks * block_size + region(blocks) > size {
            blocks -= 1;
        }
        (blocks > 0).then_some(Self {
            size,
            block_size,
            blocks,
            checkpoint: blocks * block_size,
        })
    }

    /// Bytes of the checkpoint region (header page and ledger pages).
    pub fn checkpoint_len(&self) -> u64 {
        PAGE_SIZE as u64 + (self.blocks * 8).next_multiple_of(PAGE_SIZE as u64)
    }
}

/// Bytes of a disk area for disks of these geometries: the header page and the ledgers.
pub fn area_len(disks: &[DiskGeometry]) -> u64 {
    let page = PAGE_SIZE as u64;
    page + disks
        .iter()
        .map(|g| (g.blocks * 8).next_multiple_of(page))
        .sum::<u64>()
}

/// A parsed disk area header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AreaHeader {
    /// The workload.
    pub kind: DiskWorkloadKind,
    /// Stamp block size.
    pub block_size: u64,
    /// I/O rate, bytes/s.
    pub io_rate: u64,
    /// Seed.
    pub seed: u64,
    /// Each disk's geometry, in order.
    pub disks: Vec<DiskGeometry>,
    /// Each disk's ledger offset in the area.
    pub ledgers: Vec<usize>,
    /// dbsim: data disks.
    pub data_disks: u64,
    /// dbsim: log blocks.
    pub log_blocks: u64,
}

impl AreaHeader {
    /// Parses the header of `area` (the disk area: from the offset in the superblock to
    /// the end of memory); `Err` names what is wrong.
    pub fn read(area: &[u8]) -> Result<Self, String> {
        if area.len() < PAGE_SIZE {
            return Err(format!("disk area of {} bytes", area.len()));
        }
        if get_u64(area, da::MAGIC) != AREA_MAGIC {
            return Err(format!("magic {:#018x}", get_u64(area, da::MAGIC)));
        }
        if get_u32(area, da::VERSION) != AREA_VERSION {
            return Err(format!("version {}", get_u32(area, da::VERSION)));
        }
        let kind = DiskWorkloadKind::from_code(get_u32(area, da::KIND))
            .ok_or_else(|| format!("workload {}", get_u32(area, da::KIND)))?;
        let n = get_u64(area, da::DISKS) as usize;
        let block_size = get_u64(area, da::BLOCK_SIZE);
        if n == 0 || n > MAX_DISKS || !block_size.is_power_of_two() || block_size < 4096 {
            return Err(format!("{n} disks of {block_size}-byte blocks"));
        }
        let mut disks = Vec::new();
        let mut ledgers = Vec::new();
        for i in 0..n {
            let size = get_u64(area, da::DISK_SIZE + i * 8);
            let g = DiskGeometry::new(size, block_size)
                .filter(|g| g.blocks == get_u64(area, da::DISK_BLOCKS + i * 8))
                .ok_or_else(|| format!("disk {i}: geometry of a {size}-byte disk"))?;
            let at = get_u64(area, da::LEDGER + i * 8) as usize;
            if at < PAGE_SIZE || at.saturating_add(g.blocks as usize * 8) > area.len() {
                return Err(format!("disk {i}: ledger at {at}"));
            }
            disks.push(g);
            ledgers.push(at);
        }
        Ok(Self {
            kind,
            block_size,
            io_rate: get_u64(area, da::IO_RATE),
            seed: get_u64(area, da::SEED),
            disks,
            ledgers,
            data_disks: get_u64(area, da::DATA_DISKS),
            log_blocks: get_u64(area, da::LOG_BLOCKS),
        })
    }

    /// Writes a fresh header for these disks into `area` (zero), ledgers all zero.
    pub fn format(&self, area: &mut [u8]) {
        put_u64(area, da::MAGIC, AREA_MAGIC);
        put_u32(area, da::VERSION, AREA_VERSION);
        put_u32(area, da::KIND, self.kind.code());
        put_u64(area, da::DISKS, self.disks.len() as u64);
        put_u64(area, da::BLOCK_SIZE, self.block_size);
        put_u64(area, da::IO_RATE, self.io_rate);
        put_u64(area, da::SEED, self.seed);
        put_u64(area, da::RNG_STATE, self.seed ^ 0xD15C);
        put_u64(area, da::DATA_DISKS, self.data_disks);
        put_u64(area, da::LOG_BLOCKS, self.log_blocks);
        for (i, g) in self.disks.iter().enumerate() {
            put_u64(area, da::DISK_SIZE + i * 8, g.size);
            put_u64(area, da::DISK_BLOCKS + i * 8, g.blocks);
            put_u64(area, da::LEDGER + i * 8, self.ledgers[i] as u64);
        }
    }

    /// Byte offset in the area of disk `d`'s ledger entry for block `b`.
    pub fn ledger_entry(&self, d: usize, b: u64) -> usize {
        self.ledgers[d] + b as usize * 8
    }

    /// Ledger offsets for `disks`, packed after the header page.
    pub fn pack_ledgers(disks: &[DiskGeometry]) -> Vec<usize> {
        let mut at = PAGE_SIZE;
        disks
            .iter()
            .map(|g| {
                let here = at;
                at += (g.blocks as usize * 8).next_multiple_of(PAGE_SIZE);
                here
            })
            .collect()
    }

    /// dbsim: where memory block `b` lives on disk: `(disk, block)`.
    pub fn data_location(&self, b: u64) -> (usize, u64) {
        ((b % self.data_disks) as usize, b / self.data_disks)
    }

    /// The disk and first block of dbsim's redo log; for diskio, past every disk.
    pub fn log_start_or_none(&self) -> (usize, u64) {
        match self.kind {
            DiskWorkloadKind::Dbsim => self.log_start(),
            DiskWorkloadKind::Diskio => (usize::MAX, u64::MAX),
        }
    }

    /// dbsim: the disk and first block of the redo log.
    pub fn log_start(&self) -> (usize, u64) {
        let last = self.disks.len() - 1;
        (last, self.disks[last].blocks - self.log_blocks)
    }
}

/// The seed of disk `d`'s fill patterns (every disk's blocks differ).
pub fn disk_seed(seed: u64, d: usize) -> u64 {
    seed ^ (d as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_geometry_fits_blocks_and_checkpoint() {
        for &(size, bs) in &[(1u64 << 20, 4096u64), (64 << 20, 8192), (3 << 20, 1 << 20)] {
            let g = DiskGeometry::new(size, bs).unwrap();
            assert!(g.checkpoint + g.checkpoint_len() <= size);
            let more = g.blocks + 1;
            assert!(more * bs + PAGE_SIZE as u64 + (more * 8).next_multiple_of(4096) > size);
        }
        assert_eq!(DiskGeometry::new(1 << 20, 1 << 20), None);
    }

    #[test]
    fn header_round_trips_and_rejects_junk() {
        let disks = vec![
            DiskGeometry::new(1 << 20, 4096).unwrap(),
            DiskGeometry::new(2 << 20, 4096).unwrap(),
        ];
        let h = AreaHeader {
            kind: DiskWorkloadKind::Diskio,
            block_size: 4096,
            io_rate: 1000,
            seed: 5,
            ledgers: AreaHeader::pack_ledgers(&disks),
            disks: disks.clone(),
            data_disks: 0,
            log_blocks: 0,
        };
        let mut area = vec![0u8; area_len(&disks) as usize];
        h.format(&mut area);
        assert_eq!(AreaHeader::read(&area), Ok(h));
        put_u64(&mut area, da::DISK_BLOCKS + 8, 1);
        assert!(AreaHeader::read(&area).is_err());
        assert!(AreaHeader::read(&area[..100]).is_err());
    }
}
