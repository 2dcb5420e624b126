//! Round barriers: the source's [`RoundEnd`] after a round's packets and the
//! destination's [`RoundAck`] once it applied them, after a live round preceded by its
//! [`VerifyBacklog`] when one was asked for.

use super::fields::{exact, Fields};
use super::{FrameType, WireError};

/// `RoundEnd` flag: this is the final round, sent with the guest paused.
pub const ROUND_FINAL: u32 = 1 << 0;
/// `RoundEnd` flag: the switchover was forced (timeout) rather than converged.
pub const ROUND_FORCED: u32 = 1 << 1;
/// `RoundEnd` flag (with [`ROUND_FINAL`]): the last pre-copy round; post-copy follows.
pub const ROUND_POSTCOPY: u32 = 1 << 2;

/// `RoundEnd`: all of a round's packets were sent (40-byte body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundEnd {
    /// The round.
    pub round: u64,
    /// Page records in the round's packets.
    pub records: u64,
    /// Packets in the round.
    pub packets: u64,
    /// Packet bytes in the round.
    pub packet_bytes: u64,
    /// `ROUND_*` flags.
    pub flags: u32,
}

impl RoundEnd {
    /// Body length.
    pub const LEN: usize = 40;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&self.records.to_le_bytes());
        out.extend_from_slice(&self.packets.to_le_bytes());
        out.extend_from_slice(&self.packet_bytes.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
    }

    pub(super) fn decode(body: &[u8]) -> Result<RoundEnd, WireError> {
        const K: FrameType = FrameType::RoundEnd;
        exact(K, body, Self::LEN)?;
        let mut f = Fields::new(body);
        let r = RoundEnd {
            round: f.u64(),
            records: f.u64(),
            packets: f.u64(),
            packet_bytes: f.u64(),
            flags: f.u32(),
        };
        let reserved = f.u32();
        if r.flags & !(ROUND_FINAL | ROUND_FORCED | ROUND_POSTCOPY) != 0 || reserved != 0 {
            return Err(WireError::BadField {
                kind: K.name(),
                field: "flags",
                value: r.flags as u64,
            });
        }
        Ok(r)
    }

    /// Whether this ends the final round.
    pub fn is_final(&self) -> bool {
        self.flags & ROUND_FINAL != 0
    }
}

/// `RoundAck`: the destination applied a round (32-byte body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundAck {
    /// The round.
    pub round: u64,
    /// Page records applied.
    pub records: u64,
    /// Packets applied.
    pub packets: u64,
    /// Time the destination waited at the round barrier, ns.
    pub barrier_ns: u64,
}

impl RoundAck {
    /// Body length.
    pub const LEN: usize = 32;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.round, self.records, self.packets, self.barrier_ns] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    pub(super) fn decode(body: &[u8]) -> Result<RoundAck, WireError> {
        exact(FrameType::RoundAck, body, Self::LEN)?;
        let mut f = Fields::new(body);
        Ok(RoundAck {
            round: f.u64(),
            records: f.u64(),
            packets: f.u64(),
            barrier_ns: f.u64(),
        })
    }
}

/// `VerifyBacklog` (with [`FEATURE_VERIFY_BACKLOG`](super::FEATURE_VERIFY_BACKLOG), just
/// before a live round's `RoundAck`, from a destination that verifies the resumed workload):
/// what its background verifier has not checked yet, which the verify at the pause would
/// check if the switchover came now (24-byte body). The source counts `expected_ns` in the
/// pause it expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyBacklog {
    /// The round whose acknowledgement follows.
    pub round: u64,
    /// Pages applied and not checked yet (this round's among them).
    pub pages: u64,
    /// The destination's estimate of checking them, ns, at the rate its passes ran.
    pub expected_ns: u64,
}

impl VerifyBacklog {
    /// Body length.
    pub const LEN: usize = 24;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.round, self.pages, self.expected_ns] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    pub(super) fn decode(body: &[u8]) -> Result<VerifyBacklog, WireError> {
        exact(FrameType::VerifyBacklog, body, Self::LEN)?;
        let mut f = Fields::new(body);
        Ok(VerifyBacklog {
            round: f.u64(),
            pages: f.u64(),
            expected_ns: f.u64(),
        })
    }
}
