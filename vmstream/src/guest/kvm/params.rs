//! Workload configuration and the guest-memory layout derived from the RAM
//! size, written into (and read back from) the parameter block at
//! [`PARAMS_GPA`].

use crate::guest::kvm::abi::*;
use crate::guest::kvm::error::{KvmError, Result};
use crate::guest::kvm::memory::RamRead;
use crate::memory::PAGE_SIZE;

/// What the KVM guest program does on every vCPU: its own workloads, written in assembly,
/// not the image workloads of the process guests ([`ImageWorkloadKind`]) even where the
/// names match.
///
/// [`ImageWorkloadKind`]: crate::guest::file::layout::ImageWorkloadKind
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmWorkloadKind {
    /// Versioned 8 KiB blocks with checksums and a ledger; hot/cold skew.
    Dbsim,
    /// One random u64 store per transaction over the vCPU's blocks.
    Random,
    /// Random u64 stores confined to the vCPU's hot set.
    Hotset,
    /// Counts and yields to the VMM; dirties almost nothing.
    Idle,
    /// Writes exactly the pages the VMM queues with
    /// [`KvmGuest::touch`](crate::guest::kvm::KvmGuest::touch) (dirty-log tests).
    Touch,
    /// dbsim in the file-backed guests' image format (WORKLOADS.md) at
    /// [`IMAGE_GPA`]: vCPU 0 commits through the image's redo journal, the
    /// other vCPUs idle; verified by [`crate::guest::file::verify`].
    FileDb,
    /// Random stamped disk block writes through the paravirtual block device
    /// ([`crate::guest::kvm::disk`]) in the process guests' disk format: vCPU 0 writes,
    /// the other vCPUs idle; the ledger lives in the disk area in guest RAM.
    Diskio,
}

impl KvmWorkloadKind {
    fn code(self) -> u64 {
        match self {
            KvmWorkloadKind::Dbsim => WORKLOAD_DBSIM,
            KvmWorkloadKind::Random => WORKLOAD_RANDOM,
            KvmWorkloadKind::Hotset => WORKLOAD_HOTSET,
            KvmWorkloadKind::Idle => WORKLOAD_IDLE,
            KvmWorkloadKind::Touch => WORKLOAD_TOUCH,
            KvmWorkloadKind::FileDb => WORKLOAD_FILEDB,
            KvmWorkloadKind::Diskio => WORKLOAD_DISKIO,
        }
    }

    fn from_code(code: u64) -> Option<Self> {
        [
            KvmWorkloadKind::Dbsim,
            KvmWorkloadKind::Random,
            KvmWorkloadKind::Hotset,
            KvmWorkloadKind::Idle,
            KvmWorkloadKind::Touch,
            KvmWorkloadKind::FileDb,
            KvmWorkloadKind::Diskio,
        ]
        .into_iter()
        .find(|k| k.code() == code)
    }

    /// The name [`parse`](Self::parse) accepts.
    pub fn name(self) -> &'static str {
        match self {
            KvmWorkloadKind::Dbsim => "dbsim",
            KvmWorkloadKind::Random => "random",
            KvmWorkloadKind::Hotset => "hotset",
            KvmWorkloadKind::Idle => "idle",
            KvmWorkloadKind::Touch => "touch",
            KvmWorkloadKind::FileDb => "filedb",
            KvmWorkloadKind::Diskio => "diskio",
        }
    }

    /// Parses `dbsim`, `random`, `hotset`, `idle`, `touch`, `filedb`, `diskio`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "dbsim" => Some(KvmWorkloadKind::Dbsim),
            "random" => Some(KvmWorkloadKind::Random),
            "hotset" => Some(KvmWorkloadKind::Hotset),
            "idle" => Some(KvmWorkloadKind::Idle),
            "touch" => Some(KvmWorkloadKind::Touch),
            "filedb" => Some(KvmWorkloadKind::FileDb),
            "diskio" => Some(KvmWorkloadKind::Diskio),
            _ => None,
        }
    }
}

