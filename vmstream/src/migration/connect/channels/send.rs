//! The source's channels: one encode pipeline and one writer per connection, pages routed
//! by [`ChannelMap`], control messages on channel 0.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use vmstream_codec::{PageSource, PipelineStats, Sender, SenderConfig, DEFAULT_CACHE_BYTES};

use crate::memory::{MemoryReader, PAGE_SIZE};
use crate::migration::config::SendConfig;
use crate::migration::connect::auth::{authenticate_destination, AuthError, AuthKey, SourceAuth};
use crate::migration::connect::channels::{
    id_hex, new_migration_id, setup_socket, ChannelError, ChannelMap,
};
use crate::migration::connect::exposure::{check_keyless, SEND_RISK};
use crate::migration::error::SendError;
use crate::migration::fault::StreamFault;
use crate::migration::transport::{
    unix_path, Frame, FrameReader, Link, PacketChannel, SharedBucket, Socket, TokenBucket,
    TransportError,
};
use crate::migration::wire::{
    Abort, AbortCode, ChannelHello, Hello, Message, MirrorWrite, PostcopyPreempt, RefuseCode,
    RoundEnd, FEATURE_CHANNELS, MAX_CHANNELS,
};

/// Connects to `to`: a unix socket (`unix:PATH`), or any address of `HOST:PORT`.
/// `keyless`: no key, and not `--insecure`, so only loopback TCP addresses are allowed
/// (`crate::migration::connect::exposure`), checked on what is connected to, not only on
/// what the address resolved to earlier.
pub fn connect(to: &str, timeout: Duration, keyless: bool) -> Result<Socket, SendError> {
    if let Some(path) = unix_path(to) {
        return Socket::connect_unix(path).map_err(|e| SendError::Connect(to.to_string(), e));
    }
    let addrs: Vec<_> = to
        .to_socket_addrs()
        .map_err(|e| SendError::Connect(to.to_string(), e))?
        .collect();
    if keyless {
        check_keyless(&addrs, false, &format!("--to {to}"), SEND_RISK)
            .map_err(SendError::Config)?;
    }
    let mut last = std::io::Error::other("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(Socket::tcp(s)),
            Err(e) => last = e,
        }
    }
    Err(SendError::Connect(to.to_string(), last))
}

/// A new connection to the destination (`cfg.to`), before any exchange: its writer (thread
/// `name`, its bytes taken from `bucket`, `faults` injected) and its reader.
fn dial(
    cfg: &SendConfig,
    bucket: Option<SharedBucket>,
    faults: Vec<(u64, StreamFault)>,
    name: &str,
) -> Result<(Link, FrameReader<Socket>), SendError> {
    let keyless = cfg.auth_key.is_none() && !cfg.insecure;
    let stream = connect(&cfg.to, cfg.io_timeout, keyless)?;
    setup_socket(&stream, cfg.io_timeout).map_err(SendError::Socket)?;
    let reader = FrameReader::new(
        stream.try_clone().map_err(SendError::Socket)?,
        Some(cfg.io_timeout),
    );
    let link = Link::with_options(stream, bucket, faults, name).map_err(SendError::Socket)?;
    Ok((link, reader))
}

/// The error for a destination that answered a connection's authentication with `frame`
/// (a refused hello, normally; an unsealed one that accepts is a destination that skipped
/// the exchange).
fn refusal(channel: usize, frame: Frame) -> SendError {
    match frame {
        Frame::Control(Message::HelloReply(h)) if h.refuse == RefuseCode::None => {
            AuthError::UnsealedAccept.into()
        }
        Frame::Control(Message::HelloReply(h)) if channel == 0 => SendError::Refused {
            code: h.refuse,
            reason: h.reason,
        },
        Frame::Control(Message::HelloReply(h)) => ChannelError::Refused {
            channel,
            reason: h.reason,
        }
        .into(),
        Frame::Control(m) => SendError::Protocol(format!(
            "channel {channel}: expected the destination's challenge, got a {} message",
            m.frame_type().name()
        )),
        Frame::Packet(_) => SendError::Protocol(format!(
            "channel {channel}: expected the destination's challenge, got a packet"
        )),
    }
}

