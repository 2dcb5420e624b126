//! The disk verifier: every block of every disk against the ledgers in guest memory (a
//! lost, stale, torn or misplaced block is a typed error naming the first bad block), the
//! dbsim data blocks against the buffer pool in memory, and each disk's checkpoint
//! against the ledger. Reads the disk files; writes nothing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::guest::file::disks::area::{da, disk_seed, AreaHeader, DiskWorkloadKind, SB_DISK_AREA};
use crate::guest::file::disks::stamp::read_checkpoint;
use crate::guest::file::layout::{self, get_u64, hdr, sb, Geometry, BLOCK_HEADER_SIZE};

/// Why a guest's disks do not agree with its memory. Block errors name the first bad block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskVerifyError {
    /// Disks were given for a guest whose memory has no disk area.
    #[error("the guest's memory has no disk area (it was started without disks)")]
    NoDiskArea,
    /// The disk area header is not valid.
    #[error("bad disk area: {0}")]
    Area(String),
    /// Another number of disks than the guest has.
    #[error("the guest has {expected} disks, {given} given")]
    DiskCount {
        /// Disks in the area.
        expected: usize,
        /// Disks given.
        given: usize,
    },
    /// A disk of another size than the guest's.
    #[error("disk {disk}: {found} bytes, the guest's is {expected}")]
    DiskSize {
        /// Disk index.
        disk: usize,
        /// Size in the area.
        expected: u64,
        /// Size of the file.
        found: u64,
    },
    /// Reading a disk failed.
    #[error("disk {disk} ({path}): {why}")]
    Io {
        /// Disk index.
        disk: usize,
        /// Its path.
        path: PathBuf,
        /// The error.
        why: String,
    },
    /// A written block reads as zeros.
    #[error("disk {disk} block {block}: lost (zeros where the ledger says version {ledger})")]
    Lost {
        /// Disk index.
        disk: usize,
        /// Block.
        block: u64,
        /// Its version in the ledger.
        ledger: u64,
    },
    /// A block's stamp names another block.
    #[error(
        "disk {disk} block {block}: misplaced (its stamp says block {found}, expected {expected})"
    )]
    Misplaced {
        /// Disk index.
        disk: usize,
        /// Block.
        block: u64,
        /// Number expected in the stamp.
        expected: u64,
        /// Number found.
        found: u64,
    },
    /// A block's bytes do not match its checksum.
    #[error("disk {disk} block {block}: torn (version {version} fails its checksum)")]
    Torn {
        /// Disk index.
        disk: usize,
        /// Block.
        block: u64,
        /// Version in its stamp.
        version: u64,
    },
    /// A block holds an older version than the ledger.
    #[error("disk {disk} block {block}: stale (version {found}, the ledger says {ledger})")]
    Stale {
        /// Disk index.
        disk: usize,
        /// Block.
        block: u64,
        /// Version on disk.
        found: u64,
        /// Version in the ledger.
        ledger: u64,
    },
    /// A block holds a newer version than the ledger (a stale ledger).
    #[error("disk {disk} block {block}: version {found} is newer than the ledger's {ledger}")]
    Newer {
        /// Disk index.
        disk: usize,
        /// Block.
        block: u64,
        /// Version on disk.
        found: u64,
        /// Version in the ledger.
        ledger: u64,
    },
    /// A diskio block's payload is not its version's fill pattern.
    #[error("disk {disk} block {block} version {version}: content differs at byte {offset}")]
    Content {
        /// Disk index.
        disk: usize,
        /// Block.
        block: u64,
        /// Version.
        version: u64,
        /// Byte in the block.
        offset: u64,
    },
    /// A dbsim data block differs from the buffer pool's copy of the same version, or is
    /// newer than it.
    #[error("disk {disk} block {block}: version {version} disagrees with memory block {memory_block} (version {memory_version})")]
    Disagree {
        /// Disk index.
        disk: usize,
        /// Block.
        block: u64,
        /// Version on disk.
        version: u64,
        /// The memory block it caches.
        memory_block: u64,
        /// Its version in memory.
        memory_version: u64,
    },
    /// A block never written is not zero.
    #[error("disk {disk} block {block}: never written but not zero")]
    NotZero {
        /// Disk index.
        disk: usize,
        /// Block.
        block: u64,
    },
    /// The ledgers do not add up to the write counter.
    #[error("disk ledgers sum to {ledger_sum}, the write counter says {writes}")]
    Counter {
        /// Sum of the diskio ledgers.
        ledger_sum: u64,
        /// Writes committed.
        writes: u64,
    },
    /// A disk's checkpoint is missing, torn, or ahead of memory.
    #[error("disk {disk}: checkpoint: {why}")]
    Checkpoint {
        /// Disk index.
        disk: usize,
        /// What is wrong.
        why: String,
    },
}

