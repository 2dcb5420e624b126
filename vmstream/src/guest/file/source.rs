//! The guest on the source side: a `vmstream guest run` child that `vmstream send` starts,
//! or a process it attaches to by pid. Gives the sender a mapping of guest memory, a dirty
//! tracker (uffd-wp or hash), pause/resume (SIGSTOP/SIGCONT through [`Throttle`]) and the
//! final kill.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::disk::bitmap::{bitmap_path, DirtyBitmap};
use crate::guest::file::disks::GuestDisks;
use crate::guest::file::layout::ImageWorkloadKind;
use crate::guest::file::throttle::Throttle;
use crate::guest::file::ReadyLine;
use crate::memory::{GuestMemory, MapMode};
use crate::telemetry::notice::{Notice, Notices};
use crate::track::{DirtyTracker, HashTracker, UffdWpTracker};

/// How dirty pages are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyTracking {
    /// userfaultfd async write-protect + PAGEMAP_SCAN (guests vmstream starts).
    UffdWp,
    /// Per-page hashes (any writer).
    Hash,
}

/// Which guest to migrate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestSpec {
    /// Start `vmstream guest run` on a fresh memory file.
    Spawn {
        /// Memory file.
        path: PathBuf,
        /// Memory size in bytes.
        size: u64,
        /// Workload.
        workload: ImageWorkloadKind,
        /// Target transactions per second (None: the workload's default).
        rate: Option<u64>,
        /// Percent of blocks formatted (None: the workload's default).
        active: Option<u8>,
        /// The `vmstream` executable that runs it (None: this process's own; a test
        /// process names the real binary).
        guest_exe: Option<PathBuf>,
        /// Its disks (none by default) and their workload.
        disks: GuestDisks,
    },
    /// A running process that writes the memory file.
    Attach {
        /// Memory file.
        path: PathBuf,
        /// The writer's pid.
        pid: u32,
    },
    /// A KVM guest run by this process (see [`crate::guest::kvm::source`]).
    Kvm(crate::guest::kvm::source::KvmSpec),
    /// A VM QEMU runs (see [`crate::guest::qemu::source`]).
    Qemu(crate::guest::qemu::QemuSpec),
}

/// Why the source guest could not be set up or controlled.
#[derive(Debug, thiserror::Error)]
pub enum GuestControlError {
    /// Starting the guest process failed.
    #[error("starting the guest: {0}")]
    Spawn(std::io::Error),
    /// The guest exited or printed no ready line.
    #[error("the guest did not start: {0}")]
    NotReady(String),
    /// Mapping guest memory failed.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The dirty tracker could not be set up.
    #[error("dirty tracking ({0}): {1}")]
    Tracker(&'static str, std::io::Error),
    /// Signalling the guest failed.
    #[error("controlling guest pid {0}: {1}")]
    Signal(u32, std::io::Error),
    /// An option combination that cannot work.
    #[error("{0}")]
    Config(String),
    /// The KVM guest failed (start, dirty log, pause, resume).
    #[error("KVM guest: {0}")]
    Kvm(#[from] crate::guest::kvm::KvmError),
    /// The QEMU VM or its monitor failed.
    #[error("QEMU guest: {0}")]
    Qemu(String),
    /// The guest process ended while it was being migrated (killed, crashed).
    #[error("the guest (pid {pid}) exited during the migration: {how}")]
    Exited {
        /// Its pid.
        pid: u32,
        /// Its exit status, as far as known.
        how: String,
    },
}

/// The source guest.
pub struct SourceGuest {
    pid: u32,
    child: Option<Child>,
    _stdout: Option<BufReader<ChildStdout>>,
    path: PathBuf,
    memory: GuestMemory,
    tracker: Box<dyn DirtyTracker>,
    throttle: Throttle,
    paused: bool,
    /// How the guest process ended, once [`SourceGuest::check_alive`] found it gone.
    exited: Option<String>,
    /// When `check_alive` last looked.
    alive_checked: Option<Instant>,
}

/// How long [`SourceGuest::end_and_release`] waits for an attached guest's exit.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// How often [`SourceGuest::check_alive`] looks at the process at most.
const ALIVE_CHECK_PERIOD: Duration = Duration::from_millis(100);

impl std::fmt::Debug for SourceGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceGuest")
            .field("pid", &self.pid)
            .field("path", &self.path)
            .field("tracker", &self.tracker.name())
            .field("paused", &self.paused)
            .finish()
    }
}