/// Live guest memory, read by the encode workers: each copies a page into its batch
/// snapshot and encodes (and caches) only that copy, so a racing guest write cannot make
/// the page cache disagree with what was sent.
impl PageSource for MemoryReader {
    fn read_page(&self, page: u64, out: &mut [u8]) {
        MemoryReader::read_page(self, page, out)
    }
}

/// One channel on the source: its encode pipeline and its writer.
struct SourceChannel {
    encoder: Sender,
    link: Link,
}

impl SourceChannel {
    /// Binds this channel, `channel` of `count` of migration `migration_id`: the key
    /// exchange (with a key), its channel hello, the destination's answer on `reply`.
    fn bind(
        &mut self,
        channel: usize,
        count: u16,
        migration_id: [u8; 16],
        key: Option<&AuthKey>,
        reply: &mut FrameReader<Socket>,
    ) -> Result<(), SendError> {
        if let Some(key) = key {
            self.authenticate(channel, key, reply)?;
        }
        self.link
            .send_message(&Message::ChannelHello(ChannelHello {
                migration_id,
                index: channel as u16,
                count,
            }))?;
        let transport = |source| ChannelError::Transport { channel, source };
        match reply.read_frame().map_err(transport)? {
            Frame::Control(Message::HelloReply(h)) if h.refuse == RefuseCode::None => Ok(()),
            Frame::Control(Message::HelloReply(h)) => Err(ChannelError::Refused {
                channel,
                reason: h.reason,
            }
            .into()),
            Frame::Control(m) => Err(SendError::Protocol(format!(
                "channel {channel}: expected a hello reply, got a {} message",
                m.frame_type().name()
            ))),
            Frame::Packet(_) => Err(SendError::Protocol(format!(
                "channel {channel}: expected a hello reply, got a packet"
            ))),
        }
    }

    /// Runs the key exchange on this channel's connection (`crate::migration::connect::auth`), then
    /// seals both directions.
    fn authenticate(
        &mut self,
        index: usize,
        key: &AuthKey,
        reader: &mut FrameReader<Socket>,
    ) -> Result<(), SendError> {
        match authenticate_destination(key, &mut |m| self.link.send_message(m), reader)? {
            SourceAuth::Authenticated(sealer) => Ok(self.link.seal_with(*sealer)?),
            SourceAuth::Answered(frame) => Err(refusal(index, frame)),
        }
    }
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

/// The page cache of all channels together for a guest of `guest_pages`: no larger than the
/// guest or the default, whichever is larger: more would hold pages the guest does not
/// have, and a huge `--xbzrle-cache` could not even be allocated. A total, like `--threads`.
fn cache_total(cfg: &SendConfig, guest_pages: u64) -> u64 {
    let guest_bytes = guest_pages.saturating_mul(PAGE_SIZE as u64);
    cfg.cache_bytes(guest_bytes)
        .min(guest_bytes.max(DEFAULT_CACHE_BYTES as u64))
}

/// Each channel's encoder pipeline for `cfg`: `--threads` and the page cache split
/// between the channels.
pub(crate) fn sender_config(cfg: &SendConfig, guest_pages: u64) -> Result<SenderConfig, SendError> {
    let n = cfg.channels.max(1);
    if n > MAX_CHANNELS as usize {
        return Err(SendError::Config(format!(
            "--channels {n}: at most {MAX_CHANNELS}"
        )));
    }
    let mut sender_cfg = SenderConfig::new(guest_pages);
    sender_cfg.workers = (cfg.threads / n).max(1);
    sender_cfg.batch_pages = cfg.batch_pages;
    sender_cfg.encoder = cfg.encoder;
    if let Some(d) = &mut sender_cfg.encoder.delta {
        d.cache_bytes = cache_total(cfg, guest_pages) as usize / n;
    }
    Ok(sender_cfg)
}

/// The source's channels: channel 0 (which also carries the control messages) and the
/// others.
pub struct SourceChannels {
    map: ChannelMap,
    channels: Vec<SourceChannel>,
    /// Readers of channels 1.., only for their binding replies.
    replies: Vec<FrameReader<Socket>>,
    migration_id: [u8; 16],
    /// The pre-shared key every channel proves (`crate::migration::connect::auth`).
    auth_key: Option<AuthKey>,
    /// The encoders read pages from guest memory themselves.
    reads_pages: bool,
    /// `--max-bandwidth`, shared by every connection (the disk mirror's too).
    bucket: Option<SharedBucket>,
    /// The page cache of all channels together (0 without XBZRLE).
    cache_bytes: u64,
}

impl std::fmt::Debug for SourceChannels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceChannels")
            .field("count", &self.channels.len())
            .field("map", &self.map)
            .finish()
    }
}

