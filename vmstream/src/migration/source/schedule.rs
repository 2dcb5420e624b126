//! How the disks share the link with memory before memory's round 0 (`--disk-schedule`):
//! with time slices the disks' bulk copy goes first, alone, and their dirty rounds follow
//! while they shrink; memory is not iterated meanwhile (its round 0, which sends all of
//! it, comes after). `parallel` sends the bulk copy within memory's round 0.

use crate::migration::config::DiskSchedule;
use crate::migration::error::SendError;

use super::machine::Source;
use super::round::PageOrigin;
use super::{Outcome, CANCELLED};

/// Disk-only rounds at most before memory's round 0 (the bulk copy included).
const MAX_DISK_SLICE_ROUNDS: u64 = 8;

impl Source<'_> {
    /// The disks' time slice: disk-only rounds from round 0 until the disks' pending data
    /// stops halving (or is gone); memory's round 0 is the next. `Some` outcome if the
    /// migration was cancelled meanwhile.
    pub(super) fn disk_slices(&mut self) -> Result<Option<Outcome>, SendError> {
        if self.io.disks.is_none() || self.cfg.disk_settings.schedule != DiskSchedule::Slices {
            return Ok(None);
        }
        let mut round = 0;
        let mut previous = u64::MAX;
        loop {
            let rs = match self
                .io
                .send_round(round, &[], PageOrigin::Live(&mut *self.guest), 0)
            {
                Err(SendError::Cancelled) => return self.cancel_now(CANCELLED).map(Some),
                other => other?,
            };
            self.guest.check_alive().map_err(SendError::Guest)?;
            let pending = match self.io.disks.as_mut() {
                Some(d) => d.collect(false)?,
                None => 0,
            };
            self.impact.round(&rs, 0);
            // Disk write QoS: a backlog that stops shrinking caps the guest's writes.
            self.disk_qos(&rs);
            self.stats.per_round.push(rs);
            round += 1;
            // Past --timeout memory's rounds begin, and the policy decides there.
            let late = self.cfg.timeout.is_some_and(|t| self.start.elapsed() >= t);
            if pending == 0
                || pending.saturating_mul(2) > previous
                || round >= MAX_DISK_SLICE_ROUNDS
                || late
            {
                break;
            }
            previous = pending;
        }
        self.first_memory_round = round;
        Ok(None)
    }
}
