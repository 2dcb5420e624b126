//! Typed wire structs and framing of the migration protocol (see `PROTOCOL.md`).
//!
//! Every message travels in a frame: a 12-byte header (type, flags, reserved, payload
//! length, CRC32C of the first 8 header bytes) and the payload. Codec packets are carried
//! as-is (they have their own CRC32C); a control message's payload is its body followed by
//! the CRC32C of the body. Lengths are checked against a per-type maximum *before* any
//! buffer is allocated, so a peer cannot make us allocate unbounded memory.

use vmstream_codec::format::{MAX_PACKET_LEN, VERSION as CODEC_FORMAT_VERSION};
use vmstream_codec::Compression;

/// Magic at the start of `Hello` and `HelloReply`.
pub const MAGIC: [u8; 8] = *b"VMSTREAM";
/// Protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 3;
/// Size of the frame header.
pub const FRAME_HEADER_LEN: usize = 12;
/// Size of the checksum after a control message body.
pub const BODY_CRC_LEN: usize = 4;
/// Longest human-readable reason carried in a refusal or abort.
pub const MAX_REASON_LEN: usize = 1024;
/// Largest opaque guest state blob (room for vCPU state of a KVM guest).
pub const MAX_GUEST_STATE_LEN: usize = 1 << 20;
/// Page size every peer of this version uses.
pub const PAGE_SIZE: u32 = 4096;

/// Feature bit: the sender may use delta encodings (XBZRLE, XOR+LZ4) against pages it
/// sent before; the receiver must keep every page it received.
pub const FEATURE_DELTA_PAGES: u64 = 1 << 0;
/// Feature bit: the switchover carries the memory digest of `digest.rs` (BLAKE3 over
/// per-page XXH3-128; mandatory).
pub const FEATURE_MEMORY_DIGEST: u64 = 1 << 1;
/// Feature bit: the migration uses several TCP connections (`--channels N`); a
/// [`ChannelHello`] follows the `Hello` on the first one and opens each of the others.
pub const FEATURE_CHANNELS: u64 = 1 << 2;
/// Every feature bit this version knows.
pub const KNOWN_FEATURES: u64 = FEATURE_DELTA_PAGES | FEATURE_MEMORY_DIGEST | FEATURE_CHANNELS;
/// Most channels one migration may use.
pub const MAX_CHANNELS: u16 = 16;

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
    /// Either way: the sender gives up, with a reason.
    Abort = 0x7f,
}

impl FrameType {
    /// Every frame type.
    pub const ALL: [FrameType; 16] = [
        FrameType::Hello,
        FrameType::HelloReply,
        FrameType::ChannelHello,
        FrameType::AuthHello,
        FrameType::AuthChallenge,
        FrameType::AuthProof,
        FrameType::Packet,
        FrameType::RoundEnd,
        FrameType::RoundAck,
        FrameType::GuestState,
        FrameType::Digest,
        FrameType::CommitReply,
        FrameType::Resumed,
        FrameType::GuestSamples,
        FrameType::Handover,
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
            FrameType::RoundEnd => RoundEnd::LEN,
            FrameType::RoundAck => RoundAck::LEN,
            FrameType::GuestState => GuestState::FIXED_LEN + MAX_GUEST_STATE_LEN,
            FrameType::Digest => Digest::LEN,
            FrameType::CommitReply => CommitReply::FIXED_LEN + MAX_REASON_LEN,
            FrameType::Resumed => Resumed::LEN,
            FrameType::GuestSamples => GuestSamples::FIXED_LEN + 16 * GuestSamples::MAX_SAMPLES,
            FrameType::Handover => Handover::LEN,
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
            FrameType::Packet => "packet",
            FrameType::RoundEnd => "round-end",
            FrameType::RoundAck => "round-ack",
            FrameType::GuestState => "guest-state",
            FrameType::Digest => "digest",
            FrameType::CommitReply => "commit-reply",
            FrameType::Resumed => "resumed",
            FrameType::GuestSamples => "guest-samples",
            FrameType::Handover => "handover",
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
        let crc = crc32c::crc32c(&h[..8]);
        h[8..12].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks a header: CRC first (so corruption is reported as such), then
    /// type, reserved bits and the length bound.
    pub fn decode(h: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, WireError> {
        let stored = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(&h[..8]);
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

/// Little-endian field reader over a body of checked length.
struct Fields<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(b: &'a [u8]) -> Self {
        Fields { b, at: 0 }
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        s
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes(2).try_into().expect("2 bytes"))
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes(4).try_into().expect("4 bytes"))
    }
    fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.bytes(4).try_into().expect("4 bytes"))
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes(8).try_into().expect("8 bytes"))
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.at..];
        self.at = self.b.len();
        s
    }
}

fn exact(kind: FrameType, body: &[u8], len: usize) -> Result<(), WireError> {
    if body.len() != len {
        return Err(WireError::BodyLength {
            kind: kind.name(),
            expected: len.to_string(),
            got: body.len(),
        });
    }
    Ok(())
}

