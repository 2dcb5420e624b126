//! QEMU guests (`send --qemu`, `recv --qemu`): a real Linux VM booted by QEMU (TCG) with its
//! 512 MiB of RAM in a shared file, vmstream's dbsim running inside it. vmstream moves the
//! RAM, QEMU the device state; the guest keeps running verified on the destination. A
//! migration that fails before the destination's QEMU runs leaves the source VM running, and
//! the throttle holds the vCPU threads alone.
//! Skipped, with the reason printed, where QEMU or the guest's parts cannot be had.

use std::time::Duration;

use vmstream::guest::migratable::MigratableGuest;
use vmstream::guest::qemu::ptrace_throttle::PtraceThrottle;
use vmstream::guest::qemu::throttle::VcpuThrottleMode;
use vmstream::guest::qemu::throttle::{vcpu_threads, VcpuThrottle};
use vmstream::guest::qemu::Qmp;
use vmstream::guest::qemu::{QemuAfter, QemuSourceGuest, QemuSpec};
use vmstream::telemetry::notice::Notices;
use vmstream_tests::qemu::{guest_image, qemu_command, qemu_numa_command, GuestImage, QemuVm};
use vmstream_tests::*;

fn image_or_skip(test: &str) -> Option<GuestImage> {
    match guest_image() {
        Ok(i) => Some(i),
        Err(why) => {
            eprintln!("skipped {test}: {why}");
            None
        }
    }
}

