//! What a peer without a key can make a keyless receiver spend: a `Hello` claiming a huge
//! guest is refused in the `HelloReply` above the receiver's size cap (default: the host's
//! physical memory), and a claim under the cap allocates nothing sized from the guest before
//! its pages arrive. A raw client plays the peer; the receiver's resident memory is read
//! from /proc (a generous bound, not a performance figure).

use std::io::Write;
use std::net::TcpStream;

use vmstream::migration::transport::{Frame, FrameReader};
use vmstream::migration::wire::{
    DeltaWire, GuestKind, Hello, HelloReply, Message, RefuseCode, RoundEnd, FEATURE_MEMORY_DIGEST,
};
use vmstream_tests::*;

/// The guest size the peer claims.
const TIB: u64 = 1 << 40;

/// Resident memory a receiver may reach in these tests (generous: a few tens of MB), far
/// below the page hashes of a 1 TiB claim (4 GiB).
const RSS_BOUND: u64 = 200 << 20;

/// A raw peer's connection to a receiver on `port`: sends a `Hello` for a file-backed guest
/// of `size` bytes and returns the reply with the connection.
fn hello_claiming(port: u16, size: u64) -> (HelloReply, TcpStream, FrameReader<TcpStream>) {
    let hello = Message::Hello(Hello {
        guest_kind: GuestKind::File,
        page_size: 4096,
        guest_size: size,
        features: FEATURE_MEMORY_DIGEST,
        compression: vmstream_codec::Compression::None,
        delta: DeltaWire::Off,
        codec_version: Hello::CODEC_VERSION,
        sender_workers: 1,
        cache_bytes: 0,
        batch_pages: 128,
    });
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    conn.write_all(&hello.to_frame()).unwrap();
    let mut reader = FrameReader::new(conn.try_clone().unwrap(), None);
    match reader.read_frame() {
        Ok(Frame::Control(Message::HelloReply(r))) => (r, conn, reader),
        other => panic!("expected a hello reply, got {other:?}"),
    }
}

/// A field of /proc/PID/status in bytes (`VmRSS`, `VmHWM`: given in kB).
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    line.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// A keyless receiver without `--size` refuses a `Hello` claiming 1 TiB in its reply (guest
/// size, its limit and how to raise it named) before it creates anything: it used to accept
/// the claim and allocate about 4 GiB of page hashes before any page came.
#[test]
fn a_hello_claiming_a_terabyte_is_refused_by_the_default_cap() {
    let _g = serial();
    let host = vmstream::migration::config::host_memory();
    if host >= TIB {
        eprintln!("skipping: this host has {host} bytes of memory, 1 TiB is under its cap");
        return;
    }
    let dir = TmpDir::new("hello-1tib");
    let dst = dir.path("dst.img");
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let (reply, _conn, _reader) = hello_claiming(port, TIB);
    assert_eq!(reply.refuse, RefuseCode::GuestSize, "{reply:?}");
    assert!(
        reply
            .reason
            .contains(&format!("above this destination's limit of {host} bytes")),
        "{}",
        reply.reason
    );
    assert!(
        reply.reason.contains("--max-guest-size"),
        "{}",
        reply.reason
    );
    let err = expect_receiver_failure(&mut recv, &dst, &["above this destination's limit"]);
    assert!(err.contains("GuestSize"), "{err}");
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());
}

/// The same 1 TiB claim with the cap raised (`--max-guest-size 1T`) is accepted, and the
/// receiver, into its rounds, holds nothing sized from it before pages arrive: its resident
/// memory peaked at 4.2 GB before (the page hashes alone are 4 GiB for 1 TiB).
#[test]
fn an_accepted_terabyte_claim_allocates_nothing_before_its_pages() {
    let _g = serial();
    let dir = TmpDir::new("hello-1tib-accepted");
    let dst = dir.path("dst.img");
    let (mut recv, port) = start_receiver(&[
        "--memory-file",
        dst.to_str().unwrap(),
        "--max-guest-size",
        "1T",
    ]);
    let (reply, mut conn, mut reader) = hello_claiming(port, TIB);
    assert_eq!(reply.refuse, RefuseCode::None, "{reply:?}");
    // An empty round 0: its acknowledgement shows the receiver set up its rounds (page
    // hashes, decoders) and applied every page there was, none.
    let end = Message::RoundEnd(RoundEnd {
        round: 0,
        records: 0,
        packets: 0,
        packet_bytes: 0,
        flags: 0,
    });
    conn.write_all(&end.to_frame()).unwrap();
    match reader.read_frame() {
        Ok(Frame::Control(Message::RoundAck(a))) => assert_eq!(a.round, 0),
        other => panic!("expected the round's acknowledgement, got {other:?}"),
    }
    let (rss, peak) = (
        status_bytes(recv.pid(), "VmRSS"),
        status_bytes(recv.pid(), "VmHWM"),
    );
    assert!(
        peak < RSS_BOUND,
        "the receiver holds {rss} bytes resident, peaked at {peak}, before any page"
    );
    drop((conn, reader));
    expect_receiver_failure(&mut recv, &dst, &["nothing committed"]);
}
