//! The destination image: guest memory is received into a temporary file next to the
//! target path and only renamed over it once the digest matched ([`PendingImage::commit`]).
//! Dropping an uncommitted image removes the temporary file, so a failed migration leaves
//! the target path as it was; what a killed receiver left, the next one removes
//! ([`remove_stale_temps`]).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::memory::{GuestMemory, MemoryError};

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

/// A received image that is not committed yet.
pub struct PendingImage {
    target: PathBuf,
    tmp: PathBuf,
    memory: Option<GuestMemory>,
}

impl std::fmt::Debug for PendingImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingImage")
            .field("target", &self.target)
            .field("tmp", &self.tmp)
            .finish()
    }
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

/// Removes the temporary images for `target` that receivers which no longer run left
/// behind (killed, e.g. by SIGKILL or a Ctrl-C, before they could roll back): on tmpfs each
/// one holds guest-sized memory. Those of running receivers are left alone. Returns the
/// paths removed.
pub fn remove_stale_temps(target: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let prefix = temp_prefix(target)?;
    let prefix = prefix.as_encoded_bytes();
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new()); // creating the image will report it
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.as_encoded_bytes().strip_prefix(prefix) else {
            continue;
        };
        let Some(pid) = std::str::from_utf8(pid)
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // A live pid may be another program that reused it: keep the file then too.
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // A receiver in another pid namespace (another container on a shared directory)
        // is not in our /proc, but it holds its image's lock.
        let path = entry.path();
        let unused = File::open(&path).is_ok_and(|f| f.try_lock().is_ok());
        if unused && std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    Ok(removed)
}

impl PendingImage {
    /// Creates a zeroed temporary image of `size` bytes next to `target`.
    pub fn create(target: &Path, size: u64) -> Result<PendingImage, ImageError> {
        for stale in remove_stale_temps(target)? {
            eprintln!(
                "vmstream recv: removed {}, left by a receiver that no longer runs",
                stale.display()
            );
        }
        let tmp = temp_path(target)?;
        let memory = GuestMemory::create(&tmp, size)?;
        // Held while the file is open: tells `remove_stale_temps` elsewhere it is in use.
        if let Err(e) = memory.file().try_lock() {
            eprintln!(
                "vmstream recv: warning: could not lock {}: {e}",
                tmp.display()
            );
        }
        Ok(PendingImage {
            target: target.to_path_buf(),
            tmp,
            memory: Some(memory),
        })
    }

    /// The image's memory, for the receive pipeline to write.
    pub fn memory_mut(&mut self) -> &mut [u8] {
        self.memory
            .as_mut()
            .expect("memory present until commit")
            .as_mut_slice()
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
        &self.tmp
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
        let memory = self.memory.as_ref().expect("memory present until commit");
        memory.sync()?;
        memory
            .file()
            .sync_all()
            .map_err(io(&format!("fsync {}", self.tmp.display())))?;
        std::fs::rename(&self.tmp, &self.target).map_err(io(&format!(
            "rename {} to {}",
            self.tmp.display(),
            self.target.display()
        )))?;
        let dir = match self.target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // The rename is only durable once the directory is synced; the file is in place
        // already, so a failure here is reported but leaves nothing to roll back.
        let mut memory = self.memory.take().expect("memory present until commit");
        memory.set_path(self.target.clone());
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&format!("fsync {}", dir.display())))?;
        Ok(memory)
    }
}

impl Drop for PendingImage {
    fn drop(&mut self) {
        if self.memory.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmstream-image-{}", std::process::id()));
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

    /// What a killed receiver left is removed; a running receiver's image is not.
    #[test]
    fn creating_an_image_removes_those_of_receivers_that_no_longer_run() {
        // Not inside `dir()`: the other test removes that when it ends.
        let d = std::env::temp_dir().join(format!("vmstream-stale-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let target = d.join("guest.img");
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        let stale = d.join(format!(".guest.img.vmstream-recv-{dead}"));
        let running = d.join(".guest.img.vmstream-recv-1"); // init runs
        let other = d.join(format!(".other.img.vmstream-recv-{dead}"));
        // A dead pid here, but locked: a receiver in another pid namespace.
        let elsewhere = d.join(format!(".guest.img.vmstream-recv-{}", dead + 1_000_000));
        for p in [&stale, &running, &other, &elsewhere] {
            std::fs::write(p, b"x").unwrap();
        }
        let lock = File::open(&elsewhere).unwrap();
        lock.try_lock().unwrap();
        let img = PendingImage::create(&target, 8192).unwrap();
        assert!(!stale.exists());
        assert!(running.exists() && other.exists() && elsewhere.exists());
        drop(lock);
        assert!(img.temp_path().exists());
        drop(img);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Paths that cannot take an image are refused before anything is created.
    #[test]
    fn unusable_targets_are_refused() {
        let d = dir().join("check");
        std::fs::create_dir_all(&d).unwrap();
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
        let d = dir();
        let target = d.join("guest.img");
        std::fs::write(&target, b"old").unwrap();
        let mut img = PendingImage::create(&target, 8192).unwrap();
        let tmp = img.temp_path().to_path_buf();
        assert!(tmp.exists());
        img.memory_mut()[5000] = 42;
        drop(img);
        assert!(!tmp.exists(), "rollback removes the temporary file");
        assert_eq!(std::fs::read(&target).unwrap(), b"old");

        let mut img = PendingImage::create(&target, 8192).unwrap();
        img.memory_mut()[5000] = 42;
        img.commit().unwrap();
        let bytes = std::fs::read(&target).unwrap();
        assert_eq!(bytes.len(), 8192);
        assert_eq!(bytes[5000], 42);
        assert!(!tmp.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
