//! The switchover: the paused guest's [`GuestState`] and memory [`Digest`] (or, in a
//! handover, its memory itself: [`MemoryHandover`], and the pages the guest rewrote since:
//! [`HandoverDirty`], [`HandoverAck`]), and the destination's verdict, [`CommitReply`].

use super::fields::{at_least, exact, push_reason, reason_of, Fields};
use super::{FrameType, GuestKind, WireError, MAX_REASON_LEN};

/// Largest opaque guest state blob (room for vCPU state of a KVM guest).
pub const MAX_GUEST_STATE_LEN: usize = 1 << 20;

/// `GuestState`: the guest's non-memory state at the pause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestState {
    /// Kind of guest (must match the handshake).
    pub guest_kind: GuestKind,
    /// Transactions the guest had committed at the pause (file-backed guests).
    pub tx_count: u64,
    /// Opaque state (vCPU registers of a KVM guest; empty for file-backed guests).
    pub blob: Vec<u8>,
}

impl GuestState {
    /// Body length without the blob.
    pub const FIXED_LEN: usize = 16;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.guest_kind as u8);
        out.extend_from_slice(&[0; 7]);
        out.extend_from_slice(&self.tx_count.to_le_bytes());
        out.extend_from_slice(&self.blob);
    }

    pub(super) fn decode(body: &[u8]) -> Result<GuestState, WireError> {
        const K: FrameType = FrameType::GuestState;
        at_least(K, body, Self::FIXED_LEN, MAX_GUEST_STATE_LEN)?;
        let mut f = Fields::new(body);
        let tag = f.u8();
        let guest_kind = super::hello::guest_kind_from_tag(tag).ok_or(WireError::BadField {
            kind: K.name(),
            field: "guest_kind",
            value: tag as u64,
        })?;
        f.bytes(7);
        Ok(GuestState {
            guest_kind,
            tx_count: f.u64(),
            blob: f.rest().to_vec(),
        })
    }
}

/// Digest algorithm tag: BLAKE3 over XXH3-128 group hashes of 64 pages' XXH3-128
/// (`digest.rs`). Tag 1 was BLAKE3 over all memory (protocol version 1), tag 2 BLAKE3 over
/// every page's hash (versions 2-4).
pub const DIGEST_PAGE_HASHES: u8 = 3;

/// How the source took its digest (`Digest.verification`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DigestSource {
    /// From all of its memory, read at the pause (`--verify full`).
    Memory = 0,
    /// From the hash of every page as it was sent (`--verify incremental|strict`): the
    /// source's memory is checked against it after the commit, and an [`super::Audit`]
    /// follows the `Handover`.
    SentPages = 1,
}

/// `Digest`: the memory digest of all source memory at the pause (56-byte body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    /// How the source took it.
    pub verification: DigestSource,
    /// The 32-byte memory digest (`digest::memory_digest`).
    pub digest: [u8; 32],
    /// Bytes hashed (the guest size).
    pub guest_size: u64,
    /// CLOCK_REALTIME instant of the pause, ns since the Unix epoch (downtime start).
    pub paused_at_unix_ns: u64,
}

impl Digest {
    /// Body length.
    pub const LEN: usize = 56;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.push(DIGEST_PAGE_HASHES);
        out.push(self.verification as u8);
        out.extend_from_slice(&[0; 6]);
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&self.guest_size.to_le_bytes());
        out.extend_from_slice(&self.paused_at_unix_ns.to_le_bytes());
    }

    pub(super) fn decode(body: &[u8]) -> Result<Digest, WireError> {
        const K: FrameType = FrameType::Digest;
        exact(K, body, Self::LEN)?;
        let mut f = Fields::new(body);
        let alg = f.u8();
        if alg != DIGEST_PAGE_HASHES {
            return Err(WireError::BadField {
                kind: K.name(),
                field: "algorithm",
                value: alg as u64,
            });
        }
        let verification = match f.u8() {
            0 => DigestSource::Memory,
            1 => DigestSource::SentPages,
            v => {
                return Err(WireError::BadField {
                    kind: K.name(),
                    field: "verification",
                    value: v as u64,
                })
            }
        };
        f.bytes(6);
        Ok(Digest {
            verification,
            digest: f.bytes(32).try_into().expect("32 bytes"),
            guest_size: f.u64(),
            paused_at_unix_ns: f.u64(),
        })
    }
}

/// `MemoryHandover`: the guest's memory itself, as a file descriptor passed with this
/// frame's first byte over a unix socket (`SCM_RIGHTS`), instead of its pages (24-byte body;
/// `send --handover`). Sent while the guest still runs: the destination checks the memory
/// in the background while [`HandoverDirty`] lists tell it what the guest rewrote since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryHandover {
    /// Bytes of guest memory: the size the descriptor's file must have.
    pub guest_size: u64,
}

impl MemoryHandover {
    /// Body length.
    pub const LEN: usize = 24;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.guest_size.to_le_bytes());
        out.extend_from_slice(&[0; 16]);
    }

    pub(super) fn decode(body: &[u8]) -> Result<MemoryHandover, WireError> {
        const K: FrameType = FrameType::MemoryHandover;
        exact(K, body, Self::LEN)?;
        let mut f = Fields::new(body);
        let guest_size = f.u64();
        for field in ["reserved", "reserved"] {
            let v = f.u64();
            if v != 0 {
                return Err(WireError::BadField {
                    kind: K.name(),
                    field,
                    value: v,
                });
            }
        }
        Ok(MemoryHandover { guest_size })
    }
}

