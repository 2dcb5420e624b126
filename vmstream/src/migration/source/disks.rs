//! The source's disks: each disk's dirty tracker, the granules still to send, the hash of
//! every page as it was sent (for its digest), and the pushing of those granules into the
//! rounds. A disk's pages travel as pages of the codec, numbered after guest memory's
//! (`PROTOCOL.md`, *Disks*).

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::disk::bitmap::{bitmap_path, DirtyBitmap};
use crate::disk::mirror::{Latencies, LatencyOf};
use crate::memory::{data_pages_of, PAGE_SIZE};
use crate::migration::config::{DiskMode, DiskTracking, SendConfig, DEFAULT_DISK_GRANULARITY};
use crate::migration::connect::channels::SourceChannels;
use crate::migration::digest::{disk_digest, hex, page_hash};
use crate::migration::error::SendError;
use crate::migration::wire::{DiskDigests, Disks};
use crate::telemetry::disk::DiskStats;
use crate::track::disk::{granule_runs, DiskTracker, HashDiskTracker};
use crate::track::BitmapDiskTracker;

use super::disk_qos::WriteQos;
use super::mirror::{DiskMirror, MirrorDisk, MirrorFigures};

/// One disk on its way.
struct SourceDisk {
    path: PathBuf,
    file: File,
    size: u64,
    /// Its first page in the codec's page numbers.
    first_page: u64,
    tracker: Box<dyn DiskTracker>,
    /// XXH3-128 of every page as last sent (a hole never sent: the zero page's).
    sent: Vec<u128>,
    /// Granule runs to send in the next round: sorted, disjoint.
    pending: Vec<Range<u64>>,
    /// Bytes of pages pushed but not yet attributed to a round's packets, and how many of
    /// them are not zero.
    round_pages: u64,
    round_nonzero: u64,
    /// Bytes the guest wrote to it between the last two collects.
    written: u64,
    stats: DiskStats,
    /// With builtin tracking, our mapping of its bitmap and the guest's write latencies
    /// when the migration began (the statistics' latencies are those since).
    latency: Option<(DirtyBitmap, Latencies)>,
}

/// The disks of a migration, as the rounds send them.
pub(super) struct SourceDisks {
    disks: Vec<SourceDisk>,
    granularity: u64,
    /// Whether the bulk copy is still pending (set until the first round that sends it).
    bulk: bool,
    buf: Vec<u8>,
    /// When the disks were last collected, and the time between the last two collects.
    collected_at: Instant,
    interval: Duration,
    /// Disk write QoS: the cap's controller, and since when a cap is in force.
    qos: WriteQos,
    limited_since: Option<Instant>,
    /// A tracker's writer cannot be capped (hash tracking): QoS is off.
    qos_unavailable: bool,
    /// `--disk-mode mirror`: mirror once the bulk copy is applied.
    mirror_mode: bool,
    /// The running mirror (`super::mirror`), from the bulk copy's acknowledgement to the
    /// pause.
    mirror: Option<DiskMirror>,
    /// The mirror's figures per disk, once it finished.
    mirror_figures: Option<Vec<MirrorFigures>>,
}

