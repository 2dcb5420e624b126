//! Typed errors of both sides.

use vmstream_codec::CodecError;

use super::channels::ChannelError;
use super::image::ImageError;
use super::source_guest::GuestControlError;
use super::transport::TransportError;
use super::wire::{AbortCode, CommitStatus, RefuseCode, WireError};

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
    /// A parallel channel failed or was refused.
    #[error(transparent)]
    Channel(#[from] ChannelError),
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
    /// A parallel channel failed, broke the round barrier or did not connect.
    #[error(transparent)]
    Channel(#[from] ChannelError),
}

impl From<WireError> for RecvError {
    fn from(e: WireError) -> Self {
        RecvError::Transport(e.into())
    }
}
