//! The guest process: maps guest memory, formats or resumes a workload, arms async
//! write-protect tracking on its mapping and runs the workload at a target rate.
//!
//! It prints one ready line once tracking is armed (see [`ReadyLine`]) and, at the end, a
//! `done tx=N` line. SIGSTOP/SIGCONT at any instant is safe: every transaction commits
//! through the redo journal in guest memory, and SIGKILL leaves a recoverable image too.
//!
//! With a control channel on stdin, one command per line gets one reply line:
//! - `tx B`: rewrite block B (filling workloads only) -> `ok tx=SEQ block=B version=V`;
//! - `step N`: run N workload transactions -> `ok tx=COUNT`;
//! - `count` -> `tx=COUNT`;
//! - `exit` (or end of input): stop the guest.

pub mod disks;
pub mod layout;
pub mod release;
pub mod source;
pub mod throttle;
pub mod verify;
pub mod workload;

use std::fs::File;
use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::disk::block::{open_disks, Disk, DiskError};
use crate::guest::file::disks::area::SB_DISK_AREA;
use crate::guest::file::disks::verify::verify_disks;
use crate::guest::file::disks::workload::{initial_writes, DiskWorkload};
use crate::guest::file::disks::{DiskSetupError, GuestDisks};
use crate::guest::file::layout::{get_u64, ImageWorkloadKind};
use crate::guest::file::verify::{verify_snapshot, ImageVerifyError, ImageVerifyReport};
use crate::guest::file::workload::{format, Workload, WorkloadError, WorkloadParams};
use crate::memory::{open_owned, own_open_file, GuestMemory, MapMode, MemoryError, OwnError};
use crate::track::uffd::WpAsync;

/// Where guest memory lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemorySource {
    /// A file path (tmpfs, hugetlbfs, disk, or `/proc/PID/fd/N` of another memfd).
    File(PathBuf),
    /// A new memfd created by the guest (init only); reachable as `/proc/PID/fd/N`.
    Memfd,
}

/// Format fresh memory or continue from what is in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartMode {
    /// Create/zero the memory and format it for this workload.
    Init(WorkloadParams),
    /// Recover and verify the memory, then continue its workload (refuses on a bad image).
    Resume,
}

/// Everything `vmstream guest run` needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessGuestConfig {
    /// Guest memory.
    pub memory: MemorySource,
    /// Memory size: required for init, checked against the file on resume if given.
    pub size: Option<u64>,
    /// Init or resume.
    pub start: StartMode,
    /// Override the target rate (tx/s, 0 = unlimited) stored in the superblock.
    pub rate: Option<u64>,
    /// Stop after this long (default: run until killed or told to exit).
    pub duration: Option<Duration>,
    /// Read control commands from stdin.
    pub control_stdin: bool,
    /// Arm userfaultfd async write-protect so senders can use the uffd-wp tracker.
    pub track_writes: bool,
    /// The guest's disks (none by default): a fresh guest lays its disk area out for
    /// them, a resumed one verifies them against its memory first.
    pub disks: GuestDisks,
}

/// Errors of the guest process.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Mapping the memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Formatting failed or the memory does not hold a guest.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// Resume found an inconsistent image and refuses to run.
    #[error("refusing to resume: {0}")]
    Verify(#[from] ImageVerifyError),
    /// Arming userfaultfd write-protect failed.
    #[error("userfaultfd write-protect: {0}")]
    Uffd(io::Error),
    /// Writing to stdout failed.
    #[error("output: {0}")]
    Io(#[from] io::Error),
    /// Inconsistent options.
    #[error("{0}")]
    Config(String),
    /// Another guest process runs on the memory file.
    #[error("{0} is in use by another running guest")]
    InUse(PathBuf),
    /// The disks could not be set up, or disagree with memory on resume.
    #[error(transparent)]
    Disks(#[from] DiskSetupError),
    /// A disk write failed.
    #[error(transparent)]
    DiskWrite(#[from] DiskError),
}

/// The line a guest prints once it runs with tracking armed:
/// `ready pid=P addr=0xA len=N path=PATH kind=K tx=T`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyLine {
    /// Guest process id.
    pub pid: u32,
    /// Start address of the guest memory mapping in the guest process.
    pub addr: u64,
    /// Mapping length in bytes.
    pub len: u64,
    /// Path that maps the same memory.
    pub path: PathBuf,
    /// Workload.
    pub kind: ImageWorkloadKind,
    /// Transactions committed at start.
    pub tx_count: u64,
}

impl std::fmt::Display for ReadyLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ready pid={} addr={:#x} len={} path={} kind={} tx={}",
            self.pid,
            self.addr,
            self.len,
            self.path.display(),
            self.kind.name(),
            self.tx_count
        )
    }
}

