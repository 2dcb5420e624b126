//! Parallel channels (`vmstream send --channels N`): one migration over N TCP connections,
//! like QEMU's multifd. Each channel has its own encode pipeline (and so its own XBZRLE
//! page cache) and its own packet stream; pages are sharded over the channels by page
//! number ([`ChannelMap`]), so a page always travels on the same channel and its cache
//! entry stays in one place. Control messages stay on channel 0.
//!
//! ```text
//! source                                               destination
//!   connect channel 0, then channels 1..N-1 (the destination accepts them in that order)
//!   ch0: Hello { features |= CHANNELS } -------------->
//!   ch0: ChannelHello { id, index 0, count N } ------->  count in 2..=16
//!                   <-------------------------------- ch0: HelloReply (accepted | refused)
//!   chi: ChannelHello { id, index i, count N } ------->  accepted until every index is bound;
//!                   <-------------------------------- chi: HelloReply (accepted | refused:
//!                                                        wrong id, duplicate, no migration)
//!   round r, on every channel: Packet* (its pages), RoundEnd { r, its records, packets }
//!                                                        barrier: when the RoundEnd { r } of
//!                                                        every channel is in, end_round(r)
//!                   <-------------------------------- ch0: RoundAck { r, sum of all channels }
//!   GuestState, Digest, Abort ----------------------->  channel 0 only
//!                   <-------------------------------- ch0: CommitReply, Resumed, Abort
//! ```
//!
//! The migration id is 16 random bytes the source draws per migration. Until every channel
//! is bound the destination keeps listening and refuses strays (another id, an index
//! already bound, a count that differs) with a `HelloReply` of status `Channel` and a
//! reason, and carries on waiting for the right connections; a channel hello on the first
//! connection (no migration in progress) ends the receive. The source waits for every
//! channel's reply before round 0.
//!
//! The round barrier spans all channels: the source sends a round's `RoundEnd` on every
//! channel after that channel's packets and waits for the one `RoundAck`; the destination
//! reads every channel in its own thread into one decode pipeline, refuses a packet that
//! arrives on a channel after that channel's `RoundEnd` (it would belong to the next round),
//! and closes the round in the codec (every packet applied) only when all `RoundEnd`s of
//! the round are in. So no page of round r+1 is applied before all of round r.
//!
//! `--max-bandwidth` is one token bucket shared by the channels' writers (a total).

use std::io::Read;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{sync_channel, Receiver as FrameQueue, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmstream_codec::memory::CHUNK_PAGES;
use vmstream_codec::{PipelineStats, Sender, SenderConfig};

use super::config::SendConfig;
use super::error::{RecvError, SendError};
use super::transport::{
    Frame, FrameReader, FrameWriter, Link, PacketChannel, TokenBucket, TransportError, CORRUPT_ENV,
};
use super::wire::{
    ChannelHello, Hello, HelloReply, Message, RefuseCode, RoundEnd, FEATURE_CHANNELS, MAX_CHANNELS,
};

/// Why a channel could not be set up, or broke the round barrier.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The destination refused one of our channels.
    #[error("destination refused channel {channel}: {reason}")]
    Refused {
        /// The channel.
        channel: usize,
        /// Its reason.
        reason: String,
    },
    /// Not every channel connected within the timeout.
    #[error("only {bound} of {count} channels connected within {timeout:?}")]
    BindTimeout {
        /// Channels bound (channel 0 included).
        bound: usize,
        /// Channels of the migration.
        count: usize,
        /// How long we waited.
        timeout: Duration,
    },
    /// Accepting channel connections failed.
    #[error("accepting channel connections: {0}")]
    Accept(std::io::Error),
    /// A channel's connection failed.
    #[error("channel {channel}: {source}")]
    Transport {
        /// The channel.
        channel: usize,
        /// What happened.
        #[source]
        source: TransportError,
    },
    /// A packet came on a channel that had already ended the open round.
    #[error("channel {channel} sent a packet after its round-end of round {round}, before the round's barrier")]
    EarlyPacket {
        /// The channel.
        channel: usize,
        /// The open round.
        round: u64,
    },
    /// A channel ended another round than the open one.
    #[error("channel {channel} ended round {got}, the open round is {expected}")]
    RoundMismatch {
        /// The channel.
        channel: usize,
        /// The open round.
        expected: u64,
        /// The round it ended.
        got: u64,
    },
    /// A channel ended the open round twice.
    #[error("channel {channel} ended round {round} twice")]
    DuplicateRoundEnd {
        /// The channel.
        channel: usize,
        /// The round.
        round: u64,
    },
    /// Channels disagree on the flags of a round (final, forced).
    #[error("channel {channel} ended round {round} with flags {got:#x}, another channel with {expected:#x}")]
    FlagsDiffer {
        /// The channel.
        channel: usize,
        /// The round.
        round: u64,
        /// Another channel's flags.
        expected: u32,
        /// This channel's flags.
        got: u32,
    },
}

