//! Settings of both sides, built by the CLI (see [`crate::cli::migration`]) or by library callers.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use vmstream_codec::{Compression, DeltaConfig, DeltaMode, EncoderConfig, DEFAULT_CACHE_BYTES};

use crate::converge::policy::OnTimeout;
use crate::converge::ConvergeConfig;
use crate::guest::file::source::{DirtyTracking, GuestSpec};
use crate::memory::PAGE_SIZE;
use crate::migration::connect::auth::AuthKey;
use crate::migration::connect::channels::send::sender_config;
use crate::migration::connect::exposure::{check_keyless, SEND_RISK};
use crate::migration::fault::{DestFaults, SourceFaults};
use crate::migration::source::verify::{ScrubSettings, VerifyMode};
use crate::migration::transport::unix_path;
use crate::migration::wire::DeltaWire;
use crate::telemetry::notice::Notices;

/// The least default pause bound ([`SendConfig::pause_bound`]).
pub const PAUSE_FLOOR: Duration = Duration::from_secs(10);

/// When the source switches to post-copy (`send --postcopy`, `POSTCOPY.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PostcopyMode {
    /// Pre-copy only.
    #[default]
    Off,
    /// Right after round 0.
    Now,
    /// Pre-copy first; post-copy when the convergence policy would otherwise start
    /// throttling the guest, or at `--timeout`.
    Auto,
}

impl PostcopyMode {
    /// Parses `off`, `now` or `auto`.
    pub fn parse(s: &str) -> Result<PostcopyMode, String> {
        match s {
            "off" => Ok(PostcopyMode::Off),
            "now" => Ok(PostcopyMode::Now),
            "auto" => Ok(PostcopyMode::Auto),
            other => Err(format!("unknown post-copy mode {other:?} (off, now, auto)")),
        }
    }

    /// The name `parse` takes.
    pub fn name(self) -> &'static str {
        match self {
            PostcopyMode::Off => "off",
            PostcopyMode::Now => "now",
            PostcopyMode::Auto => "auto",
        }
    }
}

/// How the dirty granules of a migrated disk are found (`--disk-tracking`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskTracking {
    /// The block layer's dirty bitmap, shared with the guest that writes through it.
    Builtin,
    /// Per-page content hashes of the disk file (any writer; `track::HashDiskTracker`).
    Hash,
}

/// How disk and memory share the link (`--disk-schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskSchedule {
    /// The disks' bulk copy (and their dirty rounds while they shrink) first, memory not
    /// iterated meanwhile; then memory and the disks' dirty granules round by round.
    Slices,
    /// Memory's and the disks' rounds side by side from round 0 (QEMU's way).
    Parallel,
}

/// What happens to guest writes after a disk's bulk copy (`--disk-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskMode {
    /// Dirty granules are resent round by round.
    Iterate,
    /// After the bulk copy every guest write is also sent to the destination before it
    /// completes (write-through mirroring, builtin tracking only; `STORAGE.md`).
    Mirror,
}

/// The default dirty granule of a disk (`--disk-granularity`).
pub const DEFAULT_DISK_GRANULARITY: u64 = 64 << 10;

/// How the source migrates its disks.
#[derive(Debug, Clone)]
pub struct DiskSettings {
    /// Dirty granule in bytes: a power of two in 4 KiB..=1 MiB. `None`: the bitmap's with
    /// builtin tracking (all disks' must agree), else [`DEFAULT_DISK_GRANULARITY`].
    pub granularity: Option<u64>,
    /// How dirty granules are found.
    pub tracking: DiskTracking,
    /// How disk and memory share the link.
    pub schedule: DiskSchedule,
    /// Iterate or mirror.
    pub mode: DiskMode,
    /// Disk write QoS: cap the guest's disk writes when the disks' backlog stops
    /// shrinking (builtin tracking only; `--disk-qos`).
    pub qos: bool,
}

impl Default for DiskSettings {
    fn default() -> Self {
        DiskSettings {
            granularity: None,
            tracking: DiskTracking::Hash,
            schedule: DiskSchedule::Slices,
            mode: DiskMode::Iterate,
            qos: true,
        }
    }
}

