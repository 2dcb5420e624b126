//! The destination's side of a post-copy link that dropped: the guest stays blocked on the
//! faults of pages only the source has (holes are still zero-filled), and the listener
//! waits, up to `--io-timeout`, for the source to reconnect and name the migration
//! (`PostcopyReconnect`); the destination then tells it the pages it still lacks and asks
//! again for those the guest waits on.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use crate::migration::connect::admission::Opening;
use crate::migration::connect::auth::Admission;
use crate::migration::dest::machine::Dest;
use crate::migration::error::RecvError;
use crate::migration::transport::Frame;
use crate::migration::wire::{
    Message, PageRequest, PostcopyOwed, PostcopyReconnect, PostcopyStart,
};
use crate::telemetry::stats::unix_ns;

use super::serve::{spawn_frame_reader, Event, Phase, Progress};

impl Dest<'_> {
    /// The link dropped (`why`): serves the guest's faults on holes while it waits for
    /// the source's reconnection, then resumes the exchange on the new connection.
    pub(super) fn await_reconnect(
        &mut self,
        phase: &mut Phase,
        progress: &mut Progress,
        rx: &mpsc::Receiver<Event>,
        why: &str,
    ) -> Result<(), RecvError> {
        let wait = self.cfg.io_timeout;
        self.cfg.notices.warning(format!(
            "post-copy: the link to the source dropped ({why}); the guest waits on its faults; \
             waiting up to {wait:?} for the source to reconnect"
        ));
        progress.offline = true;
        if let Some(old) = progress.frames.take() {
            let _ = old.join();
        }
        let deadline = Instant::now() + wait;
        let mut preempted = Vec::new();
        loop {
            while let Ok(event) = rx.try_recv() {
                match event {
                    Event::Faults(list) => {
                        let pages = phase.uffd.pages();
                        for page in list.into_iter().filter(|&p| p < pages) {
                            self.on_fault(phase, progress, page)?;
                        }
                    }
                    Event::Guest(Ok(guest)) => {
                        let tx0 = guest.tx_at_resume();
                        progress.resumed_at_ns = unix_ns(SystemTime::now());
                        progress.resumed = Some((guest, Instant::now(), tx0));
                    }
                    Event::Guest(Err(e)) => {
                        return Err(RecvError::PostcopyLost(format!(
                            "the guest could not resume here: {e}"
                        )))
                    }
                    // The old connection's last words.
                    Event::Frame(_) => progress.credit.release(),
                    // The requested pages' connection may outlive the link: its pages
                    // are placed once the exchange resumes.
                    Event::Preempt(frame) => preempted.push(frame),
                }
            }
            let admissions = phase.admissions.as_mut().expect("reconnectable");
            match admissions.next(Duration::from_millis(50)) {
                Ok(Some(opening)) => match self.take_reconnection(phase, opening) {
                    Ok(()) => break,
                    Err(reason) => self.cfg.notices.info(format!(
                        "post-copy: refused a connection while waiting for the source: {reason}"
                    )),
                },
                Ok(None) if Instant::now() >= deadline => {
                    return Err(RecvError::PostcopyLost(format!(
                        "the link to the source dropped ({why}) and it did not reconnect within \
                         {wait:?}"
                    )))
                }
                Ok(None) => {}
                Err(e) => return Err(RecvError::PostcopyLost(format!("listening: {e}"))),
            }
        }
        progress.offline = false;
        progress.reconnects += 1;
        let tx = progress.events.clone().expect("events while serving");
        for frame in preempted {
            let _ = tx.send(Event::Preempt(frame));
        }
        let reader = self
            .reader
            .hand_off(Some(self.cfg.io_timeout))
            .map_err(RecvError::Socket)?;
        progress.frames = Some(spawn_frame_reader(
            reader,
            tx,
            Arc::clone(&progress.credit),
        )?);
        let still = phase.placement.still_owed();
        for part in still.chunks(PostcopyOwed::MAX_PAGES) {
            self.send(&Message::PostcopyOwed(PostcopyOwed {
                pages: part.to_vec(),
            }))?;
        }
        self.send(&Message::PostcopyStart(PostcopyStart {
            owed: still.len() as u64,
            paused_at_unix_ns: phase.paused_at_ns,
            migration_id: phase.migration_id,
        }))?;
        for page in phase.placement.requested() {
            self.send(&Message::PageRequest(PageRequest { page }))?;
        }
        if let Some((guest, _, tx0)) = &progress.resumed {
            let (tx0, running) = (*tx0, guest.is_running());
            self.report_resumed(phase.paused_at_ns, progress.resumed_at_ns, running, tx0);
        }
        self.cfg.notices.warning(format!(
            "post-copy: the source reconnected; {} page(s) still owed",
            still.len()
        ));
        Ok(())
    }

    /// Takes `opening` as the source's reconnection if it names this migration.
    fn take_reconnection(&mut self, phase: &Phase, opening: Opening) -> Result<(), String> {
        match opening.admission {
            Admission::Frame(Ok(Frame::Control(Message::PostcopyReconnect(
                PostcopyReconnect { migration_id, .. },
            )))) if migration_id == phase.migration_id => {
                self.reader = opening.reader;
                self.writer = opening.writer;
                Ok(())
            }
            Admission::Frame(Ok(Frame::Control(m))) => Err(format!(
                "a {} from {} (not this migration's reconnection)",
                m.frame_type().name(),
                opening.peer
            )),
            Admission::Frame(Ok(Frame::Packet(_))) => {
                Err(format!("a packet from {}", opening.peer))
            }
            Admission::Frame(Err(e)) => Err(format!("{}: {e}", opening.peer)),
            Admission::Refuse(reason) => Err(format!("{}: {reason}", opening.peer)),
        }
    }
}
