//! Peer authentication with a pre-shared key (`send`/`recv --auth-key-file`).
//!
//! Without a key the destination writes guest memory for whoever connects, and the source
//! sends its guest's memory to whatever answers at the address. With the same key on both
//! sides, every connection (each channel's too) starts with a mutual challenge-response
//! before its `Hello` or `ChannelHello`:
//!
//! ```text
//! source                                              destination
//!   AuthHello{nonce_s} ------------------------------>  (a destination with a key accepts
//!                                                      nothing else first)
//!        <-------------------------------------------- AuthChallenge{nonce_d, tag_d}
//!   check tag_d (or Abort and fail)
//!   AuthProof{tag_s} -------------------------------->  check tag_s (or refuse)
//!   Hello / ChannelHello, as without a key, and everything after it: sealed
//! ```
//!
//! `tag_x = BLAKE3-keyed(K, label_x || nonce_s || nonce_d)`, with a label per side so one
//! side's tag is never the other's, and `K = BLAKE3-derive_key(context, key file)`. Both
//! nonces are 32 fresh random bytes, so neither tag can be replayed on another connection.
//! A side that has a key and meets one that has none, or whose tag does not check, refuses
//! with `HelloReply{Auth}` (destination) or fails (source) and names the cause.
//!
//! After the exchange every frame of the connection is sealed (AES-256-GCM, `crate::migration::connect::seal`)
//! under two session keys derived from `K` and both nonces, one per direction, so the
//! guest's memory is neither readable nor changeable on the path.

use crate::migration::transport::Socket;
use std::io::{Read, Write};
use std::path::Path;

use crate::migration::connect::seal::{Opener, Sealer};
use crate::migration::transport::{Frame, FrameReader, FrameWriter, TransportError};
use crate::migration::wire::{
    Abort, AbortCode, AuthChallenge, AuthHello, AuthProof, Message, AUTH_BYTES,
};

/// Shortest key file accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 16;
/// Longest key file accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;

/// Context string of the key derivation (BLAKE3 `derive_key`).
const KEY_CONTEXT: &str = "vmstream 2026-11-22 migration peer authentication key";
/// Label of the source's tag.
const SOURCE_LABEL: &[u8] = b"vmstream auth: source proves the key";
/// Label of the destination's tag.
const DESTINATION_LABEL: &[u8] = b"vmstream auth: destination proves the key";
/// Label of the key that seals the frames from the source to the destination.
const TO_DESTINATION_LABEL: &[u8] = b"vmstream seal: source to destination";
/// Label of the key that seals the frames from the destination to the source.
const TO_SOURCE_LABEL: &[u8] = b"vmstream seal: destination to source";

/// The key both sides derive from the same key file.
#[derive(Clone)]
pub struct AuthKey([u8; 32]);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthKey(..)")
    }
}

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthKeyError {
    /// Reading it failed.
    #[error("reading the key file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Not a regular file (a FIFO would block the reader until someone writes it, a device
    /// would never end).
    #[error("the key file {path} is {kind}, not a regular file: put the key in a file")]
    NotRegular {
        /// The file.
        path: String,
        /// What it is, in words.
        kind: &'static str,
    },
    /// Too short or too long.
    #[error(
        "the key file {path} holds {len} bytes: use {MIN_KEY_BYTES} to {MAX_KEY_BYTES} \
         random bytes (e.g. head -c 32 /dev/urandom > FILE)"
    )]
    Length {
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
}

impl AuthKey {
    /// The key derived from `secret` (at least [`MIN_KEY_BYTES`] bytes).
    pub fn from_secret(secret: &[u8]) -> Option<AuthKey> {
        (MIN_KEY_BYTES..=MAX_KEY_BYTES)
            .contains(&secret.len())
            .then(|| AuthKey(blake3::derive_key(KEY_CONTEXT, secret)))
    }

