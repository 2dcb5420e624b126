//! Moving frames over a byte stream: [`FrameReader`] (bounded, typed errors),
//! [`FrameWriter`] (optional [`TokenBucket`] to emulate a slower link), and [`Link`], the
//! sender's [`PacketChannel`]: a writer thread that owns the socket's write half so the
//! encode pipeline keeps running while the kernel drains the socket.
//!
//! After authentication both ends are switched to sealed records ([`crate::migration::connect::seal`]):
//! [`FrameReader::open_with`], [`FrameWriter::seal_with`], [`Link::seal_with`].
//!
//! Parallel channels (`--channels N`, [`crate::migration::connect::channels`]) run one [`Link`] per connection;
//! their writers share one [`SharedBucket`], so `--max-bandwidth` limits the total.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender as ChannelSender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmstream_codec::Packet;

use crate::migration::connect::seal::{Opener, SealError, Sealer, LEN_PREFIX};
use crate::migration::wire::{
    packet_frame_header, FrameHeader, FrameType, Message, WireError, FRAME_HEADER_LEN,
};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer closed the connection at a frame boundary.
    #[error("connection closed by peer")]
    Closed,
    /// The connection ended in the middle of a frame.
    #[error("connection ended inside a {kind} frame ({got} of {needed} bytes)")]
    Truncated {
        /// Frame type name ("header" before the type is known).
        kind: &'static str,
        /// Bytes that arrived.
        got: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// Nothing arrived within the read timeout.
    #[error("no data from peer within {0:?}")]
    Timeout(Duration),
    /// The peer stopped reading: a write made no progress within the write timeout.
    #[error("the peer stopped reading (write timed out)")]
    Stalled,
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A socket error.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// A sealed record did not open (`crate::migration::connect::seal`).
    #[error(transparent)]
    Seal(#[from] SealError),
}

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

/// A token bucket limiting a byte stream to `rate` bytes per second with bursts of up to
/// `burst` bytes. A write larger than the bucket goes into debt and the writer sleeps it off,
/// so the long-run rate is exact whatever the write sizes.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `rate` bytes/s; the burst is 10 ms worth (at least 16 KiB).
    pub fn new(rate: u64) -> Self {
        Self::at(rate, Instant::now())
    }

    /// Like [`TokenBucket::new`], with the clock at `now`.
    pub fn at(rate: u64, now: Instant) -> Self {
        let rate = rate.max(1) as f64;
        let burst = (rate / 100.0).max(16384.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` bytes' worth of tokens at instant `now`; returns how long the caller must
    /// wait before sending them.
    pub fn take_at(&mut self, n: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Takes `n` bytes' worth of tokens, sleeping as long as needed.
    pub fn take(&mut self, n: usize) {
        let wait = self.take_at(n, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// The rate in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// A bucket of `rate` bytes/s that several writers share.
    pub fn shared(rate: u64) -> SharedBucket {
        Arc::new(Mutex::new(TokenBucket::new(rate)))
    }
}

/// A [`TokenBucket`] shared by the writers of several connections: each takes its bytes
/// (going into debt together) and sleeps its own wait outside the lock, so the sum of
/// their rates is the bucket's rate.
pub type SharedBucket = Arc<Mutex<TokenBucket>>;

/// Takes `n` bytes from `bucket`, sleeping as long as needed.
fn take_shared(bucket: &SharedBucket, n: usize) {
    let wait = bucket
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take_at(n, Instant::now());
    if !wait.is_zero() {
        std::thread::sleep(wait);
    }
}

/// A socket whose send timeout means "the peer took nothing for this long". A blocking
/// send under `SO_SNDTIMEO` returns short when the timeout fires, and a caller that
/// retries the rest (`write_all`, `BufWriter`) waited a second full timeout: a stalled
/// destination took twice `--io-timeout` to notice. Here each write sends what fits now
/// and otherwise waits, at most the timeout, for room.
#[derive(Debug)]
pub struct SendTimeout {
    inner: TcpStream,
    /// The socket's send timeout, read once (`None`: wait for ever).
    timeout: Option<Duration>,
}

impl SendTimeout {
    /// Wraps `inner`, whose send timeout is already set.
    pub fn new(inner: TcpStream) -> io::Result<SendTimeout> {
        Ok(SendTimeout {
            timeout: inner.write_timeout()?,
            inner,
        })
    }
}

impl Write for SendTimeout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use nix::errno::Errno;
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use nix::sys::socket::{send, MsgFlags};
        use std::os::fd::{AsFd, AsRawFd};
        loop {
            match send(
                self.inner.as_raw_fd(),
                buf,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => return Ok(n),
                Err(Errno::EAGAIN) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let wait = match self.timeout {
                Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
                None => PollTimeout::NONE,
            };
            let mut fds = [PollFd::new(self.inner.as_fd(), PollFlags::POLLOUT)];
            match poll(&mut fds, wait) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer took nothing for the whole send timeout",
                    ))
                }
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes frames to a stream, optionally rate limited, counting bytes.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    bucket: Option<SharedBucket>,
    bytes: u64,
    /// Test-only: flip the byte at this stream offset (`VMSTREAM_TEST_CORRUPT_AT`).
    corrupt_at: Option<u64>,
    /// Set once the connection is sealed (`crate::migration::connect::seal`), with its record buffer.
    sealer: Option<(Sealer, Vec<u8>)>,
}

/// Environment variable (tests only): stream offset of one byte the sender flips.
pub const CORRUPT_ENV: &str = "VMSTREAM_TEST_CORRUPT_AT";

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
            corrupt_at: None,
            sealer: None,
        }
    }

    /// From now on every frame is written sealed (`crate::migration::connect::seal`).
    pub fn seal_with(&mut self, sealer: Sealer) {
        self.sealer = Some((sealer, Vec::new()));
    }

    /// Test hook: flip the byte at stream offset `at` when it is written.
    pub fn corrupt_byte_at(&mut self, at: Option<u64>) {
        self.corrupt_at = at;
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        if let Some(b) = &self.bucket {
            take_shared(b, data.len());
        }
        match self.corrupt_at {
            Some(at) if at >= self.bytes && at < self.bytes + data.len() as u64 => {
                let mut copy = data.to_vec();
                copy[(at - self.bytes) as usize] ^= 0x5a;
                self.inner.write_all(&copy)?;
            }
            _ => self.inner.write_all(data)?,
        }
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Writes the frame made of `parts`, sealed once the connection is.
    fn write_frame(&mut self, parts: &[&[u8]]) -> io::Result<()> {
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

/// Where the source sends packets and control messages.
pub trait PacketChannel: Send {
    /// Queues a codec packet.
    fn send_packet(&mut self, packet: Packet) -> Result<(), TransportError>;
    /// Queues a control message (ordered after every packet queued before it).
    fn send_message(&mut self, msg: &Message) -> Result<(), TransportError>;
    /// Packets already written, for the encoder to reuse their buffers.
    fn returned(&mut self) -> Vec<Packet>;
    /// Bytes written to the wire so far.
    fn bytes_sent(&self) -> u64;
}

enum Outgoing {
    Packet(Packet),
    Message(Vec<u8>),
    /// Seal every frame queued after this one.
    Seal(Box<Sealer>),
}

/// A [`PacketChannel`] over one TCP connection, with a writer thread.
pub struct Link {
    queue: Option<SyncSender<Outgoing>>,
    returned: Receiver<Packet>,
    shared: Arc<LinkShared>,
    thread: Option<JoinHandle<()>>,
}

/// What a [`Link`] and its writer thread share.
#[derive(Default)]
struct LinkShared {
    /// Bytes written so far.
    sent: AtomicU64,
    /// The write error that stopped the writer.
    error: Mutex<Option<io::Error>>,
    /// Set by [`Link::discard_packets`].
    discard: AtomicBool,
    /// When the writer last flushed a control message to the socket.
    message_flushed: Mutex<Option<Instant>>,
}

impl LinkShared {
    /// Records the write error that stops the writer.
    fn set_error(&self, e: io::Error) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    /// Takes the writer's error, if it stopped on one.
    fn take_error(&self) -> Option<io::Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Link {
    /// Starts a writer thread on `stream` (a clone of the connection's socket), limited to
    /// `max_bandwidth` bytes/s if given. Honours [`CORRUPT_ENV`].
    pub fn new(stream: TcpStream, max_bandwidth: Option<u64>) -> io::Result<Link> {
        let corrupt_at = std::env::var(CORRUPT_ENV).ok().and_then(|v| v.parse().ok());
        Link::with_options(
            stream,
            max_bandwidth.map(TokenBucket::shared),
            corrupt_at,
            "vmstream-link",
        )
    }

    /// Starts a writer thread named `name` on `stream`, taking its bytes from `bucket`;
    /// `corrupt_at` is the test hook of [`FrameWriter::corrupt_byte_at`].
    pub fn with_options(
        stream: TcpStream,
        bucket: Option<SharedBucket>,
        corrupt_at: Option<u64>,
        name: &str,
    ) -> io::Result<Link> {
        let (queue, jobs) = sync_channel::<Outgoing>(16);
        let (give_back, returned) = channel();
        let stream = SendTimeout::new(stream)?;
        let mut writer =
            FrameWriter::with_bucket(io::BufWriter::with_capacity(256 << 10, stream), bucket);
        writer.corrupt_byte_at(corrupt_at);
        let shared = Arc::new(LinkShared::default());
        let writer_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || writer_loop(writer, jobs, give_back, &writer_shared))?;
        Ok(Link {
            queue: Some(queue),
            returned,
            shared,
            thread: Some(thread),
        })
    }

    /// When the writer last flushed a control message (everything queued before it went
    /// out first): a reply to it cannot come sooner than one round trip later.
    pub fn message_flushed_at(&self) -> Option<Instant> {
        *self
            .shared
            .message_flushed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn push(&mut self, job: Outgoing) -> Result<(), TransportError> {
        let failed = match &self.queue {
            Some(q) => q.send(job).is_err(),
            None => true,
        };
        if failed {
            return Err(self.take_error());
        }
        Ok(())
    }

    fn take_error(&mut self) -> TransportError {
        match self.shared.take_error() {
            Some(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                TransportError::Stalled
            }
            Some(e) => TransportError::Io(e),
            None => TransportError::Closed,
        }
    }

    /// Seals every frame queued after this call (`crate::migration::connect::seal`).
    pub fn seal_with(&mut self, sealer: Sealer) -> Result<(), TransportError> {
        self.push(Outgoing::Seal(Box::new(sealer)))
    }

    /// From now on packets, queued or not, are dropped unwritten (whole frames: the stream
    /// stays well formed); messages are still written. For a migration that is given up,
    /// so that its `Abort` does not wait behind data the destination will throw away.
    pub fn discard_packets(&self) {
        self.shared.discard.store(true, Ordering::Relaxed);
    }

    /// Waits until everything queued is written, then stops the writer thread.
    pub fn finish(&mut self) -> Result<(), TransportError> {
        self.queue = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match self.shared.take_error() {
            Some(e) => Err(TransportError::Io(e)),
            None => Ok(()),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

fn writer_loop(
    mut writer: FrameWriter<io::BufWriter<SendTimeout>>,
    jobs: Receiver<Outgoing>,
    give_back: ChannelSender<Packet>,
    shared: &LinkShared,
) {
    for job in jobs {
        let result = match job {
            Outgoing::Packet(p) => {
                let r = if shared.discard.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    writer.write_packet(p.bytes())
                };
                let _ = give_back.send(p);
                r
            }
            Outgoing::Message(frame) => {
                let r = writer
                    .write_frame(&[&frame])
                    .and_then(|_| writer.inner.flush());
                if r.is_ok() {
                    *shared
                        .message_flushed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                }
                r
            }
            Outgoing::Seal(sealer) => {
                writer.seal_with(*sealer);
                Ok(())
            }
        };
        shared.sent.store(writer.bytes_written(), Ordering::Relaxed);
        if let Err(e) = result {
            shared.set_error(e);
            return; // dropping `jobs` makes the next send fail
        }
    }
    if let Err(e) = writer.inner.flush() {
        shared.set_error(e);
    }
}

impl PacketChannel for Link {
    fn send_packet(&mut self, packet: Packet) -> Result<(), TransportError> {
        self.push(Outgoing::Packet(packet))
    }

    fn send_message(&mut self, msg: &Message) -> Result<(), TransportError> {
        self.push(Outgoing::Message(msg.to_frame()))
    }

    fn returned(&mut self) -> Vec<Packet> {
        self.returned.try_iter().collect()
    }

    fn bytes_sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::wire::{Abort, AbortCode, RoundAck};

    /// A peer that takes nothing: the write that fills the socket buffers comes back short
    /// after the send timeout, and the retry fails at once (`TimedOut`) instead of blocking
    /// for a second timeout and failing with `WouldBlock`.
    #[test]
    fn a_send_timeout_holds_for_the_whole_write() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_peer, _) = listener.accept().unwrap();
        stream
            .set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut w = io::BufWriter::with_capacity(256 << 10, SendTimeout::new(stream).unwrap());
        let err = w.write_all(&vec![7u8; 32 << 20]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    }

    /// A peer that reads slowly but keeps reading is no timeout, however long the whole
    /// write takes: the timeout is for a peer that takes nothing.
    #[test]
    fn a_slow_peer_that_keeps_reading_is_no_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let total = 24 << 20;
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0;
            while got < total {
                // About 10 MB/s: the one 24 MiB write takes over two timeouts (the
                // kernel's blocking send returned short at the first, which was taken
                // for a stall).
                std::thread::sleep(Duration::from_millis(100));
                got += peer.read(&mut buf).unwrap();
            }
            got
        });
        let mut w = io::BufWriter::with_capacity(256 << 10, SendTimeout::new(stream).unwrap());
        w.write_all(&vec![7u8; total]).unwrap();
        w.flush().unwrap();
        assert_eq!(reader.join().unwrap(), total);
    }

    #[test]
    fn token_bucket_charges_debt_exactly() {
        let t0 = Instant::now();
        let mut b = TokenBucket::at(1_000_000, t0);
        // The first 16 KiB burst is free.
        assert_eq!(b.take_at(16384, t0), Duration::ZERO);
        // 100 000 more bytes at 1 MB/s: 100 ms of debt.
        assert_eq!(b.take_at(100_000, t0), Duration::from_millis(100));
        // After sleeping it off the bucket is empty, not in credit.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.take_at(1000, t1), Duration::from_millis(1));
        // Idle time refills at most one burst.
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(
            b.take_at(16384, t2 + Duration::from_millis(1)),
            Duration::ZERO
        );
        assert_eq!(b.rate(), 1_000_000);
    }

    fn ack() -> Message {
        Message::RoundAck(RoundAck {
            round: 3,
            records: 1,
            packets: 1,
            barrier_ns: 0,
        })
    }

    /// After `discard_packets` a link writes no packet, queued or new, and still writes
    /// messages, frame by frame (what a cancelled migration's `Abort` relies on).
    #[test]
    fn discarded_packets_are_not_written_and_messages_still_are() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let mut config = vmstream_codec::SenderConfig::new(2);
        config.batch_pages = 1;
        let mut codec = vmstream_codec::Sender::new(config).unwrap();
        codec.push(0, &[7u8; 4096]).unwrap();
        codec.push(1, &[9u8; 4096]).unwrap();
        codec.end_round().unwrap();
        let (first, second) = (codec.poll().unwrap(), codec.poll().unwrap());
        let (first_bytes, second_bytes) = (first.bytes().to_vec(), second.bytes().to_vec());
        let mut link = Link::new(client, None).unwrap();
        let mut r = FrameReader::new(server, Some(Duration::from_secs(5)));
        link.send_packet(first).unwrap();
        link.send_message(&ack()).unwrap();
        assert!(matches!(r.read_frame().unwrap(), Frame::Packet(p) if p == first_bytes));
        assert!(matches!(r.read_frame().unwrap(), Frame::Control(m) if m == ack()));
        link.discard_packets();
        link.send_packet(second).unwrap();
        let abort = Message::Abort(Abort {
            code: AbortCode::Cancelled,
            reason: "given up".into(),
        });
        link.send_message(&abort).unwrap();
        link.finish().unwrap();
        match r.read_frame().unwrap() {
            Frame::Control(m) => assert_eq!(m, abort),
            Frame::Packet(p) => panic!("a discarded packet was written ({})", p == second_bytes),
        }
        assert!(matches!(r.read_frame(), Err(TransportError::Closed)));
    }

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
            w.corrupt_byte_at(Some(at));
            w.write_message(&abort).unwrap();
            let mut r = FrameReader::new(&w.inner[..], None);
            assert!(r.read_frame().is_err(), "flip at {at} unnoticed");
        }
    }

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
                        let crc = crc32c::crc32c(&b[FRAME_HEADER_LEN..body_end]);
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
