//! The QEMU guest of the end-to-end tests: builds it (`tests/qemu-guest/build.sh`: Debian's
//! kernel, busybox and vmstream's dbsim in an initramfs), boots it under TCG with its RAM in
//! a shared file, reads its transaction counter and verify lines from the serial console,
//! and asks QMP (vmstream's own client) for its status.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmstream::guest::qemu::Qmp;

use crate::vmstream_bin;

/// The guest's RAM: 512 MiB less 8 KiB (`-m 524280K`: QEMU 7.2's TCG migration corrupts
/// `-m 512M` guests, fixed in 9.0).
pub const RAM: &str = "524280K";

/// How long a TCG boot may take on a busy 2-core machine.
pub const BOOT_WAIT: Duration = Duration::from_secs(600);

/// The kernel and initramfs to boot.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Debian's vmlinuz.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// Builds the guest (once per target dir; the script is idempotent), or says why it cannot
/// (no QEMU, no busybox, no kernel package): the caller skips its test.
pub fn guest_image() -> Result<GuestImage, String> {
    static IMAGE: std::sync::OnceLock<Result<GuestImage, String>> = std::sync::OnceLock::new();
    IMAGE.get_or_init(build_guest_image).clone()
}

fn build_guest_image() -> Result<GuestImage, String> {
    let qemu_found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !qemu_found {
        return Err("qemu-system-x86_64 not found (.ci/run installs qemu-system-x86)".into());
    }
    let bin = vmstream_bin();
    let out = bin.parent().expect("target dir").join("qemu-guest");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu-guest/build.sh");
    let built = Command::new("bash")
        .arg(&script)
        .arg(&bin)
        .arg(&out)
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    // Exit 3: a prerequisite is missing (skip); anything else is a broken script.
    if built.status.code() == Some(3) {
        return Err(String::from_utf8_lossy(&built.stderr).trim().to_string());
    }
    if !built.status.success() {
        panic!(
            "{} failed ({}): {}",
            script.display(),
            built.status,
            String::from_utf8_lossy(&built.stderr).trim()
        );
    }
    Ok(GuestImage {
        kernel: out.join("vmlinuz"),
        initrd: out.join("initrd.cpio.gz"),
    })
}

/// The QEMU command line of the guest, its RAM at `mem_path` (may be `{memory}`), its
/// serial console into `serial`, its pid into `pidfile`; no QMP (the caller adds it).
pub fn qemu_command(image: &GuestImage, mem_path: &str, serial: &Path, pidfile: &Path) -> String {
    format!(
        "qemu-system-x86_64 -name guest,debug-threads=on \
         -machine pc,accel=tcg,memory-backend=ram0 -m {RAM} \
         -object memory-backend-file,id=ram0,size={RAM},mem-path={mem_path},share=on \
         -kernel {} -initrd {} \
         -append 'console=ttyS0 quiet vmstream.size=32M vmstream.rate=200' \
         -nographic -nodefaults -vga none -no-reboot \
         -serial file:{} -pidfile {}",
        image.kernel.display(),
        image.initrd.display(),
        serial.display(),
        pidfile.display()
    )
}

/// Each NUMA node's RAM in the two-node guest ([`qemu_numa_command`]): 128 MiB less 4 KiB.
pub const NODE_RAM: &str = "131068K";

/// The guest's command line with two NUMA nodes, each its own RAM backend (`m0`, `m1`)
/// whose file is `mem_paths[i]` (may be `{memory0}`, `{memory1}`); otherwise as
/// [`qemu_command`].
pub fn qemu_numa_command(
    image: &GuestImage,
    mem_paths: [&str; 2],
    serial: &Path,
    pidfile: &Path,
) -> String {
    let one = qemu_command(image, "UNUSED", serial, pidfile);
    let backends = format!(
        "-machine pc,accel=tcg -m 262136K \
         -object memory-backend-file,id=m0,size={NODE_RAM},mem-path={},share=on \
         -object memory-backend-file,id=m1,size={NODE_RAM},mem-path={},share=on \
         -numa node,nodeid=0,memdev=m0 -numa node,nodeid=1,memdev=m1",
        mem_paths[0], mem_paths[1]
    );
    let (head, tail) = one.split_once("-kernel").expect("the guest's command line");
    let name = head.split("-machine").next().expect("its name");
    format!("{name}{backends} -kernel{tail}")
}

