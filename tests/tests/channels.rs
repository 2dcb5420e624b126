//! Parallel channels (`vmstream send --channels N`): a migration over two connections is
//! exact, a corrupted packet on one channel fails the whole migration cleanly, and
//! connections that do not belong to the migration in progress are refused.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use vmstream::migration::transport::{Frame, FrameReader};
use vmstream::migration::wire::{
    Abort, AbortCode, ChannelHello, DeltaWire, GuestKind, Hello, HelloReply, Message, RefuseCode,
    FEATURE_DISKS, FEATURE_HANDOVER, FEATURE_MEMORY_REGIONS, FEATURE_POSTCOPY, KNOWN_FEATURES,
};

use vmstream_tests::*;

/// Arguments of a sender of a small dbsim guest to `port` over `channels` channels.
fn sender_args<'a>(
    src: &'a Path,
    json: &'a Path,
    to: &'a str,
    channels: &'a str,
    bandwidth: &'a str,
) -> Vec<&'a str> {
    vec![
        "send",
        "--memory-file",
        src.to_str().unwrap(),
        "--size",
        "32M",
        "--workload",
        "dbsim",
        "--rate",
        "5000",
        "--warmup",
        "300ms",
        "--channels",
        channels,
        "--max-bandwidth",
        bandwidth,
        "--io-timeout",
        "20s",
        "--no-progress",
        "--stats-json",
        json.to_str().unwrap(),
        "--to",
        to,
    ]
}

/// Waits for `send` (of the guest on `src`) and `recv` (into `dst`) to commit over
/// `channels` channels, byte-exact.
fn expect_committed(send: &mut Proc, recv: &mut Proc, channels: usize, src: &Path, dst: &Path) {
    let _guest = KillPid(guest_pid(send));
    let (status, _) = send.wait_exit();
    assert!(status.success(), "send failed: {}", send.stderr());
    let (r_status, _) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    assert!(
        recv.stderr()
            .contains(&format!("{channels} channels bound")),
        "{}",
        recv.stderr()
    );
    assert!(files_identical(src, dst), "images differ");
}

#[test]
fn two_channels_migrate_exactly() {
    let _g = serial();
    let dir = TmpDir::new("chan2");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (sj, rj) = (dir.path("send.json"), dir.path("recv.json"));
    let (mut recv, port) = start_receiver(&[
        "--memory-file",
        dst.to_str().unwrap(),
        "--stats-json",
        rj.to_str().unwrap(),
    ]);
    let to = format!("127.0.0.1:{port}");
    // 32 MiB at 48 MiB/s in total: a few rounds, shared by both channels.
    let mut send = Proc::vmstream("send", &sender_args(&src, &sj, &to, "2", "48M"), &[]);
    expect_committed(&mut send, &mut recv, 2, &src, &dst);
    let (s, r) = (read_stats(&sj), read_stats(&rj));
    assert_eq!(s["outcome"], "committed");
    assert_eq!(r["outcome"], "committed");
    assert_eq!(s["digest"], r["digest"]);
    assert_eq!(s["rounds"], r["rounds"]);
    assert_eq!(s["settings"]["channels"], "2");
    assert_eq!(r["settings"]["channels"], "2");
    // Both channels carried a share of the pages: every byte one side wrote, the other read.
    let per_channel: Vec<u64> = s["channel_bytes"]
        .as_array()
        .expect("channel_bytes")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(per_channel.len(), 2);
    assert!(
        per_channel.iter().all(|&b| b > 4 << 20),
        "pages not spread over the channels: {per_channel:?}"
    );
    assert_eq!(per_channel.iter().sum::<u64>(), s["bytes_on_wire"]);
    assert_eq!(s["bytes_on_wire"], r["bytes_on_wire"]);
    assert!(dir.entries().iter().all(|e| !e.contains("vmstream-recv")));
}

/// Sixteen keyed channels bind over a 600 ms round trip: the source binds them all at once.
/// (One after the other, two round trips each, the last would open about 18 s after the
/// destination accepted it, past the 10 s a connection has to open.) The migration then
/// converges within a downtime limit the round trip allows: its estimate counts the round
/// trip apart from the bandwidth (counted into it, every round looked too slow and a busy
/// machine iterated for minutes).
#[test]
fn sixteen_keyed_channels_bind_over_a_long_round_trip() {
    let _g = serial();
    let dir = TmpDir::new("chan16-rtt");
    let (src, dst, key) = (dir.path("src.img"), dir.path("dst.img"), dir.path("key"));
    std::fs::write(&key, [7u8; 32]).unwrap();
    let sj = dir.path("send.json");
    let (mut recv, port) = start_receiver(&[
        "--memory-file",
        dst.to_str().unwrap(),
        "--auth-key-file",
        key.to_str().unwrap(),
    ]);
    let proxy = DelayProxy::start(port, Duration::from_millis(300));
    let to = format!("127.0.0.1:{}", proxy.port);
    let mut args = sender_args(&src, &sj, &to, "16", "1G");
    args.extend([
        "--auth-key-file",
        key.to_str().unwrap(),
        "--downtime-limit",
        "3s",
    ]);
    let mut send = Proc::vmstream("send", &args, &[]);
    expect_committed(&mut send, &mut recv, 16, &src, &dst);
    let s = read_stats(&sj);
    assert_eq!(s["converged"], true, "{}", send.stderr());
    let rtt: f64 = s["settings"]["handshake_round_trip_ms"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        rtt >= 600.0,
        "round trip {rtt} ms through a 2 x 300 ms proxy"
    );
    assert!(
        !send.stderr().contains("downtime limit"),
        "{}",
        send.stderr()
    );
}

