//! The end of a migration on the source: pause the guest, send the final round with the
//! guest state and the memory digest, await the destination's commit, then end our guest,
//! hand over, and collect the destination's resume report and samples.

use std::time::{Instant, SystemTime};

use crate::guest::file::source::GuestControlError;
use crate::memory::PAGE_SIZE;
use crate::migration::connect::channels::SourceChannels;
use crate::migration::digest::{audit_stats, hex, memory_digest, memory_digest_sparse};
use crate::migration::error::SendError;
use crate::migration::fault::MissedWriteAt;
use crate::migration::transport::{Frame, FrameReader, Socket};
use crate::migration::wire::{
    Abort, AbortCode, AuditStatus, CommitReply, CommitStatus, Digest, DigestSource, GuestKind,
    GuestSamples, GuestState, Handover, Message, Resumed, ROUND_FINAL, ROUND_FORCED,
};
use crate::telemetry::impact::REPORT_WAIT;
use crate::telemetry::notice::Notices;
use crate::telemetry::stats::unix_ns;
use crate::telemetry::stats::{ms_between, MigrationStats};
use crate::telemetry::verification::AuditStats;

use super::machine::{Source, SourceState};
use super::round::{unexpected, PageOrigin, RoundInFlight};
use super::verify::audit::audit;
use super::Outcome;
use crate::memory::merge_pages;

/// Pages per part of the pause's collect in parts (32 MiB): the first pages go after a
/// few ms of hashing, and each part's threads cost little.
const FINAL_PART_PAGES: u64 = 8192;

/// The final round's pages: queued while they were collected, or still to send.
enum FinalRound {
    Queued(Box<RoundInFlight>),
    Pages(Vec<u64>),
}

