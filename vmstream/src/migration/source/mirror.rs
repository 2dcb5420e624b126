//! Write-through mirroring on the source (`--disk-mode mirror`, `STORAGE.md`, *Mirroring*):
//! after the disks' bulk copy one thread serves, on a connection of its own, the guest
//! writes waiting in each disk's shared bitmap header (`disk::mirror`), and in between
//! sends what was dirty before mirroring began; a second thread keeps the heartbeat the
//! writers watch.
//!
//! Order at the destination: the mirror starts only once the bulk copy's round passed its
//! barrier, everything it sends travels on one connection and is applied in order, and it
//! ends (its last frame acknowledged) before the final round sends the granules still
//! dirty or in flight. No copy of a granule can overtake a later one.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::disk::bitmap::{bitmap_path, DirtyBitmap};
use crate::disk::mirror::{
    acknowledge, beat, mirror_counts, pending_requests, published, start_mirroring, stop_mirroring,
    Latencies, LatencyOf, HEARTBEAT_INTERVAL,
};
use crate::memory::PAGE_SIZE;
use crate::migration::digest::page_hash;
use crate::migration::error::SendError;
use crate::migration::transport::{Frame, FrameReader, Link, PacketChannel, Socket};
use crate::migration::wire::{
    Message, MirrorWrite, FRAME_HEADER_LEN, MIRROR_ACK, MIRROR_END, MIRROR_MAX_PAGES,
};

/// Granules of old dirt sent between two looks at the waiting writes (at most this many
/// bytes delay a write that arrives meanwhile: 256 KiB, 32 ms at 8 MB/s).
const DRAIN_BYTES: u64 = 256 << 10;

/// A disk the mirror serves.
pub(super) struct MirrorDisk {
    /// The disk image (read for what is sent).
    pub(super) path: PathBuf,
    pub(super) size: u64,
}

/// What the mirror sent, per disk.
#[derive(Debug, Default)]
pub(super) struct MirrorSent {
    /// Each page sent (page in the disk, hash of what was sent), in the order sent.
    pub(super) pages: Vec<(u64, u128)>,
    /// Bytes of the disk sent (whole pages).
    pub(super) bytes: u64,
    /// Frame bytes on the mirror's connection.
    pub(super) wire: u64,
}

/// The guest's counters when mirroring began: (mirrored writes, bytes, fallbacks), the
/// mirrored writes' latencies.
struct Baseline {
    counts: (u64, u64, u64),
    latency: Latencies,
}

/// The mirror's figures of one disk since it began.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct MirrorFigures {
    pub(super) writes: u64,
    pub(super) bytes: u64,
    pub(super) fallbacks: u64,
    pub(super) latency: Latencies,
}

/// The running mirror (see the module docs). Dropping it switches mirroring off (writers
/// waiting mark their writes dirty) and cuts its connection.
pub(super) struct DiskMirror {
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<Result<Vec<MirrorSent>, SendError>>>,
    heart: Option<JoinHandle<()>>,
    /// Our own mapping of each disk's bitmap: the switch, the backlog, the counters.
    bitmaps: Vec<DirtyBitmap>,
    baseline: Vec<Baseline>,
    socket: Socket,
}

fn open_bitmaps(disks: &[MirrorDisk]) -> Result<Vec<DirtyBitmap>, SendError> {
    disks
        .iter()
        .map(|d| {
            DirtyBitmap::open(&bitmap_path(&d.path)).map_err(|e| {
                SendError::Tracker(std::io::Error::other(format!(
                    "mirroring {}: {e}",
                    d.path.display()
                )))
            })
        })
        .collect()
}

