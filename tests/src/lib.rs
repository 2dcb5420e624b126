//! Harness for the end-to-end tests in `tests/tests/`: finds (and if needed builds) the
//! real `vmstream` binary, runs it as child processes that are killed on drop, reads their
//! output line by line with bounded waits, and offers temporary directories on tmpfs, a
//! TCP proxy that can cut a connection, and a reader of a guest's transaction counter;
//! [`qemu`] builds and boots the Linux guest of the QEMU tests.

pub mod qemu;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Offset of the committed-transaction counter in a guest's superblock (WORKLOADS.md).
pub const TX_COUNT_OFFSET: u64 = 96;

/// Longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(120);

/// Serializes the migrations of one test binary: they compete for 2 cores otherwise.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `vmstream` binary: `CARGO_BIN_EXE_vmstream` if set, else `target/<profile>/vmstream`
/// next to this test executable, built with cargo first (with the `fault-injection`
/// feature) so it is not stale.
pub fn vmstream_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("CARGO_BIN_EXE_vmstream") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // With the `VMSTREAM_TEST_*` fault hooks (`vmstream/src/cli/fault_env.rs`), which a
        // plain build leaves out.
        cmd.args(["build", "-q", "-p", "vmstream", "--bin", "vmstream"]);
        cmd.args(["--features", "fault-injection"]);
        // Cargo gives this test process the test crate's package variables; build scripts
        // that watch them (ring's does) would rebuild for them, and again for the next
        // plain `cargo build`.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "OUT_DIR",
                ]
                .contains(&k.as_str())
            {
                cmd.env_remove(&k);
            }
        }
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("running cargo build for the vmstream binary");
        assert!(status.success(), "cargo build -p vmstream failed");
        let bin = profile_dir.join("vmstream");
        assert!(bin.exists(), "{} missing after cargo build", bin.display());
        bin
    })
    .clone()
}

/// A temporary directory on tmpfs (or the system temp dir), removed on drop.
pub struct TmpDir(pub PathBuf);

