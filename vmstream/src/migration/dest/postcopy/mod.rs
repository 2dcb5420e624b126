//! The destination of a post-copy migration (`POSTCOPY.md`): after the last pre-copy round
//! it takes the guest state and the list of pages still owed, makes those pages holes in
//! the image, commits it, and once the source's guest ended resumes the guest on it with
//! its mapping registered in userfaultfd MISSING mode; the owed pages are then placed as
//! they come (`serve`: faults ask for them, the background stream brings the rest;
//! `placement` decides each page's fate), and the digest is compared at the last one.
//!
//! ```text
//! Receiving --final RoundEnd{POSTCOPY}--> GuestState, PostcopyOwed*, PostcopyStart
//!   --holes punched, image committed--> CommitReply --Handover--> guest resumed (faults
//!   served) --last page placed, Digest equal--> PostcopyComplete --> GuestSamples --> Done
//! ```

mod placement;
mod preempt;
mod recover;
mod serve;

use std::os::fd::AsFd;

use nix::fcntl::{fallocate, FallocateFlags};
use std::sync::Arc;
use std::time::Instant;

use crate::memory::PAGE_SIZE;
use crate::migration::dest::incoming::IncomingGuest;
use crate::migration::dest::machine::{unexpected, Dest, DestState};
use crate::migration::digest::PageHashes;
use crate::migration::error::RecvError;
use crate::migration::image::PendingImage;
use crate::migration::transport::Frame;
use crate::migration::wire::{
    CommitReply, CommitStatus, GuestKind, Hello, Message, PostcopyOwed, PostcopyStart,
};
use crate::telemetry::stats::MigrationOutcome;

pub(super) use placement::Placement;

/// Why this destination cannot take a post-copy migration of the guest `hello` announces,
/// if it cannot: the guest must resume here (`--resume`), be a process or KVM guest, and its image
/// must be shared memory userfaultfd serves (tmpfs).
pub(super) fn refusal(
    hello: &Hello,
    resume: bool,
    image: Option<&std::path::Path>,
) -> Option<String> {
    if !resume {
        return Some(
            "post-copy resumes the guest at the destination: run recv with --resume".into(),
        );
    }
    if !matches!(hello.guest_kind, GuestKind::File | GuestKind::Kvm) {
        return Some(format!(
            "post-copy of {:?} guests is not built (process and KVM guests only)",
            hello.guest_kind
        ));
    }
    let dir = image.and_then(|p| p.parent())?;
    match nix::sys::statfs::statfs(dir) {
        Ok(fs) if fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC => None,
        Ok(_) => Some(format!(
            "post-copy places pages with userfaultfd, which serves shared memory only: put \
             --memory-file on tmpfs (e.g. /dev/shm), not in {}",
            dir.display()
        )),
        Err(e) => Some(format!("statfs {}: {e}", dir.display())),
    }
}

/// Pages of the last pre-copy state, the owed list, the guest: what post-copy starts from.
pub(super) struct PostcopyIncoming {
    pub(super) image: PendingImage,
    pub(super) hashes: Arc<PageHashes>,
    pub(super) guest: Box<dyn IncomingGuest>,
    /// The source opens a connection of its own for requested pages.
    pub(super) preempt: bool,
}

