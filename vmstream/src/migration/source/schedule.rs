//! How the disks share the link with memory before memory's round 0 (`--disk-schedule`):
//! with time slices the disks' bulk copy goes first, alone, and their dirty rounds follow
//! while they shrink; memory is not iterated meanwhile (its round 0, which sends all of
//! it, comes after). `parallel` sends the bulk copy within memory's round 0. With
//! `--disk-mode mirror` the mirror starts once the bulk copy is acknowledged, and no
//! disk-only round follows.

use crate::migration::config::{DiskMode, DiskSchedule};
use crate::migration::error::SendError;

use super::machine::Source;
use super::round::PageOrigin;
use super::{Outcome, CANCELLED};

/// How long the source waits between rounds while a disk mirror drains its backlog.
const MIRROR_DRAIN_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

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
            // Mirroring: the bulk copy is applied, the mirror takes the disks from here.
            self.start_mirror_if_due()?;
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
            let mirroring = self.io.disks.as_ref().is_some_and(|d| d.mirroring());
            if pending == 0
                || mirroring
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

    /// Whether a disk mirror runs and still has granules dirtied before it began to send:
    /// the switchover waits for them (the rounds' bandwidth does not see the mirror's, so
    /// the downtime estimate cannot), pausing a little between the rounds meanwhile.
    pub(super) fn mirror_draining(&self) -> bool {
        let draining = self
            .io
            .disks
            .as_ref()
            .is_some_and(|d| d.mirror_backlog_pages() > 0);
        if draining {
            std::thread::sleep(MIRROR_DRAIN_PAUSE);
        }
        draining
    }

    /// Whether the disks are mirrored (`--disk-mode mirror`).
    pub(super) fn mirrors_disks(&self) -> bool {
        self.io.disks.is_some() && self.cfg.disk_settings.mode == DiskMode::Mirror
    }

    /// Starts the disk mirror once the round that sent the bulk copy was acknowledged
    /// (every page of it applied at the destination): opens its connection, and from
    /// then on the guest's writes wait for it (`super::mirror`).
    pub(super) fn start_mirror_if_due(&mut self) -> Result<(), SendError> {
        if !self.io.disks.as_ref().is_some_and(|d| d.mirror_due()) {
            return Ok(());
        }
        let (link, reader) = self.io.channels.open_mirror(self.cfg)?;
        if let Some(d) = self.io.disks.as_mut() {
            d.start_mirror(link, reader)?;
        }
        self.impact
            .note(self.start.elapsed(), "disk mirroring started");
        Ok(())
    }
}
