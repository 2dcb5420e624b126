//! What a process guest writes to its disks, through the block layer, at its I/O rate:
//! `diskio` (random whole-block writes) or dbsim's disk mode (write-back of the buffer
//! pool's dirty blocks, a redo log appended sequentially). Every write stamps its block
//! and follows the area's write intent, so memory and disks agree at any instant:
//!
//! 1. arm the intent (disk, block, new version, sequence `WRITES + 1`);
//! 2. write the block through the block layer;
//! 3. set the block's ledger entry, then `WRITES`; 4. disarm.
//!
//! A copy taken at any instant has each block at its ledger version, except the intent's
//! block, which may already hold the new one ([`super::verify`] accepts both).

use std::time::{Duration, Instant};

use crate::disk::block::{Disk, DiskError};
use crate::guest::file::disks::area::{da, disk_seed, AreaHeader, DiskWorkloadKind};
use crate::guest::file::disks::stamp::{
    log_block, stamped_fill, write_checkpoint, CHECKPOINT_EVERY,
};
use crate::guest::file::layout::{get_u64, put_u64, sb, splitmix64, Geometry};

/// The longest a redo record waits in the log buffer before it is written.
const LOG_FLUSH: Duration = Duration::from_millis(10);

/// Burst of the I/O pacing: this long at the I/O rate.
const IO_BURST: Duration = Duration::from_millis(100);

/// A guest's disks and the disk workload running on them.
pub struct DiskWorkload<'m> {
    area: &'m mut [u8],
    head: AreaHeader,
    disks: Vec<Disk>,
    budget: f64,
    paced_at: Instant,
    /// dbsim: memory blocks newer than their copy on disk (and a flag per block).
    dirty: Vec<u64>,
    is_dirty: Vec<bool>,
    /// dbsim: redo records not yet in a log block, and when the first was added.
    log_buf: Vec<u8>,
    log_last_tx: u64,
    log_since: Instant,
    since_checkpoint: u64,
    buf: Vec<u8>,
}

impl<'m> DiskWorkload<'m> {
    /// Runs on a formatted area ([`super::format_area`], then [`initial_writes`]) or, on
    /// resume, on disks verified against it; `mem` is the memory workload's memory (dbsim
    /// reads its blocks).
    pub fn attach(area: &'m mut [u8], disks: Vec<Disk>, mem: &[u8]) -> Result<Self, String> {
        let head = AreaHeader::read(area)?;
        if head.disks.len() != disks.len() {
            return Err(format!(
                "the guest has {} disks, {} given",
                head.disks.len(),
                disks.len()
            ));
        }
        let mut w = Self {
            buf: vec![0; head.block_size as usize],
            area,
            head,
            disks,
            budget: 0.0,
            paced_at: Instant::now(),
            dirty: Vec::new(),
            is_dirty: Vec::new(),
            log_buf: Vec::new(),
            log_last_tx: 0,
            log_since: Instant::now(),
            since_checkpoint: 0,
        };
        w.settle_intent(mem).map_err(|e| e.to_string())?;
        if w.head.kind == DiskWorkloadKind::Dbsim {
            let active = get_u64(mem, sb::ACTIVE_BLOCKS);
            w.is_dirty = vec![false; active as usize];
            let g = geometry(mem);
            for b in 0..active {
                let (d, db) = w.head.data_location(b);
                let on_disk = get_u64(w.area, w.head.ledger_entry(d, db));
                if get_u64(mem, g.ledger_entry(b)) > on_disk {
                    w.mark_dirty(b);
                }
            }
        }
        Ok(w)
    }

    /// The area's header.
    pub fn header(&self) -> &AreaHeader {
        &self.head
    }

