//! `vmstream recv` before and around its migration: arguments are checked before it
//! listens, a memory file is written by one receive at a time and never while a running
//! guest holds it, no file is written through a link put in the receiver's way, and
//! without a key, connections that never send a frame do not end the receive.

use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use vmstream_tests::*;

/// Runs `vmstream recv ARGS` that must be refused as a usage error: exit 2 within a few
/// seconds with `reason` on stderr, without listening and without a migration summary.
fn expect_usage_error(args: &[&str], reason: &str) {
    let mut all = vec!["recv"];
    all.extend_from_slice(args);
    let mut recv = Proc::vmstream("recv", &all, &[]);
    let Some((status, lines)) = recv.exit_within(Duration::from_secs(10)) else {
        panic!(
            "recv {args:?} still runs after 10 s; stderr: {}",
            recv.stderr()
        )
    };
    let err = recv.stderr();
    assert_eq!(status.code(), Some(2), "recv {args:?}: {err}");
    assert!(err.contains(reason), "recv {args:?}: {err}");
    assert!(!err.contains("migration failed"), "recv {args:?}: {err}");
    // Neither a `listening on` line nor a summary.
    assert!(lines.is_empty(), "recv {args:?}: {lines:?}");
}

/// A directory as the memory file, one in a directory that does not exist, a size that is
/// not a non-zero multiple of the page size, and a listen address that is not one are all
/// refused with exit 2 before the receiver listens, and nothing is created (a directory's
/// temporary image would go into its parent).
#[test]
fn bad_arguments_are_refused_before_listening() {
    let dir = TmpDir::new("recv-args");
    let images = dir.path("images");
    std::fs::create_dir(&images).unwrap();
    let dst = dir.path("dst.img");
    let dst = dst.to_str().unwrap();
    expect_usage_error(
        &["--listen", "0", "--memory-file", images.to_str().unwrap()],
        &format!("--memory-file {}: is a directory", images.display()),
    );
    let missing = dir.path("no/such/dir/x.mem");
    expect_usage_error(
        &["--listen", "0", "--memory-file", missing.to_str().unwrap()],
        &format!(
            "directory {} does not exist",
            dir.path("no/such/dir").display()
        ),
    );
    for size in ["0", "1000"] {
        expect_usage_error(
            &["--listen", "0", "--memory-file", dst, "--size", size],
            &format!("expected guest size {size} (--size) must be a non-zero multiple of 4096"),
        );
    }
    for listen in ["99999", "abc"] {
        expect_usage_error(
            &["--listen", listen, "--memory-file", dst],
            &format!("bad listen address \"{listen}\""),
        );
    }
    expect_usage_error(
        &["--listen", "0", "--memory-file", dst, "--io-timeout", "0"],
        "--io-timeout must be above 0",
    );
    assert_eq!(dir.entries(), ["images"]);
    assert!(std::fs::read_dir(&images).unwrap().next().is_none());
}

/// A sender of a 16 MiB guest on `dir/src.img` to `port`.
fn sender(dir: &TmpDir, port: u16) -> Proc {
    let args = random_guest_send_args(&dir.path("src.img"), &format!("127.0.0.1:{port}"), &[]);
    Proc::vmstream(
        "send",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    )
}

/// `dir/src.img` migrates into `recv` (listening on `port`, into `dst`): both sides exit
/// 0, the image is the source's memory at the pause, and the directory holds exactly the
/// two images.
fn expect_migration(dir: &TmpDir, recv: &mut Proc, port: u16, dst: &Path) {
    let mut send = sender(dir, port);
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert!(status.success(), "send: {}", send.stderr());
    let (status, _) = recv.wait_exit();
    assert!(status.success(), "recv: {}", recv.stderr());
    assert!(files_identical(&dir.path("src.img"), dst));
    assert_eq!(dir.entries(), ["dst.img", "src.img"]);
}

/// The pid-named temporary image of a receiver `pid` into `dst.img`.
fn claim_of(pid: u32) -> String {
    format!(".dst.img.vmstream-recv-{pid}")
}

