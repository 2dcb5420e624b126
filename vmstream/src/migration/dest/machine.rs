//! The destination's state machine over `DestState`: from the source's `Hello` to the
//! commit of the image and the resume of the guest.
//!
//! ```text
//! Handshake --accepted--> Receiving (rounds until the FINAL RoundEnd; then the digest of
//!   the page hashes the codec workers kept, and with --resume the workload's verify)
//!   --> AwaitGuestState --> AwaitDigest --> Committing --digest ok--> Committed
//!   --Handover (the source guest ended)--> Resuming (optional: run the guest) --> Done
//! any error before Committed: Abort sent, temporary image removed, Err returned
//! no Handover after Committed: the image stays committed, no guest is run, Err returned
//! ```

use crate::migration::transport::Socket;
use std::time::{Duration, Instant, SystemTime};

use vmstream_codec::{receive, PipelineStats, ReceiverConfig};

use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::migration::config::RecvConfig;
use crate::migration::connect::admission::{Admissions, Opening};
use crate::migration::connect::auth::Admission;
use crate::migration::connect::channels::{no_migration, DestChannels};
use crate::migration::dest::disks::DestDisks;
use crate::migration::dest::incoming::{
    check_guest_state, incoming_guest, IncomingGuest, KvmResumed, ResumedGuest,
};
use crate::migration::dest::mirror::MirrorReceiver;
use crate::migration::dest::postcopy::PostcopyIncoming;
use crate::migration::dest::verify::{backlog_message, TouchedPages};
use crate::migration::digest::{hex, PageHashes};
use crate::migration::error::RecvError;
use crate::migration::fault::is_dropped;
use crate::migration::image::{PendingImage, RegionImages, Reservation, SpanMapping};
use crate::migration::interrupt;
use crate::migration::transport::{Frame, FrameReader, FrameWriter, TransportError};
use crate::migration::wire::{
    Abort, AbortCode, CommitReply, CommitStatus, Digest, DigestSource, GuestSamples, GuestState,
    Hello, HelloReply, Message, QemuIncoming, RefuseCode, Resumed, RoundAck, WireError,
    FEATURE_CHANNELS, FEATURE_DISKS, FEATURE_HANDOVER, FEATURE_MIRROR, FEATURE_POSTCOPY,
    FEATURE_POSTCOPY_PREEMPT, ROUND_POSTCOPY,
};
use crate::telemetry::impact::DESTINATION_WINDOW;
use crate::telemetry::stats::{ms_between, unix_ns, CpuTime, MigrationOutcome, MigrationStats};
use crate::telemetry::verification::VerificationStats;

/// Where the destination is in the migration. From the handshake on, the states carry the
/// guest of the kind the `Hello` announced.
pub(super) enum DestState {
    /// Wait for `Hello`, answer it.
    Handshake,
    /// Apply rounds into the temporary image until the final one.
    Receiving {
        hello: Hello,
        image: PendingImage,
        guest: Box<dyn IncomingGuest>,
    },
    /// Wait for the guest's state.
    AwaitGuestState {
        image: PendingImage,
        ours: [u8; 32],
        guest: Box<dyn IncomingGuest>,
    },
    /// Wait for the source's digest.
    AwaitDigest {
        image: PendingImage,
        ours: [u8; 32],
        state: GuestState,
        guest: Box<dyn IncomingGuest>,
    },
    /// Compare digests; commit or refuse.
    Committing {
        image: PendingImage,
        ours: [u8; 32],
        digest: Digest,
        guest: Box<dyn IncomingGuest>,
    },
    /// The image is in place (`memory`, committed at `committed_at_ns`, CLOCK_REALTIME: the
    /// end of the downtime when no guest is resumed here); optionally run the guest, then
    /// report.
    Committed {
        paused_at_ns: u64,
        committed_at_ns: u64,
        memory: GuestMemory,
        guest: Box<dyn IncomingGuest>,
    },
    /// The source hands its guest's memory over (`FEATURE_HANDOVER`, `super::handover`):
    /// its descriptor, the guest's state, the verify, the commit.
    Handover {
        hello: Hello,
        guest: Box<dyn IncomingGuest>,
    },
    /// Post-copy: the guest resumes before its last pages came (`super::postcopy`).
    Postcopy(PostcopyIncoming),
    /// Finished.
    Done(Received),
}

