//! A peer, or anyone on the path, that lets the bytes of the switchover through one at a
//! time or not at all: the source guest resumes within the frame deadline (`--io-timeout`)
//! or the pause bound (`--pause-timeout`), both sides fail, nothing is committed.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmstream::migration::wire::{FrameHeader, FrameType, Message, FRAME_HEADER_LEN};
use vmstream_tests::*;

/// What the proxy does with a direction's bytes once the source's final round passed it.
#[derive(Clone, Copy)]
enum Then {
    /// Forwards one byte every this long.
    Trickle(Duration),
    /// Forwards nothing (drops what arrives); closes the other side at the end.
    Hold,
}

/// A proxy on 127.0.0.1 for one (unauthenticated) connection to `target` that forwards
/// both ways as they come until the source's final `RoundEnd` went through, and from then
/// on treats what the source sends as `to_dest` says and what the destination sends as
/// `to_source` says.
struct SwitchoverProxy {
    port: u16,
    /// When the final round went through.
    switched: Arc<Mutex<Option<Instant>>>,
}

impl SwitchoverProxy {
    fn start(target: u16, to_dest: Then, to_source: Then) -> SwitchoverProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let switched = Arc::new(Mutex::new(None));
        let at = Arc::clone(&switched);
        std::thread::spawn(move || {
            let Ok((source, _)) = listener.accept() else {
                return;
            };
            let dest = TcpStream::connect(("127.0.0.1", target)).expect("connect to recv");
            let (s2, d2) = (source.try_clone().unwrap(), dest.try_clone().unwrap());
            let back = Arc::clone(&at);
            std::thread::spawn(move || replies(d2, s2, &back, to_source));
            frames(source, dest, &at, to_dest);
        });
        SwitchoverProxy { port, switched }
    }

    /// When the final round went through (panics if it has not).
    fn switched_at(&self) -> Instant {
        self.switched
            .lock()
            .unwrap()
            .expect("the final round never started")
    }
}

/// Source to destination: whole frames until the final `RoundEnd` (the switch is marked
/// before it is forwarded, so that every reply to it is already treated as `then`).
fn frames(mut from: TcpStream, mut to: TcpStream, at: &Mutex<Option<Instant>>, then: Then) {
    loop {
        let mut h = [0u8; FRAME_HEADER_LEN];
        if from.read_exact(&mut h).is_err() {
            return end(&to);
        }
        let header = FrameHeader::decode(&h).expect("the source sends frames");
        let mut payload = vec![0u8; header.len as usize];
        if from.read_exact(&mut payload).is_err() {
            return end(&to);
        }
        let last = header.kind == FrameType::RoundEnd
            && matches!(Message::decode(header.kind, &payload), Ok(Message::RoundEnd(e)) if e.is_final());
        if last {
            *at.lock().unwrap() = Some(Instant::now());
        }
        if to
            .write_all(&h)
            .and_then(|()| to.write_all(&payload))
            .is_err()
        {
            return;
        }
        if last {
            return after(from, to, then);
        }
    }
}

/// Destination to source: as it comes until the switch, then as `then` says.
fn replies(mut from: TcpStream, mut to: TcpStream, at: &Mutex<Option<Instant>>, then: Then) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return end(&to),
            Ok(n) => n,
        };
        if at.lock().unwrap().is_some() {
            return after_chunk(&buf[..n], from, to, then);
        }
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

fn after(from: TcpStream, to: TcpStream, then: Then) {
    after_chunk(&[], from, to, then)
}

/// `first`, then everything `from` sends, treated as `then` says.
fn after_chunk(first: &[u8], mut from: TcpStream, mut to: TcpStream, then: Then) {
    let mut chunk = first.to_vec();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if let Then::Trickle(gap) = then {
            for b in &chunk {
                std::thread::sleep(gap);
                if to.write_all(std::slice::from_ref(b)).is_err() {
                    return;
                }
            }
        }
        chunk = match from.read(&mut buf) {
            Ok(0) | Err(_) => return end(&to),
            Ok(n) => buf[..n].to_vec(),
        };
    }
}

fn end(to: &TcpStream) {
    let _ = to.shutdown(Shutdown::Both);
}

