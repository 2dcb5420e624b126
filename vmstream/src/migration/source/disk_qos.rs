//! Disk write QoS (`--disk-qos`, `STORAGE.md`, *Disk write QoS*): when the disks' dirty
//! backlog stops shrinking from one round to the next, the guest's disk writes are capped
//! through its block layer's token bucket, the cap halved each round the backlog still
//! does not shrink, and doubled back (then lifted) once the backlog has drained. CPU
//! throttling would not slow an I/O-bound guest; this does.

use crate::telemetry::stats::RoundStats;

use super::machine::Source;

/// A round "shrank" the backlog when it left at most this share of the previous one
/// (memory's convergence check asks for a quarter less: `converge::aim_low::MIN_SHRINK`).
const SHRINK: f64 = 0.75;

/// The tightest cap, bytes/s: the guest's I/O slows, it never stops.
pub(super) const MIN_WRITE_LIMIT: u64 = 64 << 10;

/// The cap's controller: fed the backlog after every round, it says when the cap changes.
#[derive(Debug, Default)]
pub(super) struct WriteQos {
    /// The cap in force on all the guest's disk writes, bytes/s (`None`: none).
    limit: Option<u64>,
    /// The backlog after the previous round, bytes.
    previous: Option<u64>,
    /// The guest's write rate when it was first capped: a loosened cap at or above it is
    /// lifted.
    unlimited_rate: f64,
}

impl WriteQos {
    /// The cap in force.
    #[cfg(test)]
    fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// After a round: `pending` bytes of the disks are left to send, the guest wrote its
    /// disks at `write_rate` bytes/s meanwhile, and a backlog of `negligible` bytes fits
    /// the switchover. Returns the new cap when it changes (`Some(None)`: lifted).
    pub(super) fn after_round(
        &mut self,
        pending: u64,
        write_rate: f64,
        negligible: u64,
    ) -> Option<Option<u64>> {
        let previous = self.previous.replace(pending);
        let shrank = previous.is_none_or(|p| pending as f64 <= p as f64 * SHRINK);
        let new = match self.limit {
            // Drained well below what the switchover carries: one step looser.
            Some(l) if pending <= negligible / 2 => {
                let looser = l.saturating_mul(2);
                ((looser as f64) < self.unlimited_rate * 0.99).then_some(looser)
            }
            _ if pending <= negligible || shrank || write_rate <= 0.0 => return None,
            // The backlog stopped shrinking while the guest writes: tighten.
            None => {
                self.unlimited_rate = write_rate;
                Some(((write_rate / 2.0) as u64).max(MIN_WRITE_LIMIT))
            }
            Some(l) if l <= MIN_WRITE_LIMIT => return None,
            Some(l) => Some((l / 2).max(MIN_WRITE_LIMIT)),
        };
        (new != self.limit).then(|| {
            self.limit = new;
            new
        })
    }
}

impl Source<'_> {
    /// Disk write QoS after round `rs` (its disks' collect done): adjusts the guest's disk
    /// write cap if the backlog asks for it, and records the change in the timeline.
    pub(super) fn disk_qos(&mut self, rs: &RoundStats) {
        let Some(disks) = self.io.disks.as_mut() else {
            return;
        };
        if !self.cfg.disk_settings.qos {
            return;
        }
        let secs = (rs.duration_ms / 1e3).max(1e-3);
        // What the link could carry within the downtime limit.
        let negligible =
            (rs.wire_bytes as f64 / secs * self.cfg.downtime_limit.as_secs_f64()) as u64;
        let Some(change) = disks.qos_after_round(negligible) else {
            return;
        };
        let now = self.start.elapsed();
        self.impact.disk_write_limit(change.unwrap_or(0));
        self.impact.note(now, qos_note(change));
    }
}

/// The timeline's remark on a cap change.
fn qos_note(limit: Option<u64>) -> String {
    match limit {
        Some(l) => format!(
            "disk write QoS: guest disk writes capped at {:.2} MB/s",
            l as f64 / 1e6
        ),
        None => "disk write QoS: cap lifted".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_that_stops_shrinking_is_capped_step_by_step_and_released_as_it_drains() {
        let mut q = WriteQos::default();
        let mb = 1_000_000u64;
        // First observation, then a backlog shrinking well: nothing.
        assert_eq!(q.after_round(100 * mb, 8e6, mb), None);
        assert_eq!(q.after_round(50 * mb, 8e6, mb), None);
        // Not shrinking by a quarter: capped at half the guest's rate, then halved.
        assert_eq!(q.after_round(45 * mb, 8e6, mb), Some(Some(4 * mb)));
        assert_eq!(q.after_round(44 * mb, 4e6, mb), Some(Some(2 * mb)));
        // Shrinking again: held.
        assert_eq!(q.after_round(20 * mb, 2e6, mb), None);
        assert_eq!(q.limit(), Some(2 * mb));
        // Within the switchover's reach but not well below it: held.
        assert_eq!(q.after_round(mb, 2e6, mb), None);
        // Drained: loosened step by step, lifted once at the guest's own rate.
        assert_eq!(q.after_round(mb / 4, 2e6, mb), Some(Some(4 * mb)));
        assert_eq!(q.after_round(mb / 4, 4e6, mb), Some(None));
        assert_eq!(q.limit(), None);
    }

    #[test]
    fn the_cap_has_a_floor_and_an_idle_or_small_backlog_is_left_alone() {
        let mut q = WriteQos::default();
        let mb = 1_000_000u64;
        q.after_round(10 * mb, 1e5, mb);
        assert_eq!(q.after_round(10 * mb, 1e5, mb), Some(Some(MIN_WRITE_LIMIT)));
        assert_eq!(q.after_round(10 * mb, 1e5, mb), None);
        let mut q = WriteQos::default();
        q.after_round(mb / 2, 8e6, mb);
        assert_eq!(
            q.after_round(mb / 2, 8e6, mb),
            None,
            "within the switchover"
        );
        let mut q = WriteQos::default();
        q.after_round(10 * mb, 0.0, mb);
        assert_eq!(
            q.after_round(10 * mb, 0.0, mb),
            None,
            "the guest does not write"
        );
    }

    #[test]
    fn notes_say_the_cap() {
        assert!(qos_note(Some(2_500_000)).contains("2.50 MB/s"));
        assert!(qos_note(None).contains("lifted"));
    }
}
