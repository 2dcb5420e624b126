//! The source's state machine: its states and the transitions between them, the
//! handshake, and the iterating rounds, after each of which the source asks the
//! [`DowntimePolicy`] and applies its decision (throttle, deferral, switchover or cancel).
//!
//! ```text
//! Handshake --accepted--> Iterate(0) --policy: iterate--> Iterate(n+1)
//!                            |  \--policy: cancel, or SendConfig::cancel set--> Done(Cancelled)
//!                            \--policy: switch over--> Switchover --> AwaitCommit
//! AwaitCommit --committed--> Committed (source guest ended, Handover sent) --> Done(Committed)
//!   (an injected crash: Committed --> Done(CrashedAfterCommit), guest paused, no Handover)
//! any error before the commit acknowledgement: guest resumed, Abort sent, Err returned
//! ```

use std::time::{Duration, Instant};

use crate::converge::{switchover_latency, DowntimePolicy, RoundObservation, SwitchReason};
use crate::guest::migratable::MigratableGuest;
use crate::memory::PAGE_SIZE;
use crate::migration::config::{PostcopyMode, SendConfig};
use crate::migration::error::SendError;
use crate::migration::fault::MissedWriteAt;
use crate::migration::transport::Frame;
use crate::migration::wire::{
    AbortCode, Hello, MemoryRegions, Message, MirrorWrite, RefuseCode, FEATURE_DELTA_PAGES,
    FEATURE_DISKS, FEATURE_MEMORY_DIGEST, FEATURE_MEMORY_REGIONS, FEATURE_MIRROR, FEATURE_POSTCOPY,
    FEATURE_POSTCOPY_PREEMPT, FEATURE_VERIFY_BACKLOG,
};
use crate::telemetry::impact::ImpactRecorder;
use crate::telemetry::stats::{MigrationStats, RoundStats};

use super::round::{unexpected, PageOrigin, RoundIo};
use super::verify::Verification;
use super::{Outcome, CANCELLED};

/// Where the source is in the migration.
#[derive(Debug)]
pub(super) enum SourceState {
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
    /// Pause and switch to post-copy (`super::postcopy`): `pending` are known dirty.
    Postcopy { round: u64, pending: Vec<u64> },
    /// Wait for the destination's verdict.
    AwaitCommit { digest: [u8; 32], paused_at_ns: u64 },
    /// The destination committed; end our guest and learn when it resumed there.
    Committed { paused_at_ns: u64 },
    /// Finished.
    Done(Outcome),
}

/// A migration in progress on the source.
pub(super) struct Source<'a> {
    pub(super) cfg: &'a SendConfig,
    pub(super) guest: &'a mut dyn MigratableGuest,
    pub(super) io: RoundIo,
    pub(super) policy: DowntimePolicy,
    pub(super) stats: &'a mut MigrationStats,
    pub(super) start: Instant,
    /// Instant and transaction count when the migration started.
    pub(super) tx_start: (Instant, u64),
    /// When the final round was acknowledged (the commit wait starts).
    pub(super) switch_start: Option<Instant>,
    /// The guest-impact timeline.
    pub(super) impact: ImpactRecorder,
    /// Expected wire bytes per non-zero page (refined after every round).
    bytes_per_page: f64,
    /// Throttle currently applied to the guest.
    throttle: f64,
    /// Data pages of the memory file when tracking started (None: read every page).
    round0_data: Option<Vec<u64>>,
    /// How long the dirty-log collection that produced the next round's pages took.
    collect_time: Duration,
    /// Transfer bandwidth, bytes per second (see `update_bandwidth`).
    bandwidth: Option<f64>,
    /// The destination said it resumes the guest (`HelloReply`).
    destination_resumes: bool,
    /// Time and bytes behind the observations so far.
    clock: RoundClock,
    /// Incremental verification (`--verify` other than full).
    pub(super) verification: Option<Verification>,
    /// A page hidden from the tracker's collections (`SourceFaults::missed_write`).
    pub(super) hidden_page: Option<u64>,
    /// While the guest is paused before the commit reply: when it must resume at the
    /// latest, and the bound that set it (`SendConfig::pause_bound`).
    pub(super) pause_deadline: Option<(Instant, Duration)>,
    /// The round that sends all of memory (0, or later when the disks' time slice came
    /// first).
    pub(super) first_memory_round: u64,
}

