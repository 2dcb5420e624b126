//! vCPU threads: the KVM_RUN loop, the port protocol, kicking (immediate_exit
//! plus a signal), parking for pause with state capture, and throttle sleeps.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::guest::kvm::abi::*;
use crate::guest::kvm::disk::device::{status_name, BlockDevice};
use crate::guest::kvm::state::{capture_vcpu, VcpuState};
use crate::track::kvm::DirtyRings;

/// What the VMM wants the vCPU threads to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Command {
    Run = 0,
    Pause = 1,
    Exit = 2,
}

/// Where to poke a vCPU to get it out of KVM_RUN.
struct KickTarget {
    /// `kvm_run.immediate_exit` of the vCPU (null when the vCPU is gone).
    immediate_exit: *mut u8,
    /// The vCPU thread (0 when gone).
    thread: libc::pthread_t,
}

// SAFETY: the raw pointer is only dereferenced under the Mutex that the vCPU
// thread also takes before unmapping kvm_run (see vcpu_thread).
unsafe impl Send for KickTarget {}

/// Per-vCPU shared counters and queues.
pub(crate) struct VcpuSlot {
    kick: Mutex<KickTarget>,
    /// Progress reports (PORT_PROGRESS exits).
    pub(crate) progress_reports: AtomicU64,
    /// All exits handled.
    pub(crate) exits: AtomicU64,
    /// Pages queued for the touch workload.
    pub(crate) touch_queue: Mutex<VecDeque<u32>>,
    /// Touch batches completed by the guest.
    pub(crate) touch_batches: AtomicU64,
    /// Throttle: sleep until this many ns after `Shared::epoch`.
    pub(crate) sleep_until_ns: AtomicU64,
    /// Throttle sleeps taken.
    pub(crate) throttle_sleeps: AtomicU64,
}

/// Parking lot for pause: which vCPUs saved their state for which pause.
pub(crate) struct Parking {
    /// Incremented by every pause request.
    pub(crate) generation: u64,
    /// Pause generation each vCPU last captured its state for.
    pub(crate) captured: Vec<u64>,
    /// Captured states.
    pub(crate) states: Vec<Option<VcpuState>>,
    /// vCPUs that stopped for good, with the reason.
    pub(crate) failed: Vec<Option<String>>,
}

/// The vCPUs' throttle fraction: set through the VMM API, read every period by the
/// throttle thread while the vCPUs run, so it is shared and lock-free. Std has no atomic
/// f64: the fraction's bits are stored in an `AtomicU64`, hidden behind `set` and `get`.
#[derive(Debug, Default)]
pub(crate) struct ThrottleFraction(AtomicU64);

impl ThrottleFraction {
    /// Sets the fraction (0 = no throttle).
    pub(crate) fn set(&self, fraction: f64) {
        self.0.store(fraction.to_bits(), Ordering::Relaxed);
    }

    /// The fraction last set (0 before any).
    pub(crate) fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// State shared between the VMM API and the vCPU threads.
pub(crate) struct Shared {
    command: AtomicU8,
    pub(crate) parking: Mutex<Parking>,
    /// Signals parking changes, touch batches and command changes.
    pub(crate) cond: Condvar,
    pub(crate) slots: Vec<VcpuSlot>,
    pub(crate) epoch: Instant,
    /// The throttle fraction the throttle thread applies.
    pub(crate) throttle: ThrottleFraction,
    pub(crate) rings: Option<Arc<DirtyRings>>,
    pub(crate) msr_indices: Vec<u32>,
    /// The paravirtual block device (one request at a time).
    pub(crate) block: Mutex<BlockDevice>,
}

/// Signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR.
}

/// Installs the (no-op) kick signal handler once per process.
pub(crate) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .expect("register vCPU kick signal handler");
    });
}

fn set_immediate_exit(ptr: *mut u8, value: u8) {
    // SAFETY: `ptr` points at kvm_run.immediate_exit inside the vCPU's
    // kvm_run mapping, which is alive while the caller holds the kick lock or
    // is the vCPU thread itself. KVM reads the byte at KVM_RUN entry.
    unsafe { AtomicU8::from_ptr(ptr) }.store(value, Ordering::SeqCst);
}