impl TmpDir {
    /// A fresh directory named after `name`.
    pub fn new(name: &str) -> TmpDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("vmstream-e2e-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TmpDir(dir)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// File names in the directory, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process whose stdout lines arrive on a channel; killed (and reaped) on drop.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// What the process is, for messages.
    pub name: String,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    /// Runs `vmstream ARGS...` with `envs` added.
    pub fn vmstream(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        Proc::spawn(name, args, envs, false)
    }

    /// [`Proc::vmstream`] as the leader of a process group of its own, like a job a shell
    /// runs: signalling the group (`kill -INT -PID`) is what a terminal's Ctrl-C does.
    pub fn vmstream_job(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        Proc::spawn(name, args, envs, true)
    }

    /// [`Proc::vmstream_job`] started with SIGINT ignored, as a shell script starts its
    /// background jobs (`trap '' INT` and `exec`: an ignored signal stays ignored across
    /// exec).
    pub fn vmstream_job_ignoring_sigint(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let bin = vmstream_bin();
        let mut wrapped = vec![
            "-c",
            "trap '' INT; exec \"$0\" \"$@\"",
            bin.to_str().unwrap(),
        ];
        wrapped.extend_from_slice(args);
        Proc::spawn_program(name, Path::new("sh"), &wrapped, envs, true)
    }

    fn spawn(name: &str, args: &[&str], envs: &[(&str, &str)], own_group: bool) -> Proc {
        Proc::spawn_program(name, &vmstream_bin(), args, envs, own_group)
    }

    fn spawn_program(
        name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        own_group: bool,
    ) -> Proc {
        let mut cmd = Command::new(program);
        if own_group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn vmstream {args:?}: {e}"));
        let (tx, lines) = channel();
        let out = child.stdout.take().expect("stdout");
        let mut readers = vec![std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        })];
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&stderr);
        readers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }));
        Proc {
            child,
            name: name.to_string(),
            lines,
            seen: Vec::new(),
            stderr,
            readers,
        }
    }

    /// Waits (bounded by [`WAIT`]) until the process wrote `needle` to stderr.
    pub fn wait_stderr(&self, needle: &str) {
        wait_for_stderr(&self.name, &self.stderr, needle, || None);
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for a stdout line starting with `prefix` and returns it.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return l.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no line starting with {prefix:?} within {WAIT:?}; stdout {:?}, stderr {}",
                    self.name,
                    self.seen,
                    self.stderr()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{}: exited without a line starting with {prefix:?}; stdout {:?}, stderr {}",
                    self.name,
                    self.seen,
                    self.stderr()
                ),
            }
        }
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// [`Proc::wait_stderr`] for a process that must keep running meanwhile: panics at
    /// once if it exits first.
    pub fn wait_stderr_running(&mut self, needle: &str) {
        let child = &mut self.child;
        wait_for_stderr(&self.name, &self.stderr, needle, || {
            child.try_wait().expect("try_wait")
        });
    }

    /// Waits at most `within` for the exit: `None` if the process still runs (it is left
    /// running), else the status and all stdout lines as [`Proc::wait_exit`].
    pub fn exit_within(&mut self, within: Duration) -> Option<(ExitStatus, Vec<String>)> {
        let deadline = Instant::now() + within;
        while self.child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(self.wait_exit())
    }

    /// Waits (bounded) for the exit; returns the status and all stdout lines.
    pub fn wait_exit(&mut self) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "{} did not exit within {WAIT:?}; stderr {}",
                    self.name,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // A grandchild that inherited a pipe keeps it open: wait for the readers, bounded.
        let until = Instant::now() + Duration::from_secs(5);
        while self.readers.iter().any(|h| !h.is_finished()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.seen.extend(self.lines.try_iter());
        (status, self.seen.clone())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills process `pid` on drop (a guest the sender leaves running after a failure).
pub struct KillPid(pub u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

/// Starts `vmstream recv --listen 127.0.0.1:0 ARGS...` and returns it with its port.
pub fn start_receiver(args: &[&str]) -> (Proc, u16) {
    let mut all = vec!["recv", "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut p = Proc::vmstream("recv", &all, &[]);
    let line = p.wait_line("listening on ");
    let port = line
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("bad listening line {line:?}"));
    (p, port)
}

/// Starts a receiver into `memory_file` that resumes the guest for `run_for`
/// after the switchover and writes its statistics to `stats_json`.
pub fn start_resuming_receiver(
    memory_file: &Path,
    run_for: &str,
    stats_json: &Path,
) -> (Proc, u16) {
    start_receiver(&[
        "--memory-file",
        memory_file.to_str().unwrap(),
        "--resume",
        "--run-for",
        run_for,
        "--stats-json",
        stats_json.to_str().unwrap(),
    ])
}

/// Starts a 16 MiB `hotset` guest at 2000 tx/s that vmstream does not track
/// (`guest run --no-track`, plus `extra` arguments) on `memory_file`, and
/// waits until it is ready: the "guest vmstream did not start" of the hash
/// tracking tests.
pub fn start_external_guest(memory_file: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "guest",
        "run",
        "--memory-file",
        memory_file.to_str().unwrap(),
        "--size",
        "16M",
        "--workload",
        "hotset",
        "--rate",
        "2000",
        "--no-track",
    ];
    args.extend_from_slice(extra);
    let mut guest = Proc::vmstream("external guest", &args, &[]);
    guest.wait_line("ready ");
    guest
}

/// Starts `vmstream send` of the external `guest` on `memory_file` with hash
/// dirty tracking to the receiver on `port`, with `extra` arguments.
pub fn send_external_guest(memory_file: &Path, guest: &Proc, port: u16, extra: &[&str]) -> Proc {
    let (pid, to) = (guest.pid().to_string(), format!("127.0.0.1:{port}"));
    let mut args = vec![
        "send",
        "--memory-file",
        memory_file.to_str().unwrap(),
        "--pid",
        &pid,
        "--dirty-tracking",
        "hash",
        "--to",
        &to,
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    Proc::vmstream("send", &args, &[])
}

/// The guest pid from the sender's `guest pid=N ...` line.
pub fn guest_pid(sender: &mut Proc) -> u32 {
    let line = sender.wait_line("guest pid=");
    line["guest pid=".len()..]
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad guest line {line:?}"))
}

/// The committed-transaction counter of the guest memory file at `path`.
pub fn read_tx_count(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, TX_COUNT_OFFSET)
        .expect("read tx_count");
    u64::from_le_bytes(b)
}

/// Waits (bounded) until the guest on `path` commits more than `than` transactions.
pub fn wait_tx_above(path: &Path, than: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = read_tx_count(path);
        if now > than {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "guest on {} stuck at tx {now}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether two files have identical contents (compared in 1 MiB chunks).
pub fn files_identical(a: &Path, b: &Path) -> bool {
    let (fa, fb) = match (std::fs::File::open(a), std::fs::File::open(b)) {
        (Ok(x), Ok(y)) => (x, y),
        _ => return false,
    };
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    if la != lb {
        return false;
    }
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < la {
        let n = ((la - off) as usize).min(ba.len());
        fa.read_exact_at(&mut ba[..n], off).unwrap();
        fb.read_exact_at(&mut bb[..n], off).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
        off += n as u64;
    }
    true
}

/// The value of `key` (e.g. `tx=`) in a line of `key=value` words.
pub fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// The first of `lines` that starts with `prefix`.
pub fn line_starting<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in {lines:?}"))
}

/// Waits for a receiver that must fail: exit status 1, each of `reasons` in its stderr and
/// nothing committed at `dst`. Returns the stderr for further checks.
pub fn expect_receiver_failure(recv: &mut Proc, dst: &Path, reasons: &[&str]) -> String {
    let (status, _) = recv.wait_exit();
    assert_eq!(status.code(), Some(1));
    let err = recv.stderr();
    for reason in reasons {
        assert!(err.contains(reason), "{err}");
    }
    assert!(!dst.exists());
    err
}

/// Reads a stats JSON file.
pub fn read_stats(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// A TCP proxy on 127.0.0.1 that forwards one connection to `target` and cuts both
/// directions once `cut_after` bytes went from the client to the target.
pub struct CuttingProxy {
    /// The proxy's port.
    pub port: u16,
}

impl CuttingProxy {
    /// Starts the proxy.
    pub fn start(target: u16, cut_after: u64) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            let Ok((client, _)) = listener.accept() else {
                return;
            };
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                return;
            };
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            // Destination -> source: forward until either side closes.
            let back = std::thread::spawn(move || {
                let (mut from, mut to) = (s2, c2);
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Both);
            });
            let (mut from, mut to) = (client, server);
            let mut buf = vec![0u8; 64 << 10];
            let mut sent = 0u64;
            while sent < cut_after {
                let want = buf.len().min((cut_after - sent) as usize);
                match from.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n as u64;
                    }
                }
            }
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            let _ = back.join();
        });
        drop(thread); // detached: it ends when either side closes
        CuttingProxy { port }
    }
}

