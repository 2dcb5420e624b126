//! A KVM guest resumed on the committed image: restored with its vCPUs held, started, and
//! then sampled for the source and run until `--run-for` or a signal.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::guest::file::disks::verify::DiskVerifyReport;
use crate::guest::kvm::run::report_while_running;
use crate::guest::kvm::{GuestRam, KvmGuest, KvmVerifyReport, RestoreConfig, VmState};
use crate::migration::dest::incoming::Resumption;
use crate::migration::error::RecvError;
use crate::migration::wire::GuestSamples;
use crate::signals::{running_guests_stop_requested, stop_running_guests_on_signals};
use crate::telemetry::notice::Notices;
use crate::telemetry::sampler::SAMPLE_PERIOD;
use crate::telemetry::stats::unix_ns;
use crate::telemetry::switchover::SwitchoverTimes;

/// How long the destination waits for the resumed guest's first transaction (the instant
/// reported as the end of the downtime).
const FIRST_TX_WAIT: Duration = Duration::from_secs(2);

/// A KVM guest resumed on the committed image.
pub struct KvmResumed {
    guest: KvmGuest,
    /// Transactions (all vCPUs) at the resume.
    pub tx_start: u64,
    /// The ledger check before the resume.
    pub verified: KvmVerifyReport,
    /// When the vCPUs were started: `--run-for` counts from here, as for a guest process.
    resumed_at: Instant,
    /// Told the guest's rate as it runs, and its end.
    notices: Notices,
}

impl std::fmt::Debug for KvmResumed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmResumed")
            .field("tx_start", &self.tx_start)
            .finish()
    }
}

/// What the resumed KVM guest did until it was stopped.
#[derive(Debug, Clone)]
pub struct KvmRunOutcome {
    /// Transactions at the resume.
    pub tx_start: u64,
    /// Transactions when paused at the end.
    pub tx_end: u64,
    /// Transactions per second while running.
    pub tps: f64,
    /// The ledger check of the paused guest at the end.
    pub verified: KvmVerifyReport,
    /// The disk check of the paused guest at the end (`None`: it writes no disks).
    pub disks: Option<DiskVerifyReport>,
}

impl KvmResumed {
    /// Restores the VM from `path` (the committed image) and `state` with its vCPUs held,
    /// starts them and waits (bounded) for its first transaction: the instant of the
    /// [`Resumption`], whose phases are the restore and that wait. `verified` is the ledger
    /// check of the received image before the commit; the guest's `disks` (the committed
    /// ones, in order) are checked against its ledgers before it runs on them.
    /// [`Self::run`] tells its lines to `notices`.
    pub(super) fn start(
        path: &Path,
        size: u64,
        state: &VmState,
        verified: KvmVerifyReport,
        disks: &[PathBuf],
        notices: Notices,
    ) -> Result<(KvmResumed, Resumption), RecvError> {
        let t = Instant::now();
        let ram = GuestRam::open(path, size)?;
        crate::guest::kvm::disk::verify::verify_disks(&ram, disks)
            .map_err(|e| RecvError::Resume(format!("refusing to resume the KVM guest: {e}")))?;
        Self::launch(ram, state, verified, disks, notices, t)
    }

    /// Post-copy: as [`Self::start`] on `ram`, which is registered for MISSING faults that
    /// the caller serves meanwhile (the restore reads the parameter block, the vCPUs touch
    /// what they touch); its ledger is checked once the last page landed
    /// ([`Self::check_at_last_page`]).
    pub(super) fn start_postcopy(
        ram: GuestRam,
        state: &VmState,
        notices: Notices,
    ) -> Result<(KvmResumed, Resumption), RecvError> {
        Self::launch(
            ram,
            state,
            KvmVerifyReport::default(),
            &[],
            notices,
            Instant::now(),
        )
    }