/// Starts the guest `spec` (a [`GuestSpec::Spawn`]) and reads its ready line.
fn spawn_guest(
    spec: &GuestSpec,
    notices: &Notices,
) -> Result<(Child, BufReader<ChildStdout>, ReadyLine), GuestControlError> {
    let GuestSpec::Spawn {
        path,
        size,
        workload,
        rate,
        active,
        guest_exe: exe,
        disks,
    } = spec
    else {
        return Err(GuestControlError::Config("not a guest to start".into()));
    };
    let exe = match exe {
        Some(exe) => exe.to_path_buf(),
        None => std::env::current_exe().map_err(GuestControlError::Spawn)?,
    };
    drop_stale_bitmaps(disks)?;
    let mut cmd = Command::new(exe);
    let (workload, disk_args) = disks.run_args(*workload);
    cmd.args(["guest", "run", "--memory-file"]).arg(path).args([
        "--size",
        &size.to_string(),
        "--workload",
        workload,
    ]);
    cmd.args(disk_args);
    if let Some(r) = rate {
        cmd.args(["--rate", &r.to_string()]);
    }
    if let Some(a) = active {
        cmd.args(["--active", &a.to_string()]);
    }
    // The guest outlives a failed migration, so it must not hold our stdout/stderr open
    // (whoever reads them would wait for it): both are pipes we read ourselves.
    // Its own process group: a terminal's Ctrl-C, meant to cancel the migration, must not
    // reach the guest too.
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(GuestControlError::Spawn)?;
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let err = child.stderr.take().expect("piped stderr");
    let mut line = String::new();
    let read = out.read_line(&mut line);
    match (read, ReadyLine::parse(&line)) {
        (Ok(_), Some(ready)) => {
            forward_stderr(err, notices.clone());
            Ok((child, out, ready))
        }
        (r, _) => {
            let _ = child.kill();
            let status = child.wait().ok();
            let mut message = String::new();
            let _ = BufReader::new(err).read_to_string(&mut message);
            // The guest's own words when it said why (`vmstream guest run: ...`).
            let message = message.trim().trim_start_matches("vmstream guest run: ");
            Err(GuestControlError::NotReady(match (message, r) {
                ("", Err(e)) => format!("reading its ready line: {e}"),
                ("", Ok(_)) => format!(
                    "it printed {:?} instead of its ready line and exited ({})",
                    line.trim(),
                    status.map_or("status unknown".into(), |s| s.to_string())
                ),
                (m, _) => m.to_string(),
            }))
        }
    }
}

/// A fresh guest formats its disks, so their old dirty bits mean nothing: a bitmap left
/// beside one (`<disk>.dirty`) that the guest would refuse (another granularity than the
/// one asked for, another disk size, or no disk) is removed before it starts.
pub(crate) fn drop_stale_bitmaps(disks: &GuestDisks) -> Result<(), GuestControlError> {
    if disks.workload.is_none() {
        return Ok(());
    }
    for disk in &disks.paths {
        let path = bitmap_path(disk);
        if !path.exists() {
            continue;
        }
        let keep = match (DirtyBitmap::open(&path), std::fs::metadata(disk)) {
            (Ok(b), Ok(m)) => {
                b.disk_size() == m.len() && disks.granularity.is_none_or(|g| g == b.granularity())
            }
            _ => false,
        };
        if !keep {
            std::fs::remove_file(&path).map_err(|e| {
                GuestControlError::Config(format!("removing the stale {}: {e}", path.display()))
            })?;
        }
    }
    Ok(())
}

/// Tells the guest's stderr lines to `notices`, while we run.
fn forward_stderr(err: ChildStderr, notices: Notices) {
    let _ = std::thread::Builder::new()
        .name("vmstream-guest-stderr".into())
        .spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                notices.tell(Notice::GuestStderr(line));
            }
        });
}

