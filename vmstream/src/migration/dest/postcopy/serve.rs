//! The post-copy phase on the destination: one thread waits for the guest's faults, one
//! reads the source's frames, and this one (the only one that places pages) turns both into
//! page requests and `UFFDIO_COPY` placements until the last owed page landed and the
//! digests compared.

use std::collections::HashMap;
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::memory::PAGE_SIZE;
use crate::migration::dest::incoming::{PostcopyResumed, PostcopyStart};
use crate::migration::dest::machine::{unexpected, Dest, DestState};
use crate::migration::digest::{hex, PageHashes};
use crate::migration::error::RecvError;
use crate::migration::transport::{Frame, FrameReader, Socket, TransportError};
use crate::migration::wire::{
    Digest, Message, PageRequest, PostcopyComplete, PostcopyPage, PostcopyStatus, WireError,
};
use crate::telemetry::postcopy::{LatencyMs, PostcopyStats};
use crate::telemetry::stats::unix_ns;
use crate::track::uffd_missing::{MissingFaults, Placed};

use super::preempt::{accept_preempt, PreemptAccept, StreamCredit};
use super::Placement;

/// What the post-copy phase starts from.
pub(super) struct Phase {
    pub(super) placement: Placement,
    pub(super) uffd: Arc<MissingFaults>,
    pub(super) hashes: Arc<PageHashes>,
    pub(super) paused_at_ns: u64,
    pub(super) owed: u64,
    /// The migration's id, which a reconnection must name.
    pub(super) migration_id: [u8; 16],
    /// Where a source that lost the link reconnects (None: it cannot).
    pub(super) admissions: Option<crate::migration::connect::admission::Admissions>,
    /// The source opens a connection of its own for requested pages
    /// (`FEATURE_POSTCOPY_PREEMPT`).
    pub(super) preempt: bool,
}

/// What the threads tell the placing loop.
pub(super) enum Event {
    /// The guest faulted on these pages.
    Faults(Vec<u64>),
    /// The source sent a frame on channel 0 (or the link failed); the placing loop
    /// releases a [`StreamCredit`] for each.
    Frame(Result<Frame, TransportError>),
    /// A frame on the requested pages' own connection (or its end).
    Preempt(Result<Frame, TransportError>),
    /// The guest runs (or could not start).
    Guest(Result<PostcopyResumed, RecvError>),
}

/// The placing loop's own figures and links.
#[derive(Default)]
pub(super) struct Progress {
    /// Where a new frame reader sends (after a reconnection).
    pub(super) events: Option<mpsc::Sender<Event>>,
    /// The frame reader; it returns the reader when the link ends.
    pub(super) frames: Option<std::thread::JoinHandle<FrameReader<Socket>>>,
    /// Bounds the frames the reader hands over ahead of the placing loop.
    pub(super) credit: Arc<StreamCredit>,
    /// Waits for the requested pages' connection, holding the listener meanwhile.
    pub(super) preempt: Option<PreemptAccept>,
    preempted: u64,
    /// The link is down: requests wait for the reconnection.
    pub(super) offline: bool,
    pub(super) reconnects: u64,
    /// When the guest ran here (CLOCK_REALTIME ns): the end of the downtime.
    pub(super) resumed_at_ns: u64,
    pub(super) fault_at: HashMap<u64, Instant>,
    latencies_ns: Vec<u64>,
    refused: u64,
    source_digest: Option<Digest>,
    pub(super) resumed: Option<(PostcopyResumed, Instant, u64)>,
    last_page_at: Option<Instant>,
}

