//! The source's and destination's states up to the pause and their failure edges: the
//! handshake refused, a frame corrupted, the link dropped or stalled, a cancel on either
//! side, a guest that dies; and the way through to a committed, resumed guest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmstream::guest::file::source::GuestControlError;
use vmstream::migration::config::SendConfig;
use vmstream::migration::dest::{listen, receive_on};
use vmstream::migration::error::{RecvError, SendError};
use vmstream::migration::fault::{is_dropped, StreamFault};
use vmstream::migration::source::{migrate, Outcome};
use vmstream::migration::transport::TransportError;
use vmstream::migration::wire::{AbortCode, RefuseCode};
use vmstream::telemetry::stats::MigrationStats;
use vmstream_codec::{CodecError, PacketErrorKind};

use crate::harness::*;

/// Handshake, rounds, switchover, commit, handover: the image committed is the source's
/// memory at the pause byte for byte, both sides computed the same digest, and the source
/// ended its guest.
#[test]
fn a_migration_commits_the_paused_memory_and_ends_the_source_guest() {
    let _g = serial();
    let dir = Dir::new("success");
    let (mut guest, spec) = Guest::file(&dir);
    let run = run(send_config(spec), recv_config(&dir), &mut guest);
    assert_eq!(run.sent.unwrap(), Outcome::Committed);
    let received = run.received.expect("the destination committed");
    assert!(received.guest.is_none() && received.kvm.is_none());
    assert!(run.send_stats.digest.is_some());
    assert_eq!(run.send_stats.digest, run.recv_stats.digest);
    assert!(!run.send_stats.per_round.is_empty());
    assert_committed(&dir, &run.recv_stats);
    guest.assert_ended();
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    assert!(std::fs::read(src).unwrap() == std::fs::read(dst).unwrap());
}

/// With a resuming destination the `Handover` lets it run the guest: it reports `Resumed`,
/// and the guest it started runs on and verifies.
#[test]
fn a_handover_resumes_the_guest_on_the_destination() {
    let _g = serial();
    let dir = Dir::new("resume");
    let (mut guest, spec) = Guest::file(&dir);
    let mut recv = recv_config(&dir);
    recv.resume = true;
    recv.run_for = Some(Duration::from_millis(500));
    let run = run(send_config(spec), recv, &mut guest);
    assert_eq!(run.sent.unwrap(), Outcome::Committed);
    let resumed = run.received.unwrap().guest.expect("a resumed guest");
    let tx_end = resumed.join().expect("the resumed guest ran");
    assert!(tx_end > resumed_from(&run.recv_stats), "{tx_end}");
    assert!(run.send_stats.downtime_ms.is_some());
    assert_committed(&dir, &run.recv_stats);
    guest.assert_ended();
    vmstream::guest::file::verify::verify_file(&dir.path("dst.img")).expect("verifies");
}

/// The transaction count the source reported at its pause.
fn resumed_from(stats: &MigrationStats) -> u64 {
    stats
        .settings
        .source_tx_at_pause
        .expect("recorded at the pause")
}

/// A destination that expects another size refuses the hello: both sides say so with the
/// same code, nothing is created, the guest runs on.
#[test]
fn a_refused_handshake_leaves_everything_as_it_was() {
    let _g = serial();
    let dir = Dir::new("refused");
    let (mut guest, spec) = Guest::file(&dir);
    let mut recv = recv_config(&dir);
    recv.expect_size = Some(2 * SIZE);
    let run = run(send_config(spec), recv, &mut guest);
    assert!(
        matches!(
            run.sent,
            Err(SendError::Refused {
                code: RefuseCode::GuestSize,
                ..
            })
        ),
        "{:?}",
        run.sent
    );
    assert!(matches!(
        run.received,
        Err(RecvError::Refused {
            code: RefuseCode::GuestSize,
            ..
        })
    ));
    assert!(run.send_stats.per_round.is_empty());
    guest.assert_runs();
    assert_nothing_committed(&dir);
}