/// A migration of a 16 MiB guest through `proxy` to `recv`, with `extra` send arguments;
/// returns how long after the final round began the sender exited, with its status.
fn migrate_through(
    dir: &TmpDir,
    proxy: &SwitchoverProxy,
    extra: &[&str],
) -> (Proc, KillPid, Duration, std::process::ExitStatus) {
    let to = format!("127.0.0.1:{}", proxy.port);
    let args = random_guest_send_args(&dir.path("src.img"), &to, extra);
    let mut send = Proc::vmstream(
        "send",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    );
    let guest = KillPid(guest_pid(&mut send));
    let (status, _) = send
        .exit_within(Duration::from_secs(120))
        .unwrap_or_else(|| panic!("send did not end: {}", send.stderr()));
    let after = proxy.switched_at().elapsed();
    (send, guest, after, status)
}

/// The attack: after the final round both directions pass one byte every 300 ms,
/// which a timeout per read never notices. With `--io-timeout 2s` (and a pause bound far
/// off) the source gives up on the final acknowledgement after 2 s and resumes its guest,
/// and the destination gives up on the guest state in the same time: nothing committed.
#[test]
fn a_switchover_trickled_byte_by_byte_fails_within_the_frame_deadline() {
    let _g = serial();
    let dir = TmpDir::new("trickle");
    let dst = dir.path("dst.img");
    let (mut recv, port) =
        start_receiver(&["--memory-file", dst.to_str().unwrap(), "--io-timeout", "2s"]);
    let gap = Then::Trickle(Duration::from_millis(300));
    let proxy = SwitchoverProxy::start(port, gap, gap);
    let extra = ["--io-timeout", "2s", "--pause-timeout", "60s"];
    let (send, _guest, after, status) = migrate_through(&dir, &proxy, &extra);
    assert_eq!(status.code(), Some(1), "stderr: {}", send.stderr());
    assert!(
        send.stderr().contains("no data from peer within 2s"),
        "{}",
        send.stderr()
    );
    // A generous bound that proves no wait outlasted its frame: about 2 s are expected,
    // the trickled acknowledgement alone would take over 14.
    assert!(
        after < Duration::from_secs(6),
        "the sender ended {after:?} after the pause"
    );
    assert_source_guest_runs(&dir.path("src.img"));
    let (r_status, _) = recv
        .exit_within(Duration::from_secs(120))
        .expect("recv ends");
    let r_after = proxy.switched_at().elapsed();
    assert_eq!(r_status.code(), Some(1), "{}", recv.stderr());
    let err = recv.stderr();
    assert!(
        err.contains("no data from peer within 2s") && err.contains("nothing committed"),
        "{err}"
    );
    assert!(
        r_after < Duration::from_secs(6),
        "recv ended {r_after:?} after the switch"
    );
    assert!(!dst.exists(), "committed");
    assert_eq!(dir.entries(), vec!["src.img".to_string()]);
}

/// Each frame comes within the I/O timeout, but the guest state and digest never reach the
/// destination and the final acknowledgement trickles back: the pause bound
/// (`--pause-timeout 1s`) resumes the source guest long before the I/O timeout would, and
/// the migration fails with nothing committed.
#[test]
fn a_pause_past_the_pause_timeout_resumes_the_source_guest() {
    let _g = serial();
    let dir = TmpDir::new("pause-bound");
    let dst = dir.path("dst.img");
    let (mut recv, port) = start_receiver(&[
        "--memory-file",
        dst.to_str().unwrap(),
        "--io-timeout",
        "10s",
    ]);
    let proxy = SwitchoverProxy::start(
        port,
        Then::Hold,
        // The 48-byte acknowledgement in under 5 s: within the I/O timeout.
        Then::Trickle(Duration::from_millis(100)),
    );
    let extra = ["--io-timeout", "10s", "--pause-timeout", "1s"];
    let (send, _guest, after, status) = migrate_through(&dir, &proxy, &extra);
    assert_eq!(status.code(), Some(1), "stderr: {}", send.stderr());
    assert!(
        send.stderr()
            .contains("did not commit within 1s of the guest's pause"),
        "{}",
        send.stderr()
    );
    // About 1 s expected; without the bound the acknowledgement (5 s) and then the I/O
    // timeout on the commit reply (10 s) would hold the guest paused.
    assert!(
        after < Duration::from_secs(4),
        "the sender ended {after:?} after the pause"
    );
    assert_source_guest_runs(&dir.path("src.img"));
    let (r_status, _) = recv
        .exit_within(Duration::from_secs(120))
        .expect("recv ends");
    assert_eq!(r_status.code(), Some(1), "{}", recv.stderr());
    assert!(
        recv.stderr().contains("nothing committed"),
        "{}",
        recv.stderr()
    );
    assert!(!dst.exists(), "committed");
}