/// A second receive into a memory file that a running receiver is receiving into refuses
/// to start (two commits into one file: one guest's memory would be lost), names the
/// other receiver, and leaves its directory as it was; the first one migrates.
#[test]
fn a_second_receive_into_the_same_file_refuses_to_start() {
    let _g = serial();
    let dir = TmpDir::new("recv-twice");
    let dst = dir.path("dst.img");
    let (mut first, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    assert_eq!(dir.entries(), [claim_of(first.pid())]);
    let mut second = Proc::vmstream(
        "second recv",
        &[
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--memory-file",
            dst.to_str().unwrap(),
        ],
        &[],
    );
    let Some((status, lines)) = second.exit_within(Duration::from_secs(10)) else {
        panic!("a second receiver into {} runs", dst.display())
    };
    assert_eq!(status.code(), Some(1), "{}", second.stderr());
    let expected = format!(
        "vmstream recv: another vmstream recv (pid {}) is receiving into {}",
        first.pid(),
        dst.display()
    );
    assert!(second.stderr().contains(&expected), "{}", second.stderr());
    assert!(lines.is_empty(), "{lines:?}");
    assert_eq!(dir.entries(), [claim_of(first.pid())]);
    expect_migration(&dir, &mut first, port, &dst);
}

/// Two receivers started at the same time into one memory file: exactly one listens, the
/// other refuses and names it; a receiver killed outright leaves its temporary file, which
/// the next one removes. The last winner migrates.
#[test]
fn of_two_receives_started_together_exactly_one_listens() {
    let _g = serial();
    let dir = TmpDir::new("recv-race");
    let dst = dir.path("dst.img");
    let args = [
        "recv",
        "--listen",
        "127.0.0.1:0",
        "--memory-file",
        dst.to_str().unwrap(),
    ];
    for round in 0..5 {
        let mut pair = [
            Proc::vmstream("recv a", &args, &[]),
            Proc::vmstream("recv b", &args, &[]),
        ];
        // Whichever exits is the loser; the other must be listening.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let loser = loop {
            if let Some(i) = (0..2).find(|&i| pair[i].child.try_wait().unwrap().is_some()) {
                break i;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: both receivers run: {} / {}",
                pair[0].stderr(),
                pair[1].stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let winner = 1 - loser;
        let line = pair[winner].wait_line("listening on ");
        let (status, lines) = pair[loser].wait_exit();
        assert_eq!(status.code(), Some(1), "{}", pair[loser].stderr());
        assert!(lines.is_empty(), "{lines:?}");
        let named = format!("another vmstream recv (pid {})", pair[winner].pid());
        assert!(
            pair[loser].stderr().contains(&named),
            "{}",
            pair[loser].stderr()
        );
        assert_eq!(dir.entries(), [claim_of(pair[winner].pid())]);
        if round == 4 {
            let port: u16 = line.rsplit(':').next().unwrap().parse().unwrap();
            expect_migration(&dir, &mut pair[winner], port, &dst);
        } else {
            // Killed outright: its temporary file stays for the next round to remove.
            pair[winner].child.kill().unwrap();
            pair[winner].wait_exit();
        }
    }
}

/// Without a key, a connection that closes before sending anything and one that says
/// nothing until the admission gives up on it (10 s) are dropped and reported: the
/// receiver keeps listening, and the source that connects next migrates.
#[test]
fn keyless_connections_that_never_open_do_not_end_the_receive() {
    let _g = serial();
    let dir = TmpDir::new("recv-no-opening");
    let dst = dir.path("dst.img");
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
    recv.wait_stderr_running("connection closed by peer, before its first frame; still listening");
    let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    recv.wait_stderr_running(
        "no data from peer within 10s, before its first frame; still listening",
    );
    assert!(
        recv.child.try_wait().unwrap().is_none(),
        "{}",
        recv.stderr()
    );
    assert_eq!(
        recv.stderr().matches("dropped the connection from").count(),
        2
    );
    drop(silent);
    expect_migration(&dir, &mut recv, port, &dst);
}

/// Asserts that the file at `path` still holds exactly `bytes` (without printing what
/// replaced them: a whole guest image).
fn assert_holds(path: &Path, bytes: &[u8]) {
    let now = std::fs::read(path).unwrap();
    assert!(
        now == bytes,
        "{} was written: {} bytes now",
        path.display(),
        now.len()
    );
}

/// The attack of issue 19: once the receiver listens, its temporary image is replaced by a
/// link to another file (the victim), and the target is a link to a second one. The
/// receiver never writes through either link: it refuses the source (its image was
/// replaced), both victims keep their bytes and lengths, and the link stays where it was
/// put. The next receive into the same target replaces the target's link with a regular
/// file holding the guest.
#[test]
fn links_in_the_receivers_way_are_never_written_through() {
    let _g = serial();
    let dir = TmpDir::new("recv-links");
    let dst = dir.path("dst.img");
    let (victim, other) = (dir.path("victim"), dir.path("other"));
    std::fs::write(&victim, b"the victim's own bytes").unwrap();
    std::fs::write(&other, b"another victim").unwrap();
    std::os::unix::fs::symlink(&other, &dst).unwrap();
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let tmp = dir.path(&claim_of(recv.pid()));
    std::fs::remove_file(&tmp).unwrap();
    std::os::unix::fs::symlink(&victim, &tmp).unwrap();
    let mut send = sender(&dir, port);
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert!(!status.success(), "send: {}", send.stderr());
    let (status, _) = recv.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", recv.stderr());
    let why = format!("{} was replaced by another file", tmp.display());
    assert!(recv.stderr().contains(&why), "{}", recv.stderr());
    assert!(send.stderr().contains(&why), "{}", send.stderr());
    assert_holds(&victim, b"the victim's own bytes");
    assert_holds(&other, b"another victim");
    assert!(std::fs::symlink_metadata(&tmp).unwrap().is_symlink());
    assert!(std::fs::symlink_metadata(&dst).unwrap().is_symlink());

    std::fs::remove_file(&tmp).unwrap();
    std::fs::remove_file(dir.path("src.img")).unwrap();
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let mut send = sender(&dir, port);
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert!(status.success(), "send: {}", send.stderr());
    let (status, _) = recv.wait_exit();
    assert!(status.success(), "recv: {}", recv.stderr());
    assert!(std::fs::symlink_metadata(&dst).unwrap().is_file());
    assert!(files_identical(&dir.path("src.img"), &dst));
    assert_holds(&victim, b"the victim's own bytes");
    assert_holds(&other, b"another victim");
    assert_eq!(dir.entries(), ["dst.img", "other", "src.img", "victim"]);
}

/// A receive into the memory file of a running guest (which holds the file's lock) is
/// refused before it listens, naming why: the guest's file is the same file of the same
/// length, nothing is created beside it, and the guest goes on committing transactions.
#[test]
fn a_receive_into_a_running_guests_file_is_refused() {
    use std::os::unix::fs::MetadataExt;
    let _g = serial();
    let dir = TmpDir::new("recv-guest-file");
    let dst = dir.path("dst.img");
    let mut guest = start_external_guest(&dst, &[]);
    let before = std::fs::metadata(&dst).unwrap();
    let mut recv = Proc::vmstream(
        "recv",
        &[
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--memory-file",
            dst.to_str().unwrap(),
        ],
        &[],
    );
    let Some((status, lines)) = recv.exit_within(Duration::from_secs(10)) else {
        panic!("a receiver into a running guest's file listens")
    };
    assert_eq!(status.code(), Some(1), "{}", recv.stderr());
    let expected = format!("{} is the memory file of a running guest", dst.display());
    assert!(recv.stderr().contains(&expected), "{}", recv.stderr());
    assert!(lines.is_empty(), "{lines:?}");
    let after = std::fs::metadata(&dst).unwrap();
    assert_eq!((after.ino(), after.len()), (before.ino(), before.len()));
    assert_eq!(dir.entries(), ["dst.img"]);
    assert!(guest.child.try_wait().unwrap().is_none(), "the guest ended");
    wait_tx_above(&dst, read_tx_count(&dst));
}
