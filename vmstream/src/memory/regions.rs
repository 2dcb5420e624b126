//! Guest memory made of several files mapped back to back in one range (a QEMU VM's RAM
//! backends, a file each): one [`GuestMemory`] whose pages run through the files in order,
//! so rounds, trackers and digests see one memory of concatenated regions.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::Arc;

use super::PAGE_SIZE;
use super::{check_size, io_err, mark_data_pages, GuestMemory, MapMode, Mapping, MemoryError};

/// Most files one guest memory is made of (a QEMU VM's RAM backends: its NUMA nodes).
pub const MAX_MEMORY_REGIONS: usize = 64;

/// A file mapped after the first.
pub(super) struct MoreFile {
    file: File,
    path: PathBuf,
    /// Its first byte's offset in the mapping.
    start: usize,
}

impl GuestMemory {
    /// Opens the files `regions` (path and size: each file must be exactly that size, a
    /// non-zero multiple of the page size) and maps them with `mode`, back to back in this
    /// order, as one memory. One file is [`Self::open_sized`].
    pub fn open_regions(regions: &[(PathBuf, u64)], mode: MapMode) -> Result<Self, MemoryError> {
        let [(path, size)] = regions else {
            return Self::map_regions(regions, mode);
        };
        Self::open_sized(path, *size, mode)
    }

    fn map_regions(regions: &[(PathBuf, u64)], mode: MapMode) -> Result<Self, MemoryError> {
        let mut files = Vec::with_capacity(regions.len());
        let mut total = 0usize;
        for (path, size) in regions {
            check_size(*size)?;
            let file = OpenOptions::new()
                .read(true)
                .write(mode == MapMode::Shared)
                .open(path)
                .map_err(io_err(format!("open {}", path.display())))?;
            let actual = file
                .metadata()
                .map_err(io_err(format!("stat {}", path.display())))?
                .len();
            if actual != *size {
                return Err(MemoryError::SizeMismatch {
                    path: path.clone(),
                    actual,
                    expected: *size,
                });
            }
            let len = usize::try_from(*size).map_err(|_| MemoryError::BadSize(*size))?;
            files.push((file, path.clone(), total, len));
            total = total.checked_add(len).ok_or(MemoryError::BadSize(*size))?;
        }
        if files.is_empty() || files.len() > MAX_MEMORY_REGIONS {
            return Err(MemoryError::Io {
                what: format!("{} memory files", files.len()),
                source: io::Error::other(format!("1 to {MAX_MEMORY_REGIONS} can be mapped")),
            });
        }
        // SAFETY: a fresh inaccessible anonymous region (addr = NULL) aliases nothing; the
        // result is checked for MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io_err("mmap")(io::Error::last_os_error()));
        }
        // Unmaps the whole range (reservation and files) if a file's mapping fails.
        let map = Mapping {
            ptr: NonNull::new(base.cast()).expect("mmap never returns NULL on success"),
            len: total,
        };
        let (prot, flags) = mode.prot_and_flags();
        for (file, path, start, len) in &files {
            // SAFETY: MAP_FIXED replaces part of our own reservation (nothing else lives
            // there); the result is checked.
            let p = unsafe {
                libc::mmap(
                    base.cast::<u8>().add(*start).cast(),
                    *len,
                    prot,
                    flags | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io_err(format!("mmap {}", path.display()))(
                    io::Error::last_os_error(),
                ));
            }
        }
        let mut files = files.into_iter();
        let (file, path, _, _) = files.next().expect("checked above");
        Ok(GuestMemory {
            map: Arc::new(map),
            mode,
            file,
            path,
            more: files
                .map(|(file, path, start, _)| MoreFile { file, path, start })
                .collect(),
        })
    }

    /// Each file, its first byte in the mapping and its length, in order.
    fn segments(&self) -> Vec<(&File, usize, usize)> {
        let starts: Vec<usize> = std::iter::once(0)
            .chain(self.more.iter().map(|m| m.start))
            .chain(std::iter::once(self.len()))
            .collect();
        std::iter::once(&self.file)
            .chain(self.more.iter().map(|m| &m.file))
            .zip(starts.windows(2))
            .map(|(f, w)| (f, w[0], w[1] - w[0]))
            .collect()
    }

    /// Each file's path and size, in order (one for a memory of one file).
    pub fn regions(&self) -> Vec<(PathBuf, u64)> {
        std::iter::once(&self.path)
            .chain(self.more.iter().map(|m| &m.path))
            .zip(self.segments())
            .map(|(p, (_, _, len))| (p.clone(), len as u64))
            .collect()
    }

    /// The file that holds byte `offset`: its handle, its start in the mapping and its length.
    pub(super) fn file_at(&self, offset: usize) -> (&File, usize, usize) {
        let segments = self.segments();
        let i = segments.partition_point(|&(_, start, _)| start <= offset);
        segments[i.saturating_sub(1)]
    }

    /// The files' shares of pages `from..to`: each file, its first page, and the pages
    /// of `from..to` it holds.
    pub(super) fn files_between(
        &self,
        from: usize,
        to: usize,
    ) -> Vec<(&File, usize, usize, usize)> {
        self.segments()
            .into_iter()
            .map(|(f, start, len)| (f, start / PAGE_SIZE, (start + len) / PAGE_SIZE))
            .filter(|&(_, first, end)| first < to && end > from)
            .map(|(f, first, end)| (f, first, from.max(first), to.min(end)))
            .collect()
    }

    /// Other handles of the files, for another thread to find the holes of (the scrubber).
    pub fn files(&self) -> io::Result<MemoryFiles> {
        let files = self
            .segments()
            .into_iter()
            .map(|(f, start, len)| Ok((f.try_clone()?, start / PAGE_SIZE, len / PAGE_SIZE)))
            .collect::<io::Result<_>>()?;
        Ok(MemoryFiles { files })
    }
}

