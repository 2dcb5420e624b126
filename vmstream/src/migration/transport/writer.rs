//! [`FrameWriter`]: writes frames to a byte stream, sealed once the connection is, optionally
//! rate limited by a [`SharedBucket`], counting bytes; a test's [`StreamFault`]s are applied
//! as the stream passes their offsets.

use std::collections::VecDeque;
use std::io::{self, Write};

use super::rate::{take_shared, SharedBucket, TokenBucket};
use crate::migration::connect::seal::Sealer;
use crate::migration::fault::{dropped, StreamFault};
use crate::migration::wire::{packet_frame_header, Message};

/// Writes frames to a stream, optionally rate limited, counting bytes.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    bucket: Option<SharedBucket>,
    bytes: u64,
    /// Injected faults not yet reached, by stream offset (`crate::migration::fault`).
    faults: VecDeque<(u64, StreamFault)>,
    /// Set once the connection is sealed (`crate::migration::connect::seal`), with its record buffer.
    sealer: Option<(Sealer, Vec<u8>)>,
}

impl<W: Write> FrameWriter<W> {
    /// A writer over `inner`, limited to `max_bandwidth` bytes/s if given.
    pub fn new(inner: W, max_bandwidth: Option<u64>) -> Self {
        Self::with_bucket(inner, max_bandwidth.map(TokenBucket::shared))
    }

    /// A writer over `inner` that takes its bytes from `bucket` (possibly shared with
    /// other writers).
    pub fn with_bucket(inner: W, bucket: Option<SharedBucket>) -> Self {
        FrameWriter {
            inner,
            bucket,
            bytes: 0,
            faults: VecDeque::new(),
            sealer: None,
        }
    }

    /// From now on every frame is written sealed (`crate::migration::connect::seal`).
    pub fn seal_with(&mut self, sealer: Sealer) {
        self.sealer = Some((sealer, Vec::new()));
    }

    /// Applies `faults` (stream offset, fault) as the stream reaches them; a fault at an
    /// offset already written applies at the next byte.
    pub fn inject(&mut self, faults: impl IntoIterator<Item = (u64, StreamFault)>) {
        let mut all: Vec<_> = self.faults.drain(..).chain(faults).collect();
        all.sort_by_key(|&(at, _)| at);
        self.faults = all.into();
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        if let Some(b) = &self.bucket {
            take_shared(b, data.len());
        }
        if self.faults.is_empty() {
            self.inner.write_all(data)?;
            self.bytes += data.len() as u64;
            return Ok(());
        }
        self.write_faulty(data)
    }

    /// [`Self::write_chunk`] through the faults within `data`: each stall or drop lets the
    /// bytes before its offset go out first.
    fn write_faulty(&mut self, data: &[u8]) -> io::Result<()> {
        let start = self.bytes;
        let end = start + data.len() as u64;
        let mut data = std::borrow::Cow::Borrowed(data);
        let mut done = 0;
        while let Some((at, fault)) = self.faults.front().copied().filter(|&(at, _)| at < end) {
            self.faults.pop_front();
            let i = at.saturating_sub(start) as usize;
            if let StreamFault::Corrupt = fault {
                data.to_mut()[i] ^= 0x5a;
                continue;
            }
            self.inner.write_all(&data[done..i])?;
            self.inner.flush()?;
            self.bytes = start + i as u64;
            done = i;
            match fault {
                StreamFault::Stall(d) => std::thread::sleep(d),
                _ => return Err(dropped(self.bytes)),
            }
        }
        self.inner.write_all(&data[done..])?;
        self.bytes = end;
        Ok(())
    }

    /// Writes the frame made of `parts`, sealed once the connection is.
    pub(super) fn write_frame(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        match self.sealer.take() {
            None => {
                for p in parts {
                    self.write_chunk(p)?;
                }
                Ok(())
            }
            Some((mut sealer, mut record)) => {
                sealer.seal(parts, &mut record);
                let written = self.write_chunk(&record);
                self.sealer = Some((sealer, record));
                written
            }
        }
    }

    /// Flushes the stream (the link's writer thread, after a message or at the end).
    pub(super) fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    /// Writes a codec packet in a `Packet` frame.
    pub fn write_packet(&mut self, packet: &[u8]) -> io::Result<()> {
        self.write_frame(&[&packet_frame_header(packet), packet])
    }

