//! [`Message`], every control message, and its framing: header, body and body CRC32C on
//! the way out; CRC check and typed decode of the body on the way in.

use super::{
    Abort, Audit, AuthChallenge, AuthHello, AuthProof, ChannelHello, CommitReply, Digest,
    DiskDigests, Disks, FrameHeader, FrameType, GuestSamples, GuestState, Handover, HandoverAck,
    HandoverDirty, Hello, HelloReply, MemoryHandover, MemoryRegions, MirrorAck, MirrorWrite,
    PageRequest, PostcopyComplete, PostcopyOwed, PostcopyPage, PostcopyPreempt, PostcopyReconnect,
    PostcopyStart, QemuIncoming, Resumed, RoundAck, RoundEnd, VerifyBacklog, WireError,
    BODY_CRC_LEN, FRAME_HEADER_LEN,
};

/// A control message (everything but codec packets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloReply`].
    HelloReply(HelloReply),
    /// See [`ChannelHello`].
    ChannelHello(ChannelHello),
    /// See [`AuthHello`].
    AuthHello(AuthHello),
    /// See [`AuthChallenge`].
    AuthChallenge(AuthChallenge),
    /// See [`AuthProof`].
    AuthProof(AuthProof),
    /// See [`RoundEnd`].
    RoundEnd(RoundEnd),
    /// See [`RoundAck`].
    RoundAck(RoundAck),
    /// See [`GuestState`].
    GuestState(GuestState),
    /// See [`Digest`].
    Digest(Digest),
    /// See [`CommitReply`].
    CommitReply(CommitReply),
    /// See [`Resumed`].
    Resumed(Resumed),
    /// See [`GuestSamples`].
    GuestSamples(GuestSamples),
    /// See [`Handover`].
    Handover(Handover),
    /// See [`MemoryHandover`].
    MemoryHandover(MemoryHandover),
    /// See [`Audit`].
    Audit(Audit),
    /// See [`PostcopyOwed`].
    PostcopyOwed(PostcopyOwed),
    /// See [`PostcopyStart`].
    PostcopyStart(PostcopyStart),
    /// See [`PageRequest`].
    PageRequest(PageRequest),
    /// See [`PostcopyPage`].
    PostcopyPage(PostcopyPage),
    /// See [`PostcopyComplete`].
    PostcopyComplete(PostcopyComplete),
    /// See [`PostcopyReconnect`].
    PostcopyReconnect(PostcopyReconnect),
    /// See [`PostcopyPreempt`].
    PostcopyPreempt(PostcopyPreempt),
    /// See [`QemuIncoming`].
    QemuIncoming(QemuIncoming),
    /// See [`Disks`].
    Disks(Disks),
    /// See [`MemoryRegions`].
    MemoryRegions(MemoryRegions),
    /// See [`DiskDigests`].
    DiskDigests(DiskDigests),
    /// See [`MirrorWrite`].
    MirrorWrite(MirrorWrite),
    /// See [`MirrorAck`].
    MirrorAck(MirrorAck),
    /// See [`HandoverDirty`].
    HandoverDirty(HandoverDirty),
    /// See [`HandoverAck`].
    HandoverAck(HandoverAck),
    /// See [`VerifyBacklog`].
    VerifyBacklog(VerifyBacklog),
    /// See [`Abort`].
    Abort(Abort),
}

