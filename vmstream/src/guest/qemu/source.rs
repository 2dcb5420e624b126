//! The source side of a QEMU guest ([`QemuSourceGuest`]): the VM's shared RAM file mapped
//! and hash-tracked (QEMU writes it: no uffd-wp registration is possible in its process),
//! its vCPUs stopped and continued over QMP (`stop`/`cont`: the monitor keeps answering), and
//! after the commit QEMU's own migration of the device state to the destination's QEMU.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guest::file::source::GuestControlError;
use crate::guest::migratable::MigratableGuest;
use crate::guest::GuestKind;
use crate::memory::{GuestMemory, MapMode, MAX_MEMORY_REGIONS};
use crate::telemetry::notice::Notices;
use crate::track::{DirtyTracker, HashTracker};

use super::qmp::{Qmp, QmpError, COMMAND_TIMEOUT};
use super::throttle::{vcpu_threads, VcpuThrottleMode, VcpuThrottling};
use super::{ram_backends, RamBackend};

/// What becomes of the source QEMU once its devices moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuAfter {
    /// `quit` (the default).
    Quit,
    /// Left paused (`postmigrate`), for the operator.
    Pause,
}

/// The QEMU VM to migrate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSpec {
    /// Its QMP socket.
    pub qmp: PathBuf,
    /// What to do with it after success.
    pub after: QemuAfter,
    /// How long QEMU's device-state migration may take.
    pub migrate_timeout: Duration,
    /// How its vCPU threads are throttled.
    pub vcpu_throttle: VcpuThrottleMode,
}

/// How often the VM is looked at during the rounds, at most.
const ALIVE_CHECK_PERIOD: Duration = Duration::from_millis(500);

/// A running QEMU VM on the source.
pub struct QemuSourceGuest {
    spec: QemuSpec,
    qmp: Qmp,
    memory: GuestMemory,
    tracker: HashTracker,
    paused: bool,
    /// Where the destination's QEMU takes the device state (`QemuIncoming`).
    incoming: Option<String>,
    alive_checked: Option<Instant>,
    /// The vCPU threads (`query-cpus-fast`), throttled alone.
    vcpus: Vec<u32>,
    /// Made at the first throttle above 0; lets the threads go when dropped (at the pause,
    /// or with the guest when the migration ends or fails).
    throttle: Option<VcpuThrottling>,
    /// Why the throttle could not be set up (then the guest runs unthrottled).
    throttle_error: Option<String>,
    /// Told why the throttle is unavailable.
    notices: Notices,
}

impl std::fmt::Debug for QemuSourceGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuSourceGuest")
            .field("qmp", &self.spec.qmp)
            .field("ram", &self.memory.path())
            .field("paused", &self.paused)
            .finish()
    }
}

fn qemu_err(e: QmpError) -> GuestControlError {
    GuestControlError::Qemu(e.to_string())
}

impl QemuSourceGuest {
    /// Connects to the VM's monitor, finds its shared RAM files, maps them back to back
    /// ([`shared_files`]'s order) and tracks them, and sets `x-ignore-shared` so that QEMU's
    /// migration leaves that RAM to us.
    pub fn open(spec: &QemuSpec, notices: &Notices) -> Result<QemuSourceGuest, GuestControlError> {
        let mut qmp = Qmp::connect(&spec.qmp, COMMAND_TIMEOUT).map_err(qemu_err)?;
        let backends = ram_backends(&mut qmp).map_err(qemu_err)?;
        let regions = shared_files(backends)?;
        let memory = GuestMemory::open_regions(&regions, MapMode::Shared)?;
        let tracker = HashTracker::new(
            GuestMemory::open_regions(&regions, MapMode::SharedReadOnly)
                .map_err(|e| GuestControlError::Tracker("hash", std::io::Error::other(e)))?,
        );
        let status = qmp.status().map_err(qemu_err)?;
        if status != "running" && status != "paused" {
            return Err(GuestControlError::Config(format!(
                "the VM is {status}, not running or paused"
            )));
        }
        // return-path: QEMU's migration completes on the source only once the destination
        // loaded the device state, so a quit after it never loses the VM.
        qmp.set_capabilities(&[("x-ignore-shared", true), ("return-path", true)])
            .map_err(qemu_err)?;
        let vcpus = vcpu_threads(&mut qmp).map_err(qemu_err)?;
        Ok(QemuSourceGuest {
            spec: spec.clone(),
            qmp,
            memory,
            tracker,
            paused: status == "paused",
            incoming: None,
            alive_checked: None,
            vcpus,
            throttle: None,
            throttle_error: None,
            notices: notices.clone(),
        })
    }