/// Why a channel connection is refused (the reason goes back in its `HelloReply`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelRefusal {
    /// The connection belongs to another migration.
    #[error("stray channel {index}: it belongs to migration {theirs}, this destination is receiving migration {ours}")]
    WrongMigration {
        /// Its index.
        index: u16,
        /// Its migration id, hex.
        theirs: String,
        /// Ours, hex.
        ours: String,
    },
    /// The channel count differs from the one channel 0 announced.
    #[error("channel {index} says the migration has {theirs} channels, channel 0 said {ours}")]
    CountMismatch {
        /// Its index.
        index: u16,
        /// Its count.
        theirs: u16,
        /// Channel 0's count.
        ours: u16,
    },
    /// The index is bound already.
    #[error("duplicate channel {index} of migration {id}")]
    Duplicate {
        /// The index.
        index: u16,
        /// The migration id, hex.
        id: String,
    },
    /// A channel hello came first: no migration is in progress.
    #[error("channel {index} of migration {id} arrived but no migration is in progress (a migration's first connection carries its hello)")]
    NoMigration {
        /// Its index.
        index: u16,
        /// Its migration id, hex.
        id: String,
    },
    /// Channel 0's announcement after its hello is wrong or missing.
    #[error("channel 0 must announce itself after its hello: {0}")]
    BadPrimary(String),
    /// The connection did not open with a channel hello.
    #[error("expected a channel hello: {0}")]
    NotAChannel(String),
}

/// Lower-case hex of a migration id.
pub fn id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why the first connection's channel hello is refused.
pub fn no_migration(c: &ChannelHello) -> ChannelRefusal {
    ChannelRefusal::NoMigration {
        index: c.index,
        id: id_hex(&c.migration_id),
    }
}

/// Checks channel hello `c` against the migration `primary` announced on channel 0, with
/// `bound[i]` telling whether channel `i` is connected already. Returns the index.
pub fn check_channel(
    c: &ChannelHello,
    primary: &ChannelHello,
    bound: &[bool],
) -> Result<usize, ChannelRefusal> {
    if c.migration_id != primary.migration_id {
        return Err(ChannelRefusal::WrongMigration {
            index: c.index,
            theirs: id_hex(&c.migration_id),
            ours: id_hex(&primary.migration_id),
        });
    }
    if c.count != primary.count {
        return Err(ChannelRefusal::CountMismatch {
            index: c.index,
            theirs: c.count,
            ours: primary.count,
        });
    }
    let i = c.index as usize;
    if bound.get(i).copied().unwrap_or(true) {
        return Err(ChannelRefusal::Duplicate {
            index: c.index,
            id: id_hex(&c.migration_id),
        });
    }
    Ok(i)
}

/// Which channel carries each page: stripes of `CHUNK_PAGES x workers` pages, round robin.
/// Inside a stripe the codec's own 64-page chunks rotate over the channel's encode workers,
/// so both levels stay balanced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelMap {
    channels: u64,
    stripe_pages: u64,
}

impl ChannelMap {
    /// `channels` channels of `workers` encode workers each.
    pub fn new(channels: usize, workers: usize) -> ChannelMap {
        ChannelMap {
            channels: channels.max(1) as u64,
            stripe_pages: CHUNK_PAGES * workers.max(1) as u64,
        }
    }

    /// The channel of `page`.
    pub fn channel_of(&self, page: u64) -> usize {
        ((page / self.stripe_pages) % self.channels) as usize
    }
}

/// A fresh random migration id (from the kernel's random source; without it, from the
/// clock, the pid and std's randomly keyed hasher).
pub fn new_migration_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .is_ok()
    {
        return id;
    }
    use std::hash::{BuildHasher, Hasher};
    for half in id.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.write_u32(std::process::id());
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    id
}

/// The channel and stream offset of [`CORRUPT_ENV`]: `OFFSET` (channel 0) or
/// `CHANNEL:OFFSET`.
pub fn corrupt_target(value: &str) -> Option<(usize, u64)> {
    match value.split_once(':') {
        Some((c, o)) => Some((c.trim().parse().ok()?, o.trim().parse().ok()?)),
        None => Some((0, value.trim().parse().ok()?)),
    }
}

