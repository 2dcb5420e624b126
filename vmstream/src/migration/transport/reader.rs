//! [`FrameReader`]: reads [`Frame`]s from a byte stream, bounding every length before
//! allocating and typing every failure (closed, truncated, timed out, corrupt, forged).

use std::io::{self, Read};
use std::time::Duration;

use super::TransportError;
use crate::migration::connect::seal::{Opener, LEN_PREFIX};
use crate::migration::wire::{FrameHeader, FrameType, Message, WireError, FRAME_HEADER_LEN};

/// A received frame.
#[derive(Debug)]
pub enum Frame {
    /// A codec packet, verbatim (validated by the codec).
    Packet(Vec<u8>),
    /// A control message (checksum verified, fields typed).
    Control(Message),
}

impl Frame {
    /// The frame of type `kind` with `payload`: a packet verbatim, a control message decoded.
    fn new(kind: FrameType, payload: Vec<u8>) -> Result<Frame, TransportError> {
        Ok(match kind {
            FrameType::Packet => Frame::Packet(payload),
            kind => Frame::Control(Message::decode(kind, &payload)?),
        })
    }
}

/// Reads frames from a stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    bytes: u64,
    timeout: Option<Duration>,
    /// Set once the connection is sealed (`crate::migration::connect::seal`).
    opener: Option<Opener>,
}

impl<R: Read> FrameReader<R> {
    /// A reader over `inner`; `timeout` is only used to word timeout errors (set the
    /// socket's read timeout to the same value).
    pub fn new(inner: R, timeout: Option<Duration>) -> Self {
        FrameReader {
            inner,
            bytes: 0,
            timeout,
            opener: None,
        }
    }

    /// From now on the frames arrive sealed (`crate::migration::connect::seal`).
    pub fn open_with(&mut self, opener: Opener) {
        self.opener = Some(opener);
    }

    /// Hands the sealing state on to another reader of the same connection.
    pub fn take_opener(&mut self) -> Option<Opener> {
        self.opener.take()
    }

