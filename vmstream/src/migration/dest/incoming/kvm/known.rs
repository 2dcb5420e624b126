//! What the destination knows of every block of a KVM guest's RAM, kept current page by
//! page as pages land, so that the ledger check at the pause reads only what changed since
//! the last background pass: per block its pages' hashes, its facts and its ledger entry;
//! for the whole RAM the blocks that fail, the written blocks, the version sum and each
//! vCPU's ledger sum, as the full check ([`crate::guest::kvm::verify`]) would count them.

use crate::guest::kvm::abi::{
    BLOCK_SIZE, VCPU_AREA_GPA, VCPU_AREA_STRIDE, VCPU_INFLIGHT, VCPU_TX_COUNT,
};
use crate::guest::kvm::memory::RamRead;
use crate::guest::kvm::verify::BlockFacts;
use crate::guest::kvm::{KvmError, KvmVerifyReport, KvmWorkloadKind, Params};
use crate::memory::PAGE_SIZE;
use crate::migration::dest::verify::block_page_hashes;
use crate::migration::digest::PageHashes;

/// Pages per KVM block.
const BLOCK_PAGES: usize = (BLOCK_SIZE as usize).div_ceil(PAGE_SIZE);
// A block's hashes are kept in a [u128; 2] (`block_page_hashes`).
const _: () = assert!(BLOCK_PAGES <= 2);

/// One block as last seen.
#[derive(Clone, Copy, Debug, Default)]
struct BlockState {
    /// Hashes of the block's pages in the bytes `facts` describe.
    hashes: [u128; 2],
    facts: BlockFacts,
    /// The block's ledger entry, from the last copy of its ledger page.
    ledger: u64,
}

/// What one block adds to the check.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Verdict {
    passes: bool,
    written: u64,
    versions: u64,
}

/// Every block's state of a dbsim KVM guest and the sums over them.
pub struct KvmKnownBlocks {
    /// The parameter block the states are for.
    pub params: Params,
    blocks: Vec<BlockState>,
    zero: [u128; 2],
    /// Blocks failing their check, none counted as in flight.
    failing: u64,
    written: u64,
    versions: u64,
    /// Per vCPU, the sum of the ledger over its partition.
    partition_sums: Vec<u64>,
}

impl KvmKnownBlocks {
    /// The state of fresh RAM (all zero: every block passes) for a guest with `params`;
    /// `None` for the filedb workload (its image has its own verifier) or a ledger that does
    /// not start on a page.
    pub fn new(params: Params, zero_page: u128) -> Option<KvmKnownBlocks> {
        let layout = params.layout;
        if params.workload.kind == KvmWorkloadKind::FileDb
            || !layout.ledger_gpa.is_multiple_of(PAGE_SIZE as u64)
        {
            return None;
        }
        let mut zero = [0u128; 2];
        zero[..BLOCK_PAGES].fill(zero_page);
        let state = BlockState {
            hashes: zero,
            facts: BlockFacts {
                zero: true,
                ..BlockFacts::default()
            },
            ledger: 0,
        };
        Some(KvmKnownBlocks {
            blocks: vec![state; layout.block_count as usize],
            zero,
            failing: 0,
            written: 0,
            versions: 0,
            partition_sums: vec![0; params.vcpus as usize],
            params,
        })
    }

    /// What block `b` in state `st` adds to the check (see `Blocks::check` of the full one).
    fn verdict(&self, b: u64, st: &BlockState, inflight: bool) -> Verdict {
        let (led, f) = (st.ledger, st.facts);
        let must_be_zero = if self.params.workload.kind == KvmWorkloadKind::Dbsim {
            led == 0 && !inflight
        } else {
            // Other workloads promise nothing about the blocks they write.
            b >= self.params.active_blocks()
        };
        if must_be_zero || (self.params.workload.kind != KvmWorkloadKind::Dbsim) {
            let passes = !must_be_zero || f.zero;
            return Verdict {
                passes,
                written: 0,
                versions: 0,
            };
        }
        let passes = if inflight {
            f.version == led || f.version == led + 1
        } else {
            f.number == b && f.version == led && f.stored == f.computed
        };
        Verdict {
            passes,
            written: 1,
            versions: led,
        }
    }

