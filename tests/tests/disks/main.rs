//! Disks migrate with memory (`send --disk`, `recv --disk`, issue 20): written by an
//! external process (`--disk-tracking hash`), they reach the destination equal to the
//! source's disks at the pause, under either schedule; a count or size mismatch, a
//! corrupted granule and a receiver killed during the disk phase commit nothing and leave
//! the source guest running; a bad granularity is a usage error. `mirror`: write-through
//! mirroring; `kvm`: a KVM guest's disks, written through the VMM's block device.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmstream_tests::*;

mod kvm;
mod mirror;

/// A small xorshift generator: the test needs varied bytes and offsets, not quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A sparse disk of `size` bytes at `path` whose `data` byte ranges hold random bytes.
fn make_disk(path: &Path, size: u64, data: &[(u64, u64)], seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng(seed);
    for &(at, len) in data {
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        f.write_all_at(&buf, at).unwrap();
    }
}

/// The source's two disks: 8 MiB with 6 MiB of data, 4 MiB with 2 MiB (the rest holes).
fn source_disks(dir: &TmpDir) -> Vec<PathBuf> {
    let d1 = dir.path("disk1.img");
    let d2 = dir.path("disk2.img");
    make_disk(&d1, 8 << 20, &[(0, 4 << 20), (6 << 20, 2 << 20)], 11);
    make_disk(&d2, 4 << 20, &[(1 << 20, 2 << 20)], 12);
    vec![d1, d2]
}

/// Another process's random writes (1 byte to 16 KiB at any offset, into data and holes)
/// to `disks`, every 2 ms, for `lasting`.
struct Writer {
    thread: JoinHandle<u64>,
}

impl Writer {
    fn start(disks: &[PathBuf], lasting: Duration) -> Writer {
        let files: Vec<std::fs::File> = disks
            .iter()
            .map(|d| std::fs::OpenOptions::new().write(true).open(d).unwrap())
            .collect();
        let thread = std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let until = Instant::now() + lasting;
            let mut writes = 0u64;
            let mut buf = vec![0u8; 16 << 10];
            while Instant::now() < until {
                let f = &files[(rng.next() % files.len() as u64) as usize];
                let size = f.metadata().unwrap().len();
                let len = 1 + rng.next() % (16 << 10);
                let at = rng.next() % (size - len);
                rng.fill(&mut buf[..len as usize]);
                f.write_all_at(&buf[..len as usize], at).unwrap();
                writes += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            writes
        });
        Writer { thread }
    }

    /// Waits for the writer to stop on its own; returns how many writes it made.
    fn join(self) -> u64 {
        self.thread.join().unwrap()
    }
}

/// `--disk A --disk B ...` arguments.
fn disk_args(disks: &[PathBuf]) -> Vec<String> {
    disks
        .iter()
        .flat_map(|d| ["--disk".to_string(), d.to_str().unwrap().to_string()])
        .collect()
}

