//! One round on the wire: sending a round's pages on every channel, awaiting the
//! destination's acknowledgement, and the measurements that come with it.

use crate::migration::transport::Socket;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::guest::migratable::MigratableGuest;
use crate::memory::PAGE_SIZE;
use crate::migration::connect::channels::{ChannelRound, SourceChannels};
use crate::migration::error::SendError;
use crate::migration::transport::{Frame, FrameReader};
use crate::migration::wire::{Message, FRAME_HEADER_LEN, ROUND_FINAL};
use crate::telemetry::progress::Progress;
use crate::telemetry::stats::RoundStats;

use super::disks::SourceDisks;
use super::verify::SentPages;

/// Where a round's pages are read from: the running guest or the paused guest's memory (not
/// the codec's `PageSource`, which is what the encode workers copy live pages from).
pub(super) enum PageOrigin<'a> {
    /// The running guest's mapping (each page copied, racing writes are re-sent later).
    Live(&'a mut dyn MigratableGuest),
    /// The same, but pages whose bit is clear in the bitmap (holes of the memory file when
    /// dirty tracking started) are sent as zero without being read: a write to one after
    /// that instant is reported by the tracker (it
    /// [`reports_writes_to_holes`](crate::track::DirtyTracker::reports_writes_to_holes))
    /// and sent again.
    LiveSkippingHoles(&'a mut dyn MigratableGuest, &'a [u64]),
    /// Memory of the paused guest.
    Frozen(&'a [u8]),
}

/// The machinery a round needs: the channels (encoders and writers; control messages go
/// on channel 0) and channel 0's reader.
pub(super) struct RoundIo {
    pub(super) channels: SourceChannels,
    pub(super) reader: FrameReader<Socket>,
    pub(super) progress: Progress,
    /// `SendConfig::cancel`.
    pub(super) cancel: Option<Arc<AtomicBool>>,
    /// The round trip to the destination, at most: the shortest exchange seen (the
    /// handshake, or a round from its first page to its acknowledgement).
    pub(super) round_trip: Duration,
    /// Incremental verification: where the hash of every page sent goes (pages the encode
    /// workers read are recorded by their reader, `verify::RecordingReader`).
    pub(super) sent: Option<Arc<SentPages>>,
    /// The guest's disks (`--disk`): their pending granules end every round.
    pub(super) disks: Option<SourceDisks>,
}

/// A round whose pages and `RoundEnd` are queued and whose acknowledgement is awaited.
pub(super) struct RoundInFlight {
    round: u64,
    flags: u32,
    pages: u64,
    started: Instant,
    sent: ChannelRound,
}

impl RoundIo {
    /// Sends one round and waits for its acknowledgement.
    pub(super) fn send_round(
        &mut self,
        round: u64,
        pages: &[u64],
        src: PageOrigin<'_>,
        flags: u32,
    ) -> Result<RoundStats, SendError> {
        let r = self.send_pages(round, pages, src, flags)?;
        self.await_ack(r)
    }

    /// Queues a round's pages and then its `RoundEnd` on every channel.
    pub(super) fn send_pages(
        &mut self,
        round: u64,
        pages: &[u64],
        mut src: PageOrigin<'_>,
        flags: u32,
    ) -> Result<RoundInFlight, SendError> {
        let started = Instant::now();
        let last = flags & ROUND_FINAL != 0;
        self.progress.round(round, pages.len() as u64, last);
        // Live pages are read by the encode workers themselves, in parallel, when the
        // tracker allows it; otherwise by this thread (with this reader) straight into the
        // codec's batch. Either way the one copy is the snapshot the encoder and the page
        // cache see.
        let reader = match &src {
            PageOrigin::Live(g) | PageOrigin::LiveSkippingHoles(g, _)
                if !self.channels.reads_pages() =>
            {
                Some(g.memory().reader())
            }
            _ => None,
        };
        for (i, &p) in pages.iter().enumerate() {
            // The final round runs to its end: the guest is paused, and only the
            // destination's verdict may end the migration now.
            if i % 256 == 0 && !last {
                if self.cancelled() {
                    return Err(SendError::Cancelled);
                }
                if let PageOrigin::Live(g) | PageOrigin::LiveSkippingHoles(g, _) = &mut src {
                    g.check_alive().map_err(SendError::Guest)?;
                }
            }
            let sent = self.sent.as_deref();
            let record = |slot: &[u8]| {
                if let Some(sent) = sent {
                    sent.record(p, slot)
                }
            };
            match &mut src {
                PageOrigin::Frozen(m) => self.push_frozen_page(p, m)?,
                // Holes of a sparse memory file are filled with zeros here, never read.
                PageOrigin::LiveSkippingHoles(g, data) if crate::memory::page_is_hole(data, p) => {
                    let tracker = g.tracker();
                    self.channels.push_with(p, |slot| {
                        slot.fill(0);
                        tracker.page_sent(p, slot);
                        record(slot);
                        Ok(())
                    })?
                }
                PageOrigin::Live(g) | PageOrigin::LiveSkippingHoles(g, _) => {
                    // Tracking restarts for the page before it is read: a write racing
                    // with the read is reported next round.
                    let tracker = g.tracker();
                    tracker.before_read(p).map_err(SendError::Tracker)?;
                    match &reader {
                        Some(reader) => self.channels.push_with(p, |slot| {
                            reader.read_page(p, slot);
                            tracker.page_sent(p, slot);
                            record(slot);
                            Ok(())
                        })?,
                        None => self.channels.push_page(p)?,
                    }
                }
            }
            if i % 256 == 255 {
                self.progress.inc(256);
            }
        }
        let cancel = self.cancel.clone();
        let mut alive = || -> Result<(), SendError> {
            if last {
                return Ok(());
            }
            if crate::migration::interrupt::requested(cancel.as_ref()) {
                return Err(SendError::Cancelled);
            }
            if let PageOrigin::Live(g) | PageOrigin::LiveSkippingHoles(g, _) = &mut src {
                g.check_alive().map_err(SendError::Guest)?;
            }
            Ok(())
        };
        self.end_pages(round, flags, pages.len() as u64, started, &mut alive)
    }

    /// Queues pages of the paused guest's `memory` for the final round (begun by
    /// [`Self::begin_final`]), each recorded as sent for incremental verification.
    pub(super) fn push_frozen(&mut self, pages: &[u64], memory: &[u8]) -> Result<(), SendError> {
        for &p in pages {
            self.push_frozen_page(p, memory)?;
        }
        self.progress.inc(pages.len() as u64);
        Ok(())
    }

    /// Queues page `p` of the paused guest's `memory`, recorded as sent.
    fn push_frozen_page(&mut self, p: u64, memory: &[u8]) -> Result<(), SendError> {
        let page = &memory[p as usize * PAGE_SIZE..][..PAGE_SIZE];
        if let Some(sent) = self.sent.as_deref() {
            sent.record(p, page);
        }
        self.channels.push(p, page)
    }

    /// Starts the final round whose pages come in parts ([`Self::push_frozen`], then
    /// [`Self::end_final`]); returns its start.
    pub(super) fn begin_final(&mut self, round: u64, expected_pages: u64) -> Instant {
        self.progress.round(round, expected_pages, true);
        Instant::now()
    }

    /// Ends the final round begun at `started` with `pages` pages pushed: the disks'
    /// pending granules, then its `RoundEnd`.
    pub(super) fn end_final(
        &mut self,
        round: u64,
        flags: u32,
        pages: u64,
        started: Instant,
    ) -> Result<RoundInFlight, SendError> {
        self.end_pages(round, flags, pages, started, &mut || Ok(()))
    }

    /// The end of a round's queueing: the disks' pending granules follow its memory pages
    /// (`alive` checked between them), then every channel ends the round; the one
    /// acknowledgement covers them all.
    fn end_pages(
        &mut self,
        round: u64,
        flags: u32,
        pages: u64,
        started: Instant,
        alive: &mut dyn FnMut() -> Result<(), SendError>,
    ) -> Result<RoundInFlight, SendError> {
        if let Some(disks) = self.disks.as_mut() {
            disks.push_pending(&mut self.channels, alive)?;
        }
        let sent = self.channels.end_round(round, flags)?;
        Ok(RoundInFlight {
            round,
            flags,
            pages,
            started,
            sent,
        })
    }

    /// Reads the acknowledgement of `r` and checks it covers everything sent. The round's
    /// duration (from its first page to the acknowledgement) includes one round trip,
    /// which also bounds the round trip from above.
    pub(super) fn await_ack(&mut self, r: RoundInFlight) -> Result<RoundStats, SendError> {
        let RoundInFlight {
            round,
            flags,
            pages,
            started,
            sent,
        } = r;
        let (codec, end) = (sent.codec, sent.total);
        // A destination verifying the resumed workload first says what its verify at the
        // pause would have left to check (`FEATURE_VERIFY_BACKLOG`).
        let mut backlog = None;
        let ack = loop {
            match self.reader.read_frame()? {
                Frame::Control(Message::VerifyBacklog(b))
                    if b.round == round && backlog.is_none() =>
                {
                    backlog = Some(Duration::from_nanos(b.expected_ns));
                }
                Frame::Control(Message::RoundAck(a)) if a.round == round => break a,
                other => return Err(unexpected("a round acknowledgement", other)),
            }
        };
        if ack.records != end.records || ack.packets != end.packets {
            return Err(SendError::Protocol(format!(
                "round {round}: destination applied {} records in {} packets, we sent {} in {}",
                ack.records, ack.packets, end.records, end.packets
            )));
        }
        let duration = started.elapsed().max(Duration::from_micros(1));
        self.round_trip = self.round_trip.min(duration);
        if flags & ROUND_FINAL == 0 {
            if let Some(sent) = &self.sent {
                // The digest's group hashes of what this round sent, while the guest runs:
                // at the pause only the final round's groups are left to hash.
                sent.hashes().refresh();
            }
        }
        // From the last RoundEnd on the wire to its acknowledgement, less the destination's
        // barrier: one round trip plus any wait behind pages still being applied. (In the
        // final round the guest state and digest were flushed after the RoundEnd.)
        if let (Some(flushed), false) =
            (self.channels.message_flushed_at(), flags & ROUND_FINAL != 0)
        {
            let sample = flushed
                .elapsed()
                .saturating_sub(Duration::from_nanos(ack.barrier_ns));
            self.round_trip = self.round_trip.min(sample.max(Duration::from_micros(1)));
        }
        let wire =
            codec.packet_bytes + codec.packets * FRAME_HEADER_LEN as u64 + sent.end_frame_bytes;
        let mut rs = RoundStats {
            round,
            paused: flags & ROUND_FINAL != 0,
            dirty_pages: pages,
            wire_bytes: wire,
            duration_ms: duration.as_secs_f64() * 1e3,
            bandwidth_bytes_per_s: wire as f64 / duration.as_secs_f64(),
            destination_verify_backlog_ms: backlog.map(|b| b.as_secs_f64() * 1e3),
            ..Default::default()
        };
        rs.set_encodings(&codec);
        if let Some(disks) = self.disks.as_mut() {
            disks.attribute(codec.packet_bytes, rs.records - rs.pages_by_encoding.zero);
        }
        self.progress.bandwidth(rs.bandwidth_bytes_per_s);
        Ok(rs)
    }

    /// Holds every wait for the destination, reads and writes on every channel, to
    /// `deadline` (`None`: lifts it; each frame's own timeout still holds).
    pub(super) fn hold_to(&mut self, deadline: Option<Instant>) {
        self.reader.set_deadline(deadline);
        self.channels.set_deadline(deadline);
    }

    /// Whether `SendConfig::cancel` was set.
    pub(super) fn cancelled(&self) -> bool {
        crate::migration::interrupt::requested(self.cancel.as_ref())
    }
}

/// Maps an unexpected frame to an error; an `Abort` becomes [`SendError::PeerAborted`].
pub(super) fn unexpected(wanted: &str, got: Frame) -> SendError {
    match got {
        Frame::Control(Message::Abort(a)) => SendError::PeerAborted {
            code: a.code,
            reason: a.reason,
        },
        Frame::Control(m) => SendError::Protocol(format!(
            "expected {wanted}, got a {} message",
            m.frame_type().name()
        )),
        Frame::Packet(_) => SendError::Protocol(format!("expected {wanted}, got a packet")),
    }
}