    /// Writes a control message and flushes.
    pub fn write_message(&mut self, msg: &Message) -> io::Result<()> {
        self.write_frame(&[&msg.to_frame()])?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::connect::seal::{Opener, SealError};
    use crate::migration::transport::{ack, Frame, FrameReader, TransportError};
    use crate::migration::wire::{Abort, AbortCode};

    #[test]
    fn frames_survive_a_stream_and_eof_is_typed() {
        let mut w = FrameWriter::new(Vec::new(), None);
        let ack = ack();
        w.write_message(&ack).unwrap();
        w.write_packet(b"not really a packet").unwrap();
        let bytes = w.inner.clone();
        assert_eq!(w.bytes_written(), bytes.len() as u64);
        let mut r = FrameReader::new(&bytes[..], None);
        assert!(matches!(r.read_frame().unwrap(), Frame::Control(m) if m == ack));
        assert!(matches!(r.read_frame().unwrap(), Frame::Packet(p) if p == b"not really a packet"));
        assert!(matches!(r.read_frame(), Err(TransportError::Closed)));
        let mut r = FrameReader::new(&bytes[..bytes.len() - 3], None);
        r.read_frame().unwrap();
        assert!(matches!(
            r.read_frame(),
            Err(TransportError::Truncated { kind: "packet", .. })
        ));
        let mut r = FrameReader::new(&bytes[..5], None);
        assert!(matches!(
            r.read_frame(),
            Err(TransportError::Truncated {
                kind: "header",
                got: 5,
                ..
            })
        ));
    }

    #[test]
    fn sealed_frames_round_trip_and_any_change_is_refused() {
        let key = [3u8; 32];
        let mut w = FrameWriter::new(Vec::new(), None);
        let ack = ack();
        // The exchange itself travels in the clear; everything after it is sealed.
        w.write_message(&ack).unwrap();
        let clear = w.inner.len();
        w.seal_with(Sealer::new(&key));
        w.write_message(&ack).unwrap();
        w.write_packet(b"guest memory").unwrap();
        let bytes = w.inner.clone();
        assert_eq!(w.bytes_written(), bytes.len() as u64);
        assert!(!bytes[clear..].windows(12).any(|x| x == b"guest memory"));
        let mut r = FrameReader::new(&bytes[..], None);
        assert!(matches!(r.read_frame().unwrap(), Frame::Control(m) if m == ack));
        r.open_with(Opener::new(&key));
        assert!(matches!(r.read_frame().unwrap(), Frame::Control(m) if m == ack));
        assert!(matches!(r.read_frame().unwrap(), Frame::Packet(p) if p == b"guest memory"));
        assert!(matches!(r.read_frame(), Err(TransportError::Closed)));
        let read_sealed = |bytes: &[u8]| {
            let mut r = FrameReader::new(&bytes[clear..], None);
            r.open_with(Opener::new(&key));
            r.read_frame().and_then(|_| r.read_frame())
        };
        for at in clear..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(
                matches!(
                    read_sealed(&bad),
                    Err(TransportError::Seal(_) | TransportError::Truncated { .. })
                ),
                "flip at {at}"
            );
        }
        // A dropped record: the next one does not open under its number.
        let first = 4 + u32::from_le_bytes(bytes[clear..clear + 4].try_into().unwrap()) as usize;
        let mut r = FrameReader::new(&bytes[clear + first..], None);
        r.open_with(Opener::new(&key));
        assert!(matches!(
            r.read_frame(),
            Err(TransportError::Seal(SealError::Forged { record: 0 }))
        ));
        // A length beyond any frame is refused before reading (or allocating) it.
        let mut huge = bytes[..clear].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut r = FrameReader::new(&huge[clear..], None);
        r.open_with(Opener::new(&key));
        assert!(matches!(
            r.read_frame(),
            Err(TransportError::Seal(SealError::Length { .. }))
        ));
    }

    #[test]
    fn corrupted_stream_byte_is_detected() {
        let abort = Message::Abort(Abort {
            code: AbortCode::Cancelled,
            reason: "timeout".into(),
        });
        let len = abort.to_frame().len() as u64;
        for at in 0..len {
            let mut w = FrameWriter::new(Vec::new(), None);
            w.inject([(at, StreamFault::Corrupt)]);
            w.write_message(&abort).unwrap();
            let mut r = FrameReader::new(&w.inner[..], None);
            assert!(r.read_frame().is_err(), "flip at {at} unnoticed");
        }
    }

    /// A drop writes exactly the bytes before its offset and then fails with the injected
    /// error; a stall delays the bytes from its offset on and changes none of them.
    #[test]
    fn drops_cut_the_stream_at_their_offset_and_stalls_only_delay_it() {
        let frame = ack().to_frame();
        let mut w = FrameWriter::new(Vec::new(), None);
        w.inject([(frame.len() as u64 + 7, StreamFault::Drop)]);
        w.write_message(&ack()).unwrap();
        let err = w.write_message(&ack()).unwrap_err();
        assert!(crate::migration::fault::is_dropped(&err), "{err}");
        assert_eq!(w.inner.len(), frame.len() + 7);
        assert_eq!(w.bytes_written(), frame.len() as u64 + 7);

        let stall = std::time::Duration::from_millis(60);
        let mut w = FrameWriter::new(Vec::new(), None);
        w.inject([(3, StreamFault::Stall(stall)), (5, StreamFault::Corrupt)]);
        let t = std::time::Instant::now();
        w.write_message(&ack()).unwrap();
        assert!(t.elapsed() >= stall);
        let mut expected = frame.clone();
        expected[5] ^= 0x5a;
        assert_eq!(w.inner, expected);
    }
}