/// A sender of a 16 MiB random guest (500 writes a second: its memory converges at the
/// slowest link here) on `dir`'s src.img and `disks` to `port`, at `bandwidth`, with
/// `extra` arguments and `envs`.
fn disk_sender(
    dir: &TmpDir,
    port: u16,
    disks: &[PathBuf],
    bandwidth: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    let to = format!("127.0.0.1:{port}");
    let mut args: Vec<String> = [
        "send",
        "--memory-file",
        dir.path("src.img").to_str().unwrap(),
        "--size",
        "16M",
        "--workload",
        "random",
        "--rate",
        "500",
        "--warmup",
        "200ms",
        "--no-progress",
        "--to",
        &to,
        "--compress",
        "none",
        "--max-bandwidth",
        bandwidth,
        "--io-timeout",
        "10s",
        "--disk-tracking",
        "hash",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(disk_args(disks));
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::vmstream(
        "send",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        envs,
    )
}

/// A receiver into `dir`'s dst.img and `disks`, with its stats in recv.json, and `extra`.
fn disk_receiver(dir: &TmpDir, disks: &[PathBuf], extra: &[&str]) -> (Proc, u16) {
    let mut args = vec![
        "--memory-file".to_string(),
        dir.path("dst.img").to_str().unwrap().to_string(),
        "--stats-json".into(),
        dir.path("recv.json").to_str().unwrap().to_string(),
        "--io-timeout".into(),
        "10s".into(),
    ];
    args.extend(disk_args(disks));
    args.extend(extra.iter().map(|s| s.to_string()));
    start_receiver(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Memory and two disks that another process writes during the migration reach a
/// verified commit with `schedule`; the destination's disks equal the source's once the
/// writer stopped. Provable because the writer stops 800 ms after the guest starts, while
/// the disks' 8 MiB of data alone take two seconds at the 4 MB/s link: the source's final
/// collect, after the pause, comes after the last write.
fn external_writer_disks_migrate(schedule: &str, more: &[&str]) {
    let _g = serial();
    let dir = TmpDir::new(&format!("disks-{schedule}"));
    let disks = source_disks(&dir);
    let targets = vec![dir.path("dst-disk1.img"), dir.path("dst-disk2.img")];
    let (mut recv, port) = disk_receiver(&dir, &targets, &[]);
    let stats = dir.path("send.json");
    let mut extra = vec![
        "--disk-schedule",
        schedule,
        "--disk-granularity",
        "16K",
        "--stats-json",
        stats.to_str().unwrap(),
    ];
    extra.extend_from_slice(more);
    let mut send = disk_sender(&dir, port, &disks, "4M", &extra, &[]);
    let _guest = KillPid(guest_pid(&mut send));
    let writer = Writer::start(&disks, Duration::from_millis(800));
    let writes = writer.join();
    assert!(writes > 10, "the writer made only {writes} writes");
    assert!(
        send.child.try_wait().unwrap().is_none(),
        "the migration ended before the writer stopped: the premise of the comparison failed"
    );
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(0), "send: {}", send.stderr());
    let (status, _) = recv.wait_exit();
    assert_eq!(status.code(), Some(0), "recv: {}", recv.stderr());
    for (src, dst) in disks.iter().zip(&targets) {
        assert!(
            files_identical(src, dst),
            "{} differs from {}",
            dst.display(),
            src.display()
        );
    }
    let (sent, received) = (read_stats(&stats), read_stats(&dir.path("recv.json")));
    let (sd, rd) = (
        sent["disks"].as_array().unwrap(),
        received["disks"].as_array().unwrap(),
    );
    assert_eq!((sd.len(), rd.len()), (2, 2));
    let mut written = 0;
    for (s, r) in sd.iter().zip(rd) {
        assert_eq!(s["digest"], r["digest"]);
        assert!(s["digest"].is_string());
        assert_eq!(s["granularity"], 16384);
        assert_eq!(s["size"], r["size"]);
        assert_eq!(
            (s["committed"].as_bool(), r["committed"].as_bool()),
            (Some(true), Some(true))
        );
        assert!(s["bytes_on_wire"].as_u64().unwrap() > 0);
        assert!(s["rounds"].as_u64().unwrap() >= 1);
        written += s["guest_bytes_written"].as_u64().unwrap();
    }
    // The writes during the migration were seen and resent.
    assert!(written > 0, "no dirty disk data observed: {sd:?}");
    assert_eq!(sent["digest"], received["digest"]);
    // The holes of the source's disks stay holes: the destination's disks are sparse.
    for dst in &targets {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(dst).unwrap();
        assert!(
            m.blocks() * 512 < m.len(),
            "{} is not sparse",
            dst.display()
        );
    }
}

#[test]
fn disks_an_external_process_writes_migrate_with_time_slices() {
    external_writer_disks_migrate("slices", &[]);
}

#[test]
fn disks_an_external_process_writes_migrate_in_parallel_with_memory_on_two_channels() {
    // Disk pages are striped over the channels like memory's.
    external_writer_disks_migrate("parallel", &["--channels", "2"]);
}

/// A refused migration: the sender fails, the receiver says `reason`, the source guest
/// runs on, and the destination directory holds only `left` (nothing committed; the
/// receiver's statistics aside).
fn expect_refused(mut send: Proc, mut recv: Proc, dir: &TmpDir, reason: &str, left: &[&str]) {
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "send: {}", send.stderr());
    assert!(send.stderr().contains(reason), "send: {}", send.stderr());
    let (status, _) = recv.wait_exit();
    assert_eq!(status.code(), Some(1), "recv: {}", recv.stderr());
    assert!(recv.stderr().contains(reason), "recv: {}", recv.stderr());
    assert_source_guest_runs(&dir.path("src.img"));
    assert_eq!(dir.entries(), left);
}

#[test]
fn a_disk_count_mismatch_is_refused_and_nothing_is_committed() {
    let dir = TmpDir::new("disk-count");
    let _g = serial();
    let disks = source_disks(&dir);
    let (recv, port) = disk_receiver(&dir, &[dir.path("dst-disk1.img")], &[]);
    let send = disk_sender(&dir, port, &disks, "1G", &[], &[]);
    expect_refused(
        send,
        recv,
        &dir,
        "disk count mismatch: the source sends 2 disk(s), this destination receives 1",
        &["disk1.img", "disk2.img", "recv.json", "src.img"],
    );
}

#[test]
fn a_disk_size_mismatch_is_refused_and_the_existing_disk_stays() {
    let _g = serial();
    let dir = TmpDir::new("disk-size");
    let disks = source_disks(&dir);
    let existing = dir.path("dst-disk2.img");
    make_disk(&existing, 1 << 20, &[(0, 4096)], 5);
    let before = std::fs::read(&existing).unwrap();
    let (recv, port) = disk_receiver(&dir, &[dir.path("dst-disk1.img"), existing.clone()], &[]);
    let send = disk_sender(&dir, port, &disks, "1G", &[], &[]);
    expect_refused(
        send,
        recv,
        &dir,
        "disk size mismatch: the source's disk 1 has 4194304 bytes",
        &[
            "disk1.img",
            "disk2.img",
            "dst-disk2.img",
            "recv.json",
            "src.img",
        ],
    );
    assert_eq!(std::fs::read(&existing).unwrap(), before);
}

#[test]
fn a_bad_disk_granularity_is_a_usage_error() {
    let dir = TmpDir::new("disk-granularity");
    let disks = source_disks(&dir);
    for bad in ["3000", "2K", "2M", "96K"] {
        let mut send = disk_sender(&dir, 9, &disks, "1G", &["--disk-granularity", bad], &[]);
        let (status, _) = send.wait_exit();
        assert_eq!(status.code(), Some(2), "{bad}: {}", send.stderr());
        assert!(
            send.stderr()
                .contains("must be a power of two from 4 KiB to 1 MiB"),
            "{bad}: {}",
            send.stderr()
        );
    }
    // Refused before any guest started.
    assert_eq!(dir.entries(), ["disk1.img", "disk2.img"]);
}

#[test]
fn a_corrupted_disk_granule_on_the_wire_is_refused_and_nothing_is_committed() {
    let _g = serial();
    let dir = TmpDir::new("disk-corrupt");
    let disks = source_disks(&dir);
    let targets = vec![dir.path("dst-disk1.img"), dir.path("dst-disk2.img")];
    let (mut recv, port) = disk_receiver(&dir, &targets, &[]);
    // With time slices the first round carries only the disks' bulk copy: 300,000 bytes
    // into channel 0 is inside the payload of one of its first packets.
    let mut send = disk_sender(
        &dir,
        port,
        &disks,
        "64M",
        &[],
        &[("VMSTREAM_TEST_CORRUPT_AT", "300000")],
    );
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "send: {}", send.stderr());
    let (status, _) = recv.wait_exit();
    assert_eq!(status.code(), Some(1), "recv: {}", recv.stderr());
    assert!(recv.stderr().contains("crc32c"), "recv: {}", recv.stderr());
    assert!(send.stderr().contains("crc32c"), "send: {}", send.stderr());
    assert_source_guest_runs(&dir.path("src.img"));
    let stats = read_stats(&dir.path("recv.json"));
    assert_eq!(stats["outcome"], "failed");
    std::fs::remove_file(dir.path("recv.json")).unwrap();
    assert_eq!(dir.entries(), ["disk1.img", "disk2.img", "src.img"]);
}

