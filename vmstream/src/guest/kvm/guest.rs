//! [`KvmGuest`]: a running KVM guest — start from the guest program or
//! restore from saved state, pause/resume, dirty logs, throttling, progress
//! and verification. VM construction is in `machine.rs`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_clock_data, kvm_mp_state, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Kvm, VmFd};

use crate::guest::file::disks::verify::DiskVerifyReport;
use crate::guest::file::disks::GuestDisks;
use crate::guest::kvm::abi::*;
use crate::guest::kvm::disk::{self, device::BlockDevice};
use crate::guest::kvm::error::{KvmError, Result};
use crate::guest::kvm::machine::{create_machine, format_image, vcpu_cpuid, Machine};
use crate::guest::kvm::memory::GuestRam;
use crate::guest::kvm::params::{GuestLayout, KvmWorkloadKind, Params, WorkloadConfig};
use crate::guest::kvm::setup;
use crate::guest::kvm::state::{restore_vcpu, StateError, VmState};
use crate::guest::kvm::vcpu::{install_kick_handler, vcpu_thread, Command, Shared};
use crate::guest::kvm::verify::{self, KvmVerifyReport};
use crate::track::kvm::{
    self as dirty, DirtyLog, DirtyLogMode, KvmDirtyTracker, DEFAULT_RING_ENTRIES,
};

/// How long `pause` waits for every vCPU to stop before giving up.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Throttle period: vCPUs sleep a fraction of each period.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

/// How to start a fresh guest.
#[derive(Clone, Debug)]
pub struct KvmGuestConfig {
    /// Number of vCPUs (one thread each), 1..=64.
    pub vcpus: usize,
    /// What the guest program does.
    pub workload: WorkloadConfig,
    /// Dirty tracking to set up (rings must be chosen before vCPUs exist).
    pub dirty_log: Option<DirtyLogMode>,
    /// Dirty ring entries per vCPU (ring mode), a power of two >= 8192.
    pub ring_entries: u32,
    /// The disks the diskio workload writes through the block device (other workloads
    /// have none): paths, size of the missing ones, bitmap granularity, I/O size and rate.
    pub disks: GuestDisks,
}

impl Default for KvmGuestConfig {
    fn default() -> Self {
        Self {
            vcpus: 2,
            workload: WorkloadConfig::default(),
            dirty_log: None,
            ring_entries: DEFAULT_RING_ENTRIES,
            disks: GuestDisks::default(),
        }
    }
}

/// How to set up a guest restored from saved state.
#[derive(Clone, Debug)]
pub struct RestoreConfig {
    /// Dirty tracking on the new VM.
    pub dirty_log: Option<DirtyLogMode>,
    /// Dirty ring entries per vCPU (ring mode).
    pub ring_entries: u32,
    /// Keep the vCPUs stopped until [`KvmGuest::resume`] (e.g. to verify the
    /// migrated memory before the guest changes it).
    pub start_paused: bool,
    /// The guest's disks, in order (a guest with a disk area needs exactly its disks).
    pub disks: Vec<PathBuf>,
}

impl Default for RestoreConfig {
    fn default() -> Self {
        Self {
            dirty_log: None,
            ring_entries: DEFAULT_RING_ENTRIES,
            start_paused: false,
            disks: Vec::new(),
        }
    }
}

/// A KVM guest running the vmstream guest program on its own vCPU threads.
pub struct KvmGuest {
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
    params: Params,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    throttle_thread: Option<JoinHandle<()>>,
    dirty_mode: Option<DirtyLogMode>,
    paused: bool,
}

impl std::fmt::Debug for KvmGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmGuest")
            .field("params", &self.params)
            .field("dirty_mode", &self.dirty_mode)
            .field("paused", &self.paused)
            .finish()
    }
}

/// Whether this machine can run KVM guests; `Err` says why not (tests skip on it).
pub fn kvm_available() -> std::result::Result<(), String> {
    Kvm::new()
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm unusable: {e}"))
}