impl DiskSettings {
    /// Refuses what this build cannot do with `disks`, before anything starts; a disk
    /// that does not exist yet is fine if the guest to start creates it (`creates`: its
    /// `--disk-size`, when the started guest writes the disks).
    pub fn check(&self, disks: &[PathBuf], creates: Option<u64>) -> Result<(), String> {
        use crate::migration::wire::{MAX_DISKS, MAX_DISK_GRANULARITY, MIN_DISK_GRANULARITY};
        if let Some(g) = self.granularity {
            if !g.is_power_of_two() || !(MIN_DISK_GRANULARITY..=MAX_DISK_GRANULARITY).contains(&g) {
                return Err(format!(
                    "--disk-granularity {g}: must be a power of two from 4 KiB to 1 MiB \
                     (4096 to 1048576 bytes)"
                ));
            }
        }
        if disks.len() > MAX_DISKS {
            return Err(format!("{} --disk given: at most {MAX_DISKS}", disks.len()));
        }
        if disks.is_empty() {
            return Ok(());
        }
        if self.mode == DiskMode::Mirror && self.tracking != DiskTracking::Builtin {
            return Err(
                "--disk-mode mirror needs --disk-tracking builtin: only the guest's \
                 block layer can wait for the destination"
                    .into(),
            );
        }
        for d in disks {
            let len = match (std::fs::metadata(d), creates) {
                (Ok(m), _) => m.len(),
                (Err(e), Some(size)) if e.kind() == std::io::ErrorKind::NotFound => size,
                (Err(e), _) => return Err(format!("--disk {}: {e}", d.display())),
            };
            if len == 0 || !len.is_multiple_of(PAGE_SIZE as u64) {
                return Err(format!(
                    "--disk {}: its size {len} is not a non-zero multiple of {PAGE_SIZE} bytes",
                    d.display()
                ));
            }
        }
        Ok(())
    }
}

/// Everything `vmstream send` needs.
#[derive(Debug, Clone)]
pub struct SendConfig {
    /// The guest to migrate.
    pub guest: GuestSpec,
    /// Dirty tracking (None: uffd-wp for a spawned guest, hash for `--pid`).
    pub dirty_tracking: Option<DirtyTracking>,
    /// Destination address (`host:port`, or `unix:PATH` for a unix socket).
    pub to: String,
    /// Hand the guest's memory over by descriptor instead of copying it (`--handover`,
    /// unix sockets only; `crate::migration::source::handover`).
    pub handover: bool,
    /// How long the spawned guest runs before the migration starts.
    pub warmup: Duration,
    /// Compression and page cache (its size is [`SendConfig::cache_bytes`]'s, set when the
    /// guest's size is known).
    pub encoder: EncoderConfig,
    /// The XBZRLE page cache's size in bytes (`--xbzrle-cache`); `None` sizes it from the
    /// guest ([`auto_cache_bytes`]).
    pub xbzrle_cache: Option<u64>,
    /// Encode workers.
    pub threads: usize,
    /// Pages per packet.
    pub batch_pages: usize,
    /// Largest acceptable expected downtime.
    pub downtime_limit: Duration,
    /// Emulated link speed in bytes/s.
    pub max_bandwidth: Option<u64>,
    /// Total migration time before `on_timeout` applies.
    pub timeout: Option<Duration>,
    /// Strategy when the timeout expires.
    pub on_timeout: OnTimeout,
    /// Longest wait for the peer on the socket: for a whole frame to arrive.
    pub io_timeout: Duration,
    /// Longest pause of the guest from the instant it stops to the destination's commit
    /// reply (`None`: [`SendConfig::pause_bound`]'s default); past it the guest resumes.
    pub pause_timeout: Option<Duration>,
    /// Where to write statistics JSON.
    pub stats_json: Option<PathBuf>,
    /// Tell the rounds' progress ([`crate::telemetry::progress`]) to `notices`.
    pub progress: bool,
    /// Guest throttling strategy and hot-page deferral (`crate::converge`).
    pub converge: ConvergeConfig,
    /// Parallel TCP connections (`crate::migration::connect::channels`), 1 to 16.
    pub channels: usize,
    /// Pre-shared key: authenticate every connection with it (`crate::migration::connect::auth`).
    pub auth_key: Option<AuthKey>,
    /// How the destination's memory is proven equal to ours (`--verify`).
    pub verify: VerifyMode,
    /// The incremental modes' scrubber.
    pub scrub: ScrubSettings,
    /// Post-copy (`--postcopy`).
    pub postcopy: PostcopyMode,
    /// Post-copy's background stream of owed pages, bytes/s (`--postcopy-bandwidth`;
    /// requested pages are not held to it). None: as fast as the link.
    pub postcopy_bandwidth: Option<u64>,
    /// Post-copy: how long the source tries to reconnect (with backoff) after the link
    /// dropped (`--postcopy-recover-timeout`; zero: it gives up at once).
    pub postcopy_recover_timeout: Duration,
    /// Post-copy's requested pages on a connection of their own (`--postcopy-preempt`;
    /// with one channel only).
    pub postcopy_preempt: bool,
    /// Send without a key to an address others can reach (`--insecure`); refused
    /// otherwise (`crate::migration::connect::exposure`).
    pub insecure: bool,
    /// Set to `true` (from any thread, or a signal handler) to cancel the migration, as
    /// `--on-timeout cancel` does: the destination is told and rolls back, the source
    /// guest keeps running. Checked between pages until the guest is paused for the final
    /// round; from there the migration runs to its end (a few hundred ms).
    pub cancel: Option<Arc<AtomicBool>>,
    /// The guest's disks, migrated with its memory (`--disk`, in order).
    pub disks: Vec<PathBuf>,
    /// How the disks are migrated.
    pub disk_settings: DiskSettings,
    /// Faults to inject, for tests (default: none).
    pub faults: SourceFaults,
    /// Where the migration's notices go (warnings, notes, progress; the KVM guest's
    /// lines): silent unless the caller installs a sink.
    pub notices: Notices,
}

