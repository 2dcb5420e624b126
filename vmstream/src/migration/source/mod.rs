//! The source side: an explicit state machine over `SourceState`.
//!
//! ```text
//! Handshake --accepted--> Iterate(0) --policy: continue--> Iterate(n+1)
//!                            |  \--policy: cancel, or SendConfig::cancel set--> Done(Cancelled)
//!                            \--policy: switch over--> Switchover --> AwaitCommit
//! AwaitCommit --committed--> Committed (source guest ended, Handover sent) --> Done(Committed)
//! any error before the commit acknowledgement: guest resumed, Abort sent, Err returned
//! ```

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::converge::defer::HotPageDeferral;
use crate::converge::policy::{ConvergencePolicy, Decision, DowntimePolicy, RoundObservation};
use crate::converge::{Converger, Strategy};
use crate::guest::migratable::MigratableGuest;
use crate::migration::config::SendConfig;
use crate::migration::connect::channels::{ChannelRound, SourceChannels};
use crate::migration::digest::{hex, memory_digest, memory_digest_sparse};
use crate::migration::error::SendError;
use crate::migration::transport::{Frame, FrameReader};
use crate::migration::wire::{
    Abort, AbortCode, CommitStatus, Digest, GuestKind, GuestState, Handover, Hello, Message,
    RefuseCode, FEATURE_DELTA_PAGES, FEATURE_MEMORY_DIGEST, FRAME_HEADER_LEN, PAGE_SIZE,
    ROUND_FINAL, ROUND_FORCED,
};
use crate::telemetry::impact::{ImpactRecorder, REPORT_WAIT};
use crate::telemetry::progress::Progress;
use crate::telemetry::settings::PageCopies;
use crate::telemetry::stats::{unix_ns, CpuTime, MigrationStats, RoundStats};

mod report;
pub use report::{migrate, SendReport};

const PAGE: usize = PAGE_SIZE as usize;

/// Set (to anything), `vmstream send` exits with status 70 right after the destination's
/// commit reply, before ending its guest or sending `Handover`: a source that crashed at
/// the worst moment, for the fault tests.
pub const CRASH_AFTER_COMMIT_ENV: &str = "VMSTREAM_TEST_CRASH_AFTER_COMMIT";

/// Why a migration cancelled through `SendConfig::cancel` ended.
const CANCELLED: &str = "on request (SIGINT or SIGTERM from the command line)";

/// Where the source is in the migration.
#[derive(Debug)]
enum SourceState {
    /// Send `Hello`, wait for `HelloReply`.
    Handshake,
    /// Send `pages` (all pages in round 0) with the guest running.
    Iterate { round: u64, pages: Vec<u64> },
    /// Pause, send the rest, the guest state and the digest.
    Switchover {
        round: u64,
        pending: Vec<u64>,
        forced: bool,
    },
    /// Wait for the destination's verdict.
    AwaitCommit { digest: [u8; 32], paused_at_ns: u64 },
    /// The destination committed; end our guest and learn when it resumed there.
    Committed { paused_at_ns: u64 },
    /// Finished.
    Done(Outcome),
}

/// How a migration that did not fail ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination committed the image.
    Committed,
    /// The policy cancelled (timeout); the source guest keeps running.
    Cancelled(String),
}

