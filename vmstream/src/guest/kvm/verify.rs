//! VMM-side verifier of the dbsim workload: every block must match the
//! ledger (number, version, checksum), untouched blocks must be all zero, and
//! each vCPU's ledger versions must add up to its transaction count.
//! A block a vCPU was in the middle of changing when it was paused
//! (`VCPU_INFLIGHT`) may be one version ahead of the ledger.

use crate::guest::kvm::abi::*;
use crate::guest::kvm::error::{KvmError, Result};
use crate::guest::kvm::memory::{GuestRam, RamRead};
use crate::guest::kvm::params::{KvmWorkloadKind, Params};

/// What the verifier of a KVM guest's RAM checked (blocks against the ledger and the vCPU
/// counters); the filedb workload's [`ImageVerifyReport`] is translated into it.
///
/// [`ImageVerifyReport`]: crate::guest::file::verify::ImageVerifyReport
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmVerifyReport {
    /// Blocks checked.
    pub blocks: u64,
    /// Blocks written at least once.
    pub written_blocks: u64,
    /// Sum of all ledger versions (= committed transactions).
    pub versions: u64,
    /// Blocks in the middle of a transaction (paused mid-update).
    pub inflight: u64,
}

/// A broken invariant, with the block it was found in.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvmVerifyError {
    /// Header block number is wrong.
    #[error("block {block}: header says block {found}")]
    WrongNumber {
        /// Block.
        block: u64,
        /// Header value.
        found: u64,
    },
    /// Version differs from the ledger.
    #[error("block {block}: version {version}, ledger says {ledger}")]
    VersionMismatch {
        /// Block.
        block: u64,
        /// Header value.
        version: u64,
        /// Ledger value.
        ledger: u64,
    },
    /// Stored checksum differs from the contents.
    #[error("block {block}: checksum {stored:#x}, contents give {computed:#x}")]
    Checksum {
        /// Block.
        block: u64,
        /// Header value.
        stored: u64,
        /// Recomputed.
        computed: u64,
    },
    /// A block the ledger calls unwritten (or outside the active set) holds data.
    #[error("block {block} should be all zero")]
    NotZero {
        /// Block.
        block: u64,
    },
    /// A vCPU's committed versions do not add up to its transaction count.
    #[error("vCPU {vcpu}: ledger versions sum to {versions}, counter says {count}")]
    CountMismatch {
        /// vCPU.
        vcpu: u64,
        /// Sum of ledger versions in its partition.
        versions: u64,
        /// Its transaction counter.
        count: u64,
    },
}

/// Checksum of a block as the guest maintains it: for payload words w_i
/// (i = 0..1016), sum of w_i * (2i + 1), plus number * K_NUMBER plus
/// version * K_VERSION, all wrapping mod 2^64.
pub fn block_checksum(block: &[u8]) -> u64 {
    let word = |o: usize| u64::from_le_bytes(block[o..o + 8].try_into().unwrap());
    let number = word(BLOCK_HDR_NUMBER as usize);
    let version = word(BLOCK_HDR_VERSION as usize);
    let payload = block[BLOCK_HEADER_SIZE as usize..]
        .chunks_exact(8)
        .enumerate()
        .fold(0u64, |acc, (i, c)| {
            let w = u64::from_le_bytes(c.try_into().unwrap());
            acc.wrapping_add(w.wrapping_mul(2 * i as u64 + 1))
        });
    payload
        .wrapping_add(number.wrapping_mul(CHECKSUM_K_NUMBER))
        .wrapping_add(version.wrapping_mul(CHECKSUM_K_VERSION))
}

/// What a block's own bytes say: everything the ledger check needs from the block itself.
/// The destination computes these during the live rounds for blocks that stop changing
/// (`migration::dest::verify`), so the check at the pause reads only the rest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockFacts {
    /// Every byte is zero (the other fields are then zero too).
    pub zero: bool,
    /// Header block number.
    pub number: u64,
    /// Header version.
    pub version: u64,
    /// Header checksum.
    pub stored: u64,
    /// Checksum of the contents ([`block_checksum`]).
    pub computed: u64,
}