/// Connects to `to` (any of its addresses).
pub fn connect(to: &str, timeout: Duration) -> Result<TcpStream, SendError> {
    let addrs: Vec<_> = to
        .to_socket_addrs()
        .map_err(|e| SendError::Connect(to.to_string(), e))?
        .collect();
    let mut last = std::io::Error::other("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(SendError::Connect(to.to_string(), last))
}

/// One channel on the source: its encode pipeline and its writer.
struct SourceChannel {
    encoder: Sender,
    link: Link,
}

/// What the channels sent in one round.
#[derive(Debug)]
pub struct ChannelRound {
    /// The codec statistics of the round, all channels together.
    pub codec: PipelineStats,
    /// The round's totals (what the destination's `RoundAck` must report).
    pub total: RoundEnd,
    /// Wire bytes of the `RoundEnd` frames.
    pub end_frame_bytes: u64,
}

/// The source's channels: channel 0 (which also carries the control messages) and the
/// others.
pub struct SourceChannels {
    map: ChannelMap,
    channels: Vec<SourceChannel>,
    /// Readers of channels 1.., only for their binding replies.
    replies: Vec<FrameReader<TcpStream>>,
    migration_id: [u8; 16],
}

impl std::fmt::Debug for SourceChannels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceChannels")
            .field("count", &self.channels.len())
            .field("map", &self.map)
            .finish()
    }
}

fn setup_socket(s: &TcpStream, io_timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(io_timeout))?;
    // A peer that stops reading must not block a writer (and a later join of it) forever.
    s.set_write_timeout(Some(io_timeout))
}

impl SourceChannels {
    /// Connects `cfg.channels` connections to `cfg.to` (channel 0 first), starts their
    /// encoders and writers, and queues the channel hello of every channel but 0. Returns
    /// the channels and the reader of channel 0.
    pub fn open(
        cfg: &SendConfig,
        guest_pages: u64,
    ) -> Result<(SourceChannels, FrameReader<TcpStream>), SendError> {
        let n = cfg.channels.max(1);
        if n > MAX_CHANNELS as usize {
            return Err(SendError::Config(format!(
                "--channels {n}: at most {MAX_CHANNELS}"
            )));
        }
        let workers = (cfg.threads / n).max(1);
        let mut sender_cfg = SenderConfig::new(guest_pages);
        sender_cfg.workers = workers;
        sender_cfg.batch_pages = cfg.batch_pages;
        sender_cfg.encoder = cfg.encoder;
        if let Some(d) = &mut sender_cfg.encoder.delta {
            // The page cache is a total too.
            d.cache_bytes /= n;
        }
        let bucket = cfg.max_bandwidth.map(TokenBucket::shared);
        let corrupt = std::env::var(CORRUPT_ENV)
            .ok()
            .and_then(|v| corrupt_target(&v));
        let migration_id = new_migration_id();
        let mut channels = Vec::with_capacity(n);
        let mut replies = Vec::with_capacity(n - 1);
        let mut reader0 = None;
        for index in 0..n {
            let stream = connect(&cfg.to, cfg.io_timeout)?;
            setup_socket(&stream, cfg.io_timeout).map_err(SendError::Socket)?;
            let link = Link::with_options(
                stream.try_clone().map_err(SendError::Socket)?,
                bucket.clone(),
                corrupt.and_then(|(c, at)| (c == index).then_some(at)),
                &format!("vmstream-link-{index}"),
            )
            .map_err(SendError::Socket)?;
            let reader = FrameReader::new(stream, Some(cfg.io_timeout));
            if index == 0 {
                reader0 = Some(reader);
            } else {
                replies.push(reader);
            }
            let mut channel = SourceChannel {
                encoder: Sender::new(sender_cfg)?,
                link,
            };
            if index > 0 {
                channel
                    .link
                    .send_message(&Message::ChannelHello(ChannelHello {
                        migration_id,
                        index: index as u16,
                        count: n as u16,
                    }))?;
            }
            channels.push(channel);
        }
        let reader0 = reader0.expect("channel 0 is opened first");
        Ok((
            SourceChannels {
                map: ChannelMap::new(n, workers),
                channels,
                replies,
                migration_id,
            },
            reader0,
        ))
    }

    /// Number of channels.
    pub fn count(&self) -> usize {
        self.channels.len()
    }

    /// The migration id (hex), which binds the channels together.
    pub fn migration_id(&self) -> String {
        id_hex(&self.migration_id)
    }

    /// Sends `hello` on channel 0, with the channels feature and channel 0's channel hello
    /// when there are several channels.
    pub fn send_hello(&mut self, mut hello: Hello) -> Result<(), SendError> {
        let n = self.channels.len();
        if n > 1 {
            hello.features |= FEATURE_CHANNELS;
        }
        self.send_message(&Message::Hello(hello))?;
        if n > 1 {
            self.send_message(&Message::ChannelHello(ChannelHello {
                migration_id: self.migration_id,
                index: 0,
                count: n as u16,
            }))?;
        }
        Ok(())
    }