/// A downtime limit shorter than half the round trip cannot be met: the source says so at
/// the handshake, and `--timeout` ends the migration; the guest keeps running and nothing
/// is committed.
#[test]
fn a_downtime_limit_below_half_the_round_trip_is_reported() {
    let _g = serial();
    let dir = TmpDir::new("rtt-limit");
    let (src, dst, sj) = (
        dir.path("src.img"),
        dir.path("dst.img"),
        dir.path("send.json"),
    );
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let proxy = DelayProxy::start(port, Duration::from_millis(300));
    let to = format!("127.0.0.1:{}", proxy.port);
    let mut args = sender_args(&src, &sj, &to, "1", "1G");
    args.extend(["--downtime-limit", "250ms", "--timeout", "3s"]);
    let mut send = Proc::vmstream("send", &args, &[]);
    let _guest = KillPid(guest_pid(&mut send));
    send.wait_stderr("no switchover can stay within the 250 ms downtime limit");
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(3), "{}", send.stderr());
    let s = read_stats(&sj);
    assert_eq!(s["outcome"], "cancelled");
    assert!(s["rounds"].as_u64().unwrap() >= 2, "{s}");
    expect_receiver_failure(
        &mut recv,
        &dst,
        &["source aborted (Cancelled)", "did not converge"],
    );
    assert_source_guest_runs(&src);
}

#[test]
fn corrupted_packet_on_one_channel_is_refused() {
    let _g = serial();
    let dir = TmpDir::new("chan-corrupt");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    std::fs::write(&dst, b"previous image").unwrap();
    let sj = dir.path("send.json");
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let to = format!("127.0.0.1:{port}");
    // A byte inside an early packet of channel 1 (channel 0 stays intact).
    let mut send = Proc::vmstream(
        "send",
        &sender_args(&src, &sj, &to, "2", "64M"),
        &[("VMSTREAM_TEST_CORRUPT_AT", "1:200000")],
    );
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "stderr: {}", send.stderr());
    let (r_status, _) = recv.wait_exit();
    assert_eq!(r_status.code(), Some(1));
    // Almost always inside a packet's payload (the codec's crc32c); should the byte land in
    // one of the few frame headers, the frame header checksum names it (with the channel).
    let names_checksum =
        |e: &str| e.contains("crc32c") || e.contains("channel 1: frame header checksum");
    let err = recv.stderr();
    assert!(
        names_checksum(&err) && err.contains("nothing committed"),
        "receiver error does not name the checksum: {err}"
    );
    assert!(
        names_checksum(&send.stderr()),
        "the sender did not learn why: {}",
        send.stderr()
    );
    // The source guest keeps running; the destination is as it was.
    assert_source_guest_runs(&src);
    assert_eq!(std::fs::read(&dst).unwrap(), b"previous image");
    let mut entries = dir.entries();
    entries.retain(|e| e != "send.json");
    assert_eq!(entries, vec!["dst.img".to_string(), "src.img".to_string()]);
}

/// A migration `Hello` for a 1 MiB guest announcing channels.
fn hello() -> Message {
    Message::Hello(Hello {
        guest_kind: GuestKind::File,
        page_size: 4096,
        guest_size: 1 << 20,
        // Everything a copying migration announces (a handover is another kind, local.rs),
        // but disks and memory regions (a `Disks` or `MemoryRegions` message would have to
        // follow, disks.rs, qemu.rs) and post-copy (a receiver without --resume refuses it,
        // postcopy.rs).
        features: KNOWN_FEATURES
            & !FEATURE_HANDOVER
            & !FEATURE_DISKS
            & !FEATURE_MEMORY_REGIONS
            & !FEATURE_POSTCOPY,
        compression: vmstream_codec::Compression::None,
        delta: DeltaWire::Off,
        codec_version: Hello::CODEC_VERSION,
        sender_workers: 1,
        cache_bytes: 0,
        batch_pages: 128,
    })
}

fn channel_hello(id: u8, index: u16, count: u16) -> Message {
    Message::ChannelHello(ChannelHello {
        migration_id: [id; 16],
        index,
        count,
    })
}