    /// The key derived from the contents of the file at `path`, which must be a regular
    /// file (a link to one is followed: the operator named it). It is opened without
    /// blocking and checked before anything is read, so a FIFO or a device is refused at
    /// once rather than waited on.
    pub fn from_file(path: &Path) -> Result<AuthKey, AuthKeyError> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let shown = path.display().to_string();
        let read_err = |source| AuthKeyError::Read {
            path: shown.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(read_err)?;
        let kind = file.metadata().map_err(read_err)?.file_type();
        if !kind.is_file() {
            let kind = if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_dir() {
                "a directory"
            } else if kind.is_char_device() || kind.is_block_device() {
                "a device"
            } else if kind.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            };
            return Err(AuthKeyError::NotRegular { path: shown, kind });
        }
        let mut secret = Vec::new();
        file.take(MAX_KEY_BYTES as u64 + 1)
            .read_to_end(&mut secret)
            .map_err(read_err)?;
        AuthKey::from_secret(&secret).ok_or(AuthKeyError::Length {
            path: shown,
            len: secret.len(),
        })
    }

    /// The session keys of the connection with these nonces: (source to destination,
    /// destination to source).
    fn session_keys(&self, source_nonce: &[u8], destination_nonce: &[u8]) -> ([u8; 32], [u8; 32]) {
        (
            *self
                .tag(TO_DESTINATION_LABEL, source_nonce, destination_nonce)
                .as_bytes(),
            *self
                .tag(TO_SOURCE_LABEL, source_nonce, destination_nonce)
                .as_bytes(),
        )
    }

    /// The tag of one side over both nonces.
    fn tag(&self, label: &[u8], source_nonce: &[u8], destination_nonce: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(label);
        h.update(source_nonce);
        h.update(destination_nonce);
        h.finalize()
    }
}

/// Why the source could not authenticate a connection.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The destination answered the challenge with a tag made with another key.
    #[error(
        "authentication failed: the destination does not hold this key (the key files differ, \
         or this is not the destination you meant)"
    )]
    DestinationKeyDiffers,
    /// The destination answered the key exchange with an unsealed `HelloReply` that
    /// accepts the migration: it never proved the key, so nothing it says can be trusted.
    #[error(
        "authentication failed: the destination sent an unsealed reply on an authenticated \
         connection, accepting without proving the key (it has no --auth-key-file, or is not \
         the destination you meant)"
    )]
    UnsealedAccept,
    /// The destination answered with something else than its challenge.
    #[error("authentication: expected the destination's challenge, got {0}")]
    Unexpected(String),
    /// No random nonce could be drawn.
    #[error("authentication: reading /dev/urandom: {0}")]
    Random(std::io::Error),
    /// Reading or writing the exchange failed.
    #[error("authentication: {0}")]
    Transport(#[from] TransportError),
}

/// What the source got back for its `AuthHello`.
#[derive(Debug)]
pub enum SourceAuth {
    /// Both sides proved the key: seal what follows with these (the reader already opens
    /// with its half), then go on with the hello.
    Authenticated(Box<Sealer>),
    /// The destination answered with this frame instead of a challenge (a refusal: it has
    /// no key).
    Answered(Frame),
}

/// `N` bytes from the kernel's random source.
pub fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b))?;
    Ok(b)
}

fn nonce() -> Result<[u8; AUTH_BYTES], AuthError> {
    random_bytes().map_err(AuthError::Random)
}

/// Source side, on a fresh connection before its hello: proves the key and checks the
/// destination's proof, writing through `send` and reading from `reader`, which then opens
/// the destination's sealed frames; the caller seals its own from then on with the
/// returned [`Sealer`]. A refusal (`HelloReply`) comes back as [`SourceAuth::Answered`] for
/// the caller to report like any refused hello.
pub fn authenticate_destination(
    key: &AuthKey,
    send: &mut dyn FnMut(&Message) -> Result<(), TransportError>,
    reader: &mut FrameReader<Socket>,
) -> Result<SourceAuth, AuthError> {
    let ours = nonce()?;
    send(&Message::AuthHello(AuthHello { nonce: ours }))?;
    let challenge = match reader.read_frame()? {
        Frame::Control(Message::AuthChallenge(c)) => c,
        Frame::Control(m @ Message::HelloReply(_)) => {
            return Ok(SourceAuth::Answered(Frame::Control(m)))
        }
        Frame::Control(m) => {
            return Err(AuthError::Unexpected(format!(
                "a {} message",
                m.frame_type().name()
            )))
        }
        Frame::Packet(_) => return Err(AuthError::Unexpected("a packet".into())),
    };
    // `blake3::Hash` compares in constant time.
    if key.tag(DESTINATION_LABEL, &ours, &challenge.nonce) != blake3::Hash::from(challenge.tag) {
        let _ = send(&Message::Abort(Abort {
            code: AbortCode::SourceError,
            reason: "authentication failed: the destination's proof does not match this \
                     source's key"
                .into(),
        }));
        return Err(AuthError::DestinationKeyDiffers);
    }
    let tag = *key.tag(SOURCE_LABEL, &ours, &challenge.nonce).as_bytes();
    send(&Message::AuthProof(AuthProof { tag }))?;
    let (to_destination, to_source) = key.session_keys(&ours, &challenge.nonce);
    reader.open_with(Opener::new(&to_source));
    Ok(SourceAuth::Authenticated(Box::new(Sealer::new(
        &to_destination,
    ))))
}