impl KvmGuest {
    /// Creates a VM on `ram`, writes page tables, guest program and
    /// parameters into it, and starts `cfg.vcpus` vCPU threads.
    pub fn start(ram: GuestRam, cfg: &KvmGuestConfig) -> Result<Self> {
        let mut params = Params {
            workload: cfg.workload.clone(),
            layout: GuestLayout::for_memory(ram.size())?,
            vcpus: cfg.vcpus as u64,
            disk_area_gpa: 0,
            disk_buffer_gpa: 0,
        };
        let ram = Arc::new(ram);
        if cfg.workload.kind == KvmWorkloadKind::FileDb {
            format_image(&ram, &cfg.workload)?;
        }
        let (disks, io_rate) = match cfg.workload.kind {
            KvmWorkloadKind::Diskio => disk::format_disks(&ram, &mut params, &cfg.disks)?,
            _ => (Vec::new(), 0),
        };
        params.validate()?;
        let device = BlockDevice::new(ram.clone(), disks, io_rate);
        let machine = create_machine(&ram, cfg.vcpus, cfg.dirty_log, cfg.ring_entries, |_| {
            setup::write_system_area(&ram, &params)
        })?;
        for (i, vcpu) in machine.vcpus.iter().enumerate() {
            vcpu.set_cpuid2(&vcpu_cpuid(&machine.kvm, i)?)
                .map_err(KvmError::ioctl("KVM_SET_CPUID2"))?;
            let sregs = vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?;
            vcpu.set_sregs(&setup::initial_sregs(sregs))
                .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
            vcpu.set_regs(&setup::initial_regs(i as u64))
                .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
            // With an in-kernel LAPIC, APs would wait for INIT/SIPI.
            vcpu.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(KvmError::ioctl("KVM_SET_MP_STATE"))?;
        }
        Self::launch(ram, params, machine, cfg.dirty_log, false, device)
    }

    /// Creates a fresh VM on `ram` (which must hold the guest's memory as of
    /// the pause, e.g. a migrated copy) and resumes it from `state`: kvmclock
    /// first, then each vCPU in the order of [`restore_vcpu`].
    pub fn restore(ram: GuestRam, state: &VmState, cfg: &RestoreConfig) -> Result<Self> {
        if state.memory_size != ram.size() {
            return Err(StateError::MemorySizeMismatch {
                state: state.memory_size,
                memory: ram.size(),
            }
            .into());
        }
        let params = Params::read_from(&ram)?;
        if params.vcpus != state.vcpus.len() as u64 {
            return Err(KvmError::BadParams(format!(
                "memory was set up for {} vCPUs, state has {}",
                params.vcpus,
                state.vcpus.len()
            )));
        }
        let (disks, io_rate) = disk::open_restored(&ram, &params, &cfg.disks)?;
        let ram = Arc::new(ram);
        let device = BlockDevice::new(ram.clone(), disks, io_rate);
        let machine = create_machine(
            &ram,
            state.vcpus.len(),
            cfg.dirty_log,
            cfg.ring_entries,
            |vm| {
                let clock = kvm_clock_data {
                    clock: state.clock.clock,
                    ..Default::default()
                };
                vm.set_clock(&clock)
                    .map_err(KvmError::ioctl("KVM_SET_CLOCK"))
            },
        )?;
        for (vcpu, s) in machine.vcpus.iter().zip(&state.vcpus) {
            restore_vcpu(vcpu, s)?;
        }
        Self::launch(
            ram,
            params,
            machine,
            cfg.dirty_log,
            cfg.start_paused,
            device,
        )
    }

