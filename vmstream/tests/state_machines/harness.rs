//! What every test here needs: a temporary directory, the source guest (ended when the test
//! ends), the settings of both sides, and [`run`], one migration with the destination in a
//! thread.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmstream::guest::file::layout::ImageWorkloadKind;
use vmstream::guest::file::source::{GuestControlError, GuestSpec};
use vmstream::guest::kvm::source::{AfterFailure, KvmSpec};
use vmstream::guest::kvm::{kvm_available, DirtyLogMode};
use vmstream::guest::migratable::{open_guest, MigratableGuest};
use vmstream::migration::config::{encoder_config, RecvConfig, SendConfig};
use vmstream::migration::dest::{listen, receive_on, temp_image_path, Received};
use vmstream::migration::error::{RecvError, SendError};
use vmstream::migration::fault::{LinkFault, StreamFault};
use vmstream::migration::source::{migrate, Outcome};
use vmstream::telemetry::notice::Notices;
use vmstream::telemetry::stats::{MigrationOutcome, MigrationStats};
use vmstream_codec::Compression;

/// Guest memory of the file-backed guests (16 MiB: every page is written, so round 0 is
/// about 16.8 MB of raw pages).
pub(crate) const SIZE: u64 = 16 << 20;

/// A stream offset inside round 0's packets.
pub(crate) const MID_ROUND_0: u64 = 300_000;

/// One migration at a time: they compete for the machine's two cores otherwise.
pub(crate) fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A temporary directory (on tmpfs when there is one), removed on drop.
pub(crate) struct Dir(PathBuf);

impl Dir {
    pub(crate) fn new(name: &str) -> Dir {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("vmstream-sm-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The file names in the directory, sorted.
    pub(crate) fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The source guest of a test; ended when the test ends, whatever happened.
pub(crate) struct Guest(pub(crate) Box<dyn MigratableGuest>);

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.0.terminate();
    }
}

impl Guest {
    /// A 16 MiB guest ([`Self::file_of`]).
    pub(crate) fn file(dir: &Dir) -> (Guest, GuestSpec) {
        Guest::file_of(dir, SIZE)
    }

    /// A `size` `random` guest process at 2000 tx/s on `dir/src.img`, run by the real
    /// binary, tracked with uffd-wp, warmed up for 200 ms.
    pub(crate) fn file_of(dir: &Dir, size: u64) -> (Guest, GuestSpec) {
        let spec = GuestSpec::Spawn {
            path: dir.path("src.img"),
            size,
            workload: ImageWorkloadKind::Random,
            rate: Some(2000),
            active: None,
            guest_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_vmstream"))),
            disks: Default::default(),
        };
        let guest = Guest(open_guest(&spec, None, &Notices::default()).expect("start the guest"));
        std::thread::sleep(Duration::from_millis(200));
        (guest, spec)
    }

    /// A 32 MiB KVM guest (one vCPU, dbsim, clear dirty log) in this process, its RAM in
    /// `dir/src.img`; `None` (and why, printed) without a usable /dev/kvm.
    pub(crate) fn kvm(dir: &Dir) -> Option<(Guest, GuestSpec)> {
        if let Err(why) = kvm_available() {
            eprintln!("skipping: {why}");
            return None;
        }
        let spec = GuestSpec::Kvm(KvmSpec {
            path: Some(dir.path("src.img")),
            size: 32 << 20,
            vcpus: 1,
            workload: vmstream::guest::kvm::KvmWorkloadKind::Dbsim,
            dirty_log: DirtyLogMode::Clear,
            after_failure: AfterFailure::Stop,
            disks: Default::default(),
        });
        let guest =
            Guest(open_guest(&spec, None, &Notices::default()).expect("start the KVM guest"));
        std::thread::sleep(Duration::from_millis(200));
        Some((guest, spec))
    }