impl<'a> Source<'a> {
    /// A migration of `guest` that started at `start`, before its handshake.
    pub(super) fn new(
        cfg: &'a SendConfig,
        guest: &'a mut dyn MigratableGuest,
        io: RoundIo,
        policy: DowntimePolicy,
        stats: &'a mut MigrationStats,
        start: Instant,
        impact: ImpactRecorder,
    ) -> Source<'a> {
        Source {
            cfg,
            guest,
            io,
            policy,
            stats,
            start,
            tx_start: (start, 0),
            switch_start: None,
            impact,
            bytes_per_page: PAGE_SIZE as f64,
            throttle: 0.0,
            round0_data: None,
            collect_time: Duration::ZERO,
            bandwidth: None,
            destination_resumes: false,
            clock: RoundClock::default(),
            verification: None,
            hidden_page: None,
            pause_deadline: None,
            first_memory_round: 0,
        }
    }

    fn hello(&self) -> Hello {
        let delta = self.cfg.encoder.delta.is_some();
        let postcopy = self.cfg.postcopy != PostcopyMode::Off;
        Hello {
            guest_kind: self.guest.kind(),
            page_size: PAGE_SIZE as u32,
            guest_size: self.guest.size(),
            features: FEATURE_MEMORY_DIGEST
                | if delta { FEATURE_DELTA_PAGES } else { 0 }
                | if postcopy { FEATURE_POSTCOPY } else { 0 }
                | if postcopy && self.cfg.postcopy_preempt && self.cfg.channels <= 1 {
                    FEATURE_POSTCOPY_PREEMPT
                } else {
                    0
                }
                | if self.io.disks.is_some() {
                    FEATURE_DISKS
                } else {
                    0
                }
                | if self.mirrors_disks() {
                    FEATURE_MIRROR
                } else {
                    0
                }
                | if self.guest.memory().regions().len() > 1 {
                    FEATURE_MEMORY_REGIONS
                } else {
                    0
                }
                | FEATURE_VERIFY_BACKLOG,
            compression: self.cfg.encoder.compression,
            delta: self.cfg.delta_wire(),
            codec_version: Hello::CODEC_VERSION,
            sender_workers: self.cfg.threads as u32,
            cache_bytes: self.io.channels.cache_bytes(),
            batch_pages: self.cfg.batch_pages as u32,
        }
    }

    /// Tells the destination the migration is cancelled (it rolls back); the guest keeps
    /// running.
    pub(super) fn cancel_now(&mut self, reason: &str) -> Result<Outcome, SendError> {
        self.cancel(reason)
    }

    /// Tells the destination the migration is cancelled (it rolls back); the guest keeps
    /// running.
    fn cancel(&mut self, reason: &str) -> Result<Outcome, SendError> {
        self.io
            .channels
            .abort(AbortCode::Cancelled, reason.into())?;
        Ok(Outcome::Cancelled(reason.into()))
    }

    pub(super) fn run(&mut self) -> Result<Outcome, SendError> {
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
                    self.cfg.notices.note(
                        "SIGINT/SIGTERM after the guest was paused for the switchover: the \
                         migration finishes (its last pages are on the way)",
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
                } => self
                    .switchover(round, pending, forced)
                    .map_err(|e| self.past_pause_bound(e))?,
                SourceState::Postcopy { round, pending } => self
                    .postcopy(round, pending)
                    .map_err(|e| self.past_pause_bound(e))?,
                SourceState::AwaitCommit {
                    digest,
                    paused_at_ns,
                } => self
                    .await_commit(digest, paused_at_ns)
                    .map_err(|e| self.past_pause_bound(e))?,
                SourceState::Committed { paused_at_ns } => self.committed(paused_at_ns)?,
                SourceState::Done(outcome) => return Ok(outcome),
            };
        }
    }

    fn handshake(&mut self) -> Result<SourceState, SendError> {
        let asked = Instant::now();
        self.io.channels.send_hello(self.hello())?;
        let regions = self.guest.memory().regions();
        if regions.len() > 1 {
            let sizes = regions.into_iter().map(|(_, size)| size).collect();
            self.io
                .channels
                .send_message(&Message::MemoryRegions(MemoryRegions { sizes }))?;
        }
        if let Some(d) = &self.io.disks {
            self.io
                .channels
                .send_message(&Message::Disks(d.message()))?;
            if self.mirrors_disks() {
                // The mirror's connection will name this migration.
                let id = self.io.channels.migration_id_bytes();
                self.io
                    .channels
                    .send_message(&Message::MirrorWrite(MirrorWrite::open(id)))?;
            }
        }
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
        // Time slices: the disks' bulk copy (and their dirty rounds while they shrink) come
        // first, memory is not iterated meanwhile (its round 0 follows and sends it all).
        if let Some(done) = self.disk_slices()? {
            return Ok(SourceState::Done(done));
        }
        // Round 0 sends everything; collecting now starts tracking from this instant.
        (_, self.collect_time) = self.collect_dirty(false)?;
        // After the tracker's reset: a hole written from now on is reported dirty, if the
        // tracker sees such writes (otherwise every page is read).
        if self.guest.tracker().reports_writes_to_holes() {
            self.round0_data = self.guest.memory().data_pages().ok();
        }
        self.tx_start = (Instant::now(), self.guest.tx_count());
        Ok(SourceState::Iterate {
            round: self.first_memory_round,
            pages: (0..self.guest.size() / PAGE_SIZE as u64).collect(),
        })
    }

    /// The last pages reach the destination half a round trip after the pause at best, and a
    /// destination that resumes the guest waits one more for our `Handover`: a downtime
    /// limit below that cannot be met, and the user should know before waiting.
    fn warn_if_out_of_reach(&mut self) {
        let rtt = self.io.round_trip;
        self.stats.settings.handshake_round_trip_ms = Some(rtt.as_secs_f64() * 1e3);
        let floor = switchover_latency(rtt, self.destination_resumes);
        if floor >= self.cfg.downtime_limit {
            self.cfg.notices.warning(format!(
                "the round trip to the destination takes {:.0} ms, so \
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
            ));
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
        let memory_round0 = round == self.first_memory_round;
        let src = match (memory_round0, &self.round0_data) {
            (true, Some(data)) => PageOrigin::LiveSkippingHoles(&mut *self.guest, data),
            _ => PageOrigin::Live(&mut *self.guest),
        };
        let mut rs = match self.io.send_round(round, &pages, src, 0) {
            Err(SendError::Cancelled) => {
                return self.cancel(CANCELLED).map(SourceState::Done);
            }
            other => other?,
        };
        if memory_round0 {
            self.round0_data = None;
            self.round0_done()?;
        }
        self.start_mirror_if_due()?;
        rs.dirty_log_ms = self.collect_time.as_secs_f64() * 1e3;
        rs.dirty_rearm_ms = self.guest.tracker().take_rearm_time().as_secs_f64() * 1e3;
        self.guest.check_alive().map_err(SendError::Guest)?;
        let (newly, collect_time) = self.collect_dirty(false)?;
        self.collect_time = collect_time;
        let disk_pending = match self.io.disks.as_mut() {
            Some(d) => d.collect(false)?,
            None => 0,
        };
        let dirtied = newly.len() as u64;
        rs.dirty_pages_per_s = dirtied as f64 / (rs.duration_ms / 1e3);
        self.disk_qos(&rs);
        if self.cfg.postcopy == PostcopyMode::Now {
            self.impact.round(&rs, dirtied);
            self.stats.per_round.push(rs);
            return Ok(SourceState::Postcopy {
                round: round + 1,
                pending: newly,
            });
        }
        let round_trip = self.io.round_trip;
        self.stats.settings.round_trip_ms = Some(round_trip.as_secs_f64() * 1e3);
        // The pause starts with a collect of what the guest wrote since this one, and costs
        // about as much: the hash tracker reads all of memory again, whatever was written.
        // A destination verifying the workload checks at the pause what its background
        // verifier has not checked yet.
        let dest_verify =
            Duration::from_secs_f64(rs.destination_verify_backlog_ms.unwrap_or(0.0) / 1e3);
        let latency = switchover_latency(round_trip, self.destination_resumes)
            .saturating_add(collect_time)
            .saturating_add(dest_verify);
        // Everything unsent: the new dirty pages and what deferral still holds back.
        // (with the disks' pending pages: the switchover sends them too)
        let unsent = self.policy.unsent_pages(&newly) + disk_pending;
        let obs = self.observe(round, &rs, unsent, latency);
        // The whole pause expected: the pages, and the latency no bandwidth shortens.
        let expected_downtime = obs.expected_downtime().saturating_add(latency);
        rs.expected_downtime_ms = expected_downtime.as_secs_f64() * 1e3;
        // `--postcopy auto` owes every unsent page if it switches: a cancelling decision
        // lists none of them.
        let newly_kept = (self.cfg.postcopy == PostcopyMode::Auto).then(|| newly.clone());
        let decision = self
            .policy
            .decide(&obs, newly)
            .map_err(|e| SendError::Config(e.to_string()))?;
        // The previous round's, from its statistics.
        let dest_verify_before = self
            .stats
            .per_round
            .last()
            .and_then(|r| r.destination_verify_backlog_ms)
            .map(|ms| Duration::from_secs_f64(ms / 1e3));
        let held = match decision.switchover {
            Some(r) if r != SwitchReason::Forced && !decision.cancel => {
                self.switchover_held().or_else(|| {
                    let limit = self.cfg.downtime_limit;
                    verifier_catching_up(limit, expected_downtime, dest_verify, dest_verify_before)
                        .then_some("the destination's verifier is catching up")
                })
            }
            _ => None,
        };
        if let Some(note) = decision.note {
            let note = match held {
                Some(why) => format!("{note}; held back one more round: {why}"),
                None => note,
            };
            self.impact.note(obs.now, note);
        }
        // `--postcopy auto`: post-copy instead of throttling the guest or giving up at the
        // timeout (a switchover within the limit stays pre-copy).
        let would_throttle = decision.throttle > 0.0 && self.throttle == 0.0;
        let gives_up = decision.cancel || decision.switchover == Some(SwitchReason::Forced);
        if self.cfg.postcopy == PostcopyMode::Auto && (would_throttle || gives_up) {
            self.impact.round(&rs, dirtied);
            self.stats.per_round.push(rs);
            let mut pending = newly_kept.unwrap_or_default();
            pending.extend(decision.pages.send_now);
            pending.extend(decision.pages.deferred);
            if let Some(d) = self.policy.deferral() {
                pending.extend_from_slice(d.carried());
            }
            pending.sort_unstable();
            pending.dedup();
            return Ok(SourceState::Postcopy {
                round: round + 1,
                pending,
            });
        }
        self.apply_throttle(decision.throttle);
        rs.throttle = decision.throttle;
        let state = match decision.switchover {
            _ if decision.cancel => {
                let reason = format!(
                    "migration did not converge within {:?} (expected downtime {:.0} ms > limit {:?})",
                    self.cfg.timeout.unwrap_or_default(),
                    expected_downtime.as_secs_f64() * 1e3,
                    self.cfg.downtime_limit
                );
                SourceState::Done(self.cancel(&reason)?)
            }
            None => {
                rs.deferred_pages = decision.pages.deferred.len() as u64;
                SourceState::Iterate {
                    round: round + 1,
                    pages: decision.pages.send_now,
                }
            }
            // Held back (the policy is asked again after the next round).
            Some(_) if held.is_some() => SourceState::Iterate {
                round: round + 1,
                pages: decision.pages.send_now,
            },
            Some(reason) => {
                self.stats.switchover_reason = Some(reason);
                SourceState::Switchover {
                    round: round + 1,
                    pending: decision.pages.send_now,
                    forced: reason == SwitchReason::Forced,
                }
            }
        };
        self.impact.round(&rs, dirtied);
        self.stats.per_round.push(rs);
        Ok(state)
    }

    /// Why a switchover the policy decided waits one more round, if it does: strict
    /// verification waits for the scrubber's pass, a disk mirror for its backlog to drain.
    fn switchover_held(&self) -> Option<&'static str> {
        if self
            .verification
            .as_ref()
            .is_some_and(|v| !v.may_switch_over())
        {
            Some("the scrubber's pass is not complete (--verify strict)")
        } else if self.mirror_draining() {
            Some("the disk mirror's backlog is draining")
        } else {
            None
        }
    }

    /// The pages the guest's tracker found dirty since its last collection, and how long
    /// collecting took; `last`: the collection at the pause. The tracker's list is sorted
    /// and without duplicates; a page beyond guest memory is refused here, before the codec
    /// sees it. With incremental verification, tracking errors the scrubber found are added.
    pub(super) fn collect_dirty(&mut self, last: bool) -> Result<(Vec<u64>, Duration), SendError> {
        let t = Instant::now();
        let mut pages = collect_within(&mut *self.guest)?;
        if let Some(h) = self.hidden_page {
            pages.retain(|&p| p != h);
        }
        if let Some(v) = &mut self.verification {
            v.after_collect(&mut pages, last)
                .map_err(SendError::TrackingError)?;
        }
        Ok((pages, t.elapsed()))
    }

    /// Round 0 is acknowledged: the scrubber starts; an injected missed write may happen.
    fn round0_done(&mut self) -> Result<(), SendError> {
        if let Some(v) = &mut self.verification {
            v.round0_done(self.guest.memory())
                .map_err(SendError::Tracker)?;
        }
        self.inject_missed_write(MissedWriteAt::AfterRound0)
    }

    /// Performs `SourceFaults::missed_write` if it is due `now`.
    pub(super) fn inject_missed_write(&mut self, now: MissedWriteAt) -> Result<(), SendError> {
        let Some(w) = self.cfg.faults.missed_write.filter(|w| w.at == now) else {
            return Ok(());
        };
        use std::os::unix::fs::FileExt;
        let at = w.page * PAGE_SIZE as u64;
        self.guest
            .memory()
            .file()
            .write_all_at(&w.contents(), at)
            .map_err(SendError::Tracker)?;
        self.hidden_page = Some(w.page);
        Ok(())
    }

    /// The observation of round `round`, measured in `rs`, after which `unsent` pages are
    /// still to send and a switchover would take `latency` more than the pages.
    fn observe(
        &mut self,
        round: u64,
        rs: &RoundStats,
        unsent: u64,
        latency: Duration,
    ) -> RoundObservation {
        let nonzero = rs.records - rs.pages_by_encoding.zero;
        if nonzero > 0 {
            self.bytes_per_page =
                (rs.packet_bytes as f64 / nonzero as f64).min(PAGE_SIZE as f64 + 16.0);
        }
        let now = self.start.elapsed();
        let bandwidth = self.update_bandwidth(rs);
        let remaining = unsent as f64 * self.bytes_per_page.max(0.0);
        RoundObservation {
            dirty_pages: unsent,
            dirty_bytes: unsent.saturating_mul(PAGE_SIZE as u64),
            remaining_dirty_bytes: if remaining.is_finite() {
                remaining as u64
            } else {
                u64::MAX
            },
            downtime_limit: self.policy.page_limit(latency),
            ..self
                .clock
                .observe(round, now, bandwidth, self.io.round_trip)
        }
    }

    /// Sets the guest's throttle to the decided `fraction` when it changed, and records it.
    fn apply_throttle(&mut self, fraction: f64) {
        if fraction != self.throttle {
            self.guest.set_throttle(fraction);
            self.throttle = fraction;
            self.impact.throttle(fraction);
        }
    }
}

