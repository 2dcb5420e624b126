//! The `vmstream send` and `vmstream recv` command lines: clap arguments, turned into
//! [`SendConfig`] / [`RecvConfig`], run, reported (stats JSON, summary) and mapped to an
//! exit code: 0 committed, 1 failed, 3 cancelled (at the timeout, or by SIGINT/SIGTERM), 5
//! committed but the post-commit audit found stale pages.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::cli::notices::printer;
use crate::converge::policy::OnTimeout;
use crate::guest::file::disks::area::DiskWorkloadKind;
use crate::guest::file::disks::{workload_by_name, DiskParams, GuestDisks, DEFAULT_IO_RATE};
use crate::guest::file::layout::ImageWorkloadKind;
use crate::guest::file::source::{DirtyTracking, GuestSpec};
use crate::guest::file::workload::WorkloadParams;
use crate::guest::migratable::open_guest;
use crate::guest::qemu::{QemuAfter, QemuSpec};
use crate::migration::config::{
    encoder_config, parse_compression, DiskMode, DiskSchedule, DiskSettings, DiskTracking,
    RecvConfig, SendConfig, DEFAULT_DISK_GRANULARITY,
};
use crate::migration::connect::auth::AuthKey;
use crate::migration::dest::{
    check_config, listen, receive_on, run_resumed, QemuLaunch, RecvReport, ResumedRun,
};
use crate::migration::error::RecvError;
use crate::migration::image::ImageError;
use crate::migration::source::verify::VerifyMode;
use crate::migration::source::{hand_over, migrate, HandoverReport, Outcome, SendReport};
use crate::signals::new_stop_flag;
use crate::telemetry::stats::{MigrationOutcome, MigrationStats};
use crate::units::{parse_bandwidth, parse_duration, parse_size};

/// Exit code of a migration cancelled at its timeout or by SIGINT/SIGTERM.
pub const EXIT_CANCELLED: u8 = 3;

/// Exit code of a committed migration whose post-commit audit found pages the destination
/// holds stale copies of (both sides).
pub const EXIT_AUDIT_MISMATCH: u8 = 5;

/// Exit code of a sender stopped by an injected crash after the commit (only a binary built
/// with the `fault-injection` feature injects one).
pub const EXIT_CRASHED_AFTER_COMMIT: u8 = 70;

/// XBZRLE switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// What a KVM guest does after a failed or cancelled migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnFailure {
    /// Keep running in the sending process (until SIGINT/SIGTERM or --keep-running-for).
    KeepRunning,
    /// Stop the guest and exit.
    Stop,
}

/// What becomes of the source QEMU after a successful migration (`send --qemu-after`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuAfterArg {
    /// `quit` it.
    Quit,
    /// Leave it paused.
    Pause,
}

/// The destination QEMU once its device state is loaded (`recv --qemu-start`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuStartArg {
    /// Continue it.
    Running,
    /// Leave it paused.
    Paused,
}