impl ReadyLine {
    /// Parse a ready line (`None` if `line` is not one). The path must not contain spaces.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.trim().strip_prefix("ready ")?;
        let get = |key: &str| {
            rest.split(' ')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
        };
        let addr = get("addr")?;
        Some(Self {
            pid: get("pid")?.parse().ok()?,
            addr: u64::from_str_radix(addr.strip_prefix("0x")?, 16).ok()?,
            len: get("len")?.parse().ok()?,
            path: PathBuf::from(get("path")?),
            kind: ImageWorkloadKind::from_name(&get("kind")?)?,
            tx_count: get("tx")?.parse().ok()?,
        })
    }
}

/// What a guest run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestSummary {
    /// Verify result at resume (None for init).
    pub resumed_from: Option<ImageVerifyReport>,
    /// Transactions committed at the end.
    pub tx_count: u64,
}

/// Map, format or resume, arm tracking, print the ready line to `out`, run the workload.
pub fn run(cfg: &ProcessGuestConfig, out: &mut dyn Write) -> Result<GuestSummary, GuestError> {
    survive_hangup()?;
    let owner = match &cfg.memory {
        MemorySource::File(p) => Some(own_memory_file(p, matches!(cfg.start, StartMode::Init(_)))?),
        MemorySource::Memfd => None,
    };
    let (mem, resumed_from, disks) = open_memory(cfg, owner.as_ref())?;
    run_mapped(mem, resumed_from, disks, cfg, out)
}

/// Continues the workload in `mem`, mapped and already recovered and verified by the
/// caller (`report`): a destination that verified the image before committing it starts
/// the guest without reading all of memory again. `cfg.memory` and `cfg.start` are unused.
pub fn run_verified(
    mem: GuestMemory,
    report: ImageVerifyReport,
    cfg: &ProcessGuestConfig,
    out: &mut dyn Write,
) -> Result<GuestSummary, GuestError> {
    run_mapped(mem, Some(report), None, cfg, out)
}

/// Continues the workload in `mem` without reading all of it first (attaching recovers the
/// journal): a post-copy destination, whose last pages arrive while the guest runs, proves
/// the memory with the digest at its last page instead.
pub fn run_unverified(
    mem: GuestMemory,
    cfg: &ProcessGuestConfig,
    out: &mut dyn Write,
) -> Result<GuestSummary, GuestError> {
    run_mapped(mem, None, None, cfg, out)
}