    /// Waits for the destination's answer on every channel but 0 (after it accepted the
    /// hello on channel 0).
    pub fn await_bound(&mut self) -> Result<(), SendError> {
        for (i, r) in self.replies.iter_mut().enumerate() {
            let channel = i + 1;
            let transport = |source| ChannelError::Transport { channel, source };
            match r.read_frame().map_err(transport)? {
                Frame::Control(Message::HelloReply(h)) if h.refuse == RefuseCode::None => {}
                Frame::Control(Message::HelloReply(h)) => {
                    return Err(ChannelError::Refused {
                        channel,
                        reason: h.reason,
                    }
                    .into())
                }
                Frame::Control(m) => {
                    return Err(SendError::Protocol(format!(
                        "channel {channel}: expected a hello reply, got a {} message",
                        m.frame_type().name()
                    )))
                }
                Frame::Packet(_) => {
                    return Err(SendError::Protocol(format!(
                        "channel {channel}: expected a hello reply, got a packet"
                    )))
                }
            }
        }
        self.replies.clear();
        Ok(())
    }

    /// Queues page `page` (contents `data`) on its channel.
    pub fn push(&mut self, page: u64, data: &[u8]) -> Result<(), SendError> {
        let c = self.map.channel_of(page);
        self.channels[c].encoder.push(page, data)?;
        self.pump()
    }

    /// Hands finished packets of every channel to its link and recycles written ones.
    pub fn pump(&mut self) -> Result<(), SendError> {
        for c in &mut self.channels {
            pump_channel(c)?;
        }
        Ok(())
    }

    /// Ends round `round` on every channel: flushes each encoder, sends its packets and
    /// then its `RoundEnd` (with `flags`) on its channel.
    pub fn end_round(&mut self, round: u64, flags: u32) -> Result<ChannelRound, SendError> {
        let mut parts = Vec::with_capacity(self.channels.len());
        let mut total = RoundEnd {
            round,
            records: 0,
            packets: 0,
            packet_bytes: 0,
            flags,
        };
        let mut end_frame_bytes = 0;
        for c in &mut self.channels {
            let codec = c.encoder.end_round()?;
            pump_channel(c)?;
            let end = Message::RoundEnd(RoundEnd {
                round,
                records: codec.pages(),
                packets: codec.packets,
                packet_bytes: codec.packet_bytes,
                flags,
            });
            c.link.send_message(&end)?;
            end_frame_bytes += end.to_frame().len() as u64;
            total.records += codec.pages();
            total.packets += codec.packets;
            total.packet_bytes += codec.packet_bytes;
            parts.push(codec);
        }
        Ok(ChannelRound {
            codec: merge_stats(&parts),
            total,
            end_frame_bytes,
        })
    }

    /// Sends a control message on channel 0 (after everything queued there before).
    pub fn send_message(&mut self, msg: &Message) -> Result<(), SendError> {
        Ok(self.channels[0].link.send_message(msg)?)
    }

    /// Bytes written on all channels.
    pub fn bytes_sent(&self) -> u64 {
        self.channels.iter().map(|c| c.link.bytes_sent()).sum()
    }

    /// Bytes written on each channel.
    pub fn bytes_per_channel(&self) -> Vec<u64> {
        self.channels.iter().map(|c| c.link.bytes_sent()).collect()
    }