/// Arguments of `vmstream send`.
#[derive(Args, Debug, Clone)]
pub struct SendArgs {
    /// Guest memory file (created for a new guest; the attached guest's file with --pid;
    /// optional with --kvm: RAM is a memfd without it).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["kvm", "qemu"], conflicts_with = "qemu")]
    pub memory_file: Option<PathBuf>,
    /// Memory size of the guest to start (K/M/G suffixes).
    #[arg(long, value_parser = parse_size, required_unless_present_any = ["pid", "qemu"], conflicts_with_all = ["pid", "qemu"])]
    pub size: Option<u64>,
    /// Workload of the guest to start: dbsim, random, sequential, hotset, idle, diskio
    /// (KVM: dbsim, random, hotset, idle, filedb, diskio).
    #[arg(long, default_value = "dbsim")]
    pub workload: String,
    /// Target transactions per second of the started guest (0 = as fast as possible).
    #[arg(long, value_name = "TX/s", conflicts_with = "kvm")]
    pub rate: Option<u64>,
    /// Percent of the started guest's blocks to format and write; the rest stays zero
    /// (default: the workload's own, 75).
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
    pub active: Option<u8>,
    /// Migrate a running guest vmstream did not start (it writes --memory-file).
    #[arg(long, conflicts_with = "kvm")]
    pub pid: Option<u32>,
    /// A disk of the guest (a raw image file, a multiple of 4 KiB), migrated with its
    /// memory; repeat for more (at most 16), in the order recv names them. A guest send
    /// starts writes them (created with --disk-size if missing): --workload dbsim runs its
    /// disk mode on them, diskio writes only them (with --kvm: through the VMM's
    /// paravirtual block device).
    #[arg(long = "disk", value_name = "PATH")]
    pub disks: Vec<PathBuf>,
    /// Size of each disk of the started guest that does not exist yet (K/M/G).
    #[arg(long, value_parser = parse_size)]
    pub disk_size: Option<u64>,
    /// diskio: bytes per write of the started guest (4K to 1M, a power of two).
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    pub io_size: u64,
    /// Disk write rate of the started guest in bytes/s (K/M/G; 0 = unlimited) [default: 4M].
    #[arg(long, value_name = "BYTES/s", value_parser = parse_size)]
    pub io_rate: Option<u64>,
    /// Dirty tracking: uffd-wp (default for started guests) or hash (default with --pid).
    #[arg(long, value_parser = parse_tracking, conflicts_with = "kvm")]
    pub dirty_tracking: Option<DirtyTracking>,
    /// Start a KVM guest in this process (vmstream/KVM.md) and migrate it.
    #[arg(long)]
    pub kvm: bool,
    /// Migrate the QEMU VM whose QMP socket this is (vmstream/QEMU.md): its RAM must be
    /// one shared memory-backend-file; vmstream moves the RAM, QEMU the device state
    /// (x-ignore-shared) once the destination committed the RAM.
    #[arg(long, value_name = "QMP_SOCKET", conflicts_with_all = ["kvm", "pid", "handover"])]
    pub qemu: Option<PathBuf>,
    /// The source QEMU after a successful migration: quit, or pause (left stopped).
    #[arg(long, value_enum, default_value = "quit", requires = "qemu")]
    pub qemu_after: QemuAfterArg,
    /// How --converge throttles the vCPU threads alone: auto, cgroup (v1) or ptrace.
    #[arg(long, value_name = "HOW", default_value = "auto", requires = "qemu")]
    pub vcpu_throttle: crate::guest::qemu::throttle::VcpuThrottleMode,
    /// vCPUs of the KVM guest.
    #[arg(long, default_value_t = 2, requires = "kvm")]
    pub vcpus: usize,
    /// KVM dirty tracking: bitmap (GET_DIRTY_LOG), clear (manual protect, re-armed per
    /// 2 MiB chunk right before sending it) or ring (per-vCPU dirty rings).
    #[arg(long, value_parser = crate::cli::kvm::parse_dirty_log, default_value = "clear", requires = "kvm")]
    pub dirty_log: crate::guest::kvm::DirtyLogMode,
    /// KVM guest after a failed or cancelled migration: keep-running (in this process,
    /// which then exits non-zero when it stops) or stop.
    #[arg(long, value_enum, default_value = "keep-running", requires = "kvm")]
    pub on_failure: OnFailure,
    /// With --on-failure keep-running: stop the guest after this long (default: run until
    /// SIGINT/SIGTERM).
    #[arg(long, value_parser = parse_duration, requires = "kvm")]
    pub keep_running_for: Option<Duration>,
    /// Let the started guest run this long before migrating (ms/s/m).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub warmup: Duration,
    /// Destination address HOST:PORT, or unix:PATH (a unix socket on this host).
    #[arg(long, value_name = "ADDR")]
    pub to: String,
    /// Same-host move over a unix socket (--to unix:PATH): pause the guest and hand its
    /// memory over by file descriptor instead of copying it; the destination runs the guest
    /// on that same memory.
    #[arg(long)]
    pub handover: bool,
    /// Full-page compression: lz4, zstd, zlib, none.
    #[arg(long, default_value = "lz4")]
    pub compress: String,
    /// Compression level (lz4: acceleration; zstd, zlib: level).
    #[arg(long)]
    pub compress_level: Option<i32>,
    /// XBZRLE deltas against a page cache.
    #[arg(long, value_enum, default_value = "on")]
    pub xbzrle: OnOff,
    /// XBZRLE page cache size (K/M/G) [default: half the guest, 64M to 1G]
    #[arg(long, value_parser = parse_size)]
    pub xbzrle_cache: Option<u64>,
    /// Encode threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Pages per packet.
    #[arg(long, default_value_t = 128)]
    pub batch_pages: usize,
    /// Switch over once the expected downtime is within this (ms/s).
    #[arg(long, value_parser = parse_duration, default_value = "300ms")]
    pub downtime_limit: Duration,
    /// Emulate a slower link: bytes/s (25MB = 25,000,000 as in QEMU; 100M or 100MiB =
    /// 100 MiB) or bits/s (1Gbit).
    #[arg(long, value_parser = parse_bw)]
    pub max_bandwidth: Option<u64>,
    /// Give up or force the switchover after this long (see --on-timeout).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// What happens at the timeout: cancel (the source keeps running) or force.
    #[arg(long, value_parser = parse_on_timeout, default_value = "cancel")]
    pub on_timeout: OnTimeout,
    /// Longest wait for the destination on the socket: for a whole frame to arrive.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub io_timeout: Duration,
    /// Longest pause of the guest, from its stop to the destination's commit reply; past
    /// it the guest resumes and the migration fails. [default: 10 x --downtime-limit, at
    /// least 10s, at most --io-timeout; a forced switchover: --io-timeout]
    #[arg(long, value_parser = parse_duration)]
    pub pause_timeout: Option<Duration>,
    /// Write statistics as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Parallel TCP connections (like QEMU's multifd); pages are sharded over them.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=16))]
    pub channels: u16,
    /// Pre-shared key file (16 to 4096 random bytes): authenticate the destination and
    /// prove this key to it on every connection, then encrypt and authenticate the stream
    /// (AES-256-GCM); recv needs the same file.
    #[arg(long, value_name = "FILE")]
    pub auth_key_file: Option<PathBuf>,
    /// How the destination's memory is proven equal to ours at the pause: `full` hashes
    /// all memory in the pause; `incremental` digests the pages as sent, scrubs clean pages
    /// in the background and audits all memory after the commit; `strict` is incremental
    /// but waits for a scrub pass and fails on a missed write; `auto` is `full` when that
    /// fits in a fifth of the pause aimed at (--downtime-target, at most the limit).
    #[arg(long, value_enum, default_value_t = VerifyMode::Auto)]
    pub verify: VerifyMode,
    /// Send without --auth-key-file to an address that is not loopback (refused
    /// otherwise: whatever answers there gets the guest's memory).
    #[arg(long)]
    pub insecure: bool,
    /// Post-copy (POSTCOPY.md): `now` resumes the guest at the destination right after
    /// round 0 and sends its remaining pages as it touches them and in the background;
    /// `auto` iterates first and switches to post-copy instead of throttling the guest or
    /// giving up at --timeout. The destination needs --resume and a --memory-file on tmpfs.
    #[arg(long, value_parser = crate::migration::PostcopyMode::parse, default_value = "off")]
    pub postcopy: crate::migration::PostcopyMode,
    /// Post-copy: the background stream of owed pages at most this fast, bytes/s (100M) or
    /// bits/s (1Gbit); pages the guest faulted on are not held to it.
    #[arg(long, value_parser = parse_bw)]
    pub postcopy_bandwidth: Option<u64>,
    /// Post-copy: after the link drops, reconnect (with backoff) for this long before
    /// saying the guest cannot continue; the destination keeps the guest blocked on its
    /// faults meanwhile (0: give up at once).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub postcopy_recover_timeout: Duration,
    /// Post-copy: pages the guest faulted on travel on a connection of their own, not
    /// behind the background stream (QEMU's postcopy-preempt; one --channels only).
    #[arg(long, value_enum, default_value = "on")]
    pub postcopy_preempt: OnOff,
    /// Throttling strategy and hot-page deferral.
    #[command(flatten)]
    pub converge: crate::cli::converge::ConvergeArgs,
    /// Dirty-tracking granule of the disks: a power of two from 4K to 1M [default: with
    /// builtin tracking the guest's bitmaps' (64K for a guest send starts), else 64K].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub disk_granularity: Option<u64>,
    /// How the disks' dirty granules are found: builtin (the dirty bitmap the guest's
    /// block layer marks; the default for a guest send starts with --workload dbsim or
    /// diskio) or hash (per-page content hashes: any writer; the default otherwise).
    #[arg(long, value_enum)]
    pub disk_tracking: Option<DiskTrackingArg>,
    /// How disks and memory share the link: slices (the disks' bulk copy first, memory
    /// iterated after) or parallel (side by side, QEMU's way).
    #[arg(long, value_enum, default_value = "slices")]
    pub disk_schedule: DiskScheduleArg,
    /// iterate (resend dirty granules round by round) or mirror (after the bulk copy every
    /// guest write returns only once the destination has it, on a connection of its own;
    /// the disks converge whatever the guest writes, at the cost of its write latency;
    /// builtin tracking only).
    #[arg(long, value_enum, default_value = "iterate")]
    pub disk_mode: DiskModeArg,
    /// Disk write QoS: when the disks' dirty backlog stops shrinking, cap the guest's disk
    /// writes through its block layer (halved each round it still does not shrink, lifted
    /// as it drains); builtin tracking only.
    #[arg(long, value_enum, default_value = "on")]
    pub disk_qos: OnOff,
}