/// What a successful disk verify saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskVerifyReport {
    /// The disk workload.
    pub kind: DiskWorkloadKind,
    /// Disks checked.
    pub disks: usize,
    /// Blocks written at least once (all disks).
    pub written_blocks: u64,
    /// Disk writes committed.
    pub writes: u64,
    /// Checkpoints taken.
    pub checkpoints: u64,
}

/// The memory workload's part and the disk area of guest memory `mem` (`None`: no disks).
pub fn split_disk_area(mem: &[u8]) -> (&[u8], Option<&[u8]>) {
    let at = get_u64(mem, SB_DISK_AREA) as usize;
    if at == 0 || at >= mem.len() {
        return (mem, None);
    }
    let (a, b) = mem.split_at(at);
    (a, Some(b))
}

struct Ctx<'a> {
    head: AreaHeader,
    area: &'a [u8],
    mem: &'a [u8],
    geo: Geometry,
    intent: Option<(usize, u64, u64)>,
    /// The writes done: the counter, plus one if the guest stopped between its ledger's
    /// commit and the counter's (the intent still armed, its block's ledger entry already
    /// the new version).
    writes_done: u64,
}

/// Verifies the guest's disks at `paths` against its memory `mem` (all of it, recovered:
/// its memory journal empty; the memory blocks are [`super::super::verify`]'s job).
pub fn verify_disks(mem: &[u8], paths: &[PathBuf]) -> Result<DiskVerifyReport, DiskVerifyError> {
    let (wmem, area) = split_disk_area(mem);
    let area = area.ok_or(DiskVerifyError::NoDiskArea)?;
    verify_disk_area(wmem, area, paths)
}

/// Verifies the disks at `paths` against the disk area `area` (its header and ledgers);
/// `wmem` is the memory workload's memory, which only dbsim's disk mode reads (a KVM
/// guest's diskio passes none).
pub fn verify_disk_area(
    wmem: &[u8],
    area: &[u8],
    paths: &[PathBuf],
) -> Result<DiskVerifyReport, DiskVerifyError> {
    let head = AreaHeader::read(area).map_err(DiskVerifyError::Area)?;
    if head.kind == DiskWorkloadKind::Dbsim && wmem.len() < crate::memory::PAGE_SIZE {
        return Err(DiskVerifyError::Area(
            "dbsim's disks without its memory".into(),
        ));
    }
    if head.disks.len() != paths.len() {
        return Err(DiskVerifyError::DiskCount {
            expected: head.disks.len(),
            given: paths.len(),
        });
    }
    let intent = (get_u64(area, da::INTENT_SEQ) != 0).then(|| {
        (
            get_u64(area, da::INTENT_DISK) as usize,
            get_u64(area, da::INTENT_BLOCK),
            get_u64(area, da::INTENT_VERSION),
        )
    });
    let geo = match head.kind {
        DiskWorkloadKind::Dbsim => Geometry {
            memory_size: get_u64(wmem, sb::MEMORY_SIZE),
            block_size: get_u64(wmem, sb::BLOCK_SIZE),
            block_count: get_u64(wmem, sb::BLOCK_COUNT),
            data_offset: get_u64(wmem, sb::DATA_OFFSET),
        },
        // diskio's blocks cache no memory block.
        DiskWorkloadKind::Diskio => Geometry {
            memory_size: 0,
            block_size: 0,
            block_count: 0,
            data_offset: 0,
        },
    };
    let committed = intent.is_some_and(|(d, b, v)| {
        head.disks.get(d).is_some_and(|g| b < g.blocks)
            && get_u64(area, head.ledger_entry(d, b)) == v
    });
    let counter = get_u64(area, da::WRITES);
    let cx = Ctx {
        head,
        area,
        mem: wmem,
        geo,
        intent,
        writes_done: counter + committed as u64,
    };
    let mut written = 0;
    let mut ledger_sum = 0u64;
    let mut intent_landed = false;
    for (d, path) in paths.iter().enumerate() {
        let (w, sum, landed) = verify_disk(&cx, d, path)?;
        written += w;
        ledger_sum = ledger_sum.wrapping_add(sum);
        intent_landed |= landed;
    }
    let writes = cx.writes_done + intent_landed as u64;
    if cx.head.kind == DiskWorkloadKind::Diskio && ledger_sum + intent_landed as u64 != writes {
        return Err(DiskVerifyError::Counter {
            ledger_sum,
            writes: counter,
        });
    }
    Ok(DiskVerifyReport {
        kind: cx.head.kind,
        disks: paths.len(),
        written_blocks: written,
        writes,
        checkpoints: get_u64(area, da::CHECKPOINT_SEQ),
    })
}

