//! A QEMU guest on the destination: its QEMU started early, during round 0, with
//! `-incoming defer` on the temporary image being received (it maps that file; the commit's
//! rename keeps the inode, so after the commit its RAM is the committed image), `x-ignore-shared`
//! set and `migrate-incoming` listening; after the source's `Handover` (its QEMU sent the
//! device state and ended) it is continued and left running.
//!
//! QEMU writes nothing into RAM while it waits for an incoming migration (it skips its ROM
//! reset in the `inmigrate` state), so the codec's workers stay the only writers of the
//! image until the guest runs.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guest::qemu::Qmp;
use crate::memory::GuestMemory;
use crate::migration::dest::incoming::{IncomingGuest, Resumption};
use crate::migration::dest::machine::Received;
use crate::migration::dest::verify::TouchedPages;
use crate::migration::digest::PageHashes;
use crate::migration::error::{GuestStateError, RecvError};
use crate::migration::image::PendingImage;
use crate::migration::wire::{GuestKind, GuestSamples, GuestState, Hello, RefuseCode};
use crate::telemetry::settings::Settings;
use crate::telemetry::switchover::SwitchoverTimes;

/// How the destination's QEMU is run (`recv --qemu`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuLaunch {
    /// The QEMU command line (a shell command), `{memory}` where the RAM backend's
    /// `mem-path` goes; vmstream adds `-incoming defer` and its QMP socket.
    pub command: String,
    /// Its QMP socket (created by QEMU, left for the operator).
    pub qmp: PathBuf,
    /// Where QEMU's stdout and stderr go.
    pub log: PathBuf,
    /// The URI QEMU takes the device state on (`unix:PATH`, `tcp:HOST:PORT`), told to the
    /// source in `QemuIncoming`.
    pub incoming: String,
    /// How long QEMU may take to start, and to load the device state.
    pub timeout: Duration,
    /// Leave the VM paused once its device state is loaded (`recv --qemu-start paused`),
    /// for the operator's `cont`; the downtime then ends at the load.
    pub start_paused: bool,
}

impl QemuLaunch {
    /// The defaults for a committed image at `memory_file`: `PATH.qmp`, `PATH.qemu.log` and
    /// `unix:PATH.migrate` beside it.
    pub fn beside(command: String, memory_file: &Path) -> QemuLaunch {
        let with = |ext: &str| {
            let mut p = memory_file.as_os_str().to_owned();
            p.push(ext);
            PathBuf::from(p)
        };
        QemuLaunch {
            command,
            qmp: with(".qmp"),
            log: with(".qemu.log"),
            incoming: format!("unix:{}", with(".migrate").display()),
            timeout: Duration::from_secs(60),
            start_paused: false,
        }
    }
}

/// The destination's QEMU, left running after a successful receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuResumed {
    /// Its pid.
    pub pid: u32,
    /// Its QMP socket.
    pub qmp: PathBuf,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
    /// Whether it was left paused (`--qemu-start paused`).
    pub paused: bool,
}

/// A started QEMU waiting for the device state.
struct Started {
    child: Child,
    qmp: Qmp,
}

/// A QEMU guest being received.
pub struct IncomingQemuGuest {
    launch: Option<QemuLaunch>,
    starting: Option<JoinHandle<Result<Started, String>>>,
    started: Option<Result<Started, String>>,
    /// Keeps the temporary image open until QEMU has mapped it.
    view: Option<GuestMemory>,
    /// The temporary images of memory's regions after the first (`{memory1}`...).
    regions: Vec<PathBuf>,
    resumed: Option<QemuResumed>,
    /// The received image's mapping, unmapped only after the resume report.
    unmap_later: Option<GuestMemory>,
}

impl IncomingQemuGuest {
    /// A QEMU guest to receive, run with `launch` (None: this destination refuses it).
    pub fn new(launch: Option<QemuLaunch>) -> IncomingQemuGuest {
        IncomingQemuGuest {
            launch,
            starting: None,
            started: None,
            view: None,
            regions: Vec::new(),
            resumed: None,
            unmap_later: None,
        }
    }