impl BlockFacts {
    /// The facts of `block` (`BLOCK_SIZE` bytes).
    pub fn of(block: &[u8]) -> BlockFacts {
        if vmstream_simd::is_zero(block) {
            return BlockFacts {
                zero: true,
                ..BlockFacts::default()
            };
        }
        let word =
            |o: u64| u64::from_le_bytes(block[o as usize..o as usize + 8].try_into().unwrap());
        BlockFacts {
            zero: false,
            number: word(BLOCK_HDR_NUMBER),
            version: word(BLOCK_HDR_VERSION),
            stored: word(BLOCK_HDR_CHECKSUM),
            computed: block_checksum(block),
        }
    }
}

/// Facts of blocks known without reading them (`None`: read the block).
pub type KnownFacts<'a> = &'a (dyn Fn(u64) -> Option<BlockFacts> + Sync);

/// Verifies a dbsim guest's RAM. Other workloads have no invariants beyond
/// "untouched blocks stay zero", which is checked for them too.
/// Inner `Err(KvmVerifyError)` = the guest's data is wrong; outer = could not read.
pub fn verify(ram: &GuestRam, params: &Params) -> Result<KvmVerifyReport> {
    verify_known(ram, params, &|_| None)
}

/// [`verify`] taking the facts of some blocks from `known` instead of reading them (a
/// migration destination knows most of them from its page hashes, see
/// `migration::dest::verify`). The result is the same as reading every block, provided
/// `known` returns a block's facts only when they describe its current bytes.
pub fn verify_known<R: RamRead + ?Sized>(
    ram: &R,
    params: &Params,
    known: KnownFacts<'_>,
) -> Result<KvmVerifyReport> {
    if params.workload.kind == KvmWorkloadKind::FileDb {
        return verify_image(ram);
    }
    Ok(check_known(ram, params, known)??)
}

/// The filedb image at IMAGE_GPA, checked by the file-backed guests'
/// verifier on a private copy (an armed journal is replayed first, as after
/// a pause mid-transaction).
pub fn verify_image<R: RamRead + ?Sized>(ram: &R) -> Result<KvmVerifyReport> {
    let mut image = vec![0u8; (ram.ram_size() - IMAGE_GPA) as usize];
    ram.read_bytes(IMAGE_GPA, &mut image)?;
    let r =
        crate::guest::file::verify::verify_snapshot(&mut image).map_err(KvmError::ImageVerify)?;
    Ok(KvmVerifyReport {
        blocks: r.blocks,
        written_blocks: r.active_blocks,
        versions: r.active_blocks + r.tx_count,
        inflight: r.replayed_journal as u64,
    })
}

/// Verifies the KVM guest whose RAM is the file at `memory` (stopped, or a migrated copy;
/// mapped privately, not changed) and its disks at `disks` (`None`: it has none).
pub fn verify_files(
    memory: &std::path::Path,
    disks: &[std::path::PathBuf],
) -> Result<(
    KvmVerifyReport,
    Option<crate::guest::file::disks::verify::DiskVerifyReport>,
)> {
    use crate::memory::{GuestMemory, MapMode};
    let mut mem = GuestMemory::open(memory, MapMode::Private)
        .map_err(|e| KvmError::GuestMemory(e.to_string()))?;
    let ram: &[u8] = mem.as_mut_slice();
    let params = Params::read_from(ram)?;
    let report = verify_known(ram, &params, &|_| None)?;
    let disks = crate::guest::kvm::disk::verify::verify_disks(ram, disks)?;
    Ok((report, disks))
}

/// Like [`verify`], but returns the typed [`KvmVerifyError`].
pub fn check(
    ram: &GuestRam,
    params: &Params,
) -> Result<std::result::Result<KvmVerifyReport, KvmVerifyError>> {
    check_known(ram, params, &|_| None)
}

