//! The source's disks: each disk's dirty tracker, the granules still to send, the hash of
//! every page as it was sent (for its digest), and the pushing of those granules into the
//! rounds. A disk's pages travel as pages of the codec, numbered after guest memory's
//! (`PROTOCOL.md`, *Disks*).

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::memory::{data_pages_of, PAGE_SIZE};
use crate::migration::config::{DiskTracking, SendConfig, DEFAULT_DISK_GRANULARITY};
use crate::migration::connect::channels::SourceChannels;
use crate::migration::digest::{disk_digest, hex, page_hash};
use crate::migration::error::SendError;
use crate::migration::wire::{DiskDigests, Disks};
use crate::telemetry::disk::DiskStats;
use crate::track::disk::{granule_runs, DiskTracker, HashDiskTracker};
use crate::track::BitmapDiskTracker;

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
    stats: DiskStats,
}

/// The disks of a migration, as the rounds send them.
pub(super) struct SourceDisks {
    disks: Vec<SourceDisk>,
    granularity: u64,
    /// Whether the bulk copy is still pending (set until the first round that sends it).
    bulk: bool,
    buf: Vec<u8>,
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
                stats,
            });
            first_page += size / PAGE_SIZE as u64;
        }
        let granularity = granularity.unwrap_or(DEFAULT_DISK_GRANULARITY);
        Ok(SourceDisks {
            disks,
            granularity,
            bulk: true,
            buf: vec![0; granularity as usize],
        })
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
        for d in &mut self.disks {
            let dirty = if stopped {
                d.tracker.collect_stopped()
            } else {
                d.tracker.collect()
            }
            .map_err(SendError::Tracker)?;
            if let Some(w) = d.tracker.take_written_bytes() {
                d.stats.guest_bytes_written += w;
            }
            d.pending = merge_runs(&d.pending, &dirty);
        }
        Ok(self.pending_pages(per))
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
        self.disks
            .iter()
            .map(|d| {
                let mut s = d.stats.clone();
                s.committed = committed;
                s.set_amplification();
                s
            })
            .collect()
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