/// Opens a connection, sends `frames`, returns the reply and the open connection.
fn exchange(port: u16, frames: &[Message]) -> (HelloReply, TcpStream) {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    for f in frames {
        conn.write_all(&f.to_frame()).unwrap();
    }
    let mut reader = FrameReader::new(conn.try_clone().unwrap(), None);
    match reader.read_frame().unwrap() {
        Frame::Control(Message::HelloReply(r)) => (r, conn),
        other => panic!("expected a hello reply, got {other:?}"),
    }
}

#[test]
fn stray_channel_connections_are_refused() {
    let _g = serial();
    let dir = TmpDir::new("chan-stray");
    let dst = dir.path("dst.img");

    // A channel with no migration in progress: refused, the receiver gives up cleanly.
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let (reply, _conn) = exchange(port, &[channel_hello(7, 1, 2)]);
    assert_eq!(reply.refuse, RefuseCode::Channel);
    assert!(
        reply.reason.contains("no migration is in progress"),
        "{}",
        reply.reason
    );
    expect_receiver_failure(&mut recv, &dst, &["no migration is in progress"]);

    // A two-channel migration (id 0xaa...) in its binding phase: strays are refused with
    // their reason while the destination keeps waiting for the real channel 1.
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let (reply, mut primary) = exchange(port, &[hello(), channel_hello(0xaa, 0, 2)]);
    assert_eq!(reply.refuse, RefuseCode::None, "{}", reply.reason);
    let ours = "aa".repeat(16);
    let refusals = [
        (
            channel_hello(0xbb, 1, 2),
            format!(
                "stray channel 1: it belongs to migration {}, this destination is receiving migration {ours}",
                "bb".repeat(16)
            ),
        ),
        (
            channel_hello(0xaa, 0, 2),
            format!("duplicate channel 0 of migration {ours}"),
        ),
        (
            channel_hello(0xaa, 1, 3),
            "channel 1 says the migration has 3 channels, channel 0 said 2".to_string(),
        ),
        (hello(), format!("a hello, but migration {ours} is in progress here")),
    ];
    for (frame, reason) in refusals {
        let (reply, _) = exchange(port, &[frame]);
        assert_eq!(reply.refuse, RefuseCode::Channel);
        assert!(
            reply.reason.contains(&reason),
            "{} / {reason}",
            reply.reason
        );
    }
    // The real channel 1 binds; a second channel 1 would now be a duplicate, but the
    // destination stops listening once every channel is bound.
    let (reply, _chan1) = exchange(port, &[channel_hello(0xaa, 1, 2)]);
    assert_eq!(reply.refuse, RefuseCode::None, "{}", reply.reason);
    // The source gives up: the destination rolls back and names every refusal.
    primary
        .write_all(
            &Message::Abort(Abort {
                code: AbortCode::Cancelled,
                reason: "test over".into(),
            })
            .to_frame(),
        )
        .unwrap();
    let err = expect_receiver_failure(&mut recv, &dst, &["source aborted"]);
    assert_eq!(
        err.matches("refused a channel connection").count(),
        4,
        "{err}"
    );
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());

    // A source that gives up while its channels bind (e.g. one was refused) ends the
    // binding at once: the destination reports the abort, not a binding timeout.
    let (mut recv, port) = start_receiver(&[
        "--memory-file",
        dst.to_str().unwrap(),
        "--io-timeout",
        "30s",
    ]);
    let (reply, mut primary) = exchange(port, &[hello(), channel_hello(0xcc, 0, 3)]);
    assert_eq!(reply.refuse, RefuseCode::None, "{}", reply.reason);
    let (reply, _chan1) = exchange(port, &[channel_hello(0xcc, 1, 3)]);
    assert_eq!(reply.refuse, RefuseCode::None, "{}", reply.reason);
    primary
        .write_all(
            &Message::Abort(Abort {
                code: AbortCode::SourceError,
                reason: "destination refused channel 2".into(),
            })
            .to_frame(),
        )
        .unwrap();
    expect_receiver_failure(
        &mut recv,
        &dst,
        &["source aborted", "destination refused channel 2"],
    );
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());
}

#[test]
fn a_refused_channel_aborts_the_whole_migration() {
    let _g = serial();
    let dir = TmpDir::new("chan-refused");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let sj = dir.path("send.json");
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let to = format!("127.0.0.1:{port}");
    // Byte 5 of channel 1 is inside its channel hello's frame header: the destination
    // refuses that connection, the sender gives up and tells it on channel 0.
    let mut send = Proc::vmstream(
        "send",
        &sender_args(&src, &sj, &to, "2", "64M"),
        &[("VMSTREAM_TEST_CORRUPT_AT", "1:5")],
    );
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "stderr: {}", send.stderr());
    assert!(
        send.stderr().contains(
            "destination refused channel 1: expected a channel hello: frame header checksum"
        ),
        "{}",
        send.stderr()
    );
    let (r_status, _) = recv.wait_exit();
    assert_eq!(r_status.code(), Some(1));
    let err = recv.stderr();
    assert!(
        err.contains("refused a channel connection") && err.contains("source aborted"),
        "{err}"
    );
    assert_source_guest_runs(&src);
    assert!(!dst.exists());
}
