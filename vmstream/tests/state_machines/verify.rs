//! Incremental verification (`--verify incremental|strict`): a write the dirty tracker
//! misses (injected through `SourceFaults::missed_write`: the page is written with
//! `pwrite(2)` and hidden from every later collection, so every tracker misses it) is
//! found by the scrubber before the commit when it passed the page after the write, and by
//! the post-commit audit otherwise; `strict` fails instead, `full` refuses at the digest.

use std::path::{Path, PathBuf};

use vmstream::guest::file::layout::ImageWorkloadKind;
use vmstream::guest::file::source::{DirtyTracking, GuestSpec};
use vmstream::guest::migratable::open_guest;
use vmstream::memory::PAGE_SIZE;
use vmstream::migration::error::SendError;
use vmstream::migration::fault::{MissedWrite, MissedWriteAt};
use vmstream::migration::source::verify::VerifyMode;
use vmstream::migration::source::Outcome;
use vmstream::telemetry::notice::Notices;
use vmstream::telemetry::stats::MigrationStats;
use vmstream::telemetry::verification::VerificationStats;

use crate::harness::*;

/// The last page of the guest: in its inactive half, which the workload never writes.
const PAGE: u64 = SIZE / PAGE_SIZE as u64 - 1;

/// A 16 MiB `random` guest with half of its blocks active, tracked by `tracking`.
fn guest(dir: &Dir, tracking: DirtyTracking) -> (Guest, GuestSpec) {
    let spec = GuestSpec::Spawn {
        path: dir.path("src.img"),
        size: SIZE,
        workload: ImageWorkloadKind::Random,
        rate: Some(2000),
        active: Some(50),
        guest_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_vmstream"))),
        disks: Default::default(),
    };
    let g = open_guest(&spec, Some(tracking), &Notices::default()).expect("start the guest");
    std::thread::sleep(std::time::Duration::from_millis(200));
    (Guest(g), spec)
}

fn verify_stats(stats: &MigrationStats) -> &VerificationStats {
    stats.verify.as_ref().expect("verification statistics")
}

fn page_of(path: &Path, page: u64) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    bytes[page as usize * PAGE_SIZE..][..PAGE_SIZE].to_vec()
}

/// A migration of a fresh guest tracked by `tracking`, verified by `mode`, with a missed
/// write of [`PAGE`] at `at`; the scrubber runs unthrottled and, when `scrub_first`, the
/// switchover waits for its pass.
fn run_missed(
    dir: &Dir,
    tracking: DirtyTracking,
    mode: VerifyMode,
    at: Option<MissedWriteAt>,
    scrub_first: bool,
) -> (Guest, Run) {
    let (mut g, spec) = guest(dir, tracking);
    let mut send = send_config(spec);
    send.verify = mode;
    send.scrub.bytes_per_s = None;
    send.scrub.pass_before_switchover = scrub_first;
    send.faults.missed_write = at.map(|at| MissedWrite { page: PAGE, at });
    let run = run(send, recv_config(dir), &mut g);
    (g, run)
}

fn scrubber_finds_the_missed_write(tracking: DirtyTracking) {
    let _g = serial();
    let dir = Dir::new(&format!("scrub-{tracking:?}"));
    let (mut g, run) = run_missed(
        &dir,
        tracking,
        VerifyMode::Incremental,
        Some(MissedWriteAt::AfterRound0),
        true,
    );
    assert_eq!(run.sent.unwrap(), Outcome::Committed);
    assert_committed(&dir, &run.recv_stats);
    let v = verify_stats(&run.send_stats);
    assert_eq!(v.mode, "incremental");
    assert!(v.tracking_errors >= 1, "{v:?}");
    assert_eq!(v.tracking_error_pages.first(), Some(&PAGE), "{v:?}");
    assert!(v.scrub_coverage.unwrap() > 0.0, "{v:?}");
    // The page was sent again: the audit finds nothing, and both memories are equal.
    assert_eq!(v.audit.as_ref().unwrap().result, "match");
    assert_eq!(
        verify_stats(&run.recv_stats).audit.as_ref().unwrap().result,
        "match"
    );
    g.assert_ended();
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    assert_eq!(page_of(&dst, PAGE), page_of(&src, PAGE));
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap());
}

#[test]
fn the_scrubber_finds_a_write_uffd_wp_missed_and_it_is_sent_again() {
    scrubber_finds_the_missed_write(DirtyTracking::UffdWp);
}

#[test]
fn the_scrubber_finds_a_write_hash_tracking_missed_and_it_is_sent_again() {
    scrubber_finds_the_missed_write(DirtyTracking::Hash);
}

fn audit_finds_the_missed_write(tracking: DirtyTracking) {
    let _g = serial();
    let dir = Dir::new(&format!("audit-{tracking:?}"));
    let (_g2, run) = run_missed(
        &dir,
        tracking,
        VerifyMode::Incremental,
        Some(MissedWriteAt::AtPause),
        false,
    );
    // The digest of what was sent matches what the destination holds: it commits.
    assert_eq!(run.sent.unwrap(), Outcome::Committed);
    assert_committed(&dir, &run.recv_stats);
    for stats in [&run.send_stats, &run.recv_stats] {
        let audit = verify_stats(stats).audit.clone().expect("an audit");
        assert_eq!(
            (audit.result.as_str(), audit.mismatched, audit.pages),
            ("mismatch", 1, vec![PAGE]),
            "{:?}",
            stats.role
        );
        assert!(verify_stats(stats).audit_mismatch());
    }
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let written = MissedWrite {
        page: PAGE,
        at: MissedWriteAt::AtPause,
    }
    .contents();
    assert_eq!(page_of(&src, PAGE), written);
    assert_eq!(page_of(&dst, PAGE), vec![0; PAGE_SIZE]);
}

