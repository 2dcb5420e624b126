//! Throttling a QEMU VM's vCPU threads alone ([`VcpuThrottling`]), by the mechanism
//! [`VcpuThrottleMode`] picks: [`VcpuThrottle`] moves them into a cpu cgroup of their own whose
//! CFS quota is the share of every 10 ms period they may run (cgroup v1's `cpu` controller,
//! which places single threads), [`PtraceThrottle`] stops and continues each thread itself
//! where no such cgroup can be used. Either way QEMU's main loop, monitor and I/O threads
//! keep their speed (a SIGSTOP would stop the whole process: stop signals act on every
//! thread).

use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ptrace_throttle::PtraceThrottle;
use super::qmp::{Qmp, QmpError};

/// How a QEMU VM's vCPU threads are throttled (`send --vcpu-throttle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VcpuThrottleMode {
    /// A cgroup v1 cpu cgroup where one can be used, else per-thread stops.
    #[default]
    Auto,
    /// A cgroup v1 cpu cgroup only (none usable: the guest runs unthrottled).
    Cgroup,
    /// Per-thread stops (ptrace) only.
    Ptrace,
}

impl std::str::FromStr for VcpuThrottleMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(VcpuThrottleMode::Auto),
            "cgroup" => Ok(VcpuThrottleMode::Cgroup),
            "ptrace" => Ok(VcpuThrottleMode::Ptrace),
            _ => Err(format!("{s:?}: expected auto, cgroup or ptrace")),
        }
    }
}

/// The vCPU threads held by one mechanism; released (running, in their own cgroup,
/// untraced) when dropped.
#[derive(Debug)]
pub enum VcpuThrottling {
    /// In a cpu cgroup of their own.
    Cgroup(VcpuThrottle),
    /// Traced and stopped in turn by a thread of ours.
    Ptrace(PtraceThrottle),
}

impl VcpuThrottling {
    /// Holds `tids` by `mode`'s mechanism (`Auto`: the cgroup, else ptrace), unthrottled.
    pub fn new(mode: VcpuThrottleMode, tids: &[u32]) -> io::Result<VcpuThrottling> {
        match mode {
            VcpuThrottleMode::Cgroup => VcpuThrottle::new(tids).map(VcpuThrottling::Cgroup),
            VcpuThrottleMode::Ptrace => PtraceThrottle::new(tids).map(VcpuThrottling::Ptrace),
            VcpuThrottleMode::Auto => {
                VcpuThrottle::new(tids)
                    .map(VcpuThrottling::Cgroup)
                    .or_else(|cgroup| {
                        PtraceThrottle::new(tids)
                            .map(VcpuThrottling::Ptrace)
                            .map_err(|ptrace| io::Error::other(format!("{cgroup}; {ptrace}")))
                    })
            }
        }
    }

    /// The mechanism, for the operator: `cgroup` or `ptrace`.
    pub fn mechanism(&self) -> &'static str {
        match self {
            VcpuThrottling::Cgroup(_) => "cgroup",
            VcpuThrottling::Ptrace(_) => "ptrace",
        }
    }

    /// Lets the threads run `1 - fraction` of every period each (0: no limit).
    pub fn set(&mut self, fraction: f64) -> io::Result<()> {
        match self {
            VcpuThrottling::Cgroup(c) => c.set(fraction),
            VcpuThrottling::Ptrace(p) => {
                p.set(fraction);
                Ok(())
            }
        }
    }
}

/// The CFS period, µs: the throttle's granularity (as the other guests' 10 ms duty cycle).
const PERIOD_US: u64 = 10_000;

/// Where cgroup v1's cpu controller may be mounted.
const CPU_MOUNTS: [&str; 2] = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"];

/// The VM's vCPU thread ids (`query-cpus-fast`'s `thread-id`).
pub fn vcpu_threads(qmp: &mut Qmp) -> Result<Vec<u32>, QmpError> {
    let cpus = qmp.execute("query-cpus-fast", Value::Null)?;
    let bad = || QmpError::Reply {
        command: "query-cpus-fast".into(),
        reply: cpus.to_string(),
    };
    cpus.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|c| {
            c.get("thread-id")
                .and_then(Value::as_u64)
                .map(|t| t as u32)
                .ok_or_else(bad)
        })
        .collect()
}