impl Source<'_> {
    pub(super) fn switchover(
        &mut self,
        round: u64,
        pending: Vec<u64>,
        forced: bool,
    ) -> Result<SourceState, SendError> {
        let tx_before_pause = self.guest.tx_count();
        let elapsed = self.tx_start.0.elapsed().as_secs_f64();
        if elapsed > 0.0 {
            self.stats.tps.during =
                Some(tx_before_pause.saturating_sub(self.tx_start.1) as f64 / elapsed);
        }
        // The scrubber stops before the pause: it must not take the pause's CPU, and the
        // collection at the pause settles what it found.
        let coverage = self.verification.as_mut().map(|v| v.stop_scrubber());
        let t = Instant::now();
        // From the pause on, no wait for the destination outlasts the pause bound.
        let bound = self.cfg.pause_bound(forced);
        self.pause_deadline = Some((t + bound, bound));
        self.io.hold_to(Some(t + bound));
        // The downtime starts here, as the guest stops: not before the scrubber's stop,
        // which waits for its chunk while the guest still runs.
        let paused_at_ns = unix_ns(SystemTime::now());
        let mut state_blob = self.guest.pause().map_err(SendError::Guest)?;
        self.cfg.faults.corrupt_guest_state(&mut state_blob);
        self.cfg.faults.pad_guest_state(&mut state_blob);
        self.impact.pause();
        self.inject_missed_write(MissedWriteAt::AtPause)?;
        let flags = ROUND_FINAL | if forced { ROUND_FORCED } else { 0 };
        let (final_round, collect_time) = match self.queue_final_in_parts(round, &pending, flags)? {
            Some((queued, collect_time)) => (FinalRound::Queued(Box::new(queued)), collect_time),
            None => {
                let (more, collect_time) = self.collect_dirty(true)?;
                // The disks' last granules, the guest stopped (the hash tracker reads all
                // of their data here; the bitmap adds the writes stopped before their mark).
                if let Some(d) = self.io.disks.as_mut() {
                    d.collect(true)?;
                }
                (
                    FinalRound::Pages(merge_pages(&pending, &more)),
                    collect_time,
                )
            }
        };
        let tx_at_pause = self.guest.tx_count();
        let ms = |t: Instant| Some(t.elapsed().as_secs_f64() * 1e3);
        self.stats.switchover_ms.pause_and_collect = ms(t);
        let io = &mut self.io;
        let t = Instant::now();
        let (verification, digest, digest_time, in_flight) = match (&self.verification, final_round)
        {
            // Queued while collected: the digest of what was sent, or of memory.
            (Some(v), FinalRound::Queued(queued)) => {
                let d = Instant::now();
                let digest = v.sent().hashes().digest();
                (DigestSource::SentPages, digest, d.elapsed(), Ok(*queued))
            }
            (None, FinalRound::Queued(queued)) => {
                let data = self.guest.memory().data_pages().ok();
                let (digest, time) = paused_digest(self.guest.paused_memory(), data.as_deref());
                (DigestSource::Memory, digest, time, Ok(*queued))
            }
            // The final round's pages are hashed as they are queued; the digest is then
            // that of what was sent, while the last pages travel.
            (Some(v), FinalRound::Pages(pages)) => {
                let memory = self.guest.paused_memory();
                let in_flight = io.send_pages(round, &pages, PageOrigin::Frozen(memory), flags);
                let d = Instant::now();
                let digest = v.sent().hashes().digest();
                (DigestSource::SentPages, digest, d.elapsed(), in_flight)
            }
            (None, FinalRound::Pages(pages)) => {
                // The guest is stopped: the file's holes are exact, and hashing them as
                // zero without reading them saves allocating them.
                let data = self.guest.memory().data_pages().ok();
                let memory = self.guest.paused_memory();
                // Taken while the last pages travel: memory no longer changes.
                let ((digest, digest_time), in_flight) = std::thread::scope(|s| {
                    let digest = s.spawn(|| paused_digest(memory, data.as_deref()));
                    let sent = io.send_pages(round, &pages, PageOrigin::Frozen(memory), flags);
                    (digest.join().expect("digest thread"), sent)
                });
                (DigestSource::Memory, digest, digest_time, in_flight)
            }
        };
        let in_flight = in_flight?;
        if let (Some(v), Some(stats)) = (&self.verification, &mut self.stats.verify) {
            stats.scrub_coverage = coverage;
            stats.pages_scrubbed = Some(v.pages_scrubbed());
            stats.tracking_errors = v.tracking_errors().len() as u64;
            stats.tracking_error_pages = v.tracking_errors().iter().take(1024).copied().collect();
        }
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
            verification,
            digest,
            guest_size: self.guest.size(),
            paused_at_unix_ns: paused_at_ns,
        }))?;
        // Each disk's digest of what was sent (its final granules are queued by now).
        if let Some(d) = self.io.disks.as_mut() {
            let mut digests = d.digests();
            if let Some(slot) = self
                .cfg
                .faults
                .corrupt_disk_digest
                .and_then(|i| digests.digests.get_mut(i))
            {
                slot[0] ^= 1;
            }
            self.io
                .channels
                .send_message(&Message::DiskDigests(digests))?;
        }
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

    /// The pause's collect in parts, when the guest's tracker offers it (the hash
    /// tracker, which reads all of memory here): each part's dirty pages, with the
    /// `pending` ones in its range, are queued for the final round as soon as the part is
    /// hashed, so the link carries them while the next part is read, and the pause is about
    /// the longer of collect and transfer rather than their sum. Then the scrubber's
    /// tracking errors and the disks' last granules, and the round's end. Returns the round
    /// in flight and the collect's time; None (nothing done) for other trackers.
    fn queue_final_in_parts(
        &mut self,
        round: u64,
        pending: &[u64],
        flags: u32,
    ) -> Result<Option<(RoundInFlight, std::time::Duration)>, SendError> {
        let t = Instant::now();
        let total = self.guest.size() / PAGE_SIZE as u64;
        let mut start = 0;
        let mut end = total.min(FINAL_PART_PAGES);
        let Some(mut part) = self.guest.tracker().collect_range(start..end) else {
            return Ok(None);
        };
        let started = self.io.begin_final(round, pending.len() as u64);
        let (mut queued, mut collected, mut next_pending) = (Vec::new(), Vec::new(), 0);
        loop {
            let mut more = part.map_err(SendError::Tracker)?;
            if more.iter().any(|p| !(start..end).contains(p)) {
                return Err(SendError::Tracker(std::io::Error::other(format!(
                    "{} tracker reported a page outside pages {start}..{end}",
                    self.guest.tracker().name()
                ))));
            }
            if let Some(h) = self.hidden_page {
                more.retain(|&p| p != h);
            }
            if let Some(v) = &self.verification {
                v.sent().mark_pending(&more);
                collected.extend_from_slice(&more);
            }
            let upto = next_pending + pending[next_pending..].partition_point(|&p| p < end);
            let pages = merge_pages(&pending[next_pending..upto], &more);
            next_pending = upto;
            self.io.push_frozen(&pages, self.guest.paused_memory())?;
            queued.extend_from_slice(&pages);
            if end == total {
                break;
            }
            (start, end) = (end, total.min(end + FINAL_PART_PAGES));
            part = self
                .guest
                .tracker()
                .collect_range(start..end)
                .unwrap_or_else(|| Err(std::io::Error::other("the collect in parts stopped")));
        }
        // Pending pages beyond memory (none: every list was checked against its size).
        let rest = &pending[next_pending..];
        self.io.push_frozen(rest, self.guest.paused_memory())?;
        queued.extend_from_slice(rest);
        // The scrubber's suspects, settled against the whole collection: its tracking
        // errors are sent too.
        if let Some(v) = &mut self.verification {
            v.settle_suspects(&mut collected, true)
                .map_err(SendError::TrackingError)?;
            let extra: Vec<u64> = collected
                .into_iter()
                .filter(|p| queued.binary_search(p).is_err())
                .collect();
            self.io.push_frozen(&extra, self.guest.paused_memory())?;
            queued.extend(extra);
        }
        let collect_time = t.elapsed();
        if let Some(d) = self.io.disks.as_mut() {
            d.collect(true)?;
        }
        let in_flight = self
            .io
            .end_final(round, flags, queued.len() as u64, started)?;
        Ok(Some((in_flight, collect_time)))
    }

    pub(super) fn await_commit(
        &mut self,
        digest: [u8; 32],
        paused_at_ns: u64,
    ) -> Result<SourceState, SendError> {
        let reply = self.read_commit_reply()?;
        if reply.digest != digest {
            return Err(SendError::Protocol(format!(
                "destination committed with digest {} but ours is {}",
                hex(&reply.digest),
                hex(&digest)
            )));
        }
        Ok(SourceState::Committed { paused_at_ns })
    }

    /// Reads the destination's commit reply and times the wait for it. The reply came within
    /// the pause bound: whatever follows is not held to it. A reply that did not commit is
    /// the refusal it names.
    pub(super) fn read_commit_reply(&mut self) -> Result<CommitReply, SendError> {
        let reply = match self.io.reader.read_frame()? {
            Frame::Control(Message::CommitReply(r)) => r,
            other => return Err(unexpected("the commit reply", other)),
        };
        self.pause_deadline = None;
        self.io.hold_to(None);
        if let Some(t) = self.switch_start {
            self.stats.switchover_ms.await_commit = Some(t.elapsed().as_secs_f64() * 1e3);
        }
        match reply.status {
            CommitStatus::Committed => Ok(reply),
            status => Err(SendError::CommitRefused {
                status,
                reason: reply.reason,
                their_digest: hex(&reply.digest),
            }),
        }
    }

    /// `e`, or [`SendError::PauseTimeout`] if it is a transport's failure once the pause
    /// bound passed (the bound cut the wait short, or the writer's failure followed it).
    pub(super) fn past_pause_bound(&self, e: SendError) -> SendError {
        match (self.pause_deadline, &e) {
            (Some((deadline, bound)), SendError::Transport(_) | SendError::Channel(_))
                if Instant::now() >= deadline =>
            {
                SendError::PauseTimeout(bound)
            }
            _ => e,
        }
    }

    /// After the commit nothing may roll back: errors become warnings. The destination runs
    /// its copy only once told that ours ended (`Handover`): never two running copies.
    /// A QEMU guest ends by moving its devices to the destination's QEMU (`QemuIncoming`
    /// names it); if that fails the VM runs on here, the destination's copy never runs,
    /// and the migration fails.
    pub(super) fn committed(&mut self, paused_at_ns: u64) -> Result<SourceState, SendError> {
        self.stats.total_time_ms = self.start.elapsed().as_secs_f64() * 1e3;
        if self.cfg.faults.crash_after_commit {
            // As if killed: nothing more is done, said or sent.
            return Ok(SourceState::Done(Outcome::CrashedAfterCommit));
        }
        let qemu = self.guest.kind() == GuestKind::Qemu;
        if qemu {
            match self.io.reader.read_frame() {
                Ok(Frame::Control(Message::QemuIncoming(q))) => {
                    self.guest.set_qemu_incoming(&q.uri)
                }
                Ok(other) => self
                    .cfg
                    .notices
                    .warning(unexpected("where the destination QEMU listens", other).to_string()),
                Err(e) => self.cfg.notices.warning(format!(
                    "no QEMU incoming address from the destination: {e}"
                )),
            }
        }
        let t = Instant::now();
        let ended = self.guest.terminate();
        self.stats.switchover_ms.end_guest = Some(t.elapsed().as_secs_f64() * 1e3);
        let devices_failed = match (&ended, qemu) {
            (Err(e), true) => Some(e.to_string()),
            _ => None,
        };
        let io = &mut self.io;
        let report =
            end_and_read_report(&mut io.channels, &mut io.reader, ended, &self.cfg.notices);
        let destination_resumed = report.is_some();
        if let Some((r, samples)) = report {
            record_resumed(self.stats, paused_at_ns, &r);
            self.impact.resumed(paused_at_ns, r.at_unix_ns);
            if let Some(s) = samples {
                self.impact.destination(&s.samples);
                self.stats.tps.after = self.impact.destination_tps();
            }
        }
        match (&devices_failed, destination_resumed) {
            (None, true) => {
                if let Err(e) = self.guest.after_handover() {
                    self.cfg
                        .notices
                        .warning(format!("after the destination's guest resumed: {e}"));
                }
            }
            // Without its report the destination's VM may not run: ours is not quit but
            // left stopped, for the operator.
            (None, false) if qemu => self.cfg.notices.warning(
                "the destination did not report its QEMU running; the source VM is left \
                 stopped (postmigrate), not quit",
            ),
            _ => {}
        }
        if let Some(e) = devices_failed {
            return Err(SendError::Guest(GuestControlError::Qemu(format!(
                "{e}; the source VM runs on, the destination's committed RAM is not used"
            ))));
        }
        self.audit();
        Ok(SourceState::Done(Outcome::Committed))
    }

    /// Incremental verification, after the commit: compares all of our memory as it was at
    /// the pause (the guest ended, its memory stays) with what was sent, and tells the
    /// destination. A mismatch cannot be undone: it is reported on both sides.
    fn audit(&mut self) {
        let Some(v) = &self.verification else {
            return;
        };
        let t = Instant::now();
        let data = self.guest.memory().data_pages().ok();
        let memory = self.guest.paused_memory();
        let result = audit(memory, data.as_deref(), v.sent());
        if result.status != AuditStatus::Match {
            self.cfg.notices.error(format!(
                "post-commit audit: {} of {} page(s) of the source's memory at the pause differ \
                 from what was sent (first: {:?}); the destination's guest holds stale copies",
                result.mismatched,
                result.pages_checked,
                &result.pages[..result.pages.len().min(8)]
            ));
        }
        if let Some(stats) = &mut self.stats.verify {
            stats.audit = Some(AuditStats {
                duration_ms: Some(t.elapsed().as_secs_f64() * 1e3),
                ..audit_stats(&result)
            });
        }
        if let Err(e) = self.io.channels.send_message(&Message::Audit(result)) {
            self.cfg
                .notices
                .warning(format!("could not send the audit to the destination: {e}"));
        }
    }
}