    fn wait_started(&mut self) {
        if let Some(h) = self.starting.take() {
            self.started = Some(
                h.join()
                    .unwrap_or_else(|_| Err("the QEMU start-up thread panicked".into())),
            );
        }
    }
}

/// `path` quoted for `sh`.
fn shell_quote(path: &str) -> String {
    format!("'{}'", path.replace('\'', r"'\''"))
}

/// The placeholder of memory region `index`'s file in a `--qemu` command line.
fn placeholder(index: usize) -> String {
    format!("{{memory{index}}}")
}

/// The placeholder's index if `rest` (what follows a `{memory` in a command line) ends it:
/// `}` (the first region) or digits and `}`.
fn placeholder_index(rest: &str) -> Option<usize> {
    let digits = rest.find('}')?;
    match &rest[..digits] {
        "" => Some(0),
        d if d.bytes().all(|b| b.is_ascii_digit()) => d.parse().ok(),
        _ => None,
    }
}

impl QemuLaunch {
    /// Checks that the command line names the file of each of memory's `regions`
    /// (`{memory}` or `{memory0}` the first, `{memory1}`... the others) and no region
    /// beyond them.
    pub fn check_placeholders(&self, regions: usize) -> Result<(), String> {
        let named: Vec<usize> = self
            .command
            .match_indices("{memory")
            .filter_map(|(at, m)| placeholder_index(&self.command[at + m.len()..]))
            .collect();
        if let Some(i) = (0..regions).find(|i| !named.contains(i)) {
            let name = if i == 0 {
                "{memory}".into()
            } else {
                placeholder(i)
            };
            return Err(format!(
                "the --qemu command line has no {name} (where the mem-path of memory backend \
                 {i} goes: {{memory}} or {{memory0}} the first, {{memory1}}... the others, \
                 one --memory-file each)"
            ));
        }
        match named.iter().find(|&&i| i >= regions) {
            Some(i) => Err(format!(
                "the --qemu command line names {}, but only {regions} --memory-file given",
                placeholder(*i)
            )),
            None => Ok(()),
        }
    }

    /// The `size=` of the memory backend whose `mem-path` is region `index`'s placeholder,
    /// where the command line says one QEMU's way (bytes, or K/M/G/T: binary).
    pub fn backend_size(&self, index: usize) -> Option<u64> {
        let mut names = vec![placeholder(index)];
        if index == 0 {
            names.push("{memory}".into());
        }
        names.iter().find_map(|name| {
            let at = self.command.find(&format!("mem-path={name}"))?;
            // The option's comma-separated list: bounded by blanks or quotes.
            let stop = |c: char| c.is_whitespace() || c == '\'' || c == '"';
            let start = self.command[..at].rfind(stop).map_or(0, |s| s + 1);
            let end = self.command[at..]
                .find(stop)
                .map_or(self.command.len(), |e| at + e);
            self.command[start..end]
                .split(',')
                .find_map(|kv| kv.strip_prefix("size="))
                .and_then(|v| crate::units::parse_size(v).ok())
        })
    }

    /// The command line with each region's placeholder replaced by its file in `memory`
    /// (absolute paths, in order), quoted for `sh`.
    fn command_on(&self, memory: &[PathBuf]) -> String {
        let mut command = self.command.clone();
        for (i, path) in memory.iter().enumerate() {
            let quoted = shell_quote(&path.to_string_lossy());
            command = command.replace(&placeholder(i), &quoted);
            if i == 0 {
                command = command.replace("{memory}", &quoted);
            }
        }
        command
    }
}