fn at_least(kind: FrameType, body: &[u8], len: usize, max_extra: usize) -> Result<(), WireError> {
    if body.len() < len || body.len() > len + max_extra {
        return Err(WireError::BodyLength {
            kind: kind.name(),
            expected: format!("{len}..={}", len + max_extra),
            got: body.len(),
        });
    }
    Ok(())
}

fn reason_of(kind: FrameType, f: &mut Fields<'_>) -> Result<String, WireError> {
    let len = f.u16() as usize;
    let rest = f.rest();
    if rest.len() != len {
        return Err(WireError::BodyLength {
            kind: kind.name(),
            expected: format!("reason of {len} bytes"),
            got: rest.len(),
        });
    }
    String::from_utf8(rest.to_vec()).map_err(|_| WireError::BadUtf8 { kind: kind.name() })
}

fn push_reason(out: &mut Vec<u8>, reason: &str) {
    // Cut at a char boundary so the receiver's UTF-8 check passes.
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
}

fn check_magic_version(kind: FrameType, f: &mut Fields<'_>) -> Result<(), WireError> {
    let magic: [u8; 8] = f.bytes(8).try_into().expect("8 bytes");
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let theirs = f.u16();
    if theirs != PROTOCOL_VERSION {
        let _ = kind;
        return Err(WireError::Version {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    Ok(())
}

/// The fields of a versioned body (`Hello`, `HelloReply`, `ChannelHello`, `AuthHello`)
/// after its magic and version, which are checked first: a peer of another version may use
/// another length. Then `length` checks the length.
fn versioned_body(
    kind: FrameType,
    body: &[u8],
    length: impl FnOnce(&[u8]) -> Result<(), WireError>,
) -> Result<Fields<'_>, WireError> {
    if body.len() >= 10 {
        check_magic_version(kind, &mut Fields::new(body))?;
    }
    length(body)?;
    let mut f = Fields::new(body);
    f.bytes(10);
    Ok(f)
}

/// Which kind of guest is migrated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[repr(u8)]
pub enum GuestKind {
    /// A file-backed guest process (`vmstream guest run`).
    File = 1,
    /// A KVM guest run by the sender (`vmstream/src/kvm`); `GuestState` carries its vCPU
    /// state.
    Kvm = 2,
}

impl GuestKind {
    fn from_tag(tag: u8) -> Option<GuestKind> {
        match tag {
            1 => Some(GuestKind::File),
            2 => Some(GuestKind::Kvm),
            _ => None,
        }
    }
}

/// How pages found in the sender's page cache travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[repr(u8)]
pub enum DeltaWire {
    /// No page cache: every page is sent whole.
    Off = 0,
    /// QEMU XBZRLE deltas.
    Xbzrle = 1,
    /// LZ4 of `old XOR new`.
    XorLz4 = 2,
    /// The smallest delta per page.
    Smallest = 3,
    /// XBZRLE, then LZ4 of the delta when smaller.
    XbzrleLz4 = 4,
}

/// `Hello`: the source's handshake (64-byte body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Kind of guest.
    pub guest_kind: GuestKind,
    /// Page size in bytes (4096).
    pub page_size: u32,
    /// Guest memory size in bytes.
    pub guest_size: u64,
    /// Feature bits (`FEATURE_*`).
    pub features: u64,
    /// Full-page compression and its level.
    pub compression: Compression,
    /// Delta encoding of cached pages.
    pub delta: DeltaWire,
    /// Codec packet format version.
    pub codec_version: u32,
    /// Sender encode workers (the receiver may match it).
    pub sender_workers: u32,
    /// Total page cache of the sender in bytes (0 without deltas).
    pub cache_bytes: u64,
    /// Pages per packet.
    pub batch_pages: u32,
}

impl Hello {
    /// Body length.
    pub const LEN: usize = 64;

    /// The codec format version this build reads.
    pub const CODEC_VERSION: u32 = CODEC_FORMAT_VERSION as u32;

    fn encode(&self, out: &mut Vec<u8>) {
        let (method, level) = match self.compression {
            Compression::None => (0u8, 0i32),
            Compression::Lz4 { acceleration } => (1, acceleration),
            Compression::Zstd { level } => (2, level),
            Compression::Zlib { level } => (3, level),
        };
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.push(self.guest_kind as u8);
        out.push(0);
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out.extend_from_slice(&self.guest_size.to_le_bytes());
        out.extend_from_slice(&self.features.to_le_bytes());
        out.push(method);
        out.push(self.delta as u8);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&level.to_le_bytes());
        out.extend_from_slice(&self.codec_version.to_le_bytes());
        out.extend_from_slice(&self.sender_workers.to_le_bytes());
        out.extend_from_slice(&self.cache_bytes.to_le_bytes());
        out.extend_from_slice(&self.batch_pages.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
    }

    fn decode(body: &[u8]) -> Result<Hello, WireError> {
        const K: FrameType = FrameType::Hello;
        let mut f = versioned_body(K, body, |b| exact(K, b, Self::LEN))?;
        let kind_tag = f.u8();
        let guest_kind = GuestKind::from_tag(kind_tag).ok_or(WireError::BadField {
            kind: K.name(),
            field: "guest_kind",
            value: kind_tag as u64,
        })?;
        let r0 = f.u8();
        let page_size = f.u32();
        let guest_size = f.u64();
        let features = f.u64();
        let method = f.u8();
        let delta_tag = f.u8();
        let r1 = f.u16();
        let level = f.i32();
        let codec_version = f.u32();
        let sender_workers = f.u32();
        let cache_bytes = f.u64();
        let batch_pages = f.u32();
        let r2 = f.u32();
        let bad = |field, value: u64| WireError::BadField {
            kind: K.name(),
            field,
            value,
        };
        if r0 != 0 || r1 != 0 || r2 != 0 {
            return Err(bad(
                "reserved",
                (r0 as u64) | (r1 as u64) << 8 | (r2 as u64) << 24,
            ));
        }
        let compression = match method {
            0 => Compression::None,
            1 => Compression::Lz4 {
                acceleration: level,
            },
            2 => Compression::Zstd { level },
            3 => Compression::Zlib { level },
            m => return Err(bad("compression", m as u64)),
        };
        let delta = match delta_tag {
            0 => DeltaWire::Off,
            1 => DeltaWire::Xbzrle,
            2 => DeltaWire::XorLz4,
            3 => DeltaWire::Smallest,
            4 => DeltaWire::XbzrleLz4,
            d => return Err(bad("delta", d as u64)),
        };
        Ok(Hello {
            guest_kind,
            page_size,
            guest_size,
            features,
            compression,
            delta,
            codec_version,
            sender_workers,
            cache_bytes,
            batch_pages,
        })
    }
}

/// Why a destination refused a `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RefuseCode {
    /// Accepted (not a refusal).
    None = 0,
    /// Protocol or codec version.
    Version = 1,
    /// Page size.
    PageSize = 2,
    /// Guest memory size.
    GuestSize = 3,
    /// Guest kind.
    GuestKind = 4,
    /// Unknown or missing feature bits.
    Features = 5,
    /// Codec settings.
    Codec = 6,
    /// Anything else (e.g. the destination file cannot be created).
    Other = 7,
    /// A channel connection that belongs to no migration in progress here (wrong
    /// migration id, index out of range, duplicate index, no migration yet).
    Channel = 8,
    /// Authentication: the peers' keys differ, or only one side has a key.
    Auth = 9,
}

