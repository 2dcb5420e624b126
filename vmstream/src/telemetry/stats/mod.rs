//! Migration statistics: per-round figures and the final figures of each side, typed and
//! serialized by serde as the JSON of `--stats-json` (external scripts read its field
//! names), and the one-screen summary.

use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmstream_codec::stats::ByEncoding;
use vmstream_codec::PipelineStats;

use crate::converge::SwitchReason;
use crate::telemetry::settings::Settings;
use crate::telemetry::switchover::SwitchoverTimes;
use crate::telemetry::timeline::Timeline;
use crate::telemetry::verification::VerificationStats;

/// Page records of a round by encoding; encodings a round did not use are not written.
/// Fields are in alphabetical order, the order the JSON always had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PagesByEncoding {
    /// LZ4 pages.
    #[serde(skip_serializing_if = "is_zero")]
    pub lz4: u64,
    /// Raw pages.
    #[serde(skip_serializing_if = "is_zero")]
    pub raw: u64,
    /// XBZRLE deltas.
    #[serde(skip_serializing_if = "is_zero")]
    pub xbzrle: u64,
    /// LZ4 of XBZRLE deltas.
    #[serde(skip_serializing_if = "is_zero")]
    pub xbzrle_lz4: u64,
    /// LZ4 of XOR deltas.
    #[serde(skip_serializing_if = "is_zero")]
    pub xor_lz4: u64,
    /// All-zero pages.
    #[serde(skip_serializing_if = "is_zero")]
    pub zero: u64,
    /// Deflate pages.
    #[serde(skip_serializing_if = "is_zero")]
    pub zlib: u64,
    /// zstd pages.
    #[serde(skip_serializing_if = "is_zero")]
    pub zstd: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl From<&ByEncoding> for PagesByEncoding {
    fn from(b: &ByEncoding) -> PagesByEncoding {
        PagesByEncoding {
            lz4: b.lz4.pages,
            raw: b.raw.pages,
            xbzrle: b.xbzrle.pages,
            xbzrle_lz4: b.xbzrle_lz4.pages,
            xor_lz4: b.xor_lz4.pages,
            zero: b.zero.pages,
            zlib: b.zlib.pages,
            zstd: b.zstd.pages,
        }
    }
}

/// One round as the source saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundStats {
    /// Round number (0 = full copy).
    pub round: u64,
    /// Whether the guest was paused (the final round).
    pub paused: bool,
    /// Dirty pages pushed.
    pub dirty_pages: u64,
    /// Page records sent (pages identical to the cached copy need none).
    pub records: u64,
    /// Records by encoding.
    pub pages_by_encoding: PagesByEncoding,
    /// Codec packet bytes.
    pub packet_bytes: u64,
    /// Bytes written to the socket (frames included).
    pub wire_bytes: u64,
    /// Wall time from the first page read to the destination's acknowledgement.
    pub duration_ms: f64,
    /// Wire bytes per second achieved.
    pub bandwidth_bytes_per_s: f64,
    /// Pages the guest dirtied per second during the round.
    pub dirty_pages_per_s: f64,
    /// Expected downtime had the switchover followed this round.
    pub expected_downtime_ms: f64,
    /// Guest throttle (stopped fraction) chosen after this round.
    pub throttle: f64,
    /// Dirty pages held back for a later round by hot-page deferral.
    pub deferred_pages: u64,
    /// Time collecting the dirty log that produced this round's pages, ms (round 0: the
    /// collect that started tracking; the final round: the collect after the pause).
    pub dirty_log_ms: f64,
    /// Time re-arming dirty tracking chunk by chunk while sending this round, ms (KVM
    /// `clear` mode; 0 where the collect re-arms).
    pub dirty_rearm_ms: f64,
    /// The destination's estimate of verifying, at the pause, what its workload verifier
    /// had not checked when it acknowledged this round, ms (`recv --resume` of a verifiable
    /// workload; counted in `expected_downtime_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_verify_backlog_ms: Option<f64>,
}

impl RoundStats {
    /// Fills the encoding breakdown from a codec round.
    pub fn set_encodings(&mut self, codec: &PipelineStats) {
        self.pages_by_encoding = PagesByEncoding::from(&codec.by_encoding);
        self.records = codec.pages();
        self.packet_bytes = codec.packet_bytes;
    }
}

/// Transactions per second of the guest in each phase (None when not measured).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TpsPhases {
    /// During the warm-up, before the migration started.
    pub before: Option<f64>,
    /// While the migration iterated (guest running on the source).
    pub during: Option<f64>,
    /// On the destination after the resume.
    pub after: Option<f64>,
}