impl Dest<'_> {
    /// Runs the guest (`start`; the mapping it runs on is registered in `phase.uffd`) and
    /// places the owed pages until the last; then compares the digests and reports.
    /// `file`: the committed image, at `target`.
    pub(super) fn serve_postcopy(
        &mut self,
        mut phase: Phase,
        start: PostcopyStart,
        file: std::fs::File,
        target: &std::path::Path,
    ) -> Result<DestState, RecvError> {
        let pages = phase.placement_pages();
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let faults = spawn_fault_watch(Arc::clone(&phase.uffd), Arc::clone(&stop), tx.clone())?;
        let reader = self
            .reader
            .hand_off(Some(self.cfg.io_timeout))
            .map_err(RecvError::Socket)?;
        let credit = Arc::new(StreamCredit::default());
        let frames = spawn_frame_reader(reader, tx.clone(), Arc::clone(&credit))?;
        let preempt = match phase.admissions.take() {
            Some(admissions) if phase.preempt => Some(
                accept_preempt(
                    admissions,
                    phase.migration_id,
                    self.cfg.io_timeout,
                    tx.clone(),
                    self.cfg.notices.clone(),
                )
                .map_err(RecvError::Socket)?,
            ),
            other => {
                phase.admissions = other;
                None
            }
        };
        let mut progress = Progress {
            events: Some(tx.clone()),
            frames: Some(frames),
            credit,
            preempt,
            ..Progress::default()
        };
        std::thread::Builder::new()
            .name("vmstream-guest-start".into())
            .spawn(move || {
                let _ = tx.send(Event::Guest(start()));
            })
            .map_err(RecvError::Socket)?;
        let result = self.place_until_complete(&mut phase, &mut progress, &rx, &file, pages);
        // Not before every owed page is placed: a thread still blocked on a fault would
        // then be given a zero page.
        if result.is_ok() {
            let _ = phase.uffd.unregister();
        }
        stop.store(true, Ordering::Relaxed);
        let _ = faults.join();
        progress.credit.close();
        if let Some(p) = progress.preempt.take() {
            phase.admissions = p.finish();
        }
        if let Err(e) = result {
            // The guest waits on pages only the source has: keep it blocked (the
            // userfaultfd stays registered until this process ends) rather than let it
            // run on holes. Its threads are not joined either: they may be blocked there.
            std::mem::forget(Arc::clone(&phase.uffd));
            std::mem::forget(progress.resumed.take());
            return Err(e);
        }
        let (mut guest, resumed_at, tx0) = progress.resumed.take().expect("complete after resume");
        let last = progress.last_page_at.unwrap_or(resumed_at);
        let ours = phase.hashes.digest();
        let theirs = progress
            .source_digest
            .take()
            .expect("complete after the digest");
        let matched = theirs.digest == ours && theirs.guest_size == self.stats.guest_bytes;
        let tx_during = guest.tx_count(&file).saturating_sub(tx0);
        let span = last.saturating_duration_since(resumed_at);
        let mut latencies = std::mem::take(&mut progress.latencies_ns);
        let latency = LatencyMs::of_ns(&mut latencies);
        let complete = PostcopyComplete {
            status: if matched {
                PostcopyStatus::Match
            } else {
                PostcopyStatus::Mismatch
            },
            pages_placed: phase.placement.placed_faulted() + phase.placement.placed_streamed(),
            pages_faulted: phase.placement.placed_faulted(),
            pages_streamed: phase.placement.placed_streamed(),
            pages_dropped: phase.placement.dropped(),
            fault_p50_ns: (latency.p50 * 1e6) as u64,
            fault_p99_ns: (latency.p99 * 1e6) as u64,
            fault_max_ns: (latency.max * 1e6) as u64,
            resume_to_last_page_ns: span.as_nanos() as u64,
            tx_during,
            digest: ours,
        };
        self.stats.digest = Some(hex(&ours));
        self.stats.postcopy = Some(PostcopyStats {
            pages_owed: phase.owed,
            pages_preempted: progress.preempted,
            pages_refused: progress.refused,
            reconnects: progress.reconnects,
            ..complete.stats()
        });
        self.stats.total_time_ms = self.start.elapsed().as_secs_f64() * 1e3;
        self.send(&Message::PostcopyComplete(complete))?;
        if !matched {
            return Err(RecvError::DigestMismatch {
                source_digest: hex(&theirs.digest),
                ours: hex(&ours),
            });
        }
        if let Some(line) = guest.check_complete()? {
            self.cfg.notices.output(line);
        }
        let samples = guest.sample(target, self.sample_window());
        self.send_samples(samples);
        progress.events = None;
        if let Some(Ok(reader)) = progress.frames.take().map(|f| f.join()) {
            self.reader = reader;
        }
        Ok(DestState::Done(guest.into_received()))
    }

    /// The placing loop: until every owed page is placed, the source's digest came and the
    /// guest runs.
    fn place_until_complete(
        &mut self,
        phase: &mut Phase,
        progress: &mut Progress,
        rx: &mpsc::Receiver<Event>,
        file: &std::fs::File,
        pages: u64,
    ) -> Result<(), RecvError> {
        let lost = |why: String| RecvError::PostcopyLost(why);
        while phase.placement.remaining() > 0
            || progress.source_digest.is_none()
            || progress.resumed.is_none()
        {
            let event = rx.recv_timeout(self.cfg.io_timeout).map_err(|_| {
                lost(format!(
                    "nothing from the source within {:?}",
                    self.cfg.io_timeout
                ))
            })?;
            match event {
                Event::Faults(list) => {
                    for page in list.into_iter().filter(|&p| p < pages) {
                        self.on_fault(phase, progress, page)?;
                    }
                }
                Event::Frame(frame) => {
                    progress.credit.release();
                    self.on_frame(phase, progress, rx, frame, file, pages)?;
                }
                Event::Preempt(Ok(Frame::Control(Message::PostcopyPage(p)))) => {
                    if place_page(phase, progress, p, file, pages, &self.cfg.notices)? {
                        progress.preempted += 1;
                    }
                }
                Event::Preempt(Err(TransportError::Wire(e @ WireError::BodyChecksum { .. }))) => {
                    self.refused(phase, progress, &e)?
                }
                Event::Preempt(Err(e)) => {
                    // The guest's pages come on channel 0 from now on (the source falls
                    // back once its writes fail): the awaited ones are asked again.
                    self.cfg.notices.warning(format!(
                        "post-copy: the connection for requested pages ended ({e}); asking \
                         again on the stream's for the pages the guest waits for"
                    ));
                    if !progress.offline {
                        for page in phase.placement.requested() {
                            self.send(&Message::PageRequest(PageRequest { page }))?;
                        }
                    }
                }
                Event::Preempt(Ok(other)) => {
                    return Err(unexpected("a requested post-copy page", other))
                }
                Event::Guest(Ok(guest)) => {
                    let tx0 = guest.tx_at_resume();
                    progress.resumed_at_ns = unix_ns(SystemTime::now());
                    self.report_resumed(phase.paused_at_ns, progress.resumed_at_ns, true, tx0);
                    progress.resumed = Some((guest, Instant::now(), tx0));
                }
                Event::Guest(Err(e)) => {
                    return Err(lost(format!("the guest could not resume here: {e}")))
                }
            }
        }
        Ok(())
    }

    /// A frame (or the end) of channel 0.
    fn on_frame(
        &mut self,
        phase: &mut Phase,
        progress: &mut Progress,
        rx: &mpsc::Receiver<Event>,
        frame: Result<Frame, TransportError>,
        file: &std::fs::File,
        pages: u64,
    ) -> Result<(), RecvError> {
        match frame {
            Ok(Frame::Control(Message::PostcopyPage(p))) => {
                place_page(phase, progress, p, file, pages, &self.cfg.notices)?;
            }
            Ok(Frame::Control(Message::Digest(d))) => {
                // The stream is over: a page still owed was lost on the way (refused):
                // ask for it again.
                for page in phase.placement.still_owed() {
                    self.send(&Message::PageRequest(PageRequest { page }))?;
                }
                progress.source_digest = Some(d);
            }
            Err(TransportError::Wire(e @ WireError::BodyChecksum { .. })) => {
                self.refused(phase, progress, &e)?
            }
            Err(e) => {
                // The listener back from the wait for the requested pages' connection.
                if let Some(p) = progress.preempt.take() {
                    phase.admissions = p.finish();
                }
                if phase.admissions.is_none() {
                    return Err(RecvError::PostcopyLost(format!(
                        "the link to the source: {e}"
                    )));
                }
                self.await_reconnect(phase, progress, rx, &e.to_string())?
            }
            Ok(other) => return Err(unexpected("a post-copy page", other)),
        }
        Ok(())
    }

    /// A page failed its check (`e`): its page number cannot be trusted either, so the
    /// pages the guest waits for are asked again, the stream's are when it ends.
    fn refused(
        &mut self,
        phase: &mut Phase,
        progress: &mut Progress,
        e: &WireError,
    ) -> Result<(), RecvError> {
        progress.refused += 1;
        self.cfg.notices.error(format!(
            "a post-copy page failed its check ({e}): refused, never placed; asking the \
             source again for the pages the guest waits for"
        ));
        for page in phase.placement.requested() {
            self.send(&Message::PageRequest(PageRequest { page }))?;
        }
        Ok(())
    }

    pub(super) fn on_fault(
        &mut self,
        phase: &mut Phase,
        progress: &mut Progress,
        page: u64,
    ) -> Result<(), RecvError> {
        use super::placement::OnFault;
        let io = |e: std::io::Error| RecvError::PostcopyLost(format!("placing page {page}: {e}"));
        match phase.placement.fault(page) {
            OnFault::Request => {
                progress.fault_at.insert(page, Instant::now());
                // Offline, the request waits for the reconnection (`requested`).
                if !progress.offline {
                    self.send(&Message::PageRequest(PageRequest { page }))?;
                }
            }
            OnFault::Wait => {}
            OnFault::Zero => {
                phase.uffd.place(page, &[0u8; PAGE_SIZE]).map_err(io)?;
                phase.placement.zero_placed(page);
            }
            OnFault::Wake => phase.uffd.wake(page).map_err(io)?,
        }
        Ok(())
    }
}

