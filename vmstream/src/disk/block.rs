//! The block layer of a process guest: its disks are raw (sparse) image files, and every
//! write goes through [`Disk::write_at`], which waits for the write limit, writes, then
//! marks the granules it covered in the disk's dirty bitmap.
//!
//! Why mark *after* the write: the sender clears a granule's bit *before* it reads the
//! granule. A write whose mark the sender cleared had completed before the mark, so the
//! read after the clear sees its data; a write still running when the sender read sets
//! the bit after the clear, so the granule is sent again next round. Marking first would
//! let the sender clear the bit and read the old data before the write lands, and never
//! look again. A guest stopped between its write and its mark (the switchover) still has
//! the write's granules in an in-flight slot ([`DirtyBitmap::in_flight`]), which the
//! final round sends too.
//!
//! While the sender mirrors (`--disk-mode mirror`, `disk::mirror`), a write returns only
//! once the destination has it, and is not marked: the mirror sent it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::disk::bitmap::{bitmap_path, head, BitmapError, DirtyBitmap};
use crate::disk::limiter::WriteLimiter;
use crate::disk::mirror::{self, MirrorWait};
use crate::disk::MAX_DISKS;

/// Why a disk cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// More disks than a guest can have.
    #[error("{0} disks given, at most {MAX_DISKS}")]
    TooMany(usize),
    /// The disk file is missing and no size was given to create it.
    #[error("disk {0} does not exist (give a disk size to create it)")]
    Missing(PathBuf),
    /// The disk has another size than asked for.
    #[error("disk {path} is {actual} bytes, expected {expected}")]
    Size {
        /// The disk.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The size asked for.
        expected: u64,
    },
    /// A disk of size zero.
    #[error("disk {0} is empty")]
    Empty(PathBuf),
    /// A read or write past the disk's end.
    #[error("disk {path}: {len} bytes at {offset} are past its end ({size})")]
    OutOfRange {
        /// The disk.
        path: PathBuf,
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// Opening, reading or writing the file failed.
    #[error("disk {path}: {what}: {source}")]
    Io {
        /// The disk.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Its dirty bitmap.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
}

/// One disk of a guest: the image file, its dirty bitmap, the guest's write limiter.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    size: u64,
    bitmap: DirtyBitmap,
    limiter: WriteLimiter,
    waited: Duration,
}

impl Disk {
    /// Opens the disk at `path` (creating it sparse if missing and `create_size` is
    /// given; an existing disk must have that size) and its bitmap `<path>.dirty`
    /// (created clean if missing, at `granularity` or the default; an existing one must
    /// have `granularity` if given).
    pub fn open(
        path: &Path,
        create_size: Option<u64>,
        granularity: Option<u64>,
    ) -> Result<Self, DiskError> {
        let io = |what| {
            move |source| DiskError::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let exists = path.exists();
        if !exists && create_size.is_none() {
            return Err(DiskError::Missing(path.to_path_buf()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("open"))?;
        let mut size = file.metadata().map_err(io("stat"))?.len();
        match create_size {
            Some(want) if !exists => {
                file.set_len(want).map_err(io("size"))?;
                size = want;
            }
            Some(want) if want != size => {
                return Err(DiskError::Size {
                    path: path.to_path_buf(),
                    actual: size,
                    expected: want,
                })
            }
            _ => {}
        }
        if size == 0 {
            return Err(DiskError::Empty(path.to_path_buf()));
        }
        let bitmap = DirtyBitmap::open_or_create(&bitmap_path(path), size, granularity)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
            bitmap,
            limiter: WriteLimiter::new(),
            waited: Duration::ZERO,
        })
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), DiskError> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(DiskError::OutOfRange {
                path: self.path.clone(),
                offset,
                len: len as u64,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Writes `buf` at `offset` (see the module docs for the order): waits for the write
    /// limit, claims an in-flight slot, `pwrite`s, then while the sender mirrors waits until
    /// the destination has the write (`disk::mirror`), else (or if that wait gives up)
    /// marks the granules; counts the write and its latency.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.check(offset, buf.len())?;
        let started = Instant::now();
        let bitmap = &self.bitmap;
        let waited = self
            .limiter
            .acquire(buf.len() as u64, || bitmap.write_limit());
        if !waited.is_zero() {
            self.waited += waited;
            self.bitmap.count_wait(waited.as_nanos() as u64);
        }
        let granules = self.bitmap.granules_of(offset, buf.len() as u64);
        let slot = self.bitmap.begin_write(granules.clone());
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| DiskError::Io {
                path: self.path.clone(),
                what: "write",
                source,
            })?;
        // The slot stays held while the write waits: a guest paused meanwhile has it in
        // the final round's in-flight list.
        let mirrored = mirror::await_mirrored(&self.bitmap, slot.index());
        if mirrored != MirrorWait::Mirrored {
            self.bitmap.mark(granules);
        }
        drop(slot);
        self.bitmap.count_write(buf.len() as u64);
        let latency = started.elapsed();
        mirror::count_mirror_outcome(&self.bitmap, buf.len() as u64, mirrored, latency);
        mirror::record_latency(&self.bitmap, head::WRITE_LATENCY, latency);
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (holes read as zeros).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check(offset, buf.len())?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| DiskError::Io {
                path: self.path.clone(),
                what: "read",
                source,
            })
    }