/// Where a round's pages are read from.
enum PageSource<'a> {
    /// The running guest's mapping (each page copied, racing writes are re-sent later).
    Live(&'a mut dyn MigratableGuest),
    /// The same, but pages whose bit is clear in the bitmap (holes of the memory file when
    /// dirty tracking started) are sent as zero without being read: a write to one after
    /// that instant is reported by the tracker and sent again.
    LiveSkippingHoles(&'a mut dyn MigratableGuest, &'a [u64]),
    /// Memory of the paused guest.
    Frozen(&'a [u8]),
}

/// The machinery a round needs: the channels (encoders and writers; control messages go
/// on channel 0) and channel 0's reader.
struct RoundIo {
    channels: SourceChannels,
    reader: FrameReader<TcpStream>,
    progress: Progress,
    /// `SendConfig::cancel`.
    cancel: Option<Arc<AtomicBool>>,
    /// The round trip to the destination, at most: the shortest exchange seen (the
    /// handshake, or a round from its first page to its acknowledgement).
    round_trip: Duration,
}

/// A round whose pages and `RoundEnd` are queued and whose acknowledgement is awaited.
struct RoundInFlight {
    round: u64,
    flags: u32,
    pages: u64,
    started: Instant,
    sent: ChannelRound,
}

impl RoundIo {
    /// Sends one round and waits for its acknowledgement.
    fn send_round(
        &mut self,
        round: u64,
        pages: &[u64],
        src: PageSource<'_>,
        flags: u32,
    ) -> Result<RoundStats, SendError> {
        let r = self.send_pages(round, pages, src, flags)?;
        self.await_ack(r)
    }

    /// Queues a round's pages and then its `RoundEnd` on every channel.
    fn send_pages(
        &mut self,
        round: u64,
        pages: &[u64],
        mut src: PageSource<'_>,
        flags: u32,
    ) -> Result<RoundInFlight, SendError> {
        let started = Instant::now();
        let last = flags & ROUND_FINAL != 0;
        self.progress.round(round, pages.len() as u64, last);
        let workers_read = self.channels.reads_pages();
        for (i, &p) in pages.iter().enumerate() {
            // The final round runs to its end: the guest is paused, and only the
            // destination's verdict may end the migration now.
            if i % 256 == 0 && !last {
                if self.cancelled() {
                    return Err(SendError::Cancelled);
                }
                if let PageSource::Live(g) | PageSource::LiveSkippingHoles(g, _) = &mut src {
                    g.check_alive().map_err(SendError::Guest)?;
                }
            }
            let at = p as usize * PAGE;
            // Live pages are read by the encode workers themselves, in parallel, when the
            // guest allows it; otherwise by this thread straight into the codec's batch.
            // Either way the one copy is the snapshot the encoder and the page cache see.
            // Holes of a sparse memory file are filled with zeros here, never read.
            let hole = match &src {
                PageSource::LiveSkippingHoles(_, data) => crate::memory::page_is_hole(data, p),
                _ => false,
            };
            match &mut src {
                PageSource::Live(g) | PageSource::LiveSkippingHoles(g, _)
                    if workers_read && !hole =>
                {
                    g.before_queue(p).map_err(SendError::Tracker)?;
                    self.channels.push_page(p)?
                }
                PageSource::Live(g) | PageSource::LiveSkippingHoles(g, _) => {
                    self.channels.push_with(p, |slot| {
                        if hole {
                            g.hole_page_for_send(p, slot)
                        } else {
                            g.read_page_for_send(p, slot)
                        }
                        .map_err(SendError::Tracker)
                    })?
                }
                PageSource::Frozen(m) => self.channels.push(p, &m[at..at + PAGE])?,
            }
            if i % 256 == 255 {
                self.progress.inc(256);
            }
        }
        // Every channel ends the round; the one acknowledgement covers them all.
        let sent = self.channels.end_round(round, flags)?;
        Ok(RoundInFlight {
            round,
            flags,
            pages: pages.len() as u64,
            started,
            sent,
        })
    }

    /// Reads the acknowledgement of `r` and checks it covers everything sent. The round's
    /// duration (from its first page to the acknowledgement) includes one round trip,
    /// which also bounds the round trip from above.
    fn await_ack(&mut self, r: RoundInFlight) -> Result<RoundStats, SendError> {
        let RoundInFlight {
            round,
            flags,
            pages,
            started,
            sent,
        } = r;
        let (codec, end) = (sent.codec, sent.total);
        let ack = match self.reader.read_frame()? {
            Frame::Control(Message::RoundAck(a)) if a.round == round => a,
            other => return Err(unexpected("a round acknowledgement", other)),
        };
        if ack.records != end.records || ack.packets != end.packets {
            return Err(SendError::Protocol(format!(
                "round {round}: destination applied {} records in {} packets, we sent {} in {}",
                ack.records, ack.packets, end.records, end.packets
            )));
        }
        let duration = started.elapsed().max(Duration::from_micros(1));
        self.round_trip = self.round_trip.min(duration);
        // From the last RoundEnd on the wire to its acknowledgement, less the destination's
        // barrier: one round trip plus any wait behind pages still being applied. (In the
        // final round the guest state and digest were flushed after the RoundEnd.)
        if let (Some(flushed), false) =
            (self.channels.message_flushed_at(), flags & ROUND_FINAL != 0)
        {
            let sample = flushed
                .elapsed()
                .saturating_sub(Duration::from_nanos(ack.barrier_ns));
            self.round_trip = self.round_trip.min(sample.max(Duration::from_micros(1)));
        }
        let wire =
            codec.packet_bytes + codec.packets * FRAME_HEADER_LEN as u64 + sent.end_frame_bytes;
        let mut rs = RoundStats {
            round,
            paused: flags & ROUND_FINAL != 0,
            dirty_pages: pages,
            wire_bytes: wire,
            duration_ms: duration.as_secs_f64() * 1e3,
            bandwidth_bytes_per_s: wire as f64 / duration.as_secs_f64(),
            ..Default::default()
        };
        rs.set_encodings(&codec);
        self.progress
            .message(format!("{:.0} MB/s", rs.bandwidth_bytes_per_s / 1e6));
        Ok(rs)
    }
}

impl RoundIo {
    /// Whether `SendConfig::cancel` was set.
    fn cancelled(&self) -> bool {
        crate::migration::interrupt::requested(self.cancel.as_ref())
    }
}

/// Maps an unexpected frame to an error; an `Abort` becomes [`SendError::PeerAborted`].
fn unexpected(wanted: &str, got: Frame) -> SendError {
    match got {
        Frame::Control(Message::Abort(a)) => SendError::PeerAborted {
            code: a.code,
            reason: a.reason,
        },
        Frame::Control(m) => SendError::Protocol(format!(
            "expected {wanted}, got a {} message",
            m.frame_type().name()
        )),
        Frame::Packet(_) => SendError::Protocol(format!("expected {wanted}, got a packet")),
    }
}

/// Merges two sorted page lists without duplicates.
pub fn merge_pages(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let next = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) if x < y => {
                i += 1;
                x
            }
            (Some(&x), Some(&y)) if y < x => {
                j += 1;
                y
            }
            (Some(&x), Some(_)) => {
                i += 1;
                j += 1;
                x
            }
            (Some(&x), None) => {
                i += 1;
                x
            }
            (None, Some(&y)) => {
                j += 1;
                y
            }
            (None, None) => unreachable!(),
        };
        if out.last() != Some(&next) {
            out.push(next);
        }
    }
    out
}