impl SendConfig {
    /// How long the guest may stay paused before the commit reply: `--pause-timeout`, else
    /// ten times the downtime limit but at least [`PAUSE_FLOOR`] (a commit also syncs the
    /// image to the destination's disk, which the limit does not count), and at most the
    /// I/O timeout. A `forced` switchover (`--on-timeout force`) pauses as long as its
    /// pages take, which the limit does not bound: its default is the I/O timeout.
    pub fn pause_bound(&self, forced: bool) -> Duration {
        match self.pause_timeout {
            Some(t) => t,
            None if forced => self.io_timeout,
            None => (self.downtime_limit.saturating_mul(10))
                .max(PAUSE_FLOOR)
                .min(self.io_timeout),
        }
    }

    /// Defaults for migrating `guest` to `to`: LZ4, XBZRLE with a cache sized from the guest
    /// ([`auto_cache_bytes`]), one worker
    /// per core, 300 ms downtime limit, no timeout.
    pub fn new(guest: GuestSpec, to: impl Into<String>) -> SendConfig {
        SendConfig {
            guest,
            dirty_tracking: None,
            to: to.into(),
            handover: false,
            warmup: Duration::ZERO,
            encoder: encoder_config(
                Compression::Lz4 { acceleration: 1 },
                true,
                DEFAULT_CACHE_BYTES,
            ),
            xbzrle_cache: None,
            threads: vmstream_codec::receiver::default_workers(),
            batch_pages: 128,
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: None,
            timeout: None,
            on_timeout: OnTimeout::Cancel,
            io_timeout: Duration::from_secs(120),
            pause_timeout: None,
            stats_json: None,
            progress: true,
            converge: ConvergeConfig::default(),
            channels: 1,
            auth_key: None,
            verify: VerifyMode::Auto,
            scrub: ScrubSettings::default(),
            postcopy: PostcopyMode::Off,
            postcopy_bandwidth: None,
            postcopy_recover_timeout: Duration::from_secs(60),
            postcopy_preempt: true,
            insecure: false,
            cancel: None,
            disks: Vec::new(),
            disk_settings: DiskSettings::default(),
            faults: SourceFaults::default(),
            notices: Notices::default(),
        }
    }

