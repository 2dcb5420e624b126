//! Moving frames over a byte stream, one way per connection direction. On the sender, the
//! encoder hands packets and control messages to a [`Link`] (its [`PacketChannel`]), whose
//! writer thread frames them with a [`FrameWriter`] (optionally paced by a [`TokenBucket`])
//! onto the socket through [`SendTimeout`]; on the receiver a [`FrameReader`] turns the bytes
//! back into [`Frame`]s (bounded, typed errors). Replies go the other way over the same
//! connection with a plain [`FrameWriter`] and [`FrameReader`].
//!
//! After authentication both ends are switched to sealed records ([`crate::migration::connect::seal`]):
//! [`FrameReader::open_with`], [`FrameWriter::seal_with`], [`Link::seal_with`].
//!
//! Parallel channels (`--channels N`, [`crate::migration::connect::channels`]) run one [`Link`] per connection;
//! their writers share one [`SharedBucket`], so `--max-bandwidth` limits the total.
//!
//! Modules: `error` ([`TransportError`]), `reader`, `writer`, `send_timeout`, `rate` (the
//! token bucket), `link`, `socket` ([`Socket`] and [`Listener`]: TCP or a unix socket, which
//! also passes file descriptors).

mod error;
mod link;
mod rate;
mod reader;
mod send_timeout;
mod socket;
mod writer;

pub use error::TransportError;
pub use link::{Link, PacketChannel};
pub use rate::{SharedBucket, TokenBucket};
pub use reader::{Frame, FrameReader, TimedRead};
pub use send_timeout::{SendTimeout, SharedDeadline};
pub use socket::{unix_path, Endpoint, Listener, Socket, UNIX_PREFIX};
pub use writer::FrameWriter;

/// A control message for the reader, writer and link tests.
#[cfg(test)]
fn ack() -> crate::migration::wire::Message {
    use crate::migration::wire::{Message, RoundAck};
    Message::RoundAck(RoundAck {
        round: 3,
        records: 1,
        packets: 1,
        barrier_ns: 0,
    })
}