impl Dest<'_> {
    /// The switchover of a post-copy migration, then the post-copy phase itself.
    pub(super) fn postcopy(&mut self, incoming: PostcopyIncoming) -> Result<DestState, RecvError> {
        let PostcopyIncoming {
            mut image,
            hashes,
            mut guest,
            preempt,
        } = incoming;
        let state = match self.reader.read_frame()? {
            Frame::Control(Message::GuestState(s)) => s,
            other => return Err(unexpected("the guest state", other)),
        };
        let zero = [0u8; 32];
        self.accept_guest_state(&state, guest.as_mut(), &mut image, zero)?;
        self.stats.settings.source_tx_at_pause = Some(state.tx_count);
        let pages = self.stats.guest_bytes / PAGE_SIZE as u64;
        let (owed, start) = self.read_owed(pages)?;
        let t = Instant::now();
        punch_holes(&image, &owed)?;
        let placement = Placement::new(pages, &owed)
            .map_err(|p| RecvError::Protocol(format!("owed page {p} is beyond the guest")))?;
        let committed = image.commit();
        self.stats.switchover_ms.commit = Some(t.elapsed().as_secs_f64() * 1e3);
        let memory = match committed {
            Ok(m) => m,
            Err(e) => {
                let _ = self.send(&Message::CommitReply(CommitReply {
                    status: CommitStatus::Failed,
                    digest: zero,
                    reason: e.to_string(),
                }));
                return Err(e.into());
            }
        };
        self.stats.outcome = MigrationOutcome::Committed;
        // The digest is known only once the last page landed (`PostcopyComplete`).
        self.send(&Message::CommitReply(CommitReply {
            status: CommitStatus::Committed,
            digest: zero,
            reason: String::new(),
        }))?;
        self.await_handover()?;
        let file = memory.file().try_clone().map_err(RecvError::Socket)?;
        let target = memory.path().to_path_buf();
        let launch = guest.postcopy_launch(memory, self.cfg.run_for)?;
        let phase = serve::Phase {
            placement,
            uffd: Arc::clone(&launch.faults),
            hashes,
            paused_at_ns: start.paused_at_unix_ns,
            owed: owed.len() as u64,
            migration_id: start.migration_id,
            admissions: self.channels.take_admissions(),
            preempt,
        };
        self.serve_postcopy(phase, launch.start, file, &target)
    }

    /// Reads the owed list (`PostcopyOwed` messages up to `PostcopyStart`), each page
    /// below `pages`.
    fn read_owed(&mut self, pages: u64) -> Result<(Vec<u64>, PostcopyStart), RecvError> {
        let mut owed: Vec<u64> = Vec::new();
        loop {
            match self.reader.read_frame()? {
                Frame::Control(Message::PostcopyOwed(PostcopyOwed { pages: part })) => {
                    if let Some(&p) = part.iter().find(|&&p| p >= pages) {
                        return Err(RecvError::Protocol(format!(
                            "owed page {p} is beyond the guest's {pages} pages"
                        )));
                    }
                    if owed.len() + part.len() > pages as usize {
                        return Err(RecvError::Protocol(
                            "more owed pages than the guest has".into(),
                        ));
                    }
                    owed.extend(part);
                }
                Frame::Control(Message::PostcopyStart(start)) => {
                    if start.owed != owed.len() as u64 {
                        return Err(RecvError::Protocol(format!(
                            "post-copy start announces {} owed pages, {} were listed",
                            start.owed,
                            owed.len()
                        )));
                    }
                    return Ok((owed, start));
                }
                other => return Err(unexpected("the owed pages", other)),
            }
        }
    }
}

/// Makes the owed pages holes in the image, so that the guest's first touch of one faults
/// (the rounds may have written an older copy of it).
fn punch_holes(image: &PendingImage, owed: &[u64]) -> Result<(), RecvError> {
    let file = image
        .file()?
        .ok_or_else(|| RecvError::Protocol("post-copy needs an image on tmpfs".into()))?;
    let mut i = 0;
    while i < owed.len() {
        let mut j = i + 1;
        while j < owed.len() && owed[j] == owed[j - 1] + 1 {
            j += 1;
        }
        let (at, len) = (
            owed[i] * PAGE_SIZE as u64,
            (j - i) as u64 * PAGE_SIZE as u64,
        );
        fallocate(
            file.as_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            at as i64,
            len as i64,
        )
        .map_err(|e| {
            RecvError::Socket(std::io::Error::other(format!(
                "punching the owed pages out of the image: {e}"
            )))
        })?;
        i = j;
    }
    Ok(())
}
