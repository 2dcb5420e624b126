//! [`FrameReader`]: reads [`Frame`]s from a byte stream, bounding every length before
//! allocating and typing every failure (closed, truncated, timed out, corrupt, forged).
//! A frame's whole read, however its bytes trickle in, is held to one deadline.

use std::io::{self, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

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

/// A byte stream whose reads can be limited in time: how a [`FrameReader`] holds each
/// frame to its deadline (a socket's read timeout, set before every read to what is left).
pub trait TimedRead: Read {
    /// Limits each of the next reads to `limit` (never zero).
    fn limit_reads(&mut self, limit: Option<Duration>) -> io::Result<()>;
}

impl TimedRead for TcpStream {
    fn limit_reads(&mut self, limit: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(limit)
    }
}

impl TimedRead for super::Socket {
    fn limit_reads(&mut self, limit: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(limit)
    }
}

/// A buffer never waits (fuzzing and tests read frames from memory).
impl TimedRead for &[u8] {
    fn limit_reads(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// A stream whose every read waits at most until `deadline`: past it, a read fails as
/// `TimedOut` without waiting. Without a deadline the stream's own read timeout holds.
struct Timed<'a, R> {
    inner: &'a mut R,
    deadline: Option<Instant>,
}

impl<R: TimedRead> Read for Timed<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(d) = self.deadline {
                match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => self.inner.limit_reads(Some(left))?,
                    _ => return Err(io::ErrorKind::TimedOut.into()),
                }
            }
            match self.inner.read(buf) {
                // The socket's timeout is rounded: only the deadline itself ends the read.
                Err(e)
                    if self.deadline.is_some()
                        && matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                read => return read,
            }
        }
    }
}

/// Reads frames from a stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    bytes: u64,
    /// How long one frame may take, from the call that reads it to its last byte.
    timeout: Option<Duration>,
    /// An instant no frame may outlast, whatever `timeout` leaves (the source's pause bound).
    outer_deadline: Option<Instant>,
    /// When the frame being read must be complete.
    frame_deadline: Option<Instant>,
    /// Set once the connection is sealed (`crate::migration::connect::seal`).
    opener: Option<Opener>,
}

impl<R: TimedRead> FrameReader<R> {
    /// A reader over `inner` whose every frame, header to last byte, must arrive within
    /// `timeout` of the call that reads it (`None`: the stream's own read timeout, per
    /// read): a peer that trickles a frame in byte by byte gets no more time than one that
    /// sends nothing.
    pub fn new(inner: R, timeout: Option<Duration>) -> Self {
        FrameReader {
            inner,
            bytes: 0,
            timeout,
            outer_deadline: None,
            frame_deadline: None,
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

    /// How long each frame from now on may take (`None`: the stream's read timeout).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// An instant no frame may outlast (`None`: only the frame timeout holds); a frame cut
    /// short by it fails as [`TransportError::Timeout`] too, and the caller, who set it,
    /// knows which limit it was.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.outer_deadline = deadline;
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Bytes read so far (frame headers included).
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// Starts the deadline of the next frame: `timeout` from now, or the outer deadline if
    /// that comes first.
    fn start_frame(&mut self) {
        let own = self.timeout.map(|t| Instant::now() + t);
        self.frame_deadline = match (own, self.outer_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// The stream, each read limited to the time the current frame's deadline leaves.
    fn timed(&mut self) -> Timed<'_, R> {
        Timed {
            inner: &mut self.inner,
            deadline: self.frame_deadline,
        }
    }

    /// Fills `buf`; returns how many bytes arrived before EOF.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        let mut got = 0;
        let mut timed = self.timed();
        let read = loop {
            if got == buf.len() {
                break Ok(());
            }
            match timed.read(&mut buf[got..]) {
                Ok(0) => break Ok(()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.bytes += got as u64;
        read.map_err(|e| self.read_error(e))?;
        Ok(got)
    }

    /// A read error, typed: the frame's deadline passing is `Timeout`.
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
        let read = self.timed().take(needed as u64).read_to_end(&mut buf);
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
        self.start_frame();
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

impl FrameReader<super::Socket> {
    /// Moves this reader (what it buffered, its sealing state, its byte count) out to the
    /// caller, for a thread that reads the connection from now on, and leaves in its place a
    /// new, unsealed reader of the same connection whose frames may take `timeout`.
    pub fn hand_off(&mut self, timeout: Option<Duration>) -> io::Result<Self> {
        let placeholder = FrameReader::new(self.inner.try_clone()?, timeout);
        Ok(std::mem::replace(self, placeholder))
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

    /// A connection and a thread that writes `bytes` to it `gap` apart, `chunk` at a
    /// time; the thread returns how many it wrote before the reader went away.
    fn trickle(
        bytes: Vec<u8>,
        chunk: usize,
        gap: Duration,
    ) -> (TcpStream, std::thread::JoinHandle<usize>) {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let feeder = std::thread::spawn(move || {
            let mut sent = 0;
            for piece in bytes.chunks(chunk) {
                std::thread::sleep(gap);
                if peer.write_all(piece).is_err() {
                    break;
                }
                sent += piece.len();
            }
            sent
        });
        (ours, feeder)
    }

    fn long_abort() -> Message {
        Message::Abort(Abort {
            code: AbortCode::Protocol,
            reason: "x".repeat(100),
        })
    }

    /// One byte every 200 ms keeps a per-read timeout of 1 s happy for ever; the frame's
    /// deadline ends it after 1 s with the typed error, long before the frame is complete.
    #[test]
    fn a_frame_trickled_in_byte_by_byte_fails_at_its_deadline() {
        let frame = long_abort().to_frame();
        let (stream, feeder) = trickle(frame.clone(), 1, Duration::from_millis(200));
        let mut r = FrameReader::new(stream, Some(Duration::from_secs(1)));
        let t = Instant::now();
        let err = r.read_frame().unwrap_err();
        let took = t.elapsed();
        assert!(
            matches!(err, TransportError::Timeout(limit) if limit == Duration::from_secs(1)),
            "{err}"
        );
        assert!(r.bytes_read() > 0 && (r.bytes_read() as usize) < frame.len());
        assert!(took >= Duration::from_secs(1), "{took:?}");
        // A generous bound: it did not wait for the whole frame (about 24 s).
        assert!(took < Duration::from_secs(5), "{took:?}");
        drop(r);
        assert!(feeder.join().unwrap() < frame.len());
    }

    /// A frame that arrives in many small pieces, all within its deadline, is read whole;
    /// an outer deadline shorter than the frame's ends the next one as a timeout.
    #[test]
    fn pieces_within_the_deadline_make_a_frame_and_an_outer_deadline_cuts_it() {
        let frame = long_abort().to_frame();
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        let (stream, _feeder) = trickle(two, 16, Duration::from_millis(20));
        let mut r = FrameReader::new(stream, Some(Duration::from_secs(5)));
        assert!(matches!(r.read_frame().unwrap(), Frame::Control(m) if m == long_abort()));
        let t = Instant::now();
        r.set_deadline(Some(t + Duration::from_millis(100)));
        let err = r.read_frame().unwrap_err();
        assert!(matches!(err, TransportError::Timeout(_)), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
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