impl RefuseCode {
    fn from_tag(tag: u8) -> Option<RefuseCode> {
        use RefuseCode::*;
        [
            None, Version, PageSize, GuestSize, GuestKind, Features, Codec, Other, Channel, Auth,
        ]
        .into_iter()
        .find(|c| *c as u8 == tag)
    }
}

/// `HelloReply`: the destination accepts or refuses, with a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    /// `RefuseCode::None` when accepted.
    pub refuse: RefuseCode,
    /// Receiver decode workers.
    pub receiver_workers: u32,
    /// The destination resumes the guest after the commit (and the source's `Handover`):
    /// its downtime includes that exchange's round trip.
    pub resumes: bool,
    /// Human-readable reason (empty when accepted).
    pub reason: String,
}

impl HelloReply {
    /// Body length without the reason.
    pub const FIXED_LEN: usize = 20;

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.push(self.refuse as u8);
        out.push(self.resumes as u8);
        out.extend_from_slice(&self.receiver_workers.to_le_bytes());
        out.extend_from_slice(&[0; 2]);
        push_reason(out, &self.reason);
    }

    fn decode(body: &[u8]) -> Result<HelloReply, WireError> {
        const K: FrameType = FrameType::HelloReply;
        let mut f = versioned_body(K, body, |b| at_least(K, b, Self::FIXED_LEN, MAX_REASON_LEN))?;
        let code = f.u8();
        let refuse = RefuseCode::from_tag(code).ok_or(WireError::BadField {
            kind: K.name(),
            field: "status",
            value: code as u64,
        })?;
        let resumes = bool_byte(K, "flags", f.u8())?;
        let receiver_workers = f.u32();
        let reserved = f.u16();
        if reserved != 0 {
            return Err(WireError::BadField {
                kind: K.name(),
                field: "reserved",
                value: reserved as u64,
            });
        }
        let reason = reason_of(K, &mut f)?;
        Ok(HelloReply {
            refuse,
            receiver_workers,
            resumes,
            reason,
        })
    }
}

/// `ChannelHello`: opens channel `index` of the `count` channels of migration
/// `migration_id` (32-byte body). Channel 0 sends it right after its `Hello`; every other
/// channel sends it as the first frame of its own connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelHello {
    /// Random id the source chose for this migration; binds its channels together.
    pub migration_id: [u8; 16],
    /// This connection's channel, `0..count`.
    pub index: u16,
    /// Channels of the migration, `2..=MAX_CHANNELS`.
    pub count: u16,
}

