//! The destination image: guest memory is received into a temporary file next to the
//! target path and only renamed over it once the digest matched ([`PendingImage::commit`]).
//! Dropping an uncommitted image removes the temporary file, so a failed migration leaves
//! the target path as it was.
//!
//! A receive claims its target before it listens ([`Reservation::claim`]): it creates its
//! temporary file, empty, and holds an exclusive `flock` on it until the receive ends. A
//! second receive into the same target finds that lock and refuses to start, so two
//! receives cannot both commit into one path (the later rename would silently replace the
//! first guest's memory). What a killed receiver left behind (its file, no longer locked)
//! the next claim removes.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::memory::{GuestMemory, MemoryError};
use crate::telemetry::notice::Notices;

/// Why the image could not be prepared or committed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Creating or mapping the temporary file failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The target path has no usable parent directory or file name.
    #[error("bad destination path {0}")]
    BadPath(PathBuf),
    /// The target path cannot take an image (a directory, a device, no such directory).
    #[error("{path}: {why}")]
    Unusable {
        /// The target path.
        path: PathBuf,
        /// Why, in words.
        why: String,
    },
    /// Another receiver is receiving into the same target.
    #[error(
        "another vmstream recv (pid {pid}) is receiving into {target} (it holds the lock of \
         its temporary image {temp}); a second receive into the same file would replace one \
         guest's memory with the other's"
    )]
    Busy {
        /// The other receiver's pid (from its temporary file's name).
        pid: u32,
        /// The target both would write.
        target: PathBuf,
        /// The other receiver's temporary file.
        temp: PathBuf,
    },
    /// Syncing or renaming failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

/// The temporary path used while receiving into `target`.
pub fn temp_path(target: &Path) -> Result<PathBuf, ImageError> {
    let mut tmp_name = temp_prefix(target)?;
    tmp_name.push(std::process::id().to_string());
    Ok(target.with_file_name(tmp_name))
}

/// The name of a temporary image for `target` without the receiver's pid.
fn temp_prefix(target: &Path) -> Result<std::ffi::OsString, ImageError> {
    let name = target
        .file_name()
        .ok_or_else(|| ImageError::BadPath(target.to_path_buf()))?;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".vmstream-recv-");
    Ok(prefix)
}