/// `--disk-tracking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiskTrackingArg {
    /// The block layer's dirty bitmap.
    Builtin,
    /// Content hashes of the disk file.
    Hash,
}

/// `--disk-schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiskScheduleArg {
    /// Disk bulk copy first, then memory.
    Slices,
    /// Side by side.
    Parallel,
}

/// `--disk-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiskModeArg {
    /// Dirty rounds.
    Iterate,
    /// Write-through mirroring (the guest's writes wait for the destination).
    Mirror,
}

/// Arguments of `vmstream recv`.
#[derive(Args, Debug, Clone)]
pub struct RecvArgs {
    /// Listen address: PORT or :PORT (127.0.0.1), HOST:PORT (not loopback: needs
    /// --auth-key-file, or --insecure), or unix:PATH (a unix socket; a stale socket file
    /// there is replaced).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Where the committed guest memory goes (replaced atomically on commit): a regular
    /// file or a new name, in a directory that exists. While the receive runs its
    /// temporary image .NAME.vmstream-recv-PID beside it is locked; a second receive into
    /// the same file refuses to start. Optional with --resume: then only a handover (send
    /// --handover) is taken, and the guest runs on the source's own memory file or memfd;
    /// given, a handed-over memory is copied into PATH and runs there. With --qemu: once per
    /// RAM backend, in the order of their ids ({memory0}, {memory1}...; see QEMU.md).
    #[arg(long, value_name = "PATH")]
    pub memory_file: Vec<PathBuf>,
    /// Run the guest on the received memory after the commit (verifies it first).
    #[arg(long)]
    pub resume: bool,
    /// Stop the resumed guest after this long (default: run until stopped).
    #[arg(long, value_parser = parse_duration, requires = "resume")]
    pub run_for: Option<Duration>,
    /// Write statistics as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// Decode threads (default: the sender's thread count).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Refuse a guest whose memory size differs (K/M/G; a non-zero multiple of 4096).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Refuse a guest larger than this (K/M/G) in the handshake, before anything is
    /// allocated for it [default: --size if given, else the host's physical memory].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_guest_size: Option<u64>,
    /// Longest wait for the source on the socket.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub io_timeout: Duration,
    /// Pre-shared key file (16 to 4096 random bytes): admit only a source that proves
    /// this key, prove it to the source, then encrypt and authenticate the stream
    /// (AES-256-GCM); send needs the same file.
    #[arg(long, value_name = "FILE")]
    pub auth_key_file: Option<PathBuf>,
    /// Listen without --auth-key-file on an address that is not loopback (refused
    /// otherwise: anyone who can reach it can write a guest image here).
    #[arg(long)]
    pub insecure: bool,
    /// Receive a QEMU VM (send --qemu) and run it here with this QEMU command line (run
    /// by sh), `{memory}` where its memory-backend-file's mem-path goes (several
    /// backends: `{memory0}`, `{memory1}`..., one --memory-file each); vmstream adds
    /// -incoming defer and -qmp unix:PATH.qmp (PATH: --memory-file), starts it during the
    /// first round, and exits once it runs, leaving it running. Implies --resume.
    #[arg(long, value_name = "COMMAND LINE", requires = "memory_file")]
    pub qemu: Option<String>,
    /// Where the destination QEMU takes the device state (a QEMU migration URI, told to
    /// the source) [default: unix:PATH.migrate].
    #[arg(long, value_name = "URI", requires = "qemu")]
    pub qemu_incoming: Option<String>,
    /// The destination QEMU once its device state is loaded: running (continued), or
    /// paused (for the operator's QMP cont).
    #[arg(long, value_enum, default_value = "running", requires = "qemu")]
    pub qemu_start: QemuStartArg,
    /// Where each of the source's disks goes (same order as send's --disk; committed
    /// together with the memory, or none is).
    #[arg(long = "disk", value_name = "PATH")]
    pub disks: Vec<PathBuf>,
}

