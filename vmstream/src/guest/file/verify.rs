//! Superblock parsing and the verifier that tells a lost or stale page.
//!
//! Verify expects a consistent image (journal empty; run [`crate::guest::file::workload::recover`] first,
//! [`verify_snapshot`] does both on a private copy-on-write view). It checks, block by block
//! in order (ranges of blocks on every core; the first bad block is reported):
//! - active block: header number = block, header version = ledger entry >= 1, checksum,
//!   `last_tx <= tx_count`, and for filling workloads the exact fill pattern of the version;
//! - inactive block: ledger entry 0 and every byte zero;
//! - then `sum(ledger) == active_blocks + tx_count` (each transaction adds one version).
//!
//! A stale data page shows as a checksum or content error, a stale ledger page as a
//! version mismatch, a stale superblock as a wrong sum; a lost page (zero) as a wrong
//! block number.

use std::path::Path;

use crate::guest::file::layout::{
    self, get_u32, get_u64, hdr, sb, Geometry, ImageWorkloadKind, BLOCK_HEADER_SIZE,
};
use crate::memory::{GuestMemory, MapMode, MemoryError};

/// Why a guest memory image is not a consistent vmstream guest. Block errors name the first
/// bad block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageVerifyError {
    /// Offset 0 does not hold the vmstream magic.
    #[error("no vmstream guest superblock (magic {0:#018x})")]
    BadMagic(u64),
    /// Unsupported layout version.
    #[error("layout version {0} is not supported")]
    LayoutVersion(u32),
    /// A superblock field is inconsistent.
    #[error("bad superblock: {0}")]
    Superblock(String),
    /// The journal record cannot be replayed.
    #[error("bad journal record (seq {seq}): {why}")]
    Journal {
        /// Journal sequence number.
        seq: u64,
        /// What is wrong.
        why: String,
    },
    /// The journal is still armed (image not recovered).
    #[error("journal armed with tx {0}: recover the image before verifying")]
    JournalArmed(u64),
    /// A block header carries the wrong block number (lost or misplaced page).
    #[error("block {block}: header says block {found}")]
    BlockNumber {
        /// Block index.
        block: u64,
        /// Number in the header.
        found: u64,
    },
    /// Header version differs from the ledger (stale block or stale ledger page).
    #[error("block {block}: version {header} but ledger says {ledger}")]
    Version {
        /// Block index.
        block: u64,
        /// Version in the block header.
        header: u64,
        /// Version in the ledger.
        ledger: u64,
    },
    /// Checksum mismatch (a page of the block is stale or corrupt).
    #[error("block {block} version {version}: checksum {found:#018x}, computed {computed:#018x}")]
    Checksum {
        /// Block index.
        block: u64,
        /// Version in the header.
        version: u64,
        /// Stored checksum.
        found: u64,
        /// Checksum of the contents.
        computed: u64,
    },
    /// Contents differ from the fill pattern of the block's version.
    #[error("block {block} version {version}: content differs at byte {offset} of the block")]
    Content {
        /// Block index.
        block: u64,
        /// Version.
        version: u64,
        /// Byte offset inside the block.
        offset: u64,
    },
    /// A block claims a transaction newer than the counter.
    #[error("block {block}: last tx {last_tx} is after tx count {tx_count}")]
    FutureTx {
        /// Block index.
        block: u64,
        /// Header's last tx.
        last_tx: u64,
        /// Superblock tx count.
        tx_count: u64,
    },
    /// Memory that the workload never writes is not zero.
    #[error("untouched memory not zero at byte {offset} (block {block:?})")]
    NotZero {
        /// Byte offset in guest memory.
        offset: u64,
        /// Inactive block it belongs to, if any.
        block: Option<u64>,
    },
    /// The ledger does not add up to the transaction counter.
    #[error("ledger sums to {ledger_sum}, expected {expected} (active blocks + tx count)")]
    Counter {
        /// Sum of all ledger entries.
        ledger_sum: u64,
        /// active_blocks + tx_count.
        expected: u64,
    },
}