/// Workload parameters (written to the parameter block).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadConfig {
    /// Which workload.
    pub kind: KvmWorkloadKind,
    /// PRNG seed.
    pub seed: u64,
    /// Share (per mille) of blocks the workload touches; the rest stay zero.
    pub active_permille: u64,
    /// Share (per mille) of each vCPU's blocks forming its hot set.
    pub hot_permille: u64,
    /// Share (per mille) of transactions that hit the hot set.
    pub hot_hit_permille: u64,
    /// Words changed per dbsim transaction.
    pub rows_per_tx: u64,
    /// Progress report (`out`) every 2^report_shift transactions.
    pub report_shift: u64,
}

impl Default for WorkloadConfig {
    /// dbsim, 3/4 of blocks active, 10% of blocks take 80% of transactions,
    /// 4 words per transaction, a report every 64 Ki transactions.
    fn default() -> Self {
        Self {
            kind: KvmWorkloadKind::Dbsim,
            seed: 1,
            active_permille: 750,
            hot_permille: 100,
            hot_hit_permille: 800,
            rows_per_tx: 4,
            report_shift: 16,
        }
    }
}

/// Where the ledger and blocks live for a given RAM size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestLayout {
    /// Guest RAM size in bytes.
    pub memory_size: u64,
    /// Ledger: one u64 (latest version) per block.
    pub ledger_gpa: u64,
    /// First block.
    pub blocks_gpa: u64,
    /// Number of blocks.
    pub block_count: u64,
}

impl GuestLayout {
    /// Ledger right after the system area, then as many blocks as fit.
    pub fn for_memory(memory_size: u64) -> Result<Self> {
        let avail = memory_size
            .checked_sub(SYSTEM_AREA_SIZE)
            .ok_or_else(|| KvmError::Config("RAM smaller than the system area".into()))?;
        let mut blocks = avail / (BLOCK_SIZE + 8);
        loop {
            let ledger = (blocks * 8).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
            if SYSTEM_AREA_SIZE + ledger + blocks * BLOCK_SIZE <= memory_size {
                let layout = Self {
                    memory_size,
                    ledger_gpa: SYSTEM_AREA_SIZE,
                    blocks_gpa: SYSTEM_AREA_SIZE + ledger,
                    block_count: blocks,
                };
                return Ok(layout);
            }
            blocks -= 1;
        }
    }

    /// Guest-physical address of block `b`.
    pub fn block_gpa(&self, b: u64) -> u64 {
        self.blocks_gpa + b * BLOCK_SIZE
    }
}

/// The full parameter block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// Workload settings.
    pub workload: WorkloadConfig,
    /// Memory layout.
    pub layout: GuestLayout,
    /// vCPUs running the workload.
    pub vcpus: u64,
    /// The disk area in guest RAM (0: the guest has no disks; [`crate::guest::kvm::disk`]).
    pub disk_area_gpa: u64,
    /// The diskio workload's write buffer (one disk block, right after the disk area).
    pub disk_buffer_gpa: u64,
}

impl Params {
    /// Blocks the workload touches.
    pub fn active_blocks(&self) -> u64 {
        self.layout.block_count * self.workload.active_permille / 1000
    }

    /// Blocks `[start, end)` owned by vCPU `v` (same split as the guest).
    pub fn partition(&self, v: u64) -> (u64, u64) {
        let a = self.active_blocks() as u128;
        let n = self.vcpus as u128;
        ((a * v as u128 / n) as u64, (a * (v as u128 + 1) / n) as u64)
    }

