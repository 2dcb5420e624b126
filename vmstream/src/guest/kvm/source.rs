//! The source guest of `vmstream send --kvm`: a KVM guest ([`crate::guest::kvm`]) run by this
//! process, its RAM a shared file (`--memory-file`) or memfd that the sender maps like a
//! file-backed guest's memory. Dirty pages come from KVM's dirty log (`--dirty-log
//! bitmap|clear|ring`) through a [`KvmDirtyTracker`].
//! Pausing captures the vCPU state ([`crate::guest::kvm::VmState`]), which travels as the
//! `GuestState` blob. After a failed migration the guest keeps running in this process
//! (`--on-failure`), since the VM cannot outlive it.

use std::path::PathBuf;
use std::time::Duration;

use crate::guest::file::disks::GuestDisks;
use crate::guest::file::source::{drop_stale_bitmaps, GuestControlError};
use crate::guest::kvm::abi::{VCPU_AREA_GPA, VCPU_AREA_STRIDE, VCPU_TX_COUNT};
use crate::guest::kvm::run::report_while_running;
use crate::guest::kvm::{DirtyLogMode, GuestRam, KvmGuest, KvmGuestConfig, WorkloadConfig};
use crate::guest::migratable::MigratableGuest;
use crate::guest::GuestKind;
use crate::memory::{GuestMemory, MapMode};
use crate::telemetry::notice::Notices;
use crate::track::{DirtyTracker, KvmDirtyTracker};

/// What becomes of the KVM guest after a failed or cancelled migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Keep it running in this process, for this long (None: until SIGINT/SIGTERM).
    KeepRunning(Option<Duration>),
    /// Stop it at once.
    Stop,
}

/// The KVM guest `vmstream send --kvm` starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmSpec {
    /// Guest RAM file (None: an anonymous memfd).
    pub path: Option<PathBuf>,
    /// RAM size in bytes.
    pub size: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// Guest program workload.
    pub workload: crate::guest::kvm::KvmWorkloadKind,
    /// Dirty tracking mechanism.
    pub dirty_log: DirtyLogMode,
    /// After a failed or cancelled migration.
    pub after_failure: AfterFailure,
    /// The disks the diskio workload writes through the paravirtual block device (empty
    /// for other workloads).
    pub disks: GuestDisks,
}

/// A running KVM guest on the source.
pub struct KvmSourceGuest {
    /// None once terminated.
    guest: Option<KvmGuest>,
    tracker: KvmDirtyTracker,
    memory: GuestMemory,
    path: PathBuf,
    spec: KvmSpec,
    paused: bool,
    /// Told of trouble, and of the guest's rate while it keeps running after a failure.
    notices: Notices,
}

impl std::fmt::Debug for KvmSourceGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmSourceGuest")
            .field("spec", &self.spec)
            .field("paused", &self.paused)
            .finish()
    }
}

impl KvmSourceGuest {
    /// Creates the VM (a fresh guest: an existing `spec.path` is truncated) with dirty
    /// logging on, and maps its RAM for the sender. Its warnings, and its lines when it
    /// keeps running after a failed migration, go to `notices`.
    pub fn start(spec: &KvmSpec, notices: &Notices) -> Result<KvmSourceGuest, GuestControlError> {
        // A fresh guest formats its disks' area: their old bitmaps' bits mean nothing.
        drop_stale_bitmaps(&spec.disks)?;
        let ram = match &spec.path {
            Some(p) => GuestRam::create(p, spec.size)?,
            None => GuestRam::memfd(spec.size)?,
        };
        let path = ram.shared_path();
        let cfg = KvmGuestConfig {
            vcpus: spec.vcpus,
            workload: WorkloadConfig {
                kind: spec.workload,
                ..WorkloadConfig::default()
            },
            dirty_log: Some(spec.dirty_log),
            disks: spec.disks.clone(),
            ..KvmGuestConfig::default()
        };
        let guest = KvmGuest::start(ram, &cfg)?;
        let tracker = guest.dirty_tracker()?;
        let memory = GuestMemory::open_sized(&path, spec.size, MapMode::Shared)?;
        Ok(KvmSourceGuest {
            guest: Some(guest),
            tracker,
            memory,
            path,
            spec: spec.clone(),
            paused: false,
            notices: notices.clone(),
        })
    }

    fn guest(&mut self) -> Result<&mut KvmGuest, GuestControlError> {
        self.guest
            .as_mut()
            .ok_or_else(|| GuestControlError::Config("the KVM guest was terminated".into()))
    }
}

impl MigratableGuest for KvmSourceGuest {
    fn kind(&self) -> GuestKind {
        GuestKind::Kvm
    }

    fn describe(&self) -> String {
        format!(
            "guest pid={} kind=kvm path={} vcpus={} workload={} tracking={}",
            std::process::id(),
            self.path.display(),
            self.spec.vcpus,
            self.spec.workload.name(),
            self.tracker.name()
        )
    }

    fn size(&self) -> u64 {
        self.spec.size
    }

    fn tx_count(&self) -> u64 {
        (0..self.spec.vcpus as u64)
            .map(|i| {
                self.memory
                    .load_u64((VCPU_AREA_GPA + i * VCPU_AREA_STRIDE + VCPU_TX_COUNT) as usize)
            })
            .sum()
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
        let state = self.guest()?.pause()?;
        self.paused = true;
        Ok(state.to_bytes())
    }

    fn resume(&mut self) -> Result<(), GuestControlError> {
        if self.paused {
            self.guest()?.resume()?;
            self.paused = false;
        }
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.paused
    }

    fn set_throttle(&mut self, fraction: f64) {
        if let Some(g) = self.guest.as_mut() {
            if let Err(e) = g.set_throttle(fraction) {
                self.notices
                    .warning(format!("throttling the KVM guest: {e}"));
            }
        }
    }

    fn terminate(&mut self) -> Result<(), GuestControlError> {
        if let Some(g) = self.guest.take() {
            g.shutdown();
        }
        Ok(())
    }

    fn failure_note(&self) -> String {
        match self.spec.after_failure {
            AfterFailure::Stop => "the KVM guest is stopped (--on-failure stop)".into(),
            AfterFailure::KeepRunning(None) => format!(
                "the KVM guest keeps running in this process (pid {}) until SIGINT/SIGTERM",
                std::process::id()
            ),
            AfterFailure::KeepRunning(Some(d)) => format!(
                "the KVM guest keeps running in this process (pid {}) for {d:?}",
                std::process::id()
            ),
        }
    }

    fn keep_after_failure(mut self: Box<Self>) {
        let Some(mut guest) = self.guest.take() else {
            return;
        };
        let _ = guest.set_throttle(0.0);
        // The VM's own flag: a pause that failed half-way left it set without a state.
        if guest.is_paused() {
            if let Err(e) = guest.resume() {
                self.notices
                    .error(format!("resuming the KVM guest failed: {e}"));
            }
        }
        if let AfterFailure::KeepRunning(run_for) = self.spec.after_failure {
            let run = report_while_running(
                &mut guest,
                run_for,
                Duration::from_secs(1),
                "kvm",
                false,
                &self.notices,
            );
            match run {
                Ok(s) => self
                    .notices
                    .output(format!("done tx={} tps={:.0}", s.tx_end, s.tps())),
                Err(e) => self.notices.error(format!("the KVM guest failed: {e}")),
            }
        }
        guest.shutdown();
    }
}
