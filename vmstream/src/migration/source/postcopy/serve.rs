//! Serving the owed pages of a post-copy: a thread reads the destination's frames (page
//! requests, `Resumed`, `PostcopyComplete`, `GuestSamples`); this one answers every
//! request before it streams the next owed page, sends the digest of the memory at the
//! pause (hashed meanwhile) once every page went out, and stops at the destination's
//! verdict.

use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use crate::memory::PAGE_SIZE;
use crate::migration::connect::channels::SourceChannels;
use crate::migration::digest::{hex, memory_digest, memory_digest_sparse};
use crate::migration::error::SendError;
use crate::migration::transport::{Frame, Link, TokenBucket, TransportError};
use crate::migration::wire::{
    Digest, DigestSource, Message, PostcopyComplete, PostcopyPage, PostcopyStatus,
    FRAME_HEADER_LEN, PAGE_REQUESTED,
};
use crate::telemetry::impact::ImpactRecorder;
use crate::telemetry::impact::REPORT_WAIT;
use crate::telemetry::postcopy::PostcopyStats;
use crate::telemetry::stats::MigrationStats;

use super::order::StreamOrder;
use super::recover::{reconnect, Inbound};
use crate::migration::source::machine::Source;
use crate::migration::source::round::unexpected;
use crate::migration::source::switchover::record_resumed;

/// Where the serving loop is.
#[derive(Default)]
struct Served {
    pages_sent: u64,
    streamed: u64,
    requests: u64,
    digest_sent: bool,
    reconnects: u64,
    complete: Option<PostcopyComplete>,
}

