//! The destination side: an explicit state machine over `DestState`.
//!
//! ```text
//! Handshake --accepted--> Receiving (rounds until the FINAL RoundEnd; then the digest of
//!   the page hashes the codec workers kept, and with --resume the workload's verify)
//!   --> AwaitGuestState --> AwaitDigest --> Committing --digest ok--> Committed
//!   --Handover (the source guest ended)--> Resuming (optional: run the guest) --> Done
//! any error before Committed: Abort sent, temporary image removed, Err returned
//! no Handover after Committed: the image stays committed, no guest is run, Err returned
//! ```

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use vmstream_codec::{receive, PipelineStats, ReceiverConfig};

use crate::guest::file::verify::{VerifyError, VerifyReport};
use crate::guest::file::{GuestConfig, MemorySource, ReadyLine, StartMode};
use crate::guest::kvm::VmState;
use crate::memory::GuestMemory;
use crate::migration::config::RecvConfig;
use crate::migration::connect::admission::Admissions;
use crate::migration::connect::auth::Admission;
use crate::migration::connect::channels::{no_migration, DestChannels};
use crate::migration::digest::{hex, PageHashes};
use crate::migration::error::RecvError;
use crate::migration::image::{check_target, PendingImage, Reservation};
use crate::migration::interrupt;
use crate::migration::transport::{Frame, FrameReader, FrameWriter, TransportError};
use crate::migration::wire::{
    Abort, AbortCode, CommitReply, CommitStatus, Digest, GuestKind, GuestSamples, GuestState,
    Hello, HelloReply, Message, RefuseCode, Resumed, RoundAck, WireError, FEATURE_CHANNELS,
    FEATURE_MEMORY_DIGEST, KNOWN_FEATURES, PAGE_SIZE,
};
use crate::telemetry::impact::{sample_destination, DESTINATION_WINDOW};
use crate::telemetry::stats::{ms_between, unix_ns, CpuTime, MigrationOutcome, MigrationStats};

mod kvm;
mod report;
pub mod verify;
pub use kvm::{KvmResumed, KvmRunOutcome};
pub use report::{receive_migration, receive_on, run_resumed, RecvReport, ResumedRun};

/// Where the destination is in the migration.
enum DestState {
    /// Wait for `Hello`, answer it.
    Handshake,
    /// Apply rounds into the temporary image until the final one.
    Receiving { hello: Hello, image: PendingImage },
    /// Wait for the guest's state.
    AwaitGuestState { image: PendingImage, ours: [u8; 32] },
    /// Wait for the source's digest.
    AwaitDigest {
        image: PendingImage,
        ours: [u8; 32],
        state: GuestState,
    },
    /// Compare digests; commit or refuse.
    Committing {
        image: PendingImage,
        ours: [u8; 32],
        digest: Digest,
    },
    /// The image is in place; optionally run the guest, then report.
    Committed { paused_at_ns: u64 },
    /// Finished.
    Done,
}

/// What a successful receive produced.
#[derive(Debug)]
pub struct Received {
    /// The resumed guest, if `--resume`: joins to its outcome.
    pub guest: Option<ResumedGuest>,
    /// The resumed KVM guest, if `--resume` and the guest is a KVM guest.
    pub kvm: Option<KvmResumed>,
}

/// A guest running on the committed image.
#[derive(Debug)]
pub struct ResumedGuest {
    /// Its ready line.
    pub ready: ReadyLine,
    thread: std::thread::JoinHandle<
        Result<crate::guest::file::GuestSummary, crate::guest::file::GuestError>,
    >,
}

impl ResumedGuest {
    /// Waits until the guest stops (`--run-for`) and returns its final transaction count.
    pub fn join(self) -> Result<u64, RecvError> {
        match self.thread.join() {
            Ok(Ok(s)) => Ok(s.tx_count),
            Ok(Err(e)) => Err(RecvError::Resume(e.to_string())),
            Err(_) => Err(RecvError::Resume("guest thread panicked".into())),
        }
    }
}