    /// Checks ranges the guest relies on.
    pub fn validate(&self) -> Result<()> {
        let w = &self.workload;
        let bad = |m: &str| Err(KvmError::Config(m.to_string()));
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad("vCPU count must be in 1..=64");
        }
        if w.active_permille > 1000 || w.hot_permille > 1000 || w.hot_hit_permille > 1000 {
            return bad("per-mille values must be <= 1000");
        }
        if w.rows_per_tx == 0 || w.rows_per_tx > 1016 {
            return bad("rows_per_tx must be in 1..=1016");
        }
        if w.report_shift > 40 {
            return bad("report_shift must be <= 40");
        }
        let (area, buffer) = (self.disk_area_gpa, self.disk_buffer_gpa);
        if area != 0
            && (w.kind != KvmWorkloadKind::Diskio
                || area < self.layout.blocks_gpa
                || buffer <= area
                || buffer >= self.layout.memory_size)
        {
            return bad("disk area outside the blocks or without the diskio workload");
        }
        if area == 0 && w.kind == KvmWorkloadKind::Diskio {
            return bad("the diskio workload needs disks");
        }
        Ok(())
    }

    /// The parameter block as the guest reads it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; PARAMS_SIZE as usize];
        let mut put =
            |off: u64, v: u64| b[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
        put(PARAM_MAGIC, PARAMS_MAGIC_VALUE);
        put(PARAM_VERSION, PARAMS_VERSION_VALUE);
        put(PARAM_WORKLOAD, self.workload.kind.code());
        put(PARAM_VCPUS, self.vcpus);
        put(PARAM_SEED, self.workload.seed);
        put(PARAM_LEDGER_GPA, self.layout.ledger_gpa);
        put(PARAM_BLOCKS_GPA, self.layout.blocks_gpa);
        put(PARAM_BLOCK_COUNT, self.layout.block_count);
        put(PARAM_ACTIVE_BLOCKS, self.active_blocks());
        put(PARAM_REPORT_SHIFT, self.workload.report_shift);
        put(PARAM_HOT_PERMILLE, self.workload.hot_permille);
        put(PARAM_HOT_HIT_PERMILLE, self.workload.hot_hit_permille);
        put(PARAM_ROWS_PER_TX, self.workload.rows_per_tx);
        put(PARAM_MEMORY_SIZE, self.layout.memory_size);
        put(PARAM_DISK_AREA_GPA, self.disk_area_gpa);
        put(PARAM_DISK_BUFFER_GPA, self.disk_buffer_gpa);
        b
    }

    /// Reads the parameter block back from guest RAM (after a restore).
    pub fn read_from<R: RamRead + ?Sized>(ram: &R) -> Result<Self> {
        let get = |off: u64| ram.read_le_u64(PARAMS_GPA + off);
        let bad = |m: String| Err(KvmError::BadParams(m));
        if get(PARAM_MAGIC)? != PARAMS_MAGIC_VALUE {
            return bad("bad magic".into());
        }
        let version = get(PARAM_VERSION)?;
        if version != PARAMS_VERSION_VALUE {
            return bad(format!("unsupported version {version}"));
        }
        let Some(kind) = KvmWorkloadKind::from_code(get(PARAM_WORKLOAD)?) else {
            return bad("unknown workload".into());
        };
        let memory_size = get(PARAM_MEMORY_SIZE)?;
        if memory_size != ram.ram_size() {
            return bad(format!(
                "written for {memory_size} bytes of RAM, have {}",
                ram.ram_size()
            ));
        }
        let layout = GuestLayout::for_memory(memory_size)?;
        if get(PARAM_LEDGER_GPA)? != layout.ledger_gpa
            || get(PARAM_BLOCKS_GPA)? != layout.blocks_gpa
            || get(PARAM_BLOCK_COUNT)? != layout.block_count
        {
            return bad("layout does not match the RAM size".into());
        }
        let block_count = layout.block_count;
        let active = get(PARAM_ACTIVE_BLOCKS)?;
        let params = Self {
            workload: WorkloadConfig {
                kind,
                seed: get(PARAM_SEED)?,
                // Recover the per-mille value that produced `active`.
                active_permille: (0..=1000)
                    .find(|p| block_count * p / 1000 == active)
                    .ok_or_else(|| KvmError::BadParams("active block count".into()))?,
                hot_permille: get(PARAM_HOT_PERMILLE)?,
                hot_hit_permille: get(PARAM_HOT_HIT_PERMILLE)?,
                rows_per_tx: get(PARAM_ROWS_PER_TX)?,
                report_shift: get(PARAM_REPORT_SHIFT)?,
            },
            layout,
            vcpus: get(PARAM_VCPUS)?,
            disk_area_gpa: get(PARAM_DISK_AREA_GPA)?,
            disk_buffer_gpa: get(PARAM_DISK_BUFFER_GPA)?,
        };
        params
            .validate()
            .map_err(|e| KvmError::BadParams(e.to_string()))?;
        Ok(params)
    }
}