    /// Restores the VM on `ram` (opened at `t`) and starts it.
    fn launch(
        ram: GuestRam,
        state: &VmState,
        verified: KvmVerifyReport,
        disks: &[PathBuf],
        notices: Notices,
        t: Instant,
    ) -> Result<(KvmResumed, Resumption), RecvError> {
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
        let cfg = RestoreConfig {
            start_paused: true,
            disks: disks.to_vec(),
            ..RestoreConfig::default()
        };
        let mut guest = KvmGuest::restore(ram, state, &cfg)?;
        // The ledger was checked on the received image before the commit.
        let kvm_restore = Some(ms(t));
        let tx_start = guest.total_transactions()?;
        guest.resume()?;
        let t = Instant::now();
        while guest.total_transactions()? == tx_start && t.elapsed() < FIRST_TX_WAIT {
            std::thread::sleep(Duration::from_micros(50));
        }
        let resumption = Resumption {
            tx_count: tx_start,
            at_unix_ns: unix_ns(SystemTime::now()),
            phases: SwitchoverTimes {
                kvm_restore,
                kvm_first_tx: Some(ms(t)),
                ..SwitchoverTimes::default()
            },
        };
        let resumed = KvmResumed {
            guest,
            tx_start,
            verified,
            resumed_at: t,
            notices,
        };
        Ok((resumed, resumption))
    }

    /// Whether every vCPU still runs.
    pub fn is_healthy(&self) -> bool {
        self.guest.failures().is_empty()
    }

    /// Transactions now (all vCPUs), read through guest RAM.
    pub fn tx_count(&self) -> Result<u64, RecvError> {
        Ok(self.guest.total_transactions()?)
    }

    /// Post-copy, every owed page placed and the digests equal: pauses the vCPUs, checks
    /// every block against the ledger (exact only while paused), and lets them run again;
    /// returns the line that tells it (the pause's length included).
    pub fn check_at_last_page(&mut self) -> Result<String, RecvError> {
        let t = Instant::now();
        self.guest.pause()?;
        let checked = self.guest.verify();
        let tx = self.guest.total_transactions();
        self.guest.resume()?;
        let paused_ms = t.elapsed().as_secs_f64() * 1e3;
        let verified = checked.map_err(|e| {
            RecvError::Resume(format!(
                "the ledger check of the KVM guest once its last page landed failed: {e}"
            ))
        })?;
        self.verified = verified;
        Ok(format!(
            "postcopy verify ok kind=kvm tx={} blocks={} written_blocks={} paused_ms={paused_ms:.1}",
            tx?, verified.blocks, verified.written_blocks
        ))
    }

    /// Reads the guest's transaction counter every [`SAMPLE_PERIOD`] for `window` (less
    /// if a vCPU fails or SIGINT/SIGTERM arrives): the destination's part of the source's
    /// timeline, as [`sample_destination`](crate::telemetry::impact::sample_destination)
    /// reads a guest process's.
    pub(in crate::migration::dest::incoming) fn sample(
        &self,
        window: Duration,
    ) -> Result<GuestSamples, RecvError> {
        let _ = stop_running_guests_on_signals();
        let start = Instant::now();
        let mut samples = Vec::new();
        while samples.len() < GuestSamples::MAX_SAMPLES {
            samples.push((unix_ns(SystemTime::now()), self.guest.total_transactions()?));
            let next = SAMPLE_PERIOD * samples.len() as u32;
            if next > window || running_guests_stop_requested() || !self.guest.failures().is_empty()
            {
                break;
            }
            std::thread::sleep(next.saturating_sub(start.elapsed()));
        }
        Ok(GuestSamples { samples })
    }

    /// Runs the guest for `run_for` (None: until SIGINT/SIGTERM), telling its rate every
    /// second, then pauses it, checks the ledger again and requires that its transaction
    /// counter grew.
    pub fn run(mut self, run_for: Option<Duration>) -> Result<KvmRunOutcome, RecvError> {
        // The samples for the source already took part of `run_for`.
        let remaining = run_for.map(|d| d.saturating_sub(self.resumed_at.elapsed()));
        report_while_running(
            &mut self.guest,
            remaining,
            Duration::from_secs(1),
            "kvm",
            false,
            &self.notices,
        )?;
        let ran = self.resumed_at.elapsed();
        self.guest.pause()?;
        let tx_end = self.guest.total_transactions()?;
        let verified = self.guest.verify()?;
        let disks = self.guest.verify_disks()?;
        self.notices.output(format!("done tx={tx_end}"));
        self.guest.shutdown();
        if tx_end <= self.tx_start {
            return Err(RecvError::Resume(format!(
                "the KVM guest's transaction counter did not grow ({} -> {tx_end})",
                self.tx_start
            )));
        }
        Ok(KvmRunOutcome {
            tx_start: self.tx_start,
            tx_end,
            tps: tx_end.saturating_sub(self.tx_start) as f64 / ran.as_secs_f64().max(1e-9),
            verified,
            disks,
        })
    }
}
