//! The source side of a migration: [`migrate`] sets it up (configuration check, channels,
//! the convergence policy, the guest-impact timeline), runs the state machine (`machine`:
//! handshake and iterating rounds; `round`: a round on the wire; `switchover`: pause, final
//! round, commit, handover), and fills in the statistics. `handover` ([`hand_over`]) moves a
//! guest on the same host by handing its memory over instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmstream_codec::PageSource;

use crate::converge::DowntimePolicy;
use crate::guest::migratable::MigratableGuest;
use crate::memory::PAGE_SIZE;
use crate::migration::config::SendConfig;
use crate::migration::connect::channels::SourceChannels;
use crate::migration::digest::memory_digest;
use crate::migration::error::SendError;
use crate::migration::transport::Frame;
use crate::migration::wire::{AbortCode, GuestKind, Message};
use crate::telemetry::impact::ImpactRecorder;
use crate::telemetry::progress::Progress;
use crate::telemetry::settings::PageCopies;
use crate::telemetry::stats::{CpuTime, MigrationStats};
use crate::telemetry::verification::VerificationStats;

mod disk_qos;
mod disks;
mod handover;
mod machine;
mod mirror;
mod postcopy;
mod report;
mod round;
mod schedule;
mod switchover;
pub mod verify;

pub use handover::{hand_over, HandoverReport};
pub use report::{migrate, SendReport};

use machine::Source;
use round::RoundIo;
use verify::{RecordingReader, Verification, VerifyMode};

/// Why a migration cancelled through `SendConfig::cancel` ended.
const CANCELLED: &str = "on request (SIGINT or SIGTERM from the command line)";

/// How a migration that did not fail ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination committed the image.
    Committed,
    /// The policy cancelled (timeout); the source guest keeps running.
    Cancelled(String),
    /// The destination committed, and the source then stopped as the injected crash
    /// ([`SourceFaults::crash_after_commit`](crate::migration::fault::SourceFaults)) asked:
    /// its guest left paused, not ended, and no `Handover` sent.
    CrashedAfterCommit,
}

/// How long hashing all of `memory` takes, extrapolated from hashing a 64 MiB sample of it:
/// the fastest of three runs (the first also starts the thread pool; a busy machine
/// makes single runs several times slower than the hash at the pause turns out).
fn digest_time_estimate(memory: &crate::memory::GuestMemory) -> Duration {
    let sample_len = memory.len().min(64 << 20);
    let mut sample = vec![0u8; sample_len];
    memory.read_at(0, &mut sample);
    let best = (0..3)
        .map(|_| {
            let t = Instant::now();
            let _ = memory_digest(&sample, PAGE_SIZE);
            t.elapsed()
        })
        .min()
        .unwrap_or_default();
    let per_byte = best.as_secs_f64() / sample_len.max(1) as f64;
    Duration::from_secs_f64(per_byte * memory.len() as f64)
}

/// The share of the downtime limit the last pages may take: what the switchover digest
/// (`overhead`) leaves, but at least a tenth of the limit. Iterating cannot shorten the digest,
/// so when it takes (nearly) the whole limit, waiting for an empty dirty set only spins
/// through tiny rounds (2,302 were seen): the migration switches over once the pages are
/// negligible instead.
fn page_budget(limit: Duration, overhead: Duration) -> Duration {
    limit.saturating_sub(overhead).max(limit / 10)
}