/// Runs the guest; `fresh_disks` are the disks of a guest formatted just now (their
/// initial contents still to write), else `cfg.disks` are opened and verified here.
fn run_mapped(
    mut mem: GuestMemory,
    resumed_from: Option<ImageVerifyReport>,
    fresh_disks: Option<Vec<Disk>>,
    cfg: &ProcessGuestConfig,
    out: &mut dyn Write,
) -> Result<GuestSummary, GuestError> {
    let addr = mem.addr();
    let len = mem.len() as u64;
    let path = mem.path().to_path_buf();
    let _wp = if cfg.track_writes {
        // SAFETY: the range is exactly `mem`'s mapping, which is dropped after `_wp`
        // (reverse declaration order) at the end of this function.
        Some(unsafe { WpAsync::arm(addr, len) }.map_err(GuestError::Uffd)?)
    } else {
        None
    };
    let fresh = fresh_disks.is_some();
    let disks = match fresh_disks {
        Some(d) => Some(d),
        None => resumed_disks(mem.as_mut_slice(), &cfg.disks)?,
    };
    let slice = mem.as_mut_slice();
    let at = get_u64(slice, SB_DISK_AREA) as usize;
    let (wmem, area) = match at {
        0 => (slice, None),
        at => {
            let (w, a) = slice.split_at_mut(at);
            (w, Some(a))
        }
    };
    let mut dw = match (area, disks) {
        (Some(area), Some(disks)) => {
            let mut d = DiskWorkload::attach(area, disks, wmem)
                .map_err(|e| DiskSetupError::Layout(format!("disk area: {e}")))?;
            if fresh {
                initial_writes(&mut d, wmem)?;
            }
            Some(d)
        }
        _ => None,
    };
    let mut w = Workload::attach(wmem)?;
    if let Some(rate) = cfg.rate {
        w.set_rate(rate);
    }
    let ready = ReadyLine {
        pid: std::process::id(),
        addr,
        len,
        path,
        kind: w.superblock().kind,
        tx_count: w.tx_count(),
    };
    writeln!(out, "{ready}")?;
    out.flush()?;
    let control = cfg.control_stdin.then(spawn_stdin_reader);
    run_loop(&mut w, dw.as_mut(), cfg.duration, control.as_ref(), out)?;
    if let Some(d) = dw.as_mut() {
        d.finish()?;
    }
    let tx_count = w.tx_count();
    writeln!(out, "done tx={tx_count}")?;
    out.flush()?;
    Ok(GuestSummary {
        resumed_from,
        tx_count,
    })
}

/// Mapped guest memory, its verify report (resume) and the disks of a guest formatted
/// just now (init with disks).
type OpenedMemory = (GuestMemory, Option<ImageVerifyReport>, Option<Vec<Disk>>);

/// Maps the guest's memory: a file through `owner`, the handle its lock is on (the path is
/// not opened again: what it names may have changed since).
fn open_memory(cfg: &ProcessGuestConfig, owner: Option<&File>) -> Result<OpenedMemory, GuestError> {
    let handle = |p: &std::path::Path| {
        owner
            .expect("a memory file is owned")
            .try_clone()
            .map_err(|e| GuestError::Config(format!("dup {}: {e}", p.display())))
    };
    match &cfg.start {
        StartMode::Init(params) => {
            let size = cfg
                .size
                .ok_or_else(|| GuestError::Config("--init needs --size".into()))?;
            let mut mem = match &cfg.memory {
                MemorySource::File(p) => GuestMemory::create_from(handle(p)?, p.clone(), size)?,
                MemorySource::Memfd => GuestMemory::memfd("vmstream-guest", size)?,
            };
            let planned = match (&cfg.disks.workload, cfg.disks.paths.is_empty()) {
                (_, true) => None,
                (Some(p), false) => Some(disks::plan(&cfg.disks, p, size)?),
                (None, false) => {
                    return Err(GuestError::Config(format!(
                        "the {} workload writes no disks",
                        params.kind.name()
                    )))
                }
            };
            let at = planned.as_ref().map_or(mem.len(), |p| p.1);
            format(&mut mem.as_mut_slice()[..at], params)?;
            match planned {
                Some((disks, at, head)) => {
                    disks::format_area(mem.as_mut_slice(), at, &head)?;
                    Ok((mem, None, Some(disks)))
                }
                None => Ok((mem, None, None)),
            }
        }
        StartMode::Resume => {
            let MemorySource::File(p) = &cfg.memory else {
                return Err(GuestError::Config(
                    "--resume needs --memory-file (a new memfd is empty)".into(),
                ));
            };
            let mem = GuestMemory::open_from(handle(p)?, p.clone(), MapMode::Shared)?;
            let mut mem = match cfg.size {
                Some(size) => mem.sized(size)?,
                None => mem,
            };
            let report = verify_snapshot(mem.as_mut_slice())?;
            Ok((mem, Some(report), None))
        }
    }
}

