//! `vmstream kvm run`: runs a KVM guest without migrating it, printing its
//! transactions per second every interval ([`report_while_running`]) and a summary at
//! the end; `vmstream kvm verify`: checks a stopped KVM guest's RAM file and disks.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use crate::cli::migration::{OnFailure, SendArgs};
use crate::cli::notices::printer;
use crate::guest::file::disks::area::DiskWorkloadKind;
use crate::guest::file::disks::{DiskParams, GuestDisks, DEFAULT_IO_RATE};
use crate::guest::kvm::error::Result;
use crate::guest::kvm::memory::GuestRam;
use crate::guest::kvm::params::{KvmWorkloadKind, WorkloadConfig};
use crate::guest::kvm::run::report_while_running;
use crate::guest::kvm::source::{AfterFailure, KvmSpec};
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
    /// Workload of the guest program: dbsim, random, hotset, idle, filedb, diskio (disks
    /// only, through the paravirtual block device).
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
    /// The guest's disks.
    #[command(flatten)]
    pub disks: KvmDiskArgs,
}

/// The disks of a KVM guest that `vmstream kvm run` starts (`send --kvm` has the same
/// flags): the diskio workload writes them through the paravirtual block device.
#[derive(Args, Debug, Clone)]
pub struct KvmDiskArgs {
    /// A disk of the guest (a raw image file; `<PATH>.dirty` is its dirty bitmap); repeat
    /// for more (at most 16).
    #[arg(long = "disk", value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Size of each disk that does not exist yet (K/M/G; created sparse).
    #[arg(long, value_parser = parse_size)]
    pub disk_size: Option<u64>,
    /// Dirty bitmap granularity of the disks (4K to 1M, a power of two) [default: 64K].
    #[arg(long, value_parser = parse_size)]
    pub disk_granularity: Option<u64>,
    /// diskio: bytes per write (4K to 1M, a power of two).
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    pub io_size: u64,
    /// Disk write rate in bytes/s (K/M/G; 0 = as fast as the disks take it) [default: 4M].
    #[arg(long, value_name = "BYTES/s", value_parser = parse_size)]
    pub io_rate: Option<u64>,
}

/// The disks of a KVM guest running `workload` (the diskio workload writes them; other
/// workloads leave disks to other writers, so the guest has none).
pub fn kvm_disks(
    workload: KvmWorkloadKind,
    paths: &[PathBuf],
    disk_size: Option<u64>,
    granularity: Option<u64>,
    io_size: u64,
    io_rate: Option<u64>,
) -> std::result::Result<GuestDisks, String> {
    if workload != KvmWorkloadKind::Diskio {
        return Ok(GuestDisks::default());
    }
    if paths.is_empty() {
        return Err("--workload diskio needs at least one --disk".into());
    }
    Ok(GuestDisks {
        paths: paths.to_vec(),
        create_size: disk_size,
        granularity: granularity.or(Some(crate::disk::bitmap::DEFAULT_GRANULARITY)),
        workload: Some(DiskParams {
            kind: DiskWorkloadKind::Diskio,
            io_size,
            io_rate: io_rate.unwrap_or(DEFAULT_IO_RATE),
            seed: 1,
        }),
    })
}

/// The KVM guest `vmstream send --kvm` with `args` starts, of `size` bytes of RAM.
pub fn send_spec(args: &SendArgs, size: u64) -> std::result::Result<KvmSpec, String> {
    let workload = parse_workload(&args.workload)?;
    if workload == KvmWorkloadKind::Diskio && args.postcopy != crate::migration::PostcopyMode::Off {
        // The destination restores the VM before any disk is committed.
        return Err(
            "--postcopy: a KVM guest with disks resumes only after its disks are \
                    committed (pre-copy)"
                .into(),
        );
    }
    Ok(KvmSpec {
        path: args.memory_file.clone(),
        size,
        vcpus: args.vcpus,
        workload,
        disks: kvm_disks(
            workload,
            &args.disks,
            args.disk_size,
            args.disk_granularity,
            args.io_size,
            args.io_rate,
        )?,
        dirty_log: args.dirty_log,
        after_failure: match args.on_failure {
            OnFailure::KeepRunning => AfterFailure::KeepRunning(args.keep_running_for),
            OnFailure::Stop => AfterFailure::Stop,
        },
    })
}

/// Arguments of `vmstream kvm verify`.
#[derive(Args, Debug, Clone)]
pub struct KvmVerifyArgs {
    /// Guest RAM file of a stopped KVM guest (or a migrated copy); read, not changed.
    #[arg(long, value_name = "PATH")]
    pub memory_file: PathBuf,
    /// The guest's disks, in order: every block checked against the ledgers in its RAM.
    #[arg(long = "disk", value_name = "PATH")]
    pub disks: Vec<PathBuf>,
}

/// `vmstream kvm verify`: the ledger check of a KVM guest's RAM file and its disks.
pub fn verify(args: &KvmVerifyArgs) -> ExitCode {
    match crate::guest::kvm::verify::verify_files(&args.memory_file, &args.disks) {
        Ok((memory, disks)) => {
            println!(
                "ok kind=kvm blocks={} written_blocks={} inflight={}",
                memory.blocks, memory.written_blocks, memory.inflight
            );
            if let Some(d) = disks {
                println!("{}", super::verified::disks_line(&d));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmstream kvm verify: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Parses a workload name a KVM guest can run from the command line.
pub fn parse_workload(s: &str) -> std::result::Result<KvmWorkloadKind, String> {
    match KvmWorkloadKind::parse(s) {
        Some(KvmWorkloadKind::Touch) | None => Err(format!(
            "unknown KVM workload {s:?} (dbsim, random, hotset, idle, filedb, diskio)"
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
    let d = &args.disks;
    let disks = kvm_disks(
        args.workload,
        &d.paths,
        d.disk_size,
        d.disk_granularity,
        d.io_size,
        d.io_rate,
    )
    .map_err(crate::guest::kvm::KvmError::Config)?;
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
        disks,
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
    let disks = guest.verify_disks()?;
    notices.output(format!(
        "done tx={} tps={:.0} seconds={:.2} verify=ok blocks={} written_blocks={}{} verify_ms={:.1}",
        summary.tx_end,
        summary.tps(),
        summary.elapsed.as_secs_f64(),
        report.blocks,
        report.written_blocks,
        super::verified::disks_summary(disks.as_ref()),
        t.elapsed().as_secs_f64() * 1e3
    ));
    guest.shutdown();
    Ok(())
}
