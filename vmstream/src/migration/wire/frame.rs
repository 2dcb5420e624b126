//! The frame layer: frame type tags with their payload bounds, the 12-byte frame header
//! (checked before any payload is read), and the typed errors of everything read from a peer.

use vmstream_codec::format::MAX_PACKET_LEN;

use super::{
    Abort, Audit, AuthChallenge, AuthHello, AuthProof, ChannelHello, CommitReply, Digest,
    DiskDigests, Disks, GuestSamples, GuestState, Handover, HandoverAck, HandoverDirty, Hello,
    HelloReply, MemoryHandover, MemoryRegions, MirrorAck, MirrorWrite, PageRequest,
    PostcopyComplete, PostcopyOwed, PostcopyPage, PostcopyPreempt, PostcopyReconnect,
    PostcopyStart, QemuIncoming, Resumed, RoundAck, RoundEnd, VerifyBacklog, MAX_GUEST_STATE_LEN,
    MAX_REASON_LEN,
};

/// Size of the frame header.
pub const FRAME_HEADER_LEN: usize = 12;
/// Size of the checksum after a control message body.
pub const BODY_CRC_LEN: usize = 4;

/// Frame type tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Source -> destination: handshake.
    Hello = 0x01,
    /// Destination -> source: handshake answer.
    HelloReply = 0x02,
    /// Source -> destination: binds a connection to a migration as one of its channels.
    ChannelHello = 0x03,
    /// Source -> destination: opens the key exchange (`--auth-key-file`).
    AuthHello = 0x04,
    /// Destination -> source: its proof of the key and its challenge.
    AuthChallenge = 0x05,
    /// Source -> destination: its proof of the key.
    AuthProof = 0x06,
    /// Source -> destination: the disks that travel with the guest (after the `Hello`).
    Disks = 0x07,
    /// Source -> destination: one codec packet, verbatim.
    Packet = 0x10,
    /// Source -> destination: end of a round.
    RoundEnd = 0x11,
    /// Destination -> source: the round's barrier passed.
    RoundAck = 0x12,
    /// Source -> destination: guest state taken at the pause.
    GuestState = 0x20,
    /// Source -> destination: digest of all source memory at the pause.
    Digest = 0x21,
    /// Destination -> source: committed or refused.
    CommitReply = 0x22,
    /// Destination -> source: the guest runs again (or the image is in place).
    Resumed = 0x23,
    /// Destination -> source: the resumed guest's transaction counter over time.
    GuestSamples = 0x24,
    /// Source -> destination: the source guest ended; the destination's copy may run.
    Handover = 0x25,
    /// Source -> destination: the paused guest's memory, as a file descriptor (unix sockets).
    MemoryHandover = 0x26,
    /// Source -> destination: its memory at the pause compared with what it sent.
    Audit = 0x27,
    /// Source -> destination: part of the list of pages post-copy still owes.
    PostcopyOwed = 0x28,
    /// Source -> destination: the owed list is complete; post-copy starts.
    PostcopyStart = 0x29,
    /// Destination -> source: the resumed guest faulted on an owed page.
    PageRequest = 0x2a,
    /// Source -> destination: an owed page.
    PostcopyPage = 0x2b,
    /// Destination -> source: the last owed page landed; the digests compared.
    PostcopyComplete = 0x2c,
    /// Source -> destination: a new connection continues a post-copy whose link dropped.
    PostcopyReconnect = 0x2d,
    /// Destination -> source: where the destination's QEMU takes the device state.
    QemuIncoming = 0x2e,
    /// Source -> destination: each disk's digest at the pause (after the `Digest`).
    DiskDigests = 0x2f,
    /// Source -> destination: disk pages the guest wrote while mirrored (`--disk-mode
    /// mirror`), on the mirror's connection; also its opening and end.
    MirrorWrite = 0x30,
    /// Destination -> source: the mirror's writes up to a sequence are applied.
    MirrorAck = 0x31,
    /// Source -> destination: a new connection carries post-copy's requested pages.
    PostcopyPreempt = 0x32,
    /// Source -> destination: guest memory's regions (after the `Hello`; QEMU RAM backends).
    MemoryRegions = 0x33,
    /// Source -> destination: pages the guest wrote into handed-over memory in a round.
    HandoverDirty = 0x34,
    /// Destination -> source: the pages of a handover's live round are checked.
    HandoverAck = 0x35,
    /// Destination -> source: what its workload verifier has yet to check, before a `RoundAck`.
    VerifyBacklog = 0x36,
    /// Either way: the sender gives up, with a reason.
    Abort = 0x7f,
}