/// Parses `--listen`: `PORT` or `:PORT` listen on 127.0.0.1; `HOST:PORT` is explicit.
/// Returns the address and whether it was given explicitly.
pub fn listen_addr(s: &str) -> Result<(SocketAddr, bool), RecvError> {
    let bad = || {
        RecvError::Config(format!(
            "bad listen address {s:?} (PORT, :PORT or HOST:PORT, the port 0 to 65535)"
        ))
    };
    let port_only = s.strip_prefix(':').unwrap_or(s);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok((
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            false,
        ));
    }
    let addr: SocketAddr = s.parse().map_err(|_| bad())?;
    Ok((addr, true))
}

/// Lines written by the resumed guest go to stdout; its ready line is also reported.
struct ReadyWatch {
    line: Vec<u8>,
    ready: Option<mpsc::Sender<ReadyLine>>,
}

impl Write for ReadyWatch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            let line = String::from_utf8_lossy(&self.line).to_string();
            self.line.clear();
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}")?;
            out.flush()?;
            if let Some(r) = ReadyLine::parse(&line) {
                if let Some(tx) = self.ready.take() {
                    let _ = tx.send(r);
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Starts the guest on the committed image `memory` (recovered and verified before the
/// commit: `report`) and waits for it to run.
fn start_guest(
    memory: GuestMemory,
    report: VerifyReport,
    run_for: Option<Duration>,
) -> Result<ResumedGuest, RecvError> {
    let cfg = GuestConfig {
        memory: MemorySource::File(memory.path().to_path_buf()),
        size: Some(memory.len() as u64),
        start: StartMode::Resume,
        rate: None,
        duration: run_for,
        control_stdin: false,
        track_writes: false,
    };
    // Held while the guest runs, as a guest process holds its own.
    let owner = crate::guest::file::own_memory_file(memory.path(), false)
        .map_err(|e| RecvError::Resume(e.to_string()))?;
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("vmstream-guest".into())
        .spawn(move || {
            let _owner = owner;
            let mut out = ReadyWatch {
                line: Vec::new(),
                ready: Some(tx),
            };
            crate::guest::file::run_verified(memory, report, &cfg, &mut out)
        })
        .map_err(|e| RecvError::Resume(format!("starting the guest thread: {e}")))?;
    match rx.recv() {
        Ok(ready) => Ok(ResumedGuest { ready, thread }),
        Err(_) => match thread.join() {
            Ok(Err(e)) => Err(RecvError::Resume(e.to_string())),
            _ => Err(RecvError::Resume("the guest stopped before running".into())),
        },
    }
}

struct Dest<'a> {
    cfg: &'a RecvConfig,
    reader: FrameReader<TcpStream>,
    writer: FrameWriter<TcpStream>,
    /// The listener (while channels bind) and the connections of channels 1...
    channels: DestChannels,
    stats: &'a mut MigrationStats,
    start: Instant,
    guest: Option<ResumedGuest>,
    /// With `--resume`: the workload's recover + verify of the final image, run before the
    /// commit so an image the guest cannot resume from is never committed.
    verified: Option<Result<VerifyReport, VerifyError>>,
    /// The committed image, still mapped.
    committed: Option<GuestMemory>,
    /// When the image was committed (CLOCK_REALTIME ns): the end of the downtime when no
    /// guest is resumed here.
    committed_at_ns: u64,
    /// Kind announced in the handshake.
    guest_kind: GuestKind,
    /// A KVM guest's validated state (from `GuestState`).
    kvm_state: Option<VmState>,
    /// With `--resume`: the KVM guest's ledger check of the final image, before the commit.
    kvm_verified: Option<Result<crate::guest::kvm::VerifyReport, String>>,
    kvm: Option<KvmResumed>,
    /// The source connection's opening (`crate::migration::connect::admission`), until the handshake takes it.
    opening: Option<Admission>,
    /// The claimed target (`crate::migration::image`), until the handshake sizes its image.
    claim: Option<Reservation>,
    /// The background verify's read-only view of the image, unmapped only when the
    /// destination is done (unmapping it at the pause would be downtime).
    verify_view: Option<std::sync::Arc<crate::memory::GuestMemory>>,
}

fn unexpected(wanted: &str, got: Frame) -> RecvError {
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
    fn send(&mut self, m: &Message) -> Result<(), RecvError> {
        self.writer
            .write_message(m)
            .map_err(|e| RecvError::Transport(TransportError::Io(e)))
    }

    /// Records the downtime (pause to `at`, the guest running again) and tells the source
    /// in `Resumed`; after the commit a failure to report is only a warning.
    fn report_resumed(&mut self, paused_at_ns: u64, at: u64, running: bool, tx: u64) {
        self.stats.downtime_ms = Some(ms_between(paused_at_ns, at));
        self.stats.cpu = CpuTime::now();
        let cpu_ns = (self.stats.cpu.total_ms() * 1e6) as u64;
        if let Err(e) = self.send(&Message::Resumed(Resumed {
            at_unix_ns: at,
            running,
            tx_count: tx,
            receiver_cpu_ns: cpu_ns,
        })) {
            eprintln!("vmstream recv: warning: could not report the resume: {e}");
        }
    }

    fn run(&mut self) -> Result<(), RecvError> {
        let mut state = DestState::Handshake;
        loop {
            state = match state {
                DestState::Handshake => self.handshake()?,
                DestState::Receiving { hello, image } => self.receiving(hello, image)?,
                DestState::AwaitGuestState { image, ours } => match self.reader.read_frame()? {
                    Frame::Control(Message::GuestState(state)) => {
                        let mut image = image;
                        self.accept_guest_state(&state, &mut image, ours)?;
                        DestState::AwaitDigest { image, ours, state }
                    }
                    other => return Err(unexpected("the guest state", other)),
                },
                DestState::AwaitDigest { image, ours, state } => match self.reader.read_frame()? {
                    Frame::Control(Message::Digest(digest)) => {
                        self.stats.settings.source_tx_at_pause = Some(state.tx_count);
                        DestState::Committing {
                            image,
                            ours,
                            digest,
                        }
                    }
                    other => return Err(unexpected("the digest", other)),
                },
                DestState::Committing {
                    image,
                    ours,
                    digest,
                } => self.committing(image, ours, digest)?,
                DestState::Committed { paused_at_ns } => self.committed(paused_at_ns)?,
                DestState::Done => return Ok(()),
            };
        }
    }

    /// Checks a `Hello`; `Some` refusal if we cannot take this guest.
    fn check_hello(&self, h: &Hello) -> Option<(RefuseCode, String)> {
        if h.page_size != PAGE_SIZE {
            return Some((
                RefuseCode::PageSize,
                format!(
                    "page size {} (this destination uses {PAGE_SIZE})",
                    h.page_size
                ),
            ));
        }
        if h.guest_kind == GuestKind::Kvm {
            if let Some(refusal) = kvm::check_hello(h, self.cfg.resume) {
                return Some(refusal);
            }
        }
        if h.features & !KNOWN_FEATURES != 0 || h.features & FEATURE_MEMORY_DIGEST == 0 {
            return Some((
                RefuseCode::Features,
                format!(
                    "features {:#x}: known {KNOWN_FEATURES:#x}, the memory digest is required",
                    h.features
                ),
            ));
        }
        if h.codec_version != Hello::CODEC_VERSION {
            return Some((
                RefuseCode::Version,
                format!(
                    "codec packet format {} (this destination reads {})",
                    h.codec_version,
                    Hello::CODEC_VERSION
                ),
            ));
        }
        if h.guest_size == 0
            || !h.guest_size.is_multiple_of(PAGE_SIZE as u64)
            || h.guest_size > self.cfg.max_size
        {
            return Some((
                RefuseCode::GuestSize,
                format!(
                    "guest size {} must be a non-zero multiple of {PAGE_SIZE} up to {}",
                    h.guest_size, self.cfg.max_size
                ),
            ));
        }
        if let Some(want) = self.cfg.expect_size {
            if h.guest_size != want {
                return Some((
                    RefuseCode::GuestSize,
                    format!(
                        "guest memory size mismatch: source has {} bytes, destination expects {want}",
                        h.guest_size
                    ),
                ));
            }
        }
        None
    }

    fn refuse(&mut self, code: RefuseCode, reason: String) -> RecvError {
        let _ = self.send(&Message::HelloReply(HelloReply {
            refuse: code,
            receiver_workers: 0,
            resumes: false,
            reason: reason.clone(),
        }));
        RecvError::Refused { code, reason }
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
        if let Some((code, reason)) = self.check_hello(&hello) {
            return Err(self.refuse(code, reason));
        }
        // Several channels: channel 0 announces the migration id and count next.
        let primary = if hello.features & FEATURE_CHANNELS != 0 {
            match DestChannels::read_primary(&mut self.reader) {
                Ok(c) => Some(c),
                Err(r) => return Err(self.refuse(RefuseCode::Channel, r.to_string())),
            }
        } else {
            self.channels.close_listener();
            None
        };
        let image = match self
            .claim
            .take()
            .map(|c| PendingImage::create(c, hello.guest_size))
        {
            Some(Ok(i)) => i,
            Some(Err(e)) => return Err(self.refuse(RefuseCode::Other, e.to_string())),
            None => return Err(RecvError::Protocol("the handshake ran twice".into())),
        };
        let workers = self.workers(&hello);
        self.guest_kind = hello.guest_kind;
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
            self.channels
                .bind(&primary, self.cfg.io_timeout, &mut self.reader)?;
            eprintln!(
                "vmstream recv: {} channels bound (migration {})",
                primary.count,
                crate::migration::connect::channels::id_hex(&primary.migration_id)
            );
        }
        self.stats.settings.channels = Some(self.channels.count());
        Ok(DestState::Receiving { hello, image })
    }

    fn workers(&self, hello: &Hello) -> usize {
        let cores = vmstream_codec::receiver::default_workers();
        self.cfg
            .threads
            .unwrap_or(hello.sender_workers as usize)
            .clamp(1, 2 * cores)
    }

    fn receiving(&mut self, hello: Hello, mut image: PendingImage) -> Result<DestState, RecvError> {
        // Destination memory is written only by the codec's workers: each keeps the hash
        // of the pages it applies current, so the digest at the pause only hashes the list.
        let page_size = PAGE_SIZE as usize;
        let hashes = std::sync::Arc::new(PageHashes::zeroed(
            hello.guest_size / PAGE_SIZE as u64,
            page_size,
        ));
        // With --resume, the workload's verify of the received image runs mostly during the
        // rounds (`dest/verify.rs`), off the downtime.
        let touched = std::sync::Arc::new(verify::TouchedPages::new(
            hello.guest_size / PAGE_SIZE as u64,
        ));
        let background = if self.cfg.resume {
            verify::Background::start(hello.guest_kind, image.temp_path(), touched.clone())
                .map_err(|e| eprintln!("vmstream recv: note: verifying at the pause only: {e}"))
                .ok()
                .map(|(background, view)| {
                    self.verify_view = Some(view);
                    background
                })
        } else {
            None
        };
        let config = ReceiverConfig {
            workers: self.workers(&hello),
            // A fresh sparse file: zero pages need not be written.
            zeroed_memory: true,
            page_observer: Some({
                let hashes = std::sync::Arc::clone(&hashes);
                let touched = std::sync::Arc::clone(&touched);
                std::sync::Arc::new(move |page, content: &[u8]| {
                    hashes.update(page, content);
                    touched.mark(page);
                })
            }),
            ..ReceiverConfig::default()
        };
        let mut frames = self
            .channels
            .frames(&mut self.reader, self.cfg.io_timeout)?;
        let writer = &mut self.writer;
        let mut converged = true;
        let mut rounds = 0u64;
        let result = receive(
            &config,
            image.memory_mut(),
            |rx| -> Result<PipelineStats, RecvError> {
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
                            writer
                                .write_message(&Message::RoundAck(RoundAck {
                                    round: end.round,
                                    records: st.pages(),
                                    packets: st.packets,
                                    barrier_ns: t.elapsed().as_nanos() as u64,
                                }))
                                .map_err(TransportError::Io)?;
                            rounds += 1;
                            if let (Some(bg), false) = (&background, end.is_final()) {
                                bg.round_applied();
                            }
                            if end.is_final() {
                                converged = end.flags & crate::migration::wire::ROUND_FORCED == 0;
                                return Ok(rx.total_stats().clone());
                            }
                        }
                        (_, other) => return Err(unexpected("a packet or round end", other)),
                    }
                }
            },
        );
        drop(frames);
        // `receive` reports worker panics; the closure reports everything else.
        self.stats.codec = match result {
            Ok(Ok(codec)) => codec,
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(e.into()),
        };
        self.stats.rounds = rounds;
        self.stats.converged = converged;
        // The page hashes are current (every round passed its barrier): hash the list.
        let t = Instant::now();
        let ours = hashes.digest();
        self.stats.switchover_ms.digest = Some(t.elapsed().as_secs_f64() * 1e3);
        if self.cfg.resume {
            // While the source hashes its memory: recovery and verify read (and recovery
            // may write) the final image, after our digest of it was taken.
            let t = Instant::now();
            let (file_background, kvm_background) = match background {
                Some(verify::Background::File(bg)) => (Some(bg), None),
                Some(verify::Background::Kvm(bg)) => (None, Some(bg)),
                None => (None, None),
            };
            match self.guest_kind {
                GuestKind::Kvm => {
                    self.kvm_verified =
                        Some(kvm::verify_pending(&mut image, &hashes, kvm_background))
                }
                _ => {
                    // Pages no record wrote are holes: the zero checks skip them.
                    let data = image.data_pages().ok();
                    self.verified = Some(verify::verify_at_pause(
                        image.memory_mut(),
                        &hashes,
                        file_background,
                        data.as_deref(),
                    ))
                }
            }
            self.stats.switchover_ms.verify = Some(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(DestState::AwaitGuestState { image, ours })
    }

    fn committing(
        &mut self,
        image: PendingImage,
        ours: [u8; 32],
        digest: Digest,
    ) -> Result<DestState, RecvError> {
        self.stats.digest = Some(hex(&ours));
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
        let failed_verify = match (&self.verified, &self.kvm_verified) {
            (Some(Err(e)), _) => Some(e.to_string()),
            (_, Some(Err(e))) => Some(e.clone()),
            _ => None,
        };
        if let Some(e) = failed_verify {
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
        let t = Instant::now();
        let committed = image.commit();
        self.stats.switchover_ms.commit = Some(t.elapsed().as_secs_f64() * 1e3);
        let committed = match committed {
            Ok(memory) => {
                self.committed = Some(memory);
                self.committed_at_ns = unix_ns(SystemTime::now());
                Ok(())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = committed {
            let reason = e.to_string();
            let _ = self.send(&Message::CommitReply(CommitReply {
                status: CommitStatus::Failed,
                digest: ours,
                reason,
            }));
            return Err(e.into());
        }
        self.stats.outcome = MigrationOutcome::Committed;
        self.stats.total_time_ms = self.start.elapsed().as_secs_f64() * 1e3;
        self.send(&Message::CommitReply(CommitReply {
            status: CommitStatus::Committed,
            digest: ours,
            reason: String::new(),
        }))?;
        Ok(DestState::Committed {
            paused_at_ns: digest.paused_at_unix_ns,
        })
    }

    /// Waits for the source's `Handover` (its guest ended). Without it a guest must not run
    /// here: the source may have resumed its own copy.
    fn await_handover(&mut self) -> Result<(), RecvError> {
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

    /// The image is committed: from here on errors do not roll anything back.
    fn committed(&mut self, paused_at_ns: u64) -> Result<DestState, RecvError> {
        if let Err(e) = self.await_handover() {
            if self.cfg.resume {
                return Err(e);
            }
            // Nothing runs here: the image is in place all the same.
            eprintln!("vmstream recv: warning: {e}");
        }
        if self.guest_kind == GuestKind::Kvm {
            return self.committed_kvm(paused_at_ns);
        }
        let t = Instant::now();
        let (running, tx) = if self.cfg.resume {
            let started = match (self.committed.take(), self.verified.take()) {
                (Some(memory), Some(Ok(report))) => start_guest(memory, report, self.cfg.run_for),
                _ => Err(RecvError::Resume("no verified image to resume".into())),
            };
            match started {
                Ok(g) => {
                    let tx = g.ready.tx_count;
                    self.guest = Some(g);
                    (true, tx)
                }
                Err(e) => {
                    let _ = self.send(&Message::Abort(Abort {
                        code: AbortCode::DestinationError,
                        reason: e.to_string(),
                    }));
                    return Err(e);
                }
            }
        } else {
            (false, 0)
        };
        if self.cfg.resume {
            self.stats.switchover_ms.resume = Some(t.elapsed().as_secs_f64() * 1e3);
        }
        let at = if running {
            unix_ns(SystemTime::now())
        } else {
            self.committed_at_ns
        };
        self.report_resumed(paused_at_ns, at, running, tx);
        if running {
            self.report_samples();
        }
        Ok(DestState::Done)
    }

    /// How long the resumed guest is sampled for the source: [`DESTINATION_WINDOW`], or
    /// `--run-for` if shorter.
    fn sample_window(&self) -> Duration {
        self.cfg
            .run_for
            .map_or(DESTINATION_WINDOW, |r| r.min(DESTINATION_WINDOW))
    }

    /// Samples the resumed guest process for a short window and sends the readings to the
    /// source (its timeline).
    fn report_samples(&mut self) {
        let samples = sample_destination(&self.cfg.memory_file, self.sample_window())
            .map_err(|e| e.to_string());
        self.send_samples(samples);
    }

    /// Sends the resumed guest's samples to the source; an empty report if sampling
    /// failed, so the source does not wait.
    fn send_samples(&mut self, samples: Result<GuestSamples, String>) {
        let samples = samples.unwrap_or_else(|e| {
            eprintln!("vmstream recv: warning: sampling the resumed guest: {e}");
            GuestSamples {
                samples: Vec::new(),
            }
        });
        if let Err(e) = self.send(&Message::GuestSamples(samples)) {
            eprintln!("vmstream recv: warning: could not report the guest samples: {e}");
        }
    }
}

/// Checks a receive's settings before anything is created or bound: the listen address,
/// the expected size and the target path ([`check_target`]: not a directory or a device,
/// in a directory that exists). Errors are [`RecvError::Config`] and
/// [`RecvError::Image`] (`Unusable`, `BadPath`): bad arguments.
pub fn check_config(cfg: &RecvConfig) -> Result<(), RecvError> {
    listen_addr(&cfg.listen)?;
    if cfg.io_timeout.is_zero() {
        // Every connection would be dropped for it, and the receive never end.
        return Err(RecvError::Config("--io-timeout must be above 0".into()));
    }
    if let Some(size) = cfg.expect_size {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE as u64) || size > cfg.max_size {
            return Err(RecvError::Config(format!(
                "expected guest size {size} (--size) must be a non-zero multiple of \
                 {PAGE_SIZE} bytes, at most {}",
                cfg.max_size
            )));
        }
    }
    check_target(&cfg.memory_file)?;
    Ok(())
}

/// A receive that listens: its settings checked, its target claimed (no other receive
/// can write it meanwhile, see [`Reservation`]), its socket bound. [`receive_on`] takes
/// the migration; dropped unused, it releases the target.
#[derive(Debug)]
pub struct Listening {
    claim: Reservation,
    listener: TcpListener,
    local: SocketAddr,
}

impl Listening {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// Prepares a receive into `cfg.memory_file`: checks the settings ([`check_config`]),
/// claims the target (refused with [`crate::migration::image::ImageError::Busy`] while another
/// receiver writes it) and binds the listening socket. Prints `listening on ADDR` on
/// stdout once bound. Nothing has been received when this fails.
pub fn listen(cfg: &RecvConfig) -> Result<Listening, RecvError> {
    check_config(cfg)?;
    let (addr, explicit) = listen_addr(&cfg.listen)?;
    let claim = Reservation::claim(&cfg.memory_file)?;
    for stale in claim.removed() {
        eprintln!(
            "vmstream recv: removed {}, left by a receiver that no longer runs",
            stale.display()
        );
    }
    if explicit && !addr.ip().is_loopback() && cfg.auth_key.is_none() {
        eprintln!(
            "vmstream recv: warning: listening on {addr}: the migration stream is \
             unauthenticated, anyone who connects can write this guest's memory \
             (--auth-key-file admits only sources that hold a shared key)"
        );
    }
    let listener = TcpListener::bind(addr).map_err(|e| RecvError::Listen(addr.to_string(), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| RecvError::Listen(addr.to_string(), e))?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {local}");
        let _ = out.flush();
    }
    Ok(Listening {
        claim,
        listener,
        local,
    })
}

/// Accepts one source on `listening` and receives its guest into `cfg.memory_file`, filling
/// `stats` ([`receive_on`] makes and finishes them); on success returns the resumed guest
/// (with `cfg.resume`).
fn receive_into(
    cfg: &RecvConfig,
    listening: Listening,
    stats: &mut MigrationStats,
) -> Result<Received, RecvError> {
    let Listening {
        claim,
        listener,
        local,
    } = listening;
    // Connections are read concurrently (`crate::migration::connect::admission`): the first opening is the
    // source's; with a key, the first that proved it, while the others are refused.
    let mut admissions = Admissions::new(listener, cfg.auth_key.clone(), cfg.io_timeout)
        .map_err(|e| RecvError::Listen(local.to_string(), e))?;
    let source = loop {
        if interrupt::requested(cfg.cancel.as_ref()) {
            return Err(RecvError::Interrupted);
        }
        match admissions.next(Duration::from_millis(200)) {
            Ok(Some(opening)) => break opening,
            Ok(None) => {}
            Err(e) => return Err(RecvError::Listen(local.to_string(), e)),
        }
    };
    let _watch = cfg
        .cancel
        .as_ref()
        .map(|flag| InterruptWatch::start(flag.clone(), source.reader.get_ref()))
        .transpose()
        .map_err(RecvError::Socket)?;
    // Kept while the handshake tells whether more channels follow.
    let channels = DestChannels::new(admissions);
    let mut dest = Dest {
        cfg,
        reader: source.reader,
        writer: source.writer,
        opening: Some(source.admission),
        claim: Some(claim),
        channels,
        stats,
        start: Instant::now(),
        guest: None,
        verified: None,
        committed: None,
        committed_at_ns: 0,
        guest_kind: GuestKind::File,
        kvm_state: None,
        kvm_verified: None,
        kvm: None,
        verify_view: None,
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
    let guest = dest.guest.take();
    let kvm = dest.kvm.take();
    stats.bytes_on_wire = bytes;
    stats.set_wire_ratio();
    stats.cpu = CpuTime::now();
    result.map(|()| Received { guest, kvm })
}

/// Ends a receive that is waiting for the source once `RecvConfig::cancel` is set: shuts
/// the read side of channel 0, so a blocked read ends (with more channels, the others are
/// shut when the rounds end early). Writes still work: the source is told why. Stops
/// watching when dropped.
struct InterruptWatch {
    done: Arc<AtomicBool>,
}

impl InterruptWatch {
    fn start(flag: Arc<AtomicBool>, channel0: &TcpStream) -> std::io::Result<InterruptWatch> {
        let socket = channel0.try_clone()?;
        let done = Arc::new(AtomicBool::new(false));
        let watching = done.clone();
        std::thread::Builder::new()
            .name("vmstream-interrupt".into())
            .spawn(move || {
                while !watching.load(Ordering::Relaxed) {
                    if flag.load(Ordering::Relaxed) {
                        let _ = socket.shutdown(std::net::Shutdown::Read);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })?;
        Ok(InterruptWatch { done })
    }
}

impl Drop for InterruptWatch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// The temporary file a receive into `target` uses (for tests and cleanup tools).
pub fn temp_image_path(target: &Path) -> Option<PathBuf> {
    crate::migration::image::temp_path(target).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_defaults_to_loopback() {
        assert_eq!(
            listen_addr("7000").unwrap(),
            ("127.0.0.1:7000".parse().unwrap(), false)
        );
        assert_eq!(
            listen_addr(":0").unwrap(),
            ("127.0.0.1:0".parse().unwrap(), false)
        );
        assert_eq!(
            listen_addr("0.0.0.0:9").unwrap(),
            ("0.0.0.0:9".parse().unwrap(), true)
        );
        assert!(listen_addr("nonsense").is_err());
    }
}
