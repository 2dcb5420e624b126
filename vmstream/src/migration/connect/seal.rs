//! Sealed frames: once both sides proved the key (`crate::migration::connect::auth`), every frame in each
//! direction of the connection is encrypted and authenticated with AES-256-GCM under that
//! direction's session key, so an attacker on the path can neither read guest memory nor
//! change, drop, reorder or replay a frame without the receiver noticing.
//!
//! ```text
//! record = len (u32 LE, bytes of ciphertext + tag) || ciphertext || tag (16 bytes)
//! ciphertext, tag = AES-256-GCM(key, nonce = record number (u64 LE) || 0u32, aad = len, frame)
//! ```
//!
//! `frame` is the plaintext frame (header, payload) exactly as without sealing. Record
//! numbers count from 0 in each direction; a record that does not open under the next
//! number (corrupted, forged, dropped, reordered or replayed) fails the connection.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::migration::wire::{FrameType, FRAME_HEADER_LEN};

/// Bytes of the authentication tag.
pub const TAG_LEN: usize = 16;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Largest `len` a sealed record may declare: the largest frame plus the tag.
pub fn max_sealed_len() -> usize {
    let payload = FrameType::ALL
        .iter()
        .map(|t| t.max_payload())
        .max()
        .unwrap_or(0);
    FRAME_HEADER_LEN + payload + TAG_LEN
}

/// Why a sealed record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The declared length cannot hold a frame and its tag, or exceeds the largest frame.
    #[error("sealed record {record}: length {len} outside {min}..={max}")]
    Length {
        /// Record number.
        record: u64,
        /// Declared length.
        len: usize,
        /// Smallest possible.
        min: usize,
        /// Largest possible.
        max: usize,
    },
    /// The tag does not match: corrupted, forged, replayed, reordered or a record missing.
    #[error(
        "sealed record {record} failed authentication (corrupted, forged, replayed or out of \
         order)"
    )]
    Forged {
        /// Record number.
        record: u64,
    },
}

fn nonce(record: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&record.to_le_bytes());
    // Unique: each direction has its own key and numbers its records once.
    Nonce::assume_unique_for_key(n)
}

fn cipher(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte AES-256 key"))
}

/// The sending half of one direction.
pub struct Sealer {
    cipher: LessSafeKey,
    record: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer {{ record: {} }}", self.record)
    }
}

impl Sealer {
    /// Seals with `key` from record 0.
    pub fn new(key: &[u8; 32]) -> Sealer {
        Sealer {
            cipher: cipher(key),
            record: 0,
        }
    }

    /// Replaces `out` with the sealed record of the frame made of `parts` (concatenated).
    pub fn seal(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) {
        let frame_len: usize = parts.iter().map(|p| p.len()).sum();
        let len = (frame_len + TAG_LEN) as u32;
        out.clear();
        out.reserve(LEN_PREFIX + frame_len + TAG_LEN);
        out.extend_from_slice(&len.to_le_bytes());
        for p in parts {
            out.extend_from_slice(p);
        }
        let tag = self
            .cipher
            .seal_in_place_separate_tag(
                nonce(self.record),
                Aad::from(len.to_le_bytes()),
                &mut out[LEN_PREFIX..],
            )
            .expect("AES-GCM seals any frame below 64 GiB");
        out.extend_from_slice(tag.as_ref());
        self.record += 1;
    }
}

/// The receiving half of one direction.
pub struct Opener {
    cipher: LessSafeKey,
    record: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Opener {{ record: {} }}", self.record)
    }
}

impl Opener {
    /// Opens records sealed with `key` from record 0.
    pub fn new(key: &[u8; 32]) -> Opener {
        Opener {
            cipher: cipher(key),
            record: 0,
        }
    }

    /// Checks a declared record length before anything is allocated for it.
    pub fn check_len(&self, len: usize) -> Result<(), SealError> {
        let (min, max) = (FRAME_HEADER_LEN + TAG_LEN, max_sealed_len());
        if !(min..=max).contains(&len) {
            return Err(SealError::Length {
                record: self.record,
                len,
                min,
                max,
            });
        }
        Ok(())
    }

    /// Opens the record whose `len` bytes (ciphertext and tag) are in `sealed`: on success
    /// `sealed` holds the plaintext frame.
    pub fn open(&mut self, sealed: &mut Vec<u8>) -> Result<(), SealError> {
        self.check_len(sealed.len())?;
        let len = (sealed.len() as u32).to_le_bytes();
        let plain = self
            .cipher
            .open_in_place(nonce(self.record), Aad::from(len), sealed)
            .map_err(|_| SealError::Forged {
                record: self.record,
            })?
            .len();
        sealed.truncate(plain);
        self.record += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(o: &mut Opener, record: &[u8]) -> Result<Vec<u8>, SealError> {
        let len = u32::from_le_bytes(record[..4].try_into().unwrap()) as usize;
        assert_eq!(len, record.len() - 4);
        let mut v = record[4..].to_vec();
        o.open(&mut v)?;
        Ok(v)
    }

    #[test]
    fn records_open_in_order_and_hide_the_frame() {
        let (mut s, mut o) = (Sealer::new(&[1; 32]), Opener::new(&[1; 32]));
        let frame = [0xabu8; 100];
        let mut a = Vec::new();
        s.seal(&[&frame[..40], &frame[40..]], &mut a);
        assert_eq!(a.len(), 4 + 100 + TAG_LEN);
        assert!(
            !a.windows(16).any(|w| w == &frame[..16]),
            "plaintext visible"
        );
        let mut b = Vec::new();
        s.seal(&[&frame], &mut b);
        assert_ne!(
            a, b,
            "the same frame seals differently under the next record number"
        );
        assert_eq!(open(&mut o, &a).unwrap(), frame);
        assert_eq!(open(&mut o, &b).unwrap(), frame);
    }

    #[test]
    fn any_change_replay_reorder_or_wrong_key_is_refused() {
        let mut s = Sealer::new(&[1; 32]);
        let mut recs = Vec::new();
        for i in 0..3u8 {
            let mut r = Vec::new();
            s.seal(&[&[i; 50]], &mut r);
            recs.push(r);
        }
        // Every single bit flip, in the length-covered ciphertext or the tag.
        for at in 4..recs[0].len() {
            let mut bad = recs[0].clone();
            bad[at] ^= 0x01;
            assert_eq!(
                open(&mut Opener::new(&[1; 32]), &bad),
                Err(SealError::Forged { record: 0 }),
                "flip at {at}"
            );
        }
        // Reordered, dropped, replayed, another key.
        assert!(open(&mut Opener::new(&[1; 32]), &recs[1]).is_err());
        let mut o = Opener::new(&[1; 32]);
        open(&mut o, &recs[0]).unwrap();
        assert_eq!(open(&mut o, &recs[0]), Err(SealError::Forged { record: 1 }));
        assert!(open(&mut Opener::new(&[2; 32]), &recs[0]).is_err());
    }

    #[test]
    fn lengths_outside_a_frame_are_refused_before_opening() {
        let o = Opener::new(&[1; 32]);
        assert!(matches!(
            o.check_len(FRAME_HEADER_LEN + TAG_LEN - 1),
            Err(SealError::Length { .. })
        ));
        assert!(o.check_len(FRAME_HEADER_LEN + TAG_LEN).is_ok());
        assert!(o.check_len(max_sealed_len()).is_ok());
        assert!(matches!(
            o.check_len(max_sealed_len() + 1),
            Err(SealError::Length { .. })
        ));
    }
}