fn parse_tracking(s: &str) -> Result<DirtyTracking, String> {
    match s {
        "uffd-wp" | "uffd" => Ok(DirtyTracking::UffdWp),
        "hash" => Ok(DirtyTracking::Hash),
        _ => Err(format!("unknown dirty tracking {s:?} (uffd-wp, hash)")),
    }
}

fn parse_on_timeout(s: &str) -> Result<OnTimeout, String> {
    match s {
        "cancel" => Ok(OnTimeout::Cancel),
        "force" => Ok(OnTimeout::Force),
        _ => Err(format!("unknown timeout strategy {s:?} (cancel, force)")),
    }
}

fn parse_bw(s: &str) -> Result<u64, String> {
    match parse_bandwidth(s) {
        Ok(0) => Err("bandwidth must be above 0".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(e.to_string()),
    }
}

impl SendArgs {
    /// The memory workload and the disks of the guest to start.
    fn started_guest_workload(&self) -> Result<(ImageWorkloadKind, GuestDisks), String> {
        let (kind, disk_kind) = workload_by_name(&self.workload)
            .ok_or_else(|| format!("unknown workload {:?}", self.workload))?;
        if disk_kind == Some(DiskWorkloadKind::Diskio) && self.disks.is_empty() {
            return Err("--workload diskio needs at least one --disk".into());
        }
        // A workload without a disk mode leaves the disks to other writers: the guest
        // does not open them, the migration moves them (hash tracking).
        let disks = GuestDisks {
            paths: if disk_kind.is_some() {
                self.disks.clone()
            } else {
                Vec::new()
            },
            create_size: self.disk_size,
            // The guest's bitmaps at the granularity asked for (the sender drops a stale
            // bitmap of another one before the guest starts).
            granularity: self.disk_granularity.or(Some(DEFAULT_DISK_GRANULARITY)),
            workload: disk_kind
                .filter(|_| !self.disks.is_empty())
                .map(|kind| DiskParams {
                    kind,
                    io_size: self.io_size,
                    io_rate: self.io_rate.unwrap_or(DEFAULT_IO_RATE),
                    seed: WorkloadParams::new(ImageWorkloadKind::Idle).seed,
                }),
        };
        Ok((kind, disks))
    }

    /// The configuration these arguments describe.
    pub fn to_config(&self) -> Result<SendConfig, String> {
        let memory_file = || {
            self.memory_file
                .clone()
                .ok_or_else(|| "--memory-file is required without --kvm".to_string())
        };
        let guest = match (self.pid, self.size) {
            _ if self.qemu.is_some() => GuestSpec::Qemu(QemuSpec {
                qmp: self.qemu.clone().expect("checked"),
                after: match self.qemu_after {
                    QemuAfterArg::Quit => QemuAfter::Quit,
                    QemuAfterArg::Pause => QemuAfter::Pause,
                },
                migrate_timeout: self.io_timeout,
                vcpu_throttle: self.vcpu_throttle,
            }),
            (_, Some(size)) if self.kvm => GuestSpec::Kvm(crate::cli::kvm::send_spec(self, size)?),
            (Some(pid), _) => GuestSpec::Attach {
                path: memory_file()?,
                pid,
            },
            (None, Some(size)) => {
                let (workload, disks) = self.started_guest_workload()?;
                GuestSpec::Spawn {
                    path: memory_file()?,
                    size,
                    workload,
                    rate: self.rate,
                    active: self.active,
                    guest_exe: None,
                    disks,
                }
            }
            (None, None) => return Err("--size is required without --pid".into()),
        };
        let compression = parse_compression(&self.compress, self.compress_level)?;
        if self.threads == Some(0) {
            return Err("--threads must be at least 1".into());
        }
        let mut cfg = SendConfig::new(guest, self.to.clone());
        cfg.dirty_tracking = self.dirty_tracking;
        cfg.warmup = self.warmup;
        cfg.encoder = encoder_config(
            compression,
            self.xbzrle == OnOff::On,
            vmstream_codec::DEFAULT_CACHE_BYTES,
        );
        cfg.xbzrle_cache = self.xbzrle_cache;
        if let Some(t) = self.threads {
            cfg.threads = t;
        }
        cfg.batch_pages = self.batch_pages;
        cfg.downtime_limit = self.downtime_limit;
        cfg.max_bandwidth = self.max_bandwidth;
        cfg.timeout = self.timeout;
        cfg.on_timeout = self.on_timeout;
        cfg.io_timeout = self.io_timeout;
        cfg.pause_timeout = self.pause_timeout;
        cfg.stats_json = self.stats_json.clone();
        cfg.progress = !self.no_progress;
        cfg.converge = self.converge.to_config();
        cfg.channels = self.channels as usize;
        cfg.handover = self.handover;
        cfg.auth_key = read_key(self.auth_key_file.as_deref())?;
        cfg.verify = self.verify;
        cfg.postcopy = self.postcopy;
        cfg.postcopy_bandwidth = self.postcopy_bandwidth;
        cfg.postcopy_recover_timeout = self.postcopy_recover_timeout;
        cfg.postcopy_preempt = self.postcopy_preempt == OnOff::On;
        cfg.insecure = self.insecure;
        cfg.disks = self.disks.clone();
        // A started guest that writes its disks marks their bitmaps: builtin by default.
        let guest_writes_disks = match &cfg.guest {
            GuestSpec::Spawn { disks, .. } => disks.workload.is_some(),
            GuestSpec::Kvm(k) => k.disks.workload.is_some(),
            _ => false,
        };
        cfg.disk_settings = DiskSettings {
            granularity: self.disk_granularity,
            tracking: match self.disk_tracking {
                Some(DiskTrackingArg::Builtin) => DiskTracking::Builtin,
                Some(DiskTrackingArg::Hash) => DiskTracking::Hash,
                None if guest_writes_disks => DiskTracking::Builtin,
                None => DiskTracking::Hash,
            },
            schedule: match self.disk_schedule {
                DiskScheduleArg::Slices => DiskSchedule::Slices,
                DiskScheduleArg::Parallel => DiskSchedule::Parallel,
            },
            mode: match self.disk_mode {
                DiskModeArg::Iterate => DiskMode::Iterate,
                DiskModeArg::Mirror => DiskMode::Mirror,
            },
            qos: self.disk_qos == OnOff::On,
        };
        #[cfg(feature = "fault-injection")]
        {
            cfg.faults = crate::cli::fault_env::source_faults()?;
        }
        cfg.check()?;
        Ok(cfg)
    }
}

impl RecvArgs {
    /// The configuration these arguments describe, checked ([`check_config`]: listen
    /// address, size, memory file) before anything is created or bound.
    pub fn to_config(&self) -> Result<RecvConfig, String> {
        let mut cfg = RecvConfig::new(self.listen.clone(), PathBuf::new());
        cfg.memory_file = self.memory_file.first().cloned();
        cfg.memory_regions = self.memory_file.iter().skip(1).cloned().collect();
        cfg.resume = self.resume || self.qemu.is_some();
        cfg.run_for = self.run_for;
        if let (Some(command), Some(path)) = (&self.qemu, self.memory_file.first()) {
            let mut launch = QemuLaunch::beside(command.clone(), path);
            if let Some(uri) = &self.qemu_incoming {
                launch.incoming = uri.clone();
            }
            launch.timeout = self.io_timeout;
            launch.start_paused = self.qemu_start == QemuStartArg::Paused;
            cfg.qemu = Some(launch);
        }
        cfg.stats_json = self.stats_json.clone();
        cfg.threads = self.threads;
        cfg.expect_size = self.size;
        cfg.max_size = self.max_guest_size;
        cfg.io_timeout = self.io_timeout;
        cfg.auth_key = read_key(self.auth_key_file.as_deref())?;
        cfg.insecure = self.insecure;
        cfg.disks = self.disks.clone();
        check_config(&cfg).map_err(|e| match e {
            RecvError::Image(ImageError::Unusable { path, why }) => {
                format!("--memory-file {}: {why}", path.display())
            }
            other => other.to_string(),
        })?;
        Ok(cfg)
    }
}

/// The key of `--auth-key-file`; warns when other users may read the file.
fn read_key(path: Option<&std::path::Path>) -> Result<Option<AuthKey>, String> {
    let Some(path) = path else { return Ok(None) };
    let key = AuthKey::from_file(path).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "vmstream: warning: the key file {} is accessible to other users \
                 (chmod 600 it)",
                path.display()
            );
        }
    }
    Ok(Some(key))
}