    /// The vCPU whose partition holds block `b`, if any.
    fn owner(&self, b: u64) -> Option<usize> {
        (0..self.params.vcpus).position(|v| {
            let (start, end) = self.params.partition(v);
            (start..end).contains(&b)
        })
    }

    /// Changes block `b`'s state with `change`, keeping the sums current.
    fn update(&mut self, b: u64, change: impl FnOnce(&mut BlockState)) {
        let before = self.blocks[b as usize];
        let mut after = before;
        change(&mut after);
        let (old, new) = (
            self.verdict(b, &before, false),
            self.verdict(b, &after, false),
        );
        self.failing = self.failing + u64::from(!new.passes) - u64::from(!old.passes);
        self.written = self.written + new.written - old.written;
        self.versions = self
            .versions
            .wrapping_sub(old.versions)
            .wrapping_add(new.versions);
        if before.ledger != after.ledger {
            if let Some(v) = self.owner(b) {
                let sum = &mut self.partition_sums[v];
                *sum = sum.wrapping_sub(before.ledger).wrapping_add(after.ledger);
            }
        }
        self.blocks[b as usize] = after;
    }

    /// The first block whose ledger entry is on page `page`, if it is a ledger page.
    fn ledger_page_first_block(&self, page: u64) -> Option<u64> {
        let at = (page * PAGE_SIZE as u64).checked_sub(self.params.layout.ledger_gpa)?;
        let first = at / 8;
        (first < self.params.layout.block_count).then_some(first)
    }

    /// The block page `page` belongs to, if any.
    fn block_of_page(&self, page: u64) -> Option<u64> {
        let layout = &self.params.layout;
        let b = (page * PAGE_SIZE as u64).checked_sub(layout.blocks_gpa)? / BLOCK_SIZE;
        (b < layout.block_count).then_some(b)
    }

    /// Takes the ledger entries on page `page` from `bytes`, its contents.
    fn take_ledger_page(&mut self, page: u64, bytes: &[u8]) {
        let Some(first) = self.ledger_page_first_block(page) else {
            return;
        };
        let end = (first + (PAGE_SIZE / 8) as u64).min(self.params.layout.block_count);
        for (entry, b) in bytes.chunks_exact(8).zip(first..end) {
            let ledger = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            self.update(b, |st| st.ledger = ledger);
        }
    }

    /// Takes `pages` (ascending, a background pass's) from `ram`, a copy the codec may be
    /// writing: ledger pages and blocks are read whole and blocks hashed as read. Returns how
    /// many of `pages` it took before `stop` said so.
    pub fn take_pages<R: RamRead + ?Sized>(
        &mut self,
        ram: &R,
        pages: &[u64],
        mut stop: impl FnMut() -> bool,
    ) -> Result<usize, KvmError> {
        let mut page = vec![0u8; PAGE_SIZE];
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        let mut last = u64::MAX;
        for (i, &p) in pages.iter().enumerate() {
            if stop() {
                return Ok(i);
            }
            if self.ledger_page_first_block(p).is_some() {
                ram.read_bytes(p * PAGE_SIZE as u64, &mut page)?;
                self.take_ledger_page(p, &page);
                continue;
            }
            let Some(b) = self.block_of_page(p).filter(|&b| b != last) else {
                continue;
            };
            last = b;
            ram.read_bytes(self.params.layout.block_gpa(b), &mut block)?;
            let facts = BlockFacts::of(&block);
            let hashes = block_page_hashes(&block);
            self.update(b, |st| {
                st.hashes = hashes;
                st.facts = facts;
            });
        }
        Ok(pages.len())
    }

