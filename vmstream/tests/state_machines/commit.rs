//! The edges after the pause: a source that dies once the destination committed, and a
//! commit reply that is lost, late or corrupted. Whatever happens, the guest never runs
//! on both sides.

use std::time::Duration;

use vmstream::migration::error::{GuestStateError, RecvError, SendError};
use vmstream::migration::fault::{is_dropped, StreamFault};
use vmstream::migration::source::Outcome;
use vmstream::migration::transport::TransportError;
use vmstream::migration::wire::CommitStatus;
use vmstream::telemetry::stats::MigrationOutcome;

use crate::harness::*;

/// A source that dies right after the commit reply: the destination keeps its committed
/// image but, without the `Handover`, runs no guest; the source guest is left paused, not
/// ended (as a killed sender leaves it).
#[test]
fn a_source_crash_after_the_commit_leaves_the_destination_copy_stopped() {
    let _g = serial();
    let dir = Dir::new("crash");
    let (mut guest, spec) = Guest::file(&dir);
    let mut send = send_config(spec);
    send.faults.crash_after_commit = true;
    let mut recv = recv_config(&dir);
    recv.resume = true;
    recv.run_for = Some(Duration::from_millis(500));
    let run = run(send, recv, &mut guest);
    assert_eq!(run.sent.unwrap(), Outcome::CrashedAfterCommit);
    assert!(
        matches!(run.received, Err(RecvError::NoHandover(_))),
        "{:?}",
        run.received
    );
    assert_committed(&dir, &run.recv_stats);
    assert!(guest.0.is_paused());
    guest
        .0
        .check_alive()
        .expect("the paused guest was not ended");
    vmstream::guest::file::verify::verify_file(&dir.path("dst.img")).expect("verifies");
}

/// The commit reply lost (the destination's connection drops after its commit): the
/// source cannot know, resumes its guest and fails; the destination keeps its image but
/// runs no guest (there is no `Handover`), so the guest never runs twice.
#[test]
fn a_lost_commit_reply_leaves_one_running_copy() {
    let _g = serial();
    let dir = Dir::new("reply-dropped");
    let (mut guest, spec) = Guest::file(&dir);
    let mut recv = recv_config(&dir);
    recv.resume = true;
    recv.faults.commit_reply = Some(StreamFault::Drop);
    let run = run(send_config(spec), recv, &mut guest);
    assert!(
        matches!(&run.received, Err(RecvError::Transport(TransportError::Io(e))) if is_dropped(e)),
        "{:?}",
        run.received
    );
    assert!(
        matches!(run.sent, Err(SendError::Transport(TransportError::Closed))),
        "{:?}",
        run.sent
    );
    assert_committed(&dir, &run.recv_stats);
    guest.assert_runs();
}

/// A commit reply later than the source's I/O timeout: the source times out and resumes
/// its guest; the destination, told by the source's `Abort` instead of a `Handover`, keeps
/// its image stopped.
#[test]
fn a_late_commit_reply_leaves_the_destination_copy_stopped() {
    let _g = serial();
    let dir = Dir::new("reply-late");
    let (mut guest, spec) = Guest::file(&dir);
    let mut send = send_config(spec);
    send.io_timeout = Duration::from_secs(1);
    // The I/O timeout is what fires here; the pause bound, by default at most the I/O
    // timeout and started earlier, has its own test below.
    send.pause_timeout = Some(Duration::from_secs(30));
    let mut recv = recv_config(&dir);
    recv.resume = true;
    recv.faults.commit_reply = Some(StreamFault::Stall(Duration::from_millis(2500)));
    let run = run(send, recv, &mut guest);
    assert!(
        matches!(
            run.sent,
            Err(SendError::Transport(TransportError::Timeout(_)))
        ),
        "{:?}",
        run.sent
    );
    assert!(
        matches!(&run.received, Err(RecvError::NoHandover(why)) if why.contains("SourceError")),
        "{:?}",
        run.received
    );
    assert_committed(&dir, &run.recv_stats);
    guest.assert_runs();
}

/// A commit reply that comes in time for the I/O timeout but not for the pause bound: the
/// source resumes its guest at the bound with the typed error and tells the destination,
/// which keeps its image stopped (no `Handover`).
#[test]
fn a_commit_reply_later_than_the_pause_bound_resumes_the_source_guest() {
    let _g = serial();
    let dir = Dir::new("reply-past-pause");
    let (mut guest, spec) = Guest::file(&dir);
    let mut send = send_config(spec);
    send.pause_timeout = Some(Duration::from_secs(1));
    let mut recv = recv_config(&dir);
    recv.resume = true;
    recv.faults.commit_reply = Some(StreamFault::Stall(Duration::from_millis(3000)));
    let run = run(send, recv, &mut guest);
    assert!(
        matches!(run.sent, Err(SendError::PauseTimeout(t)) if t == Duration::from_secs(1)),
        "{:?}",
        run.sent
    );
    assert!(
        matches!(&run.received, Err(RecvError::NoHandover(why)) if why.contains("--pause-timeout")),
        "{:?}",
        run.received
    );
    assert_committed(&dir, &run.recv_stats);
    guest.assert_runs();
}

/// A corrupted commit reply: the source refuses the frame and resumes its guest; the
/// destination's copy stays stopped.
#[test]
fn a_corrupted_commit_reply_leaves_the_destination_copy_stopped() {
    let _g = serial();
    let dir = Dir::new("reply-corrupt");
    let (mut guest, spec) = Guest::file(&dir);
    let mut recv = recv_config(&dir);
    recv.resume = true;
    recv.faults.commit_reply = Some(StreamFault::Corrupt);
    let run = run(send_config(spec), recv, &mut guest);
    assert!(
        matches!(run.sent, Err(SendError::Transport(TransportError::Wire(_)))),
        "{:?}",
        run.sent
    );
    assert!(
        matches!(run.received, Err(RecvError::NoHandover(_))),
        "{:?}",
        run.received
    );
    assert_committed(&dir, &run.recv_stats);
    guest.assert_runs();
}

/// A source that sends a state blob for a file-backed guest (whose state `PROTOCOL.md`
/// says is empty): the destination refuses it before the commit (`StateRejected`, a typed
/// error), nothing is committed, and the source resumes its guest.
#[test]
fn a_state_blob_for_a_file_guest_is_refused_before_the_commit() {
    let _g = serial();
    let dir = Dir::new("file-state");
    let (mut guest, spec) = Guest::file(&dir);
    let mut send = send_config(spec);
    send.faults.pad_guest_state = vec![0x42; 16];
    let run = run(send, recv_config(&dir), &mut guest);
    assert!(
        matches!(
            run.received,
            Err(RecvError::GuestState(GuestStateError::UnexpectedBlob {
                len: 16
            }))
        ),
        "{:?}",
        run.received
    );
    assert!(
        matches!(
            &run.sent,
            Err(SendError::CommitRefused {
                status: CommitStatus::StateRejected,
                reason,
                ..
            }) if reason.contains("state is empty")
        ),
        "{:?}",
        run.sent
    );
    assert_ne!(run.recv_stats.outcome, MigrationOutcome::Committed);
    guest.assert_runs();
    assert_nothing_committed(&dir);
}