fn finish_report(stats: &MigrationStats, json: Option<&PathBuf>, who: &str) {
    if let Some(path) = json {
        if let Err(e) = stats.write_json(path) {
            eprintln!("vmstream {who}: writing {}: {e}", path.display());
        }
    }
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{}", stats.summary());
    let _ = out.flush();
}

/// [`new_stop_flag`] for `vmstream WHO`; `None` after saying why it failed.
fn interrupt_flag(who: &str) -> Option<Arc<AtomicBool>> {
    new_stop_flag()
        .map_err(|e| eprintln!("vmstream {who}: handling SIGINT/SIGTERM: {e}"))
        .ok()
}

/// `vmstream send`: start (or attach to) the guest, warm it up, migrate it.
pub fn run_send(args: &SendArgs) -> ExitCode {
    let mut cfg = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmstream send: {e}");
            return ExitCode::from(2);
        }
    };
    // From here SIGINT and SIGTERM cancel the migration, and the guest keeps running, rather
    // than end this process (and with it a KVM guest, or a paused guest process's resume).
    // Taken before the guest starts: a signal while it starts must not orphan it unnamed.
    let Some(flag) = interrupt_flag("send") else {
        return ExitCode::FAILURE;
    };
    cfg.cancel = Some(flag);
    cfg.notices = printer("send");
    let mut guest = match open_guest(&cfg.guest, cfg.dirty_tracking, &cfg.notices) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("vmstream send: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", guest.describe());
    let _ = std::io::stdout().flush();
    // A signal during the warm-up ends it, and the migration then cancels at once.
    let (SendReport { stats, result }, kept) = if cfg.handover {
        // The guest goes with its memory: after a commit nothing of it is left here.
        let HandoverReport { report, guest } = hand_over(&cfg, guest);
        (report, guest)
    } else {
        let report = migrate(&cfg, guest.as_mut());
        (report, Some(guest))
    };
    let note = || kept.as_ref().map_or_else(String::new, |g| g.failure_note());
    let code = match result {
        Ok(Outcome::Committed) if audit_mismatch(&stats) => ExitCode::from(EXIT_AUDIT_MISMATCH),
        Ok(Outcome::Committed) => ExitCode::SUCCESS,
        Ok(Outcome::CrashedAfterCommit) => {
            // As a killed process would: no report, the guest left as it is (paused).
            eprintln!("vmstream send: injected crash after the commit: exiting as if crashed");
            std::process::exit(EXIT_CRASHED_AFTER_COMMIT.into());
        }
        Ok(Outcome::Cancelled(reason)) => {
            eprintln!("vmstream send: cancelled: {reason}; {}", note());
            ExitCode::from(EXIT_CANCELLED)
        }
        // Our guest ended at the post-copy's handover: no note on it.
        Err(e @ crate::migration::error::SendError::PostcopyLost(_)) => {
            eprintln!("vmstream send: migration failed: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vmstream send: migration failed: {e}; {}", note());
            ExitCode::FAILURE
        }
    };
    finish_report(&stats, cfg.stats_json.as_ref(), "send");
    if let (false, Some(guest)) = (code == ExitCode::SUCCESS, kept) {
        // The guest runs again: a guest process goes on by itself, a KVM guest keeps
        // running here (this may block until SIGINT/SIGTERM).
        guest.keep_after_failure();
    }
    code
}