/// Starts QEMU on `memory` (the images' absolute paths, one per region) and readies it
/// for the device state.
fn start(launch: &QemuLaunch, memory: &[PathBuf]) -> Result<Started, String> {
    launch.check_placeholders(memory.len())?;
    let command = launch.command_on(memory);
    for stale in [
        Some(launch.qmp.as_path()),
        launch.incoming.strip_prefix("unix:").map(Path::new),
    ]
    .into_iter()
    .flatten()
    {
        // A socket left by an earlier QEMU; QEMU would refuse to bind over it.
        if std::fs::symlink_metadata(stale)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            let _ = std::fs::remove_file(stale);
        }
    }
    let log =
        File::create(&launch.log).map_err(|e| format!("creating {}: {e}", launch.log.display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("{}: {e}", launch.log.display()))?;
    let full = format!(
        "exec {command} -incoming defer -qmp {}",
        shell_quote(&format!("unix:{},server=on,wait=off", launch.qmp.display()))
    );
    // Its own process group: it outlives this receive, and a terminal's Ctrl-C meant
    // for the receiver must not reach it.
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(&full)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("starting QEMU (sh -c {full:?}): {e}"))?;
    let deadline = Instant::now() + launch.timeout;
    let qmp = loop {
        if let Ok(Some(status)) = child.try_wait() {
            let said = std::fs::read_to_string(&launch.log).unwrap_or_default();
            return Err(format!(
                "QEMU exited at start-up ({status}): {}",
                said.trim().lines().last().unwrap_or("no output")
            ));
        }
        match Qmp::connect(&launch.qmp, Duration::from_secs(5)) {
            Ok(q) => break q,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("QEMU's monitor did not answer: {e}"));
            }
        }
    };
    let mut started = Started { child, qmp };
    let ready = (|| {
        started
            .qmp
            .set_capabilities(&[("x-ignore-shared", true), ("return-path", true)])?;
        started
            .qmp
            .execute("migrate-incoming", json!({ "uri": launch.incoming }))
            .map(drop)
    })();
    if let Err(e) = ready {
        kill(&mut started.child);
        return Err(format!("readying QEMU for the device state: {e}"));
    }
    Ok(started)
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for IncomingQemuGuest {
    /// A QEMU not handed to the caller (the receive failed) is ended with it.
    fn drop(&mut self) {
        self.wait_started();
        if let Some(Ok(s)) = &mut self.started {
            kill(&mut s.child);
        }
    }
}

impl IncomingGuest for IncomingQemuGuest {
    fn kind(&self) -> GuestKind {
        GuestKind::Qemu
    }

    fn check_hello(&self, _hello: &Hello, resume: bool) -> Option<(RefuseCode, String)> {
        match (&self.launch, resume) {
            (Some(_), true) => None,
            _ => Some((
                RefuseCode::GuestKind,
                "a QEMU guest needs a destination QEMU: run recv with --qemu 'COMMAND LINE'".into(),
            )),
        }
    }

    /// Starts QEMU on the temporary image `view` maps, in a thread of its own.
    fn start_background(
        &mut self,
        view: GuestMemory,
        _touched: Arc<TouchedPages>,
    ) -> std::io::Result<()> {
        let launch = self
            .launch
            .clone()
            .ok_or_else(|| std::io::Error::other("no --qemu command line"))?;
        let paths = std::iter::once(view.path())
            .chain(self.regions.iter().map(PathBuf::as_path))
            .map(std::path::absolute)
            .collect::<std::io::Result<Vec<_>>>()?;
        self.view = Some(view);
        self.starting = Some(
            std::thread::Builder::new()
                .name("vmstream-qemu-start".into())
                .spawn(move || start(&launch, &paths))?,
        );
        Ok(())
    }

    fn memory_regions(&mut self, temp_images: Vec<PathBuf>) {
        self.regions = temp_images;
    }

    fn round_applied(&self) {}

