//! Migration statistics: per-round figures, final figures of each side, the JSON written by
//! `--stats-json`, the one-screen summary and the terminal progress bar.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use vmstream_codec::format::Encoding;
use vmstream_codec::PipelineStats;

/// One round as the source saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundStats {
    /// Round number (0 = full copy).
    pub round: u64,
    /// Whether the guest was paused (the final round).
    pub paused: bool,
    /// Dirty pages pushed.
    pub dirty_pages: u64,
    /// Page records sent (pages identical to the cached copy need none).
    pub records: u64,
    /// Records by encoding name.
    pub pages_by_encoding: BTreeMap<String, u64>,
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
}

impl RoundStats {
    /// Fills the encoding breakdown from a codec round.
    pub fn set_encodings(&mut self, codec: &PipelineStats) {
        for e in Encoding::ALL {
            let n = codec.by_encoding.get(e).pages;
            if n > 0 {
                self.pages_by_encoding.insert(e.name().to_string(), n);
            }
        }
        self.records = codec.pages();
        self.packet_bytes = codec.packet_bytes;
    }
}

/// Transactions per second of the guest in each phase (None when not measured).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TpsPhases {
    /// During the warm-up, before the migration started.
    pub before: Option<f64>,
    /// While the migration iterated (guest running on the source).
    pub during: Option<f64>,
    /// On the destination after the resume.
    pub after: Option<f64>,
}

/// CPU time of a process, from getrusage.
#[derive(Debug, Clone, Copy, Default, Serialize)]
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

/// Final figures of a migration (both sides write this shape; fields a side does not
/// know are null).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationStats {
    /// "source" or "destination".
    pub role: &'static str,
    /// "committed", "cancelled" or "failed".
    pub outcome: String,
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
    /// The memory digest (`digest.rs`: BLAKE3 over per-page XXH3-128) at the pause, hex.
    pub digest: Option<String>,
    /// This side's CPU time.
    pub cpu: CpuTime,
    /// The peer's CPU time as it reported it, ms (source only).
    pub peer_cpu_ms: Option<f64>,
    /// Guest transactions per second by phase.
    pub tps: TpsPhases,
    /// Settings that shaped the run.
    pub settings: BTreeMap<String, String>,
    /// Time of each switchover phase, ms (source: pause_and_collect,
    /// final_round_and_digest, digest, await_commit; destination: digest, commit).
    pub switchover_ms: BTreeMap<String, f64>,
    /// Per round (source only).
    pub per_round: Vec<RoundStats>,
    /// Codec totals (pages by encoding, cache outcomes, stage times).
    pub codec: PipelineStats,
    /// Guest TPS, throttle, rounds and downtime over time (source; `vmstream plot`).
    pub timeline: Option<crate::telemetry::timeline::Timeline>,
}

impl MigrationStats {
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
            if self.converged {
                "converged"
            } else {
                "not converged"
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
        if let Some(saved) = self.settings.get("defer_hot_saved_bytes") {
            let mib = saved.parse::<f64>().unwrap_or(0.0) / (1 << 20) as f64;
            s.push_str(&format!("  hot-page deferral saved {mib:.1} MiB\n"));
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
        if !self.switchover_ms.is_empty() {
            let phases: Vec<String> = self
                .switchover_ms
                .iter()
                .map(|(k, v)| format!("{k} {v:.1}"))
                .collect();
            s.push_str(&format!("  switchover: {} (ms)\n", phases.join(", ")));
        }
        if let Some(d) = &self.digest {
            s.push_str(&format!("  digest:     {d}\n"));
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

/// A progress bar on stderr, only when stderr is a terminal.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    /// A bar if stderr is a terminal and `enabled`.
    pub fn new(enabled: bool) -> Progress {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            let style = indicatif::ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} pages {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress { bar }
    }

    /// Starts round `round` of `pages` pages.
    pub fn round(&self, round: u64, pages: u64, paused: bool) {
        if let Some(b) = &self.bar {
            b.set_prefix(if paused {
                "final".to_string()
            } else {
                format!("round {round}")
            });
            b.set_position(0);
            b.set_length(pages);
        }
    }

    /// Advances by `n` pages.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Shows `msg` next to the bar.
    pub fn message(&self, msg: String) {
        if let Some(b) = &self.bar {
            b.set_message(msg);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
