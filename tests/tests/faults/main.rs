//! Failed migrations: whatever goes wrong before the commit acknowledgement, the source
//! guest keeps running (its counter grows), the receiver exits with a clear error, and
//! nothing is committed at the destination path. Here: signals, killed processes, a cut
//! or corrupted stream and timeouts; `refusals`: what is refused before or at the start.

mod refusals;

use std::path::Path;
use std::time::Duration;

use vmstream_tests::*;

/// The destination path after a failed migration: absent, or unchanged if it existed.
fn assert_not_committed(dir: &TmpDir, dst: &Path, before: Option<&[u8]>) {
    match before {
        None => assert!(!dst.exists(), "{} was committed", dst.display()),
        Some(b) => assert_eq!(std::fs::read(dst).unwrap(), b, "destination changed"),
    }
    let _ = dir;
}

/// The guest pid the sender announced, killed when the guard drops (even if the test
/// fails earlier).
fn guard_guest(send: &mut Proc) -> KillPid {
    KillPid(guest_pid(send))
}

/// Starts a sender of a 16 MiB random guest to `port`, slowed down so that faults hit
/// the middle of the migration.
fn slow_sender(dir: &TmpDir, port: u16, bandwidth: &str, envs: &[(&str, &str)]) -> Proc {
    slow_sender_by(Proc::vmstream, dir, port, bandwidth, envs)
}

/// How a test starts a `vmstream` process: [`Proc::vmstream`] or [`Proc::vmstream_job`].
type Spawn = fn(&str, &[&str], &[(&str, &str)]) -> Proc;

/// [`slow_sender`], started by `spawn`.
fn slow_sender_by(
    spawn: Spawn,
    dir: &TmpDir,
    port: u16,
    bandwidth: &str,
    envs: &[(&str, &str)],
) -> Proc {
    let to = format!("127.0.0.1:{port}");
    let extra = [
        "--compress",
        "none",
        "--xbzrle",
        "off",
        "--max-bandwidth",
        bandwidth,
        "--io-timeout",
        "10s",
    ];
    let args = random_guest_send_args(&dir.path("src.img"), &to, &extra);
    spawn(
        "send",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        envs,
    )
}

/// Ctrl-C in the sender's terminal (SIGINT to its whole process group) in the middle of
/// round 0 cancels the migration: the guest process, in a group of its own, keeps running,
/// the destination rolls back, and the sender exits 3.
#[test]
fn ctrl_c_cancels_the_migration_and_the_guest_keeps_running() {
    let _g = serial();
    let dir = TmpDir::new("ctrl-c");
    let (mut recv, mut send, _guest) = job_in_round_0(Proc::vmstream_job, &dir);
    send_signal("INT", &format!("-{}", send.pid()));
    expect_cancelled_by_signal(&mut send, &mut recv, &dir);
}

/// Receiver and sender (started by `spawn`, see [`Spawn`]) of a 16 MiB guest at 4 MiB/s,
/// 300 ms into the 4 s of round 0; and the guard of the sender's guest.
fn job_in_round_0(spawn: Spawn, dir: &TmpDir) -> (Proc, Proc, KillPid) {
    let dst = dir.path("dst.img");
    let (recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let mut send = slow_sender_by(spawn, dir, port, "4M", &[]);
    let guest = guard_guest(&mut send);
    recv.wait_stderr("connection from");
    std::thread::sleep(Duration::from_millis(300));
    (recv, send, guest)
}

/// A signal cancelled the migration: the sender exits 3 and says why, the receiver rolls
/// back, the guest keeps running.
fn expect_cancelled_by_signal(send: &mut Proc, recv: &mut Proc, dir: &TmpDir) {
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(3), "stderr: {}", send.stderr());
    assert!(
        send.stderr()
            .contains("cancelled: on request (SIGINT or SIGTERM"),
        "{}",
        send.stderr()
    );
    expect_receiver_failure(recv, &dir.path("dst.img"), &["source aborted (Cancelled)"]);
    assert_source_guest_runs(&dir.path("src.img"));
}

