//! The source's entry point [`migrate`]: warms the guest up, runs the state machine and
//! returns its statistics, made and finished here, with how the migration ended.

use std::time::{Duration, Instant};

use crate::guest::migratable::MigratableGuest;
use crate::migration::config::SendConfig;
use crate::migration::error::SendError;
use crate::migration::interrupt;
use crate::telemetry::settings::Settings;
use crate::telemetry::stats::{MigrationOutcome, MigrationStats, Role};

use super::{run_migration, Outcome};

/// How often the warm-up looks for SIGINT/SIGTERM.
const WARMUP_POLL: Duration = Duration::from_millis(20);

/// What a migration returns: its statistics, finished, and how it ended.
#[derive(Debug)]
pub struct SendReport {
    /// The statistics (`--stats-json`, the summary).
    pub stats: MigrationStats,
    /// Committed or cancelled, or the error that ended it.
    pub result: Result<Outcome, SendError>,
}

/// Lets `guest` run for `cfg.warmup` (less if `cfg.cancel` is set meanwhile, and then the
/// migration cancels at once) and migrates it to `cfg.to`. On error before the commit the
/// guest is resumed (if it was paused) and an `Abort` is sent when the connection still
/// works.
pub fn migrate(cfg: &SendConfig, guest: &mut dyn MigratableGuest) -> SendReport {
    let mut stats = MigrationStats::new(Role::Source);
    stats.guest_bytes = guest.size();
    stats.settings = settings(cfg, guest);
    stats.tps.before = warm_up(cfg, guest);
    let result = run_migration(cfg, guest, &mut stats);
    stats.set_wire_ratio();
    match &result {
        // The destination committed either way; an injected crash only skips the end.
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
    SendReport { stats, result }
}

/// Runs the guest for `cfg.warmup` before the migration; its transactions per second then,
/// `None` without a warm-up or when `cfg.cancel` ended it.
pub(super) fn warm_up(cfg: &SendConfig, guest: &dyn MigratableGuest) -> Option<f64> {
    if cfg.warmup.is_zero() {
        return None;
    }
    let (t0, tx0) = (Instant::now(), guest.tx_count());
    let cancelled = || interrupt::requested(cfg.cancel.as_ref());
    while t0.elapsed() < cfg.warmup && !cancelled() {
        std::thread::sleep(cfg.warmup.saturating_sub(t0.elapsed()).min(WARMUP_POLL));
    }
    let tx1 = guest.tx_count();
    (!cancelled()).then(|| tx1.saturating_sub(tx0) as f64 / t0.elapsed().as_secs_f64())
}

/// The settings the source knows before it connects: the configuration's and the guest's.
pub(super) fn settings(cfg: &SendConfig, guest: &mut dyn MigratableGuest) -> Settings {
    Settings {
        compression: Some(format!("{:?}", cfg.encoder.compression)),
        xbzrle: Some(cfg.encoder.delta.is_some()),
        threads: Some(cfg.threads),
        downtime_limit_ms: Some(cfg.downtime_limit.as_millis()),
        downtime_target_ms: cfg
            .converge
            .aim_low
            .target(cfg.downtime_limit)
            .ok()
            .map(|t| t.as_millis()),
        max_bandwidth: Some(cfg.max_bandwidth.into()),
        dirty_tracking: Some(guest.tracker().name().to_string()),
        channels: Some(cfg.channels),
        authenticated: Some(cfg.auth_key.is_some()),
        guest_kind: Some(format!("{:?}", guest.kind()).to_lowercase()),
        ..cfg.converge.settings()
    }
}
