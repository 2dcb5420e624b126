//! Same-host migrations through the real binary: the whole protocol over a unix socket
//! (`--listen unix:PATH`, `--to unix:PATH`), and `send --handover`, which hands the guest's
//! memory over by file descriptor instead of copying it.

use std::path::Path;
use std::time::{Duration, Instant};

use vmstream::guest::kvm::abi::{VCPU_AREA_GPA, VCPU_AREA_STRIDE, VCPU_TX_COUNT};
use vmstream_tests::*;

fn no_kvm() -> bool {
    if let Err(why) = vmstream::guest::kvm::kvm_available() {
        eprintln!("skipping: {why}");
        return true;
    }
    false
}

/// `vmstream recv --listen unix:SOCK ARGS...`, once it listens.
fn unix_receiver(sock: &Path, args: &[&str]) -> Proc {
    let listen = format!("unix:{}", sock.display());
    let mut all = vec!["recv", "--listen", &listen];
    all.extend_from_slice(args);
    let mut p = Proc::vmstream("recv", &all, &[]);
    let line = p.wait_line("listening on ");
    assert_eq!(line.trim(), format!("listening on {listen}"));
    p
}

/// `vmstream send` of a new 64 MiB dbsim guest process on `src` to `unix:SOCK`.
fn file_sender(src: &Path, sock: &Path, extra: &[&str]) -> Proc {
    file_sender_env(src, sock, extra, &[])
}

/// [`file_sender`] with `envs` set (fault hooks).
fn file_sender_env(src: &Path, sock: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Proc {
    let to = format!("unix:{}", sock.display());
    let mut args = vec![
        "send",
        "--memory-file",
        src.to_str().unwrap(),
        "--size",
        "64M",
        "--workload",
        "dbsim",
        "--rate",
        "20000",
        "--warmup",
        "300ms",
        "--to",
        &to,
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    Proc::vmstream("send", &args, envs)
}

/// `vmstream send --kvm` of a new 2-vCPU 64 MiB dbsim guest (RAM a memfd) to `unix:SOCK`.
fn kvm_sender(sock: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Proc {
    let to = format!("unix:{}", sock.display());
    let mut args = vec![
        "send",
        "--kvm",
        "--size",
        "64M",
        "--vcpus",
        "2",
        "--warmup",
        "300ms",
        "--to",
        &to,
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    Proc::vmstream("send --kvm", &args, envs)
}

/// Sum of the per-vCPU transaction counters of a KVM guest's RAM file at `path`.
fn kvm_tx(path: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    (0..2)
        .map(|i| {
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, VCPU_AREA_GPA + i * VCPU_AREA_STRIDE + VCPU_TX_COUNT)
                .expect("read vCPU counter");
            u64::from_le_bytes(b)
        })
        .sum()
}

/// The lines of `/proc/PID/maps` and the targets of `/proc/PID/fd/*` that name `what`;
/// panics if the process is gone (it must still run for the check to mean anything).
fn references(pid: u32, what: &str) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_else(|e| panic!("process {pid} is gone ({e}): nothing was checked"));
    let mut found: Vec<String> = maps
        .lines()
        .filter(|l| l.contains(what))
        .map(String::from)
        .collect();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            if target.to_string_lossy().contains(what) {
                found.push(format!("fd {:?} -> {}", fd.file_name(), target.display()));
            }
        }
    }
    found
}

/// Whether a thread of process `pid` may still run code of its own, and so write its
/// memory: one that is neither a zombie nor exiting (the kernel's `PF_EXITING`, 0x4, in
/// field 9 of its stat line: set before an exiting task unmaps anything, and it never
/// returns to user space). A process gone counts as unable.
fn may_run_again(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
            let mut f = s.rsplit(')').next().unwrap_or("").split_whitespace();
            let state = f.next().unwrap_or("Z");
            let flags: u64 = f.nth(5).and_then(|x| x.parse().ok()).unwrap_or(0);
            !state.starts_with('Z') && !state.starts_with('X') && flags & 0x4 == 0
        })
    })
}

