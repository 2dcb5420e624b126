//! [`SendTimeout`]: a socket writer whose send timeout bounds how long the peer may take
//! nothing, however many retries a write needs, and that waits for room no later than a
//! [`SharedDeadline`] (the source's pause bound).

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An instant past which a writer waits for the peer no more, set by one thread (the
/// source's state machine) for a writer on another (a link's writer thread).
#[derive(Debug, Clone, Default)]
pub struct SharedDeadline(Arc<Mutex<Option<Instant>>>);

impl SharedDeadline {
    /// Sets the deadline (`None`: none).
    pub fn set(&self, deadline: Option<Instant>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = deadline;
    }

    /// The deadline.
    pub fn get(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

use super::Socket;

/// A socket whose send timeout means "the peer took nothing for this long". A blocking
/// send under `SO_SNDTIMEO` returns short when the timeout fires, and a caller that
/// retries the rest (`write_all`, `BufWriter`) waited a second full timeout: a stalled
/// destination took twice `--io-timeout` to notice. Here each write sends what fits now
/// and otherwise waits, at most the timeout, for room.
///
/// The timeout is for progress, not for a whole frame: a slow link, or `--max-bandwidth`,
/// may take longer than it over a large packet. A peer that reads a byte now and then makes
/// no progress here, though (its TCP stack opens no window for single bytes, see the tests).
/// Where the time as a whole matters, the guest being paused, the [`SharedDeadline`] bounds
/// every wait.
#[derive(Debug)]
pub struct SendTimeout {
    inner: Socket,
    /// The socket's send timeout, read once (`None`: wait for ever).
    timeout: Option<Duration>,
    /// No wait for room lasts past it.
    deadline: SharedDeadline,
}

impl SendTimeout {
    /// Wraps `inner`, whose send timeout is already set.
    pub fn new(inner: Socket) -> io::Result<SendTimeout> {
        SendTimeout::with_deadline(inner, SharedDeadline::default())
    }

    /// [`SendTimeout::new`], waiting no later than `deadline` whenever it is set.
    pub fn with_deadline(inner: Socket, deadline: SharedDeadline) -> io::Result<SendTimeout> {
        Ok(SendTimeout {
            timeout: inner.write_timeout()?,
            inner,
            deadline,
        })
    }

    /// How long the next wait for room may last: the send timeout, cut to the deadline;
    /// `None` when the deadline passed.
    fn wait(&self) -> Option<Option<Duration>> {
        match self.deadline.get() {
            None => Some(self.timeout),
            Some(d) => {
                let left = d.checked_duration_since(Instant::now())?;
                Some(Some(self.timeout.map_or(left, |t| t.min(left))))
            }
        }
    }

    /// The socket.
    pub fn socket(&self) -> &Socket {
        &self.inner
    }
}

impl Write for SendTimeout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use nix::errno::Errno;
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        loop {
            match self.inner.send_now(buf) {
                Ok(n) => return Ok(n),
                Err(Errno::EAGAIN) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let (wait, cut) = match self.wait() {
                Some(Some(t)) => (
                    PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
                    self.timeout.is_none_or(|to| t < to),
                ),
                Some(None) => (PollTimeout::NONE, false),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer took too long: the deadline passed",
                    ))
                }
            };
            let mut fds = [PollFd::new(self.inner.as_fd(), PollFlags::POLLOUT)];
            match poll(&mut fds, wait) {
                // A wait the deadline cut short: the loop fails once it passed (the poll's
                // milliseconds are rounded down).
                Ok(0) if cut => {}
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

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpStream;

    use super::*;

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
        let mut w =
            io::BufWriter::with_capacity(256 << 10, SendTimeout::new(Socket::tcp(stream)).unwrap());
        let err = w.write_all(&vec![7u8; 32 << 20]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    }

    /// A peer that reads one byte every 200 ms: its stack opens no window for such reads,
    /// so the writer sees no progress and the write fails after the send timeout, long
    /// before those reads would have taken the data (a whole frame is bounded).
    #[test]
    fn a_peer_reading_byte_by_byte_is_a_stall() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reading = Arc::clone(&stop);
        let reader = std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            while !reading.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if peer.read(&mut byte).unwrap_or(0) == 0 {
                    break;
                }
            }
        });
        let mut w =
            io::BufWriter::with_capacity(256 << 10, SendTimeout::new(Socket::tcp(stream)).unwrap());
        let t = Instant::now();
        let err = w.write_all(&vec![7u8; 32 << 20]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(w);
        reader.join().unwrap();
    }

    /// A deadline cuts the wait for room short of the send timeout, and a write past it
    /// fails at once instead of waiting.
    #[test]
    fn a_deadline_ends_the_wait_for_room() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_peer, _) = listener.accept().unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let deadline = SharedDeadline::default();
        let mut w = io::BufWriter::with_capacity(
            256 << 10,
            SendTimeout::with_deadline(Socket::tcp(stream), deadline.clone()).unwrap(),
        );
        let t = Instant::now();
        deadline.set(Some(t + Duration::from_millis(300)));
        let err = w.write_all(&vec![7u8; 32 << 20]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
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
        let mut w =
            io::BufWriter::with_capacity(256 << 10, SendTimeout::new(Socket::tcp(stream)).unwrap());
        w.write_all(&vec![7u8; total]).unwrap();
        w.flush().unwrap();
        assert_eq!(reader.join().unwrap(), total);
    }
}
