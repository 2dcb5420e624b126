//! [`Abort`]: either side gives up, with an [`AbortCode`] and a reason; the receiver rolls
//! back.

use super::fields::{at_least, push_reason, reason_of, Fields};
use super::{FrameType, WireError, MAX_REASON_LEN};

/// Why a side aborts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum AbortCode {
    /// The source cancelled (timeout with `--on-timeout cancel`, or a local error).
    Cancelled = 1,
    /// The source failed.
    SourceError = 2,
    /// The destination failed (bad packet, I/O, ...).
    DestinationError = 3,
    /// The peer broke the protocol.
    Protocol = 4,
}

/// `Abort`: the sender gives up; the receiver of this message rolls back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    /// Why.
    pub code: AbortCode,
    /// Human-readable reason.
    pub reason: String,
}

impl Abort {
    /// Body length without the reason.
    pub const FIXED_LEN: usize = 4;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.code as u16).to_le_bytes());
        push_reason(out, &self.reason);
    }

    pub(super) fn decode(body: &[u8]) -> Result<Abort, WireError> {
        const K: FrameType = FrameType::Abort;
        at_least(K, body, Self::FIXED_LEN, MAX_REASON_LEN)?;
        let mut f = Fields::new(body);
        let tag = f.u16();
        let code = match tag {
            1 => AbortCode::Cancelled,
            2 => AbortCode::SourceError,
            3 => AbortCode::DestinationError,
            4 => AbortCode::Protocol,
            t => {
                return Err(WireError::BadField {
                    kind: K.name(),
                    field: "code",
                    value: t as u64,
                })
            }
        };
        let reason = reason_of(K, &mut f)?;
        Ok(Abort { code, reason })
    }
}