impl DiskMirror {
    /// Starts mirroring `disks` (in `Disks` order) at `granularity` over the connection
    /// `link`/`reader` (already opened, `SourceChannels::open_mirror`).
    pub(super) fn start(
        disks: &[MirrorDisk],
        granularity: u64,
        link: Link,
        reader: FrameReader<Socket>,
    ) -> Result<DiskMirror, SendError> {
        let bitmaps = open_bitmaps(disks)?;
        let server_bitmaps = open_bitmaps(disks)?;
        let heart_bitmaps = open_bitmaps(disks)?;
        let files = disks
            .iter()
            .map(|d| File::open(&d.path))
            .collect::<Result<Vec<File>, _>>()
            .map_err(SendError::Tracker)?;
        let socket = reader.get_ref().try_clone().map_err(SendError::Socket)?;
        let baseline = bitmaps
            .iter()
            .map(|b| Baseline {
                counts: mirror_counts(b),
                latency: Latencies::read(b, LatencyOf::MirroredWrites),
            })
            .collect();
        // A generation no earlier mirror of these bitmaps used.
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        for b in &bitmaps {
            start_mirroring(b, generation);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let serving = Arc::new(AtomicBool::new(true));
        let server = {
            let (stop, serving) = (Arc::clone(&stop), Arc::clone(&serving));
            let sizes: Vec<u64> = disks.iter().map(|d| d.size).collect();
            std::thread::Builder::new()
                .name("vmstream-mirror".into())
                .spawn(move || {
                    let mut s = Server {
                        bitmaps: server_bitmaps,
                        files,
                        sizes,
                        granularity,
                        link,
                        reader,
                        seq: 0,
                        sent: Vec::new(),
                        buf: vec![0; MIRROR_MAX_PAGES * PAGE_SIZE],
                    };
                    let r = s.run(&stop);
                    // However it ended, writers stop waiting for it.
                    serving.store(false, SeqCst);
                    for b in &s.bitmaps {
                        stop_mirroring(b);
                    }
                    r.map(|()| s.sent)
                })
                .map_err(SendError::Socket)?
        };
        let heart = {
            let (stop, serving) = (Arc::clone(&stop), Arc::clone(&serving));
            std::thread::Builder::new()
                .name("vmstream-mirror-beat".into())
                .spawn(move || {
                    while serving.load(SeqCst) && !stop.load(SeqCst) {
                        heart_bitmaps.iter().for_each(beat);
                        std::thread::sleep(HEARTBEAT_INTERVAL);
                    }
                })
                .map_err(SendError::Socket)?
        };
        Ok(DiskMirror {
            stop,
            server: Some(server),
            heart: Some(heart),
            bitmaps,
            baseline,
            socket,
        })
    }

    /// The mirror's error if its thread ended on its own (a lost connection, an `Abort`).
    pub(super) fn check(&mut self) -> Result<(), SendError> {
        if self.server.as_ref().is_some_and(|s| s.is_finished()) {
            let r = self.join_server();
            return Err(r.err().unwrap_or_else(|| {
                SendError::Protocol("the disk mirror ended before it was stopped".into())
            }));
        }
        Ok(())
    }

    fn join_server(&mut self) -> Result<Vec<MirrorSent>, SendError> {
        match self.server.take().map(|s| s.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(SendError::Protocol(
                "the disk mirror's thread panicked".into(),
            )),
            None => Err(SendError::Protocol("the disk mirror already ended".into())),
        }
    }

    /// Pages of old dirt the mirror still has to send (all disks).
    pub(super) fn backlog_pages(&self) -> u64 {
        self.bitmaps
            .iter()
            .map(|b| b.dirty_count() * (b.granularity() / PAGE_SIZE as u64))
            .sum()
    }

    /// Stops mirroring (the guest is paused): the mirror's last frame is acknowledged, so
    /// everything it sent is applied at the destination. Returns what it sent.
    pub(super) fn finish(&mut self) -> Result<Vec<MirrorSent>, SendError> {
        self.stop.store(true, SeqCst);
        let r = self.join_server();
        if let Some(h) = self.heart.take() {
            let _ = h.join();
        }
        r
    }

    /// The mirror's figures per disk since it began.
    pub(super) fn figures(&self) -> Vec<MirrorFigures> {
        self.bitmaps
            .iter()
            .zip(&self.baseline)
            .map(|(b, base)| {
                let (w, by, f) = mirror_counts(b);
                MirrorFigures {
                    writes: w - base.counts.0,
                    bytes: by - base.counts.1,
                    fallbacks: f - base.counts.2,
                    latency: Latencies::read(b, LatencyOf::MirroredWrites).since(&base.latency),
                }
            })
            .collect()
    }
}

impl Drop for DiskMirror {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        for b in &self.bitmaps {
            stop_mirroring(b);
        }
        if self.server.is_some() {
            // Not finished: a failed migration. Its reads and writes end now.
            let _ = self.socket.shutdown(std::net::Shutdown::Both);
            let _ = self.join_server();
        }
        if let Some(h) = self.heart.take() {
            let _ = h.join();
        }
    }
}

/// The mirror's thread.
struct Server {
    bitmaps: Vec<DirtyBitmap>,
    files: Vec<File>,
    sizes: Vec<u64>,
    granularity: u64,
    link: Link,
    reader: FrameReader<Socket>,
    seq: u64,
    sent: Vec<MirrorSent>,
    buf: Vec<u8>,
}