/// A QEMU process (the source VM, or a destination's found by its pid file), killed on drop.
pub struct QemuVm {
    /// Its QMP socket.
    pub qmp: PathBuf,
    /// Its serial console file.
    pub serial: PathBuf,
    /// Its RAM file.
    pub ram: PathBuf,
    child: Option<Child>,
    pidfile: PathBuf,
}

impl QemuVm {
    /// Boots the guest in `dir` (`src.ram`, `src.serial`, `src.qmp`) and waits until its
    /// workload has committed transactions.
    pub fn boot(image: &GuestImage, dir: &Path) -> QemuVm {
        let ram = dir.join("src.ram");
        let command = |serial: &Path, pidfile: &Path| {
            qemu_command(image, ram.to_str().unwrap(), serial, pidfile)
        };
        QemuVm::boot_with(dir, ram.clone(), command)
    }

    /// Boots the two-node guest ([`qemu_numa_command`]) in `dir`, its RAM in `src.ram0`
    /// (`ram`) and `src.ram1`, and waits until its workload has committed transactions.
    pub fn boot_numa(image: &GuestImage, dir: &Path) -> QemuVm {
        let rams = [dir.join("src.ram0"), dir.join("src.ram1")];
        let command = |serial: &Path, pidfile: &Path| {
            let paths = [rams[0].to_str().unwrap(), rams[1].to_str().unwrap()];
            qemu_numa_command(image, paths, serial, pidfile)
        };
        QemuVm::boot_with(dir, rams[0].clone(), command)
    }

    /// Boots the guest `command` gives (given its serial file and pid file) in `dir`, its
    /// RAM (first file) `ram`, and waits until its workload has committed transactions.
    pub fn boot_with(dir: &Path, ram: PathBuf, command: impl Fn(&Path, &Path) -> String) -> QemuVm {
        let serial = dir.join("src.serial");
        let qmp = dir.join("src.qmp");
        let pidfile = dir.join("src.pid");
        let cmd = format!(
            "exec {} -qmp unix:{},server=on,wait=off",
            command(&serial, &pidfile),
            qmp.display()
        );
        let child = Command::new("sh")
            .args(["-c", &cmd])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting qemu-system-x86_64");
        let vm = QemuVm {
            qmp,
            serial,
            ram,
            child: Some(child),
            pidfile,
        };
        vm.wait_tx_above(0, BOOT_WAIT);
        vm
    }

    /// A QEMU another process started, known by its files; killed on drop (by its pid file).
    pub fn adopt(qmp: PathBuf, serial: PathBuf, ram: PathBuf, pidfile: PathBuf) -> QemuVm {
        QemuVm {
            qmp,
            serial,
            ram,
            child: None,
            pidfile,
        }
    }

    /// `query-status`'s status.
    pub fn status(&self) -> String {
        let mut q = Qmp::connect(&self.qmp, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("QMP {}: {e}", self.qmp.display()));
        q.status().expect("query-status")
    }

    /// Runs a QMP command.
    pub fn execute(&self, command: &str) {
        let mut q = Qmp::connect(&self.qmp, Duration::from_secs(30)).expect("QMP");
        q.execute(command, serde_json::Value::Null)
            .unwrap_or_else(|e| panic!("QMP {command}: {e}"));
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// The last transaction count the guest printed (`done tx=N`).
    pub fn last_tx(&self) -> Option<u64> {
        self.console()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("done tx="))
            .filter_map(|n| n.trim().parse().ok())
            .next_back()
    }

    /// Waits (at most `within`) until the console shows `needle`.
    pub fn wait_console(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.console().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the console within {within:?}: {}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits (at most `within`) until the guest printed a count above `than`; returns it.
    pub fn wait_tx_above(&self, than: u64, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(tx) = self.last_tx().filter(|&tx| tx > than) {
                return tx;
            }
            assert!(
                Instant::now() < deadline,
                "the guest printed no count above {than} within {within:?}; console: {}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        } else if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
    }
}
