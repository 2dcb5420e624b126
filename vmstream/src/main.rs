//! `vmstream` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vmstream::guest::file::disks::area::DiskWorkloadKind;
use vmstream::guest::file::disks::{
    verify_guest, workload_by_name, DiskParams, GuestDisks, DEFAULT_IO_RATE,
};
use vmstream::guest::file::layout::ImageWorkloadKind;
use vmstream::guest::file::workload::WorkloadParams;
use vmstream::guest::file::{MemorySource, ProcessGuestConfig, StartMode};
use vmstream::units::{parse_duration, parse_size};

/// Pre-copy live migration of guest memory.
#[derive(Parser, Debug)]
#[command(name = "vmstream", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run or check a file-backed guest.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// Start (or attach to) a guest and migrate it live to a receiver.
    ///
    /// Exit code: 0 committed, 1 failed, 2 bad arguments, 3 cancelled (at --timeout with
    /// --on-timeout cancel, or by SIGINT/SIGTERM before the final round; a signal ignored
    /// when vmstream started, as in a script's background job, stays ignored). Whenever
    /// the migration does not commit, the source guest keeps running (a KVM guest as
    /// --on-failure says) and the receiver commits nothing.
    Send(Box<vmstream::cli::SendArgs>),
    /// Receive a migrating guest, commit its memory, optionally run it.
    ///
    /// Exit code: 0 committed (and, with --resume, the guest ran healthy), 1 failed (also
    /// when the image is committed but, with --resume, not started because the source did not
    /// confirm that its guest ended, and when another receive is receiving into the same
    /// --memory-file), 2 bad arguments (checked before listening: the listen address, --size,
    /// a --memory-file that is a directory or a device or in a missing directory).
    /// SIGINT/SIGTERM before the source's final digest end the receive: nothing committed,
    /// the temporary image removed, the source told.
    Recv(vmstream::cli::RecvArgs),
    /// Plot the guest-impact timeline of a statistics JSON as SVG.
    Plot(vmstream::cli::plot::PlotArgs),
    /// Run a KVM guest (vmstream/KVM.md).
    #[command(subcommand)]
    Kvm(KvmCommand),
}

#[derive(Subcommand, Debug)]
enum KvmCommand {
    /// Run a KVM guest without migrating it, printing its transactions per second.
    Run(vmstream::cli::kvm::KvmRunArgs),
    /// Check a stopped KVM guest's RAM file (and its disks) against its ledgers.
    Verify(vmstream::cli::kvm::KvmVerifyArgs),
}

#[derive(Subcommand, Debug)]
enum GuestCommand {
    /// Run a built-in workload in guest memory (and on its disks).
    Run(Box<RunArgs>),
    /// Check a guest memory file (a snapshot or a stopped guest) block by block.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Guest memory file (tmpfs, hugetlbfs, disk or /proc/PID/fd/N).
    #[arg(long, value_name = "PATH", required_unless_present = "memfd")]
    memory_file: Option<PathBuf>,
    /// Put guest memory in a new memfd instead (init only); its path is in the ready line.
    #[arg(long, conflicts_with_all = ["memory_file", "resume"])]
    memfd: bool,
    /// Memory size (K/M/G suffixes); required with --init.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Workload: dbsim, random, sequential, hotset, idle, diskio (init only). With
    /// --disk, dbsim runs its disk mode; diskio writes disks only.
    #[arg(long, default_value = "dbsim", value_parser = parse_kind)]
    workload: (ImageWorkloadKind, Option<DiskWorkloadKind>),
    /// Format the memory for a fresh guest (default).
    #[arg(long, conflicts_with = "resume")]
    init: bool,
    /// Continue the guest found in memory; verifies first and refuses a bad image.
    #[arg(long)]
    resume: bool,
    /// Target transactions per second, 0 = as fast as possible.
    #[arg(long, value_name = "TX/s", conflicts_with = "dirty_rate")]
    rate: Option<u64>,
    /// Target dirty rate in bytes per second (K/M/G suffixes), converted to a transaction
    /// rate of one block per transaction.
    #[arg(long, value_name = "BYTES/s", value_parser = parse_size)]
    dirty_rate: Option<u64>,
    /// Percent of blocks to format and write; the rest stays zero (init only).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    active: Option<u8>,
    /// Hot set size for the hotset workload (K/M/G suffixes; init only).
    #[arg(long, value_parser = parse_size)]
    hot_set: Option<u64>,
    /// RNG seed (init only).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop after this long (ms/s/m), instead of running until killed.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Read control commands from stdin (tx B, step N, count, exit).
    #[arg(long)]
    control_stdin: bool,
    /// Do not arm userfaultfd write-protect tracking.
    #[arg(long)]
    no_track: bool,
    /// A disk of the guest: a raw image file (up to 16, in order; `<PATH>.dirty` is its
    /// dirty bitmap). A resumed guest verifies its disks first.
    #[arg(long = "disk", value_name = "PATH")]
    disks: Vec<PathBuf>,
    /// Size of each disk that does not exist yet (K/M/G; created sparse).
    #[arg(long, value_parser = parse_size)]
    disk_size: Option<u64>,
    /// Dirty bitmap granularity of the disks (4K to 1M, a power of two) [default: an
    /// existing bitmap's, else 64K].
    #[arg(long, value_parser = parse_size)]
    disk_granularity: Option<u64>,
    /// diskio: bytes per write (4K to 1M, a power of two; init only).
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    io_size: u64,
    /// Disk write rate in bytes/s (K/M/G; 0 = as fast as the disks take it; init only).
    #[arg(long, value_name = "BYTES/s", value_parser = parse_size)]
    io_rate: Option<u64>,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// Guest memory file to check (mapped privately; the file is not changed).
    #[arg(long, value_name = "PATH")]
    memory_file: PathBuf,
    /// The guest's disks, in order: every block checked against the ledgers in memory.
    #[arg(long = "disk", value_name = "PATH")]
    disks: Vec<PathBuf>,
}