/// The disks of a guest resumed on `mem` (recovered and verified memory): opened, and
/// verified against it; `None` for a guest without disks.
fn resumed_disks(mem: &[u8], g: &GuestDisks) -> Result<Option<Vec<Disk>>, GuestError> {
    let has_area = get_u64(mem, SB_DISK_AREA) != 0;
    if !has_area && g.paths.is_empty() {
        return Ok(None);
    }
    verify_disks(mem, &g.paths).map_err(DiskSetupError::from)?;
    Ok(Some(open_disks(&g.paths, None, g.granularity)?))
}

enum Command {
    Tx(u64),
    Step(u64),
    Count,
    Exit,
    Bad(String),
}

fn spawn_stdin_reader() -> Receiver<Command> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            let words: Vec<&str> = line.split_whitespace().collect();
            let cmd = match words.as_slice() {
                [] => continue,
                ["tx", b] => b.parse().map_or(Command::Bad(line.clone()), Command::Tx),
                ["step", n] => n.parse().map_or(Command::Bad(line.clone()), Command::Step),
                ["count"] => Command::Count,
                ["exit"] => Command::Exit,
                _ => Command::Bad(line.clone()),
            };
            if tx.send(cmd).is_err() {
                return;
            }
        }
        let _ = tx.send(Command::Exit);
    });
    rx
}

/// Handle one command; returns false on exit.
fn handle(
    w: &mut Workload<'_>,
    mut disks: Option<&mut DiskWorkload<'_>>,
    cmd: Command,
    out: &mut dyn Write,
) -> io::Result<bool> {
    match cmd {
        Command::Tx(b) => {
            let sb = w.superblock();
            if !sb.kind.fills_blocks() {
                writeln!(
                    out,
                    "err tx needs a filling workload, not {}",
                    sb.kind.name()
                )?;
            } else if b >= sb.active_blocks {
                writeln!(out, "err block {b} is not active (< {})", sb.active_blocks)?;
            } else {
                let t = w.commit_fill(b);
                writeln!(
                    out,
                    "ok tx={} block={} version={}",
                    t.seq, t.block, t.version
                )?;
            }
        }
        Command::Step(n) => {
            for _ in 0..n {
                step(w, disks.as_deref_mut());
            }
            writeln!(out, "ok tx={}", w.tx_count())?;
        }
        Command::Count => writeln!(out, "tx={}", w.tx_count())?,
        Command::Exit => return Ok(false),
        Command::Bad(line) => writeln!(out, "err unknown command {line:?}")?,
    }
    out.flush()?;
    Ok(true)
}

/// [`open_owned`] for a guest of this module: the memory file at `path` (created if
/// missing and `create`), locked while the returned file stays open, before the file is
/// formatted or resumed.
pub(crate) fn own_memory_file(path: &std::path::Path, create: bool) -> Result<File, GuestError> {
    open_owned(path, create).map_err(|e| own_error(path, e))
}

/// [`own_memory_file`] for memory already mapped (a destination's committed image): the
/// lock is taken on its own file, not on whatever its path names now.
pub(crate) fn own_mapped_memory(mem: &GuestMemory) -> Result<File, GuestError> {
    own_open_file(mem.file()).map_err(|e| own_error(mem.path(), e))
}

fn own_error(path: &std::path::Path, e: OwnError) -> GuestError {
    match e {
        OwnError::InUse => GuestError::InUse(path.to_path_buf()),
        OwnError::Open(e) => GuestError::Config(format!("open {}: {e}", path.display())),
        OwnError::Lock(e) => GuestError::Config(format!("lock {}: {e}", path.display())),
    }
}