/// A migration in progress on the source.
struct Source<'a> {
    cfg: &'a SendConfig,
    guest: &'a mut dyn MigratableGuest,
    io: RoundIo,
    policy: Box<dyn ConvergencePolicy>,
    stats: &'a mut MigrationStats,
    start: Instant,
    /// Expected wire bytes per non-zero page (refined after every round).
    bytes_per_page: f64,
    /// Instant and transaction count when the migration started.
    tx_start: (Instant, u64),
    /// Throttle the policy asked for last (f64 bits), set by its decision hook.
    throttle_request: Arc<AtomicU64>,
    /// Throttle currently applied to the guest.
    throttle_now: f64,
    /// When the final round was acknowledged (the commit wait starts).
    switch_start: Option<Instant>,
    /// Hot-page deferral, if enabled.
    deferral: Option<HotPageDeferral>,
    /// Data pages of the memory file when tracking started (None: read every page).
    round0_data: Option<Vec<u64>>,
    /// The guest-impact timeline.
    impact: ImpactRecorder,
    /// How long the dirty-log collection that produced the next round's pages took.
    collect_time: Duration,
    /// Transfer bandwidth, bytes per second (see `update_bandwidth`).
    bandwidth: Option<f64>,
    /// The destination said it resumes the guest (`HelloReply`).
    destination_resumes: bool,
}