    /// Checks, before anything starts, what the migration would otherwise refuse only once
    /// the guest runs (leaving it running for nothing): the guest size, the encoder
    /// pipeline, the convergence settings, the timeouts and the destination's address.
    pub fn check(&self) -> Result<(), String> {
        let guest_bytes = match &self.guest {
            GuestSpec::Spawn { size, .. } => {
                crate::memory::check_size(*size).map_err(|_| {
                    format!("--size {size}: must be a non-zero multiple of {PAGE_SIZE} bytes")
                })?;
                Some(*size)
            }
            GuestSpec::Kvm(k) => {
                crate::guest::kvm::memory::check_size(k.size)
                    .map_err(|e| format!("--size: {e}"))?;
                Some(k.size)
            }
            // An attached guest's size is its file's; opening it reports a bad one.
            GuestSpec::Attach { path, .. } => std::fs::metadata(path).ok().map(|m| m.len()),
            // A QEMU VM's RAM size is read over QMP when it is opened.
            GuestSpec::Qemu(_) => None,
        };
        if self.io_timeout.is_zero() {
            return Err("--io-timeout must be above 0".into());
        }
        // A started guest that writes its disks creates the missing ones (--disk-size).
        let (creates, guest_writes_disks) = match &self.guest {
            GuestSpec::Spawn { disks, .. } if disks.workload.is_some() => (disks.create_size, true),
            GuestSpec::Kvm(k) if k.disks.workload.is_some() => (k.disks.create_size, true),
            _ => (None, false),
        };
        if self.disk_settings.tracking == DiskTracking::Builtin
            && !self.disks.is_empty()
            && matches!(self.guest, GuestSpec::Spawn { .. })
            && !guest_writes_disks
        {
            return Err(
                "--disk-tracking builtin: the started guest's workload does not write its \
                 disks through the block layer (dbsim and diskio do); use --disk-tracking hash"
                    .into(),
            );
        }
        self.disk_settings.check(&self.disks, creates)?;
        if self.handover && !self.disks.is_empty() {
            return Err("--handover moves memory only; --disk needs a copying migration".into());
        }
        if self.pause_timeout.is_some_and(|t| t.is_zero()) {
            return Err("--pause-timeout must be above 0".into());
        }
        if self.downtime_limit.is_zero() {
            return Err(
                "--downtime-limit must be above 0 (a switchover pauses the guest for some time)"
                    .into(),
            );
        }
        let pages = guest_bytes.map_or(u64::MAX, |b| b / PAGE_SIZE as u64);
        sender_config(self, pages)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| format!("encoder settings: {e}"))?;
        self.converge.strategy().map_err(|e| e.to_string())?;
        self.converge.aim_low.target(self.downtime_limit)?;
        if guest_bytes.is_some() {
            self.converge
                .deferral(pages)
                .map_err(|e| format!("hot-page deferral: {e}"))?;
        }
        check_address(&self.to).map_err(|e| format!("--to {}: {e}", self.to))?;
        if self.auth_key.is_none() && unix_path(&self.to).is_none() {
            // Resolved here to refuse before the guest starts; an address that does not
            // resolve is the connection's error. `connect` checks what it connects to again.
            if let Ok(addrs) = std::net::ToSocketAddrs::to_socket_addrs(self.to.as_str()) {
                check_keyless(
                    &addrs.collect::<Vec<_>>(),
                    self.insecure,
                    &format!("--to {}", self.to),
                    SEND_RISK,
                )?;
            }
        }
        if self.handover && unix_path(&self.to).is_none() {
            return Err(format!(
                "--handover passes the guest's memory by file descriptor, which only a unix \
                 socket on this host can carry: --to {} is not one (use --to unix:PATH)",
                self.to
            ));
        }
        if self.handover && self.channels > 1 {
            return Err("--handover sends no pages: it takes no --channels".into());
        }
        if self.postcopy != PostcopyMode::Off {
            if self.handover {
                return Err("--postcopy copies pages: it takes no --handover".into());
            }
            if !matches!(self.verify, VerifyMode::Auto | VerifyMode::Full) {
                return Err(format!(
                    "--postcopy proves the destination's memory with the full digest of ours at \
                     the pause, taken while the last pages travel: it takes no --verify {}",
                    self.verify.name()
                ));
            }
        }
        Ok(())
    }

    /// The delta mode as announced in the handshake.
    pub fn delta_wire(&self) -> DeltaWire {
        match self.encoder.delta.map(|d| d.mode) {
            None => DeltaWire::Off,
            Some(DeltaMode::Xbzrle) => DeltaWire::Xbzrle,
            Some(DeltaMode::XorLz4) => DeltaWire::XorLz4,
            Some(DeltaMode::Smallest) => DeltaWire::Smallest,
            Some(DeltaMode::XbzrleLz4) => DeltaWire::XbzrleLz4,
        }
    }
}