/// Parsed superblock fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Workload.
    pub kind: ImageWorkloadKind,
    /// Total memory size.
    pub memory_size: u64,
    /// Block size.
    pub block_size: u64,
    /// Number of blocks.
    pub block_count: u64,
    /// Offset of block 0.
    pub data_offset: u64,
    /// Formatted blocks.
    pub active_blocks: u64,
    /// Hot blocks.
    pub hot_blocks: u64,
    /// Target rate, tx/s.
    pub rate: u64,
    /// Seed.
    pub seed: u64,
    /// Committed transactions.
    pub tx_count: u64,
    /// Journal sequence (0 = empty).
    pub journal_seq: u64,
}

impl Superblock {
    /// Parse and sanity-check the superblock of `mem` (whose length must be the memory size).
    pub fn read(mem: &[u8]) -> Result<Self, ImageVerifyError> {
        Self::read_head(mem, mem.len())
    }

    /// [`Self::read`] from the first page of a memory of `memory_len` bytes (`head` holds
    /// at least the superblock: a copy of page 0 will do).
    pub fn read_head(mem: &[u8], memory_len: usize) -> Result<Self, ImageVerifyError> {
        if mem.len() < crate::memory::PAGE_SIZE || memory_len < crate::memory::PAGE_SIZE {
            return Err(ImageVerifyError::Superblock(format!(
                "memory of {} bytes",
                memory_len
            )));
        }
        let magic = get_u64(mem, sb::MAGIC);
        if magic != layout::MAGIC {
            return Err(ImageVerifyError::BadMagic(magic));
        }
        let version = get_u32(mem, sb::LAYOUT_VERSION);
        if version != layout::LAYOUT_VERSION {
            return Err(ImageVerifyError::LayoutVersion(version));
        }
        let code = get_u32(mem, sb::KIND);
        let kind = ImageWorkloadKind::from_code(code)
            .ok_or_else(|| ImageVerifyError::Superblock(format!("workload kind {code}")))?;
        let s = Self {
            kind,
            memory_size: get_u64(mem, sb::MEMORY_SIZE),
            block_size: get_u64(mem, sb::BLOCK_SIZE),
            block_count: get_u64(mem, sb::BLOCK_COUNT),
            data_offset: get_u64(mem, sb::DATA_OFFSET),
            active_blocks: get_u64(mem, sb::ACTIVE_BLOCKS),
            hot_blocks: get_u64(mem, sb::HOT_BLOCKS),
            rate: get_u64(mem, sb::RATE),
            seed: get_u64(mem, sb::SEED),
            tx_count: get_u64(mem, sb::TX_COUNT),
            journal_seq: get_u64(mem, sb::JOURNAL_SEQ),
        };
        let bad = |what: String| Err(ImageVerifyError::Superblock(what));
        // A guest with disks keeps their ledgers after its workload's memory (the disk
        // area, `disks::area`): the workload's size is then the area's offset.
        let disk_area = get_u64(mem, crate::guest::file::disks::area::SB_DISK_AREA);
        let workload_len = if disk_area == 0 {
            memory_len as u64
        } else {
            disk_area
        };
        if s.memory_size != workload_len || workload_len > memory_len as u64 {
            return bad(format!(
                "memory size {} but image is {}",
                s.memory_size, memory_len
            ));
        }
        if s.block_size != kind.block_size() {
            return bad(format!("block size {} for {}", s.block_size, kind.name()));
        }
        let g = Geometry::new(s.memory_size, s.block_size);
        if g != Some(s.geometry()) || get_u64(mem, sb::LEDGER_OFFSET) != layout::LEDGER_OFFSET {
            return bad(format!(
                "geometry {:?} does not match size {}",
                s.geometry(),
                s.memory_size
            ));
        }
        if s.active_blocks == 0 || s.active_blocks > s.block_count {
            return bad(format!(
                "{} active of {} blocks",
                s.active_blocks, s.block_count
            ));
        }
        let hot_ok = match kind {
            ImageWorkloadKind::Dbsim => s.hot_blocks == s.active_blocks.div_ceil(10),
            ImageWorkloadKind::Hotset => (1..=s.active_blocks).contains(&s.hot_blocks),
            _ => true,
        };
        if !hot_ok {
            return bad(format!(
                "{} hot of {} active blocks",
                s.hot_blocks, s.active_blocks
            ));
        }
        Ok(s)
    }