    /// Waits until every channel wrote what was queued, then stops the writers; the first
    /// error wins.
    pub fn finish(&mut self) -> Result<(), TransportError> {
        let mut first = Ok(());
        for c in &mut self.channels {
            let r = c.link.finish();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// The codec statistics over all rounds and channels.
    pub fn total_stats(&self) -> PipelineStats {
        let parts: Vec<PipelineStats> = self
            .channels
            .iter()
            .map(|c| c.encoder.total_stats().clone())
            .collect();
        merge_stats(&parts)
    }
}

fn pump_channel(c: &mut SourceChannel) -> Result<(), SendError> {
    while let Some(p) = c.encoder.poll() {
        c.link.send_packet(p)?;
    }
    for p in c.link.returned() {
        c.encoder.recycle(p);
    }
    Ok(())
}

/// The statistics of several channels as one: counts summed, worker lists concatenated,
/// rounds counted once.
pub fn merge_stats(parts: &[PipelineStats]) -> PipelineStats {
    let mut out = PipelineStats::default();
    let mut workers = Vec::new();
    for p in parts {
        out.add(&PipelineStats {
            workers: Vec::new(),
            ..p.clone()
        });
        workers.extend(p.workers.iter().cloned());
    }
    out.rounds = parts.iter().map(|p| p.rounds).max().unwrap_or(0);
    out.workers = workers;
    out
}

/// The destination's channel setup: the listener (kept open while channels bind) and
/// the connections of channels 1...
#[derive(Debug, Default)]
pub struct DestChannels {
    listener: Option<TcpListener>,
    bound: Vec<TcpStream>,
    count: usize,
    /// Bytes read on channels 1.. (channel 0 counts its own).
    extra_bytes: u64,
}

/// Longest wait for the first frame of a channel connection.
const CHANNEL_HELLO_WAIT: Duration = Duration::from_secs(10);

impl DestChannels {
    /// Channel setup around the listener that accepted channel 0.
    pub fn new(listener: TcpListener) -> DestChannels {
        DestChannels {
            listener: Some(listener),
            count: 1,
            ..Default::default()
        }
    }

    /// Stops listening (a single-channel migration, or every channel bound).
    pub fn close_listener(&mut self) {
        self.listener = None;
    }

    /// Channels of the migration (1 until bound).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes read on channels 1...
    pub fn extra_bytes(&self) -> u64 {
        self.extra_bytes
    }

    /// Reads channel 0's channel hello, which follows a `Hello` with the channels feature.
    pub fn read_primary(
        reader: &mut FrameReader<TcpStream>,
    ) -> Result<ChannelHello, ChannelRefusal> {
        match reader.read_frame() {
            Ok(Frame::Control(Message::ChannelHello(c))) if c.index == 0 => Ok(c),
            Ok(Frame::Control(Message::ChannelHello(c))) => Err(ChannelRefusal::BadPrimary(
                format!("the first connection says it is channel {}", c.index),
            )),
            Ok(Frame::Control(m)) => Err(ChannelRefusal::BadPrimary(format!(
                "got a {} message",
                m.frame_type().name()
            ))),
            Ok(Frame::Packet(_)) => Err(ChannelRefusal::BadPrimary("got a packet".into())),
            Err(e) => Err(ChannelRefusal::BadPrimary(e.to_string())),
        }
    }

    /// Accepts the channels 1.. of the migration channel 0 announced in `primary`,
    /// refusing (and reporting on stderr) every other connection, until all are bound or
    /// `timeout` passed. Stops listening either way.
    pub fn bind(&mut self, primary: &ChannelHello, timeout: Duration) -> Result<(), ChannelError> {
        let Some(listener) = self.listener.take() else {
            return Err(ChannelError::Accept(std::io::Error::other(
                "the listener is closed",
            )));
        };
        let count = primary.count as usize;
        listener
            .set_nonblocking(true)
            .map_err(ChannelError::Accept)?;
        let deadline = Instant::now() + timeout;
        let mut slots: Vec<Option<TcpStream>> = (0..count).map(|_| None).collect();
        let mut bound = vec![false; count];
        bound[0] = true;
        while bound.iter().any(|b| !b) {
            match listener.accept() {
                Ok((stream, peer)) => match admit(&stream, primary, &bound, timeout) {
                    Ok((i, hello_bytes)) => {
                        bound[i] = true;
                        slots[i] = Some(stream);
                        self.extra_bytes += hello_bytes;
                    }
                    Err(reason) => eprintln!(
                        "vmstream recv: refused a channel connection from {peer}: {reason}"
                    ),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(ChannelError::BindTimeout {
                            bound: bound.iter().filter(|b| **b).count(),
                            count,
                            timeout,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ChannelError::Accept(e)),
            }
        }
        self.bound = slots.into_iter().flatten().collect();
        self.count = count;
        Ok(())
    }

    /// The frames of all channels, for the rounds (see [`ChannelFrames`]).
    pub fn frames<'a>(
        &'a mut self,
        reader0: &'a mut FrameReader<TcpStream>,
        io_timeout: Duration,
    ) -> Result<ChannelFrames<'a>, RecvError> {
        let count = self.bound.len() + 1;
        let mut frames = ChannelFrames {
            barrier: RoundBarrier::new(count),
            completed: false,
            reader0,
            multi: None,
            extra_bytes: &mut self.extra_bytes,
        };
        if count == 1 {
            return Ok(frames);
        }
        // Channel 0's reader moves to its thread and comes back when it ends; meanwhile a
        // reader of a clone of its socket stands in (unused).
        let clone0 = frames
            .reader0
            .get_ref()
            .try_clone()
            .map_err(RecvError::Socket)?;
        let reader = std::mem::replace(
            frames.reader0,
            FrameReader::new(
                clone0.try_clone().map_err(RecvError::Socket)?,
                Some(io_timeout),
            ),
        );
        let mut sockets = vec![clone0];
        let mut readers = vec![reader];
        for s in std::mem::take(&mut self.bound) {
            sockets.push(s.try_clone().map_err(RecvError::Socket)?);
            readers.push(FrameReader::new(s, Some(io_timeout)));
        }
        let (tx, rx) = sync_channel(2 * count);
        let mut threads = Vec::with_capacity(count);
        for (index, reader) in readers.into_iter().enumerate() {
            let tx = tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("vmstream-chan-{index}"))
                .spawn(move || read_channel(index, reader, tx))
                .map_err(RecvError::Socket)?;
            threads.push(t);
        }
        frames.multi = Some(Multi {
            rx: Some(rx),
            threads,
            sockets,
        });
        Ok(frames)
    }
}

/// Reads the first frame of a channel connection and answers it; `Ok((index, bytes
/// read))` if it is a channel of `primary`'s migration that is not bound yet.
fn admit(
    stream: &TcpStream,
    primary: &ChannelHello,
    bound: &[bool],
    io_timeout: Duration,
) -> Result<(usize, u64), ChannelRefusal> {
    let setup = || -> std::io::Result<(FrameReader<TcpStream>, FrameWriter<TcpStream>)> {
        stream.set_nonblocking(false)?;
        setup_socket(stream, io_timeout)?;
        stream.set_read_timeout(Some(io_timeout.min(CHANNEL_HELLO_WAIT)))?;
        Ok((
            FrameReader::new(stream.try_clone()?, None),
            FrameWriter::new(stream.try_clone()?, None),
        ))
    };
    let (mut reader, mut writer) =
        setup().map_err(|e| ChannelRefusal::NotAChannel(e.to_string()))?;
    let verdict = match reader.read_frame() {
        Ok(Frame::Control(Message::ChannelHello(c))) => check_channel(&c, primary, bound),
        Ok(Frame::Control(Message::Hello(_))) => Err(ChannelRefusal::NotAChannel(format!(
            "a hello, but migration {} is in progress here",
            id_hex(&primary.migration_id)
        ))),
        Ok(Frame::Control(m)) => Err(ChannelRefusal::NotAChannel(format!(
            "got a {} message",
            m.frame_type().name()
        ))),
        Ok(Frame::Packet(_)) => Err(ChannelRefusal::NotAChannel("got a packet".into())),
        Err(e) => Err(ChannelRefusal::NotAChannel(e.to_string())),
    };
    let reply = match &verdict {
        Ok(_) => HelloReply {
            refuse: RefuseCode::None,
            receiver_workers: 0,
            reason: String::new(),
        },
        Err(r) => HelloReply {
            refuse: RefuseCode::Channel,
            receiver_workers: 0,
            reason: r.to_string(),
        },
    };
    let sent = writer.write_message(&Message::HelloReply(reply));
    let i = verdict?;
    sent.map_err(|e| ChannelRefusal::NotAChannel(format!("answering the channel hello: {e}")))?;
    stream
        .set_read_timeout(Some(io_timeout))
        .map_err(|e| ChannelRefusal::NotAChannel(e.to_string()))?;
    Ok((i, reader.bytes_read()))
}

type ChannelFrame = (usize, Result<Frame, TransportError>);

/// A channel's reader thread: forwards its frames until its final `RoundEnd`, an `Abort`
/// or an error, then returns the reader.
fn read_channel(
    index: usize,
    mut reader: FrameReader<TcpStream>,
    tx: SyncSender<ChannelFrame>,
) -> FrameReader<TcpStream> {
    loop {
        let frame = reader.read_frame();
        let last = match &frame {
            Ok(Frame::Control(Message::RoundEnd(e))) => e.is_final(),
            Ok(Frame::Control(Message::Abort(_))) | Err(_) => true,
            Ok(_) => false,
        };
        if tx.send((index, frame)).is_err() || last {
            return reader;
        }
    }
}

/// The round barrier across channels: which channels ended the open round.
#[derive(Debug, Clone)]
pub struct RoundBarrier {
    round: u64,
    ended: Vec<Option<RoundEnd>>,
}

impl RoundBarrier {
    /// A barrier over `channels` channels, in round 0.
    pub fn new(channels: usize) -> RoundBarrier {
        RoundBarrier {
            round: 0,
            ended: vec![None; channels.max(1)],
        }
    }