    /// Brings the state up to date with `ram` at the pause for `pending` (the pages applied
    /// since the last pass; `hashes` are their current hashes): ledger pages are read, and
    /// blocks whose hashes differ from their state's (on all cores: a lagging background
    /// can leave many). Returns how many ledger pages and blocks it read.
    pub fn catch_up<R: RamRead + Sync + ?Sized>(
        &mut self,
        ram: &R,
        pending: &[u64],
        hashes: &PageHashes,
    ) -> Result<u64, KvmError> {
        use rayon::prelude::*;
        let mut page = vec![0u8; PAGE_SIZE];
        let mut read = 0u64;
        let mut blocks = Vec::new();
        for &p in pending {
            if self.ledger_page_first_block(p).is_some() {
                ram.read_bytes(p * PAGE_SIZE as u64, &mut page)?;
                self.take_ledger_page(p, &page);
                read += 1;
            } else if let Some(b) = self.block_of_page(p) {
                if blocks.last() != Some(&b) {
                    blocks.push(b);
                }
            }
        }
        let stale: Vec<(u64, [u128; 2])> = blocks
            .into_iter()
            .map(|b| (b, self.hashes_now(hashes, b)))
            .filter(|&(b, now)| now != self.blocks[b as usize].hashes)
            .collect();
        let zero = self.zero;
        let layout = self.params.layout;
        let fresh: Vec<(u64, [u128; 2], BlockFacts)> = stale
            .par_iter()
            .map_init(
                || vec![0u8; BLOCK_SIZE as usize],
                |block, &(b, now)| {
                    if now == zero {
                        let facts = BlockFacts {
                            zero: true,
                            ..BlockFacts::default()
                        };
                        return Ok((b, now, facts));
                    }
                    ram.read_bytes(layout.block_gpa(b), block)?;
                    Ok((b, now, BlockFacts::of(block)))
                },
            )
            .collect::<Result<_, KvmError>>()?;
        read += fresh.iter().filter(|f| f.1 != zero).count() as u64;
        for (b, now, facts) in fresh {
            self.update(b, |st| {
                st.hashes = now;
                st.facts = facts;
            });
        }
        Ok(read)
    }

    /// Block `b`'s pages' hashes now.
    fn hashes_now(&self, hashes: &PageHashes, b: u64) -> [u128; 2] {
        let first = self.params.layout.block_gpa(b) / PAGE_SIZE as u64;
        let mut now = [0u128; 2];
        for (j, h) in now.iter_mut().enumerate().take(BLOCK_PAGES) {
            *h = hashes.get(first + j as u64);
        }
        now
    }

    /// Block `b`'s facts if its state describes its current bytes (as `hashes` say).
    pub fn facts(&self, b: u64, hashes: &PageHashes) -> Option<BlockFacts> {
        let st = self.blocks.get(b as usize)?;
        (st.hashes == self.hashes_now(hashes, b)).then_some(st.facts)
    }

    /// The full check's report if every block passes and the vCPUs' counters match their
    /// ledger sums, given the vCPU records in `ram` (the blocks in flight); `None`: something
    /// fails (the full check says what).
    pub fn report<R: RamRead + ?Sized>(&self, ram: &R) -> Option<KvmVerifyReport> {
        let mut counts = Vec::new();
        let mut inflight = Vec::new();
        for v in 0..self.params.vcpus {
            let rec = VCPU_AREA_GPA + v * VCPU_AREA_STRIDE;
            counts.push(ram.read_le_u64(rec + VCPU_TX_COUNT).ok()?);
            inflight.push(ram.read_le_u64(rec + VCPU_INFLIGHT).ok()?.checked_sub(1));
        }
        let (mut failing, mut written, mut versions, mut in_flight) =
            (self.failing, self.written, self.versions, 0u64);
        let mut seen: Vec<u64> = inflight.iter().flatten().copied().collect();
        seen.sort_unstable();
        seen.dedup();
        for &b in seen.iter().filter(|&&b| b < self.params.layout.block_count) {
            let st = &self.blocks[b as usize];
            let (was, is) = (self.verdict(b, st, false), self.verdict(b, st, true));
            failing = failing + u64::from(!is.passes) - u64::from(!was.passes);
            written = written + is.written - was.written;
            versions = versions
                .wrapping_sub(was.versions)
                .wrapping_add(is.versions);
            in_flight += is.written;
        }
        if failing != 0 {
            return None;
        }
        if self.params.workload.kind == KvmWorkloadKind::Dbsim {
            for (v, (&sum, &count)) in self.partition_sums.iter().zip(&counts).enumerate() {
                let ahead = inflight[v].is_some() && sum == count.wrapping_add(1);
                if sum != count && !ahead {
                    return None;
                }
            }
        }
        Some(KvmVerifyReport {
            blocks: self.params.layout.block_count,
            written_blocks: written,
            versions,
            inflight: in_flight,
        })
    }
}