    /// The geometry the superblock describes.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            memory_size: self.memory_size,
            block_size: self.block_size,
            block_count: self.block_count,
            data_offset: self.data_offset,
        }
    }
}

/// What a successful verify of a guest image (the layout of `layout.rs`) saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageVerifyReport {
    /// Workload kind.
    pub kind: ImageWorkloadKind,
    /// Blocks checked (all of them).
    pub blocks: u64,
    /// Active blocks.
    pub active_blocks: u64,
    /// Committed transactions.
    pub tx_count: u64,
    /// Whether an armed journal record was replayed first (snapshot taken mid-transaction).
    pub replayed_journal: bool,
}

/// Verify a consistent (recovered) image. See the module docs for what is checked. Blocks
/// are checked on every core in ranges; the error reported is still the first bad block.
pub fn verify(mem: &[u8]) -> Result<ImageVerifyReport, ImageVerifyError> {
    verify_sparse(mem, None)
}

/// [`verify`] of memory whose pages with a clear bit in `data` (a bit per page, see
/// [`crate::memory::GuestMemory::data_pages`]) are holes of its file: they read as zero, so
/// the zero checks skip them instead of reading (which would allocate them).
pub fn verify_sparse(
    mem: &[u8],
    data: Option<&[u64]>,
) -> Result<ImageVerifyReport, ImageVerifyError> {
    use rayon::prelude::*;
    let s = Superblock::read(mem)?;
    if s.journal_seq != 0 {
        return Err(ImageVerifyError::JournalArmed(s.journal_seq));
    }
    let g = s.geometry();
    const RANGE: u64 = 4096;
    let ranges: Vec<u64> = (0..g.block_count.div_ceil(RANGE)).collect();
    let sums: Vec<Result<u64, ImageVerifyError>> = ranges
        .par_iter()
        .map(|&r| {
            verify_blocks(
                mem,
                &s,
                r * RANGE..((r + 1) * RANGE).min(g.block_count),
                data,
            )
        })
        .collect();
    let mut ledger_sum: u64 = 0;
    for sum in sums {
        ledger_sum = ledger_sum.wrapping_add(sum?);
    }
    // Ledger slack after the last entry, and memory after the last block, stay zero.
    let ledger_end = g.ledger_entry(g.block_count);
    check_zero(
        &mem[ledger_end..g.data_offset as usize],
        ledger_end as u64,
        None,
        data,
    )?;
    let tail = g.block_offset(g.block_count);
    check_zero(&mem[tail..g.memory_size as usize], tail as u64, None, data)?;
    let expected = s.active_blocks.wrapping_add(s.tx_count);
    if ledger_sum != expected {
        return Err(ImageVerifyError::Counter {
            ledger_sum,
            expected,
        });
    }
    Ok(ImageVerifyReport {
        kind: s.kind,
        blocks: g.block_count,
        active_blocks: s.active_blocks,
        tx_count: s.tx_count,
        replayed_journal: false,
    })
}

