//! The destination image: guest memory is received into a temporary file next to the
//! target path and only renamed over it once the digest matched ([`PendingImage::commit`]).
//! Dropping an uncommitted image removes the temporary file, so a failed migration leaves
//! the target path as it was.

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
    let name = target
        .file_name()
        .ok_or_else(|| ImageError::BadPath(target.to_path_buf()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".vmstream-recv-{}", std::process::id()));
    Ok(target.with_file_name(tmp_name))
}

impl PendingImage {
    /// Creates a zeroed temporary image of `size` bytes next to `target`.
    pub fn create(target: &Path, size: u64) -> Result<PendingImage, ImageError> {
        let tmp = temp_path(target)?;
        let memory = GuestMemory::create(&tmp, size)?;
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