    /// The disks.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// Finishes a write left in flight (intent armed: the guest was stopped or killed
    /// mid-write, and the block may hold the old version, the new one, or — killed inside
    /// its `pwrite` — a torn mix): writes the block again, whole, then commits it. Like
    /// replaying the memory journal, redoing is idempotent.
    fn settle_intent(&mut self, mem: &[u8]) -> Result<(), DiskError> {
        let seq = get_u64(self.area, da::INTENT_SEQ);
        if seq == 0 {
            return Ok(());
        }
        let d = get_u64(self.area, da::INTENT_DISK) as usize;
        let b = get_u64(self.area, da::INTENT_BLOCK);
        let mut version = get_u64(self.area, da::INTENT_VERSION);
        let (log_disk, log_first) = self.head.log_start_or_none();
        match self.head.kind {
            DiskWorkloadKind::Diskio => {
                stamped_fill(&mut self.buf, disk_seed(self.head.seed, d), b, version, seq)
            }
            DiskWorkloadKind::Dbsim if d == log_disk && b >= log_first => {
                // The records of a torn log block are gone (the log is not replayed).
                log_block(&mut self.buf, &[], b, version, get_u64(mem, sb::TX_COUNT));
            }
            DiskWorkloadKind::Dbsim => {
                let g = geometry(mem);
                let mb = b * self.head.data_disks + d as u64;
                let off = g.block_offset(mb);
                self.buf
                    .copy_from_slice(&mem[off..off + g.block_size as usize]);
                version = get_u64(mem, g.ledger_entry(mb));
            }
        }
        self.disks[d].write_at(b * self.head.block_size, &self.buf)?;
        put_u64(self.area, self.head.ledger_entry(d, b), version);
        put_u64(self.area, da::WRITES, seq);
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        put_u64(self.area, da::INTENT_SEQ, 0);
        Ok(())
    }

    fn mark_dirty(&mut self, b: u64) {
        if !self.is_dirty[b as usize] {
            self.is_dirty[b as usize] = true;
            self.dirty.push(b);
        }
    }

    /// dbsim: after each transaction of the memory workload: its block is dirty in the
    /// buffer pool, and its redo record (read from the journal) joins the log buffer.
    pub fn after_tx(&mut self, mem: &[u8]) {
        if self.head.kind != DiskWorkloadKind::Dbsim {
            return;
        }
        let block = get_u64(mem, sb::JOURNAL_BLOCK);
        let count = crate::guest::file::layout::get_u32(mem, sb::JOURNAL_COUNT) as usize;
        let tx = get_u64(mem, sb::TX_COUNT);
        self.mark_dirty(block);
        if self.log_buf.is_empty() {
            self.log_since = Instant::now();
        }
        self.log_buf.extend_from_slice(&tx.to_le_bytes());
        let record = sb::JOURNAL_BLOCK..sb::JOURNAL_UPDATES + count * 64;
        self.log_buf.extend_from_slice(&mem[record]);
        self.log_last_tx = tx;
    }

    /// Writes what is due at the I/O rate (0 = everything pending; diskio: as fast as
    /// it can, 64 writes a call).
    pub fn pump(&mut self, mem: &[u8]) -> Result<(), DiskError> {
        let rate = get_u64(self.area, da::IO_RATE);
        let bs = self.head.block_size as f64;
        let now = Instant::now();
        if rate != 0 {
            let cap = (rate as f64 * IO_BURST.as_secs_f64()).max(bs);
            let dt = now.duration_since(self.paced_at).as_secs_f64();
            self.budget = (self.budget + dt * rate as f64).min(cap);
        }
        self.paced_at = now;
        for _ in 0..64 {
            if rate != 0 && self.budget < bs {
                break;
            }
            if !self.write_next(mem)? {
                break;
            }
            self.budget -= bs;
        }
        Ok(())
    }

    /// One write, if one is due; returns whether it wrote.
    fn write_next(&mut self, mem: &[u8]) -> Result<bool, DiskError> {
        match self.head.kind {
            DiskWorkloadKind::Diskio => {
                let mut rng = get_u64(self.area, da::RNG_STATE);
                let d = (splitmix64(&mut rng) % self.disks.len() as u64) as usize;
                let b = splitmix64(&mut rng) % self.head.disks[d].blocks;
                put_u64(self.area, da::RNG_STATE, rng);
                let version = get_u64(self.area, self.head.ledger_entry(d, b)) + 1;
                let seq = get_u64(self.area, da::WRITES) + 1;
                stamped_fill(&mut self.buf, disk_seed(self.head.seed, d), b, version, seq);
                self.commit(d, b, version)?;
            }
            DiskWorkloadKind::Dbsim => {
                let full = self.log_buf.len() + 600 > self.buf.len() - 64;
                let log_due = !self.log_buf.is_empty()
                    && (full || self.dirty.is_empty() || self.log_since.elapsed() >= LOG_FLUSH);
                if log_due {
                    self.append_log()?;
                } else if !self.dirty.is_empty() {
                    self.write_back(mem)?;
                } else {
                    return Ok(false);
                }
            }
        }
        self.since_checkpoint += 1;
        if self.since_checkpoint >= CHECKPOINT_EVERY {
            self.checkpoint()?;
        }
        Ok(true)
    }