impl SourceGuest {
    /// Starts or attaches to the guest and sets up `tracking` (default: uffd-wp for a
    /// spawned guest, hash for an attached one); a started guest's stderr lines go to
    /// `notices`.
    pub fn open(
        spec: &GuestSpec,
        tracking: Option<DirtyTracking>,
        notices: &Notices,
    ) -> Result<SourceGuest, GuestControlError> {
        let (pid, child, stdout, ready, path) = match spec {
            GuestSpec::Spawn { path, .. } => {
                let (child, out, ready) = spawn_guest(spec, notices)?;
                (
                    child.id(),
                    Some(child),
                    Some(out),
                    Some(ready),
                    path.clone(),
                )
            }
            GuestSpec::Attach { path, pid } => (*pid, None, None, None, path.clone()),
            GuestSpec::Kvm(_) | GuestSpec::Qemu(_) => {
                return Err(GuestControlError::Config(
                    "a KVM or QEMU guest is not a guest process (see migratable::open_guest)"
                        .into(),
                ))
            }
        };
        // From here on a failure must not leave a spawned guest behind.
        let mut guard = KillOnDrop(child);
        let memory = GuestMemory::open(&path, MapMode::Shared)?;
        let tracking = tracking.unwrap_or(if ready.is_some() {
            DirtyTracking::UffdWp
        } else {
            DirtyTracking::Hash
        });
        let tracker: Box<dyn DirtyTracker> = match (tracking, &ready) {
            (DirtyTracking::UffdWp, Some(r)) => Box::new(
                UffdWpTracker::new(r.pid, r.addr, r.len)
                    .map_err(|e| GuestControlError::Tracker("uffd-wp", e))?,
            ),
            (DirtyTracking::UffdWp, None) => {
                return Err(GuestControlError::Config(
                    "--dirty-tracking uffd-wp needs a guest started by vmstream send; use \
                     --dirty-tracking hash with --pid"
                        .into(),
                ))
            }
            (DirtyTracking::Hash, _) => Box::new(
                HashTracker::open(&path)
                    .map_err(|e| GuestControlError::Tracker("hash", std::io::Error::other(e)))?,
            ),
        };
        let throttle = Throttle::new(pid).map_err(|e| GuestControlError::Signal(pid, e))?;
        Ok(SourceGuest {
            pid,
            child: guard.0.take(),
            _stdout: stdout,
            path,
            memory,
            tracker,
            throttle,
            paused: false,
            exited: None,
            alive_checked: None,
        })
    }

    /// Fails if the guest process has ended (looked at every 100 ms at most): a guest that
    /// died mid-migration ends it at once, with its exit status, instead of at the pause.
    pub fn check_alive(&mut self) -> Result<(), GuestControlError> {
        if let Some(how) = &self.exited {
            return Err(self.exited_error(how.clone()));
        }
        if self
            .alive_checked
            .is_some_and(|t| t.elapsed() < ALIVE_CHECK_PERIOD)
        {
            return Ok(());
        }
        self.alive_checked = Some(Instant::now());
        let how = match &mut self.child {
            // Our child: its status, once it ended.
            Some(c) => c.try_wait().ok().flatten().map(|status| status.to_string()),
            // Attached by pid: gone, or a zombie its parent has not reaped yet.
            None => match crate::guest::file::throttle::process_state(self.pid) {
                Ok('Z' | 'X') => Some("it is a zombie (dead)".to_string()),
                Ok(_) => None,
                Err(_) => Some("it no longer exists".to_string()),
            },
        };
        match how {
            Some(how) => {
                self.exited = Some(how.clone());
                Err(self.exited_error(how))
            }
            None => Ok(()),
        }
    }

    fn exited_error(&self, how: String) -> GuestControlError {
        GuestControlError::Exited { pid: self.pid, how }
    }

    /// Whether `check_alive` found the guest gone.
    pub fn has_exited(&self) -> bool {
        self.exited.is_some()
    }