/// A source that dies between the destination's commit reply and its `Handover` (its guest
/// ended): the destination keeps the committed image but does not resume the guest, since
/// the source's copy may still run; it says why and exits 1.
#[test]
fn a_source_crash_after_the_commit_leaves_the_destination_copy_stopped() {
    let _g = serial();
    let dir = TmpDir::new("crash-after-commit");
    let (dst, rj) = (dir.path("dst.img"), dir.path("recv.json"));
    let (mut recv, port) = start_resuming_receiver(&dst, "1s", &rj);
    let crash = "VMSTREAM_TEST_CRASH_AFTER_COMMIT";
    let mut send = slow_sender(&dir, port, "64M", &[(crash, "1")]);
    let _guest = guard_guest(&mut send);
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(70), "stderr: {}", send.stderr());
    let (r_status, lines) = recv.wait_exit();
    assert_eq!(r_status.code(), Some(1), "{}", recv.stderr());
    let err = recv.stderr();
    assert!(
        err.contains("committed")
            && err.contains("the source did not confirm that its guest ended")
            && !err.contains("nothing committed"),
        "{err}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("ready ")),
        "a guest started on the destination: {lines:?}"
    );
    let stats = read_stats(&rj);
    assert_eq!(stats["outcome"], "committed");
    // The committed image is whole: the workload's own check passes on it.
    vmstream::guest::file::verify::verify_file(&dst).expect("the committed image verifies");
}

/// A sender started with SIGINT ignored (a shell script's background job) keeps it
/// ignored: Ctrl-C in the terminal does not cancel the migration. SIGTERM still does.
#[test]
fn an_ignored_sigint_stays_ignored() {
    let _g = serial();
    let dir = TmpDir::new("sigint-ignored");
    let (mut recv, mut send, _guest) = job_in_round_0(Proc::vmstream_job_ignoring_sigint, &dir);
    send_signal("INT", &format!("-{}", send.pid()));
    // Handled, it would cancel within a round's 256 pages (a quarter second here).
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        send.child.try_wait().unwrap().is_none(),
        "SIGINT ended the sender: {}",
        send.stderr()
    );
    send_signal("TERM", &send.pid().to_string());
    expect_cancelled_by_signal(&mut send, &mut recv, &dir);
}

/// SIGINT to the receiver in the middle of round 0 ends the receive cleanly: nothing
/// committed and no temporary image left, the source told why, its guest still running.
#[test]
fn sigint_ends_the_receive_cleanly() {
    let _g = serial();
    let dir = TmpDir::new("recv-sigint");
    let dst = dir.path("dst.img");
    let (mut recv, mut send, _guest) = job_in_round_0(Proc::vmstream, &dir);
    send_signal("INT", &recv.pid().to_string());
    expect_receiver_failure(&mut recv, &dst, &["interrupted (SIGINT or SIGTERM)"]);
    assert_eq!(dir.entries(), vec!["src.img".to_string()]);
    // The summary counts the time the receive ran (it was only set at a commit).
    let (_, lines) = recv.wait_exit();
    let total = line_starting(&lines, "  total time:");
    let ms: f64 = total
        .trim_start_matches("  total time:")
        .trim_end_matches(" ms")
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{total:?}: {e}"));
    assert!(ms >= 100.0, "{total}");
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1));
    assert!(
        send.stderr()
            .contains("destination aborted (DestinationError): interrupted (SIGINT or SIGTERM)"),
        "{}",
        send.stderr()
    );
    assert_source_guest_runs(&dir.path("src.img"));
}

/// The guest process killed in the middle of round 0 (an OOM kill, a crash): the sender
/// notices within a few pages, fails with the guest's exit status instead of waiting to
/// pause a dead process, and the destination commits nothing.
#[test]
fn guest_killed_mid_migration() {
    let _g = serial();
    let dir = TmpDir::new("kill-guest");
    let dst = dir.path("dst.img");
    // 16 MiB at 4 MiB/s: the kill lands in round 0, 500 ms after the connection.
    let (mut recv, mut send, guest) = job_in_round_0(Proc::vmstream, &dir);
    std::thread::sleep(Duration::from_millis(200));
    send_signal("KILL", &guest.0.to_string());
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "stderr: {}", send.stderr());
    let err = send.stderr();
    assert!(
        err.contains(&format!(
            "the guest (pid {}) exited during the migration: signal: 9",
            guest.0
        )) && err.contains("had exited")
            && !err.contains("keeps running"),
        "{err}"
    );
    expect_receiver_failure(&mut recv, &dst, &["source aborted (SourceError)", "exited"]);
    assert_not_committed(&dir, &dst, None);
}

