//! Refused before or at the start: settings, a memory file another guest runs on, a size
//! or protocol mismatch, garbage, an exposed listen address, an image whose workload fails
//! to verify. The source guest keeps running and nothing is committed.

use std::path::Path;
use std::time::Duration;

use super::*;

/// Settings the migration would refuse are refused before anything starts: exit 2, the
/// reason, no guest started (it used to run, and was left running, before the error).
#[test]
fn bad_send_settings_are_refused_before_the_guest_starts() {
    let _g = serial();
    let dir = TmpDir::new("bad-settings");
    let src = dir.path("src.img");
    let cases: [(&[&str], &str); 12] = [
        (
            &["--size", "1000"],
            "--size 1000: must be a non-zero multiple of 4096",
        ),
        (
            &["--size", "0"],
            "--size 0: must be a non-zero multiple of 4096",
        ),
        (&["--kvm", "--size", "3M"], "must be a multiple of 2 MiB"),
        (&["--batch-pages", "0"], "batch_pages 0 outside 1..=4096"),
        (
            &["--batch-pages", "5000"],
            "batch_pages 5000 outside 1..=4096",
        ),
        (
            &["--compress", "zlib", "--compress-level", "99"],
            "zlib level 99",
        ),
        (&["--xbzrle-cache", "0"], "page cache"),
        (
            &["--defer-hot", "50", "--defer-segment", "1000"],
            "hot-page deferral",
        ),
        (&["--io-timeout", "0"], "--io-timeout must be above 0"),
        (
            &["--downtime-limit", "0"],
            "--downtime-limit must be above 0",
        ),
        (&["--to", "nonsense"], "--to nonsense: expected HOST:PORT"),
        (
            &["--to", "127.0.0.1:99999"],
            "--to 127.0.0.1:99999: the port must be",
        ),
    ];
    for (extra, reason) in cases {
        let mut args = vec![
            "send",
            "--memory-file",
            src.to_str().unwrap(),
            "--no-progress",
        ];
        if !extra.contains(&"--size") {
            args.extend(["--size", "16M"]);
        }
        if !extra.contains(&"--to") {
            args.extend(["--to", "127.0.0.1:9"]);
        }
        args.extend(extra);
        let mut send = Proc::vmstream("send", &args, &[]);
        let (status, lines) = send.wait_exit();
        assert_eq!(status.code(), Some(2), "{extra:?}: {}", send.stderr());
        assert!(
            send.stderr().contains(reason),
            "{extra:?}: {}",
            send.stderr()
        );
        assert!(
            !lines.iter().any(|l| l.starts_with("guest pid=")),
            "{extra:?}: {lines:?}"
        );
        assert!(!src.exists(), "{extra:?}: a guest was started");
    }
}

/// `send --size` on the memory file of a guest that still runs (one a failed migration
/// left behind, say) must not start a second guest there: that one truncated the memory
/// under the first, which died of SIGBUS.
#[test]
fn send_refuses_the_memory_file_of_a_running_guest() {
    let _g = serial();
    let dir = TmpDir::new("in-use");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let src_arg = src.to_str().unwrap();
    let mut first = Proc::vmstream(
        "guest",
        &[
            "guest",
            "run",
            "--memory-file",
            src_arg,
            "--size",
            "16M",
            "--workload",
            "random",
            "--rate",
            "2000",
            "--duration",
            "60s",
        ],
        &[],
    );
    let ready = first.wait_line("ready pid=");
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let to = format!("127.0.0.1:{port}");
    let mut send = Proc::vmstream(
        "send",
        &[
            "send",
            "--memory-file",
            src_arg,
            "--size",
            "16M",
            "--no-progress",
            "--to",
            &to,
        ],
        &[],
    );
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", send.stderr());
    assert!(
        send.stderr().contains(&format!(
            "the guest did not start: {src_arg} is in use by another running guest"
        )),
        "{}",
        send.stderr()
    );
    // The first guest runs on (a truncation killed it with SIGBUS).
    assert_source_guest_runs(&src);
    assert!(first.child.try_wait().unwrap().is_none(), "{ready}");
    assert_eq!(std::fs::metadata(&src).unwrap().len(), 16 << 20);
    recv.child.kill().unwrap();
    assert!(!dst.exists());
}

