//! The source of a same-host handover (`send --handover`, [`hand_over`]): no page is
//! copied. The guest's memory goes over the unix socket as a file descriptor while the
//! guest still runs, so the destination can check it in the background; rounds of the pages
//! the guest wrote meanwhile (the dirty tracker's lists, no contents) tell it what to check
//! again, until a round is short. Then the guest is paused, the last list and its state go,
//! and once the destination committed, the guest ends and this process drops every mapping
//! and descriptor of its memory before it lets the destination resume it. The pause thus
//! costs what the last round changed, not what the guest holds.
//!
//! ```text
//! Hello{HANDOVER} --accepted--> MemoryHandover (+ fd)
//!   { HandoverDirty{round r} --> HandoverAck{r} }*        the guest runs
//!   pause --> HandoverDirty{PAUSED}, GuestState
//!   --CommitReply{committed}--> guest ended and dropped --> Handover --> Resumed, GuestSamples
//! any error before the commit acknowledgement: guest resumed (and handed back), Abort sent
//! ```

use std::os::fd::OwnedFd;
use std::time::{Instant, SystemTime};

use crate::converge::SwitchReason;
use crate::guest::migratable::MigratableGuest;
use crate::memory::PAGE_SIZE;
use crate::migration::config::SendConfig;
use crate::migration::connect::channels::SourceChannels;
use crate::migration::digest::DIGEST_SKIPPED_HANDOVER;
use crate::migration::error::SendError;
use crate::migration::transport::{Frame, FrameReader, Socket};
use crate::migration::wire::{
    AbortCode, CommitStatus, GuestState, HandoverDirty, Hello, MemoryHandover, Message, RefuseCode,
    FEATURE_HANDOVER, FEATURE_MEMORY_DIGEST, HANDOVER_MORE, HANDOVER_PAUSED,
};
use crate::telemetry::stats::{
    unix_ns, CpuTime, MigrationOutcome, MigrationStats, Role, RoundStats,
};

use super::report::{settings, warm_up, SendReport};
use super::round::unexpected;
use super::switchover::{end_and_read_report, record_resumed};
use super::{Outcome, CANCELLED};
use crate::telemetry::impact::samples_tps;

/// What a handover returns: the report, and the guest when it is still ours (the handover
/// failed or was cancelled: it runs again here). After a commit the guest is gone.
pub struct HandoverReport {
    /// Statistics and outcome, as for a copying migration.
    pub report: SendReport,
    /// The guest, running again, unless the destination took it.
    pub guest: Option<Box<dyn MigratableGuest>>,
}

impl std::fmt::Debug for HandoverReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandoverReport")
            .field("report", &self.report)
            .field("guest_kept", &self.guest.is_some())
            .finish()
    }
}

/// Hands `guest` over to the destination at `cfg.to` (a unix socket) by its memory's file
/// descriptor. Before the destination's commit every failure resumes the guest and hands
/// it back; after it the guest has ended and nothing of its memory stays in this process.
pub fn hand_over(cfg: &SendConfig, mut guest: Box<dyn MigratableGuest>) -> HandoverReport {
    let mut stats = MigrationStats::new(Role::Source);
    stats.guest_bytes = guest.size();
    stats.settings = settings(cfg, guest.as_mut());
    stats.tps.before = warm_up(cfg, guest.as_ref());
    let start = Instant::now();
    let mut session = None;
    let result = run(cfg, guest.as_mut(), &mut stats, &mut session);
    if let Ok(HandedOver::Committed { .. }) = &result {
        stats.total_time_ms = start.elapsed().as_secs_f64() * 1e3;
    }
    let (guest, ended) = match &result {
        Ok(HandedOver::Committed { .. }) => {
            // The guest ends, and with it every mapping and descriptor of its memory (its
            // process's; here the sender's mapping, the tracker, a KVM guest's VM).
            (None, Some(guest.end_for_handover()))
        }
        _ => {
            if guest.is_paused() {
                if let Err(e) = guest.resume() {
                    cfg.notices
                        .error(format!("resuming the source guest failed: {e}"));
                }
            }
            (Some(guest), None)
        }
    };
    let result = match result {
        Ok(HandedOver::Committed { paused_at_ns }) => {
            // Only now, with nothing of the guest's memory left here, may it run there.
            let (channels, reader) = session.as_mut().expect("a committed handover connected");
            let ended = ended.expect("a committed handover ended its guest");
            if let Some((r, samples)) = end_and_read_report(channels, reader, ended, &cfg.notices) {
                record_resumed(&mut stats, paused_at_ns, &r);
                stats.tps.after = samples.and_then(|s| samples_tps(&s.samples));
            }
            Ok(Outcome::Committed)
        }
        Ok(HandedOver::Cancelled) => Ok(Outcome::Cancelled(CANCELLED.into())),
        Err(e) => {
            if let Some((channels, _)) = session.as_mut() {
                let _ = channels.abort(AbortCode::SourceError, e.to_string());
            }
            Err(e)
        }
    };
    if let Some((channels, _)) = session.as_mut() {
        let _ = channels.finish();
        stats.bytes_on_wire = channels.bytes_sent();
        stats.channel_bytes = channels.bytes_per_channel();
    }
    stats.cpu = CpuTime::now();
    if stats.total_time_ms == 0.0 {
        stats.total_time_ms = start.elapsed().as_secs_f64() * 1e3;
    }
    match &result {
        Ok(Outcome::Committed | Outcome::CrashedAfterCommit) => {
            stats.outcome = MigrationOutcome::Committed
        }
        Ok(Outcome::Cancelled(reason)) => {
            stats.outcome = MigrationOutcome::Cancelled;
            stats.error = Some(reason.clone());
        }
        Err(e) => {
            stats.outcome = MigrationOutcome::Failed;
            stats.error = Some(e.to_string());
        }
    }
    HandoverReport {
        report: SendReport { stats, result },
        guest,
    }
}

