//! The destination's door: accepts connections and reads how each one opens (with a key,
//! the exchange of `crate::migration::connect::auth` first) on a thread of its own, so connections that stall
//! (a port scanner, a stranger that says nothing, a slow peer) hold up nothing else.
//!
//! ```text
//! Admissions::next --accept--> connection thread: first frame within AUTH_WAIT
//!        ^                        |  (with a key: the exchange, then the hello)
//!        |                        |-- with a key, not proved: HelloReply{Auth}, reported, closed
//!        |                        |-- without: closed or silent before a frame: reported, closed
//!        |                        |-- the oldest of 64 being read when one more comes: closed
//!        \----- Opening ----------/-- otherwise: its opening, to whoever calls next()
//! Admissions dropped: openings still queued or still coming are refused as busy
//! ```
//!
//! The destination takes the first opening as its source (with a key: the first
//! connection that proved the key), then, with several channels, the next ones as
//! channels 1.. (`crate::migration::connect::channels`).

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::migration::connect::auth::{admit_source, Admission, AuthKey};
use crate::migration::transport::{
    Endpoint, FrameReader, FrameWriter, Listener, Socket, TransportError,
};
use crate::migration::wire::{HelloReply, Message, RefuseCode};
use crate::telemetry::notice::Notices;

/// How long a connection may take, from its accept, to send its first frame (with a key:
/// to prove the key and send it).
pub const AUTH_WAIT: Duration = Duration::from_secs(10);

/// Connections read at the same time. One more closes the oldest still being read, so a
/// burst of connections that say nothing does not keep a source out (it proves its key or
/// sends its first frame within a few round trips of connecting). A sustained flood that
/// opens 64 connections within a source's key exchange still can: that is a firewall's
/// job (rate limits per address).
const MAX_PENDING: usize = 64;

/// Where a connection's admission stands; the attempt and the evictor each claim it once.
const READING: u8 = 0;
/// Its opening is handed over (or about to be): not evicted.
const HANDED_OVER: u8 = 1;
/// Closed to make room for a newer connection.
const EVICTED: u8 = 2;
/// Its attempt ended, whatever the outcome: nothing left to evict.
const ENDED: u8 = 3;

/// A connection being read, as [`Admissions`] sees it.
struct Pending {
    peer: Endpoint,
    /// The same socket as the attempt's, to shut it down.
    socket: Socket,
    state: Arc<AtomicU8>,
}

/// How often [`Admissions::next`] looks for new connections while it waits.
const POLL: Duration = Duration::from_millis(5);

/// How a connection opened, with its reader and writer (timeouts set to the
/// destination's `--io-timeout`).
#[derive(Debug)]
pub struct Opening {
    /// The peer's address.
    pub peer: Endpoint,
    /// The connection's reader, past the opening (opening sealed records after the
    /// exchange).
    pub reader: FrameReader<Socket>,
    /// The connection's writer (sealing after the exchange).
    pub writer: FrameWriter<Socket>,
    /// The first frame after the exchange, or (without a key only) the refusal the
    /// destination owes the peer.
    pub admission: Admission,
}

/// Connections being admitted on a listener.
pub struct Admissions {
    listener: Listener,
    key: Option<AuthKey>,
    io_timeout: Duration,
    /// Told of each connection and of those dropped.
    notices: Notices,
    sender: mpsc::Sender<Opening>,
    openings: mpsc::Receiver<Opening>,
    /// The connections being read, oldest first (ended ones pruned as `next` polls).
    reading: VecDeque<Pending>,
}

impl std::fmt::Debug for Admissions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admissions")
            .field("listener", &self.listener)
            .field("reading", &self.reading.len())
            .finish()
    }
}

impl Admissions {
    /// Admits connections of `listener`, each required to prove `key` when there is one;
    /// tells `notices` of each connection and of those dropped.
    pub fn new(
        listener: Listener,
        key: Option<AuthKey>,
        io_timeout: Duration,
        notices: Notices,
    ) -> std::io::Result<Admissions> {
        listener.set_nonblocking(true)?;
        let (sender, openings) = mpsc::channel();
        Ok(Admissions {
            listener,
            key,
            io_timeout,
            notices,
            sender,
            openings,
            reading: VecDeque::new(),
        })
    }

    /// Where this admission tells of connections (channels refused later, too).
    pub fn notices(&self) -> &Notices {
        &self.notices
    }