impl Source<'_> {
    /// Serves `owed` (ascending) from the frozen memory until the destination reports the
    /// last page placed; `paused_at_ns`: the pause, for the downtime. A dropped link is
    /// reconnected for `--postcopy-recover-timeout` (`recover`).
    /// `preempt`: the requested pages' own connection (`FEATURE_POSTCOPY_PREEMPT`); if it
    /// fails they go on channel 0 from then on.
    pub(super) fn serve_postcopy(
        &mut self,
        owed: Vec<u64>,
        paused_at_ns: u64,
        mut preempt: Option<Link>,
    ) -> Result<(), SendError> {
        let pages = self.guest.size() / PAGE_SIZE as u64;
        let guest_size = self.guest.size();
        let data = self.guest.memory().data_pages().ok();
        let cfg = self.cfg;
        let memory: &[u8] = self.guest.paused_memory();
        let (stats, impact) = (&mut *self.stats, &mut self.impact);
        let io = &mut self.io;
        let channels = &mut io.channels;
        let mut reader = io
            .reader
            .hand_off(Some(cfg.io_timeout))
            .map_err(SendError::Socket)?;
        reader.set_timeout(Some(cfg.io_timeout));
        let mut inbound = Inbound::start(reader)?;
        let mut order = StreamOrder::new(pages, &owed);
        let mut bucket = cfg.postcopy_bandwidth.map(TokenBucket::new);
        let corrupt = cfg.faults.corrupt_postcopy_page;
        let mut cut_after = cfg.faults.drop_postcopy_link_after;
        let io_timeout = cfg.io_timeout;
        let mut served = Served::default();
        let mut samples = None;
        let mut digest: Option<[u8; 32]> = None;
        // The next streamed page and when the stream's bandwidth lets it go.
        let mut held: Option<(u64, Instant)> = None;
        let result = std::thread::scope(|s| -> Result<(), SendError> {
            let mut hashing = Some(s.spawn(|| match &data {
                Some(d) => memory_digest_sparse(memory, PAGE_SIZE, d),
                None => memory_digest(memory, PAGE_SIZE),
            }));
            loop {
                let step = (|| -> Result<bool, SendError> {
                    if cut_after.is_some_and(|n| served.pages_sent >= n) {
                        cut_after = None;
                        inbound.cut();
                    }
                    // Every request that came is answered before the next streamed page.
                    let frame = match inbound.frames.try_recv() {
                        Ok(f) => Some(f),
                        Err(TryRecvError::Empty) => None,
                        Err(TryRecvError::Disconnected) => {
                            return Err(SendError::Transport(TransportError::Closed))
                        }
                    };
                    let frame = match frame {
                        Some(f) => Some(f),
                        None => {
                            if held.is_none() {
                                if let Some(page) = order.next() {
                                    let now = Instant::now();
                                    let wait = bucket.as_mut().map_or(Duration::ZERO, |b| {
                                        b.take_at(PostcopyPage::LEN, now)
                                    });
                                    held = Some((page, now + wait));
                                }
                            }
                            if let Some((page, at)) = held {
                                let now = Instant::now();
                                if now >= at {
                                    held = None;
                                    send_page(channels, memory, page, 0, corrupt, &mut served)?;
                                    served.streamed += 1;
                                    return Ok(false);
                                }
                                // `--postcopy-bandwidth` holds the stream back, not the
                                // requests: one that comes meanwhile is answered at once.
                                match inbound.frames.recv_timeout(at - now) {
                                    Ok(f) => Some(f),
                                    Err(RecvTimeoutError::Timeout) => return Ok(false),
                                    Err(RecvTimeoutError::Disconnected) => {
                                        return Err(SendError::Transport(TransportError::Closed))
                                    }
                                }
                            } else {
                                if let Some(h) = hashing.take() {
                                    digest = Some(h.join().expect("digest thread"));
                                }
                                if let (Some(d), false) = (digest, served.digest_sent) {
                                    stats.digest = Some(hex(&d));
                                    channels.send_message(&Message::Digest(Digest {
                                        verification: DigestSource::Memory,
                                        digest: d,
                                        guest_size,
                                        paused_at_unix_ns: paused_at_ns,
                                    }))?;
                                    served.digest_sent = true;
                                    return Ok(false);
                                }
                                match inbound.frames.recv_timeout(io_timeout) {
                                    Ok(f) => Some(f),
                                    Err(RecvTimeoutError::Timeout) => {
                                        return Err(SendError::Transport(TransportError::Timeout(
                                            io_timeout,
                                        )))
                                    }
                                    Err(RecvTimeoutError::Disconnected) => {
                                        return Err(SendError::Transport(TransportError::Closed))
                                    }
                                }
                            }
                        }
                    };
                    let Some(frame) = frame else { return Ok(false) };
                    match on_frame(frame, &order, paused_at_ns, &mut served, stats, impact)? {
                        Some(page) => {
                            let frame =
                                page_frame(memory, page, PAGE_REQUESTED, corrupt, &mut served);
                            let fallback = match preempt.as_mut() {
                                None => Some(frame),
                                Some(link) => match link.send_frame(frame.clone()) {
                                    Ok(()) => None,
                                    Err(e) => {
                                        cfg.notices.warning(format!(
                                            "post-copy: the requested pages' connection \
                                             failed ({e}); they share the stream's from now on"
                                        ));
                                        preempt = None;
                                        Some(frame)
                                    }
                                },
                            };
                            if let Some(frame) = fallback {
                                channels.send_frame(frame)?;
                            }
                            order.requested(page);
                            served.requests += 1;
                            Ok(false)
                        }
                        None => Ok(served.complete.is_some()),
                    }
                })();
                match step {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) if is_link(&e) && !cfg.postcopy_recover_timeout.is_zero() => {
                        let why = e.to_string();
                        served.reconnects += 1;
                        let (fresh, still_owed) =
                            reconnect(cfg, channels, served.reconnects - 1, &why)?;
                        std::mem::replace(&mut inbound, fresh).stop();
                        order = StreamOrder::new(pages, &still_owed);
                        held = None;
                        // Whether the digest arrived is unknown: it is sent again.
                        served.digest_sent = false;
                    }
                    Err(e) if is_link(&e) => {
                        return Err(SendError::PostcopyLost(format!(
                            "the link to the destination: {e}"
                        )))
                    }
                    Err(e) => return Err(e),
                }
            }
            samples = match inbound.frames.recv_timeout(REPORT_WAIT) {
                Ok(Ok(Frame::Control(Message::GuestSamples(s)))) => Some(s),
                _ => None,
            };
            Ok(())
        });
        if let Some(reader) = inbound.stop() {
            self.io.reader = reader;
        }
        let complete = served.complete.take();
        if let Some(pc) = &mut self.stats.postcopy {
            pc.requests_served = served.requests;
            pc.reconnects = served.reconnects;
            if let Some(c) = &complete {
                *pc = PostcopyStats {
                    mode: std::mem::take(&mut pc.mode),
                    pages_owed: pc.pages_owed,
                    requests_served: served.requests,
                    reconnects: served.reconnects,
                    ..c.stats()
                };
            }
        }
        if let Some(s) = samples {
            self.impact.destination(&s.samples);
            self.stats.tps.after = self.impact.destination_tps();
        }
        result?;
        match complete {
            Some(c) if c.status == PostcopyStatus::Match => Ok(()),
            Some(c) => Err(SendError::PostcopyLost(format!(
                "every page landed but the destination's digest {} differs from ours at the \
                 pause",
                hex(&c.digest)
            ))),
            None => Err(lost("no verdict from the destination".into())),
        }
    }
}

