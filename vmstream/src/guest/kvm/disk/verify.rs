//! The KVM guest's disk verifier: no vCPU's block request failed, and every block of every
//! disk agrees with the ledgers in guest RAM (a lost, stale, torn or misplaced block is
//! the process guests' typed [`DiskVerifyError`], checked by the same verifier,
//! [`verify_disk_area`]). Reads the disk files; writes nothing.

use std::path::PathBuf;

use crate::guest::file::disks::verify::{verify_disk_area, DiskVerifyError, DiskVerifyReport};
use crate::guest::kvm::abi::*;
use crate::guest::kvm::disk::read_area;
use crate::guest::kvm::error::{KvmError, Result};
use crate::guest::kvm::memory::RamRead;
use crate::guest::kvm::params::Params;

/// Verifies the disks at `paths` (in order) of the KVM guest whose RAM is `ram` (paused, or
/// a copy): `None` if it has no disk area and none were given.
pub fn verify_disks<R: RamRead + ?Sized>(
    ram: &R,
    paths: &[PathBuf],
) -> Result<Option<DiskVerifyReport>> {
    let params = Params::read_from(ram)?;
    for v in 0..params.vcpus {
        let status = ram.read_le_u64(VCPU_AREA_GPA + v * VCPU_AREA_STRIDE + VCPU_BLK_STATUS)?;
        // Pending: paused between arming the request and its kick.
        if status != BLK_STATUS_OK && status != BLK_STATUS_PENDING {
            return Err(KvmError::BlockRequestFailed { vcpu: v, status });
        }
    }
    let Some((area, _)) = read_area(ram, &params)? else {
        return match paths.is_empty() {
            true => Ok(None),
            false => Err(DiskVerifyError::NoDiskArea.into()),
        };
    };
    Ok(Some(verify_disk_area(&[], &area, paths)?))
}
