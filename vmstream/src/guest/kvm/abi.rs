//! The guest ABI: constants generated from `guest-asm/abi.h` (the single source
//! shared with the guest program) and the guest program itself.

#![allow(missing_docs)] // every constant carries the comment from abi.h

include!(concat!(env!("OUT_DIR"), "/guest_abi.rs"));

/// The guest program: the flat `.text` of `guest-asm/guest.S`, loaded at
/// [`CODE_GPA`] and entered at its first byte.
pub const GUEST_PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));