impl ChannelHello {
    /// Body length.
    pub const LEN: usize = 32;

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&[0; 2]);
        out.extend_from_slice(&self.migration_id);
    }

    fn decode(body: &[u8]) -> Result<ChannelHello, WireError> {
        const K: FrameType = FrameType::ChannelHello;
        let mut f = versioned_body(K, body, |b| exact(K, b, Self::LEN))?;
        let index = f.u16();
        let count = f.u16();
        let reserved = f.u16();
        let bad = |field, value: u64| WireError::BadField {
            kind: K.name(),
            field,
            value,
        };
        if reserved != 0 {
            return Err(bad("reserved", reserved as u64));
        }
        if !(2..=MAX_CHANNELS).contains(&count) {
            return Err(bad("count", count as u64));
        }
        if index >= count {
            return Err(bad("index", index as u64));
        }
        Ok(ChannelHello {
            migration_id: f.bytes(16).try_into().expect("16 bytes"),
            index,
            count,
        })
    }
}

/// Bytes of a nonce or an authentication tag.
pub const AUTH_BYTES: usize = 32;

/// `AuthHello`: a source with a key opens its connection with this, before its `Hello` or
/// `ChannelHello` (48-byte body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthHello {
    /// The source's fresh random nonce.
    pub nonce: [u8; AUTH_BYTES],
}

impl AuthHello {
    /// Body length.
    pub const LEN: usize = 48;

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.extend_from_slice(&[0; 6]);
        out.extend_from_slice(&self.nonce);
    }

    fn decode(body: &[u8]) -> Result<AuthHello, WireError> {
        const K: FrameType = FrameType::AuthHello;
        let mut f = versioned_body(K, body, |b| exact(K, b, Self::LEN))?;
        if f.bytes(6).iter().any(|&b| b != 0) {
            return Err(WireError::BadField {
                kind: K.name(),
                field: "reserved",
                value: 0,
            });
        }
        Ok(AuthHello {
            nonce: f.bytes(AUTH_BYTES).try_into().expect("32 bytes"),
        })
    }
}

/// `AuthChallenge`: the destination's nonce and its tag over both nonces (64-byte body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthChallenge {
    /// The destination's fresh random nonce.
    pub nonce: [u8; AUTH_BYTES],
    /// The destination's proof of the key.
    pub tag: [u8; AUTH_BYTES],
}

impl AuthChallenge {
    /// Body length.
    pub const LEN: usize = 64;

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.tag);
    }

    fn decode(body: &[u8]) -> Result<AuthChallenge, WireError> {
        exact(FrameType::AuthChallenge, body, Self::LEN)?;
        let mut f = Fields::new(body);
        Ok(AuthChallenge {
            nonce: f.bytes(AUTH_BYTES).try_into().expect("32 bytes"),
            tag: f.bytes(AUTH_BYTES).try_into().expect("32 bytes"),
        })
    }
}

/// `AuthProof`: the source's tag over both nonces (32-byte body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthProof {
    /// The source's proof of the key.
    pub tag: [u8; AUTH_BYTES],
}

impl AuthProof {
    /// Body length.
    pub const LEN: usize = 32;

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.tag);
    }

    fn decode(body: &[u8]) -> Result<AuthProof, WireError> {
        exact(FrameType::AuthProof, body, Self::LEN)?;
        Ok(AuthProof {
            tag: body.try_into().expect("32 bytes"),
        })
    }
}