impl SourceChannels {
    /// Connects `cfg.channels` connections to `cfg.to` (channel 0 first), starts their
    /// encoders and writers, and queues the channel hello of every channel but 0. Returns
    /// the channels and the reader of channel 0. With `source` (guest memory), the encoders'
    /// workers copy pages queued with [`Self::push_page`] from it themselves.
    pub fn open(
        cfg: &SendConfig,
        guest_pages: u64,
        source: Option<Arc<dyn PageSource>>,
    ) -> Result<(SourceChannels, FrameReader<Socket>), SendError> {
        let n = cfg.channels.max(1);
        let sender_cfg = sender_config(cfg, guest_pages)?;
        let bucket = cfg.max_bandwidth.map(TokenBucket::shared);
        let migration_id = new_migration_id();
        let mut channels = Vec::with_capacity(n);
        let mut replies = Vec::with_capacity(n - 1);
        let mut reader0 = None;
        for index in 0..n {
            let (link, mut reader) = dial(
                cfg,
                bucket.clone(),
                cfg.faults.on_channel(index),
                &format!("vmstream-link-{index}"),
            )?;
            let encoder = match &source {
                Some(source) => Sender::with_source(sender_cfg, Arc::clone(source))?,
                None => Sender::new(sender_cfg)?,
            };
            let mut channel = SourceChannel { encoder, link };
            // Channel 0 authenticates now, before its hello; the others once the
            // destination took the migration and listens for them (`await_bound`).
            if let (0, Some(key)) = (index, &cfg.auth_key) {
                channel.authenticate(0, key, &mut reader)?;
            }
            channels.push(channel);
            if index == 0 {
                reader0 = Some(reader);
            } else {
                replies.push(reader);
            }
        }
        let reader0 = reader0.expect("channel 0 is opened first");
        Ok((
            SourceChannels {
                map: ChannelMap::new(n, sender_cfg.workers),
                channels,
                replies,
                migration_id,
                auth_key: cfg.auth_key.clone(),
                reads_pages: source.is_some(),
                bucket,
                cache_bytes: cfg
                    .encoder
                    .delta
                    .map_or(0, |_| cache_total(cfg, guest_pages)),
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

    /// Binds every channel but 0 (after the destination accepted the hello on channel 0):
    /// each authenticates when there is a key, sends its channel hello and waits for the
    /// answer, all channels at once. (The destination gives a connection 10 s from its
    /// accept to open, and channels 1.. connected with channel 0: one after the other, many
    /// channels over a long round trip would run out of it.)
    pub fn await_bound(&mut self) -> Result<(), SendError> {
        let count = self.channels.len() as u16;
        let (migration_id, key) = (self.migration_id, self.auth_key.as_ref());
        let results: Vec<Result<(), SendError>> = std::thread::scope(|s| {
            let binds: Vec<_> = self.channels[1..]
                .iter_mut()
                .zip(self.replies.iter_mut())
                .enumerate()
                .map(|(i, (c, r))| s.spawn(move || c.bind(i + 1, count, migration_id, key, r)))
                .collect();
            binds
                .into_iter()
                .map(|b| b.join().expect("channel binding thread"))
                .collect()
        });
        // The lowest channel's error, as when they were bound in order.
        results.into_iter().collect::<Result<(), SendError>>()?;
        self.replies.clear();
        Ok(())
    }

    /// Queues page `page` (contents `data`) on its channel.
    pub fn push(&mut self, page: u64, data: &[u8]) -> Result<(), SendError> {
        let c = self.map.channel_of(page);
        self.channels[c].encoder.push(page, data)?;
        self.pump()
    }

    /// Queues page `page` on its channel, its contents written by `fill`
    /// straight into the channel's batch (see [`Sender::push_with`]).
    pub fn push_with(
        &mut self,
        page: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), SendError>,
    ) -> Result<(), SendError> {
        let c = self.map.channel_of(page);
        self.channels[c].encoder.push_with(page, fill)?;
        self.pump()
    }

    /// Whether the channels were opened with a memory reader ([`Self::push_page`] works).
    pub fn reads_pages(&self) -> bool {
        self.reads_pages
    }

    /// The XBZRLE page cache of all channels together, bytes (0 without XBZRLE).
    pub fn cache_bytes(&self) -> u64 {
        self.cache_bytes
    }

    /// Queues page `page` on its channel by number: a worker of its encoder reads it from
    /// the memory reader given to [`Self::open`].
    pub fn push_page(&mut self, page: u64) -> Result<(), SendError> {
        let c = self.map.channel_of(page);
        self.channels[c].encoder.push_page(page)?;
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

    /// Gives the migration up: drops the packets queued on every channel, and those queued
    /// later, unwritten (see [`Link::discard_packets`]; the destination would throw them
    /// away, and the `Abort` must not wait behind them on a slow link), then sends
    /// `Abort{code, reason}` on channel 0.
    pub fn abort(&mut self, code: AbortCode, reason: String) -> Result<(), SendError> {
        for c in &self.channels {
            c.link.discard_packets();
        }
        self.send_message(&Message::Abort(Abort { code, reason }))
    }

    /// From now on every channel's writer waits for the destination to take its bytes no
    /// later than `deadline` (`None`: only the send timeout holds).
    pub fn set_deadline(&self, deadline: Option<std::time::Instant>) {
        for c in &self.channels {
            c.link.set_deadline(deadline);
        }
    }

    /// Sends a control message on channel 0 (after everything queued there before).
    pub fn send_message(&mut self, msg: &Message) -> Result<(), SendError> {
        Ok(self.channels[0].link.send_message(msg)?)
    }

    /// The migration id's bytes.
    pub fn migration_id_bytes(&self) -> [u8; 16] {
        self.migration_id
    }

    /// Replaces channel 0's connection (post-copy recovery after a lost link): connects
    /// again, proves the key if there is one, and starts a new writer; returns the new
    /// connection's reader. Frames still queued on the old connection are lost.
    pub fn reconnect_primary(
        &mut self,
        cfg: &SendConfig,
    ) -> Result<FrameReader<Socket>, SendError> {
        let bucket = cfg.max_bandwidth.map(TokenBucket::shared);
        let (link, mut reader) = dial(cfg, bucket, Vec::new(), "vmstream-link-0")?;
        let old = std::mem::replace(&mut self.channels[0].link, link);
        old.discard_packets();
        drop(old);
        if let Some(key) = &cfg.auth_key {
            self.channels[0].authenticate(0, key, &mut reader)?;
        }
        Ok(reader)
    }

    /// Opens post-copy's connection for requested pages (`FEATURE_POSTCOPY_PREEMPT`),
    /// named by `PostcopyPreempt`; returns its writer. Requested pages are not held to
    /// `--max-bandwidth` on it (they are few, and the guest waits for each).
    pub fn open_preempt(&self, cfg: &SendConfig) -> Result<Link, SendError> {
        let opening = Message::PostcopyPreempt(PostcopyPreempt {
            migration_id: self.migration_id,
        });
        let (link, _) = self.open_side(cfg, None, "vmstream-link-preempt", &opening)?;
        Ok(link)
    }

    /// Opens the disk mirror's connection (`FEATURE_MIRROR`), named by `MirrorWrite{OPEN}`;
    /// returns its writer (held to `--max-bandwidth` with the channels) and reader.
    pub fn open_mirror(&self, cfg: &SendConfig) -> Result<(Link, FrameReader<Socket>), SendError> {
        let opening = Message::MirrorWrite(MirrorWrite::open(self.migration_id));
        self.open_side(cfg, self.bucket.clone(), "vmstream-link-mirror", &opening)
    }

    /// A connection beside the channels: connects, proves the key if there is one, and
    /// sends `opening` (which names this migration); its writer thread `name` takes its
    /// bytes from `bucket`.
    fn open_side(
        &self,
        cfg: &SendConfig,
        bucket: Option<SharedBucket>,
        name: &str,
        opening: &Message,
    ) -> Result<(Link, FrameReader<Socket>), SendError> {
        let (mut link, mut reader) = dial(cfg, bucket, Vec::new(), name)?;
        if let Some(key) = &cfg.auth_key {
            match authenticate_destination(key, &mut |m| link.send_message(m), &mut reader)? {
                SourceAuth::Authenticated(sealer) => link.seal_with(*sealer)?,
                SourceAuth::Answered(frame) => return Err(refusal(0, frame)),
            }
        }
        link.send_message(opening)?;
        Ok((link, reader))
    }

    /// Sends a whole encoded frame on channel 0 (see [`Link::send_frame`]).
    pub fn send_frame(&mut self, frame: Vec<u8>) -> Result<(), SendError> {
        Ok(self.channels[0].link.send_frame(frame)?)
    }

    /// Sends a control message on channel 0 with the file descriptor `fd` (a unix socket
    /// only: the memory handover).
    pub fn send_message_with_fd(
        &mut self,
        msg: &Message,
        fd: std::os::fd::OwnedFd,
    ) -> Result<(), SendError> {
        Ok(self.channels[0].link.send_message_with_fd(msg, fd)?)
    }

    /// Bytes written on all channels.
    pub fn bytes_sent(&self) -> u64 {
        self.channels.iter().map(|c| c.link.bytes_sent()).sum()
    }

    /// When the last channel flushed its last control message (a round's `RoundEnd`, after
    /// all of the round's packets).
    pub fn message_flushed_at(&self) -> Option<std::time::Instant> {
        self.channels
            .iter()
            .filter_map(|c| c.link.message_flushed_at())
            .max()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A keyless destination's unsealed acceptance of a keyed connection is named as such
    /// (it used to read "destination refused the migration (None): "); its refusals stay
    /// refusals.
    #[test]
    fn an_unsealed_acceptance_is_an_authentication_failure() {
        let reply = |refuse| {
            Frame::Control(Message::HelloReply(crate::migration::wire::HelloReply {
                refuse,
                receiver_workers: 1,
                resumes: false,
                reason: String::new(),
            }))
        };
        for channel in [0, 1] {
            let e = refusal(channel, reply(RefuseCode::None));
            assert!(
                matches!(e, SendError::Auth(AuthError::UnsealedAccept)),
                "{e:?}"
            );
            assert!(e.to_string().contains("unsealed reply"), "{e}");
        }
        assert!(matches!(
            refusal(0, reply(RefuseCode::Auth)),
            SendError::Refused {
                code: RefuseCode::Auth,
                ..
            }
        ));
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