/// Keeps SIGHUP from ending the guest. A guest outlives the `vmstream send` that started
/// it (a failed migration leaves the source guest running), and it runs in a process group
/// of its own. If `send` dies while the guest is stopped (paused for the switchover), that
/// group is orphaned with a stopped member, and the kernel sends it SIGHUP, then SIGCONT.
/// The guest must not die of the first; the second resumes it. (A group is orphaned when
/// no parent of its members is in the same session but another group: a guest adopted by
/// a subreaper of its own session gets neither signal and stays stopped until sent
/// SIGCONT.)
fn survive_hangup() -> io::Result<()> {
    signal_hook::flag::register(
        signal_hook::consts::SIGHUP,
        Arc::new(AtomicBool::new(false)),
    )?;
    Ok(())
}

/// Run transactions at the stored rate until the duration ends or the control channel
/// says exit. After a stall of more than 100 ms (SIGSTOP, throttling) the backlog is
/// dropped instead of replayed in a burst.
/// SIGINT or SIGTERM end it too once [`crate::signals::stop_running_guests_on_signals`]
/// registered them (a resumed guest).
fn run_loop(
    w: &mut Workload<'_>,
    mut disks: Option<&mut DiskWorkload<'_>>,
    duration: Option<Duration>,
    control: Option<&Receiver<Command>>,
    out: &mut dyn Write,
) -> io::Result<()> {
    let start = Instant::now();
    let idle = w.superblock().kind == ImageWorkloadKind::Idle;
    let mut base = (Instant::now(), 0u64);
    let mut done = 0u64;
    loop {
        if let Some(rx) = control {
            loop {
                match rx.try_recv() {
                    Ok(cmd) => {
                        if !handle(w, disks.as_deref_mut(), cmd, out)? {
                            return Ok(());
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Ok(()),
                }
            }
        }
        if duration.is_some_and(|d| start.elapsed() >= d)
            || crate::signals::running_guests_stop_requested()
        {
            return Ok(());
        }
        if let Some(d) = disks.as_deref_mut() {
            d.pump(w.memory()).map_err(io::Error::other)?;
        }
        let rate = w.rate();
        if idle {
            // A disk workload is paced by its pump: wake often enough to keep its rate.
            let nap = Duration::from_millis(if disks.is_some() { 1 } else { 20 });
            match control {
                Some(rx) => match rx.recv_timeout(nap) {
                    Ok(cmd) => {
                        if !handle(w, disks.as_deref_mut(), cmd, out)? {
                            return Ok(());
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                },
                None => std::thread::sleep(nap),
            }
            continue;
        }
        if rate == 0 {
            for _ in 0..64 {
                step(w, disks.as_deref_mut());
            }
            continue;
        }
        let due = base.1 + (base.0.elapsed().as_secs_f64() * rate as f64) as u64;
        if done < due {
            let lag = due - done;
            if lag > rate / 10 + 1 {
                base = (Instant::now(), done);
                continue;
            }
            for _ in 0..lag.min(64) {
                step(w, disks.as_deref_mut());
                done += 1;
            }
        } else {
            let next = Duration::from_secs_f64(1.0 / rate as f64);
            std::thread::sleep(next.min(Duration::from_millis(1)));
        }
    }
}

/// One workload transaction, told to the disk workload (dbsim's buffer pool and log).
fn step(w: &mut Workload<'_>, disks: Option<&mut DiskWorkload<'_>>) {
    if w.step().is_some() {
        if let Some(d) = disks {
            d.after_tx(w.memory());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_round_trips() {
        let r = ReadyLine {
            pid: 42,
            addr: 0x7f00_dead_0000,
            len: 1 << 20,
            path: "/dev/shm/g".into(),
            kind: ImageWorkloadKind::Hotset,
            tx_count: 9,
        };
        assert_eq!(ReadyLine::parse(&r.to_string()), Some(r));
        assert_eq!(ReadyLine::parse("done tx=3"), None);
        assert_eq!(ReadyLine::parse("ready pid=x"), None);
    }
}