/// A byte flipped in round 0: the destination names the checksum that caught it (the
/// packet's crc32c, or the frame header's should it land in one), tells the source, and
/// removes its temporary image; the source guest runs on.
#[test]
fn a_corrupted_frame_mid_round_is_refused_and_rolled_back() {
    let _g = serial();
    let dir = Dir::new("corrupt");
    let (mut guest, spec) = Guest::file(&dir);
    let mut send = send_config(spec);
    send.faults.link = link_fault(MID_ROUND_0, StreamFault::Corrupt);
    let run = run(send, recv_config(&dir), &mut guest);
    match &run.received {
        Err(RecvError::Codec(CodecError::Packet(p))) => {
            assert!(matches!(p.kind, PacketErrorKind::Checksum { .. }), "{p}")
        }
        Err(RecvError::Transport(TransportError::Wire(w))) => {
            assert!(w.to_string().contains("checksum"), "{w}")
        }
        other => panic!("{other:?}"),
    }
    match &run.sent {
        Err(SendError::PeerAborted { code, reason }) => {
            assert!(matches!(
                code,
                AbortCode::DestinationError | AbortCode::Protocol
            ));
            assert!(
                reason.contains("crc32c") || reason.contains("checksum"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    guest.assert_runs();
    assert_nothing_committed(&dir);
}

/// The connection dropped in round 0: the source fails with the drop, the destination
/// with the stream cut inside a frame (or at its end); nothing is committed.
#[test]
fn a_dropped_connection_mid_round_fails_both_sides() {
    let _g = serial();
    let dir = Dir::new("drop");
    let (mut guest, spec) = Guest::file(&dir);
    let mut send = send_config(spec);
    send.faults.link = link_fault(MID_ROUND_0, StreamFault::Drop);
    let run = run(send, recv_config(&dir), &mut guest);
    assert!(
        matches!(&run.sent, Err(SendError::Transport(TransportError::Io(e))) if is_dropped(e)),
        "{:?}",
        run.sent
    );
    assert!(
        matches!(
            run.received,
            Err(RecvError::Transport(
                TransportError::Truncated { .. } | TransportError::Closed
            ))
        ),
        "{:?}",
        run.received
    );
    assert_eq!(run.recv_stats.bytes_on_wire, MID_ROUND_0);
    guest.assert_runs();
    assert_nothing_committed(&dir);
}

/// A link that stalls for longer than the destination's I/O timeout: the destination gives
/// up with a timeout and tells the source; nothing is committed.
#[test]
fn a_link_stalled_beyond_the_io_timeout_fails_both_sides() {
    let _g = serial();
    let dir = Dir::new("stall");
    let (mut guest, spec) = Guest::file(&dir);
    let mut send = send_config(spec);
    send.faults.link = link_fault(MID_ROUND_0, StreamFault::Stall(Duration::from_secs(3)));
    let mut recv = recv_config(&dir);
    recv.io_timeout = Duration::from_secs(1);
    let run = run(send, recv, &mut guest);
    assert!(
        matches!(
            run.received,
            Err(RecvError::Transport(TransportError::Timeout(t))) if t == Duration::from_secs(1)
        ),
        "{:?}",
        run.received
    );
    assert!(
        matches!(
            &run.sent,
            Err(SendError::PeerAborted {
                code: AbortCode::Protocol,
                reason,
            }) if reason.contains("no data from peer within 1s")
        ),
        "{:?}",
        run.sent
    );
    guest.assert_runs();
    assert_nothing_committed(&dir);
}

/// A stall shorter than the I/O timeout is only a slow link: the migration commits.
#[test]
fn a_stall_within_the_io_timeout_is_ridden_out() {
    let _g = serial();
    let dir = Dir::new("short-stall");
    let (mut guest, spec) = Guest::file(&dir);
    let mut send = send_config(spec);
    let stall = Duration::from_millis(1500);
    send.faults.link = link_fault(MID_ROUND_0, StreamFault::Stall(stall));
    let mut recv = recv_config(&dir);
    recv.io_timeout = Duration::from_secs(3);
    let run = run(send, recv, &mut guest);
    assert_eq!(run.sent.unwrap(), Outcome::Committed);
    run.received.as_ref().expect("committed");
    assert!(run.send_stats.per_round[0].duration_ms >= stall.as_secs_f64() * 1e3);
    assert_committed(&dir, &run.recv_stats);
    guest.assert_ended();
}

/// Cancelled before it starts: the source never connects, its guest runs on, and the
/// destination (interrupted in turn) received nothing.
#[test]
fn a_cancel_before_the_rounds_sends_nothing() {
    let _g = serial();
    let dir = Dir::new("cancel-before");
    let (mut guest, spec) = Guest::file(&dir);
    let mut send = send_config(spec);
    send.cancel = Some(Arc::new(AtomicBool::new(true)));
    let mut recv = recv_config(&dir);
    let stop = Arc::new(AtomicBool::new(false));
    recv.cancel = Some(stop.clone());
    let listening = listen(&recv).unwrap();
    send.to = listening.local_addr().to_string();
    let dest = std::thread::spawn(move || receive_on(&recv, listening));
    let sent = migrate(&send, guest.0.as_mut());
    let (sent, stats) = (sent.result, sent.stats);
    assert!(
        matches!(&sent, Ok(Outcome::Cancelled(r)) if r.contains("on request")),
        "{sent:?}"
    );
    assert_eq!(stats.bytes_on_wire, 0);
    stop.store(true, Ordering::Relaxed);
    let received = dest.join().unwrap();
    let (received, recv_stats) = (received.result, received.stats);
    assert!(matches!(received, Err(RecvError::Interrupted)));
    assert_eq!(recv_stats.bytes_on_wire, 0);
    guest.assert_runs();
    assert_nothing_committed(&dir);
}

/// Migrates a `size` guest with the settings `shape` makes and cancels it `after` this
/// long: the source tells the destination, which rolls back, and its guest runs on.
/// Returns the rounds the source finished.
fn cancel_after(
    name: &str,
    size: u64,
    after: Duration,
    shape: impl FnOnce(&mut SendConfig),
) -> usize {
    let dir = Dir::new(name);
    let (mut guest, spec) = Guest::file_of(&dir, size);
    let mut send = send_config(spec);
    shape(&mut send);
    let cancel = Arc::new(AtomicBool::new(false));
    send.cancel = Some(cancel.clone());
    set_after(&cancel, after);
    let run = run(send, recv_config(&dir), &mut guest);
    assert!(
        matches!(&run.sent, Ok(Outcome::Cancelled(r)) if r.contains("on request")),
        "{:?}",
        run.sent
    );
    assert!(
        matches!(
            run.received,
            Err(RecvError::PeerAborted {
                code: AbortCode::Cancelled,
                ..
            })
        ),
        "{:?}",
        run.received
    );
    guest.assert_runs();
    assert_nothing_committed(&dir);
    run.send_stats.per_round.len()
}

/// Cancelled while round 0's pages are still being queued (64 MiB at 16 MB/s, cancelled
/// after a second, when far more is left than the link's queues and socket buffers hold):
/// the round stops between pages.
#[test]
fn a_cancel_while_pages_are_queued_rolls_back() {
    let _g = serial();
    let rounds = cancel_after("cancel-pages", 64 << 20, Duration::from_secs(1), |s| {
        s.max_bandwidth = Some(16 << 20)
    });
    assert_eq!(rounds, 0);
}

/// Cancelled while round 0's acknowledgement is awaited (the link stalls for 4 s near the
/// end of round 0, when all its pages are queued): the source stops once the round ended,
/// before the next.
#[test]
fn a_cancel_between_rounds_rolls_back() {
    let _g = serial();
    let stall = StreamFault::Stall(Duration::from_secs(4));
    let rounds = cancel_after("cancel-ack", SIZE, Duration::from_millis(1500), |s| {
        s.faults.link = link_fault(SIZE / 8 * 7, stall)
    });
    assert_eq!(rounds, 1);
}

/// The destination gives up in round 0 (its cancel, as SIGINT sets it): it aborts, the
/// source fails with its reason, and nothing is committed.
#[test]
fn an_abort_from_the_destination_fails_the_source() {
    let _g = serial();
    let dir = Dir::new("dest-abort");
    let (mut guest, spec) = Guest::file(&dir);
    let mut recv = recv_config(&dir);
    let stop = Arc::new(AtomicBool::new(false));
    recv.cancel = Some(stop.clone());
    set_after(&stop, Duration::from_millis(700));
    let run = run(slow_send_config(spec, 4 << 20), recv, &mut guest);
    assert!(matches!(run.received, Err(RecvError::Interrupted)));
    assert!(
        matches!(
            &run.sent,
            Err(SendError::PeerAborted {
                code: AbortCode::DestinationError,
                reason,
            }) if reason.contains("interrupted")
        ),
        "{:?}",
        run.sent
    );
    guest.assert_runs();
    assert_nothing_committed(&dir);
}

/// The guest process killed in round 0: the source fails with its exit, tells the
/// destination, and nothing is committed.
#[test]
fn a_guest_that_dies_mid_round_fails_the_migration() {
    let _g = serial();
    let dir = Dir::new("guest-killed");
    let (mut guest, spec) = Guest::file(&dir);
    let pid: i32 = guest.0.describe()["guest pid=".len()..]
        .split(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the guest's pid");
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    let run = run(
        slow_send_config(spec, 4 << 20),
        recv_config(&dir),
        &mut guest,
    );
    assert!(
        matches!(
            run.sent,
            Err(SendError::Guest(GuestControlError::Exited { pid: p, .. })) if p as i32 == pid
        ),
        "{:?}",
        run.sent
    );
    assert!(
        matches!(
            run.received,
            Err(RecvError::PeerAborted {
                code: AbortCode::SourceError,
                ..
            })
        ),
        "{:?}",
        run.received
    );
    assert_nothing_committed(&dir);
}
