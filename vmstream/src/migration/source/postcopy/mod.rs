//! The source of a post-copy migration (`send --postcopy`, `POSTCOPY.md`): instead of a
//! final round it pauses the guest, sends its state and the list of pages still owed, and
//! once the destination committed it ends its guest (keeping its memory) and lets the
//! destination resume it; then it serves the owed pages (`serve`: requested ones first,
//! the rest streamed in `order`) until the destination placed the last one and compared
//! the digest of the memory at the pause.
//!
//! ```text
//! Iterate --now: after round 0; auto: instead of throttling or at the timeout-->
//!   pause --> RoundEnd{FINAL|POSTCOPY}, GuestState, PostcopyOwed*, PostcopyStart
//!   --CommitReply{committed}--> guest ended (memory kept) --> Handover --> serve pages,
//!   Digest --PostcopyComplete--> GuestSamples --> Done(Committed)
//! ```

mod order;
mod recover;
mod serve;

use std::time::{Instant, SystemTime};

use crate::memory::merge_pages;
use crate::migration::error::SendError;
use crate::migration::wire::{
    Abort, AbortCode, GuestState, Handover, Message, PostcopyOwed, PostcopyStart, ROUND_FINAL,
    ROUND_POSTCOPY,
};
use crate::telemetry::postcopy::PostcopyStats;
use crate::telemetry::stats::unix_ns;

use super::machine::{Source, SourceState};
use super::round::PageOrigin;
use super::Outcome;

impl Source<'_> {
    /// Switches to post-copy: `pending` are the pages known dirty and not sent yet.
    pub(super) fn postcopy(
        &mut self,
        round: u64,
        pending: Vec<u64>,
    ) -> Result<SourceState, SendError> {
        let paused_at_ns = unix_ns(SystemTime::now());
        let elapsed = self.tx_start.0.elapsed().as_secs_f64();
        if elapsed > 0.0 {
            let tx = self.guest.tx_count().saturating_sub(self.tx_start.1);
            self.stats.tps.during = Some(tx as f64 / elapsed);
        }
        let t = Instant::now();
        let bound = self.cfg.pause_bound(false);
        self.pause_deadline = Some((t + bound, bound));
        self.io.hold_to(Some(t + bound));
        let mut state_blob = self.guest.pause().map_err(SendError::Guest)?;
        self.cfg.faults.corrupt_guest_state(&mut state_blob);
        self.cfg.faults.pad_guest_state(&mut state_blob);
        self.impact.pause();
        let (more, collect_time) = self.collect_dirty(true)?;
        let owed = merge_pages(&pending, &more);
        let tx_at_pause = self.guest.tx_count();
        self.stats.switchover_ms.pause_and_collect = Some(t.elapsed().as_secs_f64() * 1e3);
        // The last round carries no page: it tells the destination that post-copy follows.
        let memory = self.guest.paused_memory();
        let flags = ROUND_FINAL | ROUND_POSTCOPY;
        let in_flight = self
            .io
            .send_pages(round, &[], PageOrigin::Frozen(memory), flags)?;
        let channels = &mut self.io.channels;
        channels.send_message(&Message::GuestState(GuestState {
            guest_kind: self.guest.kind(),
            tx_count: tx_at_pause,
            blob: state_blob,
        }))?;
        for part in owed.chunks(PostcopyOwed::MAX_PAGES) {
            channels.send_message(&Message::PostcopyOwed(PostcopyOwed {
                pages: part.to_vec(),
            }))?;
        }
        channels.send_message(&Message::PostcopyStart(PostcopyStart {
            owed: owed.len() as u64,
            paused_at_unix_ns: paused_at_ns,
            migration_id: channels.migration_id_bytes(),
        }))?;
        let mut rs = self.io.await_ack(in_flight)?;
        rs.dirty_log_ms = collect_time.as_secs_f64() * 1e3;
        self.impact.round(&rs, 0);
        self.stats.per_round.push(rs);
        // The destination commits the incomplete image (its digest comes only with the last
        // page); anything else fails the migration before the guest ran there.
        self.read_commit_reply()?;
        // From here the guest's only future is at the destination: ours ends (its memory
        // stays, frozen, until the last page is acknowledged).
        let ended = self.guest.terminate();
        if let Err(e) = ended {
            let reason = format!("the source guest could not be ended: {e}");
            let _ = self.io.channels.send_message(&Message::Abort(Abort {
                code: AbortCode::SourceError,
                reason: reason.clone(),
            }));
            return Err(SendError::Protocol(reason));
        }
        self.io.channels.send_message(&Message::Handover(Handover {
            ended_at_unix_ns: unix_ns(SystemTime::now()),
        }))?;
        self.stats.postcopy = Some(PostcopyStats {
            mode: self.cfg.postcopy.name().into(),
            pages_owed: owed.len() as u64,
            ..PostcopyStats::default()
        });
        // Announced in the hello, which the destination accepted.
        let preempt = if self.cfg.postcopy_preempt && self.cfg.channels <= 1 {
            match self.io.channels.open_preempt(self.cfg) {
                Ok(link) => Some(link),
                Err(e) => {
                    self.cfg.notices.warning(format!(
                        "post-copy: no connection of their own for requested pages ({e}); \
                         they share the stream's"
                    ));
                    None
                }
            }
        } else {
            None
        };
        self.serve_postcopy(owed, paused_at_ns, preempt)?;
        self.stats.total_time_ms = self.start.elapsed().as_secs_f64() * 1e3;
        Ok(SourceState::Done(Outcome::Committed))
    }
}