impl Source<'_> {
    fn hello(&self) -> Hello {
        let delta = self.cfg.encoder.delta.is_some();
        Hello {
            guest_kind: self.guest.kind(),
            page_size: PAGE_SIZE,
            guest_size: self.guest.size(),
            features: FEATURE_MEMORY_DIGEST | if delta { FEATURE_DELTA_PAGES } else { 0 },
            compression: self.cfg.encoder.compression,
            delta: self.cfg.delta_wire(),
            codec_version: Hello::CODEC_VERSION,
            sender_workers: self.cfg.threads as u32,
            cache_bytes: self.cfg.encoder.delta.map_or(0, |d| d.cache_bytes as u64),
            batch_pages: self.cfg.batch_pages as u32,
        }
    }

    /// Tells the destination the migration is cancelled (it rolls back); the guest keeps
    /// running.
    fn cancel(&mut self, reason: &str) -> Result<Outcome, SendError> {
        self.io
            .channels
            .abort(AbortCode::Cancelled, reason.into())?;
        Ok(Outcome::Cancelled(reason.into()))
    }

    fn run(&mut self) -> Result<Outcome, SendError> {
        let mut state = SourceState::Handshake;
        let mut late_signal_noted = false;
        loop {
            let before_pause = matches!(
                state,
                SourceState::Handshake
                    | SourceState::Iterate { .. }
                    | SourceState::Switchover { .. }
            );
            if self.io.cancelled() {
                if before_pause {
                    return self.cancel(CANCELLED);
                }
                if !late_signal_noted {
                    eprintln!(
                        "vmstream send: note: SIGINT/SIGTERM after the guest was paused for the \
                         switchover: the migration finishes (its last pages are on the way)"
                    );
                    late_signal_noted = true;
                }
            }
            state = match state {
                SourceState::Handshake => self.handshake()?,
                SourceState::Iterate { round, pages } => self.iterate(round, pages)?,
                SourceState::Switchover {
                    round,
                    pending,
                    forced,
                } => self.switchover(round, pending, forced)?,
                SourceState::AwaitCommit {
                    digest,
                    paused_at_ns,
                } => self.await_commit(digest, paused_at_ns)?,
                SourceState::Committed { paused_at_ns } => self.committed(paused_at_ns),
                SourceState::Done(outcome) => return Ok(outcome),
            };
        }
    }

    fn handshake(&mut self) -> Result<SourceState, SendError> {
        let asked = Instant::now();
        self.io.channels.send_hello(self.hello())?;
        match self.io.reader.read_frame()? {
            Frame::Control(Message::HelloReply(r)) if r.refuse == RefuseCode::None => {
                self.io.round_trip = asked.elapsed();
                self.destination_resumes = r.resumes;
                self.warn_if_out_of_reach();
                self.stats.settings.receiver_workers = Some(r.receiver_workers as usize);
                self.io.channels.await_bound()?;
            }
            Frame::Control(Message::HelloReply(r)) => {
                return Err(SendError::Refused {
                    code: r.refuse,
                    reason: r.reason,
                })
            }
            other => return Err(unexpected("a hello reply", other)),
        }
        // Round 0 sends everything; collecting now starts tracking from this instant.
        let t = Instant::now();
        self.guest.collect_dirty().map_err(SendError::Tracker)?;
        self.collect_time = t.elapsed();
        // After the tracker's reset: a hole written from now on is reported dirty.
        self.round0_data = self.guest.memory().data_pages().ok();
        self.tx_start = (Instant::now(), self.guest.tx_count());
        Ok(SourceState::Iterate {
            round: 0,
            pages: (0..self.guest.size() / PAGE as u64).collect(),
        })
    }

    /// The last pages reach the destination half a round trip after the pause at best, and a
    /// destination that resumes the guest waits one more for our `Handover`: a downtime
    /// limit below that cannot be met, and the user should know before waiting.
    fn warn_if_out_of_reach(&mut self) {
        let rtt = self.io.round_trip;
        self.stats.settings.handshake_round_trip_ms = Some(rtt.as_secs_f64() * 1e3);
        let floor = if self.destination_resumes {
            rtt / 2 + rtt
        } else {
            rtt / 2
        };
        if floor >= self.cfg.downtime_limit {
            eprintln!(
                "vmstream send: warning: the round trip to the destination takes {:.0} ms, so \
                 no switchover can stay within the {:.0} ms downtime limit (it takes at least \
                 {:.0} ms{}); the migration iterates {} (raise --downtime-limit)",
                rtt.as_secs_f64() * 1e3,
                self.cfg.downtime_limit.as_secs_f64() * 1e3,
                floor.as_secs_f64() * 1e3,
                if self.destination_resumes {
                    ": half a round trip for the last pages, one more before the destination \
                     resumes the guest"
                } else {
                    ": half a round trip for the last pages"
                },
                if self.cfg.timeout.is_some() {
                    "until --timeout"
                } else {
                    "until a round finds nothing dirty, with no --timeout set"
                }
            );
        }
    }

    /// The transfer bandwidth after round `rs`: its wire bytes over its duration less the
    /// round trip spent waiting for its acknowledgement. A round made mostly of that wait
    /// says little about the link, and the estimate from an earlier round stands.
    fn update_bandwidth(&mut self, rs: &RoundStats) -> f64 {
        let duration = Duration::from_secs_f64(rs.duration_ms / 1e3);
        let rtt = self.io.round_trip;
        let transfer = duration.saturating_sub(rtt);
        if self.bandwidth.is_none() || transfer >= rtt {
            let secs = transfer.max(Duration::from_micros(1)).as_secs_f64();
            self.bandwidth = Some(rs.wire_bytes as f64 / secs);
        }
        self.bandwidth.unwrap_or(rs.bandwidth_bytes_per_s)
    }

    fn iterate(&mut self, round: u64, pages: Vec<u64>) -> Result<SourceState, SendError> {
        let src = match (round, &self.round0_data) {
            (0, Some(data)) => PageSource::LiveSkippingHoles(&mut *self.guest, data),
            _ => PageSource::Live(&mut *self.guest),
        };
        let mut rs = match self.io.send_round(round, &pages, src, 0) {
            Err(SendError::Cancelled) => {
                return self.cancel(CANCELLED).map(SourceState::Done);
            }
            other => other?,
        };
        if round == 0 {
            self.round0_data = None;
        }
        rs.dirty_log_ms = self.collect_time.as_secs_f64() * 1e3;
        rs.dirty_rearm_ms = self.guest.take_rearm_time().as_secs_f64() * 1e3;
        self.guest.check_alive().map_err(SendError::Guest)?;
        let t = Instant::now();
        let newly = self.guest.collect_dirty().map_err(SendError::Tracker)?;
        self.collect_time = t.elapsed();
        let dirtied = newly.len() as u64;
        // Everything unsent: the new dirty pages and what deferral still holds back.
        let pending = match &self.deferral {
            Some(d) => merge_pages(&newly, d.carried()),
            None => newly.clone(),
        };
        let nonzero = rs.records - rs.pages_by_encoding.zero;
        if nonzero > 0 {
            self.bytes_per_page = (rs.packet_bytes as f64 / nonzero as f64).min(PAGE as f64 + 16.0);
        }
        let secs = rs.duration_ms / 1e3;
        let obs = RoundObservation {
            round,
            elapsed: self.start.elapsed(),
            pending_pages: pending.len() as u64,
            bytes_per_page: self.bytes_per_page,
            bandwidth: self.update_bandwidth(&rs),
            round_trip: self.io.round_trip,
            destination_resumes: self.destination_resumes,
            dirty_rate: newly.len() as f64 / secs,
        };
        rs.dirty_pages_per_s = obs.dirty_rate;
        self.stats.settings.round_trip_ms = Some(obs.round_trip.as_secs_f64() * 1e3);
        rs.expected_downtime_ms = obs.expected_downtime().as_secs_f64() * 1e3;
        let decision = self.policy.decide(&obs);
        let throttle = f64::from_bits(self.throttle_request.load(Ordering::Relaxed));
        if throttle != self.throttle_now {
            self.guest.set_throttle(throttle);
            self.throttle_now = throttle;
            self.impact.throttle(throttle);
        }
        rs.throttle = throttle;
        let state = match decision {
            Decision::Continue => {
                let pages = match &mut self.deferral {
                    Some(d) => {
                        let split = d
                            .split(&newly)
                            .map_err(|e| SendError::Config(e.to_string()))?;
                        rs.deferred_pages = split.deferred.len() as u64;
                        split.send_now
                    }
                    None => newly,
                };
                SourceState::Iterate {
                    round: round + 1,
                    pages,
                }
            }
            Decision::Switchover { forced } => SourceState::Switchover {
                round: round + 1,
                pending: match &mut self.deferral {
                    Some(d) => d
                        .finish(&newly)
                        .map_err(|e| SendError::Config(e.to_string()))?,
                    None => newly,
                },
                forced,
            },
            Decision::Cancel => {
                let reason = format!(
                    "migration did not converge within {:?} (expected downtime {:.0} ms > limit {:?})",
                    self.cfg.timeout.unwrap_or_default(),
                    obs.expected_downtime().as_secs_f64() * 1e3,
                    self.cfg.downtime_limit
                );
                SourceState::Done(self.cancel(&reason)?)
            }
        };
        self.impact.round(&rs, dirtied);
        self.stats.per_round.push(rs);
        Ok(state)
    }

    fn switchover(
        &mut self,
        round: u64,
        pending: Vec<u64>,
        forced: bool,
    ) -> Result<SourceState, SendError> {
        let paused_at_ns = unix_ns(SystemTime::now());
        let tx_before_pause = self.guest.tx_count();
        let elapsed = self.tx_start.0.elapsed().as_secs_f64();
        if elapsed > 0.0 {
            self.stats.tps.during =
                Some(tx_before_pause.saturating_sub(self.tx_start.1) as f64 / elapsed);
        }
        let t = Instant::now();
        let state_blob = self.guest.pause().map_err(SendError::Guest)?;
        self.impact.pause();
        let t_collect = Instant::now();
        let more = self.guest.collect_dirty().map_err(SendError::Tracker)?;
        let collect_time = t_collect.elapsed();
        let pages = merge_pages(&pending, &more);
        let tx_at_pause = self.guest.tx_count();
        let ms = |t: Instant| Some(t.elapsed().as_secs_f64() * 1e3);
        self.stats.switchover_ms.pause_and_collect = ms(t);
        let flags = ROUND_FINAL | if forced { ROUND_FORCED } else { 0 };
        let io = &mut self.io;
        // The guest is stopped: the file's holes are exact, and hashing them as zero
        // without reading them saves allocating them.
        let data = self.guest.memory().data_pages().ok();
        let memory = self.guest.paused_memory();
        // The digest is taken while the last pages travel: memory no longer changes.
        let t = Instant::now();
        let (digest, in_flight) = std::thread::scope(|s| {
            let digest = s.spawn(|| {
                let t = Instant::now();
                let digest = match &data {
                    Some(d) => memory_digest_sparse(memory, PAGE, d),
                    None => memory_digest(memory, PAGE),
                };
                (digest, t.elapsed())
            });
            let sent = io.send_pages(round, &pages, PageSource::Frozen(memory), flags);
            (digest.join().expect("digest thread"), sent)
        });
        let (digest, digest_time) = digest;
        let in_flight = in_flight?;
        // The guest state and the digest follow the last pages at once, ahead of their
        // acknowledgement: the destination reads them after the final round whenever they
        // come, and the pause is shorter by a round trip. Only the commit reply decides.
        self.io
            .channels
            .send_message(&Message::GuestState(GuestState {
                guest_kind: self.guest.kind(),
                tx_count: tx_at_pause,
                blob: state_blob,
            }))?;
        self.io.channels.send_message(&Message::Digest(Digest {
            digest,
            guest_size: self.guest.size(),
            paused_at_unix_ns: paused_at_ns,
        }))?;
        let mut rs = self.io.await_ack(in_flight)?;
        rs.dirty_log_ms = collect_time.as_secs_f64() * 1e3;
        self.stats.switchover_ms.final_round_and_digest = ms(t);
        self.stats.switchover_ms.digest = Some(digest_time.as_secs_f64() * 1e3);
        self.switch_start = Some(Instant::now());
        self.impact.round(&rs, 0);
        self.stats.per_round.push(rs);
        self.stats.converged = !forced;
        self.stats.digest = Some(hex(&digest));
        Ok(SourceState::AwaitCommit {
            digest,
            paused_at_ns,
        })
    }

    fn await_commit(
        &mut self,
        digest: [u8; 32],
        paused_at_ns: u64,
    ) -> Result<SourceState, SendError> {
        let reply = match self.io.reader.read_frame()? {
            Frame::Control(Message::CommitReply(r)) => r,
            other => return Err(unexpected("the commit reply", other)),
        };
        if let Some(t) = self.switch_start {
            self.stats.switchover_ms.await_commit = Some(t.elapsed().as_secs_f64() * 1e3);
        }
        match reply.status {
            CommitStatus::Committed if reply.digest == digest => {
                Ok(SourceState::Committed { paused_at_ns })
            }
            CommitStatus::Committed => Err(SendError::Protocol(format!(
                "destination committed with digest {} but ours is {}",
                hex(&reply.digest),
                hex(&digest)
            ))),
            status => Err(SendError::CommitRefused {
                status,
                reason: reply.reason,
                their_digest: hex(&reply.digest),
            }),
        }
    }

    /// After the commit nothing may roll back: errors become warnings. The destination runs
    /// its copy only once told that ours ended (`Handover`): never two running copies.
    fn committed(&mut self, paused_at_ns: u64) -> SourceState {
        self.stats.total_time_ms = self.start.elapsed().as_secs_f64() * 1e3;
        if std::env::var_os(CRASH_AFTER_COMMIT_ENV).is_some() {
            eprintln!("vmstream send: {CRASH_AFTER_COMMIT_ENV} is set: exiting as if crashed");
            std::process::exit(70);
        }
        let handover = match self.guest.terminate() {
            Ok(()) => Message::Handover(Handover {
                ended_at_unix_ns: unix_ns(SystemTime::now()),
            }),
            Err(e) => {
                eprintln!(
                    "vmstream send: warning: ending the source guest: {e}; the destination \
                     keeps its committed copy stopped"
                );
                Message::Abort(Abort {
                    code: AbortCode::SourceError,
                    reason: format!("the source guest could not be ended: {e}"),
                })
            }
        };
        if let Err(e) = self.io.channels.send_message(&handover) {
            eprintln!("vmstream send: warning: telling the destination our guest ended: {e}");
        }
        match self.io.reader.read_frame() {
            Ok(Frame::Control(Message::Resumed(r))) => {
                self.stats.downtime_ms = Some(crate::telemetry::stats::ms_between(
                    paused_at_ns,
                    r.at_unix_ns,
                ));
                self.stats.peer_cpu_ms = Some(r.receiver_cpu_ns as f64 / 1e6);
                self.stats.settings.destination_running = Some(r.running);
                self.impact.resumed(paused_at_ns, r.at_unix_ns);
                if r.running {
                    self.destination_samples();
                }
            }
            Ok(Frame::Control(Message::Abort(a))) => eprintln!(
                "vmstream send: warning: the destination committed but could not resume: {}",
                a.reason
            ),
            Ok(_) => eprintln!("vmstream send: warning: unexpected message after the commit"),
            Err(e) => {
                eprintln!("vmstream send: warning: no resume report from the destination: {e}")
            }
        }
        SourceState::Done(Outcome::Committed)
    }

    /// Reads the resumed guest's samples the destination sends after `Resumed` (for the
    /// timeline and the TPS after the migration); a warning if they do not come.
    fn destination_samples(&mut self) {
        let _ = self.io.reader.get_ref().set_read_timeout(Some(REPORT_WAIT));
        match self.io.reader.read_frame() {
            Ok(Frame::Control(Message::GuestSamples(s))) => {
                self.impact.destination(&s);
                self.stats.tps.after = self.impact.destination_tps();
            }
            Ok(_) => eprintln!("vmstream send: warning: unexpected message after the resume"),
            Err(e) => {
                eprintln!("vmstream send: warning: no guest samples from the destination: {e}")
            }
        }
    }
}