impl Shared {
    pub(crate) fn new(
        vcpus: usize,
        rings: Option<Arc<DirtyRings>>,
        msr_indices: Vec<u32>,
        block: Mutex<BlockDevice>,
    ) -> Self {
        Self {
            command: AtomicU8::new(Command::Run as u8),
            parking: Mutex::new(Parking {
                generation: 0,
                captured: vec![0; vcpus],
                states: vec![None; vcpus],
                failed: vec![None; vcpus],
            }),
            cond: Condvar::new(),
            slots: (0..vcpus)
                .map(|_| VcpuSlot {
                    kick: Mutex::new(KickTarget {
                        immediate_exit: std::ptr::null_mut(),
                        thread: 0,
                    }),
                    progress_reports: AtomicU64::new(0),
                    exits: AtomicU64::new(0),
                    touch_queue: Mutex::new(VecDeque::new()),
                    touch_batches: AtomicU64::new(0),
                    sleep_until_ns: AtomicU64::new(0),
                    throttle_sleeps: AtomicU64::new(0),
                })
                .collect(),
            epoch: Instant::now(),
            throttle: ThrottleFraction::default(),
            rings,
            msr_indices,
            block,
        }
    }

    pub(crate) fn command(&self) -> Command {
        match self.command.load(Ordering::SeqCst) {
            0 => Command::Run,
            1 => Command::Pause,
            _ => Command::Exit,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Parking> {
        self.parking.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the command (under the parking lock so sleepers see it) and wakes everyone.
    pub(crate) fn set_command(&self, c: Command) {
        let _g = self.lock();
        self.command.store(c as u8, Ordering::SeqCst);
        self.cond.notify_all();
    }

    /// Forces vCPU `i` out of KVM_RUN soon: immediate_exit for the case it is
    /// about to enter, a signal for the case it is inside.
    pub(crate) fn kick(&self, i: usize) {
        let k = self.slots[i].kick.lock().unwrap_or_else(|e| e.into_inner());
        if !k.immediate_exit.is_null() {
            set_immediate_exit(k.immediate_exit, 1);
        }
        if k.thread != 0 {
            // SAFETY: the thread is registered and not yet joined (it clears
            // this entry under the same lock before it exits).
            unsafe { libc::pthread_kill(k.thread, kick_signal()) };
        }
    }

    pub(crate) fn kick_all(&self) {
        for i in 0..self.slots.len() {
            self.kick(i);
        }
    }

    fn throttle_sleep(&self, i: usize) {
        let until = self.slots[i].sleep_until_ns.load(Ordering::Relaxed);
        let now = self.epoch.elapsed().as_nanos() as u64;
        if until > now {
            self.slots[i]
                .throttle_sleeps
                .fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_nanos(until - now));
        }
    }

    fn fail(&self, i: usize, reason: String) {
        let mut p = self.lock();
        p.failed[i] = Some(reason);
        self.cond.notify_all();
    }
}

/// Body of vCPU thread `i`.
pub(crate) fn vcpu_thread(i: usize, mut vcpu: VcpuFd, shared: Arc<Shared>) {
    let ie: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    {
        let mut k = shared.slots[i]
            .kick
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        k.immediate_exit = ie;
        // SAFETY: pthread_self has no preconditions.
        k.thread = unsafe { libc::pthread_self() };
    }
    if let Err(reason) = run_loop(i, &mut vcpu, ie, &shared) {
        shared.fail(i, reason);
        let mut p = shared.lock();
        while shared.command() != Command::Exit {
            p = shared.cond.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }
    let mut k = shared.slots[i]
        .kick
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    k.immediate_exit = std::ptr::null_mut();
    k.thread = 0;
    drop(k);
    drop(vcpu);
}

fn is_interrupted(e: &vmm_sys_util::errno::Error) -> bool {
    e.errno() == libc::EINTR || e.errno() == libc::EAGAIN
}

fn run_loop(i: usize, vcpu: &mut VcpuFd, ie: *mut u8, shared: &Shared) -> Result<(), String> {
    loop {
        match shared.command() {
            Command::Exit => return Ok(()),
            Command::Pause => {
                park(i, vcpu, ie, shared)?;
                continue;
            }
            Command::Run => {}
        }
        shared.throttle_sleep(i);
        let slot = &shared.slots[i];
        match vcpu.run() {
            Ok(exit) => {
                slot.exits.fetch_add(1, Ordering::Relaxed);
                if let Err(reason) = handle_exit(i, exit, shared) {
                    return Err(format!("{reason} ({})", describe(vcpu)));
                }
            }
            Err(e) if is_interrupted(&e) => set_immediate_exit(ie, 0),
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        }
    }
}

/// Registers worth reporting when a vCPU stops unexpectedly.
fn describe(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rdi={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs.dpl={}",
            r.rip, r.rsp, r.rflags, r.rax, r.rdi, s.cr0, s.cr3, s.cr4, s.efer, s.cs.dpl
        ),
        _ => "registers unavailable".into(),
    }
}

fn handle_exit(i: usize, exit: VcpuExit<'_>, shared: &Shared) -> Result<(), String> {
    let slot = &shared.slots[i];
    let word = |data: &[u8]| {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        u32::from_le_bytes(b)
    };
    match exit {
        VcpuExit::IoOut(port, data) => match port as u64 {
            PORT_PROGRESS => {
                slot.progress_reports.fetch_add(1, Ordering::Relaxed);
            }
            PORT_IDLE => std::thread::sleep(Duration::from_millis(1)),
            PORT_TOUCH_DONE => {
                let _g = shared.lock();
                slot.touch_batches.fetch_add(1, Ordering::SeqCst);
                shared.cond.notify_all();
            }
            PORT_BLOCK => {
                // The status is in the record when the `out` returns; a failed request is
                // the guest's to act on.
                let mut device = shared.block.lock().unwrap_or_else(|e| e.into_inner());
                device
                    .handle(i as u64)
                    .map_err(|e| format!("block request: {e}"))?;
            }
            PORT_PANIC => {
                let code = word(data);
                let why = match code as u64 {
                    PANIC_BAD_PARAMS => "bad parameter block".to_string(),
                    PANIC_DISK_IO => {
                        let device = shared.block.lock().unwrap_or_else(|e| e.into_inner());
                        let status = device.request_status(i as u64).unwrap_or(u64::MAX);
                        format!("a block request failed: {}", status_name(status))
                    }
                    _ => "unknown".to_string(),
                };
                return Err(format!("guest panic, code {code} ({why})"));
            }
            other => return Err(format!("out to unknown port {other:#x}")),
        },
        VcpuExit::IoIn(port, data) => match port as u64 {
            PORT_TOUCH => {
                let next = next_touch(slot);
                let bytes = next.to_le_bytes();
                let n = data.len().min(4);
                data[..n].copy_from_slice(&bytes[..n]);
            }
            other => return Err(format!("in from unknown port {other:#x}")),
        },
        VcpuExit::Unsupported(r) if r == kvm_bindings::KVM_EXIT_DIRTY_RING_FULL => {
            let rings = shared
                .rings
                .as_ref()
                .ok_or("ring-full exit without dirty rings")?;
            rings.on_ring_full(i).map_err(|e| e.to_string())?;
        }
        VcpuExit::Intr => {}
        other => return Err(format!("unhandled exit {other:?}")),
    }
    Ok(())
}

/// The next queued page for the touch workload, or TOUCH_NONE after a short
/// wait (the guest asks again; the vCPU stays pausable meanwhile).
fn next_touch(slot: &VcpuSlot) -> u32 {
    let mut q = slot.touch_queue.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = q.pop_front() {
        return p;
    }
    drop(q);
    std::thread::sleep(Duration::from_micros(500));
    slot.touch_queue
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop_front()
        .unwrap_or(TOUCH_NONE as u32)
}

/// Pause: complete the in-flight exit, capture state for this pause
/// generation, then wait for Run or Exit.
fn park(i: usize, vcpu: &mut VcpuFd, ie: *mut u8, shared: &Shared) -> Result<(), String> {
    // KVM completes a pending I/O exit on the next KVM_RUN; with
    // immediate_exit set that run returns EINTR right after, so the saved
    // registers reflect the finished instruction.
    set_immediate_exit(ie, 1);
    match vcpu.run() {
        Err(e) if is_interrupted(&e) => {}
        Ok(exit) => return Err(format!("exit {exit:?} while completing for pause")),
        Err(e) => return Err(format!("KVM_RUN (completion) failed: {e}")),
    }
    set_immediate_exit(ie, 0);
    let mut p = shared.lock();
    loop {
        match shared.command() {
            Command::Run | Command::Exit => return Ok(()),
            Command::Pause => {}
        }
        if p.captured[i] != p.generation {
            let generation = p.generation;
            drop(p);
            let state = capture_vcpu(vcpu, &shared.msr_indices).map_err(|e| e.to_string())?;
            p = shared.lock();
            p.states[i] = Some(state);
            p.captured[i] = generation;
            shared.cond.notify_all();
            continue;
        }
        p = shared.cond.wait(p).unwrap_or_else(|e| e.into_inner());
    }
}