/// Refuses an address that is not `unix:PATH` or `HOST:PORT` with a port in 1..=65535 (`[V6]:PORT` for an
/// IPv6 literal). The name itself is resolved when connecting, where a resolver failure
/// is a failed migration, not a bad argument.
fn check_address(addr: &str) -> Result<(), &'static str> {
    if let Some(path) = unix_path(addr) {
        return match path.as_os_str().is_empty() {
            true => Err("expected unix:PATH (no path)"),
            false => Ok(()),
        };
    }
    let (host, port) = addr.rsplit_once(':').ok_or("expected HOST:PORT")?;
    if host.is_empty() {
        return Err("expected HOST:PORT (no host)");
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err("an IPv6 address goes in brackets: [ADDR]:PORT");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("the port must be a number in 1..=65535"),
    }
}

/// The largest page cache [`auto_cache_bytes`] chooses.
pub const AUTO_CACHE_MAX: u64 = 1 << 30;

/// The XBZRLE page cache for a guest of `guest_bytes` when `--xbzrle-cache` is not given:
/// half the guest, at least QEMU's default (64 MiB), at most [`AUTO_CACHE_MAX`]. Deltas only
/// pay off for pages the cache still holds when they are dirtied again: QEMU's fixed 64 MiB
/// holds a sixteenth of a 1 GiB guest, so a database whose hot set is a few hundred MiB
/// misses on nearly every page and its rounds stop shrinking (`vmstream/QEMU.md`). The
/// cache is the sender's memory only (the destination applies deltas to its own copy).
pub fn auto_cache_bytes(guest_bytes: u64) -> u64 {
    (guest_bytes / 2).clamp(DEFAULT_CACHE_BYTES as u64, AUTO_CACHE_MAX)
}

impl SendConfig {
    /// The page cache's size for a guest of `guest_bytes`.
    pub fn cache_bytes(&self, guest_bytes: u64) -> u64 {
        self.xbzrle_cache
            .unwrap_or_else(|| auto_cache_bytes(guest_bytes))
    }
}

/// Encoder settings for a compression method, XBZRLE on or off, and a cache size.
///
/// Without compression (`--compress none`: a link faster than the compressors) round 0
/// leaves the XBZRLE cache empty, as QEMU's bulk stage does: there the sender's CPU bounds
/// round 0, and filling a 1 GiB cache cost a 4 GiB guest's round 0 about a quarter of its
/// time (BENCHMARKS.md section 19). With compression the compressors bound it, and the
/// fill costs no time while it saves bytes when the guest rewrites pages after round 0.
pub fn encoder_config(compression: Compression, xbzrle: bool, cache_bytes: usize) -> EncoderConfig {
    EncoderConfig {
        compression,
        delta: xbzrle.then(|| DeltaConfig {
            cache_bytes,
            mode: DeltaMode::Xbzrle,
            fill_in_round0: compression != Compression::None,
            ..DeltaConfig::default()
        }),
    }
}

/// Parses a compression method name (`lz4`, `zstd`, `zlib`, `none`) with an optional level.
pub fn parse_compression(name: &str, level: Option<i32>) -> Result<Compression, String> {
    Ok(match name {
        "lz4" => Compression::Lz4 {
            acceleration: level.unwrap_or(1),
        },
        "zstd" => Compression::Zstd {
            level: level.unwrap_or(1),
        },
        "zlib" => Compression::Zlib {
            level: level.unwrap_or(1),
        },
        "none" => Compression::None,
        other => {
            return Err(format!(
                "unknown compression {other:?} (lz4, zstd, zlib, none)"
            ))
        }
    })
}