/// The union of two sorted lists of disjoint runs.
fn merge_runs(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut all: Vec<Range<u64>> = a.iter().chain(b).cloned().collect();
    all.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

fn runs_pages(runs: &[Range<u64>], pages_per_granule: u64) -> u64 {
    runs.iter()
        .map(|r| (r.end - r.start) * pages_per_granule)
        .sum()
}

impl SourceDisks {
    /// Opens `cfg.disks` and starts tracking them now; their pages follow the
    /// `memory_pages` of guest memory. Every granule holding data is pending (the bulk
    /// copy); holes are skipped (a write into one after this instant is tracked).
    pub(super) fn open(cfg: &SendConfig, memory_pages: u64) -> Result<SourceDisks, SendError> {
        let settings = &cfg.disk_settings;
        let zero = page_hash(&[0u8; PAGE_SIZE]);
        let mut first_page = memory_pages;
        let mut disks = Vec::with_capacity(cfg.disks.len());
        // With builtin tracking the granularity is the guest's bitmaps' (asked for, or
        // adopted from the first disk's).
        let mut granularity = settings.granularity;
        for path in &cfg.disks {
            let err =
                |e: std::io::Error| SendError::Config(format!("--disk {}: {e}", path.display()));
            let file = File::open(path).map_err(err)?;
            let size = file.metadata().map_err(err)?.len();
            // Tracking starts before the data is looked up: a write from here on is seen.
            let tracker: Box<dyn DiskTracker> = match settings.tracking {
                DiskTracking::Hash => {
                    let g = *granularity.get_or_insert(DEFAULT_DISK_GRANULARITY);
                    Box::new(
                        HashDiskTracker::open(path, g)
                            .map_err(|e| err(std::io::Error::other(e)))?,
                    )
                }
                DiskTracking::Builtin => {
                    let t = BitmapDiskTracker::open(path, size).map_err(err)?;
                    let g = *granularity.get_or_insert(t.granularity());
                    if t.granularity() != g {
                        return Err(SendError::Config(format!(
                            "--disk {}: its guest tracks writes at a granularity of {} bytes, \
                             not {g} (--disk-granularity)",
                            path.display(),
                            t.granularity()
                        )));
                    }
                    Box::new(t)
                }
            };
            let per = tracker.granularity() / PAGE_SIZE as u64;
            let data = data_pages_of(&file, size as usize).map_err(err)?;
            let pages: Vec<u64> = (0..size / PAGE_SIZE as u64)
                .filter(|&p| !crate::memory::page_is_hole(&data, p))
                .collect();
            let pending = granule_runs(&pages, per);
            let latency = match settings.tracking {
                DiskTracking::Builtin => DirtyBitmap::open(&bitmap_path(path)).ok().map(|b| {
                    let l = Latencies::read(&b, LatencyOf::AllWrites);
                    (b, l)
                }),
                DiskTracking::Hash => None,
            };
            let stats = DiskStats {
                path: path.display().to_string(),
                size,
                granularity: tracker.granularity(),
                tracking: Some(tracker.name().into()),
                ..Default::default()
            };
            disks.push(SourceDisk {
                path: path.clone(),
                file,
                size,
                first_page,
                tracker,
                sent: vec![zero; (size / PAGE_SIZE as u64) as usize],
                pending,
                round_pages: 0,
                round_nonzero: 0,
                written: 0,
                stats,
                latency,
            });
            first_page += size / PAGE_SIZE as u64;
        }
        let granularity = granularity.unwrap_or(DEFAULT_DISK_GRANULARITY);
        Ok(SourceDisks {
            disks,
            granularity,
            bulk: true,
            buf: vec![0; granularity as usize],
            collected_at: Instant::now(),
            interval: Duration::ZERO,
            qos: WriteQos::default(),
            limited_since: None,
            qos_unavailable: false,
            mirror_mode: settings.mode == DiskMode::Mirror,
            mirror: None,
            mirror_figures: None,
        })
    }

    /// Whether the mirror should start now: mirror mode, the bulk copy sent (and, the
    /// caller knows, acknowledged), not started yet.
    pub(super) fn mirror_due(&self) -> bool {
        self.mirror_mode && !self.bulk && self.mirror.is_none() && self.mirror_figures.is_none()
    }

    /// Pages the running mirror has still to drain (0 without a mirror).
    pub(super) fn mirror_backlog_pages(&self) -> u64 {
        self.mirror.as_ref().map_or(0, |m| m.backlog_pages())
    }

    /// Whether the mirror runs (the disks' rounds then send nothing: the mirror does).
    pub(super) fn mirroring(&self) -> bool {
        self.mirror.is_some()
    }

    /// Starts the mirror on the opened connection `link`/`reader` (see
    /// [`Self::mirror_due`]). Granules still pending go back to the bitmaps: the mirror
    /// sends them.
    pub(super) fn start_mirror(
        &mut self,
        link: crate::migration::transport::Link,
        reader: crate::migration::transport::FrameReader<crate::migration::transport::Socket>,
    ) -> Result<(), SendError> {
        let disks: Vec<MirrorDisk> = self
            .disks
            .iter()
            .map(|d| MirrorDisk {
                path: d.path.clone(),
                size: d.size,
            })
            .collect();
        let mirror = DiskMirror::start(&disks, self.granularity, link, reader)?;
        for d in &mut self.disks {
            if let Some((b, _)) = &d.latency {
                for r in std::mem::take(&mut d.pending) {
                    b.mark(r);
                }
            }
        }
        self.mirror = Some(mirror);
        Ok(())
    }

    /// Ends the mirror (the guest is paused): its last frame acknowledged, the hashes of
    /// what it sent recorded for the digests, its figures kept.
    fn finish_mirror(&mut self) -> Result<(), SendError> {
        let Some(mut mirror) = self.mirror.take() else {
            return Ok(());
        };
        let sent = mirror.finish()?;
        self.mirror_figures = Some(mirror.figures());
        for (d, s) in self.disks.iter_mut().zip(sent) {
            for (p, h) in s.pages {
                d.sent[p as usize] = h;
            }
            d.stats.bytes_sent += s.bytes;
            d.stats.bytes_on_wire += s.wire;
            d.stats.mirror_sent_bytes += s.bytes;
        }
        Ok(())
    }

    /// The handshake's announcement of the disks.
    pub(super) fn message(&self) -> Disks {
        Disks {
            granularity: self.granularity,
            sizes: self.disks.iter().map(|d| d.size).collect(),
        }
    }

    /// Pages in the codec's numbering that the disks add after guest memory.
    pub(super) fn pages(&self) -> u64 {
        self.disks.iter().map(|d| d.size / PAGE_SIZE as u64).sum()
    }

    /// Adds the granules written since the last collect to the pending ones; returns the
    /// pages now pending, all disks. `stopped`: the guest is paused (the final collect,
    /// which also takes writes it was stopped in the middle of).
    pub(super) fn collect(&mut self, stopped: bool) -> Result<u64, SendError> {
        let per = self.granularity / PAGE_SIZE as u64;
        if stopped {
            self.finish_mirror()?;
        }
        if let Some(m) = &mut self.mirror {
            // The mirror sends the granules: what is left is its backlog.
            m.check()?;
            for d in &mut self.disks {
                d.written = d.tracker.take_written_bytes().unwrap_or(0);
                d.stats.guest_bytes_written += d.written;
            }
            self.interval = self.collected_at.elapsed();
            self.collected_at = Instant::now();
            return Ok(m.backlog_pages());
        }
        for d in &mut self.disks {
            let dirty = if stopped {
                d.tracker.collect_stopped()
            } else {
                d.tracker.collect()
            }
            .map_err(SendError::Tracker)?;
            d.written = d.tracker.take_written_bytes().unwrap_or(0);
            d.stats.guest_bytes_written += d.written;
            d.pending = merge_runs(&d.pending, &dirty);
        }
        self.interval = self.collected_at.elapsed();
        self.collected_at = Instant::now();
        Ok(self.pending_pages(per))
    }

    /// Disk write QoS after a round's collect ([`WriteQos`]; a backlog of `negligible`
    /// bytes fits the switchover): caps the guest's writes to each disk, the cap shared by
    /// what each disk was written since the previous collect (each gets at least a
    /// `2 * disks`th of it). Returns the new cap on all the disks' writes when it changed
    /// (`Some(None)`: lifted).
    pub(super) fn qos_after_round(&mut self, negligible: u64) -> Option<Option<u64>> {
        if self.qos_unavailable {
            return None;
        }
        let pending = self.pending_pages(self.granularity / PAGE_SIZE as u64) * PAGE_SIZE as u64;
        let written: u64 = self.disks.iter().map(|d| d.written).sum();
        let rate = written as f64 / self.interval.as_secs_f64().max(1e-3);
        let change = self.qos.after_round(pending, rate, negligible)?;
        let n = self.disks.len() as u64;
        let mut obeyed = true;
        for d in &mut self.disks {
            let share = change.map(|l| {
                let by_writes = (l as f64 * d.written as f64 / written.max(1) as f64) as u64;
                by_writes.max(l / (2 * n)).max(1)
            });
            obeyed &= d.tracker.limit_writes(share);
            if let Some(s) = share {
                d.stats.write_limit_min = Some(d.stats.write_limit_min.map_or(s, |m| m.min(s)));
            }
        }
        if !obeyed {
            // The hash tracker's writer is not ours to cap.
            self.qos_unavailable = true;
            for d in &mut self.disks {
                d.tracker.limit_writes(None);
                d.stats.write_limit_min = None;
            }
            return None;
        }
        match (change, self.limited_since) {
            (Some(_), None) => self.limited_since = Some(Instant::now()),
            (None, Some(t)) => {
                let ms = t.elapsed().as_secs_f64() * 1e3;
                for d in &mut self.disks {
                    d.stats.write_limited_ms += ms;
                }
                self.limited_since = None;
            }
            _ => {}
        }
        Some(change)
    }

    fn pending_pages(&self, per: u64) -> u64 {
        self.disks.iter().map(|d| runs_pages(&d.pending, per)).sum()
    }

    /// Queues every pending granule on `channels` (tracking re-armed before each read, the
    /// bytes read told to the tracker and hashed for the digest); `alive` is asked every 256
    /// pages (cancel, the guest's life). Returns the pages queued.
    pub(super) fn push_pending(
        &mut self,
        channels: &mut SourceChannels,
        alive: &mut dyn FnMut() -> Result<(), SendError>,
    ) -> Result<u64, SendError> {
        let g = self.granularity;
        let bulk = std::mem::take(&mut self.bulk);
        let mut queued = 0u64;
        for d in &mut self.disks {
            let runs = std::mem::take(&mut d.pending);
            let mut bytes = 0u64;
            for run in runs {
                d.tracker
                    .before_read(run.clone())
                    .map_err(SendError::Tracker)?;
                for granule in run {
                    let at = granule * g;
                    let len = g.min(d.size - at) as usize;
                    let buf = &mut self.buf[..len];
                    d.file.read_exact_at(buf, at).map_err(|e| {
                        SendError::Tracker(std::io::Error::other(format!(
                            "reading disk {} at {at}: {e}",
                            d.path.display()
                        )))
                    })?;
                    d.tracker.granules_sent(granule, buf);
                    for (i, page) in buf.chunks_exact(PAGE_SIZE).enumerate() {
                        let p = at / PAGE_SIZE as u64 + i as u64;
                        d.sent[p as usize] = page_hash(page);
                        if !vmstream_simd::is_zero(page) {
                            d.round_nonzero += 1;
                        }
                        channels.push(d.first_page + p, page)?;
                        queued += 1;
                        if queued.is_multiple_of(256) {
                            alive()?;
                        }
                    }
                    bytes += len as u64;
                }
            }
            if bytes > 0 {
                d.stats.rounds += 1;
                d.stats.bytes_sent += bytes;
                d.round_pages += bytes / PAGE_SIZE as u64;
                if bulk {
                    d.stats.bulk_bytes += bytes;
                }
            }
        }
        Ok(queued)
    }

    /// Shares a round's `packet_bytes` among memory and the disks by their non-zero pages
    /// (`nonzero_records`: the round's non-zero page records, all of them).
    pub(super) fn attribute(&mut self, packet_bytes: u64, nonzero_records: u64) {
        let total: u64 = self.disks.iter().map(|d| d.round_pages).sum();
        for d in &mut self.disks {
            if total > 0 && nonzero_records > 0 {
                let share = d.round_nonzero.min(nonzero_records) as f64 / nonzero_records as f64;
                d.stats.bytes_on_wire += (packet_bytes as f64 * share) as u64;
            }
            d.round_pages = 0;
            d.round_nonzero = 0;
        }
    }

    /// The disks' digests of what was sent (`digest::disk_digest`), once the final round
    /// is queued; recorded in the statistics.
    pub(super) fn digests(&mut self) -> DiskDigests {
        let digests = self
            .disks
            .iter_mut()
            .map(|d| {
                let digest = disk_digest(PAGE_SIZE, d.size, d.sent.iter().copied());
                d.stats.digest = Some(hex(&digest));
                digest
            })
            .collect();
        DiskDigests { digests }
    }

    /// The per-disk statistics; `committed`: the destination committed them.
    pub(super) fn stats(&self, committed: bool) -> Vec<DiskStats> {
        let mut out: Vec<DiskStats> = self
            .disks
            .iter()
            .map(|d| {
                let mut s = d.stats.clone();
                s.committed = committed;
                s.set_amplification();
                // A cap still in force (the guest paused under it).
                if let Some(t) = self.limited_since {
                    s.write_limited_ms += t.elapsed().as_secs_f64() * 1e3;
                }
                s.write_limit_wait_ms = d.tracker.limit_waited().as_secs_f64() * 1e3;
                if let Some((b, start)) = &d.latency {
                    let l = Latencies::read(b, LatencyOf::AllWrites).since(start);
                    s.write_latency_p50_us = l.quantile_us(0.5);
                    s.write_latency_p99_us = l.quantile_us(0.99);
                }
                s
            })
            .collect();
        let live = self.mirror.as_ref().map(|m| m.figures());
        if let Some(figures) = live.as_ref().or(self.mirror_figures.as_ref()) {
            for (s, f) in out.iter_mut().zip(figures) {
                s.mirrored_writes = Some(f.writes);
                s.mirrored_bytes = Some(f.bytes);
                s.mirror_fallbacks = Some(f.fallbacks);
                s.mirrored_write_latency_p50_us = f.latency.quantile_us(0.5);
                s.mirrored_write_latency_p99_us = f.latency.quantile_us(0.99);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_into_sorted_disjoint_runs() {
        assert_eq!(
            merge_runs(&[0..2, 8..9], &[1..4, 9..10, 20..21]),
            vec![0..4, 8..10, 20..21]
        );
        assert_eq!(merge_runs(&[], &[]), Vec::<Range<u64>>::new());
        assert_eq!(runs_pages(&[0..4, 8..10], 16), 96);
    }
}
