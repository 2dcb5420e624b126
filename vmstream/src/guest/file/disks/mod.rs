//! A process guest's disks: what it is told about them ([`GuestDisks`]), formatting them
//! with the disk area in guest memory, the disk workloads and the disk verifier
//! (`STORAGE.md`, *The guest's disks*).

pub mod area;
pub mod stamp;
pub mod verify;
pub mod workload;

use std::path::{Path, PathBuf};

use crate::disk::block::{open_disks, Disk, DiskError};
use crate::guest::file::disks::area::{
    area_len, AreaHeader, DiskGeometry, DiskWorkloadKind, SB_DISK_AREA,
};
use crate::guest::file::disks::verify::{verify_disks, DiskVerifyError, DiskVerifyReport};
use crate::guest::file::layout::{get_u64, put_u64, sb, ImageWorkloadKind};
use crate::guest::file::verify::{verify_snapshot, ImageVerifyError, ImageVerifyReport};
use crate::memory::{GuestMemory, MapMode, MemoryError, PAGE_SIZE};

/// dbsim's disk block size (its memory block size: a block is written back whole).
pub const DBSIM_DISK_BLOCK: u64 = 8192;

/// Smallest and largest diskio write.
pub const IO_SIZES: std::ops::RangeInclusive<u64> = 4096..=(1 << 20);

/// Default disk I/O rate of a started guest, bytes/s.
pub const DEFAULT_IO_RATE: u64 = 4 << 20;

/// How a fresh guest uses its disks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskParams {
    /// The disk workload.
    pub kind: DiskWorkloadKind,
    /// diskio's write size (a power of two in [`IO_SIZES`]); dbsim writes 8 KiB blocks.
    pub io_size: u64,
    /// Target disk write rate in bytes/s (0 = as fast as the disks take it).
    pub io_rate: u64,
    /// Seed of the fill patterns.
    pub seed: u64,
}

/// A process guest's disks (its config's `disks`; empty: no disks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestDisks {
    /// Raw image files, in order (at most [`crate::disk::MAX_DISKS`]).
    pub paths: Vec<PathBuf>,
    /// Size of each disk that does not exist yet (created sparse).
    pub create_size: Option<u64>,
    /// Dirty bitmap granularity (`<disk>.dirty`, created at it if missing; `None`: an
    /// existing bitmap's, else [`crate::disk::bitmap::DEFAULT_GRANULARITY`]).
    pub granularity: Option<u64>,
    /// The disk workload of a fresh guest (`None` on resume: the area says).
    pub workload: Option<DiskParams>,
}

impl GuestDisks {
    /// The `vmstream guest run` arguments that give a started guest these disks, and the
    /// `--workload` name that replaces `memory_workload`'s (`diskio` leaves memory idle).
    pub fn run_args(&self, memory_workload: ImageWorkloadKind) -> (&'static str, Vec<String>) {
        let mut args = Vec::new();
        if self.paths.is_empty() {
            return (memory_workload.name(), args);
        }
        for p in &self.paths {
            args.push("--disk".to_string());
            args.push(p.display().to_string());
        }
        if let Some(size) = self.create_size {
            args.extend(["--disk-size".to_string(), size.to_string()]);
        }
        if let Some(g) = self.granularity {
            args.extend(["--disk-granularity".into(), g.to_string()]);
        }
        let mut name = memory_workload.name();
        if let Some(p) = &self.workload {
            args.extend(["--io-size".into(), p.io_size.to_string()]);
            args.extend(["--io-rate".into(), p.io_rate.to_string()]);
            if p.kind == DiskWorkloadKind::Diskio {
                name = "diskio";
            }
        }
        (name, args)
    }
}

/// Why a guest's disks cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum DiskSetupError {
    /// A disk or its bitmap.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The disks, the memory or the workload do not fit together.
    #[error("{0}")]
    Layout(String),
    /// Resume found disks that disagree with memory.
    #[error("refusing to resume: {0}")]
    Verify(#[from] DiskVerifyError),
}

/// The memory workload and disk workload a `--workload` name means: `diskio` leaves
/// memory idle; `dbsim` runs its disk mode when the guest has disks.
pub fn workload_by_name(name: &str) -> Option<(ImageWorkloadKind, Option<DiskWorkloadKind>)> {
    match name {
        "diskio" => Some((ImageWorkloadKind::Idle, Some(DiskWorkloadKind::Diskio))),
        "dbsim" => Some((ImageWorkloadKind::Dbsim, Some(DiskWorkloadKind::Dbsim))),
        _ => ImageWorkloadKind::from_name(name).map(|k| (k, None)),
    }
}

