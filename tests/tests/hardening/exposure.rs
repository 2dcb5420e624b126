//! A keyless migration only on loopback: `recv` listening on an address others can reach,
//! or `send` to one, without `--auth-key-file` refuses to start (exit 2, before listening or
//! starting a guest) unless `--insecure` is given; with `--insecure` both sides migrate.

use std::net::Ipv4Addr;
use std::time::Duration;

use vmstream_tests::*;

/// An IPv4 address of this host that is not loopback (`ip -4 -o addr show`), or `None`
/// (and why, printed) when it has none.
fn own_non_loopback_ip() -> Option<Ipv4Addr> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output();
    let found = out.ok().and_then(|o| {
        String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
            let cidr = l.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
            let ip: Ipv4Addr = cidr.split('/').next()?.parse().ok()?;
            (!ip.is_loopback()).then_some(ip)
        })
    });
    if found.is_none() {
        eprintln!("skipping: no non-loopback IPv4 address on this host (ip -4 addr)");
    }
    found
}

/// Runs `vmstream ARGS` that must be refused before it does anything: exit 2 within a few
/// seconds, `reasons` on stderr, no stdout (no `listening on`, no guest line, no summary).
fn expect_refused_to_start(args: &[&str], reasons: &[&str]) {
    let mut p = Proc::vmstream(args[0], args, &[]);
    let Some((status, lines)) = p.exit_within(Duration::from_secs(10)) else {
        panic!("{args:?} still runs after 10 s; stderr: {}", p.stderr())
    };
    let err = p.stderr();
    assert_eq!(status.code(), Some(2), "{args:?}: {err}");
    for reason in reasons {
        assert!(err.contains(reason), "{args:?}: {err}");
    }
    assert!(lines.is_empty(), "{args:?}: {lines:?}");
}

/// `recv` on every address (`0.0.0.0`) without a key refuses to start and says how to go
/// on; with `--insecure` it listens (and warns).
#[test]
fn a_keyless_receiver_listens_off_loopback_only_when_insecure() {
    let _g = serial();
    let dir = TmpDir::new("exposed-recv");
    let dst = dir.path("dst.img");
    let dst = dst.to_str().unwrap();
    let mut args = vec!["recv", "--listen", "0.0.0.0:0", "--memory-file", dst];
    expect_refused_to_start(
        &args,
        &[
            "--listen 0.0.0.0:0: 0.0.0.0:0 is not a loopback address",
            "anyone who can reach it can write a guest image here",
            "--auth-key-file",
            "--insecure",
        ],
    );
    if let Some(ip) = own_non_loopback_ip() {
        let listen = format!("{ip}:0");
        expect_refused_to_start(
            &["recv", "--listen", &listen, "--memory-file", dst],
            &["is not a loopback address"],
        );
    }
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());
    args.push("--insecure");
    let mut recv = Proc::vmstream("recv", &args, &[]);
    assert!(recv
        .wait_line("listening on ")
        .starts_with("listening on 0.0.0.0:"));
    recv.wait_stderr("unauthenticated");
}

/// `send` without a key to this host's own non-loopback address refuses to start (no guest
/// is started); with `--insecure` on both sides the migration over that address commits.
#[test]
fn a_keyless_source_sends_off_loopback_only_when_insecure() {
    let _g = serial();
    let Some(ip) = own_non_loopback_ip() else {
        return;
    };
    let dir = TmpDir::new("exposed-send");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let mut recv = Proc::vmstream(
        "recv",
        &[
            "recv",
            "--listen",
            "0.0.0.0:0",
            "--memory-file",
            dst.to_str().unwrap(),
            "--insecure",
        ],
        &[],
    );
    let line = recv.wait_line("listening on ");
    let port = line.rsplit(':').next().unwrap().trim().to_string();
    let to = format!("{ip}:{port}");
    let refused = random_guest_send_args(&src, &to, &[]);
    expect_refused_to_start(
        &refused.iter().map(String::as_str).collect::<Vec<_>>(),
        &[
            &format!("--to {to}: {to} is not a loopback address"),
            "gets the guest's memory",
            "--insecure",
        ],
    );
    assert!(!src.exists(), "a guest was started");
    let allowed = random_guest_send_args(&src, &to, &["--insecure"]);
    let mut send = Proc::vmstream(
        "send",
        &allowed.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    );
    let _guest = KillPid(guest_pid(&mut send));
    let (s_status, _) = send.wait_exit();
    assert!(s_status.success(), "send: {}", send.stderr());
    let (r_status, _) = recv.wait_exit();
    assert!(r_status.success(), "recv: {}", recv.stderr());
    assert!(
        recv.stderr().contains(&format!("connection from {ip}:")),
        "{}",
        recv.stderr()
    );
    assert!(dst.exists());
}