/// What a successful receive produced.
#[derive(Debug)]
pub struct Received {
    /// The resumed guest, if `--resume`: joins to its outcome.
    pub guest: Option<ResumedGuest>,
    /// The resumed KVM guest, if `--resume` and the guest is a KVM guest.
    pub kvm: Option<KvmResumed>,
    /// The memory a handover passed (no `--memory-file`: the guest runs on it), open while
    /// the guest runs.
    pub handed_over: Option<std::fs::File>,
    /// The destination's QEMU, left running, if the guest is a QEMU VM.
    pub qemu: Option<crate::migration::dest::incoming::QemuResumed>,
}

pub(super) struct Dest<'a> {
    pub(super) cfg: &'a RecvConfig,
    pub(super) reader: FrameReader<Socket>,
    pub(super) writer: FrameWriter<Socket>,
    /// The listener (while channels bind) and the connections of channels 1...
    pub(super) channels: DestChannels,
    pub(super) stats: &'a mut MigrationStats,
    pub(super) start: Instant,
    /// The source connection's opening (`crate::migration::connect::admission`), until the handshake takes it.
    opening: Option<Admission>,
    /// The claimed target (`crate::migration::image`, None without `--memory-file`), until
    /// the handshake sizes its image (or a handover copies into it).
    pub(super) claim: Option<Reservation>,
    /// The memory a handover passed, kept open while its guest runs (`Received`).
    pub(super) handed_over: Option<std::fs::File>,
    /// The claimed disk targets (`recv --disk`), until the handshake sizes their images.
    pub(super) disk_claims: Vec<Reservation>,
    /// The disks being received (`super::disks`).
    pub(super) disks: Option<DestDisks>,
    /// The mapping of memory and disks the codec wrote, unmapped when the receive is done:
    /// unmapping gigabytes of faulted pages takes tens of ms, too long for the pause.
    unmap_later: Option<SpanMapping>,
    /// Memory's regions after the first (`super::hello`): claimed files, then images.
    pub(super) region_claims: Vec<Reservation>,
    pub(super) regions: Option<RegionImages>,
}

/// Receives the migration the source (its connection: `source`, the first admitted on
/// `admissions`) sends into the target `claim` reserved. Fills `stats`; on an error before
/// the commit tells the source (`Abort`), and the temporary image is gone.
pub(in crate::migration::dest) fn receive_from(
    cfg: &RecvConfig,
    source: Opening,
    claims: (Option<Reservation>, Vec<Reservation>),
    disk_claims: Vec<Reservation>,
    admissions: Admissions,
    stats: &mut MigrationStats,
) -> Result<Received, RecvError> {
    let (claim, region_claims) = claims;
    // Kept while the handshake tells whether more channels follow.
    let channels = DestChannels::new(admissions);
    let mut dest = Dest {
        cfg,
        reader: source.reader,
        writer: source.writer,
        opening: Some(source.admission),
        claim,
        handed_over: None,
        disk_claims,
        disks: None,
        unmap_later: None,
        region_claims,
        regions: None,
        channels,
        stats,
        start: Instant::now(),
    };
    let mut result = dest.run();
    if result.is_err() && interrupt::requested(cfg.cancel.as_ref()) {
        result = Err(RecvError::Interrupted);
    }
    // Set at the commit; a receive that ended before it took this long.
    if dest.stats.total_time_ms == 0.0 {
        dest.stats.total_time_ms = dest.start.elapsed().as_secs_f64() * 1e3;
    }
    let bytes = dest.reader.bytes_read() + dest.channels.extra_bytes();
    if let Err(e) = &result {
        let code = match e {
            RecvError::Transport(_) | RecvError::Protocol(_) => AbortCode::Protocol,
            _ => AbortCode::DestinationError,
        };
        if !matches!(e, RecvError::Refused { .. } | RecvError::PeerAborted { .. }) {
            let _ = dest.send(&Message::Abort(Abort {
                code,
                reason: e.to_string(),
            }));
        }
    }
    stats.bytes_on_wire = bytes;
    if stats.guest_bytes > 0 {
        stats.wire_to_guest_ratio = bytes as f64 / stats.guest_bytes as f64;
    }
    stats.cpu = CpuTime::now();
    result
}