/// Everything `vmstream recv` needs.
#[derive(Debug, Clone)]
pub struct RecvConfig {
    /// Address to listen on (loopback unless given explicitly).
    pub listen: String,
    /// Where the committed image goes (None: nowhere, and only a handover is taken, whose
    /// memory is the source's own file or memfd).
    pub memory_file: Option<PathBuf>,
    /// Run the guest on the committed image.
    pub resume: bool,
    /// How long the resumed guest runs (None: until the process is stopped).
    pub run_for: Option<Duration>,
    /// Where to write statistics JSON.
    pub stats_json: Option<PathBuf>,
    /// Decode workers (None: as many as the sender's encode workers, at most 2 per core).
    pub threads: Option<usize>,
    /// Refuse a guest of another size.
    pub expect_size: Option<u64>,
    /// Refuse a guest larger than this (`recv --max-guest-size`); `None`: as large as
    /// `expect_size` when that is set, else the host's physical memory. Nothing sized from
    /// the guest is allocated for a refused `Hello`.
    pub max_size: Option<u64>,
    /// Longest wait for the peer on the socket.
    pub io_timeout: Duration,
    /// Pre-shared key: admit only sources that prove it (`crate::migration::connect::auth`).
    pub auth_key: Option<AuthKey>,
    /// Listen without a key on an address others can reach (`--insecure`); refused
    /// otherwise (`crate::migration::connect::exposure`).
    pub insecure: bool,
    /// Set to `true` (from any thread, or a signal handler) to end the receive: until the
    /// source's final digest is read it fails with [`crate::migration::error::RecvError::Interrupted`]
    /// (nothing committed, the source told); after that the commit completes.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Where the committed disks go (`--disk`, in the source's order).
    pub disks: Vec<PathBuf>,
    /// Where guest memory's regions after the first go, when it is several files (a QEMU
    /// VM's RAM backends: `--memory-file` given once per backend, the first is
    /// `memory_file`); empty: one file.
    pub memory_regions: Vec<PathBuf>,
    /// Faults to inject, for tests (default: none).
    pub faults: DestFaults,
    /// Where the receive's notices go (connections, warnings, `listening on`, the
    /// resumed guest's lines): silent unless the caller installs a sink.
    pub notices: Notices,
    /// A QEMU guest's destination QEMU (`recv --qemu`); None: QEMU guests are refused.
    pub qemu: Option<crate::migration::dest::incoming::QemuLaunch>,
}

impl RecvConfig {
    /// The largest guest this receive takes, and what sets it (for the refusal's reason).
    pub fn size_cap(&self) -> (u64, &'static str) {
        match (self.max_size, self.expect_size) {
            (Some(max), _) => (max, "recv --max-guest-size"),
            (None, Some(size)) => (size, "recv --size"),
            (None, None) => (
                host_memory(),
                "the host's physical memory; recv --max-guest-size sets another",
            ),
        }
    }

    /// Defaults for receiving into `memory_file` on `listen`.
    pub fn new(listen: impl Into<String>, memory_file: PathBuf) -> RecvConfig {
        RecvConfig {
            listen: listen.into(),
            memory_file: Some(memory_file),
            resume: false,
            run_for: None,
            stats_json: None,
            threads: None,
            expect_size: None,
            max_size: None,
            io_timeout: Duration::from_secs(120),
            auth_key: None,
            insecure: false,
            cancel: None,
            disks: Vec::new(),
            memory_regions: Vec::new(),
            faults: DestFaults::default(),
            notices: Notices::default(),
            qemu: None,
        }
    }
}