/// What the destination makes of a connection's opening.
#[derive(Debug)]
pub enum Admission {
    /// The connection's first frame after the exchange (or without one, when neither side
    /// has a key), or the error reading it. With a key, this means the source proved it.
    Frame(Result<Frame, TransportError>),
    /// Refuse the connection (`HelloReply{Auth}`) for this reason. With a key, every
    /// connection that did not prove it ends here, read errors included.
    Refuse(String),
}

/// Destination side: reads a connection's opening, running the exchange when the source
/// starts one or `key` requires it, and returns the frame that follows it (the hello).
/// After the exchange `writer` seals and `reader` opens (`crate::migration::connect::seal`).
pub fn admit_source<W: Write>(
    key: Option<&AuthKey>,
    writer: &mut FrameWriter<W>,
    reader: &mut FrameReader<Socket>,
) -> Admission {
    let first = reader.read_frame();
    let (key, hello) = match (key, first) {
        (None, Ok(Frame::Control(Message::AuthHello(_)))) => {
            return Admission::Refuse(
                "the source authenticates (--auth-key-file) but this destination has no key".into(),
            )
        }
        (None, other) => return Admission::Frame(other),
        (Some(_), Err(e)) => return Admission::Refuse(format!("before authenticating: {e}")),
        (Some(k), Ok(Frame::Control(Message::AuthHello(h)))) => (k, h),
        (Some(_), Ok(Frame::Control(Message::Hello(_) | Message::ChannelHello(_)))) => {
            return Admission::Refuse(
                "this destination requires authentication: run send with --auth-key-file \
                 and the destination's key"
                    .into(),
            )
        }
        (Some(_), Ok(other)) => {
            return Admission::Refuse(format!(
                "this destination requires authentication, got a {} first",
                match other {
                    Frame::Control(m) => m.frame_type().name(),
                    Frame::Packet(_) => "packet",
                }
            ))
        }
    };
    let ours = match nonce() {
        Ok(n) => n,
        Err(e) => return Admission::Refuse(e.to_string()),
    };
    let tag = *key.tag(DESTINATION_LABEL, &hello.nonce, &ours).as_bytes();
    if let Err(e) =
        writer.write_message(&Message::AuthChallenge(AuthChallenge { nonce: ours, tag }))
    {
        return Admission::Refuse(format!("before authenticating: {e}"));
    }
    match reader.read_frame() {
        Ok(Frame::Control(Message::AuthProof(p))) => {
            if key.tag(SOURCE_LABEL, &hello.nonce, &ours) != blake3::Hash::from(p.tag) {
                return Admission::Refuse(
                    "authentication failed: the source does not hold this destination's key".into(),
                );
            }
            let (to_destination, to_source) = key.session_keys(&hello.nonce, &ours);
            writer.seal_with(Sealer::new(&to_source));
            reader.open_with(Opener::new(&to_destination));
        }
        Ok(Frame::Control(Message::Abort(a))) => {
            return Admission::Refuse(format!("the source gave up: {}", a.reason))
        }
        Ok(other) => {
            return Admission::Refuse(format!(
                "authentication: expected the source's proof, got a {}",
                match other {
                    Frame::Control(m) => m.frame_type().name(),
                    Frame::Packet(_) => "packet",
                }
            ))
        }
        Err(e) => return Admission::Refuse(format!("before authenticating: {e}")),
    }
    Admission::Frame(reader.read_frame())
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use crate::migration::wire::{HelloReply, RefuseCode};

    fn key(b: u8) -> AuthKey {
        AuthKey::from_secret(&[b; 32]).unwrap()
    }

    fn pair() -> (Socket, Socket) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (Socket::tcp(c), Socket::tcp(s))
    }

    fn ends(s: &Socket) -> (FrameWriter<Socket>, FrameReader<Socket>) {
        (
            FrameWriter::new(s.try_clone().unwrap(), None),
            FrameReader::new(
                s.try_clone().unwrap(),
                Some(std::time::Duration::from_secs(10)),
            ),
        )
    }

    /// Runs both sides on a real connection: the source authenticates (when it has a key)
    /// and then sends a channel hello; the destination admits it and, if it refuses,
    /// answers with `HelloReply{Auth}` as the receiver does.
    fn exchange(
        source_key: Option<AuthKey>,
        dest_key: Option<AuthKey>,
    ) -> (Result<Option<SourceAuth>, AuthError>, Admission) {
        let (c, s) = pair();
        let dest = std::thread::spawn(move || {
            let (mut w, mut r) = ends(&s);
            let a = admit_source(dest_key.as_ref(), &mut w, &mut r);
            if let Admission::Refuse(reason) = &a {
                let _ = w.write_message(&Message::HelloReply(HelloReply {
                    refuse: RefuseCode::Auth,
                    receiver_workers: 0,
                    resumes: false,
                    reason: reason.clone(),
                }));
            }
            a
        });
        let (mut w, mut r) = ends(&c);
        let src = source_key
            .map(|k| authenticate_destination(&k, &mut |m| Ok(w.write_message(m)?), &mut r))
            .transpose();
        // Authenticated or without keys, the source goes on with its hello (sealed after an
        // exchange, as the sealer it was handed says).
        let src = src.map(|auth| match auth {
            Some(SourceAuth::Authenticated(sealer)) => {
                w.seal_with(*sealer);
                Some(SourceAuth::Authenticated(Box::new(Sealer::new(&[0; 32]))))
            }
            other => other,
        });
        if matches!(src, Ok(None | Some(SourceAuth::Authenticated(_)))) {
            let hello = crate::migration::wire::ChannelHello {
                migration_id: [9; 16],
                index: 1,
                count: 2,
            };
            let _ = w.write_message(&Message::ChannelHello(hello));
        }
        let out = dest.join().unwrap();
        (src, out)
    }

    fn admitted_channel_hello(a: &Admission) -> bool {
        matches!(a, Admission::Frame(Ok(Frame::Control(Message::ChannelHello(h)))) if h.migration_id == [9; 16])
    }

    #[test]
    fn same_key_authenticates_both_sides_and_the_hello_follows() {
        let (src, dest) = exchange(Some(key(1)), Some(key(1)));
        assert!(
            matches!(src, Ok(Some(SourceAuth::Authenticated(_)))),
            "{src:?}"
        );
        assert!(admitted_channel_hello(&dest), "{dest:?}");
    }

    #[test]
    fn different_keys_fail_on_both_sides() {
        let (src, dest) = exchange(Some(key(1)), Some(key(2)));
        assert!(
            matches!(src, Err(AuthError::DestinationKeyDiffers)),
            "{src:?}"
        );
        // The source gave up before proving anything, with its reason.
        match dest {
            Admission::Refuse(r) => {
                assert!(r.contains("destination's proof does not match"), "{r}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_source_with_the_wrong_proof_is_refused() {
        // A source that skips the check of the destination's tag still cannot pass.
        let (c, s) = pair();
        let dest = std::thread::spawn(move || {
            let (mut w, mut r) = ends(&s);
            admit_source(Some(&key(1)), &mut w, &mut r)
        });
        let (mut w, mut r) = ends(&c);
        w.write_message(&Message::AuthHello(AuthHello { nonce: [5; 32] }))
            .unwrap();
        let Frame::Control(Message::AuthChallenge(ch)) = r.read_frame().unwrap() else {
            panic!("no challenge")
        };
        let tag = *key(2).tag(SOURCE_LABEL, &[5; 32], &ch.nonce).as_bytes();
        w.write_message(&Message::AuthProof(AuthProof { tag }))
            .unwrap();
        match dest.join().unwrap() {
            Admission::Refuse(r) => {
                assert!(r.contains("does not hold this destination's key"), "{r}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_key_on_one_side_only_is_refused_by_the_destination() {
        // The destination has a key, the source none: its hello is refused.
        let (src, dest) = exchange(None, Some(key(1)));
        assert!(matches!(src, Ok(None)));
        match dest {
            Admission::Refuse(r) => assert!(r.contains("requires authentication"), "{r}"),
            other => panic!("{other:?}"),
        }
        // The source has a key, the destination none: the refusal comes back to the source
        // as the destination's answer.
        let (src, dest) = exchange(Some(key(1)), None);
        match src {
            Ok(Some(SourceAuth::Answered(Frame::Control(Message::HelloReply(h))))) => {
                assert_eq!(h.refuse, RefuseCode::Auth);
                assert!(h.reason.contains("has no key"), "{}", h.reason);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(dest, Admission::Refuse(_)));
    }

    #[test]
    fn without_keys_the_hello_is_the_first_frame() {
        let (src, dest) = exchange(None, None);
        assert!(matches!(src, Ok(None)));
        assert!(admitted_channel_hello(&dest), "{dest:?}");
    }

    #[test]
    fn tags_depend_on_key_side_and_both_nonces() {
        let k = key(1);
        let t = k.tag(SOURCE_LABEL, &[1; 32], &[2; 32]);
        assert_ne!(t, k.tag(DESTINATION_LABEL, &[1; 32], &[2; 32]));
        assert_ne!(t, k.tag(SOURCE_LABEL, &[3; 32], &[2; 32]));
        assert_ne!(t, k.tag(SOURCE_LABEL, &[1; 32], &[3; 32]));
        assert_ne!(t, key(2).tag(SOURCE_LABEL, &[1; 32], &[2; 32]));
        assert_eq!(t, key(1).tag(SOURCE_LABEL, &[1; 32], &[2; 32]));
    }

    #[test]
    fn key_files_need_16_to_4096_bytes() {
        let dir = std::env::temp_dir().join(format!("vmstream-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("key");
        for (len, ok) in [
            (0, false),
            (15, false),
            (16, true),
            (4096, true),
            (4097, false),
        ] {
            std::fs::write(&f, vec![0xa5; len]).unwrap();
            let r = AuthKey::from_file(&f);
            assert_eq!(r.is_ok(), ok, "{len}: {r:?}");
            if let Err(e) = r {
                assert!(matches!(e, AuthKeyError::Length { len: l, .. } if l == len));
            }
        }
        assert!(matches!(
            AuthKey::from_file(&dir.join("absent")),
            Err(AuthKeyError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A FIFO (which no one writes), a directory or a device as the key file is refused at
    /// once, without reading; a link to a regular key file is followed. The FIFO is read
    /// in a thread, so that a reader that blocks fails the test instead of hanging it.
    #[test]
    fn key_files_must_be_regular_files() {
        let dir = std::env::temp_dir().join(format!("vmstream-auth-kind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let f = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(AuthKey::from_file(&f));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading a FIFO key file still blocks after 10 s");
        match r {
            Err(e @ AuthKeyError::NotRegular { kind: "a FIFO", .. }) => {
                assert!(
                    e.to_string().contains("is a FIFO, not a regular file"),
                    "{e}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            AuthKey::from_file(&dir),
            Err(AuthKeyError::NotRegular {
                kind: "a directory",
                ..
            })
        ));
        assert!(matches!(
            AuthKey::from_file(Path::new("/dev/zero")),
            Err(AuthKeyError::NotRegular {
                kind: "a device",
                ..
            })
        ));
        std::fs::write(dir.join("key"), [7u8; 32]).unwrap();
        std::os::unix::fs::symlink(dir.join("key"), dir.join("link")).unwrap();
        assert_eq!(
            AuthKey::from_file(&dir.join("link")).unwrap().0,
            AuthKey::from_secret(&[7u8; 32]).unwrap().0
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
