//! Write-through mirroring on the destination (`FEATURE_MIRROR`, `STORAGE.md`,
//! *Mirroring*): a thread takes the mirror's connection from the listener, writes each
//! `MirrorWrite`'s pages into the disks' temporary images in the order they come (keeping
//! the digest's page hashes current), and acknowledges those that ask once they, and all
//! before them, are written.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::memory::PAGE_SIZE;
use crate::migration::connect::admission::{Admissions, Opening};
use crate::migration::connect::auth::Admission;
use crate::migration::digest::PageHashes;
use crate::migration::transport::{Frame, Socket};
use crate::migration::wire::{
    Message, MirrorAck, MirrorWrite, MIRROR_ACK, MIRROR_END, MIRROR_OPEN,
};

/// A disk the mirror writes: its temporary image, size, first page in the codec's
/// numbering (the page hashes').
pub(super) struct MirrorTarget {
    pub(super) file: File,
    pub(super) size: u64,
    pub(super) first_page: u64,
}

/// What the mirror applied.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct MirrorApplied {
    /// `MirrorWrite`s with pages.
    pub(super) writes: u64,
    /// Their pages' bytes.
    pub(super) bytes: u64,
}

/// The mirror's thread on the destination.
pub(super) struct MirrorReceiver {
    stop: Arc<AtomicBool>,
    /// The accepted connection, to cut it if the receive fails.
    socket: Arc<Mutex<Option<Socket>>>,
    thread: Option<JoinHandle<Result<MirrorApplied, String>>>,
}

impl MirrorReceiver {
    /// Waits on `admissions` for the connection that opens with `MirrorWrite{OPEN}` naming
    /// `migration_id`, then applies its writes to `targets` (see the module docs).
    pub(super) fn start(
        mut admissions: Admissions,
        migration_id: [u8; 16],
        targets: Vec<MirrorTarget>,
        hashes: Arc<PageHashes>,
    ) -> std::io::Result<MirrorReceiver> {
        let stop = Arc::new(AtomicBool::new(false));
        let socket = Arc::new(Mutex::new(None));
        let (stopped, shared) = (Arc::clone(&stop), Arc::clone(&socket));
        let thread = std::thread::Builder::new()
            .name("vmstream-mirror-rx".into())
            .spawn(move || {
                let opening = loop {
                    if stopped.load(SeqCst) {
                        return Ok(MirrorApplied::default());
                    }
                    let Some(o) = admissions
                        .next(Duration::from_millis(20))
                        .map_err(|e| format!("listening for the disk mirror: {e}"))?
                    else {
                        continue;
                    };
                    match &o.admission {
                        Admission::Frame(Ok(Frame::Control(Message::MirrorWrite(w))))
                            if w.flags & MIRROR_OPEN != 0 && w.data == migration_id =>
                        {
                            break o
                        }
                        _ => admissions.notices().info(format!(
                            "refused a connection from {} while waiting for the disk mirror",
                            o.peer
                        )),
                    }
                };
                if let Ok(s) = opening.reader.get_ref().try_clone() {
                    *shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
                }
                if stopped.load(SeqCst) {
                    return Ok(MirrorApplied::default());
                }
                apply(opening, &targets, &hashes)
            })?;
        Ok(MirrorReceiver {
            stop,
            socket,
            thread: Some(thread),
        })
    }

    /// The mirror ended (the source ends it before its final round): what it applied, or
    /// why it failed.
    pub(super) fn finish(mut self) -> Result<MirrorApplied, String> {
        self.stop.store(true, SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => Err("the disk mirror's thread panicked".into()),
        }
    }
}

impl Drop for MirrorReceiver {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(s) = self.socket.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Applies the mirror's writes until its end.
fn apply(
    opening: Opening,
    targets: &[MirrorTarget],
    hashes: &PageHashes,
) -> Result<MirrorApplied, String> {
    let (mut reader, mut writer) = (opening.reader, opening.writer);
    // The guest may write nothing for a long time: the connection idles meanwhile (a
    // failed receive cuts it).
    reader.set_timeout(None);
    let mut applied = MirrorApplied::default();
    let zero = vec![0u8; PAGE_SIZE];
    loop {
        let w: MirrorWrite = match reader.read_frame() {
            Ok(Frame::Control(Message::MirrorWrite(w))) => w,
            Ok(Frame::Control(Message::Abort(a))) => {
                return Err(format!("the source aborted the disk mirror: {}", a.reason))
            }
            Ok(_) => return Err("the disk mirror sent something else than a write".into()),
            Err(e) => return Err(format!("the disk mirror's connection: {e}")),
        };
        if w.flags & MIRROR_OPEN != 0 {
            return Err("the disk mirror opened twice".into());
        }
        let Some(t) = targets.get(w.disk as usize) else {
            return Err(format!(
                "the disk mirror wrote disk {}, there are {}",
                w.disk,
                targets.len()
            ));
        };
        let end = w.offset + w.pages as u64 * PAGE_SIZE as u64;
        if end > t.size {
            return Err(format!(
                "the disk mirror wrote disk {} up to {end}, past its {} bytes",
                w.disk, t.size
            ));
        }
        for (i, page) in w.each_page().enumerate() {
            let at = w.offset + (i * PAGE_SIZE) as u64;
            let content = page.unwrap_or(&zero);
            t.file
                .write_all_at(content, at)
                .map_err(|e| format!("writing the disk mirror's page at {at}: {e}"))?;
            hashes.update(t.first_page + at / PAGE_SIZE as u64, content);
        }
        if w.pages > 0 {
            applied.writes += 1;
            applied.bytes += end - w.offset;
        }
        if w.flags & MIRROR_ACK != 0 {
            writer
                .write_message(&Message::MirrorAck(MirrorAck { seq: w.seq }))
                .map_err(|e| format!("acknowledging the disk mirror: {e}"))?;
        }
        if w.flags & MIRROR_END != 0 {
            return Ok(applied);
        }
    }
}