impl Phase {
    fn placement_pages(&self) -> u64 {
        self.uffd.pages()
    }
}

/// Places an arriving page if it is owed and not placed yet (true); drops it otherwise.
/// A page beyond the guest's `pages` is the peer's error.
fn place_page(
    phase: &mut Phase,
    progress: &mut Progress,
    p: PostcopyPage,
    file: &std::fs::File,
    pages: u64,
    notices: &crate::telemetry::notice::Notices,
) -> Result<bool, RecvError> {
    use super::placement::OnArrival;
    if p.page >= pages || p.data.len() != PAGE_SIZE {
        return Err(RecvError::Protocol(format!(
            "post-copy page {} is beyond the guest's {pages} pages",
            p.page
        )));
    }
    let OnArrival::Place { faulted } = phase.placement.arrive(p.page) else {
        return Ok(false);
    };
    let placed = match phase.uffd.place(p.page, &p.data) {
        Ok(placed) => placed,
        // The guest ended (`--run-for`) and unmapped its memory: nothing maps the page
        // any more, so the file takes it directly. (Its thread unmaps the memory just
        // before it finishes: the placement can fail in between.)
        Err(_) if guest_has_ended(progress) => {
            file.write_all_at(&p.data, p.page * PAGE_SIZE as u64)
                .map_err(|e| RecvError::PostcopyLost(format!("writing page {}: {e}", p.page)))?;
            Placed::Placed
        }
        Err(e) => {
            return Err(RecvError::PostcopyLost(format!(
                "placing page {}: {e}",
                p.page
            )))
        }
    };
    match placed {
        Placed::Placed => phase.hashes.update(p.page, &p.data),
        // Not through us: its hash stays the older one, and the digest tells.
        Placed::AlreadyPresent => notices.warning(format!(
            "post-copy page {} was present before it was placed",
            p.page
        )),
    }
    phase.placement.placed(p.page);
    if faulted {
        if let Some(at) = progress.fault_at.remove(&p.page) {
            progress.latencies_ns.push(at.elapsed().as_nanos() as u64);
        }
    }
    if phase.placement.remaining() == 0 {
        progress.last_page_at = Some(Instant::now());
    }
    Ok(true)
}