/// vCPU threads held in a cpu cgroup of their own; put back where they were on drop.
#[derive(Debug)]
pub struct VcpuThrottle {
    /// The cgroup made for them.
    dir: PathBuf,
    /// Each thread and the cgroup it came from.
    homes: Vec<(u32, PathBuf)>,
}

/// The cpu controller's mount point (cgroup v1).
fn cpu_mount() -> io::Result<&'static Path> {
    CPU_MOUNTS
        .iter()
        .map(Path::new)
        .find(|m| m.join("cpu.cfs_quota_us").exists())
        .ok_or_else(|| {
            io::Error::other(
                "no cgroup v1 cpu controller (/sys/fs/cgroup/cpu): vCPU-only throttling needs one",
            )
        })
}

/// Thread `tid`'s cgroup of the cpu controller mounted at `mount`.
fn home_of(mount: &Path, tid: u32) -> io::Result<PathBuf> {
    let groups = std::fs::read_to_string(format!("/proc/{tid}/cgroup"))?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            controllers
                .split(',')
                .any(|c| c == "cpu")
                .then(|| mount.join(path.trim_start_matches('/')))
        })
        .next()
        .ok_or_else(|| io::Error::other(format!("thread {tid} is in no cpu cgroup")))
}

impl VcpuThrottle {
    /// Moves `tids` into a new cpu cgroup named after the first, unthrottled.
    pub fn new(tids: &[u32]) -> io::Result<VcpuThrottle> {
        let mount = cpu_mount()?;
        let first = tids
            .first()
            .ok_or_else(|| io::Error::other("the VM has no vCPU threads"))?;
        let dir = mount.join(format!("vmstream-vcpus-{first}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let mut throttle = VcpuThrottle {
            dir,
            homes: Vec::new(),
        };
        std::fs::write(
            throttle.dir.join("cpu.cfs_period_us"),
            PERIOD_US.to_string(),
        )?;
        for &tid in tids {
            let home = home_of(mount, tid)?;
            std::fs::write(throttle.dir.join("tasks"), tid.to_string())?;
            throttle.homes.push((tid, home));
        }
        Ok(throttle)
    }

    /// The cgroup the threads are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Lets the threads run `1 - fraction` of every period each (0: no limit).
    pub fn set(&mut self, fraction: f64) -> io::Result<()> {
        let quota = if fraction <= 0.0 {
            "-1".to_string()
        } else {
            let share = (1.0 - fraction.min(0.99)) * (PERIOD_US * self.homes.len() as u64) as f64;
            // CFS refuses quotas under 1 ms.
            (share as u64).max(1_000).to_string()
        };
        std::fs::write(self.dir.join("cpu.cfs_quota_us"), quota)
    }
}

impl Drop for VcpuThrottle {
    fn drop(&mut self) {
        let _ = self.set(0.0);
        for (tid, home) in &self.homes {
            let _ = std::fs::write(home.join("tasks"), tid.to_string());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mechanisms_are_named_as_the_flag_spells_them() {
        assert_eq!("auto".parse(), Ok(VcpuThrottleMode::Auto));
        assert_eq!("cgroup".parse(), Ok(VcpuThrottleMode::Cgroup));
        assert_eq!("ptrace".parse(), Ok(VcpuThrottleMode::Ptrace));
        let err = "cgroup2".parse::<VcpuThrottleMode>().unwrap_err();
        assert!(err.contains("expected auto, cgroup or ptrace"), "{err}");
    }

    /// `ptrace` holds the threads by per-thread stops, whatever cgroups the host has.
    #[test]
    fn the_ptrace_mechanism_is_per_thread_stops() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let t = VcpuThrottling::new(VcpuThrottleMode::Ptrace, &[child.id()]).unwrap();
        assert_eq!(t.mechanism(), "ptrace");
        drop(t);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