#[test]
fn the_audit_finds_a_write_uffd_wp_missed_after_the_scrubber() {
    audit_finds_the_missed_write(DirtyTracking::UffdWp);
}

#[test]
fn the_audit_finds_a_write_hash_tracking_missed_after_the_scrubber() {
    audit_finds_the_missed_write(DirtyTracking::Hash);
}

/// `strict` fails the migration on the scrubber's find: nothing committed, the guest runs.
#[test]
fn strict_verification_fails_on_a_missed_write_and_the_guest_runs_on() {
    let _g = serial();
    let dir = Dir::new("strict");
    let (mut g, run) = run_missed(
        &dir,
        DirtyTracking::UffdWp,
        VerifyMode::Strict,
        Some(MissedWriteAt::AfterRound0),
        false,
    );
    match run.sent {
        Err(SendError::TrackingError(e)) => assert_eq!(e.pages, vec![PAGE]),
        other => panic!("{other:?}"),
    }
    assert!(run.received.is_err());
    assert_nothing_committed(&dir);
    g.assert_runs();
}

/// `full` reads all memory at the pause: the missed write makes the digests differ, and
/// nothing is committed.
#[test]
fn full_verification_refuses_a_missed_write_at_the_digest() {
    let _g = serial();
    let dir = Dir::new("full");
    let (mut g, run) = run_missed(
        &dir,
        DirtyTracking::UffdWp,
        VerifyMode::Full,
        Some(MissedWriteAt::AtPause),
        false,
    );
    assert!(
        matches!(run.sent, Err(SendError::CommitRefused { .. })),
        "{:?}",
        run.sent
    );
    assert_eq!(verify_stats(&run.send_stats).mode, "full");
    assert_nothing_committed(&dir);
    g.assert_runs();
}

/// Without faults: committed, equal memories, a clean audit and no tracking errors.
#[test]
fn incremental_verification_commits_equal_memory() {
    let _g = serial();
    let dir = Dir::new("incremental");
    let (mut g, run) = run_missed(
        &dir,
        DirtyTracking::UffdWp,
        VerifyMode::Incremental,
        None,
        true,
    );
    assert_eq!(run.sent.unwrap(), Outcome::Committed);
    assert_committed(&dir, &run.recv_stats);
    let v = verify_stats(&run.send_stats);
    assert_eq!(
        (v.tracking_errors, v.audit.as_ref().unwrap().mismatched),
        (0, 0)
    );
    g.assert_ended();
    assert!(
        std::fs::read(dir.path("src.img")).unwrap() == std::fs::read(dir.path("dst.img")).unwrap()
    );
}

/// A KVM guest: a write its dirty log missed is named by the audit.
#[test]
fn the_audit_finds_a_write_a_kvm_dirty_log_missed() {
    let _g = serial();
    let dir = Dir::new("audit-kvm");
    let Some((mut g, spec)) = Guest::kvm(&dir) else {
        return;
    };
    let pages = 32 << 20 >> 12;
    let mut send = send_config(spec);
    send.verify = VerifyMode::Incremental;
    send.faults.missed_write = Some(MissedWrite {
        page: pages - 1,
        at: MissedWriteAt::AtPause,
    });
    let run = run(send, recv_config(&dir), &mut g);
    assert_eq!(run.sent.unwrap(), Outcome::Committed);
    let audit = verify_stats(&run.recv_stats).audit.clone().unwrap();
    assert_eq!((audit.mismatched, audit.pages), (1, vec![pages - 1]));
}

/// A destination verifying the resumed workload says before each live round's
/// acknowledgement what its verify at the pause would have left to check
/// (`VerifyBacklog`); the source counts that in the pause it expects, and the final round
/// carries none.
#[test]
fn the_destinations_verify_backlog_counts_in_the_pause_expected() {
    let _g = serial();
    let dir = Dir::new("verify-backlog");
    let (mut guest, spec) = Guest::file_of(&dir, 64 << 20);
    // About 2 s of round 0: the background times passes while it lands.
    let send = slow_send_config(spec, 32 << 20);
    let mut recv = recv_config(&dir);
    recv.resume = true;
    recv.run_for = Some(std::time::Duration::from_millis(300));
    let run = run(send, recv, &mut guest);
    assert_eq!(run.sent.unwrap(), Outcome::Committed);
    assert_committed(&dir, &run.recv_stats);
    let rounds = &run.send_stats.per_round;
    let live: Vec<_> = rounds.iter().filter(|r| !r.paused).collect();
    let reported: Vec<_> = live
        .iter()
        .filter_map(|r| r.destination_verify_backlog_ms.map(|b| (r, b)))
        .collect();
    assert!(!reported.is_empty(), "no backlog reported: {rounds:?}");
    for (r, backlog) in reported {
        assert!(r.expected_downtime_ms >= backlog, "{r:?}");
    }
    let last = rounds.last().unwrap();
    assert!(last.paused && last.destination_verify_backlog_ms.is_none());
}
