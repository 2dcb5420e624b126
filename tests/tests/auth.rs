//! Peer authentication (`--auth-key-file`) with the real binary: the same key on both sides
//! migrates exactly (over two channels, each authenticated); a different key, or a key on
//! one side only, is refused with the cause named and the refused source's guest keeps
//! running; a destination with a key goes on listening for the source that holds it.

use std::path::Path;

use vmstream_tests::*;

fn write_key(path: &Path, byte: u8) {
    std::fs::write(path, [byte; 32]).unwrap();
}

/// A sender of a 16 MiB dbsim guest on `src` (in `dir`) to `port` with `extra`
/// arguments.
fn sender_of(dir: &TmpDir, src: &str, port: u16, extra: &[&str]) -> Proc {
    sender_with_env(dir, src, port, extra, &[])
}

/// [`sender_of`] with `envs` added to its environment.
fn sender_with_env(
    dir: &TmpDir,
    src: &str,
    port: u16,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    let to = format!("127.0.0.1:{port}");
    let src = dir.path(src);
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
        "30s",
        "--no-progress",
        "--to",
        &to,
    ];
    args.extend_from_slice(extra);
    Proc::vmstream("send", &args, envs)
}

/// A receiver into `dst` that requires `key`, with `extra` arguments.
fn keyed_receiver(dst: &Path, key: &Path, extra: &[&str]) -> (Proc, u16) {
    let mut args = vec![
        "--memory-file",
        dst.to_str().unwrap(),
        "--auth-key-file",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    start_receiver(&args)
}

/// Migrates the guest on `src.img` of `dir` with `key` (and `extra` sender arguments) to the
/// keyed receiver `recv` on `port`: both must succeed and the committed image must equal
/// the source's memory at the pause.
fn migrate_keyed(dir: &TmpDir, recv: &mut Proc, port: u16, key: &Path, extra: &[&str]) {
    let mut args = vec!["--auth-key-file", key.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut send = sender_of(dir, "src.img", port, &args);
    let _guest = KillPid(guest_pid(&mut send));
    let (s_status, _) = send.wait_exit();
    assert!(s_status.success(), "send failed: {}", send.stderr());
    let (r_status, _) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    assert!(files_identical(&dir.path("src.img"), &dir.path("dst.img")));
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
    let (mut recv, port) = keyed_receiver(&dst, &key, &["--stats-json", rj.to_str().unwrap()]);
    migrate_keyed(
        &dir,
        &mut recv,
        port,
        &key,
        &["--channels", "2", "--stats-json", sj.to_str().unwrap()],
    );
    let (s, r) = (read_stats(&sj), read_stats(&rj));
    assert_eq!(s["outcome"], "committed");
    assert_eq!(r["outcome"], "committed");
    assert_eq!(s["settings"]["authenticated"], "true");
    assert_eq!(r["settings"]["authenticated"], "true");
    assert_eq!(r["settings"]["channels"], "2");
}

/// Runs a sender (of `src`) whose authentication must fail: it exits 1 naming `cause`,
/// and its guest keeps running.
fn refused_sender(dir: &TmpDir, port: u16, src: &str, key: Option<&Path>, cause: &str) {
    let mut args = vec![];
    if let Some(k) = key {
        args.extend(["--auth-key-file", k.to_str().unwrap()]);
    }
    let mut send = sender_of(dir, src, port, &args);
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", send.stderr());
    assert!(send.stderr().contains(cause), "{}", send.stderr());
    let src = dir.path(src);
    assert_source_guest_runs(&src);
}

/// A destination with a key refuses a source with another key, a source without one and
/// a stranger, each with its cause, keeps listening through all of them and commits only
/// the migration of the source that holds its key.
#[test]
fn a_keyed_destination_refuses_wrong_and_missing_keys_and_still_takes_its_source() {
    use std::io::Write;
    let _g = serial();
    let dir = TmpDir::new("auth-refused");
    let (key, other, dst) = (dir.path("key"), dir.path("other"), dir.path("dst.img"));
    write_key(&key, 1);
    write_key(&other, 2);
    let (mut recv, port) = keyed_receiver(&dst, &key, &[]);
    refused_sender(
        &dir,
        port,
        "wrong.img",
        Some(&other),
        "the destination does not hold this key",
    );
    recv.wait_stderr("the destination's proof does not match this source's key; still listening");
    refused_sender(
        &dir,
        port,
        "keyless.img",
        None,
        "this destination requires authentication: run send with --auth-key-file",
    );
    recv.wait_stderr("this destination requires authentication: run send with --auth-key-file and the destination's key; still listening");
    let mut stranger = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stranger
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    recv.wait_stderr("before authenticating: frame header checksum");
    assert!(!dst.exists());
    // The source with the key migrates exactly.
    migrate_keyed(&dir, &mut recv, port, &key, &[]);
}

#[test]
fn a_key_on_the_source_only_is_refused_on_both_sides() {
    let _g = serial();
    let dir = TmpDir::new("auth-keyless-dest");
    let (key, dst) = (dir.path("key"), dir.path("dst.img"));
    write_key(&key, 1);
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    refused_sender(
        &dir,
        port,
        "src.img",
        Some(&key),
        "the source authenticates (--auth-key-file) but this destination has no key",
    );
    expect_receiver_failure(&mut recv, &dst, &["this destination has no key"]);
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

/// A FIFO as the key file (no one writes it) is refused at once as a usage error, with
/// what it is, rather than read forever; nothing is created. Waited for 10 s only to tell a
/// hang from a refusal.
#[test]
fn a_fifo_as_the_key_file_is_refused_at_once() {
    let _g = serial();
    let dir = TmpDir::new("auth-fifo");
    let key = dir.path("key");
    let made = std::process::Command::new("mkfifo")
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
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
    let Some((status, lines)) = recv.exit_within(std::time::Duration::from_secs(10)) else {
        panic!("recv still reads the FIFO key file after 10 s")
    };
    assert_eq!(status.code(), Some(2), "{}", recv.stderr());
    let expected = format!(
        "the key file {} is a FIFO, not a regular file",
        key.display()
    );
    assert!(recv.stderr().contains(&expected), "{}", recv.stderr());
    assert!(lines.is_empty(), "{lines:?}");
    assert_eq!(dir.entries(), ["key"]);
}

/// With a key every frame after the exchange is sealed: a byte changed on the wire (the
/// sender's test hook flips one inside round 0) fails authentication at the destination,
/// which commits nothing; the source learns why and its guest keeps running.
#[test]
fn a_byte_changed_on_the_wire_fails_authentication_and_rolls_back() {
    let _g = serial();
    let dir = TmpDir::new("auth-tamper");
    let (key, dst) = (dir.path("key"), dir.path("dst.img"));
    write_key(&key, 1);
    let (mut recv, port) = keyed_receiver(&dst, &key, &[]);
    // Uncompressed, slowed down: the flipped byte lands inside round 0's packets.
    let mut send = sender_with_env(
        &dir,
        "src.img",
        port,
        &[
            "--compress",
            "none",
            "--xbzrle",
            "off",
            "--max-bandwidth",
            "64M",
            "--auth-key-file",
            key.to_str().unwrap(),
        ],
        &[("VMSTREAM_TEST_CORRUPT_AT", "300000")],
    );
    let src = dir.path("src.img");
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", send.stderr());
    let err = expect_receiver_failure(&mut recv, &dst, &["failed authentication"]);
    assert!(err.contains("sealed record"), "{err}");
    assert!(
        send.stderr().contains("failed authentication"),
        "the sender did not learn why: {}",
        send.stderr()
    );
    assert_source_guest_runs(&src);
}

/// A connection that says nothing is refused after 10 s (its `--io-timeout` otherwise), and
/// connections that say nothing do not hold up a keyed destination meanwhile: each proves
/// the key (or fails to) on its own, so the source that holds it is served at once.
#[test]
fn silent_connections_cannot_hold_a_keyed_destination() {
    let _g = serial();
    let dir = TmpDir::new("auth-silent");
    let (key, dst) = (dir.path("key"), dir.path("dst.img"));
    write_key(&key, 1);
    let (mut recv, port) = keyed_receiver(&dst, &key, &[]);
    let first = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    recv.wait_stderr("before authenticating: no data from peer within 10s");
    drop(first);
    // Served one after the other, these four would hold the source for 40 s, past the
    // 30 s its --io-timeout waits for the destination's challenge.
    let _silent: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let connections = || recv.stderr().matches("connection from").count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while connections() < 5 {
        assert!(std::time::Instant::now() < deadline, "{}", recv.stderr());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    migrate_keyed(&dir, &mut recv, port, &key, &[]);
}

/// A fake destination that answers the source's key exchange with an unsealed `HelloReply`
/// accepting the migration: the source names what happened (it used to report
/// "destination refused the migration (None): "), fails, and its guest keeps running.
#[test]
fn an_unsealed_acceptance_of_a_keyed_source_is_named() {
    use std::io::Write;
    use vmstream::migration::transport::{Frame, FrameReader};
    use vmstream::migration::wire::{HelloReply, Message, RefuseCode};
    let _g = serial();
    let dir = TmpDir::new("auth-unsealed");
    let key = dir.path("key");
    write_key(&key, 3);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(WAIT)).unwrap();
        let first = FrameReader::new(conn.try_clone().unwrap(), None).read_frame();
        let accept = Message::HelloReply(HelloReply {
            refuse: RefuseCode::None,
            receiver_workers: 1,
            resumes: false,
            reason: String::new(),
        });
        (&conn).write_all(&accept.to_frame()).unwrap();
        (first, conn)
    });
    let mut send = sender_of(
        &dir,
        "src.img",
        port,
        &["--auth-key-file", key.to_str().unwrap()],
    );
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    let (first, _conn) = fake.join().unwrap();
    assert!(
        matches!(first, Ok(Frame::Control(Message::AuthHello(_)))),
        "{first:?}"
    );
    let err = send.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("unsealed reply on an authenticated connection"),
        "{err}"
    );
    assert!(!err.contains("(None)"), "{err}");
    assert_source_guest_runs(&dir.path("src.img"));
}