/// CPU time of a process, from getrusage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuTime {
    /// User time, ms.
    pub user_ms: f64,
    /// System time, ms.
    pub sys_ms: f64,
}

impl CpuTime {
    /// This process's CPU time so far.
    pub fn now() -> CpuTime {
        use nix::sys::resource::{getrusage, UsageWho};
        match getrusage(UsageWho::RUSAGE_SELF) {
            Ok(u) => {
                let ms =
                    |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
                CpuTime {
                    user_ms: ms(u.user_time()),
                    sys_ms: ms(u.system_time()),
                }
            }
            Err(_) => CpuTime::default(),
        }
    }

    /// User plus system, ms.
    pub fn total_ms(&self) -> f64 {
        self.user_ms + self.sys_ms
    }
}

/// Which side wrote the statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `vmstream send`.
    Source,
    /// `vmstream recv`.
    Destination,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Destination => "destination",
        })
    }
}

/// How a migration ended, as the statistics record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationOutcome {
    /// The destination committed the image.
    Committed,
    /// Cancelled (at the timeout, or by SIGINT/SIGTERM); the source guest runs on.
    Cancelled,
    /// An error ended it.
    Failed,
}

impl fmt::Display for MigrationOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationOutcome::Committed => "committed",
            MigrationOutcome::Cancelled => "cancelled",
            MigrationOutcome::Failed => "failed",
        })
    }
}

/// Final figures of a migration (both sides write this shape; fields a side does not
/// know are null).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStats {
    /// Which side wrote them.
    pub role: Role,
    /// How the migration ended.
    pub outcome: MigrationOutcome,
    /// Error message when not committed.
    pub error: Option<String>,
    /// From connection to commit acknowledgement (source) or commit (destination), ms.
    pub total_time_ms: f64,
    /// Guest paused on the source to running on the destination (or committed there), ms.
    pub downtime_ms: Option<f64>,
    /// Bytes on the wire, both directions' frames as seen by this side's sends (source)
    /// or receives (destination).
    pub bytes_on_wire: u64,
    /// Guest memory size.
    pub guest_bytes: u64,
    /// `bytes_on_wire / guest_bytes`.
    pub wire_to_guest_ratio: f64,
    /// Bytes written on each channel, channel 0 first (source; `--channels`).
    pub channel_bytes: Vec<u64>,
    /// Rounds, the final one included.
    pub rounds: u64,
    /// Whether the expected downtime fit the limit (false: forced at timeout).
    pub converged: bool,
    /// Why the source switched over (`target-reached`, `stopped-shrinking`, ...; source).
    pub switchover_reason: Option<SwitchReason>,
    /// The memory digest (`digest.rs`: BLAKE3 over per-page XXH3-128) at the pause, hex.
    pub digest: Option<String>,
    /// How that memory was proven (`--verify`).
    #[serde(default)]
    pub verify: Option<VerificationStats>,
    /// This side's CPU time.
    pub cpu: CpuTime,
    /// The peer's CPU time as it reported it, ms (source only).
    pub peer_cpu_ms: Option<f64>,
    /// Guest transactions per second by phase.
    pub tps: TpsPhases,
    /// Settings that shaped the run.
    pub settings: Settings,
    /// Time of each switchover phase, ms.
    pub switchover_ms: SwitchoverTimes,
    /// Per round (source only).
    pub per_round: Vec<RoundStats>,
    /// Codec totals (pages by encoding, cache outcomes, stage times).
    pub codec: PipelineStats,
    /// Guest TPS, throttle, rounds and downtime over time (source; `vmstream plot`).
    pub timeline: Option<Timeline>,
    /// The post-copy phase (`send --postcopy`); absent when there was none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<crate::telemetry::postcopy::PostcopyStats>,
    /// Each disk migrated with the memory, in `--disk` order.
    #[serde(default)]
    pub disks: Vec<crate::telemetry::disk::DiskStats>,
}

impl MigrationStats {
    /// Empty statistics of `role`'s side: [`MigrationOutcome::Failed`] until the engine
    /// records the commit or the cancellation.
    pub fn new(role: Role) -> MigrationStats {
        MigrationStats {
            role,
            outcome: MigrationOutcome::Failed,
            error: None,
            total_time_ms: 0.0,
            downtime_ms: None,
            bytes_on_wire: 0,
            guest_bytes: 0,
            wire_to_guest_ratio: 0.0,
            channel_bytes: Vec::new(),
            rounds: 0,
            converged: false,
            switchover_reason: None,
            digest: None,
            verify: None,
            cpu: CpuTime::default(),
            peer_cpu_ms: None,
            tps: TpsPhases::default(),
            settings: Settings::default(),
            switchover_ms: SwitchoverTimes::default(),
            per_round: Vec::new(),
            codec: PipelineStats::default(),
            timeline: None,
            postcopy: None,
            disks: Vec::new(),
        }
    }