/// [`check`] taking the facts of blocks from `known` where it has them (see
/// [`verify_known`]).
fn check_known<R: RamRead + ?Sized>(
    ram: &R,
    params: &Params,
    known: KnownFacts<'_>,
) -> Result<std::result::Result<KvmVerifyReport, KvmVerifyError>> {
    let layout = &params.layout;
    let mut ledger = vec![0u8; (layout.block_count * 8) as usize];
    ram.read_bytes(layout.ledger_gpa, &mut ledger)?;
    let ledger: Vec<u64> = ledger
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let mut inflight = Vec::new();
    let mut counts = Vec::new();
    for v in 0..params.vcpus {
        let rec = VCPU_AREA_GPA + v * VCPU_AREA_STRIDE;
        counts.push(ram.read_le_u64(rec + VCPU_TX_COUNT)?);
        let f = ram.read_le_u64(rec + VCPU_INFLIGHT)?;
        inflight.push(f.checked_sub(1));
    }
    let dbsim = params.workload.kind == KvmWorkloadKind::Dbsim;
    // Blocks are independent: check ranges of them on all cores (this check is part of a
    // migrated guest's downtime). The first error in block order wins, as sequentially.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get() as u64)
        .clamp(1, 8)
        .min(layout.block_count.max(1));
    let per = layout.block_count.div_ceil(threads);
    let parts: Vec<Result<std::result::Result<KvmVerifyReport, KvmVerifyError>>> =
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let range =
                        (t * per).min(layout.block_count)..((t + 1) * per).min(layout.block_count);
                    let blocks = Blocks {
                        ram,
                        params,
                        ledger: &ledger,
                        inflight: &inflight,
                        known,
                    };
                    s.spawn(move || blocks.check(range))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("verify thread"))
                .collect()
        });
    let mut report = KvmVerifyReport::default();
    for part in parts {
        let r = match part? {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        report.blocks += r.blocks;
        report.written_blocks += r.written_blocks;
        report.versions += r.versions;
        report.inflight += r.inflight;
    }
    if dbsim {
        for v in 0..params.vcpus {
            let (start, end) = params.partition(v);
            let versions: u64 = ledger[start as usize..end as usize].iter().sum();
            let count = counts[v as usize];
            // The ledger is written before the counter, so a vCPU paused
            // between the two is one ahead.
            let ok = versions == count || (inflight[v as usize].is_some() && versions == count + 1);
            if !ok {
                return Ok(Err(KvmVerifyError::CountMismatch {
                    vcpu: v,
                    versions,
                    count,
                }));
            }
        }
    }
    Ok(Ok(report))
}

/// What the per-block check reads: the RAM, its ledger and in-flight blocks (as read once by
/// [`check_known`]) and the facts known without reading.
struct Blocks<'a, R: ?Sized> {
    ram: &'a R,
    params: &'a Params,
    ledger: &'a [u64],
    inflight: &'a [Option<u64>],
    known: KnownFacts<'a>,
}

impl<R: RamRead + ?Sized> Blocks<'_, R> {
    /// Checks the blocks in `range` (see [`check`]).
    fn check(
        self,
        range: std::ops::Range<u64>,
    ) -> Result<std::result::Result<KvmVerifyReport, KvmVerifyError>> {
        let layout = &self.params.layout;
        let dbsim = self.params.workload.kind == KvmWorkloadKind::Dbsim;
        let active = self.params.active_blocks();
        let mut report = KvmVerifyReport::default();
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        for b in range {
            report.blocks += 1;
            let is_inflight = self.inflight.contains(&Some(b));
            let led = self.ledger[b as usize];
            let must_be_zero = if dbsim {
                led == 0 && !is_inflight
            } else if b < active {
                // Other workloads promise nothing about the blocks they write.
                continue;
            } else {
                true
            };
            let facts = match (self.known)(b) {
                Some(facts) => facts,
                None => {
                    self.ram.read_bytes(layout.block_gpa(b), &mut block)?;
                    BlockFacts::of(&block)
                }
            };
            if must_be_zero {
                if !facts.zero {
                    return Ok(Err(KvmVerifyError::NotZero { block: b }));
                }
                continue;
            }
            report.versions += led;
            if is_inflight {
                report.inflight += 1;
            }
            report.written_blocks += 1;
            if is_inflight {
                // Mid-transaction: the header may be fresh or one version ahead.
                if facts.version != led && facts.version != led + 1 {
                    return Ok(Err(KvmVerifyError::VersionMismatch {
                        block: b,
                        version: facts.version,
                        ledger: led,
                    }));
                }
                continue;
            }
            if facts.number != b {
                return Ok(Err(KvmVerifyError::WrongNumber {
                    block: b,
                    found: facts.number,
                }));
            }
            if facts.version != led {
                return Ok(Err(KvmVerifyError::VersionMismatch {
                    block: b,
                    version: facts.version,
                    ledger: led,
                }));
            }
            if facts.stored != facts.computed {
                return Ok(Err(KvmVerifyError::Checksum {
                    block: b,
                    stored: facts.stored,
                    computed: facts.computed,
                }));
            }
        }
        Ok(Ok(report))
    }
}