    fn launch(
        ram: Arc<GuestRam>,
        params: Params,
        machine: Machine,
        dirty_mode: Option<DirtyLogMode>,
        paused: bool,
        device: BlockDevice,
    ) -> Result<Self> {
        install_kick_handler();
        let shared = Arc::new(Shared::new(
            machine.vcpus.len(),
            machine.rings.clone(),
            machine.msr_indices,
            Mutex::new(device),
        ));
        if paused {
            // Threads park before their first KVM_RUN (no state capture is
            // due: generation 0 counts as captured).
            shared.set_command(Command::Pause);
        }
        let mut guest = Self {
            vm: machine.vm,
            ram,
            params,
            shared: shared.clone(),
            threads: Vec::new(),
            throttle_thread: None,
            dirty_mode,
            paused,
        };
        for (i, vcpu) in machine.vcpus.into_iter().enumerate() {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_thread(i, vcpu, shared))
                .map_err(KvmError::Thread)?;
            guest.threads.push(handle);
        }
        Ok(guest)
    }

    /// Stops every vCPU at an instruction boundary (kick: immediate_exit +
    /// signal; in-flight I/O exits are completed first) and returns the
    /// state needed to resume exactly. The guest stays paused until
    /// [`resume`](Self::resume).
    pub fn pause(&mut self) -> Result<VmState> {
        if self.paused {
            return Err(KvmError::AlreadyPaused);
        }
        let n = self.threads.len();
        let generation = {
            let mut p = self.shared.lock();
            p.generation += 1;
            p.generation
        };
        self.shared.set_command(Command::Pause);
        self.paused = true;
        self.shared.kick_all();
        let started = Instant::now();
        let mut p = self.shared.lock();
        loop {
            // A vCPU thread that ended (e.g. panicked) will never park.
            for (i, t) in self.threads.iter().enumerate() {
                if t.is_finished() && p.captured[i] != generation && p.failed[i].is_none() {
                    p.failed[i] = Some("vCPU thread ended unexpectedly".into());
                }
            }
            let done = (0..n)
                .filter(|&i| p.captured[i] == generation || p.failed[i].is_some())
                .count();
            if done == n {
                break;
            }
            if started.elapsed() > PAUSE_TIMEOUT {
                let vcpu = (0..n)
                    .find(|&i| p.captured[i] != generation && p.failed[i].is_none())
                    .unwrap_or(0);
                return Err(KvmError::VcpuFailed {
                    vcpu,
                    reason: format!("did not stop within {PAUSE_TIMEOUT:?}"),
                });
            }
            let (guard, timeout) = self
                .shared
                .cond
                .wait_timeout(p, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner());
            p = guard;
            if timeout.timed_out() {
                // A vCPU may have been between its command check and KVM_RUN
                // when the first kick landed; kicking again is harmless.
                drop(p);
                self.shared.kick_all();
                p = self.shared.lock();
            }
        }
        if let Some((vcpu, reason)) = p
            .failed
            .iter()
            .enumerate()
            .find_map(|(i, f)| f.clone().map(|r| (i, r)))
        {
            return Err(KvmError::VcpuFailed { vcpu, reason });
        }
        let vcpus = p
            .states
            .iter_mut()
            .map(|s| s.take().expect("captured"))
            .collect();
        drop(p);
        let clock = self
            .vm
            .get_clock()
            .map_err(KvmError::ioctl("KVM_GET_CLOCK"))?;
        Ok(VmState {
            memory_size: self.ram.size(),
            clock,
            vcpus,
        })
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&mut self) -> Result<()> {
        if !self.paused {
            return Err(KvmError::NotPaused);
        }
        self.shared.set_command(Command::Run);
        self.paused = false;
        Ok(())
    }

    /// Whether the guest is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The dirty log chosen at start/restore. Each call returns a new handle
    /// on the same log; use one at a time.
    pub fn dirty_log(&self) -> Result<Box<dyn DirtyLog>> {
        let mode = self
            .dirty_mode
            .ok_or_else(|| KvmError::Config("guest was started without a dirty log".into()))?;
        dirty::open(
            mode,
            self.vm.clone(),
            self.ram.clone(),
            self.shared.rings.clone(),
        )
    }

    /// A new handle on the dirty log as the crate's [`crate::track::DirtyTracker`] (see
    /// [`KvmDirtyTracker`]).
    pub fn dirty_tracker(&self) -> Result<KvmDirtyTracker> {
        Ok(KvmDirtyTracker::new(self.dirty_log()?, self.ram.pages()))
    }

    /// Dirty ring entries per vCPU, if ring mode is on.
    pub fn ring_entries(&self) -> Option<u32> {
        self.shared.rings.as_ref().map(|r| r.entries())
    }

    /// Transactions completed per vCPU (read from guest memory; works while running).
    pub fn transactions(&self) -> Result<Vec<u64>> {
        (0..self.params.vcpus)
            .map(|i| {
                self.ram
                    .load_u64(VCPU_AREA_GPA + i * VCPU_AREA_STRIDE + VCPU_TX_COUNT)
            })
            .collect()
    }

    /// Sum of [`transactions`](Self::transactions).
    pub fn total_transactions(&self) -> Result<u64> {
        Ok(self.transactions()?.iter().sum())
    }

    /// Progress reports (PORT_PROGRESS exits) seen per vCPU.
    pub fn progress_reports(&self) -> Vec<u64> {
        self.shared
            .slots
            .iter()
            .map(|s| s.progress_reports.load(Ordering::Relaxed))
            .collect()
    }

    /// Exits handled per vCPU.
    pub fn exits(&self) -> Vec<u64> {
        self.shared
            .slots
            .iter()
            .map(|s| s.exits.load(Ordering::Relaxed))
            .collect()
    }

    /// vCPUs that stopped on an error, with the reason.
    pub fn failures(&self) -> Vec<(usize, String)> {
        self.shared
            .lock()
            .failed
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.clone().map(|r| (i, r)))
            .collect()
    }

    /// Checks every block against the ledger (dbsim); see [`verify::verify`].
    /// Exact when paused; while running, blocks change under the reader.
    pub fn verify(&self) -> Result<KvmVerifyReport> {
        verify::verify(&self.ram, &self.params)
    }

    /// Checks the disks the guest writes against the ledgers in its RAM (`None`: it has no
    /// disk area); see [`disk::verify::verify_disks`]. Exact when paused.
    pub fn verify_disks(&self) -> Result<Option<DiskVerifyReport>> {
        disk::verify::verify_disks(&*self.ram, &self.disk_paths())
    }

    /// The disks the guest writes through its block device, in order.
    pub fn disk_paths(&self) -> Vec<PathBuf> {
        let device = self.shared.block.lock().unwrap_or_else(|e| e.into_inner());
        device.disks().iter().map(|d| d.path().into()).collect()
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Parameters the guest runs with.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Queues pages for vCPU `vcpu` to write (touch workload), followed by a
    /// batch end; the guest writes one u64 into each page, nothing else.
    pub fn touch(&self, vcpu: usize, pages: &[u64]) -> Result<()> {
        let slot = self
            .shared
            .slots
            .get(vcpu)
            .ok_or_else(|| KvmError::Config(format!("no vCPU {vcpu}")))?;
        let ram_pages = self.ram.pages();
        let mut q = slot.touch_queue.lock().unwrap_or_else(|e| e.into_inner());
        for &p in pages {
            if p == 0 || p >= ram_pages || p >= TOUCH_NONE {
                return Err(KvmError::Config(format!("cannot touch page {p}")));
            }
        }
        q.extend(pages.iter().map(|&p| p as u32));
        q.push_back(0);
        Ok(())
    }

    /// Touch batches vCPU `vcpu` has completed.
    pub fn touch_batches(&self, vcpu: usize) -> u64 {
        self.shared.slots[vcpu].touch_batches.load(Ordering::SeqCst)
    }

    /// Waits until vCPU `vcpu` completed `batches` touch batches; false on timeout.
    pub fn wait_touch_batches(&self, vcpu: usize, batches: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut p = self.shared.lock();
        loop {
            if self.touch_batches(vcpu) >= batches {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || p.failed[vcpu].is_some() {
                return false;
            }
            p = self
                .shared
                .cond
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Throttles the vCPUs: each sleeps a fraction `p` (clamped to [0, 0.99])
    /// of every 10 ms period. 0 turns throttling off.
    pub fn set_throttle(&mut self, p: f64) -> Result<()> {
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 0.99) };
        self.shared.throttle.set(p);
        if p > 0.0 && self.throttle_thread.is_none() {
            let shared = self.shared.clone();
            let handle = std::thread::Builder::new()
                .name("vcpu-throttle".into())
                .spawn(move || throttle_thread(&shared))
                .map_err(KvmError::Thread)?;
            self.throttle_thread = Some(handle);
        }
        Ok(())
    }

    /// Throttle sleeps taken per vCPU.
    pub fn throttle_sleeps(&self) -> Vec<u64> {
        self.shared
            .slots
            .iter()
            .map(|s| s.throttle_sleeps.load(Ordering::Relaxed))
            .collect()
    }

    /// Current throttle fraction.
    pub fn throttle(&self) -> f64 {
        self.shared.throttle.get()
    }

    /// Stops all threads and returns guest RAM (for inspection or a restore).
    pub fn shutdown(mut self) -> Arc<GuestRam> {
        self.stop_threads();
        self.ram.clone()
    }

    fn stop_threads(&mut self) {
        self.shared.set_command(Command::Exit);
        if let Some(t) = self.throttle_thread.take() {
            let _ = t.join();
        }
        for _ in 0..3 {
            self.shared.kick_all();
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// Each period: let vCPUs run (1 - p) of it, then make them sleep p of it.
fn throttle_thread(shared: &Shared) {
    while shared.command() != Command::Exit {
        let p = shared.throttle.get();
        if p <= 0.0 {
            std::thread::sleep(THROTTLE_PERIOD);
            continue;
        }
        std::thread::sleep(THROTTLE_PERIOD.mul_f64(1.0 - p));
        // Re-read: throttling may have been turned off or changed meanwhile.
        let p = shared.throttle.get();
        if p <= 0.0 {
            continue;
        }
        let sleep = THROTTLE_PERIOD.mul_f64(p);
        let until = (shared.epoch.elapsed() + sleep).as_nanos() as u64;
        for (i, slot) in shared.slots.iter().enumerate() {
            slot.sleep_until_ns.store(until, Ordering::Relaxed);
            if shared.command() == Command::Run {
                shared.kick(i);
            }
        }
        std::thread::sleep(sleep);
    }
}
