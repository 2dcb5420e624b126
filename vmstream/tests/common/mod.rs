//! Helpers shared by the guest integration tests: spawn `vmstream guest run` children.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use vmstream::guest::file::ReadyLine;

/// A running guest child process; killed on drop.
pub struct Guest {
    pub child: Child,
    pub ready: ReadyLine,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Guest {
    /// Spawn `vmstream guest run ARGS...` and wait for its ready line.
    pub fn spawn(args: &[&str]) -> Guest {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmstream"))
            .args(["guest", "run"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn vmstream guest");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let ready = ReadyLine::parse(&line).unwrap_or_else(|| panic!("no ready line: {line:?}"));
        Guest {
            child,
            ready,
            stdin,
            stdout,
        }
    }

    /// Send one control command and return the reply line.
    pub fn command(&mut self, cmd: &str) -> String {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// The pid as a nix Pid.
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// Read the rest of stdout after the guest exits.
    pub fn wait_output(mut self) -> (std::process::ExitStatus, String) {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest).unwrap();
        (status, rest)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh path under /dev/shm (tmpfs), removed on drop.
pub struct TmpFile(pub PathBuf);

impl TmpFile {
    pub fn new(name: &str) -> TmpFile {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = dir.join(format!("vmstream-test-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        TmpFile(p)
    }

    pub fn str(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