/// How long hashing all of `memory` takes, extrapolated from hashing a 64 MiB sample of it:
/// the fastest of three runs (the first also starts the thread pool; a busy machine
/// makes single runs several times slower than the hash at the pause turns out).
fn digest_time_estimate(memory: &crate::memory::GuestMemory) -> Duration {
    let sample_len = memory.len().min(64 << 20);
    let mut sample = vec![0u8; sample_len];
    memory.read_at(0, &mut sample);
    let best = (0..3)
        .map(|_| {
            let t = Instant::now();
            let _ = memory_digest(&sample, PAGE);
            t.elapsed()
        })
        .min()
        .unwrap_or_default();
    let per_byte = best.as_secs_f64() / sample_len.max(1) as f64;
    Duration::from_secs_f64(per_byte * memory.len() as f64)
}

/// The share of the downtime limit the last pages may take: what the switchover digest
/// (`overhead`) leaves, but at least a tenth of the limit. Iterating cannot shorten the digest,
/// so when it takes (nearly) the whole limit, waiting for an empty dirty set only spins
/// through tiny rounds (2,302 were seen): the migration switches over once the pages are
/// negligible instead.
fn page_budget(limit: Duration, overhead: Duration) -> Duration {
    limit.saturating_sub(overhead).max(limit / 10)
}