/// Checks blocks `range` in order; returns the sum of their ledger entries.
fn verify_blocks(
    mem: &[u8],
    s: &Superblock,
    range: std::ops::Range<u64>,
    data: Option<&[u64]>,
) -> Result<u64, ImageVerifyError> {
    let g = s.geometry();
    let bs = g.block_size as usize;
    let mut ledger_sum: u64 = 0;
    for b in range {
        let ledger = get_u64(mem, g.ledger_entry(b));
        let off = g.block_offset(b);
        let block = &mem[off..off + bs];
        if b >= s.active_blocks {
            if ledger != 0 {
                return Err(ImageVerifyError::Version {
                    block: b,
                    header: get_u64(block, hdr::VERSION),
                    ledger,
                });
            }
            check_zero(block, off as u64, Some(b), data)?;
            continue;
        }
        let number = get_u64(block, hdr::BLOCK);
        if number != b {
            return Err(ImageVerifyError::BlockNumber {
                block: b,
                found: number,
            });
        }
        let version = get_u64(block, hdr::VERSION);
        if version != ledger || ledger == 0 {
            return Err(ImageVerifyError::Version {
                block: b,
                header: version,
                ledger,
            });
        }
        let content = check_block_content(block, b, s)?;
        if content.last_tx > s.tx_count {
            return Err(ImageVerifyError::FutureTx {
                block: b,
                last_tx: content.last_tx,
                tx_count: s.tx_count,
            });
        }
        ledger_sum = ledger_sum.wrapping_add(ledger);
    }
    Ok(ledger_sum)
}

/// What an active block's own bytes say, once they passed [`check_block_content`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockContent {
    /// Header version (must equal the ledger entry).
    pub version: u64,
    /// Transaction that last wrote the block (must not exceed the superblock's count).
    pub last_tx: u64,
}

/// The checks of active block `b` (its bytes: `block`) that need nothing but the block:
/// header number, checksum and, for filling workloads, the fill pattern of its version.
pub fn check_block_content(
    block: &[u8],
    b: u64,
    s: &Superblock,
) -> Result<BlockContent, ImageVerifyError> {
    let number = get_u64(block, hdr::BLOCK);
    if number != b {
        return Err(ImageVerifyError::BlockNumber {
            block: b,
            found: number,
        });
    }
    let version = get_u64(block, hdr::VERSION);
    let found = get_u64(block, hdr::CHECKSUM);
    let computed = layout::block_checksum(block);
    if found != computed {
        return Err(ImageVerifyError::Checksum {
            block: b,
            version,
            found,
            computed,
        });
    }
    if s.kind.fills_blocks() {
        if let Some(at) = layout::check_fill(&block[BLOCK_HEADER_SIZE..], s.seed, b, version) {
            return Err(ImageVerifyError::Content {
                block: b,
                version,
                offset: (BLOCK_HEADER_SIZE + at) as u64,
            });
        }
    }
    Ok(BlockContent {
        version,
        last_tx: get_u64(block, hdr::LAST_TX),
    })
}

/// Whether every page that bytes `from..from + len` touch is a hole (clear in `data`).
fn all_holes(data: Option<&[u64]>, from: u64, len: usize) -> bool {
    let Some(data) = data else { return false };
    let page = crate::memory::PAGE_SIZE as u64;
    (from / page..(from + len as u64).div_ceil(page)).all(|p| crate::memory::page_is_hole(data, p))
}

fn check_zero(
    bytes: &[u8],
    base: u64,
    block: Option<u64>,
    data: Option<&[u64]>,
) -> Result<(), ImageVerifyError> {
    let mut at = 0;
    for chunk in bytes.chunks(crate::memory::PAGE_SIZE) {
        if !all_holes(data, base + at as u64, chunk.len()) && !vmstream_simd::is_zero(chunk) {
            let pos = chunk.iter().position(|&x| x != 0).unwrap_or(0);
            return Err(ImageVerifyError::NotZero {
                offset: base + (at + pos) as u64,
                block,
            });
        }
        at += chunk.len();
    }
    Ok(())
}