    /// The next connection's opening, accepting (and starting to read) new connections
    /// meanwhile; `None` when none came within `wait`. Errors are the listener's.
    pub fn next(&mut self, wait: Duration) -> std::io::Result<Option<Opening>> {
        let deadline = Instant::now() + wait;
        loop {
            // Ended attempts' sockets are closed here, not kept open until the next accept.
            self.reading
                .retain(|p| p.state.load(Ordering::Acquire) != ENDED);
            if let Ok(opening) = self.openings.try_recv() {
                return Ok(Some(opening));
            }
            match self.listener.accept() {
                Ok((stream, peer)) => self.start(stream, peer),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    if let Ok(opening) = self.openings.recv_timeout(left.min(POLL)) {
                        return Ok(Some(opening));
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts reading the opening of `stream` on a thread of its own.
    fn start(&mut self, stream: Socket, peer: Endpoint) {
        self.notices.info(format!("connection from {peer}"));
        if self.reading.len() >= MAX_PENDING {
            self.evict_oldest();
        }
        let socket = match stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                self.notices.info(format!(
                    "dropped the connection from {peer}: socket: {e}; still listening"
                ));
                return;
            }
        };
        let state = Arc::new(AtomicU8::new(READING));
        let attempt = Attempt {
            key: self.key.clone(),
            io_timeout: self.io_timeout,
            notices: self.notices.clone(),
            sender: self.sender.clone(),
            state: state.clone(),
        };
        let attempt_peer = peer.clone();
        let spawned = std::thread::Builder::new()
            .name("vmstream-admit".into())
            .spawn(move || attempt.run(stream, attempt_peer));
        match spawned {
            Ok(_) => self.reading.push_back(Pending {
                peer,
                socket,
                state,
            }),
            Err(e) => {
                self.notices.info(format!(
                    "dropped the connection from {peer}: {e}; still listening"
                ));
            }
        }
    }

    /// Closes the oldest connection still being read (its attempt then ends on the closed
    /// socket). One whose opening is being handed over is left alone.
    fn evict_oldest(&mut self) {
        while let Some(oldest) = self.reading.pop_front() {
            let claimed = oldest
                .state
                .compare_exchange(READING, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if claimed {
                let _ = oldest.socket.shutdown(std::net::Shutdown::Both);
                self.notices.info(format!(
                    "closed the connection from {}: {MAX_PENDING} connections were being \
                     read, it was the oldest; still listening",
                    oldest.peer
                ));
                return;
            }
        }
    }
}

impl Drop for Admissions {
    fn drop(&mut self) {
        // Later openings find the queue gone and answer themselves (`Attempt::run`).
        while let Ok(mut late) = self.openings.try_recv() {
            refuse_busy(&mut late.writer);
        }
    }
}

/// One connection's admission, on its own thread.
struct Attempt {
    key: Option<AuthKey>,
    io_timeout: Duration,
    notices: Notices,
    sender: mpsc::Sender<Opening>,
    /// Claimed by this attempt before it hands its opening over, or by the evictor; set
    /// to `ENDED` when the attempt ends.
    state: Arc<AtomicU8>,
}

impl Attempt {
    fn run(self, stream: Socket, peer: Endpoint) {
        let opening = self.read(stream, &peer).filter(|_| {
            // An evicted connection's socket is shut: whatever it read is not handed over.
            self.state
                .compare_exchange(READING, HANDED_OVER, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        });
        if let Some(opening) = opening {
            if let Err(mpsc::SendError(mut late)) = self.sender.send(opening) {
                refuse_busy(&mut late.writer);
            }
        }
        self.state.store(ENDED, Ordering::Release);
    }

    /// Reads the opening; `None` (reported, and answered where it can be) when the
    /// connection failed, or did not prove the destination's key.
    fn read(&self, stream: Socket, peer: &Endpoint) -> Option<Opening> {
        let (mut reader, mut writer) = match open(stream, self.io_timeout.min(AUTH_WAIT)) {
            Ok(rw) => rw,
            Err(e) => {
                self.notices.info(format!(
                    "dropped the connection from {peer}: socket: {e}; still listening"
                ));
                return None;
            }
        };
        let admission = admit_source(self.key.as_ref(), &mut writer, &mut reader);
        if self.state.load(Ordering::Acquire) == EVICTED {
            // Closed under it, and reported then: whatever it read says nothing of the peer.
            return None;
        }
        // Without a key: a connection that ended or stalled before its first frame (a port
        // scanner, a health check, a peer that gave up) never opened, so it cannot be the
        // source: dropped, like one that fails to prove a key. What did arrive as a frame,
        // garbage included, is handed over.
        if let Admission::Frame(Err(e)) = &admission {
            if never_opened(e) {
                self.notices.info(format!(
                    "dropped the connection from {peer}: {e}, before its first frame; still \
                     listening"
                ));
                return None;
            }
        }
        if let (Some(_), Admission::Refuse(reason)) = (&self.key, &admission) {
            let _ = writer.write_message(&Message::HelloReply(HelloReply {
                refuse: RefuseCode::Auth,
                receiver_workers: 0,
                resumes: false,
                reason: reason.clone(),
            }));
            self.notices.info(format!(
                "refused the connection from {peer}: {reason}; still listening"
            ));
            return None;
        }
        let s = reader.get_ref();
        let timeouts = s
            .set_read_timeout(Some(self.io_timeout))
            .and_then(|()| s.set_write_timeout(Some(self.io_timeout)));
        if let Err(e) = timeouts {
            self.notices.info(format!(
                "dropped the connection from {peer}: socket: {e}; still listening"
            ));
            return None;
        }
        reader.set_timeout(Some(self.io_timeout));
        Some(Opening {
            peer: peer.clone(),
            reader,
            writer,
            admission,
        })
    }
}

/// Whether reading a connection's first frame failed because the connection ended or said
/// nothing (in time), rather than on what it sent.
fn never_opened(e: &TransportError) -> bool {
    matches!(
        e,
        TransportError::Closed
            | TransportError::Truncated { .. }
            | TransportError::Timeout(_)
            | TransportError::Io(_)
    )
}

/// Sets up an accepted connection (blocking, no delay, `timeout` both ways) and returns
/// its frame reader and writer.
fn open(
    stream: Socket,
    timeout: Duration,
) -> std::io::Result<(FrameReader<Socket>, FrameWriter<Socket>)> {
    // Accepted sockets do not inherit the listener's non-blocking mode on Linux; other
    // systems may differ.
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let writer = FrameWriter::new(stream.try_clone()?, None);
    Ok((FrameReader::new(stream, Some(timeout)), writer))
}

/// Answers a connection that opened after the destination took its migration.
fn refuse_busy(writer: &mut FrameWriter<Socket>) {
    let _ = writer.write_message(&Message::HelloReply(HelloReply {
        refuse: RefuseCode::Other,
        receiver_workers: 0,
        resumes: false,
        reason: "this destination has taken another migration and admits no more connections"
            .into(),
    }));
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener, TcpStream};

    use super::*;
    use crate::migration::connect::auth::{authenticate_destination, SourceAuth};
    use crate::migration::transport::Frame;
    use crate::migration::wire::ChannelHello;

    const HELLO: ChannelHello = ChannelHello {
        migration_id: [4; 16],
        index: 1,
        count: 2,
    };

    fn admissions(key: Option<&AuthKey>) -> (Admissions, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        (
            Admissions::new(
                Listener::Tcp(l),
                key.cloned(),
                Duration::from_secs(5),
                Notices::silent(),
            )
            .unwrap(),
            addr,
        )
    }

    /// A client's reader and writer.
    fn client(addr: SocketAddr) -> (TcpStream, FrameReader<Socket>, FrameWriter<Socket>) {
        let c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let r = FrameReader::new(Socket::tcp(c.try_clone().unwrap()), None);
        let w = FrameWriter::new(Socket::tcp(c.try_clone().unwrap()), None);
        (c, r, w)
    }

    /// The opening `next` hands over within a few seconds (panics if none).
    fn next_opening(a: &mut Admissions) -> Opening {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(o) = a.next(Duration::from_millis(50)).unwrap() {
                return o;
            }
            assert!(Instant::now() < deadline, "no opening");
        }
    }

    /// A source on its own thread: proves `key` to `addr`, then sends [`HELLO`] sealed;
    /// joined, its socket.
    fn keyed_source(addr: SocketAddr, key: AuthKey) -> std::thread::JoinHandle<TcpStream> {
        std::thread::spawn(move || {
            let (c, mut r, mut w) = client(addr);
            match authenticate_destination(&key, &mut |m| Ok(w.write_message(m)?), &mut r) {
                Ok(SourceAuth::Authenticated(sealer)) => w.seal_with(*sealer),
                other => panic!("{other:?}"),
            }
            w.write_message(&Message::ChannelHello(HELLO)).unwrap();
            c
        })
    }

    fn is_hello(a: &Admission) -> bool {
        matches!(a, Admission::Frame(Ok(Frame::Control(Message::ChannelHello(h)))) if h == &HELLO)
    }

    /// A keyed destination answers a connection that does not prove the key itself, with
    /// the authentication status, and never hands it over: nobody without the key can
    /// become the source or add a channel (and so pages) to a migration.
    #[test]
    fn a_connection_that_does_not_prove_the_key_is_refused_and_never_handed_over() {
        let key = AuthKey::from_secret(&[1; 32]).unwrap();
        let (mut a, addr) = admissions(Some(&key));
        let (_c, mut r, mut w) = client(addr);
        w.write_message(&Message::ChannelHello(HELLO)).unwrap();
        assert!(a.next(Duration::from_millis(300)).unwrap().is_none());
        match r.read_frame() {
            Ok(Frame::Control(Message::HelloReply(h))) => {
                assert_eq!(h.refuse, RefuseCode::Auth);
                assert!(h.reason.contains("requires authentication"), "{}", h.reason);
            }
            other => panic!("{other:?}"),
        }
        assert!(a.next(Duration::from_millis(100)).unwrap().is_none());
    }

    /// Connections that say nothing do not hold up one that proves the key behind them.
    #[test]
    fn silent_connections_do_not_hold_up_a_source_that_proves_the_key() {
        let key = AuthKey::from_secret(&[1; 32]).unwrap();
        let (mut a, addr) = admissions(Some(&key));
        let silent: Vec<_> = (0..3).map(|_| client(addr)).collect();
        // Let the destination accept them first.
        assert!(a.next(Duration::from_millis(200)).unwrap().is_none());
        // The source runs while the destination accepts (in `next`).
        let source = keyed_source(addr, key);
        let opening = next_opening(&mut a);
        let c = source.join().unwrap();
        assert_eq!(opening.peer, Endpoint::Tcp(c.local_addr().unwrap()));
        assert!(is_hello(&opening.admission), "{:?}", opening.admission);
        drop(silent);
    }

    /// More silent connections than are read at once do not keep a source out: the oldest
    /// is closed to make room (a flood used to have the source's connection closed).
    #[test]
    fn a_flood_of_silent_connections_makes_room_for_a_source() {
        let key = AuthKey::from_secret(&[1; 32]).unwrap();
        let (mut a, addr) = admissions(Some(&key));
        let mut silent: Vec<_> = (0..MAX_PENDING + 3).map(|_| client(addr)).collect();
        assert!(a.next(Duration::from_millis(300)).unwrap().is_none());
        assert_eq!(a.reading.len(), MAX_PENDING);
        let source = keyed_source(addr, key);
        let opening = next_opening(&mut a);
        let c = source.join().unwrap();
        assert_eq!(opening.peer, Endpoint::Tcp(c.local_addr().unwrap()));
        assert!(is_hello(&opening.admission), "{:?}", opening.admission);
        // The first four were closed (three for the flood, one for the source), the rest
        // are still being read.
        let mut byte = [0u8; 1];
        for (k, (c, ..)) in silent.iter_mut().enumerate() {
            c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let closed = loop {
                match std::io::Read::read(c, &mut byte) {
                    Ok(0) => break true,
                    Ok(_) => continue,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        break false
                    }
                    Err(_) => break true,
                }
            };
            assert_eq!(closed, k < 4, "connection {k}");
        }
    }

    /// Without a key, connections that close, stop inside their first frame or say nothing
    /// until the admission's read timeout are dropped (never handed over), and the source
    /// behind them is served.
    #[test]
    fn without_a_key_connections_that_never_open_are_dropped() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // The admission's read timeout is the io timeout here: 300 ms.
        let mut a = Admissions::new(
            Listener::Tcp(l),
            None,
            Duration::from_millis(300),
            Notices::silent(),
        )
        .unwrap();
        drop(client(addr)); // connect, close
        let (mut half, ..) = client(addr);
        std::io::Write::write_all(&mut half, &Message::ChannelHello(HELLO).to_frame()[..5])
            .unwrap();
        drop(half); // closed inside its first frame
        let _silent = client(addr);
        // Longer than the admission's read timeout: the silent one timed out too.
        assert!(a.next(Duration::from_millis(800)).unwrap().is_none());
        assert!(a.reading.is_empty());
        let (_c, _r, mut w) = client(addr);
        w.write_message(&Message::ChannelHello(HELLO)).unwrap();
        assert!(is_hello(&next_opening(&mut a).admission));
    }

    /// Without a key the first connection to open is handed over, whatever it sent; one
    /// that opens after the destination stopped admitting is told so.
    #[test]
    fn without_a_key_openings_are_handed_over_and_late_ones_refused_as_busy() {
        let (mut a, addr) = admissions(None);
        let (_silent, ..) = client(addr);
        let (_c1, _r1, mut w1) = client(addr);
        w1.write_message(&Message::ChannelHello(HELLO)).unwrap();
        assert!(is_hello(&next_opening(&mut a).admission));
        let (mut c2, ..) = client(addr);
        std::io::Write::write_all(&mut c2, b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(matches!(
            next_opening(&mut a).admission,
            Admission::Frame(Err(_))
        ));
        // Accepted, but it opens only once the destination took its migration.
        let (_c3, mut r3, mut w3) = client(addr);
        assert!(a.next(Duration::from_millis(200)).unwrap().is_none());
        drop(a);
        w3.write_message(&Message::ChannelHello(HELLO)).unwrap();
        match r3.read_frame() {
            Ok(Frame::Control(Message::HelloReply(h))) => {
                assert_eq!(h.refuse, RefuseCode::Other);
                assert!(
                    h.reason.contains("admits no more connections"),
                    "{}",
                    h.reason
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