#[test]
fn a_disk_digest_mismatch_commits_no_image_and_the_source_runs_on() {
    let _g = serial();
    let dir = TmpDir::new("disk-digest");
    let disks = source_disks(&dir);
    let targets = vec![dir.path("dst-disk1.img"), dir.path("dst-disk2.img")];
    let (mut recv, port) = disk_receiver(&dir, &targets, &[]);
    // The second disk's digest arrives flipped: memory's and the first disk's match.
    let mut send = disk_sender(
        &dir,
        port,
        &disks,
        "1G",
        &[],
        &[("VMSTREAM_TEST_CORRUPT_DISK_DIGEST", "1")],
    );
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "send: {}", send.stderr());
    let (status, _) = recv.wait_exit();
    assert_eq!(status.code(), Some(1), "recv: {}", recv.stderr());
    assert!(
        recv.stderr().contains("digest mismatch") && recv.stderr().contains("disk 1"),
        "recv: {}",
        recv.stderr()
    );
    assert!(send.stderr().contains("disk 1"), "send: {}", send.stderr());
    assert_source_guest_runs(&dir.path("src.img"));
    std::fs::remove_file(dir.path("recv.json")).unwrap();
    assert_eq!(dir.entries(), ["disk1.img", "disk2.img", "src.img"]);
}