/// What block `(d, b)` is for: `Some(memory block)` for a dbsim data block, and the number
/// its stamp must carry; `None` for a block no write may touch.
fn role(cx: &Ctx<'_>, d: usize, b: u64) -> Option<(Option<u64>, u64)> {
    let h = &cx.head;
    if h.kind == DiskWorkloadKind::Diskio {
        return Some((None, b));
    }
    let (log_disk, log_first) = h.log_start();
    if d == log_disk && b >= log_first {
        return Some((None, b));
    }
    let active = get_u64(cx.mem, sb::ACTIVE_BLOCKS);
    let mb = b * h.data_disks + d as u64;
    ((d as u64) < h.data_disks && mb < active).then_some((Some(mb), mb))
}

/// Checks disk `d`: returns blocks written, the sum of its ledger, and whether the
/// intent's new version is on it.
fn verify_disk(cx: &Ctx<'_>, d: usize, path: &Path) -> Result<(u64, u64, bool), DiskVerifyError> {
    let io = |why: String| DiskVerifyError::Io {
        disk: d,
        path: path.to_path_buf(),
        why,
    };
    let g = cx.head.disks[d];
    let file = File::open(path).map_err(|e| io(e.to_string()))?;
    let size = file.metadata().map_err(|e| io(e.to_string()))?.len();
    if size != g.size {
        return Err(DiskVerifyError::DiskSize {
            disk: d,
            expected: g.size,
            found: size,
        });
    }
    let bs = g.block_size as usize;
    const CHUNK: usize = 1 << 20;
    let per = (CHUNK / bs).max(1) as u64;
    let mut buf = vec![0u8; per as usize * bs];
    let (mut written, mut sum, mut landed) = (0, 0u64, false);
    let mut b0 = 0;
    while b0 < g.blocks {
        let n = per.min(g.blocks - b0);
        let chunk = &mut buf[..n as usize * bs];
        file.read_exact_at(chunk, b0 * g.block_size)
            .map_err(|e| io(e.to_string()))?;
        for (i, block) in chunk.chunks_exact(bs).enumerate() {
            let b = b0 + i as u64;
            let ledger = get_u64(cx.area, cx.head.ledger_entry(d, b));
            let new = check_block(cx, d, b, block, ledger)?;
            written += (ledger != 0 || new) as u64;
            sum = sum.wrapping_add(ledger);
            landed |= new;
        }
        b0 += n;
    }
    let mut region = vec![0u8; g.checkpoint_len() as usize];
    file.read_exact_at(&mut region, g.checkpoint)
        .map_err(|e| io(e.to_string()))?;
    check_checkpoint(cx, d, &region)?;
    Ok((written, sum, landed))
}

