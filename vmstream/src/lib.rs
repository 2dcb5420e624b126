//! vmstream: pre-copy live migration of guest memory.

pub mod converge;
pub mod dirty;
pub mod guest;
pub mod kvm;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod plot;
pub mod sampler;
pub mod throttle;
pub mod uffd;
pub mod units;
pub mod verify;
pub mod workload;
