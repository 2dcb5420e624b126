//! A KVM guest (run in this process) through the same state machines: committed, and its
//! state blob refused when damaged. Skipped, saying why, without a usable /dev/kvm.

use vmstream::guest::kvm::StateError;
use vmstream::migration::error::{GuestStateError, RecvError, SendError};
use vmstream::migration::source::Outcome;
use vmstream::migration::wire::CommitStatus;

use crate::harness::*;

/// A KVM guest migrates in this process: committed, the same digest on both sides.
#[test]
fn a_kvm_guest_migrates_in_process() {
    let _g = serial();
    let dir = Dir::new("kvm");
    let Some((mut guest, spec)) = Guest::kvm(&dir) else {
        return;
    };
    let run = run(send_config(spec), recv_config(&dir), &mut guest);
    assert_eq!(run.sent.unwrap(), Outcome::Committed);
    run.received.as_ref().expect("committed");
    assert_eq!(run.send_stats.digest, run.recv_stats.digest);
    assert_committed(&dir, &run.recv_stats);
    assert!(
        std::fs::read(dir.path("src.img")).unwrap() == std::fs::read(dir.path("dst.img")).unwrap()
    );
}

/// A KVM guest whose state blob is damaged after the pause: the destination refuses it
/// before committing (`StateRejected`), and the source resumes its guest.
#[test]
fn a_corrupted_kvm_state_is_refused_before_the_commit() {
    let _g = serial();
    let dir = Dir::new("kvm-state");
    let Some((mut guest, spec)) = Guest::kvm(&dir) else {
        return;
    };
    let mut send = send_config(spec);
    send.faults.corrupt_guest_state_at = Some(200);
    let run = run(send, recv_config(&dir), &mut guest);
    assert!(
        matches!(
            run.received,
            Err(RecvError::GuestState(GuestStateError::Invalid(
                StateError::ChecksumMismatch { .. }
            )))
        ),
        "{:?}",
        run.received
    );
    assert!(
        matches!(
            run.sent,
            Err(SendError::CommitRefused {
                status: CommitStatus::StateRejected,
                ..
            })
        ),
        "{:?}",
        run.sent
    );
    guest.assert_runs();
    assert_nothing_committed(&dir);
}
