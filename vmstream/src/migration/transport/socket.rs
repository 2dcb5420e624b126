//! The connections a migration runs over: TCP, or a unix socket for a migration that stays
//! on one host (`unix:PATH`). [`Socket`] and [`Listener`] are the one place that tells the
//! two apart; a unix socket also carries file descriptors (`SCM_RIGHTS`, for the memory
//! handover).

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// How a unix socket address is spelled on the command line: `unix:PATH`.
pub const UNIX_PREFIX: &str = "unix:";

/// The unix socket path of an address spelled `unix:PATH`, `None` for any other address.
pub fn unix_path(address: &str) -> Option<&Path> {
    address.strip_prefix(UNIX_PREFIX).map(Path::new)
}

/// Where a connection ends: a TCP address, or a unix socket's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket (its path; the peer of an accepted unix connection has none, and is
    /// named by the listening path).
    Unix(PathBuf),
}

impl Endpoint {
    /// Whether this is a unix socket.
    pub fn is_unix(&self) -> bool {
        matches!(self, Endpoint::Unix(_))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "{UNIX_PREFIX}{}", p.display()),
        }
    }
}

/// File descriptors a unix socket received, and the one its next send carries.
#[derive(Debug, Default)]
struct FdMailbox {
    received: Vec<OwnedFd>,
    outgoing: Option<OwnedFd>,
}

#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// One connection, TCP or unix. Its clones ([`Socket::try_clone`]) share the file
/// descriptors passed over it.
#[derive(Debug)]
pub struct Socket {
    stream: Stream,
    fds: Arc<Mutex<FdMailbox>>,
}

impl Socket {
    /// A TCP connection.
    pub fn tcp(stream: TcpStream) -> Socket {
        Socket::new(Stream::Tcp(stream))
    }

    /// A unix socket connection.
    pub fn unix(stream: UnixStream) -> Socket {
        Socket::new(Stream::Unix(stream))
    }

    fn new(stream: Stream) -> Socket {
        Socket {
            stream,
            fds: Arc::default(),
        }
    }

    /// Connects to the unix socket at `path`.
    pub fn connect_unix(path: &Path) -> io::Result<Socket> {
        UnixStream::connect(path).map(Socket::unix)
    }

    /// Whether this is a unix socket connection.
    pub fn is_unix(&self) -> bool {
        matches!(self.stream, Stream::Unix(_))
    }

    /// Another handle to the same connection (sharing its passed descriptors).
    pub fn try_clone(&self) -> io::Result<Socket> {
        let stream = match &self.stream {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        };
        Ok(Socket {
            stream,
            fds: Arc::clone(&self.fds),
        })
    }

    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    /// The socket's receive timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// The socket's send timeout.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// The socket's send timeout, as set.
    pub fn write_timeout(&self) -> io::Result<Option<Duration>> {
        match &self.stream {
            Stream::Tcp(s) => s.write_timeout(),
            Stream::Unix(s) => s.write_timeout(),
        }
    }

    /// Sends small writes at once (TCP; a unix socket has no delay to turn off).
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.set_nodelay(on),
            Stream::Unix(_) => Ok(()),
        }
    }

    /// Reads without taking the bytes (descriptors are not looked at).
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.stream {
            Stream::Tcp(s) => s.peek(buf),
            Stream::Unix(s) => {
                nix::sys::socket::recv(s.as_raw_fd(), buf, MsgFlags::MSG_PEEK).map_err(Into::into)
            }
        }
    }

    /// Blocking or not.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// Makes the next send on this connection (or a clone) carry `fd` (`SCM_RIGHTS`).
    /// Only a unix socket can.
    pub fn attach_fd(&self, fd: OwnedFd) -> io::Result<()> {
        if !self.is_unix() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "file descriptors travel over unix sockets only",
            ));
        }
        self.mailbox().outgoing = Some(fd);
        Ok(())
    }

    /// The oldest file descriptor received and not taken yet.
    pub fn take_received_fd(&self) -> Option<OwnedFd> {
        let mut m = self.mailbox();
        (!m.received.is_empty()).then(|| m.received.remove(0))
    }

    fn mailbox(&self) -> std::sync::MutexGuard<'_, FdMailbox> {
        self.fds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends what fits of `buf` now, without waiting (`EAGAIN` when nothing fits), never
    /// raising SIGPIPE; with the descriptor of [`Self::attach_fd`] if one waits.
    pub fn send_now(&self, buf: &[u8]) -> nix::Result<usize> {
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        let fd = self.as_raw_fd();
        let mut m = self.mailbox();
        let Some(out) = m.outgoing.as_ref() else {
            drop(m);
            return nix::sys::socket::send(fd, buf, flags);
        };
        let fds = [out.as_raw_fd()];
        let sent = sendmsg::<()>(
            fd,
            &[IoSlice::new(buf)],
            &[ControlMessage::ScmRights(&fds)],
            flags,
            None,
        )?;
        // Sent with the first byte: the receiver owns its copy now.
        m.outgoing = None;
        Ok(sent)
    }

    /// A unix socket's read: the data, and any descriptors with it into the mailbox.
    fn recv_unix(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        let (n, fds) = crate::memory::recv_with_fds(fd, buf)?;
        self.mailbox().received.extend(fds);
        Ok(n)
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Stream::Tcp(s) = &mut self.stream {
            return s.read(buf);
        }
        self.recv_unix(self.as_fd(), buf)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.stream {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// A listening socket, TCP or unix. A unix listener removes its socket file when dropped
/// (if the file is still its own).
#[derive(Debug)]
pub enum Listener {
    /// Listening on TCP.
    Tcp(TcpListener),
    /// Listening on a unix socket file.
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Its file.
        path: PathBuf,
        /// The file's device and inode, to remove only our own file.
        id: (u64, u64),
    },
}

/// Why a unix socket path cannot be bound.
fn path_error(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("{}: {what}", path.display()),
    )
}

