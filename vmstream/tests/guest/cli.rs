//! The `vmstream guest` command line: exit codes and messages.

#[path = "../common/mod.rs"]
mod common;

use std::process::Command;

use common::TmpFile;

fn vmstream(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmstream"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_then_verify_reports_the_counter() {
    let mem = TmpFile::new("cli");
    let (code, out, err) = vmstream(&[
        "guest",
        "run",
        "--memory-file",
        mem.str(),
        "--size",
        "1M",
        "--workload",
        "random",
        "--init",
        "--rate",
        "500",
        "--duration",
        "100ms",
    ]);
    assert_eq!(code, 0, "{err}");
    let done: u64 = out
        .lines()
        .last()
        .unwrap()
        .strip_prefix("done tx=")
        .unwrap()
        .parse()
        .unwrap();
    let (code, out, _) = vmstream(&["guest", "verify", "--memory-file", mem.str()]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("ok kind=random blocks=254 active=254 "),
        "{out}"
    );
    assert!(out.contains(&format!(" tx={done} ")), "{out}");
}

#[test]
fn verify_rejects_a_file_that_is_not_a_guest() {
    let mem = TmpFile::new("notguest");
    std::fs::write(&mem.0, vec![0u8; 8192]).unwrap();
    let (code, _, err) = vmstream(&["guest", "verify", "--memory-file", mem.str()]);
    assert_eq!(code, 1);
    assert!(err.contains("no vmstream guest superblock"), "{err}");
}

#[test]
fn bad_sizes_and_durations_are_usage_errors() {
    let (code, _, err) = vmstream(&["guest", "run", "--memfd", "--size", "12X"]);
    assert_eq!(code, 2);
    assert!(err.contains("12X"), "{err}");
    let (code, _, err) = vmstream(&[
        "guest",
        "run",
        "--memfd",
        "--size",
        "1M",
        "--duration",
        "5h",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("5h"), "{err}");
    let (code, _, err) = vmstream(&["guest", "run", "--memfd"]);
    assert_eq!(code, 1);
    assert!(err.contains("--init needs --size"), "{err}");
}

/// Several `--memory-file`s are a QEMU VM's RAM backends: without `--qemu`, or with a
/// command line that lacks a backend's placeholder, `recv` refuses to start; an unknown
/// `--vcpu-throttle` mechanism is refused by `send`. Nothing is created.
#[test]
fn several_memory_files_and_throttle_mechanisms_are_checked_before_starting() {
    let (a, b) = (TmpFile::new("region-a"), TmpFile::new("region-b"));
    let recv = |extra: &[&str]| {
        let mut args = vec!["recv", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(&["--memory-file", a.str(), "--memory-file", b.str()]);
        args.extend_from_slice(extra);
        vmstream(&args)
    };
    let (code, _, err) = recv(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("only a QEMU VM's RAM backends"), "{err}");
    let (code, _, err) = recv(&["--qemu", "qemu -object x,mem-path={memory}"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("has no {memory1}"), "{err}");
    assert!(!a.0.exists() && !b.0.exists());
    let (code, _, err) = vmstream(&[
        "send",
        "--qemu",
        "/nonexistent.qmp",
        "--to",
        "127.0.0.1:1",
        "--vcpu-throttle",
        "cgroup2",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("expected auto, cgroup or ptrace"), "{err}");
}
