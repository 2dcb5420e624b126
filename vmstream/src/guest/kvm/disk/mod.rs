//! The KVM guest's disks: raw image files behind the VMM's paravirtual block device
//! ([`device`]), written by the `diskio` workload in the process guests' disk format
//! (stamped blocks, a ledger per disk in the disk area in guest RAM, `STORAGE.md`), and
//! checked by [`verify`].
//!
//! ```text
//! guest RAM:  [system area][dbsim ledger][blocks: [disk area][write buffer][checkpoint buffer] ... ]
//! ```
//! The disk area takes the first active blocks (the diskio workload promises nothing about
//! them to the memory verifier; the blocks past the active ones stay zero); the write
//! buffer, one disk block, follows it (the parameter block points at both), and the
//! checkpoint buffer, the largest disk's checkpoint region, follows that.

pub mod device;
pub mod verify;

use std::path::PathBuf;

use crate::disk::block::Disk;
use crate::guest::file::disks::area::{area_len, AreaHeader, DiskWorkloadKind};
use crate::guest::file::disks::{plan, DiskSetupError, GuestDisks};
use crate::guest::kvm::abi::{BLK_MAX_LEN, BLOCK_SIZE};
use crate::guest::kvm::error::{KvmError, Result};
use crate::guest::kvm::memory::{GuestRam, RamRead};
use crate::guest::kvm::params::Params;

// The guest program writes the process guests' disk area and block stamps: abi.h's copies
// of their offsets must be theirs.
const _: () = {
    use crate::guest::file::disks::area::{ckpt, da, CHECKPOINT_MAGIC};
    use crate::guest::file::layout::hdr;
    use crate::guest::kvm::abi::*;
    const fn same(a: u64, b: usize) -> bool {
        a == b as u64
    }
    assert!(same(DA_DISKS, da::DISKS) && same(DA_BLOCK_SIZE, da::BLOCK_SIZE));
    assert!(same(DA_SEED, da::SEED) && same(DA_RNG_STATE, da::RNG_STATE));
    assert!(same(DA_WRITES, da::WRITES) && same(DA_INTENT_SEQ, da::INTENT_SEQ));
    assert!(same(DA_INTENT_DISK, da::INTENT_DISK) && same(DA_INTENT_BLOCK, da::INTENT_BLOCK));
    assert!(same(DA_INTENT_VERSION, da::INTENT_VERSION));
    assert!(same(DA_CHECKPOINT_SEQ, da::CHECKPOINT_SEQ));
    assert!(same(CKPT_MAGIC, ckpt::MAGIC) && same(CKPT_DISK, ckpt::DISK));
    assert!(same(CKPT_SEQ, ckpt::SEQ) && same(CKPT_WRITES, ckpt::WRITES));
    assert!(same(CKPT_BLOCKS, ckpt::BLOCKS) && same(CKPT_CHECKSUM, ckpt::CHECKSUM));
    assert!(CKPT_MAGIC_VALUE == CHECKPOINT_MAGIC);
    assert!(same(
        CHECKPOINT_EVERY,
        crate::guest::file::disks::stamp::CHECKPOINT_EVERY as usize
    ));
    assert!(same(DA_DISK_BLOCKS, da::DISK_BLOCKS) && same(DA_LEDGER, da::LEDGER));
    assert!(same(BLOCK_HDR_NUMBER, hdr::BLOCK) && same(BLOCK_HDR_VERSION, hdr::VERSION));
    assert!(same(BLOCK_HDR_CHECKSUM, hdr::CHECKSUM) && same(IMG_BLOCK_LAST_TX, hdr::LAST_TX));
    assert!(same(
        BLOCK_HEADER_SIZE,
        crate::guest::file::layout::BLOCK_HEADER_SIZE
    ));
};

/// Opens (creating if asked) the disks of a fresh diskio guest and writes their disk area
/// into `ram` at the first block, recording it in `params`; returns the disks and the
/// workload's I/O rate.
pub(crate) fn format_disks(
    ram: &GuestRam,
    params: &mut Params,
    g: &GuestDisks,
) -> Result<(Vec<Disk>, u64)> {
    let p = g
        .workload
        .as_ref()
        .filter(|p| p.kind == DiskWorkloadKind::Diskio)
        .ok_or_else(|| {
            KvmError::Disks(DiskSetupError::Layout(
                "the diskio workload needs at least one --disk".into(),
            ))
        })?;
    let (disks, _, head) = plan(g, p, params.layout.memory_size)?;
    let len = area_len(&head.disks);
    let at = params.layout.blocks_gpa;
    let room = params.active_blocks() * BLOCK_SIZE;
    // A checkpoint is one request, built in the checkpoint buffer after the write buffer.
    let checkpoint = head.disks.iter().map(|g| g.checkpoint_len()).max();
    let checkpoint = checkpoint.unwrap_or(0);
    if checkpoint > BLK_MAX_LEN {
        return Err(KvmError::Disks(DiskSetupError::Layout(format!(
            "a disk's checkpoint of {checkpoint} bytes is longer than one block request \
             ({BLK_MAX_LEN} bytes): use a larger --io-size or smaller disks"
        ))));
    }
    if len + head.block_size + checkpoint > room {
        return Err(KvmError::Disks(DiskSetupError::Layout(format!(
            "the disks' ledgers ({len} bytes), a {}-byte write buffer and a {checkpoint}-byte \
             checkpoint buffer do not fit in the guest's {room} bytes of active blocks: give \
             it more RAM",
            head.block_size
        ))));
    }
    let mut area = vec![0u8; len as usize];
    head.format(&mut area);
    ram.write(at, &area)?;
    params.disk_area_gpa = at;
    params.disk_buffer_gpa = at + len;
    Ok((disks, p.io_rate))
}

/// The disk area of the guest in `ram` (`None`: it has none): its bytes, parsed header.
pub fn read_area<R: RamRead + ?Sized>(
    ram: &R,
    params: &Params,
) -> Result<Option<(Vec<u8>, AreaHeader)>> {
    if params.disk_area_gpa == 0 {
        return Ok(None);
    }
    let mut area = vec![0u8; (params.disk_buffer_gpa - params.disk_area_gpa) as usize];
    ram.read_bytes(params.disk_area_gpa, &mut area)?;
    let head =
        AreaHeader::read(&area).map_err(|e| KvmError::BadParams(format!("bad disk area: {e}")))?;
    Ok(Some((area, head)))
}

/// The disks of a restored guest: `paths` (the committed disks, in order) opened for the
/// block device and checked against its disk area (count and sizes); returns them and the
/// workload's I/O rate. A guest without a disk area writes none (its disks, if any, were
/// written by someone else).
pub(crate) fn open_restored(
    ram: &GuestRam,
    params: &Params,
    paths: &[PathBuf],
) -> Result<(Vec<Disk>, u64)> {
    let Some((_, head)) = read_area(ram, params)? else {
        return Ok((Vec::new(), 0));
    };
    if head.disks.len() != paths.len() {
        return Err(KvmError::Disks(DiskSetupError::Layout(format!(
            "the guest has {} disk(s), {} given",
            head.disks.len(),
            paths.len()
        ))));
    }
    let disks = paths
        .iter()
        .zip(&head.disks)
        .map(|(p, g)| Disk::open(p, Some(g.size), None).map_err(DiskSetupError::from))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((disks, head.io_rate))
}
