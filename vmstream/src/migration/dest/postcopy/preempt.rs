//! Keeping faulted pages ahead of the background stream on the destination: the requested
//! pages' own connection (`FEATURE_POSTCOPY_PREEMPT`), taken from the listener while the
//! guest already runs ([`accept_preempt`]), and the bound on how many of channel 0's frames
//! wait for the placing loop ([`StreamCredit`]), so that a fault and a requested page wait
//! behind a few streamed pages, not behind all that the socket delivered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::migration::connect::admission::Admissions;
use crate::migration::connect::auth::Admission;
use crate::migration::transport::{Frame, TransportError};
use crate::migration::wire::{Message, PostcopyPreempt, WireError};
use crate::telemetry::notice::Notices;

use super::serve::Event;

/// Channel 0 frames the reader may have handed over and the placing loop not yet taken.
pub(super) const STREAM_FRAMES_AHEAD: usize = 8;

/// How many of channel 0's frames are on their way to the placing loop; the reader waits
/// while [`STREAM_FRAMES_AHEAD`] are (the rest stays in the socket).
#[derive(Debug, Default)]
pub(super) struct StreamCredit {
    /// (frames handed over and not taken, closed)
    state: Mutex<(usize, bool)>,
    cond: Condvar,
}

impl StreamCredit {
    /// The reader: waits until one more frame may be handed over.
    pub(super) fn acquire(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.0 >= STREAM_FRAMES_AHEAD && !s.1 {
            s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.0 += 1;
    }

    /// The placing loop took a frame.
    pub(super) fn release(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = s.0.saturating_sub(1);
        self.cond.notify_all();
    }

    /// The placing loop takes no more frames: the reader no longer waits.
    pub(super) fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.cond.notify_all();
    }
}

/// The thread that waits for the requested pages' connection; it hands the listener back
/// when it ends.
pub(super) struct PreemptAccept {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Admissions>,
}

impl PreemptAccept {
    /// Stops waiting (if it still does) and returns the listener.
    pub(super) fn finish(self) -> Option<Admissions> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().ok()
    }
}

/// Waits, up to `wait`, for the source's connection that names `migration_id` in a
/// `PostcopyPreempt`, and reads its frames into `tx` (as [`Event::Preempt`]) until it ends.
/// Other connections are refused and reported.
pub(super) fn accept_preempt(
    mut admissions: Admissions,
    migration_id: [u8; 16],
    wait: Duration,
    tx: mpsc::Sender<Event>,
    notices: Notices,
) -> std::io::Result<PreemptAccept> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("vmstream-preempt-accept".into())
        .spawn(move || {
            let deadline = Instant::now() + wait;
            while !stopped.load(Ordering::Relaxed) {
                let opening = match admissions.next(Duration::from_millis(20)) {
                    Ok(Some(o)) => o,
                    Ok(None) if Instant::now() < deadline => continue,
                    Ok(None) => {
                        notices.warning(format!(
                            "post-copy: the source's connection for requested pages did not \
                             come within {wait:?}; they come on the stream's"
                        ));
                        break;
                    }
                    Err(e) => {
                        notices.warning(format!("post-copy: listening: {e}"));
                        break;
                    }
                };
                match opening.admission {
                    Admission::Frame(Ok(Frame::Control(Message::PostcopyPreempt(
                        PostcopyPreempt { migration_id: id },
                    )))) if id == migration_id => {
                        let (mut reader, writer) = (opening.reader, opening.writer);
                        let tx = tx.clone();
                        let started = std::thread::Builder::new()
                            .name("vmstream-preempt-rx".into())
                            .spawn(move || {
                                let _writer = writer;
                                loop {
                                    let frame = reader.read_frame();
                                    // A refused page's frame does not end it.
                                    let end = !matches!(
                                        &frame,
                                        Ok(_)
                                            | Err(TransportError::Wire(
                                                WireError::BodyChecksum { .. }
                                            ))
                                    );
                                    if tx.send(Event::Preempt(frame)).is_err() || end {
                                        return;
                                    }
                                }
                            });
                        if let Err(e) = started {
                            notices.warning(format!("post-copy: reading requested pages: {e}"));
                        }
                        break;
                    }
                    _ => notices.info(format!(
                        "post-copy: refused a connection from {} while waiting for the \
                         source's connection for requested pages",
                        opening.peer
                    )),
                }
            }
            admissions
        })?;
    Ok(PreemptAccept { stop, thread })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reader hands over at most `STREAM_FRAMES_AHEAD` frames the placing loop has not
    /// taken; each one taken lets one more through, and closing lets everything through.
    #[test]
    fn the_stream_reader_waits_while_frames_are_ahead() {
        let credit = Arc::new(StreamCredit::default());
        let (tx, rx) = mpsc::channel();
        let reader = {
            let credit = Arc::clone(&credit);
            std::thread::spawn(move || {
                for i in 0..STREAM_FRAMES_AHEAD + 3 {
                    credit.acquire();
                    tx.send(i).unwrap();
                }
            })
        };
        // `n` frames come through, and then no more (for a while).
        let ahead = |n: usize| {
            for _ in 0..n {
                rx.recv_timeout(Duration::from_secs(10)).expect("a frame");
            }
            std::thread::sleep(Duration::from_millis(50));
            assert!(rx.try_recv().is_err(), "more than {n} frames ahead");
        };
        ahead(STREAM_FRAMES_AHEAD);
        credit.release();
        ahead(1);
        credit.close();
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(10)).expect("a frame");
        }
        reader.join().unwrap();
    }
}
