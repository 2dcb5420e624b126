//! The destination's entry points: [`receive_on`] returns the receive's statistics, made
//! and finished here, with how it ended; [`run_resumed`] runs the guest it resumed and
//! records that guest's transaction rate in them.

use std::time::Instant;

use crate::guest::file::disks::verify::DiskVerifyReport;
use crate::guest::file::disks::verify_guest;
use crate::guest::file::verify::ImageVerifyReport;
use crate::migration::config::RecvConfig;
use crate::migration::error::RecvError;
use crate::telemetry::stats::{MigrationStats, Role};

use super::listen::receive_into;
use super::{listen, KvmRunOutcome, Listening, Received};

/// What a receive returns: its statistics, finished, and how it ended.
#[derive(Debug)]
pub struct RecvReport {
    /// The statistics (`--stats-json`, the summary). An error after the commit leaves the
    /// outcome committed: the image stays in place.
    pub stats: MigrationStats,
    /// The resumed guest (with `cfg.resume`), or the error that ended the receive.
    pub result: Result<Received, RecvError>,
}

/// Listens, accepts one source and receives its guest into `cfg.memory_file`: [`listen`],
/// then [`receive_on`]. An error here: nothing was received.
pub fn receive_migration(cfg: &RecvConfig) -> Result<RecvReport, RecvError> {
    let listening = listen(cfg)?;
    Ok(receive_on(cfg, listening))
}

/// Accepts one source on `listening` and receives its guest into `cfg.memory_file`.
pub fn receive_on(cfg: &RecvConfig, listening: Listening) -> RecvReport {
    let mut stats = MigrationStats::new(Role::Destination);
    stats.settings.authenticated = Some(cfg.auth_key.is_some());
    let result = receive_into(cfg, listening, &mut stats);
    if let Err(e) = &result {
        // The outcome is failed, or committed if the error came after the commit.
        stats.error = Some(e.to_string());
    }
    RecvReport { stats, result }
}

/// What the guest resumed on the destination did until it stopped.
#[derive(Debug)]
pub enum ResumedRun {
    /// A guest process: its transactions at the resume, and the workload's verify of the
    /// memory file (and of its disks against it) once it stopped.
    File {
        /// Transactions at the resume.
        tx_start: u64,
        /// The verify after the run.
        report: ImageVerifyReport,
        /// The disks' verify after the run (`None`: a guest without disks).
        disks: Option<DiskVerifyReport>,
    },
    /// A KVM guest.
    Kvm(KvmRunOutcome),
}

/// Runs the guest `received` holds (`--resume`) until `--run-for` or SIGINT/SIGTERM,
/// checks that it stayed healthy, and records its transactions per second in `stats`;
/// `None` when no guest was resumed.
pub fn run_resumed(
    received: Received,
    cfg: &RecvConfig,
    stats: &mut MigrationStats,
) -> Option<Result<ResumedRun, RecvError>> {
    if let Some(kvm) = received.kvm {
        return Some(kvm.run(cfg.run_for).map(|r| {
            stats.tps.after = Some(r.tps);
            ResumedRun::Kvm(r)
        }));
    }
    // The committed PATH, or the handed-over memory this process holds.
    let memory = match (&cfg.memory_file, &received.handed_over) {
        (Some(path), _) => path.clone(),
        (None, Some(f)) => {
            use std::os::fd::AsRawFd;
            std::path::PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
        }
        (None, None) => std::path::PathBuf::new(),
    };
    let guest = received.guest?;
    let started = Instant::now();
    let tx_start = guest.ready.tx_count;
    let healthy = guest.join().and_then(|tx_end| {
        // Memory, and every committed disk against memory's ledgers.
        let (report, disks) = verify_guest(&memory, &cfg.disks)
            .map_err(|e| RecvError::Resume(format!("verify after run: {e}")))?;
        Ok((tx_end, report, disks))
    });
    Some(healthy.map(|(tx_end, report, disks)| {
        let secs = started.elapsed().as_secs_f64();
        stats.tps.after = Some(tx_end.saturating_sub(tx_start) as f64 / secs.max(1e-9));
        ResumedRun::File {
            tx_start,
            report,
            disks,
        }
    }))
}