#[test]
fn a_process_guest_migrates_over_a_unix_socket_verified() {
    let _g = serial();
    let dir = TmpDir::new("unix-file");
    let (src, dst, sock) = (dir.path("src.img"), dir.path("dst.img"), dir.path("m.sock"));
    let (sj, rj) = (dir.path("send.json"), dir.path("recv.json"));
    let mut recv = unix_receiver(
        &sock,
        &[
            "--memory-file",
            dst.to_str().unwrap(),
            "--resume",
            "--run-for",
            "1s",
            "--stats-json",
            rj.to_str().unwrap(),
        ],
    );
    let mut send = file_sender(&src, &sock, &["--stats-json", sj.to_str().unwrap()]);
    let _guest = KillPid(guest_pid(&mut send));
    let (s_status, _) = send.wait_exit();
    assert!(s_status.success(), "send failed: {}", send.stderr());
    let tx_at_pause = vmstream::guest::file::verify::verify_file(&src)
        .expect("the source image at the pause verifies")
        .tx_count;
    let (r_status, lines) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    assert!(
        recv.stderr().contains("connection from unix:"),
        "{}",
        recv.stderr()
    );
    assert!(
        lines.iter().any(|l| l.starts_with("verify ok")),
        "{lines:?}"
    );
    assert_eq!(field(line_starting(&lines, "ready "), "tx="), tx_at_pause);
    let (s, r) = (read_stats(&sj), read_stats(&rj));
    assert_eq!(s["outcome"], "committed");
    assert!(s["digest"].is_string() && s["digest"] != "skipped-handover");
    assert_eq!(s["digest"], r["digest"], "digests differ");
    assert!(s["bytes_on_wire"].as_u64().unwrap() > 0);
    // The listener removed its socket file; nothing else is left beside the images.
    assert!(!sock.exists(), "{} left behind", sock.display());
    assert_eq!(
        dir.entries(),
        ["dst.img", "recv.json", "send.json", "src.img"].map(String::from)
    );
}

#[test]
fn a_kvm_guest_migrates_over_a_unix_socket_verified() {
    if no_kvm() {
        return;
    }
    let _g = serial();
    let dir = TmpDir::new("unix-kvm");
    let (src, dst, sock) = (dir.path("src.img"), dir.path("dst.img"), dir.path("m.sock"));
    let (sj, rj) = (dir.path("send.json"), dir.path("recv.json"));
    let mut recv = unix_receiver(
        &sock,
        &[
            "--memory-file",
            dst.to_str().unwrap(),
            "--resume",
            "--run-for",
            "1s",
            "--stats-json",
            rj.to_str().unwrap(),
        ],
    );
    let mut send = kvm_sender(
        &sock,
        &[
            "--memory-file",
            src.to_str().unwrap(),
            "--timeout",
            "20s",
            "--on-timeout",
            "force",
            "--stats-json",
            sj.to_str().unwrap(),
        ],
        &[],
    );
    let (s_status, _) = send.wait_exit();
    assert!(s_status.success(), "send failed: {}", send.stderr());
    let (r_status, lines) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    let (s, r) = (read_stats(&sj), read_stats(&rj));
    // The memory at the pause (the source's file) is what both sides hashed.
    use vmstream::migration::digest::{hex, memory_digest};
    let at_pause = std::fs::read(&src).unwrap();
    assert_eq!(
        s["digest"].as_str().unwrap(),
        hex(&memory_digest(&at_pause, 4096))
    );
    assert_eq!(s["digest"], r["digest"]);
    let done = line_starting(&lines, "verify ok");
    assert!(field(done, "tx=") > field(done, "resumed_from="), "{done}");
    assert!(!sock.exists());
}

#[test]
fn a_handed_over_process_guest_runs_on_the_same_memory_and_the_source_lets_go() {
    let _g = serial();
    let dir = TmpDir::new("handover-file");
    let (src, sock) = (dir.path("src.img"), dir.path("m.sock"));
    let (sj, rj) = (dir.path("send.json"), dir.path("recv.json"));
    // No --memory-file: the guest runs on the source's own file.
    let mut recv = unix_receiver(
        &sock,
        &[
            "--resume",
            "--run-for",
            "3s",
            "--stats-json",
            rj.to_str().unwrap(),
        ],
    );
    let mut send = file_sender(
        &src,
        &sock,
        &["--handover", "--stats-json", sj.to_str().unwrap()],
    );
    let guest = guest_pid(&mut send);
    let _guest = KillPid(guest);
    let ready = recv.wait_line("ready ");
    // The destination runs the guest; the sender still waits for its samples (2 s): by
    // now the sender holds nothing of the memory, and no thread of the source guest can
    // write it again (the kernel may still be tearing its mapping down).
    assert!(
        !may_run_again(guest),
        "the source guest {guest} may still run"
    );
    let held = references(send.pid(), "src.img");
    assert!(
        held.is_empty(),
        "the sender still holds the memory: {held:?}"
    );
    let (s_status, _) = send.wait_exit();
    assert!(s_status.success(), "send failed: {}", send.stderr());
    let (r_status, lines) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    let done = line_starting(&lines, "verify ok");
    let resumed_at = field(&ready, "tx=");
    assert!(field(done, "tx=") > resumed_at, "{ready} / {done}");
    // Same memory: the source's file holds what the destination's guest committed since.
    let (s, r) = (read_stats(&sj), read_stats(&rj));
    assert_eq!(r["settings"]["source_tx_at_pause"], resumed_at.to_string());
    assert_eq!(read_tx_count(&src), field(done, "tx="));
    for stats in [&s, &r] {
        assert_eq!(stats["outcome"], "committed");
        assert_eq!(stats["digest"], "skipped-handover");
        assert!(stats["downtime_ms"].as_f64().is_some());
    }
    // No page crossed the socket: control frames and lists of page numbers, in at least
    // one live round and the paused one.
    let rounds = s["per_round"].as_array().unwrap();
    assert!(rounds.len() >= 2, "{rounds:?}");
    assert_eq!(rounds.last().unwrap()["paused"], true);
    assert!(rounds.iter().rev().skip(1).all(|r| r["paused"] == false));
    let listed: u64 = rounds
        .iter()
        .map(|r| r["dirty_pages"].as_u64().unwrap())
        .sum();
    assert!(
        s["bytes_on_wire"].as_u64().unwrap() < 4096 + 8 * listed,
        "{}",
        s["bytes_on_wire"]
    );
    assert!(!sock.exists());
}