    /// The open round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// A packet arrived on `channel`: refused if that channel already ended the round.
    pub fn packet(&self, channel: usize) -> Result<(), ChannelError> {
        match self.ended.get(channel) {
            Some(None) => Ok(()),
            _ => Err(ChannelError::EarlyPacket {
                channel,
                round: self.round,
            }),
        }
    }

    /// `channel` ended a round. Once every channel ended the open round, returns the
    /// round's totals and opens the next round.
    pub fn round_end(
        &mut self,
        channel: usize,
        end: RoundEnd,
    ) -> Result<Option<RoundEnd>, ChannelError> {
        if end.round != self.round {
            return Err(ChannelError::RoundMismatch {
                channel,
                expected: self.round,
                got: end.round,
            });
        }
        let slot = self
            .ended
            .get_mut(channel)
            .ok_or(ChannelError::DuplicateRoundEnd {
                channel,
                round: end.round,
            })?;
        if slot.is_some() {
            return Err(ChannelError::DuplicateRoundEnd {
                channel,
                round: end.round,
            });
        }
        *slot = Some(end);
        if let Some(other) = self.ended.iter().flatten().find(|e| e.flags != end.flags) {
            return Err(ChannelError::FlagsDiffer {
                channel,
                round: end.round,
                expected: other.flags,
                got: end.flags,
            });
        }
        if self.ended.iter().any(Option::is_none) {
            return Ok(None);
        }
        let mut total = RoundEnd {
            records: 0,
            packets: 0,
            packet_bytes: 0,
            ..end
        };
        for e in self.ended.iter_mut().map(|e| e.take().expect("all ended")) {
            total.records += e.records;
            total.packets += e.packets;
            total.packet_bytes += e.packet_bytes;
        }
        self.round += 1;
        Ok(Some(total))
    }
}

struct Multi {
    rx: Option<FrameQueue<ChannelFrame>>,
    threads: Vec<JoinHandle<FrameReader<TcpStream>>>,
    /// Clones of every channel's socket, to unblock readers on an early end.
    sockets: Vec<TcpStream>,
}

/// The frames of a migration's rounds from all its channels, in arrival order per
/// channel, with the [`RoundBarrier`]. With one channel it reads channel 0 directly; with
/// more, one thread per channel reads into a bounded queue. Dropping it stops those
/// threads and gives channel 0's reader back (for the messages after the final round).
pub struct ChannelFrames<'a> {
    barrier: RoundBarrier,
    /// The final round passed the barrier: every reader ended by itself.
    completed: bool,
    reader0: &'a mut FrameReader<TcpStream>,
    multi: Option<Multi>,
    extra_bytes: &'a mut u64,
}