/// Handles of a [`GuestMemory`]'s files (each with its first page and its pages), for
/// finding its holes without its mapping.
#[derive(Debug)]
pub struct MemoryFiles {
    files: Vec<(File, usize, usize)>,
}

impl MemoryFiles {
    /// A bit per page of the whole memory that holds data, from `SEEK_DATA` /
    /// `SEEK_HOLE` alone (as [`super::data_pages_of`], over every file in turn).
    pub fn data_pages(&self) -> io::Result<Vec<u64>> {
        let pages: usize = self.files.iter().map(|f| f.2).sum();
        let mut bits = vec![0u64; pages.div_ceil(64)];
        for (file, first, n) in &self.files {
            mark_data_pages(file, *first, *first, first + n, &mut bits)?;
        }
        Ok(bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Three files make one memory: pages run through them in order, writes through the
    /// mapping reach each file, holes and data are found per file (through the mapping
    /// and from the files alone), and file reads go to the right file.
    #[test]
    fn files_map_back_to_back_as_one_memory() {
        let dir = std::env::temp_dir().join(format!("vmstream-regions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sizes = [
            3 * PAGE_SIZE as u64,
            PAGE_SIZE as u64,
            70 * PAGE_SIZE as u64,
        ];
        let regions: Vec<(PathBuf, u64)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let p = dir.join(format!("r{i}"));
                std::fs::File::create(&p).unwrap().set_len(size).unwrap();
                (p, size)
            })
            .collect();
        let mut mem = GuestMemory::open_regions(&regions, MapMode::Shared).unwrap();
        assert_eq!(mem.pages(), 74);
        assert_eq!(mem.regions(), regions);
        // Page 3 is the second file's only page, page 4 the third's first.
        mem.as_mut_slice()[3 * PAGE_SIZE + 1] = 7;
        let f2 = std::fs::OpenOptions::new()
            .write(true)
            .open(&regions[2].0)
            .unwrap();
        f2.write_all_at(&[9], 66 * PAGE_SIZE as u64).unwrap();
        mem.sync().unwrap();
        assert_eq!(std::fs::read(&regions[1].0).unwrap()[1], 7);
        let set = |bits: Vec<u64>| -> Vec<u64> {
            (0..74u64)
                .filter(|p| bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
                .collect()
        };
        assert_eq!(set(mem.data_pages().unwrap()), vec![3, 70]);
        assert_eq!(set(mem.files().unwrap().data_pages().unwrap()), vec![3, 70]);
        let mut page = vec![0u8; PAGE_SIZE];
        mem.read_from_file_at(70 * PAGE_SIZE, &mut page);
        assert_eq!(page[0], 9);
        mem.read_from_file_at(3 * PAGE_SIZE, &mut page);
        assert_eq!(page[1], 7);
        // A file of another size than said is refused.
        let mut wrong = regions.clone();
        wrong[1].1 = 2 * PAGE_SIZE as u64;
        assert!(matches!(
            GuestMemory::open_regions(&wrong, MapMode::Shared),
            Err(MemoryError::SizeMismatch { .. })
        ));
        drop(mem);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