/// The host's physical memory (`MemTotal` of `/proc/meminfo`): the default size cap of a
/// receive. 16 GiB if it cannot be read.
pub fn host_memory() -> u64 {
    const UNKNOWN: u64 = 16 << 30;
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return UNKNOWN;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map_or(UNKNOWN, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without `--xbzrle-cache` the page cache is half the guest, within QEMU's default and
    /// 1 GiB; an explicit size is taken as is.
    #[test]
    fn the_page_cache_is_sized_from_the_guest_unless_given() {
        const MIB: u64 = 1 << 20;
        assert_eq!(auto_cache_bytes(512 * MIB), 256 * MIB);
        assert_eq!(auto_cache_bytes(16 * MIB), DEFAULT_CACHE_BYTES as u64);
        assert_eq!(auto_cache_bytes(8 << 30), AUTO_CACHE_MAX);
        let spec = GuestSpec::Attach {
            path: "/nonexistent".into(),
            pid: 1,
        };
        let mut cfg = SendConfig::new(spec, "127.0.0.1:7000");
        assert_eq!(cfg.cache_bytes(2 << 30), 1 << 30);
        cfg.xbzrle_cache = Some(32 * MIB);
        assert_eq!(cfg.cache_bytes(2 << 30), 32 * MIB);
    }

    /// The default pause bound: ten downtime limits, at least the floor, at most the I/O
    /// timeout; a forced switchover's is the I/O timeout; an explicit one is taken as is,
    /// but not zero.
    #[test]
    fn the_pause_bound_follows_the_downtime_limit_within_the_io_timeout() {
        let spec = GuestSpec::Attach {
            path: "/nonexistent".into(),
            pid: 1,
        };
        let mut cfg = SendConfig::new(spec, "127.0.0.1:7000");
        let s = Duration::from_secs;
        assert_eq!(cfg.pause_bound(false), PAUSE_FLOOR);
        cfg.downtime_limit = s(3);
        assert_eq!(cfg.pause_bound(false), s(30));
        cfg.io_timeout = s(20);
        assert_eq!(cfg.pause_bound(false), s(20));
        assert_eq!(cfg.pause_bound(true), s(20));
        cfg.pause_timeout = Some(s(45));
        assert_eq!(
            (cfg.pause_bound(false), cfg.pause_bound(true)),
            (s(45), s(45))
        );
        assert_eq!(cfg.check(), Ok(()));
        cfg.pause_timeout = Some(Duration::ZERO);
        assert_eq!(cfg.check(), Err("--pause-timeout must be above 0".into()));
    }

    #[test]
    fn the_size_cap_is_the_explicit_maximum_the_expected_size_or_the_host_memory() {
        let mut cfg = RecvConfig::new("1", PathBuf::from("x"));
        let host = host_memory();
        assert!(host >= 64 << 20, "{host}");
        assert_eq!(cfg.size_cap().0, host);
        cfg.expect_size = Some(1 << 40);
        assert_eq!(cfg.size_cap(), (1 << 40, "recv --size"));
        cfg.max_size = Some(8 << 20);
        assert_eq!(cfg.size_cap(), (8 << 20, "recv --max-guest-size"));
    }

    #[test]
    fn addresses_are_checked_for_shape_not_resolved() {
        for ok in [
            "127.0.0.1:7000",
            "dest.example:7000",
            "[::1]:7000",
            "localhost:1",
            "unix:/run/vmstream.sock",
        ] {
            assert_eq!(check_address(ok), Ok(()), "{ok}");
        }
        for bad in [
            "nonsense",
            ":7000",
            "host:",
            "host:0",
            "host:99999",
            "::1:7000",
            "unix:",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }

    /// `--handover` passes a descriptor: refused over TCP before anything starts, with
    /// the reason and the way out.
    #[test]
    fn a_handover_needs_a_unix_socket() {
        let guest = GuestSpec::Attach {
            path: "/nonexistent/vmstream-guest".into(),
            pid: 1,
        };
        let mut cfg = SendConfig::new(guest, "127.0.0.1:7000");
        cfg.handover = true;
        let e = cfg.check().unwrap_err();
        assert!(
            e.contains("only a unix") && e.contains("--to unix:PATH"),
            "{e}"
        );
        cfg.to = "unix:/run/vmstream.sock".into();
        assert_eq!(cfg.check(), Ok(()));
        cfg.channels = 2;
        assert!(cfg.check().unwrap_err().contains("--channels"));
    }
}
