//! [`SendTimeout`]: a socket writer whose send timeout bounds how long the peer may take
//! nothing, however many retries a write needs.

use std::io::{self, Write};
use std::time::Duration;

use super::Socket;

/// A socket whose send timeout means "the peer took nothing for this long". A blocking
/// send under `SO_SNDTIMEO` returns short when the timeout fires, and a caller that
/// retries the rest (`write_all`, `BufWriter`) waited a second full timeout: a stalled
/// destination took twice `--io-timeout` to notice. Here each write sends what fits now
/// and otherwise waits, at most the timeout, for room.
#[derive(Debug)]
pub struct SendTimeout {
    inner: Socket,
    /// The socket's send timeout, read once (`None`: wait for ever).
    timeout: Option<Duration>,
}

impl SendTimeout {
    /// Wraps `inner`, whose send timeout is already set.
    pub fn new(inner: Socket) -> io::Result<SendTimeout> {
        Ok(SendTimeout {
            timeout: inner.write_timeout()?,
            inner,
        })
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
