//! `vmstream recv` before and around its migration: arguments are checked before it
//! listens, and without a key, connections that never send a frame do not end the
//! receive.

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
    assert_eq!(dir.entries(), ["images"]);
    assert!(std::fs::read_dir(&images).unwrap().next().is_none());
}

/// A sender of a 16 MiB guest on `dir/src.img` to `port`.
fn sender(dir: &TmpDir, port: u16) -> Proc {
    let to = format!("127.0.0.1:{port}");
    Proc::vmstream(
        "send",
        &[
            "send",
            "--memory-file",
            dir.path("src.img").to_str().unwrap(),
            "--size",
            "16M",
            "--workload",
            "random",
            "--rate",
            "2000",
            "--warmup",
            "200ms",
            "--no-progress",
            "--to",
            &to,
        ],
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
