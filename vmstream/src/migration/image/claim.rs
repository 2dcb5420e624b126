//! Claiming a target for one receive ([`Reservation`]): the receiver's temporary image is
//! created empty and `flock`ed beside the target before it listens, a second receive into
//! the same target is refused, what killed receivers left is removed, and a target a
//! running guest holds is refused. Every name is looked up relative to the directory's
//! handle ([`TargetDir`]) without following links.

use std::ffi::{OsStr, OsString};
use std::fs::{File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::dir::TargetDir;
use super::{check_target, parent_dir, temp_name, temp_prefix, ImageError};
use crate::telemetry::notice::Notices;

/// Whether process `pid` exists (in our pid namespace).
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `try_lock` retried until `within` passed (a claim that looks at other receivers' files
/// holds each of their locks for an instant). `Ok(false)`: still locked by someone else.
fn lock_within(file: &File, within: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + within;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(true),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(TryLockError::WouldBlock) => return Ok(false),
            Err(TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// Refuses `name` in `dir` while a running guest holds its lock (as every guest holds its
/// memory file's, [`crate::memory::open_owned`]): replacing it would pull the memory from
/// under that guest. A link, a missing file or anything not a regular file holds no lock
/// (the commit replaces the name itself). Returns the file, locked, for the caller to hold
/// while it replaces the name.
pub(super) fn refuse_held(
    dir: &TargetDir,
    name: &OsStr,
    target: &Path,
) -> Result<Option<File>, ImageError> {
    let file = match dir.open_regular(name) {
        Ok(Some(file)) => file,
        // Not ours to read (the rename needs only the directory): no lock to look at.
        Ok(None) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Ok(None),
        Err(source) => {
            return Err(ImageError::Io {
                what: format!("open {}", target.display()),
                source,
            })
        }
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Err(ImageError::InUse(target.to_path_buf())),
        // Locks unsupported here: nothing to learn from them.
        Err(TryLockError::Error(_)) => Ok(None),
    }
}

/// A target claimed for one receive: its temporary file exists (empty until the handshake
/// sizes it, [`super::PendingImage::create`]) and this process holds an exclusive `flock`
/// on it. Dropped unused, it removes the file.
pub struct Reservation {
    pub(super) target: PathBuf,
    pub(super) dir: TargetDir,
    /// The target's name in `dir`.
    pub(super) name: OsString,
    /// The temporary file's name in `dir`.
    pub(super) tmp_name: OsString,
    /// Its path, for messages.
    pub(super) tmp: PathBuf,
    /// The temporary file, open (and locked) while it is ours; `None` once committed.
    pub(super) file: Option<File>,
    removed: Vec<PathBuf>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("target", &self.target)
            .field("tmp", &self.tmp)
            .finish()
    }
}

impl Reservation {
    /// Claims `target` for a receive: checks it ([`check_target`]), refuses it while a
    /// running guest holds it ([`ImageError::InUse`]), creates and locks this receiver's
    /// temporary file beside it, then looks at the other receivers' temporary files for
    /// the same target: one that is locked belongs to a receiver that runs
    /// ([`ImageError::Busy`]); one that is not, of a pid that no longer runs, was left by a
    /// killed receiver and is removed ([`Reservation::removed`]). Only regular files are
    /// looked at or removed, never what a link points to.
    ///
    /// Each receiver locks its own file before it looks at the others', so of two that
    /// claim at the same time the later look always sees the earlier lock: they cannot
    /// both proceed. They also take turns on a lock of the directory while they claim, so
    /// that one of them wins rather than both refusing.
    ///
    /// Where file locks are unsupported the claim goes on (others fall back on our pid),
    /// with a warning to `notices`.
    pub fn claim(target: &Path, notices: &Notices) -> Result<Reservation, ImageError> {
        check_target(target)?;
        let prefix = temp_prefix(target)?;
        let name = target
            .file_name()
            .ok_or_else(|| ImageError::BadPath(target.to_path_buf()))?
            .to_os_string();
        let dir_path = parent_dir(target);
        let dir = TargetDir::open(&dir_path).map_err(|source| ImageError::Io {
            what: format!("open directory {}", dir_path.display()),
            source,
        })?;
        drop(refuse_held(&dir, &name, target)?);
        let tmp_name = temp_name(target)?;
        let _turn = DirTurn::take(&dir);
        let mut claim = Reservation {
            target: target.to_path_buf(),
            tmp: dir.shown(&tmp_name),
            dir,
            name,
            tmp_name,
            file: None,
            removed: Vec::new(),
        };
        claim.file = Some(claim.create_locked(notices)?);
        let names = claim.dir.list().map_err(|source| ImageError::Io {
            what: format!("read directory {}", claim.dir.path().display()),
            source,
        })?;
        let ours = std::process::id();
        for other in names {
            let Some(pid) = other
                .as_encoded_bytes()
                .strip_prefix(prefix.as_encoded_bytes())
                .and_then(|p| std::str::from_utf8(p).ok())
                .and_then(|p| p.parse::<u32>().ok())
                .filter(|&p| p != ours)
            else {
                continue;
            };
            claim.look_at(&other, pid)?;
        }
        Ok(claim)
    }

    /// Another receiver's temporary file `other` (of `pid`): busy if locked, removed if
    /// its receiver is gone. A link, a FIFO or anything else not a regular file is left
    /// alone (and never opened through).
    fn look_at(&mut self, other: &OsStr, pid: u32) -> Result<(), ImageError> {
        let busy = || ImageError::Busy {
            pid,
            target: self.target.clone(),
            temp: self.dir.shown(other),
        };
        let file = match self.dir.open_regular(other) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            // Not ours to look at (another user's?): trust the pid.
            Err(_) if alive(pid) => return Err(busy()),
            Err(_) => return Ok(()),
        };
        // Retried for a moment: a lock held only that long is not a receiver's (another
        // claim looking at the file, a child forked meanwhile that still shares the
        // handle of a receiver that just closed it).
        match lock_within(&file, Duration::from_millis(100)) {
            // Locked: its receiver runs (in another pid namespace if not in our /proc).
            Ok(false) => Err(busy()),
            // Locks unsupported here: trust the pid.
            Err(_) if alive(pid) => Err(busy()),
            Err(_) => Ok(()),
            // Unlocked but the pid runs: another program that reused the pid. Left alone.
            Ok(true) if alive(pid) => Ok(()),
            Ok(true) => {
                // Removed while we hold its lock, and only if the name is still that file.
                if self.dir.names(other, &file).unwrap_or(false) && self.dir.remove(other).is_ok() {
                    self.removed.push(self.dir.shown(other));
                }
                Ok(())
            }
        }
    }

    /// Creates this receiver's temporary file and locks it. A file of that name already
    /// there is ours by name: locked, it is another receive in this process (busy);
    /// otherwise a process that had our pid left it, and it is replaced. Anything else of
    /// that name (a link, a FIFO) is removed: the name is ours.
    fn create_locked(&self, notices: &Notices) -> Result<File, ImageError> {
        let create_err = |source| ImageError::Io {
            what: format!("create {}", self.tmp.display()),
            source,
        };
        for _ in 0..2 {
            match self.dir.create_new(&self.tmp_name) {
                Ok(file) => {
                    match lock_within(&file, Duration::from_secs(1)) {
                        Ok(true) => {}
                        Ok(false) => {
                            if self.dir.names(&self.tmp_name, &file).unwrap_or(false) {
                                let _ = self.dir.remove(&self.tmp_name);
                            }
                            return Err(create_err(io::Error::new(
                                io::ErrorKind::WouldBlock,
                                "another process keeps it locked",
                            )));
                        }
                        // Locks unsupported here: others fall back on our pid.
                        Err(e) => {
                            notices.warning(format!("could not lock {}: {e}", self.tmp.display()))
                        }
                    }
                    return Ok(file);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let held = self.dir.open_regular(&self.tmp_name).is_ok_and(|f| {
                        f.is_some_and(|f| matches!(f.try_lock(), Err(TryLockError::WouldBlock)))
                    });
                    if held {
                        return Err(ImageError::Busy {
                            pid: std::process::id(),
                            target: self.target.clone(),
                            temp: self.tmp.clone(),
                        });
                    }
                    self.dir.remove(&self.tmp_name).map_err(create_err)?;
                }
                Err(e) => return Err(create_err(e)),
            }
        }
        Err(create_err(io::Error::from(io::ErrorKind::AlreadyExists)))
    }

    /// The target this reservation is for.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary file.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Temporary files of receivers that no longer run, removed by the claim.
    pub fn removed(&self) -> &[PathBuf] {
        &self.removed
    }

    /// Another handle of the temporary file (the same open file description: it shares
    /// the lock).
    pub(super) fn handle(&self) -> Result<File, ImageError> {
        self.file
            .as_ref()
            .expect("uncommitted")
            .try_clone()
            .map_err(|source| ImageError::Io {
                what: format!("dup {}", self.tmp.display()),
                source,
            })
    }

    /// Whether the temporary name still is the file this reservation holds (not replaced,
    /// by a link say): [`ImageError::Replaced`] otherwise.
    pub(super) fn check_temp_is_ours(&self) -> Result<(), ImageError> {
        let file = self.file.as_ref().expect("uncommitted");
        match self.dir.names(&self.tmp_name, file) {
            Ok(true) => Ok(()),
            Ok(false) => Err(ImageError::Replaced(self.tmp.clone())),
            Err(source) => Err(ImageError::Io {
                what: format!("stat {}", self.tmp.display()),
                source,
            }),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // Removed while still locked, so no other claim takes it for a killed receiver's;
        // only if the name still is our file (a link put in its place stays).
        if let Some(file) = &self.file {
            if self.dir.names(&self.tmp_name, file).unwrap_or(false) {
                let _ = self.dir.remove(&self.tmp_name);
            }
        }
    }
}

/// A lock on a directory, held while a receiver claims a target in it (best effort: where
/// the directory cannot be opened or locked within a moment, the claim goes on without it,
/// as safely, see [`Reservation::claim`]). Released on drop.
struct DirTurn {
    _lock: Option<File>,
}

impl DirTurn {
    fn take(dir: &TargetDir) -> DirTurn {
        let lock = dir
            .reopen()
            .ok()
            .filter(|d| lock_within(d, Duration::from_secs(2)).unwrap_or(false));
        DirTurn { _lock: lock }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::image::tests::{dir, entries};

    /// What a killed receiver left is removed; the file of a live pid that holds no lock
    /// (another program reusing the pid) is left alone.
    #[test]
    fn a_claim_removes_what_receivers_that_no_longer_run_left() {
        let d = dir("stale");
        let target = d.join("guest.img");
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        let stale = d.join(format!(".guest.img.vmstream-recv-{dead}"));
        let running = d.join(".guest.img.vmstream-recv-1"); // init runs
        let other = d.join(format!(".other.img.vmstream-recv-{dead}"));
        for p in [&stale, &running, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        let claim = Reservation::claim(&target, &Notices::silent()).unwrap();
        assert_eq!(claim.removed(), std::slice::from_ref(&stale));
        assert!(!stale.exists());
        assert!(running.exists() && other.exists());
        assert!(claim.temp_path().exists());
        drop(claim);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A temporary file whose lock is held belongs to a receiver that runs, whatever its
    /// pid (one in another pid namespace is not in our /proc): the claim refuses, names
    /// it, and leaves the directory as it was.
    #[test]
    fn a_locked_temporary_file_of_the_same_target_is_refused() {
        let d = dir("busy");
        let target = d.join("guest.img");
        let theirs = d.join(".guest.img.vmstream-recv-4000000");
        std::fs::write(&theirs, b"").unwrap();
        let lock = File::open(&theirs).unwrap();
        lock.try_lock().unwrap();
        let before = entries(&d);
        match Reservation::claim(&target, &Notices::silent()) {
            Err(e @ ImageError::Busy { pid: 4000000, .. }) => {
                let m = e.to_string();
                assert!(
                    m.contains("pid 4000000") && m.contains(".guest.img.vmstream-recv-4000000"),
                    "{m}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(entries(&d), before);
        // Another target in the same directory is not affected.
        drop(Reservation::claim(&d.join("other.img"), &Notices::silent()).unwrap());
        // Unlocked (its receiver died), it is removed and the claim succeeds.
        drop(lock);
        let claim = Reservation::claim(&target, &Notices::silent()).unwrap();
        assert!(!theirs.exists());
        drop(claim);
        assert!(entries(&d).is_empty(), "{:?}", entries(&d));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Two receives into one target in the same process (library callers): the second
    /// finds the first's lock.
    #[test]
    fn a_second_claim_in_this_process_is_refused() {
        let d = dir("twice");
        let target = d.join("guest.img");
        let first = Reservation::claim(&target, &Notices::silent()).unwrap();
        assert!(matches!(
            Reservation::claim(&target, &Notices::silent()),
            Err(ImageError::Busy { pid, .. }) if pid == std::process::id()
        ));
        assert!(
            first.temp_path().exists(),
            "the refused claim removed the first's file"
        );
        drop(first);
        assert!(entries(&d).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Claims racing from many threads (each with its own file descriptions): never two
    /// hold the target at the same time, and one of them gets it.
    #[test]
    fn racing_claims_never_hold_the_target_together() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let d = dir("race");
        let target = d.join("guest.img");
        for _ in 0..20 {
            let (held, won) = (AtomicUsize::new(0), AtomicUsize::new(0));
            let barrier = std::sync::Barrier::new(4);
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        barrier.wait();
                        if let Ok(c) = Reservation::claim(&target, &Notices::silent()) {
                            assert_eq!(held.fetch_add(1, Ordering::SeqCst), 0);
                            won.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(5));
                            held.fetch_sub(1, Ordering::SeqCst);
                            drop(c);
                        }
                    });
                }
            });
            assert!(won.into_inner() >= 1);
        }
        assert!(entries(&d).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A dead receiver's pid, for names of stale temporary files.
    fn dead_pid() -> u32 {
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let pid = gone.id();
        gone.wait().unwrap();
        pid
    }

    /// Claims `target` in a thread: a claim that blocks fails the test instead of hanging
    /// it.
    fn claim_within_10s(target: &Path) -> Result<Reservation, ImageError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = target.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(Reservation::claim(&t, &Notices::silent()));
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the claim still runs after 10 s")
    }

    /// Names of stale temporary images that are not regular files are never opened
    /// through nor removed: a FIFO (opening it would block the claim for good), a link to
    /// a FIFO, a link to a locked file (the claim would think a receiver runs) and a link
    /// to a file of someone else's that a claim would otherwise remove the link of.
    #[test]
    fn what_is_not_a_regular_file_is_never_taken_for_a_stale_image() {
        let d = dir("stale-kinds");
        let target = d.join("guest.img");
        let pid = dead_pid();
        let name = |n: u32| d.join(format!(".guest.img.vmstream-recv-{n}"));
        let fifo = name(pid);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        std::os::unix::fs::symlink(&fifo, name(pid + 1_000_000)).unwrap();
        let locked = d.join("locked");
        std::fs::write(&locked, b"held").unwrap();
        let held = File::open(&locked).unwrap();
        held.try_lock().unwrap();
        std::os::unix::fs::symlink(&locked, name(pid + 2_000_000)).unwrap();
        let before = entries(&d);
        let claim = claim_within_10s(&target).unwrap();
        assert!(claim.removed().is_empty(), "{:?}", claim.removed());
        drop(claim);
        assert_eq!(entries(&d), before);
        assert_eq!(std::fs::read(&locked).unwrap(), b"held");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A stale image whose receiver was killed (a regular file, unlocked, its pid gone) is
    /// removed by the next claim; one whose receiver runs (locked) is not.
    #[test]
    fn a_killed_receivers_image_is_removed_and_a_live_ones_is_not() {
        let d = dir("stale-live");
        let target = d.join("guest.img");
        let stale = d.join(format!(".guest.img.vmstream-recv-{}", dead_pid()));
        std::fs::write(&stale, vec![1u8; 8192]).unwrap();
        let claim = claim_within_10s(&target).unwrap();
        assert_eq!(claim.removed(), std::slice::from_ref(&stale));
        assert_eq!(entries(&d).len(), 1, "{:?}", entries(&d));
        // That claim is a live receiver to the next one: refused, its file kept.
        match claim_within_10s(&target) {
            Err(ImageError::Busy { temp, .. }) => assert_eq!(temp, claim.temp_path()),
            other => panic!("{other:?}"),
        }
        assert!(claim.temp_path().exists());
        drop(claim);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A target that a running guest holds (its lock, as every guest takes it) is refused
    /// before anything is created, and the guest's file is left as it was.
    #[test]
    fn a_target_a_running_guest_holds_is_refused() {
        let d = dir("in-use");
        let target = d.join("guest.img");
        std::fs::write(&target, b"guest memory").unwrap();
        let guest = crate::memory::open_owned(&target, false).unwrap();
        match Reservation::claim(&target, &Notices::silent()) {
            Err(e @ ImageError::InUse(_)) => {
                assert!(
                    e.to_string().contains("memory file of a running guest"),
                    "{e}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(entries(&d), ["guest.img"]);
        assert_eq!(std::fs::read(&target).unwrap(), b"guest memory");
        // Once the guest is gone, the target can be claimed.
        drop(guest);
        drop(Reservation::claim(&target, &Notices::silent()).unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