/// `RoundEnd` flag: this is the final round, sent with the guest paused.
pub const ROUND_FINAL: u32 = 1 << 0;
/// `RoundEnd` flag: the switchover was forced (timeout) rather than converged.
pub const ROUND_FORCED: u32 = 1 << 1;

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

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&self.records.to_le_bytes());
        out.extend_from_slice(&self.packets.to_le_bytes());
        out.extend_from_slice(&self.packet_bytes.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
    }

    fn decode(body: &[u8]) -> Result<RoundEnd, WireError> {
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
        if r.flags & !(ROUND_FINAL | ROUND_FORCED) != 0 || reserved != 0 {
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

    fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.round, self.records, self.packets, self.barrier_ns] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn decode(body: &[u8]) -> Result<RoundAck, WireError> {
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

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.guest_kind as u8);
        out.extend_from_slice(&[0; 7]);
        out.extend_from_slice(&self.tx_count.to_le_bytes());
        out.extend_from_slice(&self.blob);
    }

    fn decode(body: &[u8]) -> Result<GuestState, WireError> {
        const K: FrameType = FrameType::GuestState;
        at_least(K, body, Self::FIXED_LEN, MAX_GUEST_STATE_LEN)?;
        let mut f = Fields::new(body);
        let tag = f.u8();
        let guest_kind = GuestKind::from_tag(tag).ok_or(WireError::BadField {
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

/// Digest algorithm tag: BLAKE3 over the XXH3-128 of each page (`digest.rs`). Tag 1 was
/// BLAKE3 over all memory (protocol version 1).
pub const DIGEST_PAGE_HASHES: u8 = 2;

/// `Digest`: the memory digest of all source memory at the pause (56-byte body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
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

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(DIGEST_PAGE_HASHES);
        out.extend_from_slice(&[0; 7]);
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&self.guest_size.to_le_bytes());
        out.extend_from_slice(&self.paused_at_unix_ns.to_le_bytes());
    }

    fn decode(body: &[u8]) -> Result<Digest, WireError> {
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
        f.bytes(7);
        Ok(Digest {
            digest: f.bytes(32).try_into().expect("32 bytes"),
            guest_size: f.u64(),
            paused_at_unix_ns: f.u64(),
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

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.status as u8);
        out.extend_from_slice(&[0; 7]);
        out.extend_from_slice(&self.digest);
        push_reason(out, &self.reason);
    }

    fn decode(body: &[u8]) -> Result<CommitReply, WireError> {
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

/// `Resumed`: when the guest ran again at the destination (32-byte body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// CLOCK_REALTIME instant, ns since the Unix epoch: the guest's first instant running
    /// (or the commit instant when the destination does not run the guest).
    pub at_unix_ns: u64,
    /// Whether a guest runs at the destination.
    pub running: bool,
    /// The resumed guest's transaction count at start (0 when not running).
    pub tx_count: u64,
    /// CPU time (user + system) the destination process used, ns.
    pub receiver_cpu_ns: u64,
}

impl Resumed {
    /// Body length.
    pub const LEN: usize = 32;

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.at_unix_ns.to_le_bytes());
        out.push(self.running as u8);
        out.extend_from_slice(&[0; 7]);
        out.extend_from_slice(&self.tx_count.to_le_bytes());
        out.extend_from_slice(&self.receiver_cpu_ns.to_le_bytes());
    }

    fn decode(body: &[u8]) -> Result<Resumed, WireError> {
        const K: FrameType = FrameType::Resumed;
        exact(K, body, Self::LEN)?;
        let mut f = Fields::new(body);
        let at_unix_ns = f.u64();
        let running = bool_byte(K, "running", f.u8())?;
        f.bytes(7);
        Ok(Resumed {
            at_unix_ns,
            running,
            tx_count: f.u64(),
            receiver_cpu_ns: f.u64(),
        })
    }
}

/// A byte that must be 0 (false) or 1 (true).
fn bool_byte(kind: FrameType, field: &'static str, v: u8) -> Result<bool, WireError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(WireError::BadField {
            kind: kind.name(),
            field,
            value: v as u64,
        }),
    }
}

/// `Handover`: the source ended its guest after the commit (8-byte body). The destination
/// runs its copy only after this: if the source fails between the commit reply and here,
/// the guest runs nowhere (the committed image waits) rather than in two places.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handover {
    /// CLOCK_REALTIME instant, ns since the Unix epoch, when the source guest had ended.
    pub ended_at_unix_ns: u64,
}

impl Handover {
    /// Body length.
    pub const LEN: usize = 8;

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ended_at_unix_ns.to_le_bytes());
    }

    fn decode(body: &[u8]) -> Result<Handover, WireError> {
        exact(FrameType::Handover, body, Self::LEN)?;
        let mut f = Fields::new(body);
        Ok(Handover {
            ended_at_unix_ns: f.u64(),
        })
    }
}

/// `GuestSamples`: readings of the resumed guest's transaction counter on the destination
/// (8 bytes + 16 per sample), for the guest-impact timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSamples {
    /// `(CLOCK_REALTIME ns since the Unix epoch, transactions committed)`, in time order.
    pub samples: Vec<(u64, u64)>,
}

impl GuestSamples {
    /// Body length without the samples.
    pub const FIXED_LEN: usize = 8;
    /// Most samples in one message (about 100 s at 100 ms).
    pub const MAX_SAMPLES: usize = 1024;

    fn encode(&self, out: &mut Vec<u8>) {
        let n = self.samples.len().min(Self::MAX_SAMPLES);
        out.extend_from_slice(&(n as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for &(at, tx) in &self.samples[..n] {
            out.extend_from_slice(&at.to_le_bytes());
            out.extend_from_slice(&tx.to_le_bytes());
        }
    }

    fn decode(body: &[u8]) -> Result<GuestSamples, WireError> {
        const K: FrameType = FrameType::GuestSamples;
        at_least(K, body, Self::FIXED_LEN, 16 * Self::MAX_SAMPLES)?;
        let mut f = Fields::new(body);
        let n = f.u32() as usize;
        let reserved = f.u32();
        if reserved != 0 {
            return Err(WireError::BadField {
                kind: K.name(),
                field: "reserved",
                value: reserved as u64,
            });
        }
        exact(K, body, Self::FIXED_LEN + 16 * n)?;
        let samples: Vec<(u64, u64)> = (0..n).map(|_| (f.u64(), f.u64())).collect();
        if samples.windows(2).any(|w| w[1].0 < w[0].0) {
            return Err(WireError::BadField {
                kind: K.name(),
                field: "order",
                value: n as u64,
            });
        }
        Ok(GuestSamples { samples })
    }
}

/// Why a side aborts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum AbortCode {
    /// The source cancelled (timeout with `--on-timeout cancel`, or a local error).
    Cancelled = 1,
    /// The source failed.
    SourceError = 2,
    /// The destination failed (bad packet, I/O, ...).
    DestinationError = 3,
    /// The peer broke the protocol.
    Protocol = 4,
}

/// `Abort`: the sender gives up; the receiver of this message rolls back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    /// Why.
    pub code: AbortCode,
    /// Human-readable reason.
    pub reason: String,
}