/// Starts `send --qemu` of `src` to the receiver on `port`, with `extra` flags.
fn qemu_send(src: &QemuVm, port: u16, extra: &[&str]) -> Proc {
    let to = format!("127.0.0.1:{port}");
    let mut args = vec![
        "send",
        "--qemu",
        src.qmp.to_str().unwrap(),
        "--to",
        &to,
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    Proc::vmstream("send", &args, &[])
}

/// `send --qemu` of `src` to the receiver on `port`, the source left paused after
/// (`--qemu-after pause`), with `extra` flags; asserts it succeeded and returns it (its
/// stderr) once it exited.
fn send_paused(src: &QemuVm, port: u16, send_json: &std::path::Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--qemu-after",
        "pause",
        "--stats-json",
        send_json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut send = qemu_send(src, port, &args);
    let (status, lines) = send.wait_exit();
    assert!(status.success(), "send: {lines:?} {}", send.stderr());
    send
}

/// Ends the source VM `src` (after reading its last transaction) and continues `dst`: it
/// runs, its guest counts on past the source's last transaction and its in-guest verify
/// passes.
fn continue_at_destination(src: QemuVm, dst: &QemuVm) {
    let src_tx = src.last_tx().expect("the source counted");
    drop(src);
    dst.execute("cont");
    assert_eq!(dst.status(), "running");
    // The guest goes on from where it was: past the source's count, verify ok.
    let tx = dst.wait_tx_above(src_tx, Duration::from_secs(300));
    // The in-guest verify that follows that run.
    dst.wait_console(
        "vmstream-guest: verify ok kind=dbsim",
        Duration::from_secs(300),
    );
    let console = dst.console();
    assert!(!console.contains("FAILED"), "{console}");
    assert!(tx > src_tx);
}

/// The source's RAM is moved by vmstream and its devices by QEMU: the destination QEMU,
/// left paused by `--qemu-start paused`, holds exactly the source's RAM at the pause (the
/// source left paused by `--qemu-after pause`), and once continued its guest goes on
/// counting past the source's last transaction, its in-guest verify passing.
#[test]
fn a_qemu_vm_moves_and_keeps_running_verified() {
    let Some(image) = image_or_skip("a_qemu_vm_moves_and_keeps_running_verified") else {
        return;
    };
    let _serial = serial();
    let dir = TmpDir::new("qemu-move");
    let src = QemuVm::boot(&image, &dir.0);
    let dst_ram = dir.path("dst.ram");
    let dst_serial = dir.path("dst.serial");
    let dst_pid = dir.path("dst.pid");
    let dst_cmd = qemu_command(&image, "{memory}", &dst_serial, &dst_pid);
    let (mut recv, port) = start_receiver(&[
        "--memory-file",
        dst_ram.to_str().unwrap(),
        "--qemu",
        &dst_cmd,
        "--qemu-start",
        "paused",
        "--stats-json",
        dir.path("recv.json").to_str().unwrap(),
    ]);
    let dst = QemuVm::adopt(
        dir.path("dst.ram.qmp"),
        dst_serial.clone(),
        dst_ram.clone(),
        dst_pid,
    );
    let send_json = dir.path("send.json");
    send_paused(&src, port, &send_json, &[]);
    let (status, lines) = recv.wait_exit();
    assert!(status.success(), "recv: {lines:?} {}", recv.stderr());
    let ready = line_starting(&lines, "qemu paused pid=");
    assert!(ready.contains("dst.ram.qmp"), "{ready}");
    // Both paused: the source at its pause (after sending its devices), the destination
    // with its devices loaded and not yet run.
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(dst.status(), "paused");
    assert!(
        files_identical(&src.ram, &dst.ram),
        "the destination QEMU's RAM differs from the source's at the pause"
    );
    let stats = read_stats(&send_json);
    assert_eq!(stats["converged"], true, "{stats}");
    assert!(stats["downtime_ms"].as_f64().is_some(), "{stats}");
    continue_at_destination(src, &dst);
}

/// A VM with two NUMA nodes, each its own shared RAM backend: both files travel in one
/// migration (`recv --memory-file` once per backend, `{memory0}` and `{memory1}` in the
/// destination's command line), each destination file equals the source's at the pause,
/// and the guest goes on counting there, its in-guest verify passing.
#[test]
fn a_qemu_vm_with_two_ram_backends_moves_and_keeps_running_verified() {
    let test = "a_qemu_vm_with_two_ram_backends_moves_and_keeps_running_verified";
    let Some(image) = image_or_skip(test) else {
        return;
    };
    let _serial = serial();
    let dir = TmpDir::new("qemu-numa");
    let src = QemuVm::boot_numa(&image, &dir.0);
    let (dst_ram0, dst_ram1) = (dir.path("dst.ram0"), dir.path("dst.ram1"));
    let dst_serial = dir.path("dst.serial");
    let dst_pid = dir.path("dst.pid");
    let dst_cmd = qemu_numa_command(&image, ["{memory0}", "{memory1}"], &dst_serial, &dst_pid);
    let (mut recv, port) = start_receiver(&[
        "--memory-file",
        dst_ram0.to_str().unwrap(),
        "--memory-file",
        dst_ram1.to_str().unwrap(),
        "--qemu",
        &dst_cmd,
        "--qemu-start",
        "paused",
    ]);
    let dst = QemuVm::adopt(
        dir.path("dst.ram0.qmp"),
        dst_serial.clone(),
        dst_ram0.clone(),
        dst_pid,
    );
    let send_json = dir.path("send.json");
    send_paused(&src, port, &send_json, &[]);
    let (status, lines) = recv.wait_exit();
    assert!(status.success(), "recv: {lines:?} {}", recv.stderr());
    line_starting(&lines, "qemu paused pid=");
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(dst.status(), "paused");
    for (s, d) in [("src.ram0", &dst_ram0), ("src.ram1", &dst_ram1)] {
        assert!(
            files_identical(&dir.path(s), d),
            "the destination's {} differs from the source's {s} at the pause",
            d.display()
        );
    }
    let stats = read_stats(&send_json);
    assert_eq!(stats["guest_bytes"], 2 * 131068 * 1024, "{stats}");
    continue_at_destination(src, &dst);
}

/// `send --vcpu-throttle ptrace` on a guest that dirties faster than the link takes (dbsim
/// unpaced, a tight downtime limit, auto-converge at a low trigger): the vCPU threads are
/// throttled by per-thread stops, the migration completes (forced at its timeout if need
/// be), the RAM files are equal at the pause and the guest runs on verified at the
/// destination.
#[test]
fn a_migration_throttles_the_vcpus_by_ptrace_and_completes() {
    let test = "a_migration_throttles_the_vcpus_by_ptrace_and_completes";
    let Some(image) = image_or_skip(test) else {
        return;
    };
    let _serial = serial();
    let dir = TmpDir::new("qemu-ptrace-send");
    // dbsim as fast as it goes: it dirties faster than the link takes.
    let busy = |ram: &str, serial: &std::path::Path, pid: &std::path::Path| {
        qemu_command(&image, ram, serial, pid).replace("vmstream.rate=200", "vmstream.rate=0")
    };
    let src_ram = dir.path("src.ram");
    let src = QemuVm::boot_with(&dir.0, src_ram.clone(), |serial, pid| {
        busy(src_ram.to_str().unwrap(), serial, pid)
    });
    let dst_ram = dir.path("dst.ram");
    let (dst_serial, dst_pid) = (dir.path("dst.serial"), dir.path("dst.pid"));
    let dst_cmd = busy("{memory}", &dst_serial, &dst_pid);
    let (mut recv, port) = start_receiver(&[
        "--memory-file",
        dst_ram.to_str().unwrap(),
        "--qemu",
        &dst_cmd,
        "--qemu-start",
        "paused",
    ]);
    let dst = QemuVm::adopt(
        dir.path("dst.ram.qmp"),
        dst_serial,
        dst_ram.clone(),
        dst_pid,
    );
    let send_json = dir.path("send.json");
    let send = send_paused(
        &src,
        port,
        &send_json,
        &[
            "--vcpu-throttle",
            "ptrace",
            "--converge",
            "qemu",
            "--throttle-trigger-threshold",
            "1",
            "--cpu-throttle-initial",
            "50",
            "--max-bandwidth",
            "8MB",
            "--downtime-limit",
            "5ms",
            "--timeout",
            "60s",
            "--on-timeout",
            "force",
        ],
    );
    let stats = read_stats(&send_json);
    assert!(
        send.stderr().contains("vCPU threads alone (ptrace)"),
        "{}",
        send.stderr()
    );
    let throttled = stats["per_round"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["throttle"].as_f64().unwrap() > 0.0);
    assert!(throttled, "never throttled: {stats}");
    let (status, lines) = recv.wait_exit();
    assert!(status.success(), "recv: {lines:?} {}", recv.stderr());
    assert_eq!(src.status(), "postmigrate");
    assert!(files_identical(&src.ram, &dst_ram));
    continue_at_destination(src, &dst);
}

/// A destination whose QEMU fails to start refuses the commit, a receiver killed
/// mid-migration never commits, and a destination QEMU that cannot load the device state
/// fails QEMU's migration after the commit: each time the source VM runs on (`cont`), its
/// guest still counting.
#[test]
fn failed_migrations_leave_the_source_vm_running() {
    let Some(image) = image_or_skip("failed_migrations_leave_the_source_vm_running") else {
        return;
    };
    let _serial = serial();
    let dir = TmpDir::new("qemu-fail");
    let src = QemuVm::boot(&image, &dir.0);
    let dst_ram = dir.path("dst.ram");
    let send_to = |port: u16, extra: &[&str]| qemu_send(&src, port, extra);

    // A destination QEMU that cannot start (no such machine type).
    let bad = qemu_command(
        &image,
        "{memory}",
        &dir.path("bad.serial"),
        &dir.path("bad.pid"),
    )
    .replace("-machine pc,", "-machine no-such-machine,");
    let (mut recv, port) =
        start_receiver(&["--memory-file", dst_ram.to_str().unwrap(), "--qemu", &bad]);
    let mut send = send_to(port, &[]);
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "send: {}", send.stderr());
    assert!(
        send.stderr().contains("the destination QEMU"),
        "{}",
        send.stderr()
    );
    let (status, _) = recv.wait_exit();
    assert!(!status.success());
    assert!(!dst_ram.exists(), "nothing is committed");
    assert_eq!(src.status(), "running");
    let tx = src.last_tx().unwrap();
    let tx = src.wait_tx_above(tx, Duration::from_secs(120));

    // A receiver killed (SIGKILL) while the RAM is on its way.
    let dst_pid = dir.path("dst.pid");
    let good = qemu_command(&image, "{memory}", &dir.path("dst.serial"), &dst_pid);
    let (mut recv, port) =
        start_receiver(&["--memory-file", dst_ram.to_str().unwrap(), "--qemu", &good]);
    let _dst = QemuVm::adopt(
        dir.path("dst.ram.qmp"),
        dir.path("dst.serial"),
        dst_ram.clone(),
        dst_pid,
    );
    let mut send = send_to(port, &["--max-bandwidth", "4MB"]);
    recv.wait_stderr_running("connection from");
    std::thread::sleep(Duration::from_secs(2));
    let _ = recv.child.kill();
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "send: {}", send.stderr());
    assert!(!dst_ram.exists(), "nothing is committed");
    assert_eq!(src.status(), "running");
    let tx = src.wait_tx_above(tx, Duration::from_secs(120));

    // A destination QEMU that cannot load the device state (its RAM backend is half the
    // size): the RAM commits, QEMU's migration fails, and the source, told so through
    // QEMU's return path, continues its VM instead of quitting it.
    let _ = std::fs::remove_file(&dst_ram);
    let dst_pid = dir.path("half.pid");
    let half = qemu_command(&image, "{memory}", &dir.path("half.serial"), &dst_pid)
        .replace(vmstream_tests::qemu::RAM, "262144K");
    let (mut recv, port) =
        start_receiver(&["--memory-file", dst_ram.to_str().unwrap(), "--qemu", &half]);
    let _dst = QemuVm::adopt(
        dir.path("dst.ram.qmp"),
        dir.path("half.serial"),
        dst_ram.clone(),
        dst_pid.clone(),
    );
    let mut send = send_to(port, &[]);
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "send: {}", send.stderr());
    assert!(send.stderr().contains("device state"), "{}", send.stderr());
    let (status, _) = recv.wait_exit();
    assert!(!status.success(), "recv: {}", recv.stderr());
    assert_eq!(src.status(), "running");
    let tx = src.wait_tx_above(tx, Duration::from_secs(120));
    throttle_holds_the_vcpus_alone(&src, tx);
}