/// [`HandoverDirty`] flag: the guest is paused and this round's list is the last.
pub const HANDOVER_PAUSED: u32 = 1 << 0;
/// [`HandoverDirty`] flag: another `HandoverDirty` of the same round follows.
pub const HANDOVER_MORE: u32 = 1 << 1;

/// `HandoverDirty`: part of the pages the guest wrote into the handed-over memory during a
/// round (24-byte header + 8 per page, strictly ascending, at most
/// [`HandoverDirty::MAX_PAGES`]). The destination checks them again; it answers the last
/// part of a live round with a [`HandoverAck`], and the last part of the paused round with
/// its `CommitReply`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverDirty {
    /// The round, from 1; the same in every part of a round.
    pub round: u32,
    /// [`HANDOVER_PAUSED`], [`HANDOVER_MORE`].
    pub flags: u32,
    /// With [`HANDOVER_PAUSED`]: CLOCK_REALTIME of the pause, ns since the Unix epoch (the
    /// downtime's start); 0 otherwise.
    pub paused_at_unix_ns: u64,
    /// Page numbers, strictly ascending.
    pub pages: Vec<u64>,
}

impl HandoverDirty {
    /// Fixed part of the body.
    pub const FIXED_LEN: usize = 24;
    /// Most pages one message lists.
    pub const MAX_PAGES: usize = 8192;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.paused_at_unix_ns.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for p in &self.pages {
            out.extend_from_slice(&p.to_le_bytes());
        }
    }

    pub(super) fn decode(body: &[u8]) -> Result<HandoverDirty, WireError> {
        const K: FrameType = FrameType::HandoverDirty;
        at_least(K, body, Self::FIXED_LEN, 8 * Self::MAX_PAGES)?;
        let mut f = Fields::new(body);
        let (round, flags, paused_at_unix_ns) = (f.u32(), f.u32(), f.u64());
        let count = f.u32() as usize;
        let reserved = f.u32();
        let bad = |field, value| WireError::BadField {
            kind: K.name(),
            field,
            value,
        };
        if round == 0 {
            return Err(bad("round", 0));
        }
        if flags & !(HANDOVER_PAUSED | HANDOVER_MORE) != 0 {
            return Err(bad("flags", u64::from(flags)));
        }
        if (flags & HANDOVER_PAUSED != 0) != (paused_at_unix_ns != 0) {
            return Err(bad("paused_at_unix_ns", paused_at_unix_ns));
        }
        if reserved != 0 {
            return Err(bad("reserved", u64::from(reserved)));
        }
        exact(K, body, Self::FIXED_LEN + 8 * count)?;
        let pages: Vec<u64> = (0..count).map(|_| f.u64()).collect();
        if let Some(w) = pages.windows(2).find(|w| w[0] >= w[1]) {
            return Err(bad("pages (not strictly ascending)", w[1]));
        }
        Ok(HandoverDirty {
            round,
            flags,
            paused_at_unix_ns,
            pages,
        })
    }
}

/// `HandoverAck`: the destination checked every page of the handed-over memory the source
/// listed up to `round` (16-byte body), and how many pages it read for that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoverAck {
    /// The live round whose last [`HandoverDirty`] this answers.
    pub round: u32,
    /// Pages the destination's checks took since the previous acknowledgement.
    pub pages_checked: u64,
}

impl HandoverAck {
    /// Body length.
    pub const LEN: usize = 16;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.pages_checked.to_le_bytes());
    }

    pub(super) fn decode(body: &[u8]) -> Result<HandoverAck, WireError> {
        const K: FrameType = FrameType::HandoverAck;
        exact(K, body, Self::LEN)?;
        let mut f = Fields::new(body);
        let round = f.u32();
        let reserved = f.u32();
        if reserved != 0 {
            return Err(WireError::BadField {
                kind: K.name(),
                field: "reserved",
                value: u64::from(reserved),
            });
        }
        Ok(HandoverAck {
            round,
            pages_checked: f.u64(),
        })
    }
}

/// Outcome carried by `CommitReply`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CommitStatus {
    /// The image is committed at the destination path.
    Committed = 0,
    /// The destination's digest differs; nothing was committed.
    DigestMismatch = 1,
    /// The destination could not commit (I/O); nothing was committed.
    Failed = 2,
    /// The guest state was invalid or did not fit the memory; nothing was committed.
    StateRejected = 3,
}

/// `CommitReply`: the destination's verdict on the switchover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitReply {
    /// The verdict.
    pub status: CommitStatus,
    /// The digest the destination computed over its memory.
    pub digest: [u8; 32],
    /// Reason (empty when committed).
    pub reason: String,
}

impl CommitReply {
    /// Body length without the reason.
    pub const FIXED_LEN: usize = 42;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.status as u8);
        out.extend_from_slice(&[0; 7]);
        out.extend_from_slice(&self.digest);
        push_reason(out, &self.reason);
    }

    pub(super) fn decode(body: &[u8]) -> Result<CommitReply, WireError> {
        const K: FrameType = FrameType::CommitReply;
        at_least(K, body, Self::FIXED_LEN, MAX_REASON_LEN)?;
        let mut f = Fields::new(body);
        let tag = f.u8();
        let status = match tag {
            0 => CommitStatus::Committed,
            1 => CommitStatus::DigestMismatch,
            2 => CommitStatus::Failed,
            3 => CommitStatus::StateRejected,
            t => {
                return Err(WireError::BadField {
                    kind: K.name(),
                    field: "status",
                    value: t as u64,
                })
            }
        };
        f.bytes(7);
        let digest = f.bytes(32).try_into().expect("32 bytes");
        let reason = reason_of(K, &mut f)?;
        Ok(CommitReply {
            status,
            digest,
            reason,
        })
    }
}