/// Migrates `guest` to `cfg.to`, filling `stats` ([`migrate`] makes and finishes them); on
/// error before the commit the guest is resumed (if it was paused) and an `Abort` is sent
/// when the connection still works.
fn run_migration(
    cfg: &SendConfig,
    guest: &mut dyn MigratableGuest,
    stats: &mut MigrationStats,
) -> Result<Outcome, SendError> {
    let start = Instant::now();
    // Library callers too (the CLI checked before starting the guest).
    cfg.check().map_err(SendError::Config)?;
    if crate::migration::interrupt::requested(cfg.cancel.as_ref()) {
        return Ok(Outcome::Cancelled(CANCELLED.into()));
    }
    let (channels, reader) =
        SourceChannels::open(cfg, guest.size() / PAGE as u64, guest.page_reader())?;
    stats.settings.page_copies = Some(if channels.reads_pages() {
        PageCopies::EncodeWorkers
    } else {
        PageCopies::SendingThread
    });
    if channels.count() > 1 {
        stats.settings.migration_id = Some(channels.migration_id());
    }
    // The switchover also hashes all of memory (both sides in parallel): that time is
    // part of the downtime whatever the dirty pages, so the pages get what is left.
    let overhead = digest_time_estimate(guest.memory());
    stats.settings.switchover_digest_estimate_ms = Some(overhead.as_secs_f64() * 1e3);
    let downtime = DowntimePolicy {
        limit: page_budget(cfg.downtime_limit, overhead),
        timeout: cfg.timeout,
        on_timeout: cfg.on_timeout,
    };
    let throttle_request = Arc::new(AtomicU64::new(0f64.to_bits()));
    // The sampler reads the file-backed workload's superblock; a KVM guest keeps its
    // counters elsewhere (its timeline has rounds and throttle, no TPS samples yet).
    let memory_path = guest.memory().path().to_path_buf();
    let impact = ImpactRecorder::start(
        (guest.kind() == GuestKind::File).then_some(memory_path.as_path()),
        start,
    );
    let policy: Box<dyn ConvergencePolicy> = if cfg.converge.converge == Strategy::None {
        Box::new(downtime)
    } else {
        let strategy = cfg
            .converge
            .strategy()
            .map_err(|e| SendError::Config(e.to_string()))?;
        let request = Arc::clone(&throttle_request);
        let notes = impact.note_sink();
        Box::new(
            Converger::new(strategy, downtime, PAGE as u64).with_hook(move |o, d| {
                request.store(d.throttle.to_bits(), Ordering::Relaxed);
                if let Some(n) = &d.note {
                    notes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((o.now, n.clone()));
                }
            }),
        )
    };
    let deferral = cfg
        .converge
        .deferral(guest.size() / PAGE as u64)
        .map_err(|e| SendError::Config(e.to_string()))?;
    let mut source = Source {
        cfg,
        guest,
        io: RoundIo {
            channels,
            reader,
            progress: Progress::new(cfg.progress),
            cancel: cfg.cancel.clone(),
            round_trip: Duration::MAX,
        },
        policy,
        stats,
        start,
        bytes_per_page: PAGE as f64,
        tx_start: (start, 0),
        throttle_request,
        throttle_now: 0.0,
        switch_start: None,
        deferral,
        round0_data: None,
        impact,
        collect_time: Duration::ZERO,
        bandwidth: None,
        destination_resumes: false,
    };
    source.stats.settings.policy = Some(source.policy.name().into());
    let mut result = source.run();
    if let Err(SendError::Transport(_)) = &result {
        // A destination that gave up first says why before closing: prefer its reason.
        let _ = source
            .io
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(2)));
        loop {
            match source.io.reader.read_frame() {
                Ok(Frame::Control(Message::Abort(a))) => {
                    result = Err(SendError::PeerAborted {
                        code: a.code,
                        reason: a.reason,
                    });
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    source.io.progress.finish();
    source.stats.codec = source.io.channels.total_stats();
    if let Some(d) = &source.deferral {
        // Pages written again while deferred: each would have been sent twice.
        source.stats.settings.defer_hot_saved_bytes = Some(d.saved_bytes());
    }
    source.stats.timeline = Some(source.impact.finish());
    source.stats.rounds = source.stats.per_round.len() as u64;
    if let Err(e) = &result {
        if source.guest.is_paused() {
            if let Err(r) = source.guest.resume() {
                eprintln!("vmstream send: resuming the source guest failed: {r}");
            }
        }
        // Tell the destination why, if the connection still works (best effort).
        let _ = source
            .io
            .channels
            .abort(AbortCode::SourceError, e.to_string());
    }
    let _ = source.io.channels.finish();
    let bytes = source.io.channels.bytes_sent();
    source.stats.channel_bytes = source.io.channels.bytes_per_channel();
    stats.bytes_on_wire = bytes.max(stats.per_round.iter().map(|r| r.wire_bytes).sum());
    stats.cpu = CpuTime::now();
    if stats.total_time_ms == 0.0 {
        stats.total_time_ms = start.elapsed().as_secs_f64() * 1e3;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_keep_a_tenth_of_the_limit_whatever_the_digest_takes() {
        let ms = Duration::from_millis;
        assert_eq!(page_budget(ms(300), ms(100)), ms(200));
        assert_eq!(page_budget(ms(300), ms(285)), ms(30));
        assert_eq!(page_budget(ms(300), ms(900)), ms(30));
        assert_eq!(page_budget(ms(300), Duration::ZERO), ms(300));
    }

    #[test]
    fn merge_is_sorted_and_deduplicated() {
        assert_eq!(merge_pages(&[1, 3, 5], &[2, 3, 9]), vec![1, 2, 3, 5, 9]);
        assert_eq!(merge_pages(&[], &[4]), vec![4]);
        assert_eq!(merge_pages(&[4, 4], &[]), vec![4]);
    }
}