fn parse_kind(s: &str) -> Result<(ImageWorkloadKind, Option<DiskWorkloadKind>), String> {
    workload_by_name(s).ok_or_else(|| {
        let names: Vec<_> = ImageWorkloadKind::ALL.iter().map(|k| k.name()).collect();
        format!(
            "unknown workload {s:?} (one of {}, diskio)",
            names.join(", ")
        )
    })
}

fn guest_config(a: RunArgs) -> Result<ProcessGuestConfig, String> {
    let (kind, disk_kind) = a.workload;
    let diskio = disk_kind == Some(DiskWorkloadKind::Diskio);
    let rate = match (a.rate, a.dirty_rate) {
        (Some(r), _) => Some(r),
        (None, Some(bytes)) => Some((bytes / kind.block_size()).max(1)),
        (None, None) => None,
    };
    let disk_kind = disk_kind.filter(|_| !a.resume && !a.disks.is_empty());
    if diskio && a.disks.is_empty() && !a.resume {
        return Err("--workload diskio needs at least one --disk".into());
    }
    let disks = GuestDisks {
        paths: a.disks,
        create_size: a.disk_size,
        granularity: a.disk_granularity,
        workload: disk_kind.map(|kind| DiskParams {
            kind,
            io_size: a.io_size,
            io_rate: a.io_rate.unwrap_or(DEFAULT_IO_RATE),
            seed: a
                .seed
                .unwrap_or(WorkloadParams::new(ImageWorkloadKind::Idle).seed),
        }),
    };
    let start = if a.resume {
        StartMode::Resume
    } else {
        let mut p = WorkloadParams::new(kind);
        if let Some(active) = a.active {
            p.active_percent = active;
        }
        p.hot_set_bytes = a.hot_set;
        if let Some(seed) = a.seed {
            p.seed = seed;
        }
        p.rate = rate.unwrap_or(0);
        StartMode::Init(p)
    };
    Ok(ProcessGuestConfig {
        memory: match a.memory_file {
            Some(p) if !a.memfd => MemorySource::File(p),
            _ => MemorySource::Memfd,
        },
        size: a.size,
        rate: if a.resume { rate } else { None },
        start,
        duration: a.duration,
        control_stdin: a.control_stdin,
        track_writes: !a.no_track,
        disks,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Guest(GuestCommand::Run(args)) => {
            let cfg = match guest_config(*args) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("vmstream guest run: {e}");
                    return ExitCode::from(2);
                }
            };
            match vmstream::guest::file::run(&cfg, &mut std::io::stdout().lock()) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vmstream guest run: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Guest(GuestCommand::Verify(args)) => {
            match verify_guest(&args.memory_file, &args.disks) {
                Ok((r, disks)) => {
                    println!(
                        "ok kind={} blocks={} active={} tx={} replayed_journal={}",
                        r.kind.name(),
                        r.blocks,
                        r.active_blocks,
                        r.tx_count,
                        r.replayed_journal
                    );
                    if let Some(d) = disks {
                        println!("{}", vmstream::cli::verified::disks_line(&d));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vmstream guest verify: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Send(args) => vmstream::cli::run_send(&args),
        Command::Recv(args) => vmstream::cli::run_recv(&args),
        Command::Plot(args) => vmstream::cli::plot::run(&args),
        Command::Kvm(KvmCommand::Run(args)) => vmstream::cli::kvm::run(&args),
        Command::Kvm(KvmCommand::Verify(args)) => vmstream::cli::kvm::verify(&args),
    }
}
