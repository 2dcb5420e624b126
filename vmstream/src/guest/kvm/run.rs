//! A KVM guest left running: the loop that keeps it going for a while (or until SIGINT or
//! SIGTERM), reporting its transactions per second every interval. `vmstream kvm run` uses it,
//! and so does the migration, which keeps a KVM guest running the same way after a failed
//! migration (source) or after a resume (destination).

use std::time::{Duration, Instant};

use crate::guest::kvm::error::Result;
use crate::guest::kvm::KvmGuest;
use crate::telemetry::notice::Notices;

/// What a reporting run measured.
#[derive(Debug, Clone, Copy)]
pub struct RunSummary {
    /// Transactions (all vCPUs) when the run started.
    pub tx_start: u64,
    /// Transactions when it ended.
    pub tx_end: u64,
    /// How long it ran.
    pub elapsed: Duration,
}

impl RunSummary {
    /// Average transactions per second.
    pub fn tps(&self) -> f64 {
        self.tx_end.saturating_sub(self.tx_start) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Lets `guest` run for `run_for` (None: until SIGINT/SIGTERM), telling the output line
/// `PREFIX tps=.. tx=.. per_vcpu=[..]` every `interval` to `notices`. With
/// `collect_dirty` and a dirty log, each interval also collects it (clearing
/// everything in clear mode) and reports the dirty pages and the collection
/// time. Fails if a vCPU stops on an error.
pub fn report_while_running(
    guest: &mut KvmGuest,
    run_for: Option<Duration>,
    interval: Duration,
    prefix: &str,
    collect_dirty: bool,
    notices: &Notices,
) -> Result<RunSummary> {
    // A failure to register leaves the signals' default action: the run still ends.
    let _ = crate::signals::stop_running_guests_on_signals();
    let mut log = if collect_dirty {
        guest.dirty_log().ok()
    } else {
        None
    };
    let start = Instant::now();
    let tx_start = guest.total_transactions()?;
    let (mut last_t, mut last_tx) = (start, tx_start);
    let tick = Duration::from_millis(10).min(interval);
    loop {
        let done = run_for.is_some_and(|d| start.elapsed() >= d)
            || crate::signals::running_guests_stop_requested();
        if done || last_t.elapsed() >= interval {
            let tx = guest.total_transactions()?;
            let now = Instant::now();
            let tps = tx.saturating_sub(last_tx) as f64 / (now - last_t).as_secs_f64().max(1e-9);
            let mut line = format!(
                "{prefix} tps={tps:.0} tx={tx} per_vcpu={:?}",
                guest.transactions()?
            );
            if let Some(log) = &mut log {
                let t = Instant::now();
                let map = log.collect()?;
                let collect = t.elapsed();
                log.clear(0, map.pages())?;
                line += &format!(
                    " dirty_pages={} collect_ms={:.3}",
                    map.count(),
                    collect.as_secs_f64() * 1e3
                );
            }
            notices.output(line);
            (last_t, last_tx) = (now, tx);
        }
        if let Some((vcpu, reason)) = guest.failures().into_iter().next() {
            return Err(crate::guest::kvm::KvmError::VcpuFailed { vcpu, reason });
        }
        if done {
            return Ok(RunSummary {
                tx_start,
                tx_end: last_tx,
                elapsed: start.elapsed(),
            });
        }
        std::thread::sleep(tick);
    }
}