    /// Runs QEMU's migration of the device state to `uri` and waits for it to complete; on
    /// failure it is cancelled and the VM continued.
    fn migrate_devices(&mut self, uri: &str) -> Result<(), GuestControlError> {
        let result = self.run_migrate(uri);
        if result.is_err() {
            let _ = self.qmp.execute("migrate_cancel", Value::Null);
            // QEMU leaves a failed migration's VM paused; it must run again here.
            let _ = self.qmp.execute("cont", Value::Null);
            self.paused = false;
        }
        result
    }

    fn run_migrate(&mut self, uri: &str) -> Result<(), GuestControlError> {
        self.qmp
            .execute("migrate", json!({ "uri": uri }))
            .map_err(qemu_err)?;
        let deadline = Instant::now() + self.spec.migrate_timeout;
        loop {
            let (status, reply) = self.qmp.migration_status().map_err(qemu_err)?;
            match status.as_str() {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let why = reply
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(GuestControlError::Qemu(format!(
                        "QEMU's migration of the device state to {uri} {status}: {why}"
                    )));
                }
                _ if Instant::now() >= deadline => {
                    return Err(GuestControlError::Qemu(format!(
                        "QEMU's migration of the device state to {uri} did not complete \
                         within {:?} (status {status})",
                        self.spec.migrate_timeout
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

/// The files of the VM's memory backends, each with its size, in the order of the
/// backends' ids (sorted as strings: `query-memdev` lists them in no fixed order, and the
/// destination's QEMU gives its backends the same ids, its `{memory0}`, `{memory1}`... in
/// that order). Every backend must be a shared file: another process can move only RAM QEMU
/// maps shared from a file.
pub fn shared_files(
    mut backends: Vec<RamBackend>,
) -> Result<Vec<(PathBuf, u64)>, GuestControlError> {
    if backends.is_empty() {
        return Err(GuestControlError::Config(
            "the VM has no memory backend: start QEMU with -object \
             memory-backend-file,id=ram0,size=...,mem-path=FILE,share=on -machine \
             memory-backend=ram0"
                .into(),
        ));
    }
    if backends.len() > MAX_MEMORY_REGIONS {
        return Err(GuestControlError::Config(format!(
            "the VM has {} memory backends, at most {MAX_MEMORY_REGIONS} can be migrated",
            backends.len()
        )));
    }
    backends.sort_by(|a, b| a.id.cmp(&b.id));
    backends
        .into_iter()
        .map(|b| match b.mem_path {
            Some(path) if b.share => Ok((path, b.size)),
            mem_path => Err(GuestControlError::Config(format!(
                "memory backend {} is not a shared file (share={}, mem-path={mem_path:?}): \
                 another process can move only RAM QEMU maps shared from a file",
                b.id, b.share
            ))),
        })
        .collect()
}

impl MigratableGuest for QemuSourceGuest {
    fn kind(&self) -> GuestKind {
        GuestKind::Qemu
    }

    fn describe(&self) -> String {
        let line = format!(
            "qemu qmp={} ram={} vcpus={} tracking=hash",
            self.spec.qmp.display(),
            self.memory
                .regions()
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(","),
            self.vcpus.len()
        );
        line
    }

    fn size(&self) -> u64 {
        self.memory.len() as u64
    }

    fn tx_count(&self) -> u64 {
        0
    }

    fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    fn paused_memory(&mut self) -> &[u8] {
        debug_assert!(self.paused);
        self.memory.as_mut_slice()
    }

    fn tracker(&mut self) -> &mut dyn DirtyTracker {
        &mut self.tracker
    }

    fn pause(&mut self) -> Result<Vec<u8>, GuestControlError> {
        // The throttle ends here: the vCPUs are stopped anyway, and QEMU's `stop` waits for
        // each to leave guest code, which a throttled thread does late.
        self.throttle = None;
        // `stop` returns once every vCPU left guest code: RAM no longer changes.
        self.qmp.execute("stop", Value::Null).map_err(qemu_err)?;
        self.paused = true;
        Ok(Vec::new())
    }

    fn resume(&mut self) -> Result<(), GuestControlError> {
        if self.paused {
            self.qmp.execute("cont", Value::Null).map_err(qemu_err)?;
            self.paused = false;
        }
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.paused
    }

    /// The vCPU threads alone ([`VcpuThrottling`], by the spec's mechanism); where none can
    /// be had the guest runs unthrottled (a warning says why, once).
    fn set_throttle(&mut self, fraction: f64) {
        if self.throttle.is_none() && (fraction <= 0.0 || self.throttle_error.is_some()) {
            return;
        }
        if self.throttle.is_none() {
            match VcpuThrottling::new(self.spec.vcpu_throttle, &self.vcpus) {
                Ok(t) => {
                    self.notices.note(format!(
                        "throttling the QEMU VM's {} vCPU threads alone ({})",
                        self.vcpus.len(),
                        t.mechanism()
                    ));
                    self.throttle = Some(t);
                }
                Err(e) => {
                    self.notices.warning(format!(
                        "cannot throttle the QEMU VM's vCPUs, it runs unthrottled: {e}"
                    ));
                    self.throttle_error = Some(e.to_string());
                    return;
                }
            }
        }
        if let Some(t) = &mut self.throttle {
            if let Err(e) = t.set(fraction) {
                self.throttle_error = Some(e.to_string());
            }
        }
    }

    fn set_qemu_incoming(&mut self, uri: &str) {
        self.incoming = Some(uri.to_string());
    }

    /// After the commit: moves the device state to the destination's QEMU, which leaves
    /// the source VM stopped for good (`postmigrate`: nothing here continues it). A failed
    /// device migration continues the VM here and is an error: the destination's QEMU
    /// never runs.
    fn terminate(&mut self) -> Result<(), GuestControlError> {
        let Some(uri) = self.incoming.take() else {
            let _ = self.resume();
            return Err(GuestControlError::Qemu(
                "the destination did not say where its QEMU takes the device state".into(),
            ));
        };
        self.migrate_devices(&uri)
    }

    /// Quits (or leaves paused) the source VM once the destination's runs: QEMU's exit
    /// (unmapping its RAM) is no part of the downtime.
    fn after_handover(&mut self) -> Result<(), GuestControlError> {
        if self.spec.after == QemuAfter::Quit {
            // QEMU may close the monitor before it answers.
            match self.qmp.execute("quit", Value::Null) {
                Ok(_) | Err(QmpError::Closed(_)) => {}
                Err(e) => return Err(qemu_err(e)),
            }
        }
        Ok(())
    }

    fn check_alive(&mut self) -> Result<(), GuestControlError> {
        if self
            .alive_checked
            .is_some_and(|t| t.elapsed() < ALIVE_CHECK_PERIOD)
        {
            return Ok(());
        }
        self.alive_checked = Some(Instant::now());
        match self.qmp.status() {
            Ok(_) => Ok(()),
            Err(e) => Err(GuestControlError::Qemu(format!(
                "the VM's monitor stopped answering during the migration: {e}"
            ))),
        }
    }

    fn failure_note(&self) -> String {
        format!("the QEMU VM ({}) keeps running", self.spec.qmp.display())
    }

    fn keep_after_failure(self: Box<Self>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(id: &str, share: bool, path: Option<&str>) -> RamBackend {
        RamBackend {
            id: id.into(),
            size: 8192,
            share,
            mem_path: path.map(PathBuf::from),
        }
    }

    /// QEMU lists its backends in no fixed order (7.2: `m1` before `m0`): they travel in
    /// the order of their ids; one that is not a shared file refuses the VM.
    #[test]
    fn backends_travel_in_id_order_and_must_be_shared_files() {
        let files = shared_files(vec![
            backend("m1", true, Some("/r1")),
            backend("m0", true, Some("/r0")),
        ])
        .unwrap();
        assert_eq!(
            files,
            vec![(PathBuf::from("/r0"), 8192), (PathBuf::from("/r1"), 8192)]
        );
        for bad in [backend("m1", false, Some("/r1")), backend("m1", true, None)] {
            let err = shared_files(vec![backend("m0", true, Some("/r0")), bad]).unwrap_err();
            assert!(err.to_string().contains("m1 is not a shared file"), "{err}");
        }
        assert!(shared_files(Vec::new()).is_err());
    }
}
