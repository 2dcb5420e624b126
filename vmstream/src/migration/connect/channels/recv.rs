//! The destination's side of the channels: binding them (refusing strays) and reading
//! their frames into one decode pipeline behind the [`RoundBarrier`].

use crate::migration::transport::Socket;
use std::sync::mpsc::{sync_channel, Receiver as FrameQueue, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::migration::connect::admission::{Admissions, Opening};
use crate::migration::connect::auth::Admission;
use crate::migration::connect::channels::{
    check_channel, id_hex, ChannelError, ChannelRefusal, RoundBarrier,
};
use crate::migration::connect::seal::Opener;
use crate::migration::error::RecvError;
use crate::migration::transport::{Frame, FrameReader, TransportError};
use crate::migration::wire::{ChannelHello, HelloReply, Message, RefuseCode, RoundEnd};

/// The destination's channel setup: the admission of connections (kept open while
/// channels bind) and the connections of channels 1...
#[derive(Debug, Default)]
pub struct DestChannels {
    admissions: Option<Admissions>,
    /// The connections, with their sealing state when authenticated.
    bound: Vec<(Socket, Option<Opener>)>,
    count: usize,
    /// Bytes read on channels 1.. (channel 0 counts its own).
    extra_bytes: u64,
    /// Keep the listener after binding (see [`Self::keep_listening`]).
    keep_listening: bool,
}

impl DestChannels {
    /// Channel setup around the admissions that admitted channel 0.
    pub fn new(admissions: Admissions) -> DestChannels {
        DestChannels {
            admissions: Some(admissions),
            count: 1,
            ..Default::default()
        }
    }

    /// Whether [`Self::bind`] keeps the listener once the channels are bound (for a
    /// connection that comes after them: the disk mirror's).
    pub fn keep_listening(&mut self, keep: bool) {
        self.keep_listening = keep;
    }

    /// Stops listening (a single-channel migration, or every channel bound).
    pub fn close_listener(&mut self) {
        self.admissions = None;
    }

    /// The listener's admissions, for a post-copy's reconnections (None once closed or
    /// taken by the channels' binding).
    pub fn take_admissions(&mut self) -> Option<Admissions> {
        self.admissions.take()
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
    pub fn read_primary(reader: &mut FrameReader<Socket>) -> Result<ChannelHello, ChannelRefusal> {
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

    /// Takes the channels 1.. of the migration channel 0 announced in `primary` from the
    /// connections admitted meanwhile, refusing (and telling the admissions' notices) every
    /// other one, until all are bound or `timeout` passed. Stops listening either way.
    /// Channel 0 (`reader0`) must stay quiet meanwhile: an `Abort` there (the source gave
    /// up, e.g. because a channel was refused) or its close ends the binding at once.
    pub fn bind(
        &mut self,
        primary: &ChannelHello,
        timeout: Duration,
        reader0: &mut FrameReader<Socket>,
    ) -> Result<(), RecvError> {
        let Some(mut admissions) = self.admissions.take() else {
            return Err(
                ChannelError::Accept(std::io::Error::other("the listener is closed")).into(),
            );
        };
        let count = primary.count as usize;
        let deadline = Instant::now() + timeout;
        let mut slots: Vec<Option<(Socket, Option<Opener>)>> = (0..count).map(|_| None).collect();
        let mut bound = vec![false; count];
        bound[0] = true;
        while bound.iter().any(|b| !b) {
            match admissions.next(Duration::from_millis(5)) {
                Ok(Some(opening)) => {
                    let peer = opening.peer.clone();
                    match admit(opening, primary, &bound) {
                        Ok((i, stream, hello_bytes, opener)) => {
                            bound[i] = true;
                            slots[i] = Some((stream, opener));
                            self.extra_bytes += hello_bytes;
                        }
                        Err(reason) => admissions.notices().info(format!(
                            "refused a channel connection from {peer}: {reason}"
                        )),
                    }
                }
                Ok(None) => {
                    if let Some(frame) = pending_frame(reader0) {
                        return Err(match frame {
                            Ok(Frame::Control(Message::Abort(a))) => RecvError::PeerAborted {
                                code: a.code,
                                reason: a.reason,
                            },
                            Ok(f) => RecvError::Protocol(format!(
                                "channel 0 sent a {} before every channel was bound",
                                match f {
                                    Frame::Control(m) => m.frame_type().name(),
                                    Frame::Packet(_) => "packet",
                                }
                            )),
                            Err(e) => e.into(),
                        });
                    }
                    if Instant::now() >= deadline {
                        return Err(ChannelError::BindTimeout {
                            bound: bound.iter().filter(|b| **b).count(),
                            count,
                            timeout,
                        }
                        .into());
                    }
                }
                Err(e) => return Err(ChannelError::Accept(e).into()),
            }
        }
        self.bound = slots.into_iter().flatten().collect();
        self.count = count;
        if self.keep_listening {
            self.admissions = Some(admissions);
        }
        Ok(())
    }

    /// The frames of all channels, for the rounds (see [`ChannelFrames`]).
    pub fn frames<'a>(
        &'a mut self,
        reader0: &'a mut FrameReader<Socket>,
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
        for (s, opener) in std::mem::take(&mut self.bound) {
            sockets.push(s.try_clone().map_err(RecvError::Socket)?);
            let mut reader = FrameReader::new(s, Some(io_timeout));
            if let Some(o) = opener {
                reader.open_with(o);
            }
            readers.push(reader);
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

/// Answers the opening of a channel connection; `Ok((index, stream, bytes read, sealing
/// state))` if it is a channel of `primary`'s migration that is not bound yet.
fn admit(
    opening: Opening,
    primary: &ChannelHello,
    bound: &[bool],
) -> Result<(usize, Socket, u64, Option<Opener>), ChannelRefusal> {
    let Opening {
        mut reader,
        mut writer,
        admission,
        ..
    } = opening;
    let verdict = match admission {
        // Only without a key: with one, the admission answered it already.
        Admission::Refuse(reason) => Err(ChannelRefusal::Auth(reason)),
        Admission::Frame(Ok(Frame::Control(Message::ChannelHello(c)))) => {
            check_channel(&c, primary, bound)
        }
        Admission::Frame(Ok(Frame::Control(Message::Hello(_)))) => {
            Err(ChannelRefusal::NotAChannel(format!(
                "a hello, but migration {} is in progress here",
                id_hex(&primary.migration_id)
            )))
        }
        Admission::Frame(Ok(Frame::Control(m))) => Err(ChannelRefusal::NotAChannel(format!(
            "got a {} message",
            m.frame_type().name()
        ))),
        Admission::Frame(Ok(Frame::Packet(_))) => {
            Err(ChannelRefusal::NotAChannel("got a packet".into()))
        }
        Admission::Frame(Err(e)) => Err(ChannelRefusal::NotAChannel(e.to_string())),
    };
    let reply = match &verdict {
        Ok(_) => HelloReply {
            refuse: RefuseCode::None,
            receiver_workers: 0,
            resumes: false,
            reason: String::new(),
        },
        Err(r) => HelloReply {
            refuse: match r {
                ChannelRefusal::Auth(_) => RefuseCode::Auth,
                _ => RefuseCode::Channel,
            },
            receiver_workers: 0,
            resumes: false,
            reason: r.to_string(),
        },
    };
    let sent = writer.write_message(&Message::HelloReply(reply));
    let i = verdict?;
    sent.map_err(|e| ChannelRefusal::NotAChannel(format!("answering the channel hello: {e}")))?;
    let stream = reader
        .get_ref()
        .try_clone()
        .map_err(|e| ChannelRefusal::NotAChannel(e.to_string()))?;
    Ok((i, stream, reader.bytes_read(), reader.take_opener()))
}

/// The next frame of `reader` if any bytes (or its end) arrived, without blocking
/// otherwise.
fn pending_frame(reader: &mut FrameReader<Socket>) -> Option<Result<Frame, TransportError>> {
    let s = reader.get_ref();
    s.set_nonblocking(true).ok()?;
    // Data, its end (Ok(0)) or a socket error: read_frame reports which.
    let arrived = match s.peek(&mut [0u8; 1]) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).ok()?;
    arrived.then(|| reader.read_frame())
}

type ChannelFrame = (usize, Result<Frame, TransportError>);

/// A channel's reader thread: forwards its frames until its final `RoundEnd`, an `Abort`
/// or an error, then returns the reader.
fn read_channel(
    index: usize,
    mut reader: FrameReader<Socket>,
    tx: SyncSender<ChannelFrame>,
) -> FrameReader<Socket> {
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

struct Multi {
    rx: Option<FrameQueue<ChannelFrame>>,
    threads: Vec<JoinHandle<FrameReader<Socket>>>,
    /// Clones of every channel's socket, to unblock readers on an early end.
    sockets: Vec<Socket>,
}

/// The frames of a migration's rounds from all its channels, in arrival order per
/// channel, with the [`RoundBarrier`]. With one channel it reads channel 0 directly; with
/// more, one thread per channel reads into a bounded queue. Dropping it stops those
/// threads and gives channel 0's reader back (for the messages after the final round).
pub struct ChannelFrames<'a> {
    barrier: RoundBarrier,
    /// The final round passed the barrier: every reader ended by itself.
    completed: bool,
    reader0: &'a mut FrameReader<Socket>,
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