#[test]
fn receiver_killed_mid_migration() {
    let _g = serial();
    let dir = TmpDir::new("kill-recv");
    let dst = dir.path("dst.img");
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    // 16 MiB at 4 MiB/s: the kill lands in round 0.
    let mut send = slow_sender(&dir, port, "4M", &[]);
    let _guest = guard_guest(&mut send);
    std::thread::sleep(Duration::from_millis(1500));
    recv.child.kill().unwrap();
    recv.wait_exit();
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "stderr: {}", send.stderr());
    assert!(
        send.stderr().contains("migration failed"),
        "{}",
        send.stderr()
    );
    assert_source_guest_runs(&dir.path("src.img"));
    assert_not_committed(&dir, &dst, None);
}

/// The single-letter state of process `pid` (`R`, `S`, `T` stopped, `Z`...), `None` once
/// it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S ...`: the command may hold spaces and parentheses.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The sender killed outright (SIGKILL: no cleanup at all) while its guest is paused for
/// the switchover. The guest's process group, its own, is then orphaned with a stopped
/// member, and the kernel sends it SIGHUP and SIGCONT: the guest survives the first (it
/// died of it before), runs again, and nothing is committed.
#[test]
fn sender_killed_during_the_switchover_leaves_the_guest_running() {
    let _g = serial();
    let dir = TmpDir::new("kill-send-paused");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let to = format!("127.0.0.1:{port}");
    // Round 0 of 16 MiB at 4 MiB/s dirties every page (2000 random writes a second), so
    // the forced final round keeps the guest stopped for about 4 s. No throttling
    // (`--converge none`, the default) stops it before.
    let args = random_guest_send_args(
        &src,
        &to,
        &[
            "--compress",
            "none",
            "--xbzrle",
            "off",
            "--max-bandwidth",
            "4M",
            "--timeout",
            "1s",
            "--on-timeout",
            "force",
        ],
    );
    let mut send = Proc::vmstream(
        "send",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    );
    let guest = guard_guest(&mut send);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while process_state(guest.0) != Some('T') {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest was never paused; sender: {}",
            send.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(process_state(guest.0), Some('T'), "still paused");
    send.child.kill().unwrap();
    send.wait_exit();
    expect_receiver_failure(&mut recv, &dst, &["nothing committed"]);
    assert_source_guest_runs(&src);
    assert!(
        matches!(process_state(guest.0), Some('R' | 'S')),
        "{:?}",
        process_state(guest.0)
    );
}

/// SIGTERM during `--warmup` cancels at once (it waited for the warmup's end), names the
/// guest that keeps running, and exits 3.
#[test]
fn sigterm_during_the_warmup_cancels_at_once() {
    let _g = serial();
    let dir = TmpDir::new("warmup-sigterm");
    let src = dir.path("src.img");
    let mut send = Proc::vmstream(
        "send",
        &[
            "send",
            "--memory-file",
            src.to_str().unwrap(),
            "--size",
            "16M",
            "--warmup",
            "30s",
            "--no-progress",
            "--to",
            "127.0.0.1:9",
        ],
        &[],
    );
    let guest = guard_guest(&mut send);
    let t = std::time::Instant::now();
    send_signal("TERM", &send.pid().to_string());
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(3), "{}", send.stderr());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(
        send.stderr()
            .contains(&format!("guest pid {} keeps running", guest.0)),
        "{}",
        send.stderr()
    );
    assert_source_guest_runs(&src);
}

