//! Throttling a QEMU VM's vCPU threads alone where no cpu cgroup can hold them
//! ([`PtraceThrottle`]): a thread of ours traces each vCPU thread (`PTRACE_SEIZE`, which
//! stops nothing by itself) and duty-cycles it, `PTRACE_INTERRUPT` stopping that thread
//! alone (a stop signal would stop the whole process, monitor included) and `PTRACE_CONT`
//! letting it run again, stopped `fraction` of the time (periods of 10 ms). Signals that reach a
//! traced thread are passed on when it runs again. Dropped, it lets every thread run and
//! detaches from it.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The duty cycle's period (as the cgroup throttle's CFS period).
const PERIOD: Duration = Duration::from_millis(10);
/// How often the tracer looks at its threads: stops are reported to it, and a thread in a
/// signal-delivery stop waits for it.
const TICK: Duration = Duration::from_micros(500);
/// Longest wait for a thread to stop before it is detached.
const DETACH_WAIT: Duration = Duration::from_secs(1);

/// vCPU threads traced and duty-cycled by a thread of ours; released on drop.
#[derive(Debug)]
pub struct PtraceThrottle {
    /// The stopped fraction, as `f64` bits.
    fraction: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tracer: Option<JoinHandle<()>>,
}

/// A traced thread.
#[derive(Debug, Default)]
struct Traced {
    /// In a ptrace stop (reported by `waitpid`).
    stopped: bool,
    /// A signal it stopped to receive, passed on when it runs again.
    signal: Option<Signal>,
}

impl PtraceThrottle {
    /// Traces `tids` from a thread of its own (the tracer of a thread must make every
    /// later request), unthrottled. Fails, tracing none, if one cannot be traced (another
    /// tracer, no permission: `CAP_SYS_PTRACE` or the same user, and Yama's
    /// `ptrace_scope`).
    pub fn new(tids: &[u32]) -> io::Result<PtraceThrottle> {
        if tids.is_empty() {
            return Err(io::Error::other("the VM has no vCPU threads"));
        }
        let fraction = Arc::new(AtomicU64::new(0f64.to_bits()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, seized) = mpsc::channel();
        let tids = tids.to_vec();
        let (f, s) = (Arc::clone(&fraction), Arc::clone(&stop));
        let tracer = std::thread::Builder::new()
            .name("vmstream-vcpu-ptrace".into())
            .spawn(move || match seize(&tids) {
                Ok(traced) => {
                    let _ = ready.send(Ok(()));
                    duty_cycle(traced, &f, &s);
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            })?;
        let result = seized
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the tracer thread ended")));
        let throttle = PtraceThrottle {
            fraction,
            stop,
            tracer: Some(tracer),
        };
        result.map(|()| throttle)
    }

    /// Stops the threads `fraction` of every period (0: lets them run).
    pub fn set(&mut self, fraction: f64) {
        let f = fraction.clamp(0.0, 0.99);
        self.fraction.store(f.to_bits(), Ordering::Relaxed);
    }
}

impl Drop for PtraceThrottle {
    /// Every thread runs again, no longer traced, once this returns.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.tracer.take() {
            let _ = t.join();
        }
    }
}

/// Seizes every thread of `tids`; on a failure detaches those already seized.
fn seize(tids: &[u32]) -> io::Result<HashMap<Pid, Traced>> {
    let mut traced = HashMap::new();
    for &tid in tids {
        let pid = Pid::from_raw(tid as i32);
        if let Err(e) = ptrace::seize(pid, ptrace::Options::empty()) {
            release(traced);
            return Err(io::Error::other(format!(
                "cannot trace vCPU thread {tid} (PTRACE_SEIZE): {e}"
            )));
        }
        traced.insert(pid, Traced::default());
    }
    Ok(traced)
}

/// Takes the stops the threads reported; forgets threads that ended.
fn reap(traced: &mut HashMap<Pid, Traced>) {
    traced.retain(|&pid, t| {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Stopped(_, sig)) => {
                // A signal-delivery stop: the signal is passed on when it runs again.
                t.stopped = true;
                t.signal = Some(sig);
                true
            }
            Ok(WaitStatus::PtraceEvent(..)) => {
                t.stopped = true;
                true
            }
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => false,
            Ok(_) | Err(_) => true,
        }
    });
}

/// Runs a stopped thread again, with the signal it stopped for.
fn resume(pid: Pid, t: &mut Traced) {
    if t.stopped && ptrace::cont(pid, t.signal.take()).is_ok() {
        t.stopped = false;
    }
}

