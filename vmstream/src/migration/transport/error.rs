//! [`TransportError`]: why a frame could not be read or written, shared by the reader, the
//! writer and the link.

use std::io;
use std::time::Duration;

use crate::migration::connect::seal::SealError;
use crate::migration::wire::WireError;

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
    /// The next frame did not arrive, whole, within the read timeout: nothing of it, or
    /// only part (a frame's deadline covers its whole read, however its bytes trickle in).
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
