//! A file-backed guest (`vmstream guest run`) on the destination: its workload's verify of
//! the received image (mostly during the rounds, [`checks`]) and, with `--resume`, the
//! guest run in this process on the committed image.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use crate::guest::file::disks::GuestDisks;
use crate::guest::file::verify::{ImageVerifyError, ImageVerifyReport};
use crate::guest::file::{
    GuestError, GuestSummary, MemorySource, ProcessGuestConfig, ReadyLine, StartMode,
};
use crate::memory::GuestMemory;
use crate::migration::dest::incoming::{
    IncomingGuest, PostcopyLaunch, PostcopyResumed, Resumption,
};
use crate::migration::dest::machine::Received;
use crate::migration::dest::verify::{BackgroundSlot, Backlog, DataPages, TouchedPages};
use crate::migration::digest::PageHashes;
use crate::migration::error::{GuestStateError, RecvError};
use crate::migration::image::PendingImage;
use crate::migration::wire::{GuestKind, GuestSamples, GuestState, Hello, RefuseCode};
use crate::telemetry::impact::sample_destination;
use crate::telemetry::notice::Notices;
use crate::telemetry::settings::Settings;
use crate::telemetry::stats::unix_ns;
use crate::telemetry::switchover::SwitchoverTimes;
use crate::track::uffd_missing::MissingFaults;

mod checks;
mod known;

use checks::{verify_at_pause, FileChecks};

/// A file-backed guest being received.
#[derive(Default)]
pub struct IncomingFileGuest {
    /// With `--resume`: the checks of the workload's blocks during the rounds.
    background: BackgroundSlot<FileChecks>,
    /// With `--resume`: the workload's recover + verify of the final image, run before the
    /// commit so an image the guest cannot resume from is never committed.
    verified: Option<Result<ImageVerifyReport, ImageVerifyError>>,
    resumed: Option<ResumedGuest>,
    /// The verify recovered a private view of handed-over memory: the shared memory is
    /// recovered the same way at the resume (the source's guest has ended by then).
    recover_at_resume: bool,
    /// Told the lines the resumed guest writes.
    notices: Notices,
    /// The committed disks the resumed guest runs on (`recv --disk`).
    disks: Vec<PathBuf>,
}

impl IncomingFileGuest {
    /// A guest process's image to receive; the lines the guest writes once resumed go to
    /// `notices`.
    pub fn new(notices: Notices) -> IncomingFileGuest {
        IncomingFileGuest {
            notices,
            ..IncomingFileGuest::default()
        }
    }
}

impl IncomingGuest for IncomingFileGuest {
    fn kind(&self) -> GuestKind {
        GuestKind::File
    }

    fn check_hello(&self, _hello: &Hello, _resume: bool) -> Option<(RefuseCode, String)> {
        None
    }

    fn start_background(
        &mut self,
        view: GuestMemory,
        touched: Arc<TouchedPages>,
    ) -> std::io::Result<()> {
        self.background.start(view, touched, FileChecks::default())
    }

    fn round_applied(&self) {
        self.background.round_applied()
    }

    fn verify_backlog(&self) -> Option<Backlog> {
        self.background.backlog()
    }

    fn verify_at_pause(&mut self, image: &mut PendingImage, hashes: &PageHashes) {
        // Pages no record wrote are holes: the full verifier's zero checks skip them (found
        // only if it runs, by the file's own handle while the mapping is borrowed).
        let file = image.file().ok().flatten();
        let memory = image.memory_mut();
        let len = memory.len();
        let data = || crate::memory::data_pages_of(file.as_deref()?, len).ok();
        self.verified = Some(verify_at_pause(
            memory,
            hashes,
            self.background.take(),
            &data,
        ));
    }

    fn start_handover_checks(
        &mut self,
        view: GuestMemory,
        touched: Arc<TouchedPages>,
    ) -> std::io::Result<bool> {
        // All of memory in the first pass, with nothing else to do: on all cores.
        self.background
            .start(view, touched, FileChecks::for_handover())?;
        Ok(true)
    }

    fn wait_checked(&self) {
        if let Some(bg) = self.background.verifier() {
            let k = bg.round_applied();
            bg.wait_covered(k);
        }
    }

    fn verify_handed_over(&mut self, memory: &mut [u8], data: DataPages<'_>) {
        self.verified = Some(match self.background.take() {
            Some(bg) => checks::verify_handed_over(memory, bg, data),
            None => checks::verify_full(memory, data),
        });
        self.recover_at_resume = true;
    }

    fn verify_failure(&self) -> Option<String> {
        match &self.verified {
            Some(Err(e)) => Some(e.to_string()),
            _ => None,
        }
    }

    fn accept_state(
        &mut self,
        state: &GuestState,
        _memory: &[u8],
        _settings: &mut Settings,
    ) -> Result<(), GuestStateError> {
        // A guest process has no state besides its memory: a blob is a peer's invention,
        // refused rather than ignored.
        if !state.blob.is_empty() {
            return Err(GuestStateError::UnexpectedBlob {
                len: state.blob.len(),
            });
        }
        Ok(())
    }

    fn committed_disks(&mut self, disks: &[PathBuf]) {
        self.disks = disks.to_vec();
    }

