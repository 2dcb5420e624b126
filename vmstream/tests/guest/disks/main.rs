//! Process guests with disks: the real binary runs `diskio` and dbsim's disk mode on real
//! files, `guest verify --disk` checks them, and corruptions of a disk block are caught
//! with the right error; `bitmap`: the dirty bitmap marks exactly the granules written,
//! keeps its granularity, and the sender's write limit makes the guest's writes wait.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vmstream::disk::bitmap::{bitmap_path, DirtyBitmap};
use vmstream::guest::file::disks::verify::DiskVerifyError;
use vmstream::guest::file::disks::{verify_guest, GuestVerifyError};

mod bitmap;

/// A directory under /dev/shm (tmpfs), removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let p = base.join(format!("vmstream-disks-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A guest child killed when the test ends, failed or not (a failed assertion must not
/// leave it running).
struct Running(std::process::Child);

impl Running {
    /// `vmstream ARGS` started, its stderr discarded and its stdout `stdout`.
    fn spawn(args: &[&str], stdout: std::process::Stdio) -> Running {
        Running(
            Command::new(env!("CARGO_BIN_EXE_vmstream"))
                .args(args)
                .stdout(stdout)
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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

fn run_ok(args: &[&str]) -> String {
    let mut all = vec!["guest", "run"];
    all.extend_from_slice(args);
    let (code, out, err) = vmstream(&all);
    assert_eq!(code, 0, "guest run {args:?}: {err}");
    out
}

/// `guest verify` of memory `m` and `disks`: the disk line's `writes=`, or the error.
fn verify(m: &str, disks: &[&str]) -> Result<u64, String> {
    let mut args = vec!["guest", "verify", "--memory-file", m];
    for d in disks {
        args.extend(["--disk", d]);
    }
    let (code, out, err) = vmstream(&args);
    if code != 0 {
        assert_eq!(code, 1, "{err}");
        return Err(err);
    }
    let line = out.lines().nth(1).expect("a disk line");
    assert!(line.starts_with("ok disks="), "{out}");
    Ok(line
        .split(' ')
        .find_map(|kv| kv.strip_prefix("writes="))
        .unwrap()
        .parse()
        .unwrap())
}

/// A diskio guest on two 4 MiB disks, run for `ms`.
fn diskio_guest(dir: &Dir, ms: u64) -> (String, Vec<String>) {
    let m = dir.path("mem");
    let disks = vec![dir.path("d0"), dir.path("d1")];
    let duration = format!("{ms}ms");
    run_ok(&[
        "--memory-file",
        &m,
        "--size",
        "4M",
        "--workload",
        "diskio",
        "--disk",
        &disks[0],
        "--disk",
        &disks[1],
        "--disk-size",
        "4M",
        "--io-size",
        "4K",
        "--io-rate",
        "2M",
        "--duration",
        &duration,
        "--no-track",
    ]);
    (m, disks)
}

fn resume(m: &str, disks: &[String], ms: u64) {
    let duration = format!("{ms}ms");
    let mut args = vec![
        "--memory-file",
        m,
        "--resume",
        "--duration",
        &duration,
        "--no-track",
    ];
    for d in disks {
        args.extend(["--disk", d.as_str()]);
    }
    run_ok(&args);
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn diskio_runs_verifies_and_resumes() {
    let dir = Dir::new("diskio");
    let (m, disks) = diskio_guest(&dir, 400);
    let first = verify(&m, &strs(&disks)).unwrap();
    assert!(first > 0);
    resume(&m, &disks, 300);
    let second = verify(&m, &strs(&disks)).unwrap();
    assert!(second > first, "{second} after {first}");
    // The disks are part of the guest: verifying without them, or with one, fails.
    assert!(verify(&m, &[])
        .unwrap_err()
        .contains("has 2 disks, 0 given"));
    assert!(verify(&m, &[&disks[0]])
        .unwrap_err()
        .contains("has 2 disks, 1 given"));
}

#[test]
fn dbsim_disk_mode_runs_verifies_and_resumes() {
    for n in [1usize, 2] {
        let dir = Dir::new(&format!("dbsim{n}"));
        let m = dir.path("mem");
        let disks: Vec<String> = (0..n).map(|i| dir.path(&format!("d{i}"))).collect();
        let mut args = vec![
            "--memory-file",
            &m,
            "--size",
            "4M",
            "--workload",
            "dbsim",
            "--rate",
            "3000",
            "--disk-size",
            "8M",
            "--io-rate",
            "1M",
            "--duration",
            "400ms",
            "--no-track",
        ];
        for d in &disks {
            args.extend(["--disk", d.as_str()]);
        }
        let out = run_ok(&args);
        assert!(out.contains("kind=dbsim"), "{out}");
        let first = verify(&m, &strs(&disks)).unwrap();
        resume(&m, &disks, 300);
        assert!(verify(&m, &strs(&disks)).unwrap() > first);
    }
}

fn disk_error(m: &str, disks: &[String]) -> DiskVerifyError {
    let paths: Vec<PathBuf> = disks.iter().map(PathBuf::from).collect();
    match verify_guest(Path::new(m), &paths) {
        Err(GuestVerifyError::Disk(e)) => e,
        other => panic!("expected a disk error, got {other:?}"),
    }
}

fn block(disk: &str, b: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(disk)
        .unwrap()
        .read_exact_at(&mut buf, b * 4096)
        .unwrap();
    buf
}

fn put_block(disk: &str, b: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .unwrap()
        .write_all_at(bytes, b * 4096)
        .unwrap();
}

fn version(block: &[u8]) -> u64 {
    u64::from_le_bytes(block[8..16].try_into().unwrap())
}

#[test]
fn lost_stale_and_torn_disk_blocks_are_caught() {
    let dir = Dir::new("corrupt");
    let (m, disks) = diskio_guest(&dir, 300);
    let d0 = disks[0].clone();
    let before = std::fs::read(&d0).unwrap();
    resume(&m, &disks, 400);
    verify(&m, &strs(&disks)).unwrap();
    // A block written both before and after the snapshot: its old bytes are a stale copy.
    let blocks = (4 << 20) / 4096 - 2;
    let b = (0..blocks)
        .find(|&b| {
            let old = version(&before[b as usize * 4096..][..4096]);
            old > 0 && version(&block(&d0, b)) > old
        })
        .expect("a block rewritten after the snapshot");
    let good = block(&d0, b);

    put_block(&d0, b, &before[b as usize * 4096..][..4096]);
    assert!(
        matches!(disk_error(&m, &disks), DiskVerifyError::Stale { disk: 0, block, .. } if block == b)
    );
    assert!(verify(&m, &strs(&disks)).unwrap_err().contains("stale"));

    let mut torn = good.clone();
    torn[2048..].copy_from_slice(&before[b as usize * 4096 + 2048..][..2048]);
    put_block(&d0, b, &torn);
    assert!(
        matches!(disk_error(&m, &disks), DiskVerifyError::Torn { disk: 0, block, .. } if block == b)
    );
    assert!(verify(&m, &strs(&disks)).unwrap_err().contains("torn"));

    put_block(&d0, b, &[0; 4096]);
    assert!(
        matches!(disk_error(&m, &disks), DiskVerifyError::Lost { disk: 0, block, .. } if block == b)
    );
    assert!(verify(&m, &strs(&disks)).unwrap_err().contains("lost"));

    put_block(&d0, b, &good);
    verify(&m, &strs(&disks)).unwrap();
    // A resumed guest refuses disks that disagree with its memory.
    put_block(&d0, b, &[0; 4096]);
    let (code, _, err) = vmstream(&[
        "guest",
        "run",
        "--memory-file",
        &m,
        "--resume",
        "--duration",
        "10ms",
        "--disk",
        &disks[0],
        "--disk",
        &disks[1],
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("refusing to resume") && err.contains("lost"),
        "{err}"
    );
}

/// A finished diskio guest's memory file `m`, read: the `u64` at an offset, the offset of
/// its disk area and of disk 0's ledger, and a block of disk 0 the run wrote.
struct WrittenLedger {
    mem: Vec<u8>,
    area: usize,
    ledger: usize,
    block: usize,
}

impl WrittenLedger {
    fn read(m: &str) -> WrittenLedger {
        let mut l = WrittenLedger {
            mem: std::fs::read(m).unwrap(),
            area: 0,
            ledger: 0,
            block: 0,
        };
        l.area = l.u64_at(112) as usize;
        l.ledger = l.area + l.u64_at(l.area + 384) as usize;
        l.block = (0..1000).find(|&b| l.entry(b) > 0).unwrap();
        l
    }

    fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.mem[off..off + 8].try_into().unwrap())
    }

    /// Disk 0's ledger entry of block `b`.
    fn entry(&self, b: usize) -> u64 {
        self.u64_at(self.ledger + b * 8)
    }
}

/// Memory's ledger is the other half of the agreement: a ledger entry set back (a stale
/// ledger page) leaves a disk block newer than memory says.
#[test]
fn a_stale_ledger_in_memory_is_caught() {
    let dir = Dir::new("ledger");
    let (m, disks) = diskio_guest(&dir, 300);
    let l = WrittenLedger::read(&m);
    let b = l.block;
    let f = std::fs::OpenOptions::new().write(true).open(&m).unwrap();
    f.write_all_at(&(l.entry(b) - 1).to_le_bytes(), (l.ledger + b * 8) as u64)
        .unwrap();
    assert!(
        matches!(disk_error(&m, &disks), DiskVerifyError::Newer { disk: 0, block, .. } if block == b as u64)
    );
}

/// A guest stopped between its ledger's commit and its write counter's (the write's intent
/// still armed) verifies: the write is done but for its count. The same memory with the
/// intent disarmed is refused (its checkpoint counts more writes than memory).
#[test]
fn a_guest_stopped_between_its_ledger_and_its_counter_verifies() {
    use vmstream::guest::file::disks::area::da;
    let dir = Dir::new("ledger-counter");
    let (m, disks) = diskio_guest(&dir, 300);
    let l = WrittenLedger::read(&m);
    let writes = l.u64_at(l.area + da::WRITES);
    let f = std::fs::OpenOptions::new().write(true).open(&m).unwrap();
    let put = |off: usize, v: u64| f.write_all_at(&v.to_le_bytes(), off as u64).unwrap();
    put(l.area + da::WRITES, writes - 1);
    put(l.area + da::INTENT_DISK, 0);
    put(l.area + da::INTENT_BLOCK, l.block as u64);
    put(l.area + da::INTENT_VERSION, l.entry(l.block));
    put(l.area + da::INTENT_SEQ, writes);
    assert_eq!(verify(&m, &strs(&disks)), Ok(writes));
    put(l.area + da::INTENT_SEQ, 0);
    let e = verify(&m, &strs(&disks)).unwrap_err();
    assert!(e.contains(&format!("memory has {}", writes - 1)), "{e}");
}

/// `guest run` refuses disk options it cannot honour, with the exit status and reason.
#[test]
fn bad_disk_options_are_refused() {
    let dir = Dir::new("bad");
    let (m, d, missing) = (dir.path("mem"), dir.path("d"), dir.path("missing"));
    let cases = [
        (
            "--workload diskio".to_string(),
            2,
            "needs at least one --disk",
        ),
        (
            format!("--workload diskio --disk {d} --disk-size 4M --io-size 3K"),
            1,
            "I/O size 3072",
        ),
        (
            format!("--workload random --disk {d} --disk-size 4M"),
            1,
            "writes no disks",
        ),
        (
            format!("--workload diskio --disk {d} --disk-size 4M --disk-granularity 3K"),
            1,
            "granularity 3072",
        ),
        (
            format!("--workload diskio --disk {missing}"),
            1,
            "does not exist",
        ),
    ];
    for (extra, expected, reason) in &cases {
        let mut args = vec!["guest", "run", "--memory-file", &m, "--size", "4M"];
        args.extend(extra.split_whitespace());
        let (code, _, err) = vmstream(&args);
        assert_eq!(code, *expected, "{args:?}: {err}");
        assert!(err.contains(reason), "{args:?}: {err}");
    }
}

/// `vmstream send`'s way of starting a guest (`GuestSpec::Spawn`) gives it its disks:
/// the started guest writes them through its block layer.
#[test]
fn a_started_source_guest_runs_on_its_disks() {
    use vmstream::guest::file::disks::area::DiskWorkloadKind;
    use vmstream::guest::file::disks::{DiskParams, GuestDisks};
    use vmstream::guest::file::layout::ImageWorkloadKind;
    use vmstream::guest::file::source::{DirtyTracking, GuestSpec};
    use vmstream::telemetry::notice::Notices;

    let dir = Dir::new("spawn");
    let disk = PathBuf::from(dir.path("d0"));
    let spec = GuestSpec::Spawn {
        path: PathBuf::from(dir.path("mem")),
        size: 4 << 20,
        workload: ImageWorkloadKind::Idle,
        rate: None,
        active: None,
        guest_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_vmstream"))),
        disks: GuestDisks {
            paths: vec![disk.clone()],
            create_size: Some(4 << 20),
            workload: Some(DiskParams {
                kind: DiskWorkloadKind::Diskio,
                io_size: 8192,
                io_rate: 1 << 20,
                seed: 3,
            }),
            ..GuestDisks::default()
        },
    };
    let mut guest = vmstream::guest::migratable::open_guest(
        &spec,
        Some(DirtyTracking::Hash),
        &Notices::default(),
    )
    .expect("start the guest");
    let bitmap = DirtyBitmap::open(&bitmap_path(&disk)).unwrap();
    let start = std::time::Instant::now();
    while bitmap.writes() < 8 && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(bitmap.writes() >= 8, "{} writes", bitmap.writes());
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 4 << 20);
    guest.terminate().unwrap();
}

/// `send` refuses, before starting anything, disks it could not track: builtin tracking
/// of a started guest whose workload does not write its disks, a missing disk without
/// --disk-size; and diskio needs disks. (Until issue 20's step 1 it refused every disk a
/// started guest writes: that premise is gone, those disks migrate now.)
#[test]
fn send_refuses_disks_it_cannot_track_before_starting_anything() {
    let dir = Dir::new("send");
    let (m, d) = (dir.path("mem"), dir.path("d0"));
    let send = |extra: &[&str]| {
        let mut args = vec![
            "send",
            "--memory-file",
            &m,
            "--size",
            "4M",
            "--to",
            "127.0.0.1:9",
        ];
        args.extend_from_slice(extra);
        vmstream(&args)
    };
    let (code, _, err) = send(&[
        "--workload",
        "random",
        "--disk",
        &d,
        "--disk-size",
        "4M",
        "--disk-tracking",
        "builtin",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("does not write its disks through the block layer"),
        "{err}"
    );
    assert!(!Path::new(&d).exists() && !Path::new(&m).exists());
    let (code, _, err) = send(&["--workload", "diskio", "--disk", &d]);
    assert_eq!(code, 2);
    assert!(err.contains(&format!("--disk {d}")), "{err}");
    assert!(!Path::new(&d).exists() && !Path::new(&m).exists());
    let (code, _, err) = send(&["--workload", "diskio"]);
    assert_eq!(code, 2);
    assert!(err.contains("diskio needs at least one --disk"), "{err}");
}

/// A copy of memory and disks taken while the guest is paused at any instant (the
/// switchover's pause) verifies, even one stopped between a disk write and its ledger
/// update; and a guest killed at any instant, even inside a write (which SIGKILL, unlike
/// a stop, can tear), verifies and resumes on its disks.
#[test]
fn a_guest_stopped_or_killed_anywhere_leaves_consistent_disks() {
    for workload in ["diskio", "dbsim"] {
        let dir = Dir::new(&format!("stop-{workload}"));
        let (m, disks) = (dir.path("mem"), vec![dir.path("d0"), dir.path("d1")]);
        let mut guest = Running::spawn(
            &[
                "guest",
                "run",
                "--memory-file",
                &m,
                "--size",
                "4M",
                "--workload",
                workload,
                "--rate",
                "0",
                "--disk",
                &disks[0],
                "--disk",
                &disks[1],
                "--disk-size",
                "8M",
                "--io-size",
                "8K",
                "--io-rate",
                "0",
                "--no-track",
            ],
            std::process::Stdio::piped(),
        );
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(guest.0.stdout.as_mut().unwrap()),
            &mut ready,
        )
        .unwrap();
        assert!(ready.starts_with("ready "), "{ready}");
        let throttle = vmstream::guest::file::throttle::Throttle::new(guest.0.id()).unwrap();
        let snap = |name: &str| dir.path(name);
        for i in 0..8 {
            std::thread::sleep(Duration::from_millis(37 + i * 11));
            // The source's pause: returns once every thread of the guest is stopped.
            throttle.pause().unwrap();
            std::fs::copy(&m, snap("smem")).unwrap();
            for (k, d) in disks.iter().enumerate() {
                std::fs::copy(d, snap(&format!("s{k}"))).unwrap();
            }
            throttle.resume().unwrap();
            verify(&snap("smem"), &[&snap("s0"), &snap("s1")])
                .unwrap_or_else(|e| panic!("{workload} snapshot {i}: {e}"));
        }
        guest.0.kill().unwrap();
        guest.0.wait().unwrap();
        drop(guest);
        verify(&m, &strs(&disks)).unwrap_or_else(|e| panic!("{workload} after SIGKILL: {e}"));
        // Killed again and again, maybe inside a write: each time verify passes and the
        // guest resumes (finishing the write in flight).
        for i in 0..6 {
            let mut args = vec![
                "guest",
                "run",
                "--memory-file",
                &m,
                "--resume",
                "--no-track",
            ];
            for d in &disks {
                args.extend(["--disk", d.as_str()]);
            }
            let mut guest = Running::spawn(&args, std::process::Stdio::null());
            std::thread::sleep(Duration::from_millis(120 + i * 17));
            guest.0.kill().unwrap();
            guest.0.wait().unwrap();
            drop(guest);
            verify(&m, &strs(&disks))
                .unwrap_or_else(|e| panic!("{workload} after SIGKILL {i}: {e}"));
        }
        resume(&m, &disks, 100);
        verify(&m, &strs(&disks)).unwrap();
    }
}

/// dbsim's disk mode: a data block on disk of the same version as the buffer pool's copy
/// must be the same bytes. A pool block changed (and resealed, so memory alone verifies)
/// no longer agrees with its disk copy.
#[test]
fn a_pool_block_that_differs_from_its_disk_copy_is_caught() {
    use vmstream::guest::file::layout::block_checksum;
    let dir = Dir::new("agree");
    let (m, disks) = (dir.path("mem"), vec![dir.path("d0"), dir.path("d1")]);
    run_ok(&[
        "--memory-file",
        &m,
        "--size",
        "4M",
        "--workload",
        "dbsim",
        "--rate",
        "2000",
        "--disk",
        &disks[0],
        "--disk",
        &disks[1],
        "--disk-size",
        "8M",
        "--io-rate",
        "1M",
        "--duration",
        "300ms",
        "--no-track",
    ]);
    let mut mem = std::fs::read(&m).unwrap();
    let u64_at = |mem: &[u8], off: usize| u64::from_le_bytes(mem[off..off + 8].try_into().unwrap());
    let data = u64_at(&mem, 48) as usize;
    let area = u64_at(&mem, 112) as usize;
    let disk_ledger = area + u64_at(&mem, area + 384) as usize;
    // Two disks: disk 0 holds every data block (memory block b at block b), disk 1 the log.
    let b = (0..300)
        .find(|&b| {
            let v = u64_at(&mem, 4096 + b * 8);
            v > 0 && v == u64_at(&mem, disk_ledger + b * 8)
        })
        .expect("a pool block as clean as its disk copy");
    verify(&m, &strs(&disks)).unwrap();
    let block = &mut mem[data + b * 8192..data + (b + 1) * 8192];
    block[100] ^= 0x20;
    let sum = block_checksum(block);
    block[16..24].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(&m, &mem).unwrap();
    // Memory alone still verifies: only the disk copy tells.
    vmstream::guest::file::verify::verify_file(Path::new(&m)).unwrap();
    assert!(matches!(
        disk_error(&m, &disks),
        DiskVerifyError::Disagree { disk: 0, block, memory_block, .. } if block == b as u64 && memory_block == b as u64
    ));
}