impl Message {
    /// The frame type of this message.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Message::Hello(_) => FrameType::Hello,
            Message::HelloReply(_) => FrameType::HelloReply,
            Message::ChannelHello(_) => FrameType::ChannelHello,
            Message::AuthHello(_) => FrameType::AuthHello,
            Message::AuthChallenge(_) => FrameType::AuthChallenge,
            Message::AuthProof(_) => FrameType::AuthProof,
            Message::RoundEnd(_) => FrameType::RoundEnd,
            Message::RoundAck(_) => FrameType::RoundAck,
            Message::GuestState(_) => FrameType::GuestState,
            Message::Digest(_) => FrameType::Digest,
            Message::CommitReply(_) => FrameType::CommitReply,
            Message::Resumed(_) => FrameType::Resumed,
            Message::GuestSamples(_) => FrameType::GuestSamples,
            Message::Handover(_) => FrameType::Handover,
            Message::MemoryHandover(_) => FrameType::MemoryHandover,
            Message::Audit(_) => FrameType::Audit,
            Message::PostcopyOwed(_) => FrameType::PostcopyOwed,
            Message::PostcopyStart(_) => FrameType::PostcopyStart,
            Message::PageRequest(_) => FrameType::PageRequest,
            Message::PostcopyPage(_) => FrameType::PostcopyPage,
            Message::PostcopyComplete(_) => FrameType::PostcopyComplete,
            Message::PostcopyReconnect(_) => FrameType::PostcopyReconnect,
            Message::PostcopyPreempt(_) => FrameType::PostcopyPreempt,
            Message::QemuIncoming(_) => FrameType::QemuIncoming,
            Message::Disks(_) => FrameType::Disks,
            Message::MemoryRegions(_) => FrameType::MemoryRegions,
            Message::DiskDigests(_) => FrameType::DiskDigests,
            Message::MirrorWrite(_) => FrameType::MirrorWrite,
            Message::MirrorAck(_) => FrameType::MirrorAck,
            Message::HandoverDirty(_) => FrameType::HandoverDirty,
            Message::HandoverAck(_) => FrameType::HandoverAck,
            Message::VerifyBacklog(_) => FrameType::VerifyBacklog,
            Message::Abort(_) => FrameType::Abort,
        }
    }

    /// The whole frame: header, body, body CRC.
    pub fn to_frame(&self) -> Vec<u8> {
        let mut out = vec![0u8; FRAME_HEADER_LEN];
        match self {
            Message::Hello(m) => m.encode(&mut out),
            Message::HelloReply(m) => m.encode(&mut out),
            Message::ChannelHello(m) => m.encode(&mut out),
            Message::AuthHello(m) => m.encode(&mut out),
            Message::AuthChallenge(m) => m.encode(&mut out),
            Message::AuthProof(m) => m.encode(&mut out),
            Message::RoundEnd(m) => m.encode(&mut out),
            Message::RoundAck(m) => m.encode(&mut out),
            Message::GuestState(m) => m.encode(&mut out),
            Message::Digest(m) => m.encode(&mut out),
            Message::CommitReply(m) => m.encode(&mut out),
            Message::Resumed(m) => m.encode(&mut out),
            Message::GuestSamples(m) => m.encode(&mut out),
            Message::Handover(m) => m.encode(&mut out),
            Message::MemoryHandover(m) => m.encode(&mut out),
            Message::Audit(m) => m.encode(&mut out),
            Message::PostcopyOwed(m) => m.encode(&mut out),
            Message::PostcopyStart(m) => m.encode(&mut out),
            Message::PageRequest(m) => m.encode(&mut out),
            Message::PostcopyPage(m) => m.encode(&mut out),
            Message::PostcopyComplete(m) => m.encode(&mut out),
            Message::PostcopyReconnect(m) => m.encode(&mut out),
            Message::PostcopyPreempt(m) => m.encode(&mut out),
            Message::QemuIncoming(m) => m.encode(&mut out),
            Message::Disks(m) => m.encode(&mut out),
            Message::MemoryRegions(m) => m.encode(&mut out),
            Message::DiskDigests(m) => m.encode(&mut out),
            Message::MirrorWrite(m) => m.encode(&mut out),
            Message::MirrorAck(m) => m.encode(&mut out),
            Message::HandoverDirty(m) => m.encode(&mut out),
            Message::HandoverAck(m) => m.encode(&mut out),
            Message::VerifyBacklog(m) => m.encode(&mut out),
            Message::Abort(m) => m.encode(&mut out),
        }
        let crc = vmstream_simd::crc32c(&out[FRAME_HEADER_LEN..]);
        out.extend_from_slice(&crc.to_le_bytes());
        let len = (out.len() - FRAME_HEADER_LEN) as u32;
        out[..FRAME_HEADER_LEN].copy_from_slice(&FrameHeader::encode(self.frame_type(), len));
        out
    }

    /// Parses the payload of a control frame of type `kind`: checks the body CRC, then
    /// decodes the typed body. `kind` must not be [`FrameType::Packet`].
    pub fn decode(kind: FrameType, payload: &[u8]) -> Result<Message, WireError> {
        if payload.len() < BODY_CRC_LEN {
            return Err(WireError::BodyLength {
                kind: kind.name(),
                expected: format!("at least {BODY_CRC_LEN}"),
                got: payload.len(),
            });
        }
        let (body, crc) = payload.split_at(payload.len() - BODY_CRC_LEN);
        let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        let computed = vmstream_simd::crc32c(body);
        if stored != computed {
            return Err(WireError::BodyChecksum {
                kind: kind.name(),
                stored,
                computed,
            });
        }
        Ok(match kind {
            FrameType::Hello => Message::Hello(Hello::decode(body)?),
            FrameType::HelloReply => Message::HelloReply(HelloReply::decode(body)?),
            FrameType::ChannelHello => Message::ChannelHello(ChannelHello::decode(body)?),
            FrameType::AuthHello => Message::AuthHello(AuthHello::decode(body)?),
            FrameType::AuthChallenge => Message::AuthChallenge(AuthChallenge::decode(body)?),
            FrameType::AuthProof => Message::AuthProof(AuthProof::decode(body)?),
            FrameType::RoundEnd => Message::RoundEnd(RoundEnd::decode(body)?),
            FrameType::RoundAck => Message::RoundAck(RoundAck::decode(body)?),
            FrameType::GuestState => Message::GuestState(GuestState::decode(body)?),
            FrameType::Digest => Message::Digest(Digest::decode(body)?),
            FrameType::CommitReply => Message::CommitReply(CommitReply::decode(body)?),
            FrameType::Resumed => Message::Resumed(Resumed::decode(body)?),
            FrameType::GuestSamples => Message::GuestSamples(GuestSamples::decode(body)?),
            FrameType::Handover => Message::Handover(Handover::decode(body)?),
            FrameType::MemoryHandover => Message::MemoryHandover(MemoryHandover::decode(body)?),
            FrameType::Audit => Message::Audit(Audit::decode(body)?),
            FrameType::PostcopyOwed => Message::PostcopyOwed(PostcopyOwed::decode(body)?),
            FrameType::PostcopyStart => Message::PostcopyStart(PostcopyStart::decode(body)?),
            FrameType::PageRequest => Message::PageRequest(PageRequest::decode(body)?),
            FrameType::PostcopyPage => Message::PostcopyPage(PostcopyPage::decode(body)?),
            FrameType::PostcopyComplete => {
                Message::PostcopyComplete(PostcopyComplete::decode(body)?)
            }
            FrameType::PostcopyPreempt => Message::PostcopyPreempt(PostcopyPreempt::decode(body)?),
            FrameType::PostcopyReconnect => {
                Message::PostcopyReconnect(PostcopyReconnect::decode(body)?)
            }
            FrameType::QemuIncoming => Message::QemuIncoming(QemuIncoming::decode(body)?),
            FrameType::Disks => Message::Disks(Disks::decode(body)?),
            FrameType::MemoryRegions => Message::MemoryRegions(MemoryRegions::decode(body)?),
            FrameType::DiskDigests => Message::DiskDigests(DiskDigests::decode(body)?),
            FrameType::MirrorWrite => Message::MirrorWrite(MirrorWrite::decode(body)?),
            FrameType::MirrorAck => Message::MirrorAck(MirrorAck::decode(body)?),
            FrameType::HandoverDirty => Message::HandoverDirty(HandoverDirty::decode(body)?),
            FrameType::HandoverAck => Message::HandoverAck(HandoverAck::decode(body)?),
            FrameType::VerifyBacklog => Message::VerifyBacklog(VerifyBacklog::decode(body)?),
            FrameType::Abort => Message::Abort(Abort::decode(body)?),
            FrameType::Packet => {
                return Err(WireError::BadField {
                    kind: "packet",
                    field: "type",
                    value: kind as u64,
                })
            }
        })
    }
}
