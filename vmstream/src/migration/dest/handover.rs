//! The destination of a same-host handover (`FEATURE_HANDOVER`): the guest's memory comes
//! as a file descriptor over the unix socket instead of pages, while the guest still runs
//! on the source. With `--resume` the workload's checks read all of it in the background,
//! then again the pages each `HandoverDirty` round lists (the guest wrote them meanwhile);
//! at the pause only the last round's pages are read, through a private view (the source
//! may still resume its guest). The memory is then committed (as it is, or copied into
//! `--memory-file PATH`) and run only after the source's `Handover`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Instant, SystemTime};

use std::sync::Arc;

use crate::memory::{page_is_hole, GuestMemory, MapMode, PAGE_SIZE};
use crate::migration::dest::incoming::{check_guest_state, IncomingGuest};
use crate::migration::dest::machine::{unexpected, Dest, DestState};
use crate::migration::dest::verify::TouchedPages;
use crate::migration::digest::DIGEST_SKIPPED_HANDOVER;
use crate::migration::error::RecvError;
use crate::migration::image::{PendingImage, Reservation};
use crate::migration::transport::Frame;
use crate::migration::wire::{
    CommitReply, CommitStatus, HandoverAck, Hello, MemoryHandover, Message, FEATURE_CHANNELS,
    FEATURE_MEMORY_REGIONS, HANDOVER_MORE, HANDOVER_PAUSED,
};
use crate::telemetry::stats::{unix_ns, MigrationOutcome};

/// The digest field of a handover's `CommitReply`: nothing was hashed.
const NO_DIGEST: [u8; 32] = [0; 32];