    fn resume(
        &mut self,
        mut memory: GuestMemory,
        _target: &Path,
        run_for: Option<Duration>,
    ) -> Result<Resumption, RecvError> {
        let t = Instant::now();
        if self.recover_at_resume {
            // What the verify's private view replayed: the same journal, now ours alone.
            crate::guest::file::workload::recover(memory.as_mut_slice()).map_err(|e| {
                RecvError::Resume(format!("recovering the handed-over memory: {e}"))
            })?;
        }
        let guest = match self.verified.take() {
            Some(Ok(report)) => start_guest(
                memory,
                Some(report),
                &self.disks,
                run_for,
                self.notices.clone(),
            )?,
            _ => return Err(RecvError::Resume("no verified image to resume".into())),
        };
        let resumption = Resumption {
            tx_count: guest.ready.tx_count,
            phases: SwitchoverTimes {
                resume: Some(t.elapsed().as_secs_f64() * 1e3),
                ..SwitchoverTimes::default()
            },
            at_unix_ns: unix_ns(SystemTime::now()),
        };
        self.resumed = Some(guest);
        Ok(resumption)
    }

    /// The guest runs on `memory` itself, registered for MISSING faults; it starts without
    /// reading all of memory first (the faults are served meanwhile).
    fn postcopy_launch(
        &mut self,
        memory: GuestMemory,
        run_for: Option<Duration>,
    ) -> Result<PostcopyLaunch, RecvError> {
        // SAFETY: `memory` is the shared mapping of the committed image (tmpfs); it moves
        // into the guest that runs on it, which keeps it mapped until it ends, and
        // placements into a range that went away fail with an error (never write
        // elsewhere).
        let faults = unsafe { MissingFaults::register(memory.addr(), memory.len() as u64) }
            .map_err(|e| RecvError::Resume(format!("post-copy: {e}")))?;
        let notices = self.notices.clone();
        Ok(PostcopyLaunch {
            faults: Arc::new(faults),
            start: Box::new(move || {
                start_guest(memory, None, &[], run_for, notices).map(PostcopyResumed::File)
            }),
        })
    }

    /// Samples the resumed guest process (through its memory file `target`).
    fn sample(&self, target: &Path, window: Duration) -> Result<GuestSamples, String> {
        sample_destination(target, window, GuestSamples::MAX_SAMPLES)
            .map(|samples| GuestSamples { samples })
            .map_err(|e| e.to_string())
    }

    fn into_received(self: Box<Self>) -> Received {
        Received {
            guest: self.resumed,
            kvm: None,
            handed_over: None,
            qemu: None,
        }
    }
}

/// A guest running on the committed image.
#[derive(Debug)]
pub struct ResumedGuest {
    /// Its ready line.
    pub ready: ReadyLine,
    thread: std::thread::JoinHandle<Result<GuestSummary, GuestError>>,
}

impl ResumedGuest {
    /// Whether the guest still runs.
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Waits until the guest stops (`--run-for`) and returns its final transaction count.
    pub fn join(self) -> Result<u64, RecvError> {
        match self.thread.join() {
            Ok(Ok(s)) => Ok(s.tx_count),
            Ok(Err(e)) => Err(RecvError::Resume(e.to_string())),
            Err(_) => Err(RecvError::Resume("guest thread panicked".into())),
        }
    }
}

/// Lines written by the resumed guest go to `notices` as output; its ready line is also
/// handed to whoever waits for it.
struct ReadyWatch {
    line: Vec<u8>,
    ready: Option<mpsc::Sender<ReadyLine>>,
    notices: Notices,
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
            let ready = ReadyLine::parse(&line);
            self.notices.output(line);
            if let Some(r) = ready {
                if let Some(tx) = self.ready.take() {
                    let _ = tx.send(r);
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Each line was told as it ended.
        Ok(())
    }
}

/// Starts the guest on the committed image `memory` (recovered and verified before the
/// commit: `report`; None: post-copy, not verified) and its committed `disks` (verified
/// against memory before it runs) and waits for it to run; the lines it writes go to
/// `notices`.
fn start_guest(
    memory: GuestMemory,
    report: Option<ImageVerifyReport>,
    disks: &[PathBuf],
    run_for: Option<Duration>,
    notices: Notices,
) -> Result<ResumedGuest, RecvError> {
    let cfg = ProcessGuestConfig {
        memory: MemorySource::File(memory.path().to_path_buf()),
        size: Some(memory.len() as u64),
        start: StartMode::Resume,
        rate: None,
        duration: run_for,
        control_stdin: false,
        track_writes: false,
        disks: GuestDisks {
            paths: disks.to_vec(),
            ..GuestDisks::default()
        },
    };
    // Held while the guest runs, as a guest process holds its own: taken on the committed
    // file itself (its name is not looked up again).
    let owner = crate::guest::file::own_mapped_memory(&memory)
        .map_err(|e| RecvError::Resume(e.to_string()))?;
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("vmstream-guest".into())
        .spawn(move || {
            let _owner = owner;
            let mut out = ReadyWatch {
                line: Vec::new(),
                ready: Some(tx),
                notices,
            };
            match report {
                Some(report) => crate::guest::file::run_verified(memory, report, &cfg, &mut out),
                None => crate::guest::file::run_unverified(memory, &cfg, &mut out),
            }
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
