//! `vmstream recv` before and around its migration: without a key, connections that
//! never send a frame do not end the receive.

use std::net::TcpStream;
use std::path::Path;

use vmstream_tests::*;

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