/// The directory `target` is (to be) in.
fn parent_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// What kind of file `t` is, for messages.
fn kind_name(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Checks that `target` can take a committed image, without creating anything: its
/// directory exists, and the path itself is absent or a regular file (a symbolic link is
/// followed for the check; the commit replaces the link). A directory, a device or a
/// missing directory would otherwise fail only at the commit, after the whole migration.
pub fn check_target(target: &Path) -> Result<(), ImageError> {
    let unusable = |why: String| ImageError::Unusable {
        path: target.to_path_buf(),
        why,
    };
    if target.as_os_str().is_empty() {
        return Err(unusable("an empty path".into()));
    }
    match std::fs::metadata(target) {
        Ok(m) if m.is_dir() => {
            return Err(unusable(format!(
                "is a directory: give the path of the image file to write in it, e.g. {}",
                target.join("guest.mem").display()
            )))
        }
        Ok(m) if !m.is_file() => {
            return Err(unusable(format!(
                "is {}: the committed image would replace it",
                kind_name(m.file_type())
            )))
        }
        Ok(_) => {}
        // A missing directory (or a file in its place) is reported below.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) => {}
        Err(e) => return Err(unusable(e.to_string())),
    }
    if target.as_os_str().as_encoded_bytes().ends_with(b"/") || target.file_name().is_none() {
        return Err(unusable("names a directory, not an image file".into()));
    }
    let dir = parent_dir(target);
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(unusable(format!("{} is not a directory", dir.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(unusable(format!(
            "directory {} does not exist",
            dir.display()
        ))),
        Err(e) => Err(unusable(format!("directory {}: {e}", dir.display()))),
    }
}

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

/// A target claimed for one receive: its temporary file exists (empty until the handshake
/// sizes it, [`PendingImage::create`]) and this process holds an exclusive `flock` on it.
/// Dropped unused, it removes the file.
pub struct Reservation {
    target: PathBuf,
    tmp: PathBuf,
    /// Open (and locked) while the file is ours; `None` once it was committed.
    lock: Option<File>,
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
    /// Claims `target` for a receive: checks it ([`check_target`]), creates and locks this
    /// receiver's temporary file beside it, then looks at the other receivers' temporary
    /// files for the same target: one that is locked belongs to a receiver that runs
    /// ([`ImageError::Busy`]); one that is not, of a pid that no longer runs, was left by a
    /// killed receiver and is removed ([`Reservation::removed`]).
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
        let tmp = temp_path(target)?;
        let dir = parent_dir(target);
        let _turn = DirTurn::take(&dir);
        let mut claim = Reservation {
            target: target.to_path_buf(),
            lock: None,
            tmp,
            removed: Vec::new(),
        };
        claim.lock = Some(claim.create_locked(notices)?);
        let entries = std::fs::read_dir(&dir).map_err(|source| ImageError::Io {
            what: format!("read directory {}", dir.display()),
            source,
        })?;
        let ours = std::process::id();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .as_encoded_bytes()
                .strip_prefix(prefix.as_encoded_bytes())
                .and_then(|p| std::str::from_utf8(p).ok())
                .and_then(|p| p.parse::<u32>().ok())
                .filter(|&p| p != ours)
            else {
                continue;
            };
            let path = entry.path();
            let busy = || ImageError::Busy {
                pid,
                target: target.to_path_buf(),
                temp: path.clone(),
            };
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                // Not ours to look at (another user's?): trust the pid.
                Err(_) if alive(pid) => return Err(busy()),
                Err(_) => continue,
            };
            match file.try_lock() {
                // Locked: its receiver runs (in another pid namespace if not in our /proc).
                Err(TryLockError::WouldBlock) => return Err(busy()),
                // Locks unsupported here: trust the pid.
                Err(TryLockError::Error(_)) if alive(pid) => return Err(busy()),
                Err(TryLockError::Error(_)) => {}
                // Unlocked but the pid runs: another program that reused the pid. Left
                // alone.
                Ok(()) if alive(pid) => {}
                Ok(()) => {
                    drop(file);
                    if std::fs::remove_file(&path).is_ok() {
                        claim.removed.push(path);
                    }
                }
            }
        }
        Ok(claim)
    }

    /// Creates this receiver's temporary file and locks it. A file of that name already
    /// there is ours by name: locked, it is another receive in this process (busy);
    /// otherwise a process that had our pid left it, and it is replaced.
    fn create_locked(&self, notices: &Notices) -> Result<File, ImageError> {
        let create_err = |source| ImageError::Io {
            what: format!("create {}", self.tmp.display()),
            source,
        };
        for _ in 0..2 {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(crate::memory::PRIVATE_MODE)
                .open(&self.tmp)
            {
                Ok(file) => {
                    match lock_within(&file, Duration::from_secs(1)) {
                        Ok(true) => {}
                        Ok(false) => {
                            let _ = std::fs::remove_file(&self.tmp);
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
                    let held = File::open(&self.tmp)
                        .is_ok_and(|f| matches!(f.try_lock(), Err(TryLockError::WouldBlock)));
                    if held {
                        return Err(ImageError::Busy {
                            pid: std::process::id(),
                            target: self.target.clone(),
                            temp: self.tmp.clone(),
                        });
                    }
                    std::fs::remove_file(&self.tmp).map_err(create_err)?;
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
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // Removed while still locked, so no other claim takes it for a killed receiver's.
        if self.lock.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
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
    fn take(dir: &Path) -> DirTurn {
        let lock = File::open(dir)
            .ok()
            .filter(|d| lock_within(d, Duration::from_secs(2)).unwrap_or(false));
        DirTurn { _lock: lock }
    }
}

/// A received image that is not committed yet.
pub struct PendingImage {
    memory: Option<GuestMemory>,
    /// Dropped after `memory`: removes the temporary file unless it was committed.
    claim: Reservation,
}

impl std::fmt::Debug for PendingImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingImage")
            .field("target", &self.claim.target)
            .field("tmp", &self.claim.tmp)
            .finish()
    }
}

impl PendingImage {
    /// Sizes the claimed temporary file to `size` zeroed bytes and maps it.
    pub fn create(claim: Reservation, size: u64) -> Result<PendingImage, ImageError> {
        let memory = GuestMemory::create(&claim.tmp, size)?;
        Ok(PendingImage {
            memory: Some(memory),
            claim,
        })
    }

    /// The image's memory, for the receive pipeline to write.
    pub fn memory_mut(&mut self) -> &mut [u8] {
        self.memory
            .as_mut()
            .expect("memory present until commit")
            .as_mut_slice()
    }

    /// The temporary file, for the receive pipeline's workers to write whole pages to
    /// (`ReceiverConfig::memory_file`: far cheaper than faulting its fresh pages in
    /// through the mapping); `None` on hugetlbfs, which has no `write(2)` (and whose
    /// 2 MiB pages take few faults anyway).
    pub fn file(&self) -> Result<Option<std::sync::Arc<File>>, ImageError> {
        let file = self
            .memory
            .as_ref()
            .expect("memory present until commit")
            .file();
        let again = |source| ImageError::Io {
            what: format!("open {} again", self.claim.tmp.display()),
            source,
        };
        let fs = nix::sys::statfs::fstatfs(file).map_err(|e| again(e.into()))?;
        if fs.filesystem_type() == nix::sys::statfs::HUGETLBFS_MAGIC {
            return Ok(None);
        }
        file.try_clone()
            .map(|f| Some(std::sync::Arc::new(f)))
            .map_err(again)
    }

    /// A bit per page that holds data in the temporary file (the rest are holes).
    pub fn data_pages(&self) -> std::io::Result<Vec<u64>> {
        self.memory
            .as_ref()
            .expect("memory present until commit")
            .data_pages()
    }

    /// The temporary file's path.
    pub fn temp_path(&self) -> &Path {
        &self.claim.tmp
    }

    /// Makes the image durable and atomically replaces the target with it: msync, fsync,
    /// rename, fsync of the directory. On error the temporary file is removed. Returns the
    /// mapping, now of the target (a resumed guest runs on it without mapping and faulting
    /// in all of memory again; unmapping a large image also takes tens of ms).
    pub fn commit(mut self) -> Result<GuestMemory, ImageError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| ImageError::Io { what, source }
        };
        let (tmp, target) = (&self.claim.tmp, &self.claim.target);
        let memory = self.memory.as_ref().expect("memory present until commit");
        memory.sync()?;
        memory
            .file()
            .sync_all()
            .map_err(io(&format!("fsync {}", tmp.display())))?;
        std::fs::rename(tmp, target).map_err(io(&format!(
            "rename {} to {}",
            tmp.display(),
            target.display()
        )))?;
        // The file is the target's now: nothing to remove (its lock goes with the claim).
        self.claim.lock = None;
        let dir = parent_dir(target);
        // The rename is only durable once the directory is synced; the file is in place
        // already, so a failure here is reported but leaves nothing to roll back.
        let mut memory = self.memory.take().expect("memory present until commit");
        memory.set_path(target.clone());
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&format!("fsync {}", dir.display())))?;
        Ok(memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory of its own for each test.
    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmstream-image-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

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

    /// Paths that cannot take an image are refused before anything is created.
    #[test]
    fn unusable_targets_are_refused() {
        let d = dir("check");
        let why = |p: &Path| match check_target(p) {
            Err(ImageError::Unusable { why, .. }) => why,
            other => panic!("{}: {other:?}", p.display()),
        };
        assert!(why(&d).starts_with("is a directory"), "{}", why(&d));
        assert!(why(&d.join("no/x.img")).contains("does not exist"));
        assert!(why(Path::new("/dev/null")).contains("character device"));
        std::fs::write(d.join("f"), b"").unwrap();
        assert!(why(&d.join("f/x.img")).contains("is not a directory"));
        assert!(why(Path::new("")).contains("empty"));
        check_target(&d.join("new.img")).unwrap();
        check_target(&d.join("f")).unwrap();
        assert_eq!(entries(&d), ["f"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Whether page `page` of the mapping at `addr` is mapped into this process (bit 63 of
    /// its `/proc/self/pagemap` entry), without touching it.
    fn mapped_here(addr: u64, page: u64) -> bool {
        use crate::memory::PAGE_SIZE;
        use std::os::unix::fs::FileExt;
        let mut entry = [0u8; 8];
        File::open("/proc/self/pagemap")
            .unwrap()
            .read_exact_at(&mut entry, (addr / PAGE_SIZE as u64 + page) * 8)
            .unwrap();
        u64::from_le_bytes(entry) >> 63 == 1
    }

    /// The receive pipeline writes whole pages to the image's file (`PendingImage::file`):
    /// they land there without being faulted into the receiver's mapping one by one, deltas
    /// on top of them apply through the mapping, zero pages stay holes, and the image ends
    /// equal to the source.
    #[test]
    fn received_whole_pages_reach_the_file_without_faulting_the_mapping() {
        use crate::memory::PAGE_SIZE;
        use vmstream_codec::{
            receive, Compression, DeltaConfig, DeltaMode, EncoderConfig, ReceiverConfig, Sender,
            SenderConfig,
        };
        const PAGES: u64 = 512;
        let d = dir("write-through");
        let mut img = PendingImage::create(
            Reservation::claim(&d.join("guest.img"), &Notices::silent()).unwrap(),
            PAGES * PAGE_SIZE as u64,
        )
        .unwrap();
        // Every fourth page zero; the rest text-like, so lz4 and XBZRLE both apply.
        let mut source = vec![0u8; PAGES as usize * PAGE_SIZE];
        for (p, page) in source.chunks_mut(PAGE_SIZE).enumerate() {
            if p % 4 != 3 {
                for (i, b) in page.iter_mut().enumerate() {
                    *b = b'a' + ((i / 7 + p) % 26) as u8;
                }
            }
        }
        let mut config = SenderConfig::new(PAGES);
        config.workers = 2;
        config.batch_pages = 48;
        config.encoder = EncoderConfig {
            compression: Compression::Lz4 { acceleration: 1 },
            delta: Some(DeltaConfig {
                cache_bytes: PAGES as usize * PAGE_SIZE,
                max_delta: 2048,
                mode: DeltaMode::Xbzrle,
            }),
        };
        let mut sender = Sender::new(config).unwrap();
        let rconfig = ReceiverConfig {
            workers: 2,
            zeroed_memory: true,
            memory_file: img.file().unwrap(),
            ..ReceiverConfig::default()
        };
        // Round 1: a few bytes of some data pages in the upper half (deltas) and one zero
        // page filled (a whole page).
        let changed: Vec<u64> = [3]
            .into_iter()
            .chain((PAGES / 2..PAGES).filter(|p| p % 37 == 5))
            .collect();
        let addr = img.memory_mut().as_ptr() as u64;
        receive(&rconfig, img.memory_mut(), |rx| {
            for round in 0..2u64 {
                let pages: Vec<u64> = if round == 0 {
                    (0..PAGES).collect()
                } else {
                    for &p in &changed {
                        let page = &mut source[p as usize * PAGE_SIZE..][..PAGE_SIZE];
                        page[100..110].copy_from_slice(b"0123456789");
                        if p == 3 {
                            page.fill(b'z');
                        }
                    }
                    changed.clone()
                };
                for &p in &pages {
                    sender
                        .push(p, &source[p as usize * PAGE_SIZE..][..PAGE_SIZE])
                        .unwrap();
                    while let Some(packet) = sender.poll() {
                        rx.submit(packet.into_vec()).unwrap();
                    }
                }
                sender.end_round().unwrap();
                while let Some(packet) = sender.poll() {
                    rx.submit(packet.into_vec()).unwrap();
                }
                rx.end_round(round).unwrap();
            }
        })
        .unwrap();
        assert!(sender.total_stats().by_encoding.xbzrle.pages > 0);
        // Looked at before anything reads the mapping (a read maps pages in, and their
        // neighbours: fault-around): the lower half, whole pages only, was never mapped here.
        for p in 0..PAGES / 2 {
            assert!(!mapped_here(addr, p), "page {p} was faulted in");
        }
        assert_eq!(std::fs::read(img.temp_path()).unwrap(), source);
        assert!(img.memory_mut() == &source[..]);
        let data = img.data_pages().unwrap();
        for p in 0..PAGES {
            let hole = p % 4 == 3 && !changed.contains(&p);
            assert_eq!(crate::memory::page_is_hole(&data, p), hole, "page {p}");
        }
        drop(img);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn commit_replaces_target_and_drop_rolls_back() {
        let d = dir("commit");
        let target = d.join("guest.img");
        std::fs::write(&target, b"old").unwrap();
        let mut img = PendingImage::create(
            Reservation::claim(&target, &Notices::silent()).unwrap(),
            8192,
        )
        .unwrap();
        let tmp = img.temp_path().to_path_buf();
        assert!(tmp.exists());
        img.memory_mut()[5000] = 42;
        drop(img);
        assert!(!tmp.exists(), "rollback removes the temporary file");
        assert_eq!(std::fs::read(&target).unwrap(), b"old");

        let mut img = PendingImage::create(
            Reservation::claim(&target, &Notices::silent()).unwrap(),
            8192,
        )
        .unwrap();
        img.memory_mut()[5000] = 42;
        img.commit().unwrap();
        let bytes = std::fs::read(&target).unwrap();
        assert_eq!(bytes.len(), 8192);
        assert_eq!(bytes[5000], 42);
        assert_eq!(entries(&d), ["guest.img"]);
        // Guest memory is private, although the file it replaced was world-readable.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
