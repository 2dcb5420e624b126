//! The handshake: the source's [`Hello`] (guest, page and codec settings), the
//! destination's [`HelloReply`], which accepts it or says why not ([`RefuseCode`]), and the
//! [`ChannelHello`] that binds a connection to a migration as one of its parallel channels
//! (`--channels N`, feature bit `FEATURE_CHANNELS`).

use vmstream_codec::format::VERSION as CODEC_FORMAT_VERSION;
use vmstream_codec::Compression;

use super::fields::{at_least, bool_byte, exact, push_reason, reason_of, versioned_body, Fields};
use super::{FrameType, WireError, MAGIC, MAX_REASON_LEN, PROTOCOL_VERSION};
use crate::guest::GuestKind;
use crate::memory::MAX_MEMORY_REGIONS;

/// The [`GuestKind`] whose wire tag (its discriminant) is `tag`.
pub(super) fn guest_kind_from_tag(tag: u8) -> Option<GuestKind> {
    [GuestKind::File, GuestKind::Kvm, GuestKind::Qemu]
        .into_iter()
        .find(|k| *k as u8 == tag)
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

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
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

    pub(super) fn decode(body: &[u8]) -> Result<Hello, WireError> {
        const K: FrameType = FrameType::Hello;
        let mut f = versioned_body(K, body, |b| exact(K, b, Self::LEN))?;
        let kind_tag = f.u8();
        let guest_kind = guest_kind_from_tag(kind_tag).ok_or(WireError::BadField {
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
    /// Disks: their count or a size differs from the destination's `--disk`s.
    Disks = 10,
    /// Memory regions: their count differs from the destination's `--memory-file`s, or a
    /// size from its QEMU command line's backend.
    MemoryRegions = 11,
}

impl RefuseCode {
    pub(super) fn from_tag(tag: u8) -> Option<RefuseCode> {
        use RefuseCode::*;
        [
            None,
            Version,
            PageSize,
            GuestSize,
            GuestKind,
            Features,
            Codec,
            Other,
            Channel,
            Auth,
            Disks,
            MemoryRegions,
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

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.push(self.refuse as u8);
        out.push(self.resumes as u8);
        out.extend_from_slice(&self.receiver_workers.to_le_bytes());
        out.extend_from_slice(&[0; 2]);
        push_reason(out, &self.reason);
    }

    pub(super) fn decode(body: &[u8]) -> Result<HelloReply, WireError> {
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

/// Most channels one migration may use.
pub const MAX_CHANNELS: u16 = 16;

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

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&[0; 2]);
        out.extend_from_slice(&self.migration_id);
    }

    pub(super) fn decode(body: &[u8]) -> Result<ChannelHello, WireError> {
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

/// `MemoryRegions` (8 bytes + 8 per region): guest memory is several files (a QEMU VM's
/// RAM backends), their pages one after the other in the codec's page numbers; the sizes
/// add up to the `Hello`'s `guest_size` (`PROTOCOL.md`, *QEMU guests*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryRegions {
    /// Bytes of each region, in order: non-zero multiples of the page size.
    pub sizes: Vec<u64>,
}

impl MemoryRegions {
    /// Body length without the sizes.
    pub const FIXED_LEN: usize = 8;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.sizes.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0; 6]);
        for s in &self.sizes {
            out.extend_from_slice(&s.to_le_bytes());
        }
    }

    pub(super) fn decode(body: &[u8]) -> Result<MemoryRegions, WireError> {
        const K: FrameType = FrameType::MemoryRegions;
        at_least(K, body, Self::FIXED_LEN, 8 * MAX_MEMORY_REGIONS)?;
        let mut f = Fields::new(body);
        let count = f.u16() as usize;
        let bad = |field, value| WireError::BadField {
            kind: K.name(),
            field,
            value,
        };
        if f.bytes(6).iter().any(|&b| b != 0) {
            return Err(bad("reserved", 1));
        }
        if !(2..=MAX_MEMORY_REGIONS).contains(&count) || body.len() != Self::FIXED_LEN + 8 * count {
            return Err(bad("count", count as u64));
        }
        let sizes: Vec<u64> = (0..count).map(|_| f.u64()).collect();
        if let Some(&s) = sizes
            .iter()
            .find(|&&s| s == 0 || !s.is_multiple_of(crate::memory::PAGE_SIZE as u64))
        {
            return Err(bad("size", s));
        }
        Ok(MemoryRegions { sizes })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::hello;
    use super::super::{Message, FRAME_HEADER_LEN};
    use super::*;

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
    fn hello_bytes_are_exact() {
        let f = Message::Hello(hello()).to_frame();
        assert_eq!(&f[..4], &[0x01, 0, 0, 0]);
        assert_eq!(&f[4..8], &(Hello::LEN as u32 + 4).to_le_bytes());
        let b = &f[FRAME_HEADER_LEN..];
        assert_eq!(&b[..8], b"VMSTREAM");
        assert_eq!(&b[8..10], &[6, 0]);
        assert_eq!(b[10], 1);
        assert_eq!(&b[12..16], &4096u32.to_le_bytes());
        assert_eq!(&b[16..24], &(256u64 << 20).to_le_bytes());
        assert_eq!(b[32], 2); // zstd
        assert_eq!(b[33], 1); // xbzrle
        assert_eq!(&b[36..40], &3i32.to_le_bytes());
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
}

#[cfg(test)]
mod channel_tests {
    use super::super::{Message, RefuseCode, BODY_CRC_LEN, FRAME_HEADER_LEN};
    use super::*;

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
    fn memory_regions_round_trip_and_bad_fields_are_refused() {
        let m = MemoryRegions {
            sizes: vec![1 << 20, 8192],
        };
        let f = Message::MemoryRegions(m.clone()).to_frame();
        assert_eq!(f[0], 0x33);
        let b = &f[FRAME_HEADER_LEN..f.len() - BODY_CRC_LEN];
        assert_eq!(b.len(), MemoryRegions::FIXED_LEN + 16);
        assert_eq!(MemoryRegions::decode(b).unwrap(), m);
        for sizes in [vec![8192], vec![8192, 0], vec![8192, 4097], vec![4096; 65]] {
            let mut body = Vec::new();
            MemoryRegions {
                sizes: sizes.clone(),
            }
            .encode(&mut body);
            assert!(MemoryRegions::decode(&body).is_err(), "{sizes:?}");
        }
        assert_eq!(RefuseCode::from_tag(11), Some(RefuseCode::MemoryRegions));
    }
}