    /// The guest runs: not paused, alive, and its transaction counter moves.
    pub(crate) fn assert_runs(&mut self) {
        let g = self.0.as_mut();
        assert!(!g.is_paused(), "the source guest is still paused");
        g.check_alive().expect("the source guest is alive");
        let (tx, t) = (g.tx_count(), Instant::now());
        while g.tx_count() <= tx {
            assert!(t.elapsed() < Duration::from_secs(10), "stuck at tx {tx}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The guest process ended (the source ends it once the destination committed).
    pub(crate) fn assert_ended(&mut self) {
        let t = Instant::now();
        loop {
            match self.0.check_alive() {
                Err(GuestControlError::Exited { .. }) => return,
                Err(e) => panic!("{e}"),
                Ok(()) => {}
            }
            assert!(t.elapsed() < Duration::from_secs(10), "still alive");
            std::thread::sleep(Duration::from_millis(150));
        }
    }
}

/// Sending settings for tests: raw pages (the stream offsets of faults land in round 0's
/// packets), two workers, no progress bar, a 10 s I/O timeout; a migration that does not
/// converge within 20 s is forced.
pub(crate) fn send_config(spec: GuestSpec) -> SendConfig {
    let mut cfg = SendConfig::new(spec, "127.0.0.1:1");
    cfg.encoder = encoder_config(Compression::None, false, 0);
    cfg.threads = 2;
    cfg.progress = false;
    cfg.io_timeout = Duration::from_secs(10);
    cfg.timeout = Some(Duration::from_secs(20));
    cfg.on_timeout = vmstream::converge::policy::OnTimeout::Force;
    cfg
}

/// Receiving settings for tests: into `dir/dst.img` on a free loopback port.
pub(crate) fn recv_config(dir: &Dir) -> RecvConfig {
    let mut cfg = RecvConfig::new("127.0.0.1:0", dir.path("dst.img"));
    cfg.io_timeout = Duration::from_secs(10);
    cfg
}

/// How both sides of a migration ended.
pub(crate) struct Run {
    pub(crate) sent: Result<Outcome, SendError>,
    pub(crate) send_stats: MigrationStats,
    pub(crate) received: Result<Received, RecvError>,
    pub(crate) recv_stats: MigrationStats,
}

/// Runs a migration of `guest` with `send` to a destination with `recv` (both with their
/// fault plans), the destination in a thread.
pub(crate) fn run(mut send: SendConfig, recv: RecvConfig, guest: &mut Guest) -> Run {
    let listening = listen(&recv).expect("listen");
    send.to = listening.local_addr().to_string();
    let dest = std::thread::spawn(move || receive_on(&recv, listening));
    let sent = migrate(&send, guest.0.as_mut());
    let received = dest.join().expect("the destination thread");
    let (sent, send_stats) = (sent.result, sent.stats);
    let (received, recv_stats) = (received.result, received.stats);
    Run {
        sent,
        send_stats,
        received,
        recv_stats,
    }
}

/// Nothing of the migration is left on the destination: no image, no temporary file.
pub(crate) fn assert_nothing_committed(dir: &Dir) {
    assert_eq!(dir.entries(), vec!["src.img".to_string()]);
}

/// The destination committed its image and left no temporary file.
pub(crate) fn assert_committed(dir: &Dir, recv_stats: &MigrationStats) {
    let dst = dir.path("dst.img");
    assert_eq!(recv_stats.outcome, MigrationOutcome::Committed);
    assert!(!temp_image_path(&dst).unwrap().exists());
    assert_eq!(
        dir.entries(),
        vec!["dst.img".to_string(), "src.img".to_string()]
    );
}

/// A stream fault on the source's channel 0.
pub(crate) fn link_fault(at: u64, fault: StreamFault) -> Vec<LinkFault> {
    vec![LinkFault {
        channel: 0,
        at,
        fault,
    }]
}

/// Sets `flag` after `delay`, from another thread.
pub(crate) fn set_after(flag: &Arc<AtomicBool>, delay: Duration) {
    let flag = flag.clone();
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        flag.store(true, Ordering::Relaxed);
    });
}

/// Sending settings at `bandwidth` bytes/s.
pub(crate) fn slow_send_config(spec: GuestSpec, bandwidth: u64) -> SendConfig {
    let mut cfg = send_config(spec);
    cfg.max_bandwidth = Some(bandwidth);
    cfg
}