#[test]
fn connection_dropped_mid_migration() {
    let _g = serial();
    let dir = TmpDir::new("drop");
    let dst = dir.path("dst.img");
    std::fs::write(&dst, b"previous image").unwrap();
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let proxy = CuttingProxy::start(port, 3 << 20);
    let mut send = slow_sender(&dir, proxy.port, "16M", &[]);
    let _guest = guard_guest(&mut send);
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "stderr: {}", send.stderr());
    let (r_status, _) = recv.wait_exit();
    assert_eq!(r_status.code(), Some(1));
    let err = recv.stderr();
    assert!(
        err.contains("migration failed") && err.contains("nothing committed"),
        "{err}"
    );
    assert!(
        err.contains("connection ended inside") || err.contains("connection closed"),
        "{err}"
    );
    assert_source_guest_runs(&dir.path("src.img"));
    assert_not_committed(&dir, &dst, Some(b"previous image"));
    assert_eq!(
        dir.entries(),
        vec!["dst.img".to_string(), "src.img".to_string()]
    );
}

#[test]
fn corrupted_byte_is_detected_and_rolled_back() {
    let _g = serial();
    let dir = TmpDir::new("corrupt");
    let dst = dir.path("dst.img");
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    // Inside the payload of an early packet of round 0.
    let mut send = slow_sender(&dir, port, "64M", &[("VMSTREAM_TEST_CORRUPT_AT", "300000")]);
    let _guest = guard_guest(&mut send);
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "stderr: {}", send.stderr());
    let (r_status, _) = recv.wait_exit();
    assert_eq!(r_status.code(), Some(1));
    let err = recv.stderr();
    assert!(
        err.contains("crc32c"),
        "receiver error does not name the checksum: {err}"
    );
    assert!(
        send.stderr().contains("crc32c"),
        "the sender did not learn why: {}",
        send.stderr()
    );
    assert_source_guest_runs(&dir.path("src.img"));
    assert_not_committed(&dir, &dst, None);
    assert_eq!(dir.entries(), vec!["src.img".to_string()]);
}

#[test]
fn timeout_cancel_keeps_the_source_and_force_completes() {
    let _g = serial();
    // Cancel: a guest dirtying memory as fast as it can never fits a 1 ms downtime.
    let dir = TmpDir::new("timeout-cancel");
    let dst = dir.path("dst.img");
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let to = format!("127.0.0.1:{port}");
    let src = dir.path("src.img");
    let common = [
        "send",
        "--memory-file",
        src.to_str().unwrap(),
        "--size",
        "8M",
        "--workload",
        "random",
        "--rate",
        "0",
        "--warmup",
        "100ms",
        "--compress",
        "none",
        "--xbzrle",
        "off",
        "--no-progress",
        "--downtime-limit",
        "1ms",
        "--timeout",
        "1s",
    ];
    let mut args = common.to_vec();
    args.extend_from_slice(&[
        "--max-bandwidth",
        "4M",
        "--on-timeout",
        "cancel",
        "--to",
        &to,
    ]);
    let mut send = Proc::vmstream("send", &args, &[]);
    let _guest = guard_guest(&mut send);
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(3), "stderr: {}", send.stderr());
    assert!(send.stderr().contains("cancelled"), "{}", send.stderr());
    let (r_status, _) = recv.wait_exit();
    assert_eq!(r_status.code(), Some(1));
    assert!(
        recv.stderr().contains("source aborted"),
        "{}",
        recv.stderr()
    );
    assert_source_guest_runs(&src);
    assert_not_committed(&dir, &dst, None);

    // Force: the same impossible limit, but the switchover happens at the timeout.
    let dir = TmpDir::new("timeout-force");
    let (dst, src, sj) = (dir.path("dst.img"), dir.path("src.img"), dir.path("s.json"));
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let to = format!("127.0.0.1:{port}");
    let mut args = common.to_vec();
    args[2] = src.to_str().unwrap();
    args.extend_from_slice(&[
        "--max-bandwidth",
        "32M",
        "--on-timeout",
        "force",
        "--stats-json",
        sj.to_str().unwrap(),
        "--to",
        &to,
    ]);
    let mut send = Proc::vmstream("send", &args, &[]);
    let _guest = guard_guest(&mut send);
    let (status, _) = send.wait_exit();
    assert!(status.success(), "stderr: {}", send.stderr());
    let (r_status, _) = recv.wait_exit();
    assert!(r_status.success(), "{}", recv.stderr());
    let s = read_stats(&sj);
    assert_eq!(s["converged"], false);
    assert!(files_identical(&src, &dst));
}
