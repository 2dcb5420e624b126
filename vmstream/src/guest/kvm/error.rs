//! Typed errors of the KVM VMM.

use std::io;

use crate::guest::kvm::state::StateError;
use crate::guest::kvm::verify::KvmVerifyError;

/// Everything that can go wrong creating, running, pausing or restoring a guest.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Ioctl {
        /// Which operation.
        op: &'static str,
        /// The errno KVM returned.
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    /// The host KVM lacks something this VMM needs.
    #[error("KVM lacks {0}")]
    MissingCapability(&'static str),
    /// Creating, sizing or mapping guest RAM failed.
    #[error("guest memory: {0}")]
    Memory(#[source] io::Error),
    /// vm-memory refused an access or mapping.
    #[error("guest memory access: {0}")]
    GuestMemory(String),
    /// The configuration cannot describe a runnable guest.
    #[error("invalid guest configuration: {0}")]
    Config(String),
    /// Guest RAM does not hold a valid parameter block (restore from wrong memory).
    #[error("guest memory holds no valid parameter block: {0}")]
    BadParams(String),
    /// A vCPU stopped on an exit the VMM cannot handle.
    #[error("vCPU {vcpu} stopped: {reason}")]
    VcpuFailed {
        /// vCPU index.
        vcpu: usize,
        /// What happened.
        reason: String,
    },
    /// The operation needs a paused guest.
    #[error("the guest is not paused")]
    NotPaused,
    /// The operation needs a running guest.
    #[error("the guest is already paused")]
    AlreadyPaused,
    /// A saved state blob is invalid or does not fit this guest.
    #[error("vCPU state: {0}")]
    State(#[from] StateError),
    /// The guest's data broke an invariant.
    #[error("verification failed: {0}")]
    Verify(#[from] KvmVerifyError),
    /// The file-format image (filedb workload) could not be formatted.
    #[error("formatting the guest image: {0}")]
    ImageFormat(#[source] crate::guest::file::workload::WorkloadError),
    /// The file-format image (filedb workload) failed the file-backed verifier.
    #[error("image verification failed: {0}")]
    ImageVerify(#[source] crate::guest::file::verify::ImageVerifyError),
    /// A thread could not be started.
    #[error("cannot spawn thread: {0}")]
    Thread(#[source] io::Error),
    /// The guest's disks could not be set up or opened.
    #[error("disks: {0}")]
    Disks(#[from] crate::guest::file::disks::DiskSetupError),
    /// The guest's disks disagree with the ledgers in its RAM.
    #[error("disk verification failed: {0}")]
    DiskVerify(#[from] crate::guest::file::disks::verify::DiskVerifyError),
    /// A block request of the guest ended with an error status (the guest stops on it).
    #[error("vCPU {vcpu}'s block request failed with status {status} ({})", crate::guest::kvm::disk::device::status_name(*status))]
    BlockRequestFailed {
        /// The vCPU whose request record holds it.
        vcpu: u64,
        /// Its `BLK_STATUS_*`.
        status: u64,
    },
}

impl KvmError {
    /// Wraps an ioctl error with the operation name.
    pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> KvmError {
        move |source| KvmError::Ioctl { op, source }
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, KvmError>;
