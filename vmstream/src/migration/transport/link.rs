//! [`Link`], the sender's [`PacketChannel`]: a writer thread that owns the socket's write
//! half, so the encode pipeline keeps running while the kernel drains the socket.

use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender as ChannelSender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use vmstream_codec::Packet;

use super::{
    FrameWriter, SendTimeout, SharedBucket, SharedDeadline, Socket, TokenBucket, TransportError,
};
use crate::migration::connect::seal::Sealer;
use crate::migration::fault::{is_dropped, StreamFault};
use crate::migration::wire::Message;

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
    /// A control message whose first byte carries a file descriptor (unix sockets).
    MessageWithFd(Vec<u8>, OwnedFd),
    /// Seal every frame queued after this one.
    Seal(Box<Sealer>),
}

/// A [`PacketChannel`] over one connection, with a writer thread.
pub struct Link {
    queue: Option<SyncSender<Outgoing>>,
    returned: Receiver<Packet>,
    shared: Arc<LinkShared>,
    thread: Option<JoinHandle<()>>,
    /// The writer waits for the peer no later than this.
    deadline: SharedDeadline,
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
    /// `max_bandwidth` bytes/s if given.
    pub fn new(stream: Socket, max_bandwidth: Option<u64>) -> io::Result<Link> {
        Link::with_options(
            stream,
            max_bandwidth.map(TokenBucket::shared),
            Vec::new(),
            "vmstream-link",
        )
    }

    /// Starts a writer thread named `name` on `stream`, taking its bytes from `bucket`;
    /// `faults` are a test's, by stream offset ([`FrameWriter::inject`]).
    pub fn with_options(
        stream: Socket,
        bucket: Option<SharedBucket>,
        faults: Vec<(u64, StreamFault)>,
        name: &str,
    ) -> io::Result<Link> {
        let (queue, jobs) = sync_channel::<Outgoing>(16);
        let (give_back, returned) = channel();
        let deadline = SharedDeadline::default();
        let stream = SendTimeout::with_deadline(stream, deadline.clone())?;
        let mut writer =
            FrameWriter::with_bucket(io::BufWriter::with_capacity(256 << 10, stream), bucket);
        writer.inject(faults);
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
            deadline,
        })
    }

    /// From now on the writer waits for the peer to take its bytes no later than
    /// `deadline` (`None`: only the send timeout holds); past it a write fails and so does
    /// every later send ([`TransportError::Stalled`]).
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        self.deadline.set(deadline);
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

    /// Queues a control message that carries the file descriptor `fd` with it (unix
    /// sockets only: over TCP the writer fails).
    pub fn send_message_with_fd(
        &mut self,
        msg: &Message,
        fd: OwnedFd,
    ) -> Result<(), TransportError> {
        self.push(Outgoing::MessageWithFd(msg.to_frame(), fd))
    }

    /// Queues a whole frame as it is (a control message encoded by the caller, e.g. one a
    /// test damaged after its check was computed).
    pub fn send_frame(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
        self.push(Outgoing::Message(frame))
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
                let r = writer.write_frame(&[&frame]).and_then(|_| writer.flush());
                if r.is_ok() {
                    *shared
                        .message_flushed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                }
                r
            }
            Outgoing::MessageWithFd(frame, fd) => {
                // Flushed first, so that the descriptor goes with this frame's first byte.
                let attached = writer
                    .flush()
                    .and_then(|()| writer.get_ref().get_ref().socket().attach_fd(fd));
                attached.and_then(|()| writer.write_frame(&[&frame]).and_then(|_| writer.flush()))
            }
            Outgoing::Seal(sealer) => {
                writer.seal_with(*sealer);
                Ok(())
            }
        };
        shared.sent.store(writer.bytes_written(), Ordering::Relaxed);
        if let Err(e) = result {
            if is_dropped(&e) {
                // An injected drop: the whole connection goes, as with a cut link.
                let _ = writer.get_ref().get_ref().socket().shutdown(Shutdown::Both);
            }
            shared.set_error(e);
            return; // dropping `jobs` makes the next send fail
        }
    }
    if let Err(e) = writer.flush() {
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
    use std::time::Duration;

    use std::net::TcpStream;

    use super::*;
    use crate::migration::transport::{ack, Frame, FrameReader};
    use crate::migration::wire::{Abort, AbortCode};

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
        let mut link = Link::new(Socket::tcp(client), None).unwrap();
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

    /// An injected drop shuts the whole connection: the peer reads the bytes before the
    /// offset and then the end of the stream, and the link's next send fails with the
    /// injected error.
    #[test]
    fn an_injected_drop_closes_the_connection_at_its_offset() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let frame = ack().to_frame();
        let at = frame.len() as u64 + 5;
        let mut link = Link::with_options(
            Socket::tcp(client),
            None,
            vec![(at, StreamFault::Drop)],
            "t",
        )
        .unwrap();
        link.send_message(&ack()).unwrap();
        let _ = link.send_message(&ack());
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got.len() as u64, at);
        assert_eq!(got[..frame.len()], frame[..]);
        let err = (0..100)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(10));
                link.send_message(&ack()).err()
            })
            .expect("sends keep succeeding after the drop");
        assert!(
            matches!(&err, TransportError::Io(e) if is_dropped(e)),
            "{err}"
        );
    }
}
