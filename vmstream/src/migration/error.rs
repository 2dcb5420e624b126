//! Typed errors of both sides.

use vmstream_codec::CodecError;

use crate::guest::file::source::GuestControlError;
use crate::migration::connect::auth::AuthError;
use crate::migration::connect::channels::ChannelError;
use crate::migration::image::ImageError;
use crate::migration::transport::TransportError;
use crate::migration::wire::{AbortCode, CommitStatus, GuestKind, RefuseCode, WireError};

/// Why `vmstream send` failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Bad options.
    #[error("{0}")]
    Config(String),
    /// Starting or controlling the source guest failed.
    #[error(transparent)]
    Guest(#[from] GuestControlError),
    /// Dirty tracking failed.
    #[error("dirty tracking: {0}")]
    Tracker(std::io::Error),
    /// `--verify strict`: the scrubber found writes the dirty tracker missed.
    #[error(transparent)]
    TrackingError(#[from] crate::migration::source::verify::TrackingError),
    /// Connecting failed.
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    /// Setting up the socket failed.
    #[error("socket: {0}")]
    Socket(std::io::Error),
    /// Reading or writing frames failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The encode pipeline failed.
    #[error("encoder: {0}")]
    Codec(#[from] CodecError),
    /// The destination refused the handshake.
    #[error("destination refused the migration ({code:?}): {reason}")]
    Refused {
        /// Why, as a code.
        code: RefuseCode,
        /// Why, in words.
        reason: String,
    },
    /// The destination aborted.
    #[error("destination aborted ({code:?}): {reason}")]
    PeerAborted {
        /// Its code.
        code: AbortCode,
        /// Its reason.
        reason: String,
    },
    /// The destination did not commit.
    #[error("destination did not commit ({status:?}, its digest {their_digest}): {reason}")]
    CommitRefused {
        /// Its verdict.
        status: CommitStatus,
        /// Its reason.
        reason: String,
        /// The digest it computed.
        their_digest: String,
    },
    /// The destination broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Post-copy failed after the destination resumed the guest.
    #[error(
        "post-copy failed after the destination resumed the guest: {0}. The guest cannot \
         continue there without the pages only this host holds; its memory file here keeps \
         the guest as it was at the pause (what ran on the destination since is lost)"
    )]
    PostcopyLost(String),
    /// A parallel channel failed or was refused.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// Authenticating the destination failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The destination's commit reply did not come within the pause bound
    /// ([`SendConfig::pause_bound`](crate::migration::config::SendConfig::pause_bound)) of
    /// the guest's pause, however slowly its bytes came: the guest resumed.
    #[error(
        "the destination did not commit within {0:?} of the guest's pause (--pause-timeout); \
         the source guest resumes"
    )]
    PauseTimeout(std::time::Duration),
    /// `SendConfig::cancel` was set (the source turns this into `Outcome::Cancelled`).
    #[error("cancelled on request")]
    Cancelled,
}

impl From<WireError> for SendError {
    fn from(e: WireError) -> Self {
        SendError::Transport(e.into())
    }
}

/// Why `vmstream recv` failed.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// Bad options.
    #[error("{0}")]
    Config(String),
    /// `RecvConfig::cancel` was set (SIGINT or SIGTERM on the command line).
    #[error("interrupted (SIGINT or SIGTERM)")]
    Interrupted,
    /// Listening or accepting failed.
    #[error("listening on {0}: {1}")]
    Listen(String, std::io::Error),
    /// Setting up the socket failed.
    #[error("socket: {0}")]
    Socket(std::io::Error),
    /// Reading or writing frames failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// We refused the source's handshake.
    #[error("refused the migration ({code:?}): {reason}")]
    Refused {
        /// Why, as a code.
        code: RefuseCode,
        /// Why, in words.
        reason: String,
    },
    /// The decode pipeline failed (bad packet, ...).
    #[error("decoder: {0}")]
    Codec(#[from] CodecError),
    /// The source aborted.
    #[error("source aborted ({code:?}): {reason}")]
    PeerAborted {
        /// Its code.
        code: AbortCode,
        /// Its reason.
        reason: String,
    },
    /// The source broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The received memory does not match the source's digest.
    #[error("digest mismatch: source {source_digest}, received {ours}")]
    DigestMismatch {
        /// The source's digest.
        source_digest: String,
        /// Ours.
        ours: String,
    },
    /// Preparing or committing the image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The committed guest could not be resumed or failed verification.
    #[error("resumed guest: {0}")]
    Resume(String),
    /// The image is committed, but the source did not confirm that its guest ended
    /// (`Handover`), so the copy here was not started.
    #[error(
        "the source did not confirm that its guest ended ({0}): the committed image was not \
         resumed here, so that the guest does not run twice; start it only once the source \
         guest is known to be gone"
    )]
    NoHandover(String),
    /// A parallel channel failed, broke the round barrier or did not connect.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The guest's state was refused before the commit (nothing committed).
    #[error("guest state refused: {0}")]
    GuestState(#[from] GuestStateError),
    /// The KVM guest on the destination failed (restore, verification, run).
    #[error("KVM guest on the destination: {0}")]
    Kvm(#[from] crate::guest::kvm::KvmError),
    /// The memory a handover passed is unusable (none came, not a file, another size,
    /// cannot be mapped); nothing committed.
    #[error("handed-over memory: {0}")]
    HandedMemory(String),
    /// Post-copy failed after the guest resumed here.
    #[error(
        "post-copy failed after the guest resumed here: {0}. The guest cannot continue: pages \
         it needs are only at the source (its memory file holds the guest as it was at the \
         pause); the image here is incomplete and the guest is kept blocked until this process \
         ends"
    )]
    PostcopyLost(String),
}

/// Why the destination refused a `GuestState` (before committing anything).
#[derive(Debug, thiserror::Error)]
pub enum GuestStateError {
    /// The state's guest kind differs from the handshake's.
    #[error("guest state of kind {state:?} after a {hello:?} handshake")]
    KindMismatch {
        /// Kind announced in `Hello`.
        hello: GuestKind,
        /// Kind in `GuestState`.
        state: GuestKind,
    },
    /// The KVM state blob is invalid (bad magic, version, length, checksum, sections).
    #[error("invalid KVM state blob: {0}")]
    Invalid(#[from] crate::guest::kvm::StateError),
    /// A valid blob that does not belong to the migrated memory.
    #[error("KVM state does not fit the migrated memory: {0}")]
    DoesNotFit(String),
    /// A guest process has no state besides its memory (`PROTOCOL.md`: its blob is empty),
    /// yet the source sent a blob.
    #[error("a file-backed guest's state is empty, the source sent {len} bytes")]
    UnexpectedBlob {
        /// Length of the blob sent.
        len: usize,
    },
}

impl From<WireError> for RecvError {
    fn from(e: WireError) -> Self {
        RecvError::Transport(e.into())
    }
}