    /// The timeout named in timeout errors (set the socket's to the same value).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Bytes read so far (frame headers included).
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// Fills `buf`; returns how many bytes arrived before EOF.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_error(e)),
            }
        }
        self.bytes += got as u64;
        Ok(got)
    }

    /// A read error, typed: the socket's read timeout is `Timeout`.
    fn read_error(&self, e: io::Error) -> TransportError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                TransportError::Timeout(self.timeout.unwrap_or_default())
            }
            _ => e.into(),
        }
    }

    /// Reads `needed` bytes into a new buffer (allocated as they arrive, so a large
    /// declared length costs nothing until its bytes come).
    fn read_exactly(
        &mut self,
        needed: usize,
        kind: &'static str,
    ) -> Result<Vec<u8>, TransportError> {
        let mut buf = Vec::with_capacity(needed.min(1 << 20));
        let read = (&mut self.inner).take(needed as u64).read_to_end(&mut buf);
        self.bytes += buf.len() as u64;
        read.map_err(|e| self.read_error(e))?;
        if buf.len() < needed {
            return Err(TransportError::Truncated {
                kind,
                got: buf.len(),
                needed,
            });
        }
        Ok(buf)
    }

    /// Reads the next frame. The payload buffer is allocated only after the header passed
    /// its checksum and the length its type's bound (a sealed record's length is checked
    /// against the largest frame first).
    pub fn read_frame(&mut self) -> Result<Frame, TransportError> {
        if self.opener.is_some() {
            return self.read_sealed();
        }
        let mut h = [0u8; FRAME_HEADER_LEN];
        let got = self.fill(&mut h)?;
        if got == 0 {
            return Err(TransportError::Closed);
        }
        if got < FRAME_HEADER_LEN {
            return Err(TransportError::Truncated {
                kind: "header",
                got,
                needed: FRAME_HEADER_LEN,
            });
        }
        let header = FrameHeader::decode(&h)?;
        let payload = self.read_exactly(header.len as usize, header.kind.name())?;
        Frame::new(header.kind, payload)
    }

    /// A sealed record: length, then ciphertext and tag, opened into exactly one frame.
    fn read_sealed(&mut self) -> Result<Frame, TransportError> {
        let mut l = [0u8; LEN_PREFIX];
        let got = self.fill(&mut l)?;
        if got == 0 {
            return Err(TransportError::Closed);
        }
        if got < LEN_PREFIX {
            return Err(TransportError::Truncated {
                kind: "sealed length",
                got,
                needed: LEN_PREFIX,
            });
        }
        let len = u32::from_le_bytes(l) as usize;
        let opener = self.opener.as_mut().expect("sealed");
        opener.check_len(len)?;
        let mut sealed = self.read_exactly(len, "sealed")?;
        self.opener.as_mut().expect("sealed").open(&mut sealed)?;
        let header = FrameHeader::decode(sealed[..FRAME_HEADER_LEN].try_into().expect("checked"))?;
        if header.len as usize != sealed.len() - FRAME_HEADER_LEN {
            return Err(WireError::BodyLength {
                kind: header.kind.name(),
                expected: header.len.to_string(),
                got: sealed.len() - FRAME_HEADER_LEN,
            }
            .into());
        }
        // Shift the payload down in place (no second buffer).
        sealed.drain(..FRAME_HEADER_LEN);
        Frame::new(header.kind, sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::wire::{Abort, AbortCode, RoundAck};

    /// splitmix64, for reproducible random streams.
    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn random_and_mutated_streams_never_panic() {
        let mut rng = 42u64;
        let valid: Vec<Vec<u8>> = [
            Message::RoundAck(RoundAck {
                round: 1,
                records: 2,
                packets: 3,
                barrier_ns: 4,
            }),
            Message::Abort(Abort {
                code: AbortCode::Protocol,
                reason: "why".into(),
            }),
        ]
        .iter()
        .map(|m| m.to_frame())
        .collect();
        for i in 0..20_000 {
            let mut bytes = match i % 3 {
                // Pure noise.
                0 => (0..(next(&mut rng) % 200))
                    .map(|_| next(&mut rng) as u8)
                    .collect::<Vec<u8>>(),
                // A valid header of a random type with a random body.
                1 => {
                    let kind =
                        FrameType::ALL[(next(&mut rng) % FrameType::ALL.len() as u64) as usize];
                    let len = (next(&mut rng) % 80) as u32;
                    let mut b = FrameHeader::encode(kind, len).to_vec();
                    b.extend((0..len).map(|_| next(&mut rng) as u8));
                    // Make the body CRC right half of the time so the decoders run.
                    if len >= 4 && next(&mut rng).is_multiple_of(2) {
                        let body_end = b.len() - 4;
                        let crc = vmstream_simd::crc32c(&b[FRAME_HEADER_LEN..body_end]);
                        b[body_end..].copy_from_slice(&crc.to_le_bytes());
                    }
                    b
                }
                // A valid frame with a few random byte changes.
                _ => {
                    let mut b = valid[(next(&mut rng) % 2) as usize].clone();
                    for _ in 0..1 + next(&mut rng) % 3 {
                        let at = (next(&mut rng) as usize) % b.len();
                        b[at] = next(&mut rng) as u8;
                    }
                    b
                }
            };
            bytes.truncate(bytes.len().min(4096));
            let mut r = FrameReader::new(&bytes[..], None);
            for _ in 0..4 {
                if r.read_frame().is_err() {
                    break;
                }
            }
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut bytes = FrameHeader::encode(FrameType::GuestState, u32::MAX).to_vec();
        bytes.extend_from_slice(&[0; 64]);
        let mut r = FrameReader::new(&bytes[..], None);
        assert!(matches!(
            r.read_frame(),
            Err(TransportError::Wire(WireError::Oversized { .. }))
        ));
    }
}
