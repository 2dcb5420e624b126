//! Guest disks: raw image files written through a block layer that marks each disk's
//! hierarchical dirty bitmap (a file both the guest and the sender map), with a write
//! limiter the sender can tighten, and write-through mirroring (`STORAGE.md`).

pub mod bitmap;
pub mod block;
pub mod limiter;
pub mod mirror;
pub mod shared;

/// Most disks a guest has.
pub const MAX_DISKS: usize = 16;