/// Migrates `guest` to `cfg.to`, filling `stats` ([`migrate`] makes and finishes them); on
/// error before the commit the guest is resumed (if it was paused) and an `Abort` is sent
/// when the connection still works.
fn run_migration(
    cfg: &SendConfig,
    guest: &mut dyn MigratableGuest,
    stats: &mut MigrationStats,
) -> Result<Outcome, SendError> {
    let start = Instant::now();
    // Library callers too (the CLI checked before starting the guest).
    cfg.check().map_err(SendError::Config)?;
    if crate::migration::interrupt::requested(cfg.cancel.as_ref()) {
        return Ok(Outcome::Cancelled(CANCELLED.into()));
    }
    let pages = guest.size() / PAGE_SIZE as u64;
    // The switchover digest of `--verify full` hashes all of memory (both sides in
    // parallel): that time is part of the downtime whatever the dirty pages.
    let overhead = digest_time_estimate(guest.memory());
    stats.settings.switchover_digest_estimate_ms = Some(overhead.as_secs_f64() * 1e3);
    // Post-copy proves the destination's memory with the digest of ours at the pause,
    // hashed while the owed pages travel.
    let mode = match cfg.postcopy {
        crate::migration::config::PostcopyMode::Off => {
            // Against the pause the policy aims at (`--downtime-target`, at most the
            // limit): a full digest that fills a fifth of the limit would alone exceed it.
            let aim = cfg
                .converge
                .aim_low
                .target(cfg.downtime_limit)
                .unwrap_or(cfg.downtime_limit);
            cfg.verify.resolve(overhead, aim)
        }
        _ => VerifyMode::Full,
    };
    let verification = (mode != VerifyMode::Full)
        .then(|| Verification::new(pages, mode == VerifyMode::Strict, cfg.scrub));
    stats.verify = Some(VerificationStats {
        requested: cfg.verify.name().into(),
        mode: mode.name().into(),
        ..Default::default()
    });
    // The encode workers read pages themselves unless the tracker must see every page
    // sent; with incremental verification they also record what they read.
    let workers_reader = (!guest.tracker().needs_sent_pages()).then(|| {
        let reader = guest.memory().reader();
        match &verification {
            Some(v) => Arc::new(RecordingReader {
                reader,
                sent: Arc::clone(v.sent()),
            }) as Arc<dyn PageSource>,
            None => Arc::new(reader) as Arc<dyn PageSource>,
        }
    });
    // Disk pages follow memory's in the codec's page numbers.
    let disks = if cfg.disks.is_empty() {
        None
    } else {
        Some(disks::SourceDisks::open(cfg, pages)?)
    };
    let codec_pages = pages + disks.as_ref().map_or(0, |d| d.pages());
    let (channels, reader) = SourceChannels::open(cfg, codec_pages, workers_reader)?;
    stats.settings.xbzrle_cache_bytes = cfg.encoder.delta.map(|_| channels.cache_bytes());
    stats.settings.page_copies = Some(if channels.reads_pages() {
        PageCopies::EncodeWorkers
    } else {
        PageCopies::SendingThread
    });
    if channels.count() > 1 {
        stats.settings.migration_id = Some(channels.migration_id());
    }
    // The sampler reads the file-backed workload's superblock; a KVM guest keeps its
    // counters elsewhere (its timeline has rounds and throttle, no TPS samples yet).
    let memory_path = guest.memory().path().to_path_buf();
    let impact = ImpactRecorder::start(
        (guest.kind() == GuestKind::File).then_some(memory_path.as_path()),
        start,
        &cfg.notices,
    );
    let strategy = cfg
        .converge
        .strategy()
        .map_err(|e| SendError::Config(e.to_string()))?;
    let deferral = cfg
        .converge
        .deferral(guest.size() / PAGE_SIZE as u64)
        .map_err(|e| SendError::Config(e.to_string()))?;
    // The pages get what the full digest leaves; the incremental one hashes only the
    // final round's pages, as they are sent.
    let overhead = if verification.is_some() {
        Duration::ZERO
    } else {
        overhead
    };
    let aim = &cfg.converge.aim_low;
    let target = aim.target(cfg.downtime_limit).map_err(SendError::Config)?;
    let policy = DowntimePolicy::new(
        page_budget(cfg.downtime_limit, overhead),
        cfg.timeout,
        cfg.on_timeout,
        strategy,
    )
    .with_target(page_budget(target, overhead), aim.min_shrink)
    .with_deferral(deferral);
    let io = RoundIo {
        channels,
        reader,
        progress: Progress::new(cfg.progress, &cfg.notices),
        cancel: cfg.cancel.clone(),
        round_trip: Duration::MAX,
        sent: verification.as_ref().map(|v| Arc::clone(v.sent())),
        disks,
    };
    let mut source = Source::new(cfg, guest, io, policy, stats, start, impact);
    source.verification = verification;
    source.stats.settings.policy = Some(source.policy.name().into());
    let mut result = source.run();
    if let Err(SendError::Transport(_)) = &result {
        // A destination that gave up first says why before closing: prefer its reason.
        source.io.reader.set_timeout(Some(Duration::from_secs(2)));
        loop {
            match source.io.reader.read_frame() {
                Ok(Frame::Control(Message::Abort(a))) => {
                    result = Err(SendError::PeerAborted {
                        code: a.code,
                        reason: a.reason,
                    });
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    source.io.progress.finish();
    source.stats.codec = source.io.channels.total_stats();
    if let Some(d) = source.policy.deferral() {
        // Pages written again while deferred: each would have been sent twice.
        source.stats.settings.defer_hot_saved_bytes = Some(d.saved_bytes());
    }
    source.stats.timeline = Some(source.impact.finish());
    source.stats.rounds = source.stats.per_round.len() as u64;
    if let Some(d) = &source.io.disks {
        let committed = matches!(result, Ok(Outcome::Committed | Outcome::CrashedAfterCommit));
        source.stats.disks = d.stats(committed);
    }
    if let Err(e) = &result {
        // After a post-copy's handover our guest has ended: nothing to resume.
        if source.guest.is_paused() && !matches!(e, SendError::PostcopyLost(_)) {
            if let Err(r) = source.guest.resume() {
                cfg.notices
                    .error(format!("resuming the source guest failed: {r}"));
            }
        }
        // Tell the destination why, if the connection still works (best effort).
        let _ = source
            .io
            .channels
            .abort(AbortCode::SourceError, e.to_string());
    }
    let _ = source.io.channels.finish();
    let bytes = source.io.channels.bytes_sent();
    source.stats.channel_bytes = source.io.channels.bytes_per_channel();
    stats.bytes_on_wire = bytes.max(stats.per_round.iter().map(|r| r.wire_bytes).sum());
    stats.cpu = CpuTime::now();
    if stats.total_time_ms == 0.0 {
        stats.total_time_ms = start.elapsed().as_secs_f64() * 1e3;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_keep_a_tenth_of_the_limit_whatever_the_digest_takes() {
        let ms = Duration::from_millis;
        assert_eq!(page_budget(ms(300), ms(100)), ms(200));
        assert_eq!(page_budget(ms(300), ms(285)), ms(30));
        assert_eq!(page_budget(ms(300), ms(900)), ms(30));
        assert_eq!(page_budget(ms(300), Duration::ZERO), ms(300));
    }
}