impl ChannelFrames<'_> {
    /// The next frame and its channel. A transport error of channel 0 is reported as is,
    /// one of another channel with its channel.
    pub fn next_frame(&mut self) -> Result<(usize, Frame), RecvError> {
        let Some(m) = &mut self.multi else {
            return Ok((0, self.reader0.read_frame()?));
        };
        let rx = m.rx.as_ref().expect("open until dropped");
        match rx.recv() {
            Ok((ch, Ok(f))) => Ok((ch, f)),
            Ok((0, Err(e))) => Err(e.into()),
            Ok((channel, Err(source))) => Err(ChannelError::Transport { channel, source }.into()),
            // Every reader ended (each after its final round end) but the barrier did not.
            Err(_) => Err(RecvError::Protocol(format!(
                "every channel ended before the barrier of round {}",
                self.barrier.round()
            ))),
        }
    }

    /// Checks a packet that arrived on `channel` against the barrier.
    pub fn packet(&self, channel: usize) -> Result<(), RecvError> {
        Ok(self.barrier.packet(channel)?)
    }

    /// Records `channel`'s round end; `Some(totals)` once the round ended on all channels.
    pub fn round_end(
        &mut self,
        channel: usize,
        end: RoundEnd,
    ) -> Result<Option<RoundEnd>, RecvError> {
        let total = self.barrier.round_end(channel, end)?;
        self.completed |= total.is_some_and(|t| t.is_final());
        Ok(total)
    }
}