    /// dbsim: writes a random dirty block of the buffer pool back to its data disk.
    fn write_back(&mut self, mem: &[u8]) -> Result<(), DiskError> {
        let mut rng = get_u64(self.area, da::RNG_STATE);
        let i = (splitmix64(&mut rng) % self.dirty.len() as u64) as usize;
        put_u64(self.area, da::RNG_STATE, rng);
        let b = self.dirty.swap_remove(i);
        self.is_dirty[b as usize] = false;
        let g = geometry(mem);
        let off = g.block_offset(b);
        self.buf
            .copy_from_slice(&mem[off..off + g.block_size as usize]);
        let version = get_u64(mem, g.ledger_entry(b));
        let (d, db) = self.head.data_location(b);
        self.commit(d, db, version)
    }

    /// dbsim: writes the log buffer as the next log block (sequential, wrapping).
    fn append_log(&mut self) -> Result<(), DiskError> {
        let (d, first) = self.head.log_start();
        let n = get_u64(self.area, da::LOG_NEXT);
        let b = first + n % self.head.log_blocks;
        let version = get_u64(self.area, self.head.ledger_entry(d, b)) + 1;
        let take = self.log_buf.len().min(self.buf.len() - 64);
        log_block(
            &mut self.buf,
            &self.log_buf[..take],
            b,
            version,
            self.log_last_tx,
        );
        self.log_buf.drain(..take);
        self.commit(d, b, version)?;
        put_u64(self.area, da::LOG_NEXT, n + 1);
        Ok(())
    }

    /// Steps 1 to 4 of the module docs for the block in `self.buf`.
    fn commit(&mut self, d: usize, b: u64, version: u64) -> Result<(), DiskError> {
        let seq = get_u64(self.area, da::WRITES) + 1;
        put_u64(self.area, da::INTENT_DISK, d as u64);
        put_u64(self.area, da::INTENT_BLOCK, b);
        put_u64(self.area, da::INTENT_VERSION, version);
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        put_u64(self.area, da::INTENT_SEQ, seq);
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        self.disks[d].write_at(b * self.head.block_size, &self.buf)?;
        put_u64(self.area, self.head.ledger_entry(d, b), version);
        put_u64(self.area, da::WRITES, seq);
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        put_u64(self.area, da::INTENT_SEQ, 0);
        Ok(())
    }

    /// Writes every disk's ledger to its checkpoint region (the sequence is counted
    /// first: a copy taken mid-checkpoint has each disk at the new one or the one before).
    pub fn checkpoint(&mut self) -> Result<(), DiskError> {
        self.since_checkpoint = 0;
        let seq = get_u64(self.area, da::CHECKPOINT_SEQ) + 1;
        put_u64(self.area, da::CHECKPOINT_SEQ, seq);
        let writes = get_u64(self.area, da::WRITES);
        for d in 0..self.disks.len() {
            let g = self.head.disks[d];
            let at = self.head.ledgers[d];
            let ledger = &self.area[at..at + g.blocks as usize * 8];
            write_checkpoint(&mut self.disks[d], &g, d, seq, writes, ledger)?;
        }
        Ok(())
    }

    /// At a clean stop: the log buffer written, the pool's dirty blocks left dirty (a
    /// database does not flush its pool at every stop either), a last checkpoint.
    pub fn finish(&mut self) -> Result<(), DiskError> {
        if !self.log_buf.is_empty() {
            self.append_log()?;
        }
        self.checkpoint()
    }

    /// Disk writes committed (ever).
    pub fn writes(&self) -> u64 {
        get_u64(self.area, da::WRITES)
    }
}

/// The memory workload's geometry, read from its superblock.
fn geometry(mem: &[u8]) -> Geometry {
    Geometry {
        memory_size: get_u64(mem, sb::MEMORY_SIZE),
        block_size: get_u64(mem, sb::BLOCK_SIZE),
        block_count: get_u64(mem, sb::BLOCK_COUNT),
        data_offset: get_u64(mem, sb::DATA_OFFSET),
    }
}

/// Writes the initial contents of freshly formatted disks: dbsim's database (every
/// active memory block at its version, through the block layer) and a first checkpoint.
pub fn initial_writes(w: &mut DiskWorkload<'_>, mem: &[u8]) -> Result<(), DiskError> {
    if w.head.kind == DiskWorkloadKind::Dbsim {
        while !w.dirty.is_empty() {
            w.write_back(mem)?;
        }
    }
    w.checkpoint()
}