/// Errors from verifying a memory file.
#[derive(Debug, thiserror::Error)]
pub enum VerifyFileError {
    /// The file could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The image is inconsistent.
    #[error(transparent)]
    Verify(#[from] ImageVerifyError),
}

/// Recover (replay the journal) in `mem` and verify it. Use on a private view of a snapshot
/// or on the guest's own memory before resuming.
pub fn verify_snapshot(mem: &mut [u8]) -> Result<ImageVerifyReport, ImageVerifyError> {
    verify_snapshot_sparse(mem, None)
}

/// [`verify_snapshot`] with the holes of `mem`'s file (see [`verify_sparse`]); recovery
/// writes at most the journal's block, which then holds data anyway.
pub fn verify_snapshot_sparse(
    mem: &mut [u8],
    data: Option<&[u64]>,
) -> Result<ImageVerifyReport, ImageVerifyError> {
    let replayed = crate::guest::file::workload::recover(mem)?;
    let mut report = verify_sparse(mem, data)?;
    report.replayed_journal = replayed;
    Ok(report)
}

/// Verify the guest memory file at `path` without changing it (private mapping).
pub fn verify_file(path: &Path) -> Result<ImageVerifyReport, VerifyFileError> {
    let mut mem = GuestMemory::open(path, MapMode::Private)?;
    Ok(verify_snapshot(mem.as_mut_slice())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::file::layout::splitmix64;
    use crate::guest::file::workload::{format, Workload, WorkloadParams};

    fn image(kind: ImageWorkloadKind) -> Vec<u8> {
        let mut mem = vec![0u8; 64 << 10];
        format(&mut mem, &WorkloadParams::new(kind)).unwrap();
        let mut w = Workload::attach(&mut mem).unwrap();
        for _ in 0..100 {
            w.step();
        }
        mem
    }

    /// Any single flipped bit past the superblock is caught; flips in the superblock never
    /// make verify panic (some fields, like the RNG state, are legitimately unchecked).
    #[test]
    fn every_flip_outside_the_superblock_is_caught_and_none_panics() {
        let mut rng = 42;
        for kind in ImageWorkloadKind::ALL {
            let good = image(kind);
            for _ in 0..150 {
                let mut img = good.clone();
                let r = splitmix64(&mut rng);
                let at = (r >> 8) as usize % img.len();
                img[at] ^= 1 << (r % 8);
                let res = verify_snapshot(&mut img);
                if at >= crate::memory::PAGE_SIZE {
                    assert!(res.is_err(), "{}: flip at {at} not caught", kind.name());
                }
            }
            for _ in 0..300 {
                let mut img = good.clone();
                let r = splitmix64(&mut rng);
                let at = (r >> 8) as usize % 700;
                img[at] = (r >> 40) as u8;
                let _ = verify_snapshot(&mut img);
            }
        }
    }

    /// With the file's holes, verify skips them and still catches a non-zero byte on a data
    /// page where memory must stay zero.
    #[test]
    fn sparse_verify_skips_holes_and_still_catches_data() {
        let mut params = WorkloadParams::new(ImageWorkloadKind::Dbsim);
        params.active_percent = 50;
        let mut mem = GuestMemory::memfd("verify-sparse", 1 << 20).unwrap();
        format(mem.as_mut_slice(), &params).unwrap();
        let data = mem.data_pages().unwrap();
        assert!(
            data.iter().map(|w| w.count_ones()).sum::<u32>() < 200,
            "mostly holes"
        );
        let plain = verify(mem.as_mut_slice()).unwrap();
        assert_eq!(
            verify_sparse(mem.as_mut_slice(), Some(&data)).unwrap(),
            plain
        );
        // A write to the last (inactive) page makes it data; the sparse verify reads it.
        let len = mem.len();
        mem.as_mut_slice()[len - 1] = 7;
        let data = mem.data_pages().unwrap();
        assert!(matches!(
            verify_sparse(mem.as_mut_slice(), Some(&data)),
            Err(ImageVerifyError::NotZero { .. })
        ));
    }

    #[test]
    fn truncated_or_foreign_images_are_errors() {
        assert!(matches!(
            Superblock::read(&[0u8; 100]),
            Err(ImageVerifyError::Superblock(_))
        ));
        assert_eq!(verify(&[0u8; 8192]), Err(ImageVerifyError::BadMagic(0)));
        let good = image(ImageWorkloadKind::Dbsim);
        assert!(matches!(
            verify(&good[..good.len() - 4096]),
            Err(ImageVerifyError::Superblock(_))
        ));
        let mut v2 = good.clone();
        v2[sb::LAYOUT_VERSION] = 2;
        assert_eq!(verify(&v2), Err(ImageVerifyError::LayoutVersion(2)));
    }
}
