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
//!
//! The temporary file is opened once, when it is created, and used through that handle
//! only (sizing, mapping, fsync); every name is looked up relative to a handle of the
//! target's directory without following links (`dir.rs`). A link put in place of the
//! temporary file is never written through: the receive fails
//! ([`ImageError::Replaced`]) and the link is left where it is.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use crate::memory::{GuestMemory, MapMode, MemoryError};

mod claim;
mod dir;
mod regions;
mod span;

pub use claim::Reservation;
pub use regions::RegionImages;
pub use span::SpanMapping;

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
    /// A running guest holds the target: receiving into it would replace the memory under
    /// that guest.
    #[error(
        "{0} is the memory file of a running guest (it holds the file's lock): a received \
         image would replace that guest's memory under it; stop the guest or receive into \
         another file"
    )]
    InUse(PathBuf),
    /// The temporary file's name no longer is the file this receiver created (another
    /// file or a link was put in its place): nothing was written through it, and nothing
    /// is committed.
    #[error(
        "{0} was replaced by another file while receiving (a link?): nothing was written \
         through it, and nothing is committed"
    )]
    Replaced(PathBuf),
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
    Ok(target.with_file_name(temp_name(target)?))
}

/// The file name of this receiver's temporary image for `target`:
/// `.NAME.vmstream-recv-PID`.
fn temp_name(target: &Path) -> Result<OsString, ImageError> {
    let mut name = temp_prefix(target)?;
    name.push(std::process::id().to_string());
    Ok(name)
}

