//! vmstream-codec: turns batches of dirty guest pages into checksummed
//! packets on the sender and applies packets straight into destination
//! memory on the receiver, both in parallel, with round barriers.
//!
//! - [`format`](mod@format): the versioned wire format (see `FORMAT.md`).
//! - [`encoder::PageEncoder`] / [`decoder::PacketDecoder`]: single-threaded
//!   page classification + packetizing, and validation + application.
//! - [`sender::Sender`] / [`receiver::receive`]: the parallel pipelines.
//! - [`stats`]: serde-serializable counters.
#![deny(unsafe_code)]
#![warn(missing_docs)]

// Only the FFI compressors need `unsafe`; every other module forbids it
// (`#![forbid(unsafe_code)]` in its file).
#[allow(unsafe_code)]
pub mod compress;
pub mod decoder;
pub mod encoder;
pub mod error;
pub mod format;
pub mod memory;
mod queue;
pub mod receiver;
mod run_writer;
pub mod sender;
pub mod stats;

pub use compress::Compression;
pub use decoder::PacketDecoder;
pub use encoder::{Batch, DeltaConfig, DeltaMode, EncoderConfig, PageEncoder, PageSource};
pub use error::{CodecError, PacketError, PacketErrorKind};
pub use format::Encoding;
pub use receiver::{receive, PageObserver, Receiver, ReceiverConfig};
pub use sender::{Packet, Sender, SenderConfig};
pub use stats::PipelineStats;
/// The XBZRLE page cache's size unless set (64 MiB, QEMU's default too).
pub use vmstream_xbzrle::DEFAULT_CACHE_BYTES;

/// Page size of the format: every page record covers this many bytes.
pub const PAGE_SIZE: usize = 4096;
