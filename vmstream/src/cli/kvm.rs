//! `vmstream kvm run`: runs a KVM guest without migrating it, printing its
//! transactions per second every interval and a summary at the end. The
//! reporting loop and the SIGINT/SIGTERM stop flag are shared with the
//! migration code, which keeps a KVM guest running the same way after a
//! failed migration (source) or after a resume (destination).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use clap::Args;

use crate::guest::kvm::error::Result;
use crate::guest::kvm::memory::GuestRam;
use crate::guest::kvm::params::{WorkloadConfig, WorkloadKind};
use crate::guest::kvm::{GuestConfig, KvmGuest};
use crate::track::kvm::DirtyLogMode;
use crate::units::{parse_duration, parse_size};

/// Arguments of `vmstream kvm run`.
#[derive(Args, Debug, Clone)]
pub struct KvmRunArgs {
    /// Guest RAM size (K/M/G suffixes; a multiple of 2 MiB, at least 4 MiB).
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// vCPUs (one thread each).
    #[arg(long, default_value_t = 2)]
    pub vcpus: usize,
    /// Workload of the guest program: dbsim, random, hotset, idle, filedb.
    #[arg(long, default_value = "dbsim", value_parser = parse_workload)]
    pub workload: WorkloadKind,
    /// Guest RAM in this file (created or truncated: a fresh guest; default: an anonymous
    /// memfd).
    #[arg(long, value_name = "PATH")]
    pub memory_file: Option<PathBuf>,
    /// Stop after this long (default: until SIGINT/SIGTERM).
    #[arg(long, value_parser = parse_duration)]
    pub run_for: Option<Duration>,
    /// Track dirty pages with this KVM mechanism (bitmap, clear, ring) and
    /// report dirty pages and collection time per interval.
    #[arg(long, value_parser = parse_dirty_log)]
    pub dirty_log: Option<DirtyLogMode>,
    /// Reporting interval.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub interval: Duration,
    /// Guest PRNG seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Parses a workload name a KVM guest can run from the command line.
pub fn parse_workload(s: &str) -> std::result::Result<WorkloadKind, String> {
    match WorkloadKind::parse(s) {
        Some(WorkloadKind::Touch) | None => Err(format!(
            "unknown KVM workload {s:?} (dbsim, random, hotset, idle, filedb)"
        )),
        Some(k) => Ok(k),
    }
}

/// Parses `bitmap`, `clear` or `ring`.
pub fn parse_dirty_log(s: &str) -> std::result::Result<DirtyLogMode, String> {
    DirtyLogMode::parse(s).ok_or_else(|| format!("unknown dirty log {s:?} (bitmap, clear, ring)"))
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM set a flag (see [`stop_requested`]) instead of
/// killing the process, so a running guest is stopped cleanly.
pub fn install_stop_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction with a handler that only stores to an
            // atomic (async-signal-safe); the struct outlives the call.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_stop_signal as *const () as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}

/// Whether SIGINT or SIGTERM arrived since [`install_stop_handler`].
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

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

/// Lets `guest` run for `run_for` (None: until SIGINT/SIGTERM), printing
/// `PREFIX tps=.. tx=.. per_vcpu=[..]` every `interval` to `out`. With
/// `collect_dirty` and a dirty log, each interval also collects it (clearing
/// everything in clear mode) and reports the dirty pages and the collection
/// time. Fails if a vCPU stops on an error.
pub fn report_while_running(
    guest: &mut KvmGuest,
    run_for: Option<Duration>,
    interval: Duration,
    prefix: &str,
    collect_dirty: bool,
    out: &mut dyn Write,
) -> Result<RunSummary> {
    install_stop_handler();
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
        let done = run_for.is_some_and(|d| start.elapsed() >= d) || stop_requested();
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
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
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

/// `vmstream kvm run`.
pub fn run(args: &KvmRunArgs) -> ExitCode {
    match run_inner(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmstream kvm run: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(args: &KvmRunArgs) -> Result<()> {
    let ram = match &args.memory_file {
        // A fresh guest: old contents would not match its empty ledger.
        Some(p) => GuestRam::create(p, args.size)?,
        None => GuestRam::memfd(args.size)?,
    };
    let path = ram.shared_path();
    let cfg = GuestConfig {
        vcpus: args.vcpus,
        workload: WorkloadConfig {
            kind: args.workload,
            seed: args.seed,
            ..WorkloadConfig::default()
        },
        dirty_log: args.dirty_log,
        ..GuestConfig::default()
    };
    let mut guest = KvmGuest::start(ram, &cfg)?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "kvm guest pid={} path={} size={} vcpus={} workload={} dirty_log={}",
        std::process::id(),
        path.display(),
        args.size,
        args.vcpus,
        args.workload.name(),
        args.dirty_log.map_or("off", |m| m.name())
    );
    let summary = report_while_running(
        &mut guest,
        args.run_for,
        args.interval,
        "kvm",
        true,
        &mut out,
    )?;
    guest.pause()?;
    let t = Instant::now();
    let report = guest.verify()?;
    let _ = writeln!(
        out,
        "done tx={} tps={:.0} seconds={:.2} verify=ok blocks={} written_blocks={} verify_ms={:.1}",
        summary.tx_end,
        summary.tps(),
        summary.elapsed.as_secs_f64(),
        report.blocks,
        report.written_blocks,
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(out);
    guest.shutdown();
    Ok(())
}