/// Opens the disks and lays out the disk area for `p`: returns the disks, the area's
/// offset in a memory of `memory_len` bytes, and its header.
pub fn plan(
    g: &GuestDisks,
    p: &DiskParams,
    memory_len: u64,
) -> Result<(Vec<Disk>, usize, AreaHeader), DiskSetupError> {
    let block_size = match p.kind {
        DiskWorkloadKind::Diskio => p.io_size,
        DiskWorkloadKind::Dbsim => DBSIM_DISK_BLOCK,
    };
    if !block_size.is_power_of_two() || !IO_SIZES.contains(&block_size) {
        return Err(DiskSetupError::Layout(format!(
            "I/O size {block_size} is not a power of two from 4 KiB to 1 MiB"
        )));
    }
    if g.paths.is_empty() {
        return Err(DiskSetupError::Layout(format!(
            "{} needs a --disk",
            p.kind.name()
        )));
    }
    let disks = open_disks(&g.paths, g.create_size, g.granularity)?;
    let geos = disks
        .iter()
        .map(|d| {
            DiskGeometry::new(d.size(), block_size).ok_or_else(|| {
                DiskSetupError::Layout(format!(
                    "disk {} ({} bytes) is too small for {block_size}-byte blocks",
                    d.path().display(),
                    d.size()
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let n = geos.len() as u64;
    let (data_disks, log_blocks) = match p.kind {
        DiskWorkloadKind::Diskio => (0, 0),
        DiskWorkloadKind::Dbsim if n == 1 => (1, (geos[0].blocks / 8).max(1)),
        DiskWorkloadKind::Dbsim => (n - 1, geos[n as usize - 1].blocks),
    };
    let len = area_len(&geos);
    let page = PAGE_SIZE as u64;
    let at = memory_len.saturating_sub(len) / page * page;
    if at < 16 * page {
        return Err(DiskSetupError::Layout(format!(
            "guest memory of {memory_len} bytes is too small for its disks' ledgers ({len} bytes)"
        )));
    }
    let head = AreaHeader {
        kind: p.kind,
        block_size,
        io_rate: p.io_rate,
        seed: p.seed,
        ledgers: AreaHeader::pack_ledgers(&geos),
        disks: geos,
        data_disks,
        log_blocks,
    };
    Ok((disks, at as usize, head))
}

/// Writes the disk area into freshly formatted guest memory `mem` (all of it; the memory
/// workload formatted in `mem[..at]`) and checks that dbsim's database fits its disks.
pub fn format_area(mem: &mut [u8], at: usize, head: &AreaHeader) -> Result<(), DiskSetupError> {
    if head.kind == DiskWorkloadKind::Dbsim {
        let active = get_u64(mem, sb::ACTIVE_BLOCKS);
        let (log_disk, log_first) = head.log_start();
        let room = (0..head.data_disks as usize)
            .map(|d| {
                if d == log_disk {
                    log_first
                } else {
                    head.disks[d].blocks
                }
            })
            .min()
            .unwrap_or(0);
        if active.div_ceil(head.data_disks) > room {
            return Err(DiskSetupError::Layout(format!(
                "the database's {active} blocks of 8 KiB do not fit on {} data disks of {room} blocks",
                head.data_disks
            )));
        }
    }
    put_u64(mem, SB_DISK_AREA, at as u64);
    head.format(&mut mem[at..]);
    Ok(())
}

/// Why `vmstream guest verify` failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestVerifyError {
    /// The memory file could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The memory is inconsistent.
    #[error(transparent)]
    Image(#[from] ImageVerifyError),
    /// A disk is inconsistent or disagrees with memory.
    #[error(transparent)]
    Disk(#[from] DiskVerifyError),
}

/// Verifies a guest's memory file and its disks without changing them (memory mapped
/// privately and recovered there; disks read).
pub fn verify_guest(
    memory: &Path,
    disks: &[PathBuf],
) -> Result<(ImageVerifyReport, Option<DiskVerifyReport>), GuestVerifyError> {
    let mut mem = GuestMemory::open(memory, MapMode::Private)?;
    let report = verify_snapshot(mem.as_mut_slice())?;
    let has_area = get_u64(mem.as_mut_slice(), SB_DISK_AREA) != 0;
    if disks.is_empty() && !has_area {
        return Ok((report, None));
    }
    Ok((report, Some(verify_disks(mem.as_mut_slice(), disks)?)))
}