/// Whether the resumed guest has ended, waiting a little for a guest whose thread is
/// finishing (it unmaps its memory first).
fn guest_has_ended(progress: &Progress) -> bool {
    let Some((guest, _, _)) = progress.resumed.as_ref() else {
        return false;
    };
    let t = Instant::now();
    while guest.is_running() {
        if t.elapsed() > Duration::from_secs(2) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

fn spawn_fault_watch(
    uffd: Arc<MissingFaults>,
    stop: Arc<AtomicBool>,
    tx: mpsc::Sender<Event>,
) -> Result<std::thread::JoinHandle<()>, RecvError> {
    std::thread::Builder::new()
        .name("vmstream-faults".into())
        .spawn(move || {
            let mut pages = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                pages.clear();
                if uffd
                    .wait_faults(std::time::Duration::from_millis(50), &mut pages)
                    .is_err()
                {
                    return;
                }
                if !pages.is_empty() && tx.send(Event::Faults(pages.clone())).is_err() {
                    return;
                }
            }
        })
        .map_err(RecvError::Socket)
}

/// Reads the source's frames until the link ends (a refused page's frame does not end it).
/// At most [`STREAM_FRAMES_AHEAD`](super::preempt::STREAM_FRAMES_AHEAD) of them wait for the
/// placing loop (`credit`).
pub(super) fn spawn_frame_reader(
    mut reader: FrameReader<Socket>,
    tx: mpsc::Sender<Event>,
    credit: Arc<StreamCredit>,
) -> Result<std::thread::JoinHandle<FrameReader<Socket>>, RecvError> {
    std::thread::Builder::new()
        .name("vmstream-postcopy-rx".into())
        .spawn(move || loop {
            let frame = reader.read_frame();
            let go_on = matches!(
                &frame,
                Ok(_) | Err(TransportError::Wire(WireError::BodyChecksum { .. }))
            );
            credit.acquire();
            if tx.send(Event::Frame(frame)).is_err() || !go_on {
                return reader;
            }
        })
        .map_err(RecvError::Socket)
}