/// `vmstream recv`: receive one migration, commit it, optionally run the guest.
pub fn run_recv(args: &RecvArgs) -> ExitCode {
    let mut cfg = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmstream recv: {e}");
            return ExitCode::from(2);
        }
    };
    // Until the receive ends, SIGINT and SIGTERM end it cleanly: nothing committed, the
    // temporary image removed, the source told.
    let Some(flag) = interrupt_flag("recv") else {
        return ExitCode::FAILURE;
    };
    cfg.cancel = Some(flag);
    cfg.notices = printer("recv");
    // Refused before listening (the memory file in use by another receive, the address
    // taken): nothing was received, so no summary.
    let listening = match listen(&cfg) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vmstream recv: {e}");
            return ExitCode::from(match e {
                RecvError::Config(_)
                | RecvError::Image(ImageError::Unusable { .. } | ImageError::BadPath(_)) => 2,
                _ => 1,
            });
        }
    };
    let RecvReport { mut stats, result } = receive_on(&cfg, listening);
    let received = match result {
        Ok(r) => r,
        // After the commit (a guest that did not resume) the image stays committed.
        Err(e) if stats.outcome == MigrationOutcome::Committed => {
            eprintln!(
                "vmstream recv: committed {}, but {e}",
                cfg.memory_file
                    .as_ref()
                    .map_or("the handed-over memory".into(), |p| p.display().to_string())
            );
            finish_report(&stats, cfg.stats_json.as_ref(), "recv");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("vmstream recv: migration failed: {e}; nothing committed");
            finish_report(&stats, cfg.stats_json.as_ref(), "recv");
            return ExitCode::FAILURE;
        }
    };
    finish_report(&stats, cfg.stats_json.as_ref(), "recv");
    let success = if audit_mismatch(&stats) {
        ExitCode::from(EXIT_AUDIT_MISMATCH)
    } else {
        ExitCode::SUCCESS
    };
    if let Some(q) = &received.qemu {
        println!(
            "qemu {} pid={} qmp={} log={}",
            if q.paused { "paused" } else { "running" },
            q.pid,
            q.qmp.display(),
            q.log.display()
        );
    }
    if received.kvm.is_none() && received.guest.is_some() {
        // "Until stopped": from now on SIGTERM / SIGINT end the resumed guest cleanly and
        // we exit 0 if it is healthy.
        if let Err(e) = crate::signals::stop_running_guests_on_signals() {
            eprintln!("vmstream recv: warning: SIGTERM/SIGINT will kill the guest: {e}");
        }
    }
    let run = match run_resumed(received, &cfg, &mut stats) {
        None => return success,
        Some(Ok(run)) => run,
        Some(Err(e)) => {
            eprintln!("vmstream recv: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run {
        ResumedRun::Kvm(r) => println!(
            "verify ok tx={} resumed_from={} blocks={} written_blocks={}{}",
            r.tx_end,
            r.tx_start,
            r.verified.blocks,
            r.verified.written_blocks,
            super::verified::disks_summary(r.disks.as_ref())
        ),
        ResumedRun::File {
            tx_start,
            report,
            disks,
        } => println!(
            "verify ok tx={} resumed_from={tx_start} blocks={}{}",
            report.tx_count,
            report.blocks,
            super::verified::disks_summary(disks.as_ref())
        ),
    }
    if let Some(p) = &cfg.stats_json {
        let _ = stats.write_json(p);
    }
    success
}

/// Whether the post-commit audit found stale pages at the destination.
fn audit_mismatch(stats: &MigrationStats) -> bool {
    stats.verify.as_ref().is_some_and(|v| v.audit_mismatch())
}