/// Whether `e` is the link's failure (recoverable by reconnecting), not the peer's word.
fn is_link(e: &SendError) -> bool {
    matches!(
        e,
        SendError::Transport(_) | SendError::Socket(_) | SendError::Channel(_)
    )
}

/// Handles one frame from the destination; returns a requested page to send.
fn on_frame(
    frame: Result<Frame, TransportError>,
    order: &StreamOrder,
    paused_at_ns: u64,
    served: &mut Served,
    stats: &mut MigrationStats,
    impact: &mut ImpactRecorder,
) -> Result<Option<u64>, SendError> {
    match frame {
        Ok(Frame::Control(Message::PageRequest(r))) if order.is_owed(r.page) => Ok(Some(r.page)),
        Ok(Frame::Control(Message::PageRequest(r))) => Err(SendError::Protocol(format!(
            "the destination asked for page {}, which it was not owed",
            r.page
        ))),
        Ok(Frame::Control(Message::Resumed(r))) => {
            record_resumed(stats, paused_at_ns, &r);
            impact.resumed(paused_at_ns, r.at_unix_ns);
            Ok(None)
        }
        Ok(Frame::Control(Message::PostcopyComplete(c))) => {
            served.complete = Some(c);
            Ok(None)
        }
        Ok(Frame::Control(Message::Abort(a))) => {
            Err(lost(format!("the destination gave up: {}", a.reason)))
        }
        Ok(other) => Err(unexpected("a page request", other)),
        Err(e) => Err(SendError::Transport(e)),
    }
}

/// Sends page `page` of `memory` on channel 0; `corrupt`: the test fault's page count
/// ([`SourceFaults::corrupt_postcopy_page`](crate::migration::fault::SourceFaults)).
fn send_page(
    channels: &mut SourceChannels,
    memory: &[u8],
    page: u64,
    flags: u32,
    corrupt: Option<u64>,
    served: &mut Served,
) -> Result<(), SendError> {
    channels.send_frame(page_frame(memory, page, flags, corrupt, served))
}

/// The `PostcopyPage` frame of page `page` of `memory` (damaged after its check if it is
/// the `corrupt`-th page sent), counted sent.
fn page_frame(
    memory: &[u8],
    page: u64,
    flags: u32,
    corrupt: Option<u64>,
    served: &mut Served,
) -> Vec<u8> {
    let at = page as usize * PAGE_SIZE;
    let msg = Message::PostcopyPage(PostcopyPage {
        page,
        flags,
        data: memory[at..at + PAGE_SIZE].to_vec(),
    });
    let mut frame = msg.to_frame();
    if corrupt == Some(served.pages_sent) {
        // After the body's check was computed: the destination must refuse it.
        frame[FRAME_HEADER_LEN + 16 + 100] ^= 0x5a;
    }
    served.pages_sent += 1;
    frame
}

fn lost(why: String) -> SendError {
    SendError::PostcopyLost(why)
}