/// Whether the source mirrors its disks (`FEATURE_MIRROR`; without disks the bit means
/// nothing and is ignored).
fn mirrors(hello: &Hello) -> bool {
    hello.features & FEATURE_MIRROR != 0 && hello.features & FEATURE_DISKS != 0
}

pub(super) fn unexpected(wanted: &str, got: Frame) -> RecvError {
    match got {
        Frame::Control(Message::Abort(a)) => RecvError::PeerAborted {
            code: a.code,
            reason: a.reason,
        },
        Frame::Control(m) => RecvError::Protocol(format!(
            "expected {wanted}, got a {} message",
            m.frame_type().name()
        )),
        Frame::Packet(_) => RecvError::Protocol(format!("expected {wanted}, got a packet")),
    }
}

impl Dest<'_> {
    pub(super) fn send(&mut self, m: &Message) -> Result<(), RecvError> {
        self.writer.write_message(m).map_err(|e| {
            if is_dropped(&e) {
                // An injected drop: the whole connection goes, as with a cut link.
                let _ = self.writer.get_ref().shutdown(std::net::Shutdown::Both);
            }
            RecvError::Transport(TransportError::Io(e))
        })
    }

    /// Records the downtime (pause to `at`, the guest running again) and tells the source
    /// in `Resumed`; after the commit a failure to report is only a warning.
    pub(super) fn report_resumed(&mut self, paused_at_ns: u64, at: u64, running: bool, tx: u64) {
        self.stats.downtime_ms = Some(ms_between(paused_at_ns, at));
        self.stats.cpu = CpuTime::now();
        let cpu_ns = (self.stats.cpu.total_ms() * 1e6) as u64;
        if let Err(e) = self.send(&Message::Resumed(Resumed {
            at_unix_ns: at,
            running,
            tx_count: tx,
            receiver_cpu_ns: cpu_ns,
        })) {
            self.cfg
                .notices
                .warning(format!("could not report the resume: {e}"));
        }
    }

    fn run(&mut self) -> Result<Received, RecvError> {
        let mut state = DestState::Handshake;
        loop {
            state = match state {
                DestState::Handshake => self.handshake()?,
                DestState::Receiving {
                    hello,
                    image,
                    guest,
                } => self.receiving(hello, image, guest)?,
                DestState::AwaitGuestState {
                    mut image,
                    ours,
                    mut guest,
                } => match self.reader.read_frame()? {
                    Frame::Control(Message::GuestState(state)) => {
                        self.accept_guest_state(&state, guest.as_mut(), &mut image, ours)?;
                        DestState::AwaitDigest {
                            image,
                            ours,
                            state,
                            guest,
                        }
                    }
                    other => return Err(unexpected("the guest state", other)),
                },
                DestState::AwaitDigest {
                    image,
                    ours,
                    state,
                    guest,
                } => match self.reader.read_frame()? {
                    Frame::Control(Message::Digest(digest)) => {
                        self.read_disk_digests()?;
                        self.stats.settings.source_tx_at_pause = Some(state.tx_count);
                        DestState::Committing {
                            image,
                            ours,
                            digest,
                            guest,
                        }
                    }
                    other => return Err(unexpected("the digest", other)),
                },
                DestState::Committing {
                    image,
                    ours,
                    digest,
                    guest,
                } => self.committing(image, ours, digest, guest)?,
                DestState::Committed {
                    paused_at_ns,
                    committed_at_ns,
                    memory,
                    guest,
                } => self.committed(paused_at_ns, committed_at_ns, memory, guest)?,
                DestState::Handover { hello, guest } => self.handover(&hello, guest)?,
                DestState::Postcopy(incoming) => self.postcopy(incoming)?,
                DestState::Done(received) => return Ok(received),
            };
        }
    }

    fn handshake(&mut self) -> Result<DestState, RecvError> {
        let opening = self
            .opening
            .take()
            .ok_or_else(|| RecvError::Protocol("the handshake ran twice".into()))?;
        let first = match opening {
            Admission::Frame(f) => f,
            Admission::Refuse(reason) => return Err(self.refuse(RefuseCode::Auth, reason)),
        };
        let hello = match first {
            Ok(Frame::Control(Message::Hello(h))) => h,
            Ok(Frame::Control(Message::ChannelHello(c))) => {
                return Err(self.refuse(RefuseCode::Channel, no_migration(&c).to_string()))
            }
            Err(TransportError::Wire(e @ (WireError::Version { .. } | WireError::BadMagic(_)))) => {
                return Err(self.refuse(RefuseCode::Version, e.to_string()))
            }
            Ok(other) => return Err(unexpected("a hello", other)),
            Err(e) => return Err(e.into()),
        };
        let guest = incoming_guest(hello.guest_kind, &self.cfg.notices, self.cfg.qemu.as_ref());
        if let Some((code, reason)) = self.check_hello(&hello, guest.as_ref()) {
            return Err(self.refuse(code, reason));
        }
        if hello.features & FEATURE_HANDOVER != 0 {
            if let Some(reason) = self.handover_refusal(&hello) {
                return Err(self.refuse(RefuseCode::Features, reason));
            }
            self.channels.close_listener();
            self.stats.guest_bytes = hello.guest_size;
            self.stats.settings.channels = Some(1);
            self.send(&Message::HelloReply(HelloReply {
                refuse: RefuseCode::None,
                receiver_workers: 0,
                resumes: self.cfg.resume,
                reason: String::new(),
            }))?;
            return Ok(DestState::Handover { hello, guest });
        }
        if self.claim.is_none() {
            return Err(self.refuse(
                RefuseCode::Other,
                "this destination has no --memory-file: it takes only a handover (send \
                 --handover over a unix socket)"
                    .into(),
            ));
        }
        // Several channels: channel 0 announces the migration id and count next.
        let primary = if hello.features & FEATURE_CHANNELS != 0 {
            match DestChannels::read_primary(&mut self.reader) {
                Ok(c) => Some(c),
                Err(r) => return Err(self.refuse(RefuseCode::Channel, r.to_string())),
            }
        } else {
            // A post-copy's source may have to reconnect (`super::postcopy`); a disk
            // mirror opens its own connection (`super::mirror`).
            if hello.features & FEATURE_POSTCOPY == 0 && !mirrors(&hello) {
                self.channels.close_listener();
            }
            None
        };
        // Memory's regions and the disks: refused here on a mismatch, before any image is sized.
        let regions = self.handshake_regions(&hello)?;
        self.handshake_disks(&hello)?;
        let image = match self
            .claim
            .take()
            .map(|c| PendingImage::create(c, regions[0]))
        {
            Some(Ok(i)) => i,
            Some(Err(e)) => return Err(self.refuse(RefuseCode::Other, e.to_string())),
            None => return Err(RecvError::Protocol("the handshake ran twice".into())),
        };
        let workers = self.workers(&hello);
        self.stats.guest_bytes = hello.guest_size;
        self.stats.settings.receiver_workers = Some(workers);
        self.stats.settings.compression = Some(format!("{:?}", hello.compression));
        self.stats.settings.delta = Some(format!("{:?}", hello.delta));
        self.send(&Message::HelloReply(HelloReply {
            refuse: RefuseCode::None,
            receiver_workers: workers as u32,
            resumes: self.cfg.resume,
            reason: String::new(),
        }))?;
        if let Some(primary) = primary {
            // The disk mirror's connection comes after the channels'.
            self.channels.keep_listening(mirrors(&hello));
            self.channels
                .bind(&primary, self.cfg.io_timeout, &mut self.reader)?;
            self.cfg.notices.info(format!(
                "{} channels bound (migration {})",
                primary.count,
                crate::migration::connect::channels::id_hex(&primary.migration_id)
            ));
        }
        self.stats.settings.channels = Some(self.channels.count());
        Ok(DestState::Receiving {
            hello,
            image,
            guest,
        })
    }

    fn workers(&self, hello: &Hello) -> usize {
        let cores = vmstream_codec::receiver::default_workers();
        self.cfg
            .threads
            .unwrap_or(hello.sender_workers as usize)
            .clamp(1, 2 * cores)
    }

    fn receiving(
        &mut self,
        hello: Hello,
        mut image: PendingImage,
        mut guest: Box<dyn IncomingGuest>,
    ) -> Result<DestState, RecvError> {
        // Destination memory is written only by the codec's workers: each keeps the hash
        // of the pages it applies current, so the digest at the pause only hashes the list.
        // Disk pages follow memory's: one span of all the images (`super::disks`).
        let memory_pages = hello.guest_size / PAGE_SIZE as u64;
        let mut span = self.span(&image)?;
        let disk_pages = self.disks.as_ref().map_or(0, |d| d.pages());
        let hashes = std::sync::Arc::new(PageHashes::zeroed(memory_pages + disk_pages, PAGE_SIZE));
        // With --resume, the workload's verify of the received image runs mostly during the
        // rounds (`dest/verify.rs`), off the downtime.
        let touched = std::sync::Arc::new(TouchedPages::new(hello.guest_size / PAGE_SIZE as u64));
        // Post-copy verifies by the digest at its last page; the background's reads of the
        // image would fill the holes the owed pages become.
        let mut postcopy = hello.features & FEATURE_POSTCOPY != 0;
        if self.cfg.resume && !postcopy {
            if let Some(r) = &self.regions {
                guest.memory_regions(r.temp_paths());
            }
            let started = image
                .read_only_view()
                .map_err(std::io::Error::other)
                .and_then(|view| guest.start_background(view, touched.clone()));
            if let Err(e) = started {
                self.cfg
                    .notices
                    .note(format!("verifying at the pause only: {e}"));
            }
        }
        let config = ReceiverConfig {
            workers: self.workers(&hello),
            // A fresh sparse file: zero pages need not be written, whole pages are written
            // to the file in runs (not faulted in one at a time through the mapping).
            zeroed_memory: true,
            // (its whole pages written to the file: memory's only, not the span's)
            memory_file: if span.is_some() { None } else { image.file()? },
            page_observer: Some({
                let hashes = std::sync::Arc::clone(&hashes);
                let touched = std::sync::Arc::clone(&touched);
                std::sync::Arc::new(move |page, content: &[u8]| {
                    hashes.update(page, content);
                    if page < memory_pages {
                        touched.mark(page);
                    }
                })
            }),
            ..ReceiverConfig::default()
        };
        // The disk mirror writes the disks' images beside the codec's workers: never the
        // same pages at the same time (it runs between the bulk copy's barrier and the
        // final round, when no disk page is in a round).
        let mirror = match (&self.disks, mirrors(&hello)) {
            (Some(d), true) => {
                let admissions = self.channels.take_admissions().ok_or_else(|| {
                    RecvError::Protocol("no listener left for the disk mirror".into())
                })?;
                let id = d.mirror_id.unwrap_or_default();
                let targets = d.mirror_targets(memory_pages).map_err(RecvError::Socket)?;
                Some(
                    MirrorReceiver::start(admissions, id, targets, std::sync::Arc::clone(&hashes))
                        .map_err(RecvError::Socket)?,
                )
            }
            _ => None,
        };
        let mut frames = self
            .channels
            .frames(&mut self.reader, self.cfg.io_timeout)?;
        let writer = &mut self.writer;
        let mut converged = true;
        let mut rounds = 0u64;
        let memory = match &mut span {
            Some(span) => span.as_mut_slice(),
            None => image.memory_mut(),
        };
        let result = receive(&config, memory, |rx| -> Result<PipelineStats, RecvError> {
            loop {
                match frames.next_frame()? {
                    (ch, Frame::Packet(p)) => {
                        frames.packet(ch)?;
                        rx.submit(p)?
                    }
                    (ch, Frame::Control(Message::RoundEnd(end))) => {
                        // The round ends once it ended on every channel.
                        let Some(end) = frames.round_end(ch, end)? else {
                            continue;
                        };
                        let t = Instant::now();
                        let st = rx.end_round(end.round)?;
                        if st.pages() != end.records || st.packets != end.packets {
                            return Err(RecvError::Protocol(format!(
                                "round {}: applied {} records in {} packets, source sent {} in {}",
                                end.round,
                                st.pages(),
                                st.packets,
                                end.records,
                                end.packets
                            )));
                        }
                        if let Some(m) = backlog_message(&*guest, &hello, &end) {
                            writer.write_message(&m).map_err(TransportError::Io)?;
                        }
                        writer
                            .write_message(&Message::RoundAck(RoundAck {
                                round: end.round,
                                records: st.pages(),
                                packets: st.packets,
                                barrier_ns: t.elapsed().as_nanos() as u64,
                            }))
                            .map_err(TransportError::Io)?;
                        rounds += 1;
                        if !end.is_final() {
                            guest.round_applied();
                            // The digest's group hashes, between rounds: at the pause only
                            // the final round's groups are left to hash.
                            hashes.refresh();
                        } else {
                            converged = end.flags & crate::migration::wire::ROUND_FORCED == 0;
                            postcopy = postcopy && end.flags & ROUND_POSTCOPY != 0;
                            return Ok(rx.total_stats().clone());
                        }
                    }
                    (_, other) => return Err(unexpected("a packet or round end", other)),
                }
            }
        });
        drop(frames);
        // `receive` reports worker panics; the closure reports everything else.
        self.stats.codec = match result {
            Ok(Ok(codec)) => codec,
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(e.into()),
        };
        if let Some(m) = mirror {
            let applied = m
                .finish()
                .map_err(|e| RecvError::Protocol(format!("disk mirror: {e}")))?;
            self.cfg.notices.info(format!(
                "disk mirror: {} writes, {} bytes applied",
                applied.writes, applied.bytes
            ));
        }
        self.stats.rounds = rounds;
        self.stats.converged = converged;
        if postcopy {
            return Ok(DestState::Postcopy(PostcopyIncoming {
                image,
                hashes,
                guest,
                preempt: hello.features & FEATURE_POSTCOPY_PREEMPT != 0,
            }));
        }
        // The page hashes are current (every round passed its barrier): hash the list.
        let t = Instant::now();
        let ours = hashes.digest_first(memory_pages);
        self.unmap_later = span;
        if let Some(d) = &mut self.disks {
            d.record_digests(&hashes, memory_pages);
        }
        self.stats.switchover_ms.digest = Some(t.elapsed().as_secs_f64() * 1e3);
        if self.cfg.resume {
            // While the source hashes its memory: recovery and verify read (and recovery
            // may write) the final image, after our digest of it was taken.
            let t = Instant::now();
            guest.verify_at_pause(&mut image, &hashes);
            self.stats.switchover_ms.verify = Some(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(DestState::AwaitGuestState { image, ours, guest })
    }

    /// The `GuestState` arrived: validate it before anything is committed. A refusal is
    /// answered with `CommitReply { state rejected }` (the source is waiting for a verdict).
    pub(super) fn accept_guest_state(
        &mut self,
        state: &GuestState,
        guest: &mut dyn IncomingGuest,
        image: &mut PendingImage,
        ours: [u8; 32],
    ) -> Result<(), RecvError> {
        match check_guest_state(guest, state, image.memory_mut(), &mut self.stats.settings) {
            Ok(()) => Ok(()),
            Err(e) => {
                let err = RecvError::GuestState(e);
                let _ = self.send(&Message::CommitReply(CommitReply {
                    status: CommitStatus::StateRejected,
                    digest: ours,
                    reason: err.to_string(),
                }));
                Err(err)
            }
        }
    }

    fn committing(
        &mut self,
        image: PendingImage,
        ours: [u8; 32],
        digest: Digest,
        guest: Box<dyn IncomingGuest>,
    ) -> Result<DestState, RecvError> {
        self.stats.digest = Some(hex(&ours));
        let incremental = digest.verification == DigestSource::SentPages;
        self.stats.verify = Some(VerificationStats {
            requested: String::new(),
            mode: if incremental { "incremental" } else { "full" }.into(),
            ..Default::default()
        });
        if digest.guest_size != self.stats.guest_bytes || ours != digest.digest {
            let err = RecvError::DigestMismatch {
                source_digest: hex(&digest.digest),
                ours: hex(&ours),
            };
            let _ = self.send(&Message::CommitReply(CommitReply {
                status: CommitStatus::DigestMismatch,
                digest: ours,
                reason: err.to_string(),
            }));
            return Err(err);
        }
        if let Some(e) = guest.verify_failure() {
            let err = RecvError::Resume(format!(
                "the workload's verify of the received image failed, nothing committed: {e}"
            ));
            let _ = self.send(&Message::CommitReply(CommitReply {
                status: CommitStatus::Failed,
                digest: ours,
                reason: err.to_string(),
            }));
            return Err(err);
        }
        self.check_disk_digests(ours)?;
        let t = Instant::now();
        // Every image durable before any is renamed: disks, memory's other regions, memory.
        let (disks, regions) = (self.disks.take(), self.regions.take());
        let committed = image
            .sync()
            .and_then(|()| regions.as_ref().map_or(Ok(()), RegionImages::sync))
            .and_then(|()| disks.map_or(Ok(()), |d| d.sync().and_then(|()| d.commit())))
            .and_then(|()| regions.map_or(Ok(()), RegionImages::commit))
            .and_then(|()| image.commit());
        self.stats
            .disks
            .iter_mut()
            .for_each(|d| d.committed = committed.is_ok());
        self.stats.switchover_ms.commit = Some(t.elapsed().as_secs_f64() * 1e3);
        let (memory, committed_at_ns) = match committed {
            Ok(memory) => (memory, unix_ns(SystemTime::now())),
            Err(e) => {
                let reason = e.to_string();
                let _ = self.send(&Message::CommitReply(CommitReply {
                    status: CommitStatus::Failed,
                    digest: ours,
                    reason,
                }));
                return Err(e.into());
            }
        };
        self.stats.outcome = MigrationOutcome::Committed;
        self.stats.total_time_ms = self.start.elapsed().as_secs_f64() * 1e3;
        if let Some(fault) = self.cfg.faults.commit_reply {
            let next = self.writer.bytes_written();
            self.writer.inject([(next, fault)]);
        }
        self.send(&Message::CommitReply(CommitReply {
            status: CommitStatus::Committed,
            digest: ours,
            reason: String::new(),
        }))?;
        Ok(DestState::Committed {
            paused_at_ns: digest.paused_at_unix_ns,
            committed_at_ns,
            memory,
            guest,
        })
    }

    /// Waits for the source's `Handover` (its guest ended). Without it a guest must not run
    /// here: the source may have resumed its own copy.
    pub(super) fn await_handover(&mut self) -> Result<(), RecvError> {
        let t = Instant::now();
        let frame = self.reader.read_frame();
        self.stats.switchover_ms.await_handover = Some(t.elapsed().as_secs_f64() * 1e3);
        match frame {
            Ok(Frame::Control(Message::Handover(_))) => Ok(()),
            Ok(other) => Err(RecvError::NoHandover(
                unexpected("the handover", other).to_string(),
            )),
            Err(e) => Err(RecvError::NoHandover(e.to_string())),
        }
    }

    /// The image is committed: from here on errors do not roll anything back. Resumes the
    /// guest if asked, then reports `Resumed` (the end of the downtime: the guest running
    /// again, or without `--resume` the commit) and, while the guest runs, its samples.
    pub(super) fn committed(
        &mut self,
        paused_at_ns: u64,
        committed_at_ns: u64,
        memory: GuestMemory,
        mut guest: Box<dyn IncomingGuest>,
    ) -> Result<DestState, RecvError> {
        if let Some(uri) = guest.qemu_incoming() {
            let _ = self.send(&Message::QemuIncoming(QemuIncoming { uri }));
        }
        if let Err(e) = self.await_handover() {
            if self.cfg.resume {
                return Err(e);
            }
            // Nothing runs here: the image is in place all the same.
            self.cfg.notices.warning(e.to_string());
        }
        // Without --resume the image stays mapped until the report is sent.
        // The committed PATH, or the handed-over memory's own descriptor.
        let target = memory.path().to_path_buf();
        let resumed = if self.cfg.resume {
            guest.committed_disks(&self.cfg.disks);
            match guest.resume(memory, &target, self.cfg.run_for) {
                Ok(r) => Some(r),
                Err(e) => {
                    let _ = self.send(&Message::Abort(Abort {
                        code: AbortCode::DestinationError,
                        reason: e.to_string(),
                    }));
                    return Err(e);
                }
            }
        } else {
            None
        };
        match &resumed {
            Some(r) => {
                let times = &mut self.stats.switchover_ms;
                times.resume = r.phases.resume;
                times.kvm_restore = r.phases.kvm_restore;
                times.kvm_first_tx = r.phases.kvm_first_tx;
                self.report_resumed(paused_at_ns, r.at_unix_ns, true, r.tx_count);
                let samples = guest.sample(&target, self.sample_window());
                self.send_samples(samples);
            }
            None => self.report_resumed(paused_at_ns, committed_at_ns, false, 0),
        }
        if self.stats.verify.as_ref().is_some_and(|v| v.mode != "full") {
            self.await_audit();
        }
        let mut received = guest.into_received();
        received.handed_over = self.handed_over.take();
        Ok(DestState::Done(received))
    }

    /// How long the resumed guest is sampled for the source: [`DESTINATION_WINDOW`], or
    /// `--run-for` if shorter.
    pub(super) fn sample_window(&self) -> Duration {
        self.cfg
            .run_for
            .map_or(DESTINATION_WINDOW, |r| r.min(DESTINATION_WINDOW))
    }

    /// Sends the resumed guest's samples to the source; an empty report if sampling
    /// failed, so the source does not wait.
    pub(super) fn send_samples(&mut self, samples: Result<GuestSamples, String>) {
        let samples = samples.unwrap_or_else(|e| {
            self.cfg
                .notices
                .warning(format!("sampling the resumed guest: {e}"));
            GuestSamples {
                samples: Vec::new(),
            }
        });
        if let Err(e) = self.send(&Message::GuestSamples(samples)) {
            self.cfg
                .notices
                .warning(format!("could not report the guest samples: {e}"));
        }
    }
}