/// After a migration that did not commit, the file-backed guest on `src` still runs: its
/// transaction count moves on.
pub fn assert_source_guest_runs(src: &Path) {
    let tx = read_tx_count(src);
    wait_tx_above(src, tx);
}

/// Sends SIG`signal` (e.g. `INT`) to `target`: a pid, or `-PGID` for a process group.
pub fn send_signal(signal: &str, target: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), "--", target])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {target}");
}

/// A TCP proxy to `127.0.0.1:target` that delays everything, in both directions, by a fixed
/// time (a long round trip, bandwidth unchanged). Serves any number of connections.
pub struct DelayProxy {
    /// The proxy's port.
    pub port: u16,
}

impl DelayProxy {
    /// Starts the proxy with `one_way` of delay per direction.
    pub fn start(target: u16, one_way: Duration) -> DelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    return;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                delayed_pump(client, server, one_way);
                delayed_pump(s2, c2, one_way);
            }
        });
        DelayProxy { port }
    }
}

/// Forwards `from` to `to`, each chunk `delay` after it was read, in order.
fn delayed_pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0
                || tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, chunk) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Waits (bounded by [`WAIT`]) until `stderr` (process `name`'s) holds `needle`; panics
/// if `exited` reports an exit first and the needle is not among its last words.
fn wait_for_stderr(
    name: &str,
    stderr: &Mutex<String>,
    needle: &str,
    mut exited: impl FnMut() -> Option<ExitStatus>,
) {
    let text = || stderr.lock().unwrap().clone();
    let deadline = Instant::now() + WAIT;
    while !text().contains(needle) {
        if let Some(status) = exited() {
            // Its last words may still be in the pipe.
            std::thread::sleep(Duration::from_millis(100));
            if text().contains(needle) {
                return;
            }
            panic!(
                "{name} exited ({status}) before writing {needle:?}: {}",
                text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{name}: no {needle:?} on stderr: {}",
            text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `vmstream send` arguments for a 16 MiB `random` guest (2000 writes a second, 200 ms of
/// warmup) on `src` to `to`, without a progress bar, then `extra`.
pub fn random_guest_send_args(src: &Path, to: &str, extra: &[&str]) -> Vec<String> {
    let base = [
        "send",
        "--memory-file",
        src.to_str().unwrap(),
        "--size",
        "16M",
        "--workload",
        "random",
        "--rate",
        "2000",
        "--warmup",
        "200ms",
        "--no-progress",
        "--to",
        to,
    ];
    base.iter().chain(extra).map(|a| a.to_string()).collect()
}

/// Whether this machine cannot run KVM guests (the reason printed: the test skips).
pub fn kvm_unavailable() -> bool {
    if let Err(why) = vmstream::guest::kvm::kvm_available() {
        eprintln!("skipping: {why}");
        return true;
    }
    false
}

/// `vmstream send --kvm` of a 2-vCPU guest on `src` to `port` (`extra` may name the
/// workload; dbsim by default).
pub fn kvm_sender(
    src: &Path,
    size: &str,
    port: u16,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    let to = format!("127.0.0.1:{port}");
    let mut args = vec![
        "send",
        "--kvm",
        "--size",
        size,
        "--vcpus",
        "2",
        "--memory-file",
        src.to_str().unwrap(),
        "--to",
        &to,
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    Proc::vmstream("send --kvm", &args, envs)
}