/// Where the duty cycle is.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// The threads run, since then.
    Running(Instant),
    /// The threads are held stopped until then.
    Stopped(Instant),
}

/// The tracer's loop until `stop`, then every thread released: the threads run for
/// `1 - fraction` of a period, then stay stopped for `fraction / (1 - fraction)` of the
/// time they actually ran (a tracer that woke late lets them run longer, and then holds
/// them longer: the shares hold on a busy host).
fn duty_cycle(mut traced: HashMap<Pid, Traced>, fraction: &AtomicU64, stop: &AtomicBool) {
    let mut phase = Phase::Running(Instant::now());
    while !stop.load(Ordering::Acquire) {
        reap(&mut traced);
        let f = f64::from_bits(fraction.load(Ordering::Relaxed));
        let now = Instant::now();
        phase = match phase {
            Phase::Running(since) if f > 0.0 && now - since >= PERIOD.mul_f64(1.0 - f) => {
                for (&pid, t) in traced.iter_mut() {
                    if !t.stopped {
                        // Its stop is reported to a later `reap`.
                        let _ = ptrace::interrupt(pid);
                    }
                }
                Phase::Stopped(now + (now - since).mul_f64(f / (1.0 - f)))
            }
            Phase::Stopped(until) if f <= 0.0 || now >= until => {
                for (&pid, t) in traced.iter_mut() {
                    resume(pid, t);
                }
                Phase::Running(now)
            }
            Phase::Running(since) => {
                // A signal-delivery stop (or a late interrupt's) while running: run on.
                for (&pid, t) in traced.iter_mut() {
                    resume(pid, t);
                }
                Phase::Running(since)
            }
            held @ Phase::Stopped(_) => held,
        };
        std::thread::sleep(TICK);
    }
    release(traced);
}

/// Stops every thread (a tracee is detached from a stop), then detaches it, passing on the
/// signal it stopped for: it runs on, untraced.
fn release(mut traced: HashMap<Pid, Traced>) {
    reap(&mut traced);
    for (&pid, t) in traced.iter_mut() {
        if !t.stopped {
            let _ = ptrace::interrupt(pid);
        }
    }
    let deadline = Instant::now() + DETACH_WAIT;
    while traced.values().any(|t| !t.stopped) && Instant::now() < deadline {
        std::thread::sleep(TICK);
        reap(&mut traced);
    }
    for (pid, t) in traced {
        let _ = ptrace::detach(pid, t.signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::process::{Command, Stdio};

    /// CPU ticks (user + system) process `pid` used so far.
    fn ticks(pid: u32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    fn status(pid: u32, field: &str) -> String {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A busy single-threaded process gets far less CPU stopped 80% of every period than
    /// free; a signal sent to it while throttled is delivered; dropped, the throttle leaves
    /// it untraced and running.
    #[test]
    fn a_traced_thread_is_duty_cycled_and_let_go() {
        let mut child = Command::new("sh")
            .args(["-c", "trap 'echo usr1' USR1; while :; do :; done"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let used_over = |d: Duration| {
            let before = ticks(pid);
            std::thread::sleep(d);
            ticks(pid) - before
        };
        std::thread::sleep(Duration::from_millis(100));
        let free = used_over(Duration::from_secs(1));
        let mut throttle = PtraceThrottle::new(&[pid]).unwrap();
        // TracerPid is the tracing thread's id: the throttle's, in this process.
        let tracer = status(pid, "TracerPid:");
        let me = std::process::id();
        assert!(
            tracer != "0" && std::path::Path::new(&format!("/proc/{me}/task/{tracer}")).exists()
        );
        throttle.set(0.8);
        let throttled = used_over(Duration::from_secs(1));
        nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGUSR1).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        drop(throttle);
        assert_eq!(status(pid, "TracerPid:"), "0");
        let state = status(pid, "State:");
        assert!(state.starts_with('R') || state.starts_with('S'), "{state}");
        eprintln!("busy loop CPU ticks over 1 s: free {free}, throttled to 20% {throttled}");
        assert!(free >= 20, "the busy loop barely ran ({free} ticks)");
        assert!(
            throttled * 2 < free,
            "throttled {throttled} ticks, free {free}"
        );
        // It runs on, free, after the release.
        assert!(used_over(Duration::from_millis(500)) > 0);
        child.kill().unwrap();
        child.wait().unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(
            out.contains("usr1"),
            "the signal was not passed on: {out:?}"
        );
    }
}
