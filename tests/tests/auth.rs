//! Peer authentication (`--auth-key-file`) with the real binary: the same key on both sides
//! migrates exactly (over two channels, each authenticated); a different key, or a key on
//! one side only, is refused on both sides with the cause named, the source guest keeps
//! running and nothing is committed.

use std::path::Path;

use vmstream_tests::*;

fn write_key(path: &Path, byte: u8) {
    std::fs::write(path, [byte; 32]).unwrap();
}

/// A sender of a 16 MiB dbsim guest to `port` with `extra` arguments.
fn sender(dir: &TmpDir, port: u16, extra: &[&str]) -> Proc {
    let to = format!("127.0.0.1:{port}");
    let src = dir.path("src.img");
    let mut args = vec![
        "send",
        "--memory-file",
        src.to_str().unwrap(),
        "--size",
        "16M",
        "--workload",
        "dbsim",
        "--rate",
        "2000",
        "--warmup",
        "200ms",
        "--io-timeout",
        "10s",
        "--no-progress",
        "--to",
        &to,
    ];
    args.extend_from_slice(extra);
    Proc::vmstream("send", &args, &[])
}

#[test]
fn same_key_on_both_sides_migrates_exactly_over_two_channels() {
    let _g = serial();
    let dir = TmpDir::new("auth-ok");
    let key = dir.path("key");
    write_key(&key, 0x5a);
    let (dst, sj, rj) = (
        dir.path("dst.img"),
        dir.path("send.json"),
        dir.path("recv.json"),
    );
    let (mut recv, port) = start_receiver(&[
        "--memory-file",
        dst.to_str().unwrap(),
        "--auth-key-file",
        key.to_str().unwrap(),
        "--stats-json",
        rj.to_str().unwrap(),
    ]);
    let mut send = sender(
        &dir,
        port,
        &[
            "--auth-key-file",
            key.to_str().unwrap(),
            "--channels",
            "2",
            "--stats-json",
            sj.to_str().unwrap(),
        ],
    );
    let _guest = KillPid(guest_pid(&mut send));
    let (s_status, _) = send.wait_exit();
    assert!(s_status.success(), "send failed: {}", send.stderr());
    let (r_status, _) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    assert!(files_identical(&dir.path("src.img"), &dst));
    let (s, r) = (read_stats(&sj), read_stats(&rj));
    assert_eq!(s["outcome"], "committed");
    assert_eq!(r["outcome"], "committed");
    assert_eq!(s["settings"]["authenticated"], "true");
    assert_eq!(r["settings"]["authenticated"], "true");
    assert_eq!(r["settings"]["channels"], "2");
}

/// Runs a migration whose authentication must fail: both sides exit 1 with their causes
/// on stderr, the source's guest keeps running, nothing is committed.
fn refused(recv_key: Option<u8>, send_key: Option<u8>, send_says: &str, recv_says: &str) {
    let dir = TmpDir::new("auth-refused");
    let (rk, sk, dst) = (
        dir.path("recv.key"),
        dir.path("send.key"),
        dir.path("dst.img"),
    );
    let mut recv_args = vec!["--memory-file", dst.to_str().unwrap()];
    if let Some(b) = recv_key {
        write_key(&rk, b);
        recv_args.extend(["--auth-key-file", rk.to_str().unwrap()]);
    }
    let (mut recv, port) = start_receiver(&recv_args);
    let mut send_args = vec![];
    if let Some(b) = send_key {
        write_key(&sk, b);
        send_args.extend(["--auth-key-file", sk.to_str().unwrap()]);
    }
    let mut send = sender(&dir, port, &send_args);
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", send.stderr());
    assert!(send.stderr().contains(send_says), "{}", send.stderr());
    expect_receiver_failure(&mut recv, &dst, &[recv_says]);
    let src = dir.path("src.img");
    let tx = read_tx_count(&src);
    wait_tx_above(&src, tx);
    assert!(
        dir.entries().iter().all(|e| !e.contains("dst.img")),
        "{:?}",
        dir.entries()
    );
}

#[test]
fn different_keys_are_refused_on_both_sides() {
    let _g = serial();
    refused(
        Some(1),
        Some(2),
        "the destination does not hold this key",
        "the destination's proof does not match this source's key",
    );
}

#[test]
fn a_key_on_one_side_only_is_refused_with_its_cause() {
    let _g = serial();
    refused(
        Some(1),
        None,
        "this destination requires authentication",
        "this destination requires authentication",
    );
    refused(
        None,
        Some(1),
        "the source authenticates (--auth-key-file) but this destination has no key",
        "this destination has no key",
    );
}

#[test]
fn a_short_key_file_is_a_usage_error() {
    let _g = serial();
    let dir = TmpDir::new("auth-short");
    let key = dir.path("key");
    std::fs::write(&key, b"too short").unwrap();
    let mut recv = Proc::vmstream(
        "recv",
        &[
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--memory-file",
            dir.path("dst.img").to_str().unwrap(),
            "--auth-key-file",
            key.to_str().unwrap(),
        ],
        &[],
    );
    let (status, _) = recv.wait_exit();
    assert_eq!(status.code(), Some(2));
    assert!(
        recv.stderr()
            .contains("holds 9 bytes: use 16 to 4096 random bytes"),
        "{}",
        recv.stderr()
    );
}