    /// Sets [`MigrationStats::wire_to_guest_ratio`] from the bytes on the wire (0 for an
    /// unknown guest size).
    pub fn set_wire_ratio(&mut self) {
        if self.guest_bytes > 0 {
            self.wire_to_guest_ratio = self.bytes_on_wire as f64 / self.guest_bytes as f64;
        }
    }

    /// Writes the statistics as pretty JSON to `path`.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json + "\n")
    }

    /// The one-screen summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        s.push_str(&format!(
            "migration {} ({}), {} round(s), {}\n",
            self.outcome,
            self.role,
            self.rounds,
            match (self.converged, self.switchover_reason) {
                (true, None | Some(SwitchReason::Converged)) => "converged".to_string(),
                (false, None) => "not converged".to_string(),
                (true, Some(r)) => format!("converged ({})", r.name()),
                (false, Some(r)) => format!("not converged ({})", r.name()),
            }
        ));
        if let Some(e) = &self.error {
            s.push_str(&format!("  error:      {e}\n"));
        }
        s.push_str(&format!("  total time: {:.0} ms\n", self.total_time_ms));
        if let Some(d) = self.downtime_ms {
            s.push_str(&format!("  downtime:   {d:.1} ms\n"));
        }
        s.push_str(&format!(
            "  wire:       {:.1} MiB for {:.1} MiB of guest memory ({:.3}x)\n",
            mib(self.bytes_on_wire),
            mib(self.guest_bytes),
            self.wire_to_guest_ratio
        ));
        s.push_str(&format!(
            "  cpu:        {:.0} ms user + {:.0} ms sys{}\n",
            self.cpu.user_ms,
            self.cpu.sys_ms,
            match self.peer_cpu_ms {
                Some(p) => format!(", peer {p:.0} ms"),
                None => String::new(),
            }
        ));
        let tps = |v: Option<f64>| v.map_or("-".to_string(), |t| format!("{t:.0}"));
        s.push_str(&format!(
            "  guest tx/s: before {} / during {} / after {}\n",
            tps(self.tps.before),
            tps(self.tps.during),
            tps(self.tps.after)
        ));
        if let Some(saved) = self.settings.defer_hot_saved_bytes {
            s.push_str(&format!(
                "  hot-page deferral saved {:.1} MiB\n",
                mib(saved)
            ));
        }
        if !self.per_round.is_empty() {
            s.push_str(
                "  round  dirty      records   wire MiB  ms       MB/s     dirty/s    est.down ms\n",
            );
            let shown = self.per_round.len();
            for (i, r) in self.per_round.iter().enumerate() {
                if shown > 12 && i >= 5 && i + 5 < shown {
                    if i == 5 {
                        s.push_str(&format!("  ... {} rounds ...\n", shown - 10));
                    }
                    continue;
                }
                s.push_str(&format!(
                    "  {:<5}{} {:<10} {:<9} {:<9.2} {:<8.1} {:<8.1} {:<10.0} {:.1}\n",
                    r.round,
                    if r.paused { "*" } else { " " },
                    r.dirty_pages,
                    r.records,
                    mib(r.wire_bytes),
                    r.duration_ms,
                    r.bandwidth_bytes_per_s / 1e6,
                    r.dirty_pages_per_s,
                    r.expected_downtime_ms
                ));
            }
        }
        let phases: Vec<String> = self
            .switchover_ms
            .phases()
            .map(|(k, v)| format!("{k} {v:.1}"))
            .collect();
        if !phases.is_empty() {
            s.push_str(&format!("  switchover: {} (ms)\n", phases.join(", ")));
        }
        if let Some(d) = &self.digest {
            s.push_str(&format!("  digest:     {d}\n"));
        }
        if let Some(v) = &self.verify {
            s.push_str(&v.summary_line());
        }
        s
    }
}

/// ns since the Unix epoch of `t` (CLOCK_REALTIME).
pub fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
}

/// Milliseconds from `from_ns` to `to_ns` (Unix ns), negative if the clock went back.
pub fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    (to_ns as f64 - from_ns as f64) / 1e6
}

#[cfg(test)]
mod tests;
