//! Letting go of a paused guest process's memory for a handover without waiting for the
//! kernel to tear the process down (about 0.2 s per GiB of mapped memory here).
//!
//! A guest process stopped for the switchover and then sent SIGKILL never runs another
//! instruction of its own: the signal takes it from the stop straight into the kernel's
//! exit, which marks each thread `PF_EXITING` before it unmaps anything. From then on
//! nothing of that process writes the memory. (The kernel's exit writes user memory in two
//! places only, the thread id a `CLONE_CHILD_CLEARTID` thread asked to be cleared and the
//! robust futexes a thread registered: neither lies in guest memory.) What still tells
//! the world the memory is taken is the lock the guest holds on its memory file
//! (`own_memory_file`), which the exit drops only after the unmap. So the sender takes
//! copies of the guest's descriptors of that file while it is stopped
//! ([`MemoryDescriptors::take`]) and, once every thread is exiting
//! ([`wait_until_exiting`]), releases the lock through them ([`MemoryDescriptors::unlock`]):
//! the destination may lock the file and run the guest while the old process's mappings
//! are still being torn down.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};

/// The kernel's `PF_EXITING` task flag (`/proc/PID/task/TID/stat`, field 9).
const PF_EXITING: u64 = 0x4;

/// Copies of a guest process's descriptors of its memory file (the same open file
/// descriptions, and so the same locks).
#[derive(Debug)]
pub struct MemoryDescriptors(Vec<File>);

impl MemoryDescriptors {
    /// Copies every descriptor process `pid` holds of the file `memory` names (same device
    /// and inode).
    pub fn take(pid: u32, memory: &File) -> io::Result<MemoryDescriptors> {
        let want = memory.metadata()?;
        let raw = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| io::Error::other(format!("bad pid {pid}")))?;
        let pidfd = pidfd_open(raw, PidfdFlags::empty())?;
        let mut files = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
            let entry = entry?;
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            // stat follows the magic link to the open file; a descriptor closed meanwhile
            // is skipped.
            let Ok(meta) = std::fs::metadata(entry.path()) else {
                continue;
            };
            if meta.dev() != want.dev() || meta.ino() != want.ino() {
                continue;
            }
            let copy = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty())?;
            files.push(File::from(copy));
        }
        Ok(MemoryDescriptors(files))
    }

    /// How many descriptors were copied.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Releases any lock the guest held through them, and closes the copies.
    pub fn unlock(self) -> io::Result<()> {
        for f in self.0 {
            f.unlock()?;
        }
        Ok(())
    }
}

/// Waits until every thread of process `pid` is exiting (or gone, or a zombie); fails
/// after `limit`.
pub fn wait_until_exiting(pid: u32, limit: Duration) -> io::Result<()> {
    let t = Instant::now();
    while !all_exiting(pid) {
        if t.elapsed() > limit {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("guest process {pid} did not start exiting"),
            ));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

/// Waits until process `pid` is a zombie or gone (its mappings and descriptors released);
/// fails after `limit`.
pub fn wait_until_exited(pid: u32, limit: Duration) -> io::Result<()> {
    let t = Instant::now();
    let exited =
        || std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| stat_of(&s).0);
    while !exited() {
        if t.elapsed() > limit {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("guest process {pid} did not exit after SIGKILL"),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Whether no thread of `pid` can run its own code again.
fn all_exiting(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true; // gone (reaped)
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).map_or(true, |s| task_is_exiting(&s))
    })
}

/// Whether a `/proc/.../stat` line shows a zombie or a task with `PF_EXITING` set.
fn task_is_exiting(stat: &str) -> bool {
    let (dead, flags) = stat_of(stat);
    dead || flags & PF_EXITING != 0
}

/// From a `/proc/.../stat` line: whether the task is a zombie (or dead), and its flags.
fn stat_of(stat: &str) -> (bool, u64) {
    // The command name (field 2) may hold spaces and parentheses: fields after its last ')'.
    let mut rest = stat.rsplit(')').next().unwrap_or("").split_whitespace();
    let state = rest.next().unwrap_or("");
    // Fields 3 (state) .. 9 (flags): flags is the seventh after the name.
    let flags = rest.nth(5).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (state.starts_with('Z') || state.starts_with('X'), flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn stat_lines_are_read_past_the_command_name() {
        let line = |state: &str, flags: u64| {
            format!("42 (a) b) c) {state} 1 42 42 0 -1 {flags} 0 0 0 0 0 0 0 0 20 0 1 0")
        };
        assert!(!task_is_exiting(&line("S", 0x400100)));
        assert!(!task_is_exiting(&line("T", 0x400040)));
        assert!(task_is_exiting(&line("R", 0x400104)));
        assert!(task_is_exiting(&line("Z", 0)));
    }

    /// A stopped process holding a lock on a file: its descriptor is copied while it is
    /// stopped, it is killed, and the lock (which the copy keeps alive) is released through
    /// the copy: another open file description can take it.
    #[test]
    fn a_killed_processes_lock_is_released_through_a_copied_descriptor() {
        let dir = std::env::temp_dir().join(format!("vmstream-release-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        // flock(1) holds the lock on fd 9 while its shell sleeps; the shell is stopped.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec 9<>'{}'; flock -x 9; kill -STOP $$; sleep 60",
                path.display()
            ))
            .spawn()
            .unwrap();
        let pid = child.id();
        let stopped = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('T')
            })
        };
        let t = Instant::now();
        while !stopped() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the shell never stopped"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let ours = File::open(&path).unwrap();
        assert!(ours.try_lock().is_err(), "the child holds the lock");
        let copies = MemoryDescriptors::take(pid, &ours).unwrap();
        assert_eq!(copies.len(), 1);
        assert!(!all_exiting(pid), "a stopped process is not exiting");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::SIGKILL,
        )
        .unwrap();
        wait_until_exiting(pid, Duration::from_secs(10)).unwrap();
        child.wait().unwrap();
        // The copies keep the open file description, and its lock, alive.
        assert!(ours.try_lock().is_err(), "the copy holds the lock");
        copies.unlock().unwrap();
        ours.try_lock().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