impl Abort {
    /// Body length without the reason.
    pub const FIXED_LEN: usize = 4;

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.code as u16).to_le_bytes());
        push_reason(out, &self.reason);
    }

    fn decode(body: &[u8]) -> Result<Abort, WireError> {
        const K: FrameType = FrameType::Abort;
        at_least(K, body, Self::FIXED_LEN, MAX_REASON_LEN)?;
        let mut f = Fields::new(body);
        let tag = f.u16();
        let code = match tag {
            1 => AbortCode::Cancelled,
            2 => AbortCode::SourceError,
            3 => AbortCode::DestinationError,
            4 => AbortCode::Protocol,
            t => {
                return Err(WireError::BadField {
                    kind: K.name(),
                    field: "code",
                    value: t as u64,
                })
            }
        };
        let reason = reason_of(K, &mut f)?;
        Ok(Abort { code, reason })
    }
}

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
            Message::Abort(m) => m.encode(&mut out),
        }
        let crc = crc32c::crc32c(&out[FRAME_HEADER_LEN..]);
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
        let computed = crc32c::crc32c(body);
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

/// The header of a frame carrying codec packet `packet`.
pub fn packet_frame_header(packet: &[u8]) -> [u8; FRAME_HEADER_LEN] {
    FrameHeader::encode(FrameType::Packet, packet.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            guest_kind: GuestKind::File,
            page_size: PAGE_SIZE,
            guest_size: 256 << 20,
            features: KNOWN_FEATURES,
            compression: Compression::Zstd { level: 3 },
            delta: DeltaWire::Xbzrle,
            codec_version: Hello::CODEC_VERSION,
            sender_workers: 2,
            cache_bytes: 64 << 20,
            batch_pages: 128,
        }
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello(hello()),
            Message::HelloReply(HelloReply {
                refuse: RefuseCode::GuestSize,
                receiver_workers: 3,
                resumes: true,
                reason: "size differs: é".into(),
            }),
            Message::RoundEnd(RoundEnd {
                round: 7,
                records: 100,
                packets: 3,
                packet_bytes: 12345,
                flags: ROUND_FINAL | ROUND_FORCED,
            }),
            Message::RoundAck(RoundAck {
                round: 7,
                records: 100,
                packets: 3,
                barrier_ns: 99,
            }),
            Message::GuestState(GuestState {
                guest_kind: GuestKind::File,
                tx_count: 42,
                blob: vec![1, 2, 3],
            }),
            Message::Digest(Digest {
                digest: [0xab; 32],
                guest_size: 1 << 20,
                paused_at_unix_ns: 1_700_000_000_000_000_000,
            }),
            Message::CommitReply(CommitReply {
                status: CommitStatus::DigestMismatch,
                digest: [7; 32],
                reason: "mismatch".into(),
            }),
            Message::Resumed(Resumed {
                at_unix_ns: 5,
                running: true,
                tx_count: 9,
                receiver_cpu_ns: 77,
            }),
            Message::Abort(Abort {
                code: AbortCode::Cancelled,
                reason: "timeout".into(),
            }),
            Message::ChannelHello(ChannelHello {
                migration_id: [0x5c; 16],
                index: 1,
                count: 2,
            }),
            Message::GuestSamples(GuestSamples {
                samples: vec![(10, 1), (20, 5), (20, 9)],
            }),
            Message::Handover(Handover {
                ended_at_unix_ns: 1_700_000_000_123_456_789,
            }),
            Message::AuthHello(AuthHello { nonce: [0x11; 32] }),
            Message::AuthChallenge(AuthChallenge {
                nonce: [0x22; 32],
                tag: [0x33; 32],
            }),
            Message::AuthProof(AuthProof { tag: [0x44; 32] }),
            Message::HelloReply(HelloReply {
                refuse: RefuseCode::Auth,
                receiver_workers: 0,
                resumes: false,
                reason: "keys differ".into(),
            }),
            Message::GuestState(GuestState {
                guest_kind: GuestKind::Kvm,
                tx_count: 43,
                blob: vec![9; 1024],
            }),
            Message::CommitReply(CommitReply {
                status: CommitStatus::StateRejected,
                digest: [8; 32],
                reason: "invalid KVM state blob".into(),
            }),
        ]
    }

    fn parse(frame: &[u8]) -> Result<Message, WireError> {
        let h = FrameHeader::decode(frame[..FRAME_HEADER_LEN].try_into().unwrap())?;
        assert_eq!(h.len as usize, frame.len() - FRAME_HEADER_LEN);
        Message::decode(h.kind, &frame[FRAME_HEADER_LEN..])
    }

    #[test]
    fn every_message_round_trips() {
        for m in all_messages() {
            let frame = m.to_frame();
            assert_eq!(parse(&frame).unwrap(), m);
            assert!(frame.len() - FRAME_HEADER_LEN <= m.frame_type().max_payload());
        }
    }

    #[test]
    fn hello_reply_flags_byte_is_checked() {
        let reply = |resumes| HelloReply {
            refuse: RefuseCode::None,
            receiver_workers: 2,
            resumes,
            reason: String::new(),
        };
        let mut body = Vec::new();
        reply(true).encode(&mut body);
        assert_eq!(body[11], 1);
        assert_eq!(HelloReply::decode(&body).unwrap(), reply(true));
        body[11] = 0;
        assert_eq!(HelloReply::decode(&body).unwrap(), reply(false));
        body[11] = 2;
        assert!(matches!(
            HelloReply::decode(&body),
            Err(WireError::BadField {
                field: "flags",
                value: 2,
                ..
            })
        ));
    }

    #[test]
    fn auth_bodies_are_exact_and_checked() {
        let body = |m: Message| {
            let f = m.to_frame();
            f[FRAME_HEADER_LEN..f.len() - BODY_CRC_LEN].to_vec()
        };
        let b = body(Message::AuthHello(AuthHello { nonce: [7; 32] }));
        assert_eq!(b.len(), AuthHello::LEN);
        assert_eq!(&b[..8], &MAGIC);
        assert_eq!(&b[8..10], &PROTOCOL_VERSION.to_le_bytes());
        assert_eq!(&b[10..16], &[0; 6]);
        assert_eq!(&b[16..], &[7; 32]);
        let mut bad = b.clone();
        bad[12] = 1;
        assert!(matches!(
            AuthHello::decode(&bad),
            Err(WireError::BadField {
                field: "reserved",
                ..
            })
        ));
        bad = b.clone();
        bad[8] = 9;
        assert!(matches!(
            AuthHello::decode(&bad),
            Err(WireError::Version { theirs: 9, .. })
        ));
        let c = body(Message::AuthChallenge(AuthChallenge {
            nonce: [1; 32],
            tag: [2; 32],
        }));
        assert_eq!(c, [[1u8; 32], [2u8; 32]].concat());
        let p = body(Message::AuthProof(AuthProof { tag: [3; 32] }));
        assert_eq!(p, [3u8; 32]);
        assert!(matches!(
            AuthProof::decode(&p[..31]),
            Err(WireError::BodyLength { got: 31, .. })
        ));
        assert_eq!(RefuseCode::from_tag(9), Some(RefuseCode::Auth));
        assert_eq!(RefuseCode::from_tag(10), None);
    }

    #[test]
    fn fixed_body_lengths_match_the_byte_tables() {
        let lens: Vec<usize> = all_messages()
            .iter()
            .map(|m| m.to_frame().len() - FRAME_HEADER_LEN - BODY_CRC_LEN)
            .collect();
        assert_eq!(lens[0], Hello::LEN);
        assert_eq!(lens[2], RoundEnd::LEN);
        assert_eq!(lens[3], RoundAck::LEN);
        assert_eq!(lens[5], Digest::LEN);
        assert_eq!(lens[7], Resumed::LEN);
        let handover = Message::Handover(Handover {
            ended_at_unix_ns: 0x0102_0304_0506_0708,
        })
        .to_frame();
        assert_eq!(handover[0], 0x25);
        assert_eq!(
            &handover[FRAME_HEADER_LEN..FRAME_HEADER_LEN + Handover::LEN],
            &0x0102_0304_0506_0708u64.to_le_bytes()
        );
        assert_eq!(
            handover.len(),
            FRAME_HEADER_LEN + Handover::LEN + BODY_CRC_LEN
        );
        assert_eq!(lens[1], HelloReply::FIXED_LEN + "size differs: é".len());
    }

    #[test]
    fn hello_bytes_are_exact() {
        let f = Message::Hello(hello()).to_frame();
        assert_eq!(&f[..4], &[0x01, 0, 0, 0]);
        assert_eq!(&f[4..8], &(Hello::LEN as u32 + 4).to_le_bytes());
        let b = &f[FRAME_HEADER_LEN..];
        assert_eq!(&b[..8], b"VMSTREAM");
        assert_eq!(&b[8..10], &[3, 0]);
        assert_eq!(b[10], 1);
        assert_eq!(&b[12..16], &4096u32.to_le_bytes());
        assert_eq!(&b[16..24], &(256u64 << 20).to_le_bytes());
        assert_eq!(b[32], 2); // zstd
        assert_eq!(b[33], 1); // xbzrle
        assert_eq!(&b[36..40], &3i32.to_le_bytes());
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        for m in all_messages() {
            let frame = m.to_frame();
            for i in 0..frame.len() {
                for bit in [0x01u8, 0x80] {
                    let mut f = frame.clone();
                    f[i] ^= bit;
                    let h = FrameHeader::decode(f[..FRAME_HEADER_LEN].try_into().unwrap());
                    match h {
                        Err(_) => {}
                        Ok(h) => {
                            assert_eq!(h.len as usize, f.len() - FRAME_HEADER_LEN);
                            assert!(
                                Message::decode(h.kind, &f[FRAME_HEADER_LEN..]).is_err(),
                                "flip at {i} of {m:?} went unnoticed"
                            );
                        }
                    }
                }
            }
        }
    }

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
        let crc = crc32c::crc32c(&h[..8]);
        h[8..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(FrameHeader::decode(&h), Err(WireError::UnknownType(0x55)));
        let mut h = FrameHeader::encode(FrameType::Abort, 8);
        h[1] = 1;
        let crc = crc32c::crc32c(&h[..8]);
        h[8..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&h),
            Err(WireError::Reserved { flags: 1, .. })
        ));
    }

    #[test]
    fn wrong_version_and_magic_are_typed() {
        let mut body = Vec::new();
        hello().encode(&mut body);
        body[8] = 9;
        assert_eq!(
            Hello::decode(&body),
            Err(WireError::Version {
                ours: PROTOCOL_VERSION,
                theirs: 9
            })
        );
        // A future version with a longer hello still reports the version, not the length.
        body.extend_from_slice(&[0; 16]);
        assert!(matches!(
            Hello::decode(&body),
            Err(WireError::Version { theirs: 9, .. })
        ));
        let mut body = Vec::new();
        hello().encode(&mut body);
        body[0] = b'X';
        assert!(matches!(Hello::decode(&body), Err(WireError::BadMagic(_))));
    }

    #[test]
    fn bad_fields_are_typed() {
        let mut body = Vec::new();
        hello().encode(&mut body);
        body[32] = 9;
        assert!(matches!(
            Hello::decode(&body),
            Err(WireError::BadField {
                field: "compression",
                value: 9,
                ..
            })
        ));
        let mut body = Vec::new();
        Abort {
            code: AbortCode::Protocol,
            reason: "x".into(),
        }
        .encode(&mut body);
        body[3] = 5; // reason length says 5, 1 byte present
        assert!(matches!(
            Abort::decode(&body),
            Err(WireError::BodyLength { .. })
        ));
        let mut body = Vec::new();
        RoundEnd {
            round: 0,
            records: 0,
            packets: 0,
            packet_bytes: 0,
            flags: 4,
        }
        .encode(&mut body);
        assert!(matches!(
            RoundEnd::decode(&body),
            Err(WireError::BadField { field: "flags", .. })
        ));
    }

    #[test]
    fn guest_samples_lengths_and_order_are_checked() {
        let m = GuestSamples {
            samples: vec![(1, 2), (3, 4)],
        };
        let mut body = Vec::new();
        m.encode(&mut body);
        assert_eq!(body.len(), GuestSamples::FIXED_LEN + 32);
        assert_eq!(GuestSamples::decode(&body), Ok(m.clone()));
        // The count says 3, two are present.
        body[0] = 3;
        assert!(matches!(
            GuestSamples::decode(&body),
            Err(WireError::BodyLength { .. })
        ));
        let mut body = Vec::new();
        GuestSamples {
            samples: vec![(5, 0), (4, 0)],
        }
        .encode(&mut body);
        assert!(matches!(
            GuestSamples::decode(&body),
            Err(WireError::BadField { field: "order", .. })
        ));
        let too_many = GuestSamples {
            samples: vec![(0, 0); GuestSamples::MAX_SAMPLES + 5],
        };
        let mut body = Vec::new();
        too_many.encode(&mut body);
        assert_eq!(
            GuestSamples::decode(&body).unwrap().samples.len(),
            GuestSamples::MAX_SAMPLES
        );
    }

    #[test]
    fn channel_hello_bytes_and_bounds() {
        let h = ChannelHello {
            migration_id: *b"0123456789abcdef",
            index: 2,
            count: 3,
        };
        let f = Message::ChannelHello(h).to_frame();
        assert_eq!(f[0], 0x03);
        let b = &f[FRAME_HEADER_LEN..f.len() - BODY_CRC_LEN];
        assert_eq!(b.len(), ChannelHello::LEN);
        assert_eq!(&b[..8], b"VMSTREAM");
        assert_eq!(&b[10..14], &[2, 0, 3, 0]);
        assert_eq!(&b[16..], b"0123456789abcdef");
        for (index, count, field) in [(3, 3, "index"), (0, 1, "count"), (0, 17, "count")] {
            let mut body = Vec::new();
            ChannelHello { index, count, ..h }.encode(&mut body);
            assert!(
                matches!(ChannelHello::decode(&body), Err(WireError::BadField { field: f, .. }) if f == field),
                "{index}/{count}"
            );
        }
        assert_eq!(RefuseCode::from_tag(8), Some(RefuseCode::Channel));
    }

    #[test]
    fn long_reasons_are_cut_at_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON_LEN);
        let m = Message::Abort(Abort {
            code: AbortCode::SourceError,
            reason,
        });
        let Message::Abort(a) = parse(&m.to_frame()).unwrap() else {
            panic!()
        };
        assert_eq!(a.reason.len(), MAX_REASON_LEN);
    }
}
