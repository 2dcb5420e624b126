//! The source's side of a post-copy link: the thread that reads the destination's frames
//! ([`Inbound`]), and the reconnection after the link dropped ([`reconnect`]): connect again
//! with backoff until `--postcopy-recover-timeout`, name the migration
//! (`PostcopyReconnect`), and learn from the destination which pages it still lacks.

use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::migration::config::SendConfig;
use crate::migration::connect::channels::SourceChannels;
use crate::migration::error::SendError;
use crate::migration::source::round::unexpected;
use crate::migration::transport::{Frame, FrameReader, Socket, TransportError};
use crate::migration::wire::{Message, PostcopyOwed, PostcopyReconnect};

/// The destination's frames, read on a thread of their own.
pub(super) struct Inbound {
    pub(super) frames: Receiver<Result<Frame, TransportError>>,
    socket: Socket,
    thread: JoinHandle<FrameReader<Socket>>,
}

impl Inbound {
    /// Reads `reader`'s frames until one fails.
    pub(super) fn start(mut reader: FrameReader<Socket>) -> Result<Inbound, SendError> {
        let socket = reader.get_ref().try_clone().map_err(SendError::Socket)?;
        let (tx, frames) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vmstream-postcopy-rx".into())
            .spawn(move || loop {
                let frame = reader.read_frame();
                let end = frame.is_err();
                if tx.send(frame).is_err() || end {
                    return reader;
                }
            })
            .map_err(SendError::Socket)?;
        Ok(Inbound {
            frames,
            socket,
            thread,
        })
    }

    /// Cuts the connection (both directions), as a dropped link would: the test fault.
    pub(super) fn cut(&self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }

    /// Stops reading (the read side is shut down) and returns the reader.
    pub(super) fn stop(self) -> Option<FrameReader<Socket>> {
        let _ = self.socket.shutdown(std::net::Shutdown::Read);
        self.thread.join().ok()
    }
}

/// Reconnects channel 0 after the link dropped (`why`), with backoff until
/// `cfg.postcopy_recover_timeout`; returns the new inbound frames and the pages the
/// destination still lacks (ascending). `attempt`: reconnections before this one.
pub(super) fn reconnect(
    cfg: &SendConfig,
    channels: &mut SourceChannels,
    attempt: u64,
    why: &str,
) -> Result<(Inbound, Vec<u64>), SendError> {
    let deadline = Instant::now() + cfg.postcopy_recover_timeout;
    let mut wait = Duration::from_millis(100);
    cfg.notices.warning(format!(
        "post-copy: the link to the destination dropped ({why}); the guest there waits on its \
         faults; reconnecting for up to {:?}",
        cfg.postcopy_recover_timeout
    ));
    loop {
        match once(cfg, channels, attempt) {
            Ok(r) => {
                cfg.notices.warning(format!(
                    "post-copy: reconnected; {} page(s) still owed",
                    r.1.len()
                ));
                return Ok(r);
            }
            Err(e) if Instant::now() + wait < deadline => {
                cfg.notices.note(format!(
                    "post-copy: reconnecting failed ({e}); again in {wait:?}"
                ));
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                return Err(SendError::PostcopyLost(format!(
                "the link dropped ({why}) and no reconnection succeeded within {:?} (last: {e})",
                cfg.postcopy_recover_timeout
            )))
            }
        }
    }
}

fn once(
    cfg: &SendConfig,
    channels: &mut SourceChannels,
    attempt: u64,
) -> Result<(Inbound, Vec<u64>), SendError> {
    let mut reader = channels.reconnect_primary(cfg)?;
    let migration_id = channels.migration_id_bytes();
    channels.send_message(&Message::PostcopyReconnect(PostcopyReconnect {
        migration_id,
        attempt,
    }))?;
    let mut owed = Vec::new();
    loop {
        match reader.read_frame()? {
            Frame::Control(Message::PostcopyOwed(PostcopyOwed { pages })) => owed.extend(pages),
            Frame::Control(Message::PostcopyStart(s))
                if s.owed == owed.len() as u64 && s.migration_id == migration_id =>
            {
                return Ok((Inbound::start(reader)?, owed))
            }
            Frame::Control(Message::PostcopyStart(_)) => {
                return Err(SendError::Protocol(
                    "the destination's list of owed pages does not add up".into(),
                ))
            }
            other => return Err(unexpected("the owed pages", other)),
        }
    }
}
