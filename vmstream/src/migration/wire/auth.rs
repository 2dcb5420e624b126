//! The key exchange (`--auth-key-file`), before the handshake: [`AuthHello`],
//! [`AuthChallenge`] and [`AuthProof`] prove the shared key both ways.

use super::fields::{exact, versioned_body, Fields};
use super::{FrameType, WireError, MAGIC, PROTOCOL_VERSION};

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

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.extend_from_slice(&[0; 6]);
        out.extend_from_slice(&self.nonce);
    }

    pub(super) fn decode(body: &[u8]) -> Result<AuthHello, WireError> {
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

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.tag);
    }

    pub(super) fn decode(body: &[u8]) -> Result<AuthChallenge, WireError> {
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

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.tag);
    }

    pub(super) fn decode(body: &[u8]) -> Result<AuthProof, WireError> {
        exact(FrameType::AuthProof, body, Self::LEN)?;
        Ok(AuthProof {
            tag: body.try_into().expect("32 bytes"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Message, RefuseCode, BODY_CRC_LEN, FRAME_HEADER_LEN};
    use super::*;

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
        assert_eq!(RefuseCode::from_tag(10), Some(RefuseCode::Disks));
        assert_eq!(RefuseCode::from_tag(11), Some(RefuseCode::MemoryRegions));
        assert_eq!(RefuseCode::from_tag(12), None);
    }
}