/// The digest of the paused guest's `memory` (`data`: its file's data pages, the holes
/// hashed as zeros unread), and how long it took.
fn paused_digest(memory: &[u8], data: Option<&[u64]>) -> ([u8; 32], std::time::Duration) {
    let t = Instant::now();
    let digest = match data {
        Some(d) => memory_digest_sparse(memory, PAGE_SIZE, d),
        None => memory_digest(memory, PAGE_SIZE),
    };
    (digest, t.elapsed())
}

/// After the commit, our guest ended (`ended`: how): tells the destination it may resume
/// (`Handover`; `Abort` if the guest could not be ended, and the destination keeps its copy
/// stopped), then reads its report: `Resumed` and, when a guest runs there, its samples
/// (waited for at most [`REPORT_WAIT`]). Errors are warnings: nothing rolls back.
pub(super) fn end_and_read_report(
    channels: &mut SourceChannels,
    reader: &mut FrameReader<Socket>,
    ended: Result<(), GuestControlError>,
    notices: &Notices,
) -> Option<(Resumed, Option<GuestSamples>)> {
    let handover = match ended {
        Ok(()) => Message::Handover(Handover {
            ended_at_unix_ns: unix_ns(SystemTime::now()),
        }),
        Err(e) => {
            notices.warning(format!(
                "ending the source guest: {e}; the destination keeps its committed copy stopped"
            ));
            Message::Abort(Abort {
                code: AbortCode::SourceError,
                reason: format!("the source guest could not be ended: {e}"),
            })
        }
    };
    if let Err(e) = channels.send_message(&handover) {
        notices.warning(format!("telling the destination our guest ended: {e}"));
    }
    let resumed = match reader.read_frame() {
        Ok(Frame::Control(Message::Resumed(r))) => r,
        Ok(Frame::Control(Message::Abort(a))) => {
            notices.warning(format!(
                "the destination committed but could not resume: {}",
                a.reason
            ));
            return None;
        }
        Ok(_) => {
            notices.warning("unexpected message after the commit");
            return None;
        }
        Err(e) => {
            notices.warning(format!("no resume report from the destination: {e}"));
            return None;
        }
    };
    if !resumed.running {
        return Some((resumed, None));
    }
    reader.set_timeout(Some(REPORT_WAIT));
    let samples = match reader.read_frame() {
        Ok(Frame::Control(Message::GuestSamples(s))) => Some(s),
        Ok(_) => {
            notices.warning("unexpected message after the resume");
            None
        }
        Err(e) => {
            notices.warning(format!("no guest samples from the destination: {e}"));
            None
        }
    };
    Some((resumed, samples))
}

/// Records the destination's `Resumed` report (`paused_at_ns`: our pause) in `stats`.
pub(super) fn record_resumed(stats: &mut MigrationStats, paused_at_ns: u64, r: &Resumed) {
    stats.downtime_ms = Some(ms_between(paused_at_ns, r.at_unix_ns));
    stats.peer_cpu_ms = Some(r.receiver_cpu_ns as f64 / 1e6);
    stats.settings.destination_running = Some(r.running);
}