    /// The guest's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The memory file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Guest memory size in bytes.
    pub fn size(&self) -> u64 {
        self.memory.len() as u64
    }

    /// The shared mapping of guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// All of guest memory as a slice. Only call while the guest is paused (the slice must
    /// not change while borrowed).
    pub fn paused_memory(&mut self) -> &[u8] {
        debug_assert!(self.paused);
        self.memory.as_mut_slice()
    }

    /// The dirty tracker's name.
    pub fn tracker_name(&self) -> &'static str {
        self.tracker.name()
    }

    /// The dirty tracker of guest memory.
    pub fn tracker(&mut self) -> &mut dyn DirtyTracker {
        self.tracker.as_mut()
    }

    /// Stops the guest and waits until all its threads are stopped.
    pub fn pause(&mut self) -> Result<(), GuestControlError> {
        self.paused = true;
        self.throttle
            .pause()
            .map_err(|e| GuestControlError::Signal(self.pid, e))
    }

    /// Continues a paused guest.
    pub fn resume(&mut self) -> Result<(), GuestControlError> {
        if self.paused {
            self.throttle
                .resume()
                .map_err(|e| GuestControlError::Signal(self.pid, e))?;
            self.paused = false;
        }
        Ok(())
    }

    /// Throttles the guest: stopped for `fraction` of every 10 ms period (0 = full speed).
    pub fn set_throttle(&self, fraction: f64) {
        self.throttle.set(fraction);
    }

    /// Whether the guest is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Ends the guest after a committed migration (SIGKILL; a paused guest never runs
    /// again, so its memory stays as it was at the pause).
    pub fn terminate(&mut self) -> Result<(), GuestControlError> {
        kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL)
            .map_err(|e| GuestControlError::Signal(self.pid, e.into()))?;
        // The guest is stopped (paused for the switchover): with SIGKILL pending it never
        // runs another instruction, so it has ended now. Its exit (tearing down a mapping
        // of a GiB takes 20-30 ms) is reaped on the side rather than holding up the
        // destination, which waits for our `Handover` to resume its copy.
        if let Some(mut c) = self.child.take() {
            std::thread::spawn(move || {
                let _ = c.wait();
            });
        }
        Ok(())
    }

    /// Ends the paused guest for a handover and returns once nothing of it can write its
    /// memory or holds it: SIGKILL, every thread exiting, the lock on its memory file
    /// released (through copies of its descriptors taken while it was stopped, see
    /// [`super::release`]), and this process's mapping, tracker and descriptors dropped.
    /// The kernel's teardown of the killed process's mappings goes on meanwhile; the child
    /// is reaped on the side. Where the descriptors cannot be copied (no permission to
    /// trace the guest), it waits for the guest's whole exit instead, which drops the lock.
    pub fn end_and_release(mut self) -> Result<(), GuestControlError> {
        let pid = self.pid;
        let signal_error = |e: std::io::Error| GuestControlError::Signal(pid, e);
        let held = super::release::MemoryDescriptors::take(pid, self.memory.file()).ok();
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL)
            .map_err(|e| GuestControlError::Signal(pid, e.into()))?;
        let child = self.child.take();
        drop(self);
        if let Some(held) = held {
            super::release::wait_until_exiting(pid, EXIT_WAIT).map_err(signal_error)?;
            held.unlock().map_err(signal_error)?;
            if let Some(mut c) = child {
                std::thread::spawn(move || {
                    let _ = c.wait();
                });
            }
            return Ok(());
        }
        if let Some(mut c) = child {
            return c.wait().map(drop).map_err(signal_error);
        }
        super::release::wait_until_exited(pid, EXIT_WAIT).map_err(signal_error)
    }

    /// Leaves a spawned guest running on its own (after a failed migration); returns its
    /// pid.
    pub fn detach(mut self) -> u32 {
        self.throttle.set(0.0);
        let _ = self.resume();
        self.child.take();
        self.pid
    }
}

/// Kills a spawned child unless taken.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The transaction counter in the superblock of the guest memory `memory`.
pub fn tx_count(memory: &GuestMemory) -> u64 {
    crate::telemetry::sampler::read_tx_count(memory)
}