impl Dest<'_> {
    /// Why this destination cannot take the handover `hello` announces (None: it can).
    pub(super) fn handover_refusal(&self, hello: &Hello) -> Option<String> {
        if !self.reader.get_ref().is_unix() {
            return Some(
                "a handover passes the guest's memory by file descriptor, which only a unix \
                 socket carries: listen on unix:PATH"
                    .into(),
            );
        }
        if hello.features & FEATURE_CHANNELS != 0 {
            return Some("a handover runs over one connection, without channels".into());
        }
        if hello.features & FEATURE_MEMORY_REGIONS != 0 || !self.cfg.memory_regions.is_empty() {
            return Some("a handover passes one memory file, not several".into());
        }
        None
    }

    /// Takes the handed-over memory and the guest's state, verifies the guest (with
    /// `--resume`) and commits; the source resumes its guest on any refusal.
    pub(super) fn handover(
        &mut self,
        hello: &Hello,
        mut guest: Box<dyn IncomingGuest>,
    ) -> Result<DestState, RecvError> {
        let handed = match self.reader.read_frame()? {
            Frame::Control(Message::MemoryHandover(m)) => m,
            other => return Err(unexpected("the memory handover", other)),
        };
        let result = self.take_memory(hello, &handed, guest.as_mut());
        let (file, committed, paused_at_ns) = match result {
            Ok(ok) => ok,
            Err(e) => {
                let status = match e {
                    RecvError::GuestState(_) => CommitStatus::StateRejected,
                    _ => CommitStatus::Failed,
                };
                let _ = self.send(&Message::CommitReply(CommitReply {
                    status,
                    digest: NO_DIGEST,
                    reason: e.to_string(),
                }));
                return Err(e);
            }
        };
        self.handed_over = Some(file);
        self.stats.digest = Some(DIGEST_SKIPPED_HANDOVER.into());
        self.stats.converged = true;
        self.stats.outcome = MigrationOutcome::Committed;
        self.stats.total_time_ms = self.start.elapsed().as_secs_f64() * 1e3;
        let committed_at_ns = unix_ns(SystemTime::now());
        self.send(&Message::CommitReply(CommitReply {
            status: CommitStatus::Committed,
            digest: NO_DIGEST,
            reason: String::new(),
        }))?;
        Ok(DestState::Committed {
            paused_at_ns,
            committed_at_ns,
            memory: committed,
            guest,
        })
    }

    /// The descriptor that came with the handover, checked; with `--resume` the workload's
    /// checks of it during the live rounds; the guest's state, validated; the workload's
    /// verify at the pause; then the memory to commit (the handed-over file itself, or its
    /// copy in `--memory-file`). Returns the handed-over file too, and the pause's instant.
    fn take_memory(
        &mut self,
        hello: &Hello,
        handed: &MemoryHandover,
        guest: &mut dyn IncomingGuest,
    ) -> Result<(File, GuestMemory, u64), RecvError> {
        let bad = RecvError::HandedMemory;
        let passed = File::from(
            self.reader
                .get_ref()
                .take_received_fd()
                .ok_or_else(|| bad("no file descriptor came with it".into()))?,
        );
        // A file description of our own: the passed one is shared with the source, with
        // whatever lock it holds there (a guest locks its memory file while it runs).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", passed.as_raw_fd()))
            .map_err(|e| bad(format!("reopening it: {e}")))?;
        drop(passed);
        let meta = file.metadata().map_err(|e| bad(format!("stat: {e}")))?;
        if !meta.is_file()
            || meta.len() != hello.guest_size
            || handed.guest_size != hello.guest_size
        {
            return Err(bad(format!(
                "expected a file (or memfd) of {} bytes, got {} of {} bytes",
                hello.guest_size,
                if meta.is_file() {
                    "a file"
                } else {
                    "something else"
                },
                meta.len()
            )));
        }
        let pages = hello.guest_size / PAGE_SIZE as u64;
        let touched = Arc::new(TouchedPages::new(pages));
        if self.cfg.resume {
            // Every page first (the memory is the guest's, not a fresh image), then what the
            // rounds list. Without the background the verify at the pause reads it all.
            for p in 0..pages {
                touched.mark(p);
            }
            let started = file
                .try_clone()
                .and_then(|f| {
                    GuestMemory::from_file(f, MapMode::SharedReadOnly)
                        .map_err(std::io::Error::other)
                })
                .and_then(|view| guest.start_handover_checks(view, Arc::clone(&touched)));
            if let Err(e) = started {
                self.cfg.notices.warning(format!(
                    "checking the handed-over memory before the pause failed ({e}): all of it \
                     is verified at the pause"
                ));
            }
        }
        let paused_at_ns = self.handover_rounds(pages, &touched, guest)?;
        let mapped = |mode| {
            file.try_clone()
                .map_err(|e| bad(e.to_string()))
                .and_then(|f| GuestMemory::from_file(f, mode).map_err(|e| bad(e.to_string())))
        };
        // Private: a journal the verify replays stays in this view, and the source's guest
        // resumes on untouched memory if anything below refuses.
        let mut view = mapped(MapMode::Private)?;
        let state = match self.reader.read_frame()? {
            Frame::Control(Message::GuestState(s)) => s,
            other => return Err(unexpected("the guest state", other)),
        };
        check_guest_state(guest, &state, view.as_mut_slice(), &mut self.stats.settings)?;
        self.stats.settings.source_tx_at_pause = Some(state.tx_count);
        if self.cfg.resume {
            let t = Instant::now();
            let file = view.file().try_clone().ok();
            let len = view.len();
            let data = || crate::memory::data_pages_of(file.as_ref()?, len).ok();
            guest.verify_handed_over(view.as_mut_slice(), &data);
            self.stats.switchover_ms.verify = Some(t.elapsed().as_secs_f64() * 1e3);
        }
        drop(view);
        if let Some(e) = guest.verify_failure() {
            return Err(RecvError::Resume(format!(
                "the workload's verify of the handed-over memory failed, nothing committed: {e}"
            )));
        }
        let t = Instant::now();
        let committed = match self.claim.take() {
            Some(claim) => copy_into(claim, &mapped(MapMode::SharedReadOnly)?)?,
            None => mapped(MapMode::Shared)?,
        };
        self.stats.switchover_ms.commit = Some(t.elapsed().as_secs_f64() * 1e3);
        Ok((file, committed, paused_at_ns))
    }

    /// The live rounds of `HandoverDirty` lists: each page listed is marked in `touched` for
    /// the checks, and a live round is acknowledged once they took it. Returns with the
    /// paused round's list (its instant). Lists must name pages of the guest, in rounds
    /// counted from 1.
    fn handover_rounds(
        &mut self,
        pages: u64,
        touched: &TouchedPages,
        guest: &mut dyn IncomingGuest,
    ) -> Result<u64, RecvError> {
        let bad = RecvError::HandedMemory;
        let mut round = 1;
        let mut listed = 0u64;
        loop {
            let d = match self.reader.read_frame()? {
                Frame::Control(Message::HandoverDirty(d)) => d,
                other => return Err(unexpected("a handover round's dirty pages", other)),
            };
            if d.round != round {
                return Err(bad(format!(
                    "round {} listed where round {round} was due",
                    d.round
                )));
            }
            if let Some(&p) = d.pages.last().filter(|&&p| p >= pages) {
                return Err(bad(format!(
                    "round {round} lists page {p}, beyond the guest's {pages} pages"
                )));
            }
            for &p in &d.pages {
                touched.mark(p);
            }
            listed += d.pages.len() as u64;
            if d.flags & HANDOVER_MORE != 0 {
                continue;
            }
            if d.flags & HANDOVER_PAUSED != 0 {
                self.stats.rounds = u64::from(round);
                return Ok(d.paused_at_unix_ns);
            }
            guest.wait_checked();
            self.send(&Message::HandoverAck(HandoverAck {
                round,
                pages_checked: listed,
            }))?;
            listed = 0;
            round += 1;
        }
    }
}

/// Names the handed-over memory `source` by copying it (its data pages; holes stay holes)
/// into the claimed target's temporary image and committing that: the guest then runs on
/// the named file. A memfd cannot be linked into a directory, and a copy serves files and
/// memfds alike (a hard link of a file on the target's filesystem would save the copy).
fn copy_into(claim: Reservation, source: &GuestMemory) -> Result<GuestMemory, RecvError> {
    let mut image = PendingImage::create(claim, source.len() as u64)?;
    let data = source.data_pages().ok();
    let to = image.memory_mut();
    for page in 0..source.pages() {
        if data.as_ref().is_some_and(|d| page_is_hole(d, page)) {
            continue;
        }
        let at = page as usize * PAGE_SIZE;
        source.read_at(at, &mut to[at..at + PAGE_SIZE]);
    }
    Ok(image.commit()?)
}