impl Drop for ChannelFrames<'_> {
    fn drop(&mut self) {
        let Some(mut m) = self.multi.take() else {
            return;
        };
        // After the final round every reader stopped by itself. On an early end, blocked
        // senders fail once the queue is gone and blocked reads once the read sides are
        // shut (nothing reads these connections after a failed round).
        drop(m.rx.take());
        if !self.completed {
            for s in &m.sockets {
                let _ = s.shutdown(std::net::Shutdown::Read);
            }
        }
        for (i, t) in m.threads.into_iter().enumerate() {
            match (i, t.join()) {
                (0, Ok(r)) => *self.reader0 = r,
                (_, Ok(r)) => *self.extra_bytes += r.bytes_read(),
                (_, Err(_)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(round: u64, records: u64, flags: u32) -> RoundEnd {
        RoundEnd {
            round,
            records,
            packets: 1,
            packet_bytes: 10,
            flags,
        }
    }

    #[test]
    fn barrier_waits_for_every_channel_and_sums() {
        let mut b = RoundBarrier::new(3);
        b.packet(1).unwrap();
        assert_eq!(b.round_end(1, end(0, 5, 0)).unwrap(), None);
        // Channel 1 ended round 0: a packet on it now would be round 1's, too early.
        assert!(matches!(
            b.packet(1),
            Err(ChannelError::EarlyPacket {
                channel: 1,
                round: 0
            })
        ));
        b.packet(0).unwrap();
        assert!(matches!(
            b.round_end(1, end(0, 5, 0)),
            Err(ChannelError::DuplicateRoundEnd { channel: 1, .. })
        ));
        assert_eq!(b.round_end(0, end(0, 7, 0)).unwrap(), None);
        let total = b.round_end(2, end(0, 1, 0)).unwrap().unwrap();
        assert_eq!((total.round, total.records, total.packets), (0, 13, 3));
        assert_eq!(total.packet_bytes, 30);
        assert_eq!(b.round(), 1);
        b.packet(1).unwrap();
        assert!(matches!(
            b.round_end(0, end(0, 1, 0)),
            Err(ChannelError::RoundMismatch {
                expected: 1,
                got: 0,
                ..
            })
        ));
        b.round_end(0, end(1, 1, 1)).unwrap();
        assert!(matches!(
            b.round_end(2, end(1, 1, 0)),
            Err(ChannelError::FlagsDiffer { channel: 2, .. })
        ));
        assert!(b.round_end(7, end(1, 1, 1)).is_err());
    }

    #[test]
    fn single_channel_barrier_passes_every_round_end() {
        let mut b = RoundBarrier::new(1);
        for r in 0..3 {
            assert_eq!(b.round_end(0, end(r, 2, 0)).unwrap().unwrap().records, 2);
        }
    }

    #[test]
    fn map_stripes_are_balanced_and_stable() {
        let m = ChannelMap::new(2, 2);
        assert_eq!(m.channel_of(0), 0);
        assert_eq!(m.channel_of(127), 0);
        assert_eq!(m.channel_of(128), 1);
        assert_eq!(m.channel_of(256), 0);
        let mut per = [0u64; 3];
        let m = ChannelMap::new(3, 1);
        for p in 0..64 * 300 {
            per[m.channel_of(p)] += 1;
        }
        assert_eq!(per, [6400; 3]);
        assert_eq!(ChannelMap::new(1, 4).channel_of(123_456), 0);
    }

    #[test]
    fn channels_are_checked_against_the_primary() {
        let primary = ChannelHello {
            migration_id: [1; 16],
            index: 0,
            count: 3,
        };
        let bound = [true, false, true];
        let c = |id, index, count| ChannelHello {
            migration_id: [id; 16],
            index,
            count,
        };
        assert_eq!(check_channel(&c(1, 1, 3), &primary, &bound), Ok(1));
        assert!(matches!(
            check_channel(&c(2, 1, 3), &primary, &bound),
            Err(ChannelRefusal::WrongMigration { .. })
        ));
        assert!(matches!(
            check_channel(&c(1, 2, 3), &primary, &bound),
            Err(ChannelRefusal::Duplicate { index: 2, .. })
        ));
        assert!(matches!(
            check_channel(&c(1, 0, 3), &primary, &bound),
            Err(ChannelRefusal::Duplicate { index: 0, .. })
        ));
        assert!(matches!(
            check_channel(&c(1, 1, 2), &primary, &bound),
            Err(ChannelRefusal::CountMismatch { .. })
        ));
        let msg = check_channel(&c(2, 1, 3), &primary, &bound)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("stray channel 1") && msg.contains(&"01".repeat(16)),
            "{msg}"
        );
    }

    #[test]
    fn corrupt_target_parses_both_forms() {
        assert_eq!(corrupt_target("300000"), Some((0, 300_000)));
        assert_eq!(corrupt_target("1:4096"), Some((1, 4096)));
        assert_eq!(corrupt_target("x"), None);
        assert_eq!(corrupt_target("1:"), None);
    }

    #[test]
    fn migration_ids_differ() {
        assert_ne!(new_migration_id(), new_migration_id());
    }

    #[test]
    fn merged_stats_sum_counts_and_keep_every_worker() {
        let a = PipelineStats {
            rounds: 2,
            packets: 3,
            packet_bytes: 100,
            workers: vec![Default::default(); 2],
            ..Default::default()
        };
        let m = merge_stats(&[a.clone(), a]);
        assert_eq!((m.rounds, m.packets, m.packet_bytes), (2, 6, 200));
        assert_eq!(m.workers.len(), 4);
    }
}
