//! The statistics JSON contract: key paths, round trips, the summary.

use std::collections::BTreeSet;

use serde_json::Value;
use vmstream_codec::format::Encoding;
use vmstream_codec::stats::WorkerStats;

use super::*;
use crate::converge::Strategy;
use crate::telemetry::settings::{BandwidthLimit, PageCopies};
use crate::telemetry::timeline::{TimelineNote, TimelineRound, TimelineSample};

/// Every key path of `v`: objects' keys joined by `.`, array elements as `[]`.
fn key_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(path.clone());
                key_paths(child, &path, out);
            }
        }
        Value::Array(items) => {
            for child in items {
                key_paths(child, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

/// Statistics with every optional part present: what either side may write.
fn fully_populated() -> MigrationStats {
    let mut codec = PipelineStats::default();
    for e in Encoding::ALL {
        codec.by_encoding.record(e, 4096, 100, 10);
    }
    codec.workers.push(WorkerStats::default());
    let mut round = RoundStats::default();
    round.set_encodings(&codec);
    let text = || Some("x".to_string());
    let settings = Settings {
        authenticated: Some(true),
        auto_converge: text(),
        channels: Some(1),
        compression: text(),
        converge: Some(Strategy::Qemu),
        defer_hot: text(),
        defer_hot_saved_bytes: Some(1),
        delta: text(),
        destination_running: Some(true),
        dirty_tracking: text(),
        downtime_limit_ms: Some(1),
        downtime_target_ms: Some(1),
        guest_kind: text(),
        handshake_round_trip_ms: Some(1.0),
        kvm_state_bytes: Some(1),
        kvm_vcpus: Some(1),
        max_bandwidth: Some(BandwidthLimit::Unlimited),
        migration_id: text(),
        page_copies: Some(PageCopies::EncodeWorkers),
        policy: text(),
        receiver_workers: Some(1),
        round_trip_ms: Some(1.0),
        source_tx_at_pause: Some(1),
        switchover_digest_estimate_ms: Some(1.0),
        threads: Some(1),
        xbzrle: Some(true),
        xbzrle_cache_bytes: Some(64 << 20),
    };
    let switchover_ms = SwitchoverTimes {
        await_commit: Some(1.0),
        await_handover: Some(1.0),
        commit: Some(1.0),
        digest: Some(1.0),
        final_round_and_digest: Some(1.0),
        kvm_first_tx: Some(1.0),
        kvm_restore: Some(1.0),
        pause_and_collect: Some(1.0),
        end_guest: Some(1.0),
        resume: Some(1.0),
        verify: Some(1.0),
    };
    MigrationStats {
        outcome: MigrationOutcome::Committed,
        error: Some("e".into()),
        downtime_ms: Some(1.0),
        channel_bytes: vec![1],
        digest: Some("00".into()),
        verify: Some(crate::telemetry::verification::VerificationStats {
            requested: "auto".into(),
            mode: "incremental".into(),
            scrub_coverage: Some(1.0),
            pages_scrubbed: Some(1),
            audit: Some(crate::telemetry::verification::AuditStats {
                result: "match".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        peer_cpu_ms: Some(1.0),
        tps: TpsPhases {
            before: Some(1.0),
            during: Some(1.0),
            after: Some(1.0),
        },
        settings,
        switchover_ms,
        per_round: vec![round],
        codec,
        timeline: Some(Timeline {
            samples: vec![TimelineSample::default()],
            rounds: vec![TimelineRound::default()],
            pause_ms: Some(1.0),
            resume_ms: Some(2.0),
            notes: vec![TimelineNote::default()],
        }),
        ..MigrationStats::new(Role::Source)
    }
}

/// The summary of [`fully_populated`] (with 3 MiB saved by deferral), as printed today.
const SUMMARY: &str = concat!(
    "migration committed (source), 0 round(s), not converged\n",
    "  error:      e\n",
    "  total time: 0 ms\n",
    "  downtime:   1.0 ms\n",
    "  wire:       0.0 MiB for 0.0 MiB of guest memory (0.000x)\n",
    "  cpu:        0 ms user + 0 ms sys, peer 1 ms\n",
    "  guest tx/s: before 1 / during 1 / after 1\n",
    "  hot-page deferral saved 3.0 MiB\n",
    "  round  dirty      records   wire MiB  ms       MB/s     dirty/s    est.down ms\n",
    "  0      0          8         0.00      0.0      0.0      0          0.0\n",
    "  switchover: await_commit 1.0, await_handover 1.0, commit 1.0, digest 1.0, end_guest 1.0, final_round_and_digest 1.0, kvm_first_tx 1.0, kvm_restore 1.0, pause_and_collect 1.0, resume 1.0, verify 1.0 (ms)\n",
    "  digest:     00\n",
    "  verify:     incremental (--verify auto), scrub coverage 100%, tracking errors 0, audit match\n",
);

/// The key paths of `--stats-json` as external scripts read them; a change here breaks
/// them.
const KEY_PATHS: &[&str] = &[
    "bytes_on_wire",
    "channel_bytes",
    "codec",
    "codec.by_encoding",
    "codec.by_encoding.lz4",
    "codec.by_encoding.lz4.bytes_in",
    "codec.by_encoding.lz4.bytes_out",
    "codec.by_encoding.lz4.nanos",
    "codec.by_encoding.lz4.pages",
    "codec.by_encoding.raw",
    "codec.by_encoding.raw.bytes_in",
    "codec.by_encoding.raw.bytes_out",
    "codec.by_encoding.raw.nanos",
    "codec.by_encoding.raw.pages",
    "codec.by_encoding.xbzrle",
    "codec.by_encoding.xbzrle.bytes_in",
    "codec.by_encoding.xbzrle.bytes_out",
    "codec.by_encoding.xbzrle.nanos",
    "codec.by_encoding.xbzrle.pages",
    "codec.by_encoding.xbzrle_lz4",
    "codec.by_encoding.xbzrle_lz4.bytes_in",
    "codec.by_encoding.xbzrle_lz4.bytes_out",
    "codec.by_encoding.xbzrle_lz4.nanos",
    "codec.by_encoding.xbzrle_lz4.pages",
    "codec.by_encoding.xor_lz4",
    "codec.by_encoding.xor_lz4.bytes_in",
    "codec.by_encoding.xor_lz4.bytes_out",
    "codec.by_encoding.xor_lz4.nanos",
    "codec.by_encoding.xor_lz4.pages",
    "codec.by_encoding.zero",
    "codec.by_encoding.zero.bytes_in",
    "codec.by_encoding.zero.bytes_out",
    "codec.by_encoding.zero.nanos",
    "codec.by_encoding.zero.pages",
    "codec.by_encoding.zlib",
    "codec.by_encoding.zlib.bytes_in",
    "codec.by_encoding.zlib.bytes_out",
    "codec.by_encoding.zlib.nanos",
    "codec.by_encoding.zlib.pages",
    "codec.by_encoding.zstd",
    "codec.by_encoding.zstd.bytes_in",
    "codec.by_encoding.zstd.bytes_out",
    "codec.by_encoding.zstd.nanos",
    "codec.by_encoding.zstd.pages",
    "codec.cache",
    "codec.cache.hits",
    "codec.cache.misses",
    "codec.cache.overflows",
    "codec.cache.unchanged",
    "codec.packet_bytes",
    "codec.packets",
    "codec.rounds",
    "codec.times",
    "codec.times.barrier_wait_ns",
    "codec.times.busy_ns",
    "codec.times.checksum_ns",
    "codec.times.dispatch_ns",
    "codec.workers",
    "codec.workers[].busy_ns",
    "codec.workers[].packets",
    "codec.workers[].pages",
    "converged",
    "cpu",
    "cpu.sys_ms",
    "cpu.user_ms",
    "digest",
    "disks",
    "downtime_ms",
    "error",
    "guest_bytes",
    "outcome",
    "peer_cpu_ms",
    "per_round",
    "per_round[].bandwidth_bytes_per_s",
    "per_round[].deferred_pages",
    "per_round[].dirty_log_ms",
    "per_round[].dirty_pages",
    "per_round[].dirty_pages_per_s",
    "per_round[].dirty_rearm_ms",
    "per_round[].duration_ms",
    "per_round[].expected_downtime_ms",
    "per_round[].packet_bytes",
    "per_round[].pages_by_encoding",
    "per_round[].pages_by_encoding.lz4",
    "per_round[].pages_by_encoding.raw",
    "per_round[].pages_by_encoding.xbzrle",
    "per_round[].pages_by_encoding.xbzrle_lz4",
    "per_round[].pages_by_encoding.xor_lz4",
    "per_round[].pages_by_encoding.zero",
    "per_round[].pages_by_encoding.zlib",
    "per_round[].pages_by_encoding.zstd",
    "per_round[].paused",
    "per_round[].records",
    "per_round[].round",
    "per_round[].throttle",
    "per_round[].wire_bytes",
    "role",
    "rounds",
    "settings",
    "settings.authenticated",
    "settings.auto_converge",
    "settings.channels",
    "settings.compression",
    "settings.converge",
    "settings.defer_hot",
    "settings.defer_hot_saved_bytes",
    "settings.delta",
    "settings.destination_running",
    "settings.dirty_tracking",
    "settings.downtime_limit_ms",
    "settings.downtime_target_ms",
    "settings.guest_kind",
    "settings.handshake_round_trip_ms",
    "settings.kvm_state_bytes",
    "settings.kvm_vcpus",
    "settings.max_bandwidth",
    "settings.migration_id",
    "settings.page_copies",
    "settings.policy",
    "settings.receiver_workers",
    "settings.round_trip_ms",
    "settings.source_tx_at_pause",
    "settings.switchover_digest_estimate_ms",
    "settings.threads",
    "settings.xbzrle",
    "settings.xbzrle_cache_bytes",
    "switchover_ms",
    "switchover_ms.await_commit",
    "switchover_ms.await_handover",
    "switchover_ms.commit",
    "switchover_ms.digest",
    "switchover_ms.end_guest",
    "switchover_ms.final_round_and_digest",
    "switchover_ms.kvm_first_tx",
    "switchover_ms.kvm_restore",
    "switchover_ms.pause_and_collect",
    "switchover_ms.resume",
    "switchover_ms.verify",
    "switchover_reason",
    "timeline",
    "timeline.notes",
    "timeline.notes[].t_ms",
    "timeline.notes[].text",
    "timeline.pause_ms",
    "timeline.resume_ms",
    "timeline.rounds",
    "timeline.rounds[].deferred_bytes",
    "timeline.rounds[].dirty_bytes",
    "timeline.rounds[].disk_write_limit",
    "timeline.rounds[].duration_ms",
    "timeline.rounds[].paused",
    "timeline.rounds[].round",
    "timeline.rounds[].sent_bytes",
    "timeline.rounds[].start_ms",
    "timeline.rounds[].throttle",
    "timeline.samples",
    "timeline.samples[].disk_write_limit",
    "timeline.samples[].t_ms",
    "timeline.samples[].throttle",
    "timeline.samples[].tps",
    "total_time_ms",
    "tps",
    "tps.after",
    "tps.before",
    "tps.during",
    "verify",
    "verify.audit",
    "verify.audit.duration_ms",
    "verify.audit.mismatched",
    "verify.audit.pages",
    "verify.audit.pages_checked",
    "verify.audit.result",
    "verify.mode",
    "verify.pages_scrubbed",
    "verify.requested",
    "verify.scrub_coverage",
    "verify.tracking_error_pages",
    "verify.tracking_errors",
    "wire_to_guest_ratio",
];

#[test]
fn stats_json_keeps_its_key_paths() {
    let json = serde_json::to_value(fully_populated()).unwrap();
    let mut paths = BTreeSet::new();
    key_paths(&json, "", &mut paths);
    let expected: BTreeSet<String> = KEY_PATHS.iter().map(|s| s.to_string()).collect();
    assert_eq!(paths, expected);
    // Scripts compare settings as text and read the rest as numbers.
    for (k, v) in json["settings"].as_object().unwrap() {
        assert!(v.is_string(), "settings.{k} is {v}");
    }
    for (k, v) in json["switchover_ms"].as_object().unwrap() {
        assert!(v.is_f64(), "switchover_ms.{k} is {v}");
    }
    for (k, v) in json["per_round"][0]["pages_by_encoding"]
        .as_object()
        .unwrap()
    {
        assert!(v.is_u64(), "pages_by_encoding.{k} is {v}");
    }
    assert_eq!(json["role"], "source");
    assert_eq!(json["outcome"], "committed");
}

#[test]
fn pages_by_encoding_lists_only_the_encodings_used() {
    let mut codec = PipelineStats::default();
    codec.by_encoding.record(Encoding::Zero, 4096, 0, 1);
    codec.by_encoding.record(Encoding::Lz4, 4096, 10, 1);
    codec.by_encoding.record(Encoding::Lz4, 4096, 10, 1);
    let mut round = RoundStats::default();
    round.set_encodings(&codec);
    let json = serde_json::to_value(&round).unwrap();
    assert_eq!(
        json["pages_by_encoding"],
        serde_json::json!({"lz4": 2, "zero": 1})
    );
    assert_eq!(round.records, 3);
}

#[test]
fn summary_of_full_statistics() {
    let mut stats = fully_populated();
    stats.settings.defer_hot_saved_bytes = Some(3 << 20);
    assert_eq!(stats.summary(), SUMMARY);
}

#[test]
fn statistics_read_back_as_written() {
    let stats = fully_populated();
    let json = serde_json::to_string_pretty(&stats).unwrap();
    let back: MigrationStats = serde_json::from_str(&json).unwrap();
    assert_eq!(back, stats);
}

#[test]
fn roles_and_outcomes_are_written_as_before() {
    for (role, name) in [(Role::Source, "source"), (Role::Destination, "destination")] {
        assert_eq!(serde_json::to_string(&role).unwrap(), format!("\"{name}\""));
        assert_eq!(role.to_string(), name);
    }
    for (outcome, name) in [
        (MigrationOutcome::Committed, "committed"),
        (MigrationOutcome::Cancelled, "cancelled"),
        (MigrationOutcome::Failed, "failed"),
    ] {
        assert_eq!(
            serde_json::to_string(&outcome).unwrap(),
            format!("\"{name}\"")
        );
        assert_eq!(outcome.to_string(), name);
    }
}