/// The throttle `--converge` applies to a QEMU guest: its vCPU threads (QMP
/// `query-cpus-fast`) alone move into a cpu cgroup with the quota of the fraction they may
/// run, the monitor answering meanwhile; on drop they go back and the cgroup is gone.
fn throttle_holds_the_vcpus_alone(src: &QemuVm, tx: u64) {
    let mut qmp = Qmp::connect(&src.qmp, Duration::from_secs(30)).unwrap();
    let tids = vcpu_threads(&mut qmp).unwrap();
    drop(qmp);
    assert!(!tids.is_empty());
    let mut throttle = match VcpuThrottle::new(&tids) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipped the vCPU throttle check: {e}");
            return;
        }
    };
    let dir = throttle.dir().to_path_buf();
    throttle.set(0.75).unwrap();
    let quota = std::fs::read_to_string(dir.join("cpu.cfs_quota_us")).unwrap();
    assert_eq!(quota.trim(), (2_500 * tids.len()).to_string());
    let tasks = std::fs::read_to_string(dir.join("tasks")).unwrap();
    let mut held: Vec<u32> = tasks.lines().map(|l| l.parse().unwrap()).collect();
    held.sort();
    let mut want = tids.clone();
    want.sort();
    assert_eq!(held, want, "only the vCPU threads are throttled");
    // The monitor is not throttled; the guest still runs, slower.
    assert_eq!(src.status(), "running");
    src.wait_tx_above(tx, Duration::from_secs(300));
    drop(throttle);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// CPU time (user + system, clock ticks) the threads `tids` of process `pid` used so far.