    /// Flushes the disk's data to stable storage.
    pub fn sync(&self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(|source| DiskError::Io {
            path: self.path.clone(),
            what: "sync",
            source,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The disk's dirty bitmap.
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.bitmap
    }

    /// Time this process's writes waited for the write limit.
    pub fn limit_waited(&self) -> Duration {
        self.waited
    }
}

/// Opens a guest's disks in order (see [`Disk::open`]; `create_size` for each missing).
pub fn open_disks(
    paths: &[PathBuf],
    create_size: Option<u64>,
    granularity: Option<u64>,
) -> Result<Vec<Disk>, DiskError> {
    if paths.len() > MAX_DISKS {
        return Err(DiskError::TooMany(paths.len()));
    }
    paths
        .iter()
        .map(|p| Disk::open(p, create_size, granularity))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::bitmap::DEFAULT_GRANULARITY;

    fn tmp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vmstream-block-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("disk.img")
    }

    #[test]
    fn writes_land_in_the_file_and_mark_exactly_their_granules() {
        let path = tmp("marks");
        let mut d = Disk::open(&path, Some(8 << 20), Some(DEFAULT_GRANULARITY)).unwrap();
        d.write_at(0, &[1; 4096]).unwrap();
        d.write_at((1 << 20) - 100, &[2; 200]).unwrap();
        d.write_at((8 << 20) - 8192, &[3; 8192]).unwrap();
        // The sender's view, through its own mapping of the bitmap file.
        let sender = DirtyBitmap::open(&bitmap_path(&path)).unwrap();
        assert_eq!(sender.take_all(), vec![0..1, 15..17, 127..128]);
        assert_eq!(
            (sender.writes(), sender.bytes_written()),
            (3, 4096 + 200 + 8192)
        );
        let mut buf = [0u8; 200];
        d.read_at((1 << 20) - 100, &mut buf).unwrap();
        assert_eq!(buf, [2; 200]);
        assert!(sender.in_flight().is_empty());
        // Sparse: a 8 MiB disk with 12 KiB written takes far less than 8 MiB.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 1 << 20);
    }

    #[test]
    fn bad_disks_and_writes_are_typed_errors() {
        let path = tmp("bad");
        assert!(matches!(
            Disk::open(&path, None, Some(4096)),
            Err(DiskError::Missing(_))
        ));
        let mut d = Disk::open(&path, Some(1 << 20), Some(4096)).unwrap();
        assert!(matches!(
            d.write_at((1 << 20) - 1, &[0; 2]),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.write_at(u64::MAX, &[0; 2]),
            Err(DiskError::OutOfRange { .. })
        ));
        drop(d);
        assert!(matches!(
            Disk::open(&path, Some(2 << 20), Some(4096)),
            Err(DiskError::Size { .. })
        ));
        assert!(matches!(
            Disk::open(&path, None, Some(64 << 10)),
            Err(DiskError::Bitmap(BitmapError::Mismatch { .. }))
        ));
        let many: Vec<PathBuf> = (0..17)
            .map(|i| path.with_extension(i.to_string()))
            .collect();
        assert!(matches!(
            open_disks(&many, Some(1 << 20), Some(4096)),
            Err(DiskError::TooMany(17))
        ));
    }

    #[test]
    fn the_senders_write_limit_makes_guest_writes_wait() {
        let path = tmp("qos");
        let mut d = Disk::open(&path, Some(4 << 20), Some(DEFAULT_GRANULARITY)).unwrap();
        let sender = DirtyBitmap::open(&bitmap_path(&path)).unwrap();
        for i in 0..16 {
            d.write_at(i * 4096, &[1; 4096]).unwrap();
        }
        assert_eq!(sender.limit_wait(), Duration::ZERO);
        sender.set_write_limit(256 << 10);
        // 512 KiB at 256 KiB/s: well over a second, of which most is waiting.
        for i in 0..128 {
            d.write_at(i * 4096, &[2; 4096]).unwrap();
        }
        assert!(
            sender.limit_wait() >= Duration::from_millis(1500),
            "{:?}",
            sender.limit_wait()
        );
        assert_eq!(d.limit_waited(), sender.limit_wait());
    }
}