impl FrameType {
    /// Every frame type.
    pub const ALL: [FrameType; 34] = [
        FrameType::Hello,
        FrameType::HelloReply,
        FrameType::ChannelHello,
        FrameType::AuthHello,
        FrameType::AuthChallenge,
        FrameType::AuthProof,
        FrameType::Disks,
        FrameType::Packet,
        FrameType::RoundEnd,
        FrameType::RoundAck,
        FrameType::GuestState,
        FrameType::Digest,
        FrameType::CommitReply,
        FrameType::Resumed,
        FrameType::GuestSamples,
        FrameType::Handover,
        FrameType::MemoryHandover,
        FrameType::Audit,
        FrameType::PostcopyOwed,
        FrameType::PostcopyStart,
        FrameType::PageRequest,
        FrameType::PostcopyPage,
        FrameType::PostcopyComplete,
        FrameType::PostcopyReconnect,
        FrameType::QemuIncoming,
        FrameType::DiskDigests,
        FrameType::MirrorWrite,
        FrameType::MirrorAck,
        FrameType::PostcopyPreempt,
        FrameType::MemoryRegions,
        FrameType::HandoverDirty,
        FrameType::HandoverAck,
        FrameType::VerifyBacklog,
        FrameType::Abort,
    ];

    /// The type with tag `tag`.
    pub fn from_tag(tag: u8) -> Option<FrameType> {
        FrameType::ALL.into_iter().find(|t| *t as u8 == tag)
    }

    /// Largest payload (body and CRC for control messages) a frame of this type may have.
    pub fn max_payload(self) -> usize {
        let body = match self {
            FrameType::Packet => return MAX_PACKET_LEN,
            FrameType::Hello => Hello::LEN,
            FrameType::HelloReply => HelloReply::FIXED_LEN + MAX_REASON_LEN,
            FrameType::ChannelHello => ChannelHello::LEN,
            FrameType::AuthHello => AuthHello::LEN,
            FrameType::AuthChallenge => AuthChallenge::LEN,
            FrameType::AuthProof => AuthProof::LEN,
            FrameType::Disks => Disks::FIXED_LEN + 8 * super::MAX_DISKS,
            FrameType::MemoryRegions => {
                MemoryRegions::FIXED_LEN + 8 * crate::memory::MAX_MEMORY_REGIONS
            }
            FrameType::RoundEnd => RoundEnd::LEN,
            FrameType::RoundAck => RoundAck::LEN,
            FrameType::GuestState => GuestState::FIXED_LEN + MAX_GUEST_STATE_LEN,
            FrameType::Digest => Digest::LEN,
            FrameType::CommitReply => CommitReply::FIXED_LEN + MAX_REASON_LEN,
            FrameType::Resumed => Resumed::LEN,
            FrameType::GuestSamples => GuestSamples::FIXED_LEN + 16 * GuestSamples::MAX_SAMPLES,
            FrameType::Handover => Handover::LEN,
            FrameType::MemoryHandover => MemoryHandover::LEN,
            FrameType::Audit => Audit::FIXED_LEN + 8 * Audit::MAX_PAGES,
            FrameType::PostcopyOwed => PostcopyOwed::FIXED_LEN + 8 * PostcopyOwed::MAX_PAGES,
            FrameType::PostcopyStart => PostcopyStart::LEN,
            FrameType::PageRequest => PageRequest::LEN,
            FrameType::PostcopyPage => PostcopyPage::LEN,
            FrameType::PostcopyComplete => PostcopyComplete::LEN,
            FrameType::PostcopyReconnect => PostcopyReconnect::LEN,
            FrameType::PostcopyPreempt => PostcopyPreempt::LEN,
            FrameType::QemuIncoming => QemuIncoming::FIXED_LEN + MAX_REASON_LEN,
            FrameType::DiskDigests => DiskDigests::FIXED_LEN + 32 * super::MAX_DISKS,
            FrameType::MirrorWrite => MirrorWrite::FIXED_LEN + super::MIRROR_MAX_PAGES * 4096,
            FrameType::MirrorAck => MirrorAck::LEN,
            FrameType::HandoverDirty => HandoverDirty::FIXED_LEN + 8 * HandoverDirty::MAX_PAGES,
            FrameType::HandoverAck => HandoverAck::LEN,
            FrameType::VerifyBacklog => VerifyBacklog::LEN,
            FrameType::Abort => Abort::FIXED_LEN + MAX_REASON_LEN,
        };
        body + BODY_CRC_LEN
    }

    /// Lower-case name for messages.
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Hello => "hello",
            FrameType::HelloReply => "hello-reply",
            FrameType::ChannelHello => "channel-hello",
            FrameType::AuthHello => "auth-hello",
            FrameType::AuthChallenge => "auth-challenge",
            FrameType::AuthProof => "auth-proof",
            FrameType::Disks => "disks",
            FrameType::MemoryRegions => "memory-regions",
            FrameType::Packet => "packet",
            FrameType::RoundEnd => "round-end",
            FrameType::RoundAck => "round-ack",
            FrameType::GuestState => "guest-state",
            FrameType::Digest => "digest",
            FrameType::CommitReply => "commit-reply",
            FrameType::Resumed => "resumed",
            FrameType::GuestSamples => "guest-samples",
            FrameType::Handover => "handover",
            FrameType::MemoryHandover => "memory-handover",
            FrameType::Audit => "audit",
            FrameType::PostcopyOwed => "postcopy-owed",
            FrameType::PostcopyStart => "postcopy-start",
            FrameType::PageRequest => "page-request",
            FrameType::PostcopyPage => "postcopy-page",
            FrameType::PostcopyComplete => "postcopy-complete",
            FrameType::PostcopyReconnect => "postcopy-reconnect",
            FrameType::PostcopyPreempt => "postcopy-preempt",
            FrameType::QemuIncoming => "qemu-incoming",
            FrameType::DiskDigests => "disk-digests",
            FrameType::MirrorWrite => "mirror-write",
            FrameType::MirrorAck => "mirror-ack",
            FrameType::HandoverDirty => "handover-dirty",
            FrameType::HandoverAck => "handover-ack",
            FrameType::VerifyBacklog => "verify-backlog",
            FrameType::Abort => "abort",
        }
    }
}

