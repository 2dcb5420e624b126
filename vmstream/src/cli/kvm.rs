//! `vmstream kvm run`: runs a KVM guest without migrating it, printing its
//! transactions per second every interval ([`report_while_running`]) and a summary at
//! the end.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use crate::cli::notices::printer;
use crate::guest::kvm::error::Result;
use crate::guest::kvm::memory::GuestRam;
use crate::guest::kvm::params::{KvmWorkloadKind, WorkloadConfig};
use crate::guest::kvm::run::report_while_running;
use crate::guest::kvm::{KvmGuest, KvmGuestConfig};
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
    pub workload: KvmWorkloadKind,
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
pub fn parse_workload(s: &str) -> std::result::Result<KvmWorkloadKind, String> {
    match KvmWorkloadKind::parse(s) {
        Some(KvmWorkloadKind::Touch) | None => Err(format!(
            "unknown KVM workload {s:?} (dbsim, random, hotset, idle, filedb)"
        )),
        Some(k) => Ok(k),
    }
}

/// Parses `bitmap`, `clear` or `ring`.
pub fn parse_dirty_log(s: &str) -> std::result::Result<DirtyLogMode, String> {
    DirtyLogMode::parse(s).ok_or_else(|| format!("unknown dirty log {s:?} (bitmap, clear, ring)"))
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
    let cfg = KvmGuestConfig {
        vcpus: args.vcpus,
        workload: WorkloadConfig {
            kind: args.workload,
            seed: args.seed,
            ..WorkloadConfig::default()
        },
        dirty_log: args.dirty_log,
        ..KvmGuestConfig::default()
    };
    let mut guest = KvmGuest::start(ram, &cfg)?;
    let notices = printer("kvm run");
    notices.output(format!(
        "kvm guest pid={} path={} size={} vcpus={} workload={} dirty_log={}",
        std::process::id(),
        path.display(),
        args.size,
        args.vcpus,
        args.workload.name(),
        args.dirty_log.map_or("off", |m| m.name())
    ));
    let summary = report_while_running(
        &mut guest,
        args.run_for,
        args.interval,
        "kvm",
        true,
        &notices,
    )?;
    guest.pause()?;
    let t = Instant::now();
    let report = guest.verify()?;
    notices.output(format!(
        "done tx={} tps={:.0} seconds={:.2} verify=ok blocks={} written_blocks={} verify_ms={:.1}",
        summary.tx_end,
        summary.tps(),
        summary.elapsed.as_secs_f64(),
        report.blocks,
        report.written_blocks,
        t.elapsed().as_secs_f64() * 1e3
    ));
    guest.shutdown();
    Ok(())
}