/// Time and transfer since the migration started, as the rounds' observations see them:
/// each round lasts from the previous observation to its own, so the rounds tile the
/// migration's time.
#[derive(Debug, Default)]
struct RoundClock {
    /// When the previous observation was made, since the migration started.
    observed_at: Duration,
    /// Bytes sent in all observed rounds.
    bytes: f64,
    /// Seconds of all observed rounds.
    secs: f64,
}

impl RoundClock {
    /// The observation of round `round`, which ended at `now` having sent at `bandwidth`
    /// (bytes per second; non-finite or negative: nothing) all of its time but the
    /// `round_trip` it waited for its acknowledgement, which carried nothing. Its pages
    /// and the limit are the caller's to fill in (they are zero here).
    fn observe(
        &mut self,
        round: u64,
        now: Duration,
        bandwidth: f64,
        round_trip: Duration,
    ) -> RoundObservation {
        let duration = now.saturating_sub(self.observed_at);
        self.observed_at = now;
        let bw = if bandwidth.is_finite() && bandwidth > 0.0 {
            bandwidth
        } else {
            0.0
        };
        let bytes_sent = bw * duration.saturating_sub(round_trip).as_secs_f64();
        self.bytes += bytes_sent;
        self.secs += duration.as_secs_f64();
        RoundObservation {
            round,
            now,
            dirty_pages: 0,
            dirty_bytes: 0,
            bytes_sent: bytes_sent as u64,
            duration,
            bandwidth_bytes_per_s: bw,
            avg_bandwidth: if self.secs > 0.0 {
                self.bytes / self.secs
            } else {
                bw
            },
            remaining_dirty_bytes: 0,
            downtime_limit: Duration::ZERO,
        }
    }
}