/// How the part of a handover that can still roll back ended.
enum HandedOver {
    /// The destination committed; the guest has ended and been dropped.
    Committed { paused_at_ns: u64 },
    /// Cancelled before the pause.
    Cancelled,
}

/// The connection of a handover: its channel (0 only) and the reader of its replies.
type Session = (SourceChannels, FrameReader<Socket>);

/// Connects, shakes hands, pauses `guest`, hands its memory and state over and waits for
/// the verdict (ending the guest after a commit is the caller's).
fn run(
    cfg: &SendConfig,
    guest: &mut dyn MigratableGuest,
    stats: &mut MigrationStats,
    session: &mut Option<Session>,
) -> Result<HandedOver, SendError> {
    cfg.check().map_err(SendError::Config)?;
    if crate::migration::interrupt::requested(cfg.cancel.as_ref()) {
        return Ok(HandedOver::Cancelled);
    }
    let pages = guest.size() / PAGE_SIZE as u64;
    let (channels, reader) = session.insert(SourceChannels::open(cfg, pages, None)?);
    let asked = Instant::now();
    channels.send_hello(Hello {
        features: FEATURE_MEMORY_DIGEST | FEATURE_HANDOVER,
        ..hello(cfg, guest)
    })?;
    match reader.read_frame()? {
        Frame::Control(Message::HelloReply(r)) if r.refuse == RefuseCode::None => {
            stats.settings.handshake_round_trip_ms = Some(asked.elapsed().as_secs_f64() * 1e3);
            stats.settings.receiver_workers = Some(r.receiver_workers as usize);
        }
        Frame::Control(Message::HelloReply(r)) => {
            return Err(SendError::Refused {
                code: r.refuse,
                reason: r.reason,
            })
        }
        other => return Err(unexpected("a hello reply", other)),
    }
    // Tracking restarts now: every write from here on is in some round's list, and the
    // destination reads every page after it has the descriptor.
    collect(guest)?;
    let fd: OwnedFd = guest
        .memory()
        .file()
        .try_clone()
        .map_err(SendError::Socket)?
        .into();
    channels.send_message_with_fd(
        &Message::MemoryHandover(MemoryHandover {
            guest_size: guest.size(),
        }),
        fd,
    )?;
    let mut round = 1u32;
    let mut previous = f64::INFINITY;
    let mut collected_at = Instant::now();
    let reason = loop {
        if crate::migration::interrupt::requested(cfg.cancel.as_ref()) {
            channels.abort(AbortCode::Cancelled, CANCELLED.into())?;
            return Ok(HandedOver::Cancelled);
        }
        let t = Instant::now();
        let (mut pages, collect_time) = collect(guest)?;
        let dirty = pages.len() as u64;
        if round == 1 && cfg.faults.handover_page_beyond {
            pages.push(guest.size() / PAGE_SIZE as u64);
        }
        // The guest's write rate over the time this round's list covers.
        let rate = dirty as f64 / collected_at.elapsed().as_secs_f64().max(1e-6);
        collected_at = Instant::now();
        let sent_before = channels.bytes_sent();
        send_dirty(channels, round, 0, 0, pages)?;
        match reader.read_frame()? {
            Frame::Control(Message::HandoverAck(a)) if a.round == round => {}
            Frame::Control(Message::CommitReply(r)) => {
                return Err(SendError::CommitRefused {
                    status: r.status,
                    reason: r.reason,
                    their_digest: DIGEST_SKIPPED_HANDOVER.into(),
                })
            }
            other => return Err(unexpected("the handover round's acknowledgement", other)),
        }
        stats.per_round.push(RoundStats {
            round: u64::from(round),
            dirty_pages: dirty,
            wire_bytes: channels.bytes_sent() - sent_before,
            duration_ms: t.elapsed().as_secs_f64() * 1e3,
            dirty_log_ms: collect_time.as_secs_f64() * 1e3,
            dirty_pages_per_s: rate,
            ..RoundStats::default()
        });
        round += 1;
        // What the pause would have to check now: the pages written while the destination
        // checked this round's (it read all of memory in the first).
        let expected = rate * collected_at.elapsed().as_secs_f64();
        if expected <= SHORT_ROUND_PAGES as f64 {
            break SwitchReason::TargetReached;
        }
        if expected >= previous {
            break SwitchReason::StoppedShrinking;
        }
        if round > MAX_LIVE_ROUNDS {
            break SwitchReason::Forced;
        }
        previous = expected;
    };
    stats.switchover_reason = Some(reason);
    let t = Instant::now();
    let paused_at_ns = unix_ns(SystemTime::now());
    let mut blob = guest.pause().map_err(SendError::Guest)?;
    cfg.faults.corrupt_guest_state(&mut blob);
    let tx_count = guest.tx_count();
    let (last, collect_time) = collect(guest)?;
    stats.switchover_ms.pause_and_collect = Some(t.elapsed().as_secs_f64() * 1e3);
    let t = Instant::now();
    stats.per_round.push(RoundStats {
        round: u64::from(round),
        paused: true,
        dirty_pages: last.len() as u64,
        dirty_log_ms: collect_time.as_secs_f64() * 1e3,
        ..RoundStats::default()
    });
    stats.rounds = u64::from(round);
    send_dirty(channels, round, HANDOVER_PAUSED, paused_at_ns, last)?;
    channels.send_message(&Message::GuestState(GuestState {
        guest_kind: guest.kind(),
        tx_count,
        blob,
    }))?;
    let reply = match reader.read_frame()? {
        Frame::Control(Message::CommitReply(r)) => r,
        other => return Err(unexpected("the commit reply", other)),
    };
    stats.switchover_ms.await_commit = Some(t.elapsed().as_secs_f64() * 1e3);
    if reply.status != CommitStatus::Committed {
        return Err(SendError::CommitRefused {
            status: reply.status,
            reason: reply.reason,
            their_digest: DIGEST_SKIPPED_HANDOVER.into(),
        });
    }
    stats.digest = Some(DIGEST_SKIPPED_HANDOVER.into());
    stats.converged = true;
    Ok(HandedOver::Committed { paused_at_ns })
}