#[test]
fn a_receiver_killed_during_the_disk_phase_commits_nothing_and_the_source_runs_on() {
    let _g = serial();
    let dir = TmpDir::new("disk-kill");
    let disks = source_disks(&dir);
    let targets = vec![dir.path("dst-disk1.img"), dir.path("dst-disk2.img")];
    let (recv, port) = disk_receiver(&dir, &targets, &[]);
    // 8 MiB of disk data at 1 MB/s: the disks' bulk copy (slices) lasts 8 s.
    let mut send = disk_sender(&dir, port, &disks, "1M", &[], &[]);
    let _guest = KillPid(guest_pid(&mut send));
    recv.wait_stderr("connection from");
    std::thread::sleep(Duration::from_millis(1500));
    send_signal("KILL", &recv.pid().to_string());
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(1), "send: {}", send.stderr());
    assert_source_guest_runs(&dir.path("src.img"));
    // A killed receiver cannot remove its temporary files (the next receive does), but
    // nothing was committed.
    for t in targets.iter().chain([&dir.path("dst.img")]) {
        assert!(!t.exists(), "{} was committed", t.display());
    }
    for src in &disks {
        assert!(src.exists());
    }
}

/// A sender of a guest it starts on `dir`'s src.img with two disks (src-d0.img,
/// src-d1.img, 8 MiB each, created by the guest) that its `workload` writes through the
/// block layer (builtin tracking, the default), to `port`, stats in send.json.
fn started_disk_guest_sender(
    dir: &TmpDir,
    port: u16,
    workload: &[&str],
    extra: &[&str],
) -> (Proc, Vec<PathBuf>) {
    let disks = vec![dir.path("src-d0.img"), dir.path("src-d1.img")];
    let to = format!("127.0.0.1:{port}");
    let (mem, stats) = (dir.path("src.img"), dir.path("send.json"));
    let mut args: Vec<String> = [
        "send",
        "--memory-file",
        mem.to_str().unwrap(),
        "--size",
        "4M",
        "--disk-size",
        "8M",
        "--warmup",
        "300ms",
        "--no-progress",
        "--to",
        &to,
        "--io-timeout",
        "10s",
        "--stats-json",
        stats.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(workload.iter().map(|s| s.to_string()));
    args.extend(disk_args(&disks));
    args.extend(extra.iter().map(|s| s.to_string()));
    let send = Proc::vmstream(
        "send",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    );
    (send, disks)
}

/// `vmstream guest verify` of `memory` and `disks`: its stdout lines, or its stderr.
fn guest_verify(memory: &Path, disks: &[PathBuf]) -> Result<Vec<String>, String> {
    verify_with("guest", memory, disks)
}

/// `vmstream KIND verify` (`guest`, `kvm`) of `memory` and `disks`: its stdout lines, or its
/// stderr.
pub(crate) fn verify_with(
    kind: &str,
    memory: &Path,
    disks: &[PathBuf],
) -> Result<Vec<String>, String> {
    let mut args = vec![
        kind.to_string(),
        "verify".into(),
        "--memory-file".into(),
        memory.to_str().unwrap().into(),
    ];
    args.extend(disk_args(disks));
    let mut p = Proc::vmstream(
        &format!("{kind} verify"),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    );
    let (status, lines) = p.wait_exit();
    match status.code() {
        Some(0) => Ok(lines),
        _ => Err(p.stderr()),
    }
}

/// The source's statistics' `disks` of a committed migration of two disks (in `dir`'s
/// send.json and recv.json), after checking that both sides have the same memory digest and
/// each disk the same digest, committed.
fn committed_disk_stats(dir: &TmpDir) -> Vec<serde_json::Value> {
    let (sent, received) = (
        read_stats(&dir.path("send.json")),
        read_stats(&dir.path("recv.json")),
    );
    assert_eq!(sent["digest"], received["digest"]);
    let (sd, rd) = (
        sent["disks"].as_array().unwrap(),
        received["disks"].as_array().unwrap(),
    );
    assert_eq!((sd.len(), rd.len()), (2, 2));
    for (s, r) in sd.iter().zip(rd) {
        assert!(s["digest"].is_string());
        assert_eq!(s["digest"], r["digest"]);
        assert_eq!(s["committed"], true);
    }
    sd.clone()
}

/// The statistics' `disks` of a committed migration of a started disk guest: the same
/// digests on both sides, builtin tracking, the guest's writes during the migration
/// counted and the amplification reported.
fn assert_builtin_disk_stats(dir: &TmpDir) {
    let sd = committed_disk_stats(dir);
    let mut written = 0;
    for s in &sd {
        assert_eq!(s["tracking"], "builtin", "{s}");
        assert_eq!(s["granularity"], 65536);
        assert!(s["amplification"].as_f64().unwrap() >= 0.0);
        written += s["guest_bytes_written"].as_u64().unwrap();
    }
    assert!(
        written > 0,
        "the guest wrote nothing during the migration: {sd:?}"
    );
    // Some disk had writes after its bulk copy, resent: an amplification above zero.
    assert!(
        sd.iter()
            .any(|s| s["amplification"].as_f64().unwrap() > 0.0),
        "{sd:?}"
    );
}

/// A started guest that writes its two disks through the block layer (`workload`)
/// migrates with them, tracked by the bitmap it marks: the destination's memory and disks
/// verify together, every disk equals the source's (whose guest ended at the pause), and
/// the statistics report the disks. `stale_bitmaps`: the source disks exist already, with
/// bitmaps at another granularity (16 KiB) than the one asked for (64 KiB, the default),
/// which the fresh guest would refuse: the sender drops them before it starts.
fn started_disk_guest_migrates(name: &str, workload: &[&str], stale_bitmaps: bool) {
    let _g = serial();
    let (dir, _) = started_disk_guest_commits(name, workload, &[], stale_bitmaps);
    assert_builtin_disk_stats(&dir);
}

/// What [`started_disk_guest_migrates`] checks but the statistics, with `extra` send flags;
/// returns the test's directory (its stats) and the receiver's stderr.
fn started_disk_guest_commits(
    name: &str,
    workload: &[&str],
    extra: &[&str],
    stale_bitmaps: bool,
) -> (TmpDir, String) {
    let dir = TmpDir::new(name);
    if stale_bitmaps {
        for d in ["src-d0.img", "src-d1.img"] {
            make_disk(&dir.path(d), 8 << 20, &[], 1);
            let bitmap = vmstream::disk::bitmap::bitmap_path(&dir.path(d));
            vmstream::disk::bitmap::DirtyBitmap::create(&bitmap, 8 << 20, 16 << 10).unwrap();
        }
    }
    let targets = vec![dir.path("dst-d0.img"), dir.path("dst-d1.img")];
    let (mut recv, port) = disk_receiver(&dir, &targets, &[]);
    let mut flags = vec!["--max-bandwidth", "8M"];
    flags.extend_from_slice(extra);
    let (mut send, disks) = started_disk_guest_sender(&dir, port, workload, &flags);
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(0), "send: {}", send.stderr());
    let (status, _) = recv.wait_exit();
    assert_eq!(status.code(), Some(0), "recv: {}", recv.stderr());
    for (src, dst) in disks.iter().zip(&targets) {
        assert!(
            files_identical(src, dst),
            "{} differs from {}",
            dst.display(),
            src.display()
        );
    }
    let lines = guest_verify(&dir.path("dst.img"), &targets).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        lines.iter().any(|l| l.starts_with("ok disks=2")),
        "{lines:?}"
    );
    (dir, recv.stderr())
}