fn cpu_ticks(pid: u32, tids: &[u32]) -> u64 {
    tids.iter()
        .map(|tid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
            // Fields after the command's closing parenthesis: state is the 3rd field, utime
            // and stime the 14th and 15th.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
        })
        .sum()
}

/// `(TracerPid, State)` of thread `tid` of `pid`.
fn tracer_and_state(pid: u32, tid: u32) -> (u32, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_string()
    };
    (field("TracerPid:").parse().unwrap(), field("State:"))
}

/// The per-thread fallback (no cpu cgroup needed): the vCPU threads, traced, get far less
/// CPU stopped 90% of every period than free, while QMP answers; dropped, the throttle
/// leaves them untraced and running, the guest counting on. Driven as a migration drives
/// the source guest (`--vcpu-throttle ptrace`), the threads are held from the first
/// throttle step and let go at the pause, and when the guest is left running after a
/// failure.
#[test]
fn the_ptrace_throttle_slows_the_vcpus_alone_and_lets_them_go() {
    let test = "the_ptrace_throttle_slows_the_vcpus_alone_and_lets_them_go";
    let Some(image) = image_or_skip(test) else {
        return;
    };
    let _serial = serial();
    let dir = TmpDir::new("qemu-ptrace");
    let src = QemuVm::boot(&image, &dir.0);
    let pid: u32 = std::fs::read_to_string(dir.path("src.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut qmp = Qmp::connect(&src.qmp, Duration::from_secs(30)).unwrap();
    let tids = vcpu_threads(&mut qmp).unwrap();
    let used_over = |qmp: &mut Qmp| {
        let before = cpu_ticks(pid, &tids);
        for _ in 0..20 {
            // The monitor answers throughout.
            assert_eq!(qmp.status().unwrap(), "running");
            std::thread::sleep(Duration::from_millis(200));
        }
        cpu_ticks(pid, &tids) - before
    };
    let free = used_over(&mut qmp);
    let mut throttle = PtraceThrottle::new(&tids).unwrap();
    throttle.set(0.9);
    let me = std::process::id();
    for &tid in &tids {
        // TracerPid is the tracing thread's id: the throttle's, in this process.
        let (tracer, _) = tracer_and_state(pid, tid);
        let ours = std::path::Path::new(&format!("/proc/{me}/task/{tracer}")).exists();
        assert!(
            tracer != 0 && ours,
            "vCPU thread {tid} is traced by {tracer}"
        );
    }
    let throttled = used_over(&mut qmp);
    eprintln!("vCPU CPU ticks over 4 s: free {free}, throttled to 10% {throttled}");
    assert!(
        free >= 50,
        "the vCPUs were nearly idle ({free} ticks): nothing to compare"
    );
    assert!(
        throttled * 2 < free,
        "throttled vCPUs used {throttled} ticks, free ones {free}"
    );
    let tx = src.last_tx().unwrap();
    drop(throttle);
    let untraced = |when: &str| {
        for &tid in &tids {
            let (tracer, state) = tracer_and_state(pid, tid);
            assert_eq!(tracer, 0, "{when}: vCPU thread {tid} is still traced");
            let stopped = state.starts_with('t') || state.starts_with('T');
            assert!(!stopped, "{when}: {tid} is {state}");
        }
    };
    let traced = |when: &str| {
        for &tid in &tids {
            assert_ne!(
                tracer_and_state(pid, tid).0,
                0,
                "{when}: {tid} is not traced"
            );
        }
    };
    untraced("after the drop");
    drop(qmp);
    let spec = QemuSpec {
        qmp: src.qmp.clone(),
        after: QemuAfter::Pause,
        migrate_timeout: Duration::from_secs(30),
        vcpu_throttle: VcpuThrottleMode::Ptrace,
    };
    let mut guest = QemuSourceGuest::open(&spec, &Notices::silent()).unwrap();
    guest.set_throttle(0.5);
    traced("throttled");
    guest.pause().unwrap();
    untraced("at the pause");
    guest.resume().unwrap();
    guest.set_throttle(0.5);
    traced("throttled again");
    Box::new(guest).keep_after_failure();
    untraced("after a failure");
    assert_eq!(src.status(), "running");
    src.wait_tx_above(tx, Duration::from_secs(120));
}