/// The name of a temporary image for `target` without the receiver's pid.
fn temp_prefix(target: &Path) -> Result<OsString, ImageError> {
    let name = target
        .file_name()
        .ok_or_else(|| ImageError::BadPath(target.to_path_buf()))?;
    let mut prefix = OsString::from(".");
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
    /// Sizes the claimed temporary file to `size` zeroed bytes and maps it, through the
    /// handle the claim created (refused if its name was replaced meanwhile).
    pub fn create(claim: Reservation, size: u64) -> Result<PendingImage, ImageError> {
        claim.check_temp_is_ours()?;
        let file = claim.handle()?;
        let memory = GuestMemory::create_from(file, claim.tmp.clone(), size)?;
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

    /// The image's memory, to read.
    pub fn memory(&self) -> &GuestMemory {
        self.memory.as_ref().expect("memory present until commit")
    }

    /// The temporary file, for the receive pipeline's workers to write whole pages to
    /// (`ReceiverConfig::memory_file`: far cheaper than faulting its fresh pages in
    /// through the mapping); `None` on hugetlbfs, which has no `write(2)` (and whose
    /// 2 MiB pages take few faults anyway).
    pub fn file(&self) -> Result<Option<std::sync::Arc<std::fs::File>>, ImageError> {
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

    /// The temporary file's handle (the one that created it).
    pub fn handle(&self) -> &std::fs::File {
        self.memory
            .as_ref()
            .expect("memory present until commit")
            .file()
    }

    /// Bytes of the image.
    pub fn size(&self) -> u64 {
        self.memory
            .as_ref()
            .expect("memory present until commit")
            .len() as u64
    }

    /// Makes what was written so far durable (msync, fsync), ahead of a commit that
    /// renames several images.
    pub fn sync(&self) -> Result<(), ImageError> {
        let memory = self.memory.as_ref().expect("memory present until commit");
        memory.sync()?;
        memory.file().sync_all().map_err(|source| ImageError::Io {
            what: format!("fsync {}", self.claim.tmp.display()),
            source,
        })
    }

    /// A bit per page that holds data in the temporary file (the rest are holes).
    pub fn data_pages(&self) -> std::io::Result<Vec<u64>> {
        self.memory
            .as_ref()
            .expect("memory present until commit")
            .data_pages()
    }

    /// A read-only mapping of the image for another thread (the background verify), of
    /// the same file, not reopened by name.
    pub fn read_only_view(&self) -> Result<GuestMemory, ImageError> {
        Ok(GuestMemory::open_from(
            self.claim.handle()?,
            self.claim.tmp.clone(),
            MapMode::SharedReadOnly,
        )?)
    }

    /// The temporary file's path.
    pub fn temp_path(&self) -> &Path {
        &self.claim.tmp
    }

    /// Makes the image durable and atomically replaces the target with it: msync, fsync,
    /// rename, fsync of the directory. The rename is refused if the temporary name no
    /// longer is this image's file ([`ImageError::Replaced`]) or a running guest holds the
    /// target ([`ImageError::InUse`]). On error the temporary file is removed. Returns the
    /// mapping, now of the target (a resumed guest runs on it without mapping and faulting
    /// in all of memory again; unmapping a large image also takes tens of ms); its lock is
    /// released, for the guest that resumes on it to take.
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
        self.claim.check_temp_is_ours()?;
        // Held across the rename: no guest starts on the file being replaced meanwhile.
        let _replaced = claim::refuse_held(&self.claim.dir, &self.claim.name, target)?;
        self.claim
            .dir
            .rename(&self.claim.tmp_name, &self.claim.name)
            .map_err(io(&format!(
                "rename {} to {}",
                tmp.display(),
                target.display()
            )))?;
        // The file is the target's now: nothing to remove.
        self.claim.file = None;
        let mut memory = self.memory.take().expect("memory present until commit");
        memory
            .file()
            .unlock()
            .map_err(io(&format!("unlock {}", target.display())))?;
        // Whatever was renamed, the target must now be this image (a name swapped between
        // the check and the rename would have been moved instead).
        if !self
            .claim
            .dir
            .names(&self.claim.name, memory.file())
            .map_err(io(&format!("stat {}", target.display())))?
        {
            return Err(ImageError::Replaced(tmp.clone()));
        }
        memory.set_path(target.clone());
        // The rename is only durable once the directory is synced; the file is in place
        // already, so a failure here is reported but leaves nothing to roll back.
        self.claim
            .dir
            .sync()
            .map_err(io(&format!("fsync {}", self.claim.dir.path().display())))?;
        Ok(memory)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::telemetry::notice::Notices;

    /// Whether page `page` of the mapping at `addr` is mapped into this process (bit 63 of
    /// its `/proc/self/pagemap` entry), without touching it.
    fn mapped_here(addr: u64, page: u64) -> bool {
        use crate::memory::PAGE_SIZE;
        use std::os::unix::fs::FileExt;
        let mut entry = [0u8; 8];
        std::fs::File::open("/proc/self/pagemap")
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
                ..DeltaConfig::default()
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
        // Holes are looked at before the mapping is read (a page read through it is resident,
        // which `data_pages` counts as data).
        let data = img.data_pages().unwrap();
        assert_eq!(std::fs::read(img.temp_path()).unwrap(), source);
        assert!(img.memory_mut() == &source[..]);
        for p in 0..PAGES {
            let hole = p % 4 == 3 && !changed.contains(&p);
            assert_eq!(crate::memory::page_is_hole(&data, p), hole, "page {p}");
        }
        drop(img);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A fresh directory of its own for each test.
    pub(super) fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmstream-image-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    pub(super) fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
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

    /// Replaces `name` (a file) with a link to `to`.
    fn swap_for_link(name: &Path, to: &Path) {
        std::fs::remove_file(name).unwrap();
        std::os::unix::fs::symlink(to, name).unwrap();
    }

    /// The temporary image replaced by a link to another file, before the handshake sizes
    /// it or after, while the image is received: the file it points to is never written
    /// (same bytes, same length), nothing is committed, the receive fails with
    /// [`ImageError::Replaced`], and the link is left for the operator to see.
    #[test]
    fn a_link_in_place_of_the_temporary_image_is_never_written_through() {
        let d = dir("swap");
        let target = d.join("guest.img");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let claim = Reservation::claim(&target, &Notices::silent()).unwrap();
        let tmp = claim.temp_path().to_path_buf();
        swap_for_link(&tmp, &victim);
        match PendingImage::create(claim, 8192) {
            Err(e @ ImageError::Replaced(_)) => {
                assert!(
                    e.to_string().contains("was replaced by another file"),
                    "{e}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&tmp).unwrap().is_symlink());
        std::fs::remove_file(&tmp).unwrap();

        let mut img = PendingImage::create(
            Reservation::claim(&target, &Notices::silent()).unwrap(),
            8192,
        )
        .unwrap();
        swap_for_link(&tmp, &victim);
        img.memory_mut()[..8192].fill(0xEE);
        assert!(matches!(img.commit(), Err(ImageError::Replaced(_))));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!target.exists());
        assert!(std::fs::symlink_metadata(&tmp).unwrap().is_symlink());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A link at the target itself is replaced by the image, not followed: the file it
    /// pointed to keeps its bytes, and the target is a regular file holding the guest.
    #[test]
    fn a_link_at_the_target_is_replaced_not_followed() {
        let d = dir("target-link");
        let target = d.join("guest.img");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        let mut img = PendingImage::create(
            Reservation::claim(&target, &Notices::silent()).unwrap(),
            8192,
        )
        .unwrap();
        img.memory_mut()[100] = 7;
        let memory = img.commit().unwrap();
        assert_eq!(memory.path(), target);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert!(meta.is_file() && meta.len() == 8192);
        assert_eq!(std::fs::read(&target).unwrap()[100], 7);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A guest that started on the target while the image was received keeps its file:
    /// the commit is refused and the temporary image removed.
    #[test]
    fn a_commit_over_a_running_guests_file_is_refused() {
        let d = dir("commit-in-use");
        let target = d.join("guest.img");
        let img = PendingImage::create(
            Reservation::claim(&target, &Notices::silent()).unwrap(),
            8192,
        )
        .unwrap();
        std::fs::write(&target, b"guest memory").unwrap();
        let guest = crate::memory::open_owned(&target, false).unwrap();
        assert!(matches!(img.commit(), Err(ImageError::InUse(_))));
        assert_eq!(std::fs::read(&target).unwrap(), b"guest memory");
        assert_eq!(entries(&d), ["guest.img"]);
        drop(guest);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
