//! Typed wire structs and framing of the migration protocol (see `PROTOCOL.md`, whose byte
//! tables these files follow).
//!
//! Every message travels in a frame: a 12-byte header (type, flags, reserved, payload
//! length, CRC32C of the first 8 header bytes) and the payload. Codec packets are carried
//! as-is (they have their own CRC32C); a control message's payload is its body followed by
//! the CRC32C of the body. Lengths are checked against a per-type maximum *before* any
//! buffer is allocated, so a peer cannot make us allocate unbounded memory.
//!
//! One file per part of the protocol, every type re-exported here:
//! - `frame`: [`FrameType`], [`FrameHeader`], [`WireError`], [`packet_frame_header`];
//! - `message`: [`Message`], the encode/decode dispatch of every control message;
//! - `auth`: the key exchange, [`AuthHello`], [`AuthChallenge`], [`AuthProof`];
//! - `hello`: the handshake, [`Hello`] and [`HelloReply`] ([`GuestKind`], [`DeltaWire`],
//!   [`RefuseCode`]), [`ChannelHello`], which opens each parallel channel, and
//!   [`MemoryRegions`], guest memory made of several files;
//! - `disk`: the disks that travel with the guest, [`Disks`] and [`DiskDigests`];
//! - `round`: the round barriers, [`RoundEnd`] and [`RoundAck`];
//! - `commit`: the switchover, [`GuestState`], [`Digest`] (or [`MemoryHandover`] with
//!   [`HandoverDirty`] and [`HandoverAck`]) and [`CommitReply`];
//! - `resume`: after the commit, [`QemuIncoming`] (QEMU guests), [`Handover`], [`Resumed`]
//!   and [`GuestSamples`];
//! - `postcopy`: the post-copy phase, [`PostcopyOwed`], [`PostcopyStart`], [`PageRequest`],
//!   [`PostcopyPage`], [`PostcopyComplete`], [`PostcopyReconnect`], [`PostcopyPreempt`];
//! - `abort`: [`Abort`], either side giving up;
//! - `fields`: the body reader and field checks the decoders share.

mod abort;
mod auth;
mod commit;
mod disk;
mod fields;
mod frame;
mod hello;
mod message;
mod postcopy;
mod resume;
mod round;
#[cfg(test)]
mod tests;

pub use crate::guest::GuestKind;
pub use abort::{Abort, AbortCode};
pub use auth::{AuthChallenge, AuthHello, AuthProof, AUTH_BYTES};
pub use commit::{
    CommitReply, CommitStatus, Digest, DigestSource, GuestState, HandoverAck, HandoverDirty,
    MemoryHandover, DIGEST_PAGE_HASHES, HANDOVER_MORE, HANDOVER_PAUSED, MAX_GUEST_STATE_LEN,
};
pub use disk::{
    DiskDigests, Disks, MirrorAck, MirrorWrite, MAX_DISKS, MAX_DISK_GRANULARITY,
    MIN_DISK_GRANULARITY, MIRROR_ACK, MIRROR_END, MIRROR_MAX_PAGES, MIRROR_OPEN,
};
pub use frame::{
    packet_frame_header, FrameHeader, FrameType, WireError, BODY_CRC_LEN, FRAME_HEADER_LEN,
};
pub use hello::{
    ChannelHello, DeltaWire, Hello, HelloReply, MemoryRegions, RefuseCode, MAX_CHANNELS,
};
pub use message::Message;
pub use postcopy::{
    PageRequest, PostcopyComplete, PostcopyOwed, PostcopyPage, PostcopyPreempt, PostcopyReconnect,
    PostcopyStart, PostcopyStatus, PAGE_REQUESTED,
};
pub use resume::{Audit, AuditStatus, GuestSamples, Handover, QemuIncoming, Resumed};
pub use round::{RoundAck, RoundEnd, VerifyBacklog, ROUND_FINAL, ROUND_FORCED, ROUND_POSTCOPY};

/// Magic at the start of `Hello` and `HelloReply`.
pub const MAGIC: [u8; 8] = *b"VMSTREAM";
/// Protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 6;
/// Longest human-readable reason carried in a refusal or abort.
pub const MAX_REASON_LEN: usize = 1024;

/// Feature bit: the sender may use delta encodings (XBZRLE, XOR+LZ4) against pages it
/// sent before; the receiver must keep every page it received.
pub const FEATURE_DELTA_PAGES: u64 = 1 << 0;
/// Feature bit: the switchover carries the memory digest of `digest.rs` (BLAKE3 over
/// per-page XXH3-128; mandatory).
pub const FEATURE_MEMORY_DIGEST: u64 = 1 << 1;
/// Feature bit: the migration uses several TCP connections (`--channels N`); a
/// [`ChannelHello`] follows the `Hello` on the first one and opens each of the others.
pub const FEATURE_CHANNELS: u64 = 1 << 2;
/// Feature bit: no pages travel; the paused guest's memory is handed over by file
/// descriptor ([`MemoryHandover`], unix sockets only, `send --handover`). Destinations
/// without it refuse the bit at the hello (unknown feature).
pub const FEATURE_HANDOVER: u64 = 1 << 3;
/// Feature bit: post-copy (`send --postcopy`, `POSTCOPY.md`): the guest resumes on the
/// destination before every page arrived, the rest follow on demand and in the background.
pub const FEATURE_POSTCOPY: u64 = 1 << 4;
/// Feature bit: disks travel with the guest ([`Disks`] follows the `Hello`, their pages
/// follow guest memory's in the codec's page numbers, [`DiskDigests`] follows the `Digest`).
pub const FEATURE_DISKS: u64 = 1 << 5;
/// Feature bit: guest memory is several files (a QEMU VM's RAM backends): [`MemoryRegions`]
/// follows the `Hello` (before any `Disks`), their pages one after the other in the codec's
/// page numbers, each committed into its own file.
pub const FEATURE_MEMORY_REGIONS: u64 = 1 << 6;
/// Feature bit (with [`FEATURE_POSTCOPY`], one channel): post-copy's requested pages travel
/// on a connection of their own ([`PostcopyPreempt`] opens it), not behind the background
/// stream on channel 0 (QEMU's postcopy-preempt; `POSTCOPY.md`, *Priority*).
pub const FEATURE_POSTCOPY_PREEMPT: u64 = 1 << 7;
/// Feature bit (with [`FEATURE_DISKS`]): the disks are mirrored after their bulk copy
/// (`--disk-mode mirror`): a [`MirrorWrite`] opening follows the `Disks`, and the guest's
/// writes travel on a connection of their own, each acknowledged ([`MirrorAck`]).
pub const FEATURE_MIRROR: u64 = 1 << 8;
/// Feature bit: the source asks a destination that verifies the resumed workload to say
/// before each live round's `RoundAck` how much its background verifier has yet to check
/// ([`VerifyBacklog`]); the source counts it in the pause it expects.
pub const FEATURE_VERIFY_BACKLOG: u64 = 1 << 9;
/// Every feature bit this version knows.
pub const KNOWN_FEATURES: u64 = FEATURE_DELTA_PAGES
    | FEATURE_MEMORY_DIGEST
    | FEATURE_CHANNELS
    | FEATURE_HANDOVER
    | FEATURE_POSTCOPY
    | FEATURE_DISKS
    | FEATURE_MEMORY_REGIONS
    | FEATURE_POSTCOPY_PREEMPT
    | FEATURE_MIRROR
    | FEATURE_VERIFY_BACKLOG;