#[test]
fn a_started_dbsim_disk_guest_migrates_memory_and_disks_with_the_block_layers_bitmap() {
    started_disk_guest_migrates(
        "disks-dbsim",
        &["--workload", "dbsim", "--rate", "3000", "--io-rate", "1M"],
        false,
    );
}

#[test]
fn a_started_diskio_guest_migrates_its_disks_with_the_block_layers_bitmap_stale_ones_dropped() {
    started_disk_guest_migrates(
        "disks-diskio",
        &[
            "--workload",
            "diskio",
            "--io-size",
            "16K",
            "--io-rate",
            "2M",
        ],
        true,
    );
}

/// A started dbsim guest with two disks migrates at 8 MB/s (and `extra` send flags) and
/// resumes on the destination, which runs it on: more transactions and more disk writes,
/// and its memory and both disks verified together once it stopped. Returns the test's
/// directory (its stats).
fn resumed_dbsim_disk_guest_verifies(name: &str, extra: &[&str]) -> TmpDir {
    let dir = TmpDir::new(name);
    let targets = vec![dir.path("dst-d0.img"), dir.path("dst-d1.img")];
    let (mut recv, port) = disk_receiver(&dir, &targets, &["--resume", "--run-for", "1500ms"]);
    let mut flags = vec!["--max-bandwidth", "8M"];
    flags.extend_from_slice(extra);
    let (mut send, _) = started_disk_guest_sender(
        &dir,
        port,
        &["--workload", "dbsim", "--rate", "3000", "--io-rate", "1M"],
        &flags,
    );
    let _guest = KillPid(guest_pid(&mut send));
    let (status, _) = send.wait_exit();
    assert_eq!(status.code(), Some(0), "send: {}", send.stderr());
    let (status, lines) = recv.wait_exit();
    assert_eq!(status.code(), Some(0), "recv: {}", recv.stderr());
    let verify = line_starting(&lines, "verify ok");
    assert!(
        field(verify, "tx=") > field(verify, "resumed_from="),
        "{verify}"
    );
    assert_eq!(field(verify, "disks="), 2, "{verify}");
    assert!(field(verify, "disk_writes=") > 0, "{verify}");
    let after = guest_verify(&dir.path("dst.img"), &targets).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        after.iter().any(|l| l.starts_with("ok disks=2")),
        "{after:?}"
    );
    dir
}