    /// Waits for QEMU's start-up (begun during round 0) and checks it still waits.
    fn verify_at_pause(&mut self, _image: &mut PendingImage, _hashes: &PageHashes) {
        self.wait_started();
        if self.started.is_none() {
            self.started = Some(Err("QEMU was not started (no --resume?)".into()));
        }
        if let Some(Ok(s)) = &mut self.started {
            let alive = match s.child.try_wait() {
                Ok(None) => {
                    s.qmp
                        .status()
                        .map_err(|e| e.to_string())
                        .and_then(|st| match st.as_str() {
                            "inmigrate" => Ok(()),
                            other => Err(format!("QEMU is {other}, not waiting for the migration")),
                        })
                }
                Ok(Some(status)) => Err(format!("QEMU exited ({status})")),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = alive {
                self.started = Some(Err(e));
            }
        }
    }

    fn verify_handed_over(
        &mut self,
        _memory: &mut [u8],
        _data: crate::migration::dest::verify::DataPages<'_>,
    ) {
        self.started = Some(Err("a QEMU guest cannot be handed over".into()));
    }

    fn verify_failure(&self) -> Option<String> {
        match &self.started {
            Some(Ok(_)) => None,
            Some(Err(e)) => Some(format!("the destination QEMU: {e}")),
            None => Some("the destination QEMU was not started".into()),
        }
    }

    fn accept_state(
        &mut self,
        state: &GuestState,
        _memory: &[u8],
        _settings: &mut Settings,
    ) -> Result<(), GuestStateError> {
        // The device state travels in QEMU's own migration.
        if state.blob.is_empty() {
            Ok(())
        } else {
            Err(GuestStateError::UnexpectedBlob {
                len: state.blob.len(),
            })
        }
    }

    fn qemu_incoming(&self) -> Option<String> {
        self.launch.as_ref().map(|l| l.incoming.clone())
    }

    /// After the `Handover`: waits for QEMU to have loaded the device state, continues it,
    /// and takes the instant it ran again from its `RESUME` event.
    fn resume(
        &mut self,
        memory: GuestMemory,
        _target: &Path,
        _run_for: Option<Duration>,
    ) -> Result<Resumption, RecvError> {
        // Unmapping the received image's mappings takes 10-20 ms for 512 MiB of faulted
        // pages on this machine: not inside the pause (QEMU waits for our `cont`). They go
        // with us, after the report.
        self.unmap_later = Some(memory);
        let t = Instant::now();
        let timeout = self
            .launch
            .as_ref()
            .map_or(Duration::from_secs(60), |l| l.timeout);
        let Some(Ok(s)) = &mut self.started else {
            return Err(RecvError::Resume(
                "the destination QEMU is not running".into(),
            ));
        };
        let err = |e: crate::guest::qemu::QmpError| RecvError::Resume(format!("QEMU: {e}"));
        let deadline = Instant::now() + timeout;
        loop {
            let (status, reply) = s.qmp.migration_status().map_err(err)?;
            match status.as_str() {
                "completed" => break,
                "failed" | "cancelled" => {
                    return Err(RecvError::Resume(format!(
                        "QEMU's incoming device state {status}: {}",
                        reply
                            .get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                    )))
                }
                _ if Instant::now() >= deadline => {
                    return Err(RecvError::Resume(format!(
                        "QEMU did not load the device state within {timeout:?} ({status})"
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        let paused = self.launch.as_ref().is_some_and(|l| l.start_paused);
        let now = || crate::telemetry::stats::unix_ns(std::time::SystemTime::now());
        let at = if paused {
            now()
        } else {
            if s.qmp.status().map_err(err)? != "running" {
                s.qmp.execute("cont", Value::Null).map_err(err)?;
            }
            match s.qmp.wait_event("RESUME", Duration::from_secs(5)) {
                Ok(e) if e.at_unix_ns > 0 => e.at_unix_ns,
                _ => now(),
            }
        };
        self.resumed = Some(QemuResumed {
            pid: s.child.id(),
            qmp: s.qmp.path().to_path_buf(),
            log: self
                .launch
                .as_ref()
                .map(|l| l.log.clone())
                .unwrap_or_default(),
            paused,
        });
        Ok(Resumption {
            tx_count: 0,
            at_unix_ns: at,
            phases: SwitchoverTimes {
                resume: Some(t.elapsed().as_secs_f64() * 1e3),
                ..SwitchoverTimes::default()
            },
        })
    }

    /// QEMU's guest keeps no counter we can read: no samples.
    fn sample(&self, _target: &Path, _window: Duration) -> Result<GuestSamples, String> {
        Ok(GuestSamples {
            samples: Vec::new(),
        })
    }

    fn into_received(mut self: Box<Self>) -> Received {
        let qemu = self.resumed.take();
        if qemu.is_some() {
            // Left running: not killed with us.
            self.started = None;
        }
        Received {
            guest: None,
            kvm: None,
            handed_over: None,
            qemu,
        }
    }
}
