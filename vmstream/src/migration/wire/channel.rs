//! [`ChannelHello`]: binds a connection to a migration as one of its parallel channels
//! (`--channels N`, feature bit `FEATURE_CHANNELS`).

use super::fields::{exact, versioned_body};
use super::{FrameType, WireError, MAGIC, PROTOCOL_VERSION};

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

#[cfg(test)]
mod tests {
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
}