impl Listener {
    /// Binds `endpoint`. A unix socket file left at the path by a receiver that no longer
    /// listens (connecting to it is refused) is removed first; anything else there (a live
    /// socket, a file, a symbolic link, which is not followed) is refused.
    pub fn bind(endpoint: &Endpoint) -> io::Result<Listener> {
        match endpoint {
            Endpoint::Tcp(a) => TcpListener::bind(a).map(Listener::Tcp),
            Endpoint::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = UnixListener::bind(path)?;
                let meta = std::fs::symlink_metadata(path)?;
                use std::os::unix::fs::MetadataExt;
                Ok(Listener::Unix {
                    listener,
                    path: path.clone(),
                    id: (meta.dev(), meta.ino()),
                })
            }
        }
    }

    /// Where it listens (a TCP port 0 resolved).
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(Endpoint::Tcp),
            Listener::Unix { path, .. } => Ok(Endpoint::Unix(path.clone())),
        }
    }

    /// Blocking or not.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(on),
            Listener::Unix { listener, .. } => listener.set_nonblocking(on),
        }
    }

    /// The next connection and its peer (a unix peer is named by the listening path).
    pub fn accept(&self) -> io::Result<(Socket, Endpoint)> {
        match self {
            Listener::Tcp(l) => l
                .accept()
                .map(|(s, peer)| (Socket::tcp(s), Endpoint::Tcp(peer))),
            Listener::Unix { listener, path, .. } => listener
                .accept()
                .map(|(s, _)| (Socket::unix(s), Endpoint::Unix(path.clone()))),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, id, .. } = self {
            use std::os::unix::fs::MetadataExt;
            let ours = std::fs::symlink_metadata(&*path)
                .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == *id);
            if ours {
                let _ = std::fs::remove_file(&*path);
            }
        }
    }
}

/// Removes a unix socket file nobody listens on at `path`; refuses anything else there.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(path_error(path, "exists and is not a unix socket"));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(path_error(path, "another process listens on this socket")),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmstream-socket-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn addresses_spell_unix_sockets_with_their_prefix() {
        assert_eq!(
            unix_path("unix:/tmp/a.sock"),
            Some(Path::new("/tmp/a.sock"))
        );
        assert_eq!(unix_path("127.0.0.1:7000"), None);
        assert_eq!(
            Endpoint::Unix("/tmp/a.sock".into()).to_string(),
            "unix:/tmp/a.sock"
        );
    }

    /// A stale socket file is replaced, a live one, a regular file and a symbolic link to
    /// a stale socket are refused and left alone; the listener removes its file when dropped.
    #[test]
    fn binding_replaces_only_a_stale_socket_and_removes_its_own_file() {
        let d = dir("bind");
        let path = d.join("s.sock");
        drop(UnixListener::bind(&path).unwrap()); // std leaves the file: stale
        let live = Listener::bind(&Endpoint::Unix(path.clone())).unwrap();
        let e = Listener::bind(&Endpoint::Unix(path.clone())).unwrap_err();
        assert!(e.to_string().contains("another process listens"), "{e}");
        drop(live);
        assert!(!path.exists());
        std::fs::write(&path, b"data").unwrap();
        let e = Listener::bind(&Endpoint::Unix(path.clone())).unwrap_err();
        assert!(e.to_string().contains("not a unix socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        let stale = d.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let link = d.join("link.sock");
        symlink(&stale, &link).unwrap();
        assert!(Listener::bind(&Endpoint::Unix(link.clone())).is_err());
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(stale.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A descriptor attached to a send arrives with those bytes, and refers to the same file.
    #[test]
    fn a_descriptor_travels_with_the_next_send() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, mut b) = (Socket::unix(a), Socket::unix(b));
        let d = dir("fd");
        let f = std::fs::File::create(d.join("f")).unwrap();
        f.set_len(12345).unwrap();
        a.attach_fd(OwnedFd::from(f)).unwrap();
        assert_eq!(a.send_now(b"hello").unwrap(), 5);
        a.send_now(b"world").unwrap();
        let mut got = [0u8; 10];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"helloworld");
        let fd = b
            .try_clone()
            .unwrap()
            .take_received_fd()
            .expect("no descriptor");
        assert_eq!(std::fs::File::from(fd).metadata().unwrap().len(), 12345);
        assert!(b.take_received_fd().is_none());
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let t = Socket::tcp(TcpStream::connect(tcp.local_addr().unwrap()).unwrap());
        let f = std::fs::File::open(d.join("f")).unwrap();
        assert!(t.attach_fd(OwnedFd::from(f)).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