/// The rounds end once the pause is expected to list this few pages: checking them again
/// at the pause costs a few milliseconds (a block read and hashed per page).
const SHORT_ROUND_PAGES: u64 = 256;

/// Live rounds at most before the pause, whatever they cost.
const MAX_LIVE_ROUNDS: u32 = 30;

/// The pages `guest` wrote since the previous call, and how long collecting took. Tracking
/// of each restarts here (no page is read for sending: a tracker that re-arms lazily is
/// re-armed page by page, and one that compares contents is shown the page as it is now).
fn collect(guest: &mut dyn MigratableGuest) -> Result<(Vec<u64>, std::time::Duration), SendError> {
    let t = Instant::now();
    let pages = super::machine::collect_within(guest)?;
    let contents = guest.tracker().needs_sent_pages();
    let mut page = vec![0u8; PAGE_SIZE];
    for &p in &pages {
        guest.tracker().before_read(p).map_err(SendError::Tracker)?;
        if contents {
            guest.memory().read_at(p as usize * PAGE_SIZE, &mut page);
            guest.tracker().page_sent(p, &page);
        }
    }
    Ok((pages, t.elapsed()))
}

/// Sends round `round`'s `pages` in as many `HandoverDirty` messages as they need, `flags`
/// on each ([`HANDOVER_MORE`] on all but the last); `paused_at_unix_ns`: the pause's
/// instant (with [`HANDOVER_PAUSED`]), or 0.
fn send_dirty(
    channels: &mut SourceChannels,
    round: u32,
    flags: u32,
    paused_at_unix_ns: u64,
    pages: Vec<u64>,
) -> Result<(), SendError> {
    let mut parts = pages.chunks(HandoverDirty::MAX_PAGES).peekable();
    if parts.peek().is_none() {
        return channels.send_message(&Message::HandoverDirty(HandoverDirty {
            round,
            flags,
            paused_at_unix_ns,
            pages: Vec::new(),
        }));
    }
    while let Some(part) = parts.next() {
        let more = if parts.peek().is_some() {
            HANDOVER_MORE
        } else {
            0
        };
        channels.send_message(&Message::HandoverDirty(HandoverDirty {
            round,
            flags: flags | more,
            paused_at_unix_ns,
            pages: part.to_vec(),
        }))?;
    }
    Ok(())
}

/// The handshake's `Hello` for `guest` (its features are the caller's).
fn hello(cfg: &SendConfig, guest: &dyn MigratableGuest) -> Hello {
    Hello {
        guest_kind: guest.kind(),
        page_size: PAGE_SIZE as u32,
        guest_size: guest.size(),
        features: 0,
        compression: cfg.encoder.compression,
        delta: crate::migration::wire::DeltaWire::Off,
        codec_version: Hello::CODEC_VERSION,
        sender_workers: cfg.threads as u32,
        cache_bytes: 0,
        batch_pages: cfg.batch_pages as u32,
    }
}
