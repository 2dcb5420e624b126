//! vmstream: pre-copy live migration of guest memory.

pub mod dirty;
pub mod kvm;
pub mod layout;
pub mod memory;
pub mod uffd;
pub mod verify;
pub mod workload;