#[test]
fn a_handed_over_kvm_guest_runs_on_the_same_memfd_and_the_sender_drops_it() {
    if no_kvm() {
        return;
    }
    let _g = serial();
    let dir = TmpDir::new("handover-kvm");
    let (sock, rj) = (dir.path("m.sock"), dir.path("recv.json"));
    let mut recv = unix_receiver(
        &sock,
        &[
            "--resume",
            "--run-for",
            "3s",
            "--stats-json",
            rj.to_str().unwrap(),
        ],
    );
    let mut send = kvm_sender(&sock, &["--handover"], &[]);
    send.wait_line("guest pid=");
    let resumed = recv.wait_line("resumed kind=kvm");
    // The VM ran in the sender, on a memfd: its mappings and descriptor are gone.
    let held = references(send.pid(), "memfd:vmstream-guest");
    assert!(
        held.is_empty(),
        "the sender still holds the guest RAM: {held:?}"
    );
    let (s_status, _) = send.wait_exit();
    assert!(s_status.success(), "send failed: {}", send.stderr());
    let (r_status, lines) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    let done = line_starting(&lines, "verify ok");
    assert_eq!(field(done, "resumed_from="), field(&resumed, "tx="));
    assert!(field(done, "tx=") > field(done, "resumed_from="), "{done}");
    let r = read_stats(&rj);
    assert_eq!(r["digest"], "skipped-handover");
    assert_eq!(r["settings"]["kvm_vcpus"], "2");
}