#[test]
fn a_resumed_dbsim_disk_guest_runs_on_its_migrated_memory_and_disks_and_verifies_both() {
    let _g = serial();
    let dir = resumed_dbsim_disk_guest_verifies("disks-resume", &[]);
    assert_builtin_disk_stats(&dir);
}

/// A diskio guest writing its disks at 16 MB/s over an 8 MB/s link: without disk write QoS
/// its disks' backlog never shrinks and the migration gives up at --timeout (the guest
/// runs on); with it the guest's writes are capped through its block layer until the
/// backlog drains, and the migration commits, the cap in the statistics and the timeline.
#[test]
fn a_diskio_guest_faster_than_the_link_converges_only_with_disk_write_qos() {
    let _g = serial();
    let workload = [
        "--workload",
        "diskio",
        "--io-size",
        "64K",
        "--io-rate",
        "16M",
    ];
    for (qos, timeout) in [("off", "8s"), ("on", "60s")] {
        let dir = TmpDir::new(&format!("disks-qos-{qos}"));
        let targets = vec![dir.path("dst-d0.img"), dir.path("dst-d1.img")];
        let (mut recv, port) = disk_receiver(&dir, &targets, &[]);
        let extra = [
            "--max-bandwidth",
            "8M",
            "--timeout",
            timeout,
            "--disk-qos",
            qos,
        ];
        let (mut send, disks) = started_disk_guest_sender(&dir, port, &workload, &extra);
        let _guest = KillPid(guest_pid(&mut send));
        let (status, _) = send.wait_exit();
        let (recv_status, _) = recv.wait_exit();
        let sent = read_stats(&dir.path("send.json"));
        let limits: Vec<u64> = sent["timeline"]["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["disk_write_limit"].as_u64().unwrap())
            .collect();
        if qos == "off" {
            assert_eq!(status.code(), Some(3), "send: {}", send.stderr());
            assert!(
                send.stderr().contains("did not converge"),
                "{}",
                send.stderr()
            );
            assert_eq!(recv_status.code(), Some(1), "recv: {}", recv.stderr());
            assert!(limits.iter().all(|&l| l == 0), "{limits:?}");
            for d in sent["disks"].as_array().unwrap() {
                assert!(d["write_limit_min"].is_null(), "{d}");
            }
            continue;
        }
        assert_eq!(status.code(), Some(0), "send: {}", send.stderr());
        assert_eq!(recv_status.code(), Some(0), "recv: {}", recv.stderr());
        assert!(limits.iter().any(|&l| l > 0), "{limits:?}");
        for d in sent["disks"].as_array().unwrap() {
            let cap = d["write_limit_min"]
                .as_u64()
                .unwrap_or_else(|| panic!("{d}"));
            assert!(cap > 0 && cap < 16 << 20, "{d}");
            assert!(d["write_limited_ms"].as_f64().unwrap() > 0.0, "{d}");
        }
        for (src, dst) in disks.iter().zip(&targets) {
            assert!(files_identical(src, dst), "{} differs", dst.display());
        }
        guest_verify(&dir.path("dst.img"), &targets).unwrap_or_else(|e| panic!("{e}"));
    }
}