impl Server {
    fn run(&mut self, stop: &AtomicBool) -> Result<(), SendError> {
        let n = self.bitmaps.len();
        self.sent = (0..n).map(|_| MirrorSent::default()).collect();
        let mut seen = vec![u64::MAX; n];
        let mut cursor = vec![0u64; n];
        let mut idle = 0u32;
        while !stop.load(SeqCst) {
            // The waiting writes first: the guest waits for them.
            let mut batch = Vec::new();
            for (i, b) in self.bitmaps.iter().enumerate() {
                let p = published(b);
                if p != seen[i] {
                    seen[i] = p;
                    batch.extend(pending_requests(b).into_iter().map(|r| (i, r)));
                }
            }
            if !batch.is_empty() {
                let runs: Vec<(usize, std::ops::Range<u64>)> = batch
                    .iter()
                    .map(|(i, r)| (*i, r.granules.clone()))
                    .collect();
                self.send_runs(&runs)?;
                for (i, r) in &batch {
                    acknowledge(&self.bitmaps[*i], r);
                }
                idle = 0;
                continue;
            }
            // Then what was dirty before mirroring began (and writes that gave up waiting).
            let runs = self.take_old_dirt(&mut cursor);
            if !runs.is_empty() {
                self.send_runs(&runs)?;
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < 20 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        self.seq += 1;
        self.send(MirrorWrite {
            seq: self.seq,
            flags: MIRROR_END | MIRROR_ACK,
            ..MirrorWrite::pages(0, 0, 0, 0, &[])
        })?;
        self.await_ack()?;
        self.link.finish()?;
        Ok(())
    }

    /// Up to [`DRAIN_BYTES`] of dirty granules, taken (cleared) from the bitmaps.
    fn take_old_dirt(&mut self, cursor: &mut [u64]) -> Vec<(usize, std::ops::Range<u64>)> {
        let per_run = DRAIN_BYTES / self.granularity;
        let mut runs = Vec::new();
        let mut left = per_run.max(1);
        for (i, b) in self.bitmaps.iter().enumerate() {
            while left > 0 {
                let found = b
                    .next_dirty_extent(cursor[i])
                    .or_else(|| b.next_dirty_extent(0));
                let Some(r) = found else { break };
                let r = r.start..r.end.min(r.start + left);
                b.clear(r.clone());
                left -= r.end - r.start;
                cursor[i] = r.end;
                runs.push((i, r));
            }
        }
        runs
    }

    /// Sends the granules `runs` (read now, after they were published or taken), the last
    /// frame asking for an acknowledgement, and waits for it.
    fn send_runs(&mut self, runs: &[(usize, std::ops::Range<u64>)]) -> Result<(), SendError> {
        let mut frames = Vec::new();
        for (disk, granules) in runs {
            let bytes = self.bitmaps[*disk].bytes_of(granules);
            let mut at = bytes.start;
            while at < bytes.end {
                let len = (bytes.end - at).min((MIRROR_MAX_PAGES * PAGE_SIZE) as u64);
                let len = len.min(self.sizes[*disk] - at) as usize;
                let buf = &mut self.buf[..len];
                self.files[*disk].read_exact_at(buf, at).map_err(|e| {
                    SendError::Tracker(std::io::Error::other(format!(
                        "mirroring disk {disk} at {at}: {e}"
                    )))
                })?;
                let sent = &mut self.sent[*disk];
                for (k, page) in buf.chunks_exact(PAGE_SIZE).enumerate() {
                    sent.pages
                        .push((at / PAGE_SIZE as u64 + k as u64, page_hash(page)));
                }
                sent.bytes += len as u64;
                self.seq += 1;
                frames.push(MirrorWrite::pages(self.seq, 0, *disk as u16, at, buf));
                at += len as u64;
            }
        }
        let Some(last) = frames.last_mut() else {
            return Ok(());
        };
        last.flags |= MIRROR_ACK;
        for f in frames {
            let disk = f.disk as usize;
            self.sent[disk].wire +=
                (FRAME_HEADER_LEN + MirrorWrite::FIXED_LEN + f.data.len() + 4) as u64;
            self.send(f)?;
        }
        self.await_ack()
    }

    fn send(&mut self, w: MirrorWrite) -> Result<(), SendError> {
        Ok(self.link.send_message(&Message::MirrorWrite(w))?)
    }

    /// Reads the acknowledgement of the frame `self.seq`.
    fn await_ack(&mut self) -> Result<(), SendError> {
        loop {
            match self.reader.read_frame()? {
                Frame::Control(Message::MirrorAck(a)) if a.seq == self.seq => return Ok(()),
                Frame::Control(Message::MirrorAck(a)) if a.seq < self.seq => continue,
                other => return Err(super::round::unexpected("a mirror acknowledgement", other)),
            }
        }
    }
}