/// Checks one block; returns whether it holds the intent's new version.
fn check_block(
    cx: &Ctx<'_>,
    d: usize,
    b: u64,
    block: &[u8],
    ledger: u64,
) -> Result<bool, DiskVerifyError> {
    let intent = cx
        .intent
        .filter(|&(id, ib, _)| (id, ib) == (d, b))
        .map(|i| i.2);
    let zero = block.iter().all(|&x| x == 0);
    let Some((memory_block, number)) = role(cx, d, b) else {
        return if zero && ledger == 0 {
            Ok(false)
        } else {
            Err(DiskVerifyError::NotZero { disk: d, block: b })
        };
    };
    if zero {
        return match ledger {
            0 => Ok(false),
            _ => Err(DiskVerifyError::Lost {
                disk: d,
                block: b,
                ledger,
            }),
        };
    }
    let found = get_u64(block, hdr::BLOCK);
    if found != number {
        return Err(DiskVerifyError::Misplaced {
            disk: d,
            block: b,
            expected: number,
            found,
        });
    }
    let version = get_u64(block, hdr::VERSION);
    if get_u64(block, hdr::CHECKSUM) != layout::block_checksum(block) {
        if intent.is_some() {
            // The write in flight when the guest was killed inside its `pwrite` (a stop
            // signal waits for the write; SIGKILL does not): the guest never saw it
            // complete, and resuming writes the block again.
            return Ok(false);
        }
        return Err(DiskVerifyError::Torn {
            disk: d,
            block: b,
            version,
        });
    }
    let new = intent == Some(version) && version != ledger;
    if version != ledger && !new {
        let (disk, block) = (d, b);
        return Err(if version < ledger {
            DiskVerifyError::Stale {
                disk,
                block,
                found: version,
                ledger,
            }
        } else {
            DiskVerifyError::Newer {
                disk,
                block,
                found: version,
                ledger,
            }
        });
    }
    if cx.head.kind == DiskWorkloadKind::Diskio {
        let seed = disk_seed(cx.head.seed, d);
        if let Some(at) = layout::check_fill(&block[BLOCK_HEADER_SIZE..], seed, b, version) {
            return Err(DiskVerifyError::Content {
                disk: d,
                block: b,
                version,
                offset: (BLOCK_HEADER_SIZE + at) as u64,
            });
        }
    }
    if let Some(mb) = memory_block {
        let memory_version = get_u64(cx.mem, cx.geo.ledger_entry(mb));
        let off = cx.geo.block_offset(mb);
        let same = &cx.mem[off..off + block.len()] == block;
        if version > memory_version || (version == memory_version && !same) {
            return Err(DiskVerifyError::Disagree {
                disk: d,
                block: b,
                version,
                memory_block: mb,
                memory_version,
            });
        }
    }
    Ok(new)
}

/// The checkpoint is this one or the one before memory's count, and no entry of its
/// ledger is newer than memory's ledger.
fn check_checkpoint(cx: &Ctx<'_>, d: usize, region: &[u8]) -> Result<(), DiskVerifyError> {
    let bad = |why: String| DiskVerifyError::Checkpoint { disk: d, why };
    let seq = get_u64(cx.area, da::CHECKPOINT_SEQ);
    let g = cx.head.disks[d];
    if seq <= 1 && region.iter().all(|&x| x == 0) {
        return Ok(());
    }
    let c = read_checkpoint(region, &g, d).map_err(bad)?;
    if c.seq != seq && c.seq + 1 != seq {
        return Err(bad(format!(
            "sequence {} but memory has begun {seq}",
            c.seq
        )));
    }
    let writes = cx.writes_done;
    if c.writes > writes {
        return Err(bad(format!("{} writes, memory has {writes}", c.writes)));
    }
    for (b, &v) in c.ledger.iter().enumerate() {
        let now = get_u64(cx.area, cx.head.ledger_entry(d, b as u64));
        if v > now {
            return Err(bad(format!(
                "block {b} at version {v}, memory's ledger {now}"
            )));
        }
    }
    Ok(())
}
