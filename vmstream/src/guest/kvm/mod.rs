//! A minimal KVM VMM whose guests can be live-migrated.
//!
//! The guest program (`guest-asm/guest.S`) runs natively at CPL 3 in 64-bit
//! long mode on an identity map of guest RAM, one stream per vCPU, and talks
//! to the VMM only through port I/O (IOPL 3). Guest RAM is a MAP_SHARED
//! memfd or file, so a KVM guest is also a file-backed guest.
//!
//! Entry points: [`KvmGuest::start`], [`KvmGuest::pause`] -> [`VmState`]
//! (serialize with [`VmState::to_bytes`]), [`KvmGuest::resume`],
//! [`KvmGuest::restore`], [`KvmGuest::dirty_log`], [`KvmGuest::transactions`],
//! [`KvmGuest::verify`], [`KvmGuest::set_throttle`]. Formats and protocol:
//! `vmstream/KVM.md`.

#![warn(missing_docs)]

/// The guest ABI: constants generated from `guest-asm/abi.h` (the single source
/// shared with the guest program) and the guest program itself.
pub mod abi {
    #![allow(missing_docs)] // every constant carries the comment from abi.h

    include!(concat!(env!("OUT_DIR"), "/guest_abi.rs"));

    /// The guest program: the flat `.text` of `guest-asm/guest.S`, loaded at
    /// [`CODE_GPA`] and entered at its first byte.
    pub const GUEST_PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));
}
pub mod disk;
pub mod error;
mod guest;
mod machine;
pub mod memory;
pub mod params;
pub mod run;
pub mod setup;
pub mod source;
pub mod state;
mod vcpu;
pub mod verify;

pub use crate::track::kvm::{DirtyBitmap, DirtyLog, DirtyLogMode, DirtyLogStats};
pub use error::{KvmError, Result};
pub use guest::{kvm_available, KvmGuest, KvmGuestConfig, RestoreConfig, THROTTLE_PERIOD};
pub use memory::{GuestRam, RamRead};
pub use params::{GuestLayout, KvmWorkloadKind, Params, WorkloadConfig};
pub use state::{StateError, VcpuState, VmState};
pub use verify::{KvmVerifyError, KvmVerifyReport};