/// The same for a guest that `recv --resume` runs on the image it committed: a `send --size`
/// on that path truncated it under the receiver, which died of SIGBUS.
#[test]
fn send_refuses_the_memory_file_of_a_resumed_guest() {
    let _g = serial();
    let dir = TmpDir::new("in-use-resumed");
    let dst = dir.path("dst.img");
    let (mut recv, port) = start_receiver(&[
        "--memory-file",
        dst.to_str().unwrap(),
        "--resume",
        "--run-for",
        "60s",
    ]);
    let mut send = slow_sender(&dir, port, "64M", &[]);
    let _guest = guard_guest(&mut send);
    let (status, _) = send.wait_exit();
    assert!(status.success(), "{}", send.stderr());
    recv.wait_line("ready pid=");
    let to = "127.0.0.1:9";
    let mut second = Proc::vmstream(
        "send",
        &[
            "send",
            "--memory-file",
            dst.to_str().unwrap(),
            "--size",
            "16M",
            "--no-progress",
            "--to",
            to,
        ],
        &[],
    );
    let (status, _) = second.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", second.stderr());
    assert!(
        second
            .stderr()
            .contains("is in use by another running guest"),
        "{}",
        second.stderr()
    );
    // The resumed guest runs on.
    assert_source_guest_runs(&dst);
    assert!(
        recv.child.try_wait().unwrap().is_none(),
        "{}",
        recv.stderr()
    );
}

#[test]
fn mismatched_memory_size_is_refused_on_both_sides() {
    let _g = serial();
    let dir = TmpDir::new("size");
    let dst = dir.path("dst.img");
    let (mut recv, port) =
        start_receiver(&["--memory-file", dst.to_str().unwrap(), "--size", "32M"]);
    let mut send = slow_sender(&dir, port, "1G", &[]);
    let _guest = guard_guest(&mut send);
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1));
    let (r_status, _) = recv.wait_exit();
    assert_eq!(r_status.code(), Some(1));
    for err in [send.stderr(), recv.stderr()] {
        assert!(
            err.contains("guest memory size mismatch: source has 16777216 bytes, destination expects 33554432"),
            "{err}"
        );
    }
    assert_source_guest_runs(&dir.path("src.img"));
    assert_not_committed(&dir, &dst, None);
}