/// The pages `guest`'s tracker found dirty since its last collection (sorted, without
/// duplicates); a page beyond guest memory is the tracker's error, refused before anything
/// uses it.
pub(super) fn collect_within(guest: &mut dyn MigratableGuest) -> Result<Vec<u64>, SendError> {
    let limit = guest.size() / PAGE_SIZE as u64;
    let tracker = guest.tracker();
    let pages = tracker.collect().map_err(SendError::Tracker)?;
    if pages.last().is_some_and(|&p| p >= limit) {
        return Err(SendError::Tracker(std::io::Error::other(format!(
            "{} tracker reported a page beyond the guest's {limit} pages",
            tracker.name()
        ))));
    }
    Ok(pages)
}

/// Whether a switchover waits for the destination's verifier: its backlog (`now`, and
/// `before` the previous round) puts the pause expected over `limit` and is still
/// shrinking. The policy takes a pause that pages cannot shorten as it is (nothing left to
/// send fits any target), but this part time shortens: a few rounds of a few ms each let
/// the verifier catch up. A backlog that stopped shrinking would not, and is taken.
fn verifier_catching_up(
    limit: Duration,
    expected: Duration,
    now: Duration,
    before: Option<Duration>,
) -> bool {
    expected > limit && !now.is_zero() && before.is_some_and(|b| now < b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switchover_waits_for_a_shrinking_verify_backlog_over_the_limit() {
        let ms = Duration::from_millis;
        let limit = ms(50);
        // Over the limit and shrinking: wait.
        assert!(verifier_catching_up(limit, ms(90), ms(70), Some(ms(80))));
        // Within the limit, not shrinking, no backlog, or no earlier one: switch.
        assert!(!verifier_catching_up(limit, ms(50), ms(30), Some(ms(80))));
        assert!(!verifier_catching_up(limit, ms(90), ms(70), Some(ms(70))));
        assert!(!verifier_catching_up(limit, ms(90), ms(0), Some(ms(10))));
        assert!(!verifier_catching_up(limit, ms(90), ms(70), None));
    }

    #[test]
    fn rounds_tile_the_time_and_send_at_the_bandwidth_but_for_the_round_trip() {
        let mut clock = RoundClock::default();
        let o = clock.observe(0, Duration::from_secs(2), 10e6, Duration::ZERO);
        assert_eq!(o.duration, Duration::from_secs(2));
        assert_eq!(o.bytes_sent, 20_000_000);
        assert_eq!(o.avg_bandwidth, 10e6);
        let o = clock.observe(1, Duration::from_secs(3), 20e6, Duration::from_millis(500));
        assert_eq!(o.duration, Duration::from_secs(1));
        assert_eq!(o.bytes_sent, 10_000_000);
        // 30 MB in 3 s.
        assert_eq!(o.avg_bandwidth, 10e6);
        let o = clock.observe(2, Duration::from_secs(4), f64::NAN, Duration::ZERO);
        assert_eq!((o.bandwidth_bytes_per_s, o.bytes_sent), (0.0, 0));
    }
}