#[test]
fn an_authenticated_handover_into_a_memory_file_runs_the_guest_on_its_copy() {
    if no_kvm() {
        return;
    }
    let _g = serial();
    let dir = TmpDir::new("handover-named");
    let (sock, dst, key) = (dir.path("m.sock"), dir.path("dst.img"), dir.path("key"));
    // With a key: the descriptor travels with a sealed record.
    std::fs::write(&key, [0x5a; 32]).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = key.to_str().unwrap();
    let mut recv = unix_receiver(
        &sock,
        &[
            "--memory-file",
            dst.to_str().unwrap(),
            "--resume",
            "--run-for",
            "1s",
            "--auth-key-file",
            key,
        ],
    );
    let mut send = kvm_sender(&sock, &["--handover", "--auth-key-file", key], &[]);
    let (s_status, _) = send.wait_exit();
    assert!(s_status.success(), "send failed: {}", send.stderr());
    let resumed = recv.wait_line("resumed kind=kvm");
    let tx = field(&resumed, "tx=");
    // The guest runs on the named file: its counters there move on.
    let deadline = Instant::now() + Duration::from_secs(10);
    while kvm_tx(&dst) <= tx {
        assert!(
            Instant::now() < deadline,
            "the guest does not run on {}",
            dst.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (r_status, _) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    assert_eq!(dir.entries(), ["dst.img", "key"].map(String::from));
}

#[test]
fn a_handover_the_destination_refuses_leaves_the_process_guest_running() {
    let _g = serial();
    let dir = TmpDir::new("handover-refused");
    let (src, sock) = (dir.path("src.img"), dir.path("m.sock"));
    // The destination expects another size: it refuses at the hello.
    let mut recv = unix_receiver(&sock, &["--resume", "--size", "32M"]);
    let mut send = file_sender(&src, &sock, &["--handover"]);
    let _guest = KillPid(guest_pid(&mut send));
    let (r_status, _) = recv.wait_exit();
    assert_eq!(r_status.code(), Some(1), "{}", recv.stderr());
    let (s_status, _) = send.wait_exit();
    assert_eq!(s_status.code(), Some(1));
    assert!(send.stderr().contains("size mismatch"), "{}", send.stderr());
    assert_source_guest_runs(&src);
}

#[test]
fn a_handover_round_naming_a_page_beyond_the_guest_is_refused_and_the_guest_runs_on() {
    let _g = serial();
    let dir = TmpDir::new("handover-beyond");
    let (src, sock) = (dir.path("src.img"), dir.path("m.sock"));
    let mut recv = unix_receiver(&sock, &["--resume"]);
    let mut send = file_sender_env(
        &src,
        &sock,
        &["--handover"],
        &[("VMSTREAM_TEST_HANDOVER_PAGE_BEYOND", "1")],
    );
    let _guest = KillPid(guest_pid(&mut send));
    let (r_status, _) = recv.wait_exit();
    assert_eq!(r_status.code(), Some(1), "{}", recv.stderr());
    assert!(
        recv.stderr().contains("beyond the guest's 16384 pages"),
        "{}",
        recv.stderr()
    );
    let (s_status, _) = send.wait_exit();
    assert_eq!(s_status.code(), Some(1), "{}", send.stderr());
    assert!(send.stderr().contains("beyond"), "{}", send.stderr());
    assert_source_guest_runs(&src);
}

#[test]
fn a_kvm_handover_whose_state_is_refused_resumes_the_source_vm() {
    if no_kvm() {
        return;
    }
    let _g = serial();
    let dir = TmpDir::new("handover-kvm-refused");
    let (src, sock) = (dir.path("src.img"), dir.path("m.sock"));
    let mut recv = unix_receiver(&sock, &["--resume"]);
    // The memory was handed over and mapped there; the state then fails its checksum.
    let mut send = kvm_sender(
        &sock,
        &[
            "--handover",
            "--memory-file",
            src.to_str().unwrap(),
            "--keep-running-for",
            "2s",
        ],
        &[("VMSTREAM_TEST_CORRUPT_STATE_AT", "200")],
    );
    let (r_status, _) = recv.wait_exit();
    assert_eq!(r_status.code(), Some(1));
    let err = recv.stderr();
    assert!(
        err.contains("guest state refused") && err.contains("checksum"),
        "{err}"
    );
    send.wait_stderr("migration failed");
    send.wait_stderr("StateRejected");
    // The source VM was resumed on its untouched memory and keeps running.
    let tx = kvm_tx(&src);
    let deadline = Instant::now() + Duration::from_secs(10);
    while kvm_tx(&src) <= tx {
        assert!(Instant::now() < deadline, "the source VM does not run");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", send.stderr());
}

#[test]
fn a_handover_over_tcp_is_refused_before_anything_starts() {
    let dir = TmpDir::new("handover-tcp");
    let src = dir.path("src.img");
    let mut send = Proc::vmstream(
        "send",
        &[
            "send",
            "--memory-file",
            src.to_str().unwrap(),
            "--size",
            "16M",
            "--to",
            "127.0.0.1:9",
            "--handover",
        ],
        &[],
    );
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(2));
    let err = send.stderr();
    assert!(
        err.contains("only a unix socket") && err.contains("--to unix:PATH"),
        "{err}"
    );
    // No guest was started.
    assert!(!src.exists());
}

#[test]
fn a_destination_refuses_a_handover_over_tcp() {
    use vmstream::migration::transport::{Frame, FrameReader};
    use vmstream::migration::wire::{
        DeltaWire, GuestKind, Hello, Message, RefuseCode, FEATURE_HANDOVER, FEATURE_MEMORY_DIGEST,
    };
    let _g = serial();
    let dir = TmpDir::new("handover-tcp-dest");
    let dst = dir.path("dst.img");
    let (mut recv, port) = start_receiver(&["--memory-file", dst.to_str().unwrap()]);
    let hello = Message::Hello(Hello {
        guest_kind: GuestKind::File,
        page_size: 4096,
        guest_size: 1 << 20,
        features: FEATURE_MEMORY_DIGEST | FEATURE_HANDOVER,
        compression: vmstream_codec::Compression::None,
        delta: DeltaWire::Off,
        codec_version: Hello::CODEC_VERSION,
        sender_workers: 1,
        cache_bytes: 0,
        batch_pages: 128,
    });
    use std::io::Write;
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(&hello.to_frame()).unwrap();
    let mut reader = FrameReader::new(conn, None);
    match reader.read_frame().unwrap() {
        Frame::Control(Message::HelloReply(r)) => {
            assert_eq!(r.refuse, RefuseCode::Features);
            assert!(r.reason.contains("only a unix socket"), "{}", r.reason);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    expect_receiver_failure(&mut recv, &dst, &["only a unix socket"]);
}