#[test]
fn wrong_protocol_version_and_garbage_are_refused_with_typed_errors() {
    use std::io::Write;
    use vmstream::migration::transport::{Frame, FrameReader};
    use vmstream::migration::wire::{
        DeltaWire, GuestKind, Hello, Message, RefuseCode, FRAME_HEADER_LEN, KNOWN_FEATURES,
    };
    let _g = serial();
    let dir = TmpDir::new("version");
    let dst = dir.path("dst.img");

    // A peer speaking version 9.
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let hello = Message::Hello(Hello {
        guest_kind: GuestKind::File,
        page_size: 4096,
        guest_size: 1 << 20,
        features: KNOWN_FEATURES,
        compression: vmstream_codec::Compression::None,
        delta: DeltaWire::Off,
        codec_version: Hello::CODEC_VERSION,
        sender_workers: 1,
        cache_bytes: 0,
        batch_pages: 128,
    });
    let mut frame = hello.to_frame();
    frame[FRAME_HEADER_LEN + 8] = 9; // version field of the body
    let body_end = frame.len() - 4;
    let crc = vmstream_simd::crc32c(&frame[FRAME_HEADER_LEN..body_end]);
    frame[body_end..].copy_from_slice(&crc.to_le_bytes());
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    conn.write_all(&frame).unwrap();
    let mut reader = FrameReader::new(conn, None);
    match reader.read_frame().unwrap() {
        Frame::Control(Message::HelloReply(r)) => {
            assert_eq!(r.refuse, RefuseCode::Version);
            assert_eq!(
                r.reason,
                format!(
                    "protocol version mismatch: we speak {}, peer speaks 9",
                    vmstream::migration::wire::PROTOCOL_VERSION
                )
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    expect_receiver_failure(&mut recv, &dst, &["protocol version mismatch"]);

    // Not a vmstream peer at all.
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    expect_receiver_failure(&mut recv, &dst, &["frame header checksum"]);
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());
}

/// A receiver into `dst` listening on every address (`0.0.0.0`), with `extra` arguments.
fn listen_on_all(dst: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "recv",
        "--listen",
        "0.0.0.0:0",
        "--memory-file",
        dst.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proc::vmstream("recv", &args, &[])
}

#[test]
fn an_insecure_listen_address_warns_that_the_stream_is_unauthenticated() {
    let _g = serial();
    let dir = TmpDir::new("listen");
    let dst = dir.path("dst.img");
    let mut recv = listen_on_all(&dst, &["--insecure"]);
    assert!(recv
        .wait_line("listening on ")
        .starts_with("listening on 0.0.0.0:"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !recv.stderr().contains("unauthenticated") {
        assert!(
            std::time::Instant::now() < deadline,
            "no warning: {}",
            recv.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The default stays on loopback, silently. (Each receiver has a memory file of its
    // own: a second receive into one that is being received into refuses to start.)
    let dst = dir.path("dst2.img");
    let (mut quiet, _) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    quiet.child.kill().unwrap();
    quiet.wait_exit();
    assert!(!quiet.stderr().contains("unauthenticated"));
    // So does any address with a key: only sources that hold it are admitted.
    let key = dir.path("key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let dst = dir.path("dst3.img");
    let mut keyed = listen_on_all(&dst, &["--auth-key-file", key.to_str().unwrap()]);
    keyed.wait_line("listening on ");
    keyed.child.kill().unwrap();
    keyed.wait_exit();
    assert!(
        !keyed.stderr().contains("unauthenticated"),
        "{}",
        keyed.stderr()
    );
}

/// The destination verifies the workload in the received image before it commits: an image
/// whose digest matches but whose guest could not resume (here a byte the source's guest
/// never wrote, in memory that must stay zero) is refused, nothing is committed, and the
/// source's guest keeps running.
#[test]
fn image_that_fails_the_workload_verify_is_never_committed() {
    use std::io::{Seek, SeekFrom, Write};
    let _g = serial();
    let dir = TmpDir::new("verify-refused");
    let (src, dst) = (dir.path("ext.img"), dir.path("dst.img"));
    let guest = start_external_guest(&src, &["--active", "50"]);
    // The last block is inactive (50% active): its bytes must stay zero.
    let mut f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.seek(SeekFrom::Start((16 << 20) - 1)).unwrap();
    f.write_all(&[0x5a]).unwrap();
    drop(f);
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap(), "--resume"]);
    let mut send = send_external_guest(&src, &guest, port, &[]);
    let (s_status, _) = send.wait_exit();
    assert!(!s_status.success(), "send must fail");
    assert!(
        send.stderr().contains("verify"),
        "send should report the verify refusal: {}",
        send.stderr()
    );
    let (r_status, _) = recv.wait_exit();
    assert!(!r_status.success(), "recv must fail");
    assert!(
        recv.stderr().contains("nothing committed"),
        "recv stderr: {}",
        recv.stderr()
    );
    assert!(!dst.exists(), "nothing may be committed");
    assert_eq!(dir.entries(), vec!["ext.img".to_string()]);
    // The source guest was resumed and keeps committing transactions.
    let tx = read_tx_count(&src);
    assert!(wait_tx_above(&src, tx) > tx);
    drop(guest);
}