/// Why bytes from the peer are not a valid frame or message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame header's CRC32C does not match (corruption or lost framing).
    #[error("frame header checksum: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes that arrived.
        computed: u32,
    },
    /// Unknown frame type tag.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// Reserved header bits are set.
    #[error(
        "frame header flags/reserved must be 0, found flags {flags:#04x} reserved {reserved:#06x}"
    )]
    Reserved {
        /// Flags byte.
        flags: u8,
        /// Reserved u16.
        reserved: u16,
    },
    /// The declared payload length is above the type's maximum.
    #[error("{kind} frame of {len} bytes exceeds the maximum {max}")]
    Oversized {
        /// Frame type name.
        kind: &'static str,
        /// Declared length.
        len: u32,
        /// The maximum.
        max: usize,
    },
    /// A control message body's CRC32C does not match.
    #[error("{kind} body checksum: stored {stored:#010x}, computed {computed:#010x}")]
    BodyChecksum {
        /// Frame type name.
        kind: &'static str,
        /// CRC in the frame.
        stored: u32,
        /// CRC of the body that arrived.
        computed: u32,
    },
    /// A body has the wrong length for its type.
    #[error("{kind} body of {got} bytes, expected {expected}")]
    BodyLength {
        /// Frame type name.
        kind: &'static str,
        /// What the type needs (a description for variable-size bodies).
        expected: String,
        /// What arrived.
        got: usize,
    },
    /// A handshake does not start with the protocol magic.
    #[error("not a vmstream peer (magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: we speak {ours}, peer speaks {theirs}")]
    Version {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// A field holds a value this version does not define.
    #[error("{kind} field {field}: invalid value {value}")]
    BadField {
        /// Frame type name.
        kind: &'static str,
        /// Field name.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// A reason string is not UTF-8.
    #[error("{kind} reason is not UTF-8")]
    BadUtf8 {
        /// Frame type name.
        kind: &'static str,
    },
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The frame type.
    pub kind: FrameType,
    /// Payload length (checked against the type's maximum).
    pub len: u32,
}

impl FrameHeader {
    /// Serializes the header.
    pub fn encode(kind: FrameType, len: u32) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0] = kind as u8;
        h[4..8].copy_from_slice(&len.to_le_bytes());
        let crc = vmstream_simd::crc32c(&h[..8]);
        h[8..12].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks a header: CRC first (so corruption is reported as such), then
    /// type, reserved bits and the length bound.
    pub fn decode(h: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, WireError> {
        let stored = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        let computed = vmstream_simd::crc32c(&h[..8]);
        if stored != computed {
            return Err(WireError::HeaderChecksum { stored, computed });
        }
        let kind = FrameType::from_tag(h[0]).ok_or(WireError::UnknownType(h[0]))?;
        let reserved = u16::from_le_bytes([h[2], h[3]]);
        if h[1] != 0 || reserved != 0 {
            return Err(WireError::Reserved {
                flags: h[1],
                reserved,
            });
        }
        let len = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        if len as usize > kind.max_payload() {
            return Err(WireError::Oversized {
                kind: kind.name(),
                len,
                max: kind.max_payload(),
            });
        }
        Ok(FrameHeader { kind, len })
    }
}

/// The header of a frame carrying codec packet `packet`.
pub fn packet_frame_header(packet: &[u8]) -> [u8; FRAME_HEADER_LEN] {
    FrameHeader::encode(FrameType::Packet, packet.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_and_unknown_frames_are_refused_from_the_header() {
        let h = FrameHeader::encode(FrameType::RoundEnd, 1 << 20);
        assert!(matches!(
            FrameHeader::decode(&h),
            Err(WireError::Oversized {
                kind: "round-end",
                ..
            })
        ));
        let h = FrameHeader::encode(FrameType::Packet, MAX_PACKET_LEN as u32 + 1);
        assert!(matches!(
            FrameHeader::decode(&h),
            Err(WireError::Oversized { .. })
        ));
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0] = 0x55;
        let crc = vmstream_simd::crc32c(&h[..8]);
        h[8..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(FrameHeader::decode(&h), Err(WireError::UnknownType(0x55)));
        let mut h = FrameHeader::encode(FrameType::Abort, 8);
        h[1] = 1;
        let crc = vmstream_simd::crc32c(&h[..8]);
        h[8..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&h),
            Err(WireError::Reserved { flags: 1, .. })
        ));
    }
}
