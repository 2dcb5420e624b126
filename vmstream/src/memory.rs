//! Guest memory backed by a file (tmpfs, hugetlbfs, disk) or a memfd, mapped into this process.
//!
//! The mapping is `MAP_SHARED` by default so that the guest process, the sender and any
//! verifier see the same bytes. A private (copy-on-write) mapping is available for
//! read-mostly tools that must not change the file (verify of a snapshot replays the
//! journal in its private view).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

mod holes;
mod regions;
pub use holes::data_pages_of;
use holes::mark_data_pages;
pub use regions::{MemoryFiles, MAX_MEMORY_REGIONS};

/// Page size of guest memory in bytes (4 KiB): dirty tracking, the KVM guest's page tables
/// and migration (the codec's page records, the `Hello`'s `page_size`) all work in these
/// units, so the whole project uses this one definition, the codec's.
pub use vmstream_codec::PAGE_SIZE;

/// Errors from creating or mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is zero or not a multiple of [`PAGE_SIZE`].
    #[error("guest memory size {0} must be a non-zero multiple of {PAGE_SIZE}")]
    BadSize(u64),
    /// The existing file has a different size than requested.
    #[error("guest memory file {path} is {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// File path.
        path: PathBuf,
        /// Size found on disk.
        actual: u64,
        /// Size requested.
        expected: u64,
    },
    /// An I/O or system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> MemoryError {
    let what = what.into();
    move |source| MemoryError::Io { what, source }
}

/// How to map the guest memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapMode {
    /// Read-write `MAP_SHARED`: writes reach the file and every other mapping.
    Shared,
    /// Read-only `MAP_SHARED`: sees every write of other mappings, cannot write.
    SharedReadOnly,
    /// Read-write `MAP_PRIVATE`: reads the file, writes stay in this process.
    Private,
}

impl MapMode {
    /// `mmap`'s protection and flags for this mode.
    fn prot_and_flags(self) -> (libc::c_int, libc::c_int) {
        match self {
            MapMode::Shared => (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED),
            MapMode::SharedReadOnly => (libc::PROT_READ, libc::MAP_SHARED),
            MapMode::Private => (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE),
        }
    }
}

/// Whether `page` is a hole in `data`, a bitmap of data pages from
/// [`GuestMemory::data_pages`]. Pages past the bitmap count as data (read them).
pub fn page_is_hole(data: &[u64], page: u64) -> bool {
    data.get((page / 64) as usize)
        .is_some_and(|w| w & (1 << (page % 64)) == 0)
}

/// A mapped guest memory region and the file behind it (or the files, mapped back to back:
/// a QEMU VM's several RAM backends, [`GuestMemory::open_regions`]).
pub struct GuestMemory {
    map: Arc<Mapping>,
    mode: MapMode,
    /// The (first) file.
    file: File,
    path: PathBuf,
    /// The files mapped after the first, each with its start in the mapping (empty: one file).
    more: Vec<regions::MoreFile>,
}

/// The mapped region, shared by its [`GuestMemory`] and any [`MemoryReader`]s: unmapped
/// when the last of them drops.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; concurrent access from other
// threads goes through raw-pointer copies or atomics, never through shared `&mut`.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`; shared access only reads via raw pointers or uses atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Copy `buf.len()` bytes starting at `offset` into `buf`.
    fn read_at(&self, offset: usize, buf: &mut [u8]) {
        let end = offset.checked_add(buf.len()).expect("offset overflow");
        assert!(end <= self.len, "read {offset}..{end} past {}", self.len);
        // SAFETY: the range is inside the mapping (checked above); `buf` is a distinct
        // Rust buffer, so the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        }
    }

    /// Copies page `page` into `buf` (one page long).
    fn read_page(&self, page: u64, buf: &mut [u8]) {
        assert_eq!(buf.len(), PAGE_SIZE);
        self.read_at(page as usize * PAGE_SIZE, buf);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region we mapped; its last holder is going away.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Copies pages out of a [`GuestMemory`]'s mapping from any thread (the codec's encode
/// workers read a live guest's pages themselves), keeping the mapping alive while it
/// lives.
#[derive(Clone)]
pub struct MemoryReader {
    map: Arc<Mapping>,
}

impl MemoryReader {
    /// Copy page `page` into `buf` (which must be [`PAGE_SIZE`] bytes); see
    /// [`GuestMemory::read_at`] for concurrent writers.
    pub fn read_page(&self, page: u64, buf: &mut [u8]) {
        self.map.read_page(page, buf)
    }
}

impl std::fmt::Debug for MemoryReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryReader")
            .field("len", &self.map.len)
            .finish()
    }
}

impl GuestMemory {
    /// Create the file at `path` as `size` zero bytes (old contents are discarded) and map
    /// it shared. A symbolic link at `path` is refused, not followed: the file written is
    /// the one named.
    pub fn create(path: &Path, size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(PRIVATE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io_err(format!("open {}", path.display())))?;
        Self::create_from(file, path.to_path_buf(), size)
    }

    /// Like [`Self::create`] on a file the caller opened (read-write) and keeps using:
    /// its old contents are discarded, it is made private ([`PRIVATE_MODE`]), sized to
    /// `size` zero bytes and mapped shared. `path` names it for other processes.
    pub fn create_from(file: File, path: PathBuf, size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        make_private(&file).map_err(io_err(format!("chmod {}", path.display())))?;
        file.set_len(0)
            .and_then(|()| file.set_len(size))
            .map_err(io_err(format!("resize {}", path.display())))?;
        Self::map(file, path, size, MapMode::Shared)
    }

    /// Open an existing guest memory file and map it with `mode`; the size is the file's size.
    pub fn open(path: &Path, mode: MapMode) -> Result<Self, MemoryError> {
        let file = OpenOptions::new()
            .read(true)
            .write(mode == MapMode::Shared)
            .open(path)
            .map_err(io_err(format!("open {}", path.display())))?;
        Self::open_from(file, path.to_path_buf(), mode)
    }

    /// Like [`Self::open`] on a file the caller opened (read-write for
    /// [`MapMode::Shared`]); `path` names it.
    pub fn open_from(file: File, path: PathBuf, mode: MapMode) -> Result<Self, MemoryError> {
        let size = file
            .metadata()
            .map_err(io_err(format!("stat {}", path.display())))?
            .len();
        check_size(size)?;
        Self::map(file, path, size, mode)
    }

    /// Open an existing file and require it to be exactly `size` bytes.
    pub fn open_sized(path: &Path, size: u64, mode: MapMode) -> Result<Self, MemoryError> {
        Self::open(path, mode)?.sized(size)
    }

    /// This memory if it is exactly `size` bytes ([`MemoryError::SizeMismatch`] otherwise).
    pub fn sized(self, size: u64) -> Result<Self, MemoryError> {
        if self.len() as u64 != size {
            return Err(MemoryError::SizeMismatch {
                path: self.path.clone(),
                actual: self.len() as u64,
                expected: size,
            });
        }
        Ok(self)
    }

    /// Create an anonymous memfd of `size` bytes and map it shared.
    ///
    /// Other processes reach it through [`GuestMemory::path`] (`/proc/PID/fd/N`).
    pub fn memfd(name: &str, size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        let cname = std::ffi::CString::new(name).map_err(|_| MemoryError::Io {
            what: "memfd name".into(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: `cname` is a valid NUL-terminated string; memfd_create has no other inputs.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), 0) };
        if fd < 0 {
            return Err(io_err("memfd_create")(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(io_err("resize memfd"))?;
        let path = PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), fd));
        Self::map(file, path, size, MapMode::Shared)
    }

    /// Maps `file` (open for reading, and writing for [`MapMode::Shared`]), all of it, with
    /// `mode`: guest memory handed over by descriptor. Its path is `/proc/PID/fd/N` of this
    /// mapping's own descriptor, valid while the mapping lives.
    pub fn from_file(file: File, mode: MapMode) -> Result<Self, MemoryError> {
        let size = file.metadata().map_err(io_err("stat memory fd"))?.len();
        check_size(size)?;
        let path = PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            file.as_raw_fd()
        ));
        Self::map(file, path, size, mode)
    }

    fn map(file: File, path: PathBuf, size: u64, mode: MapMode) -> Result<Self, MemoryError> {
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let (prot, flags) = mode.prot_and_flags();
        // SAFETY: mapping a fresh region (addr = NULL) of `len` bytes of an open file cannot
        // alias any Rust object; the result is checked for MAP_FAILED.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io_err(format!("mmap {}", path.display()))(
                io::Error::last_os_error(),
            ));
        }
        Ok(Self {
            map: Arc::new(Mapping {
                ptr: NonNull::new(ptr.cast()).expect("mmap never returns NULL on success"),
                len,
            }),
            mode,
            file,
            path,
            more: Vec::new(),
        })
    }

    /// Size of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// True if the mapping is empty (never, sizes are checked).
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// Number of [`PAGE_SIZE`] pages.
    pub fn pages(&self) -> u64 {
        (self.map.len / PAGE_SIZE) as u64
    }

    /// The path other processes can open to map the same memory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A bit per page that holds file data (bit set) rather than a hole (never written,
    /// reads as zero). Reading a hole through a shared mapping allocates it, so callers that
    /// only need its bytes skip holes. Pages in memory (`mincore`) are data; only the runs
    /// of pages that are not (holes, or data on disk or in swap) are asked with `SEEK_DATA`
    /// / `SEEK_HOLE`, whose walk over a tmpfs file costs about as much per page as hashing
    /// it. A filesystem without hole reporting reports everything as data.
    pub fn data_pages(&self) -> io::Result<Vec<u64>> {
        let pages = self.pages() as usize;
        let mut resident = vec![0u8; pages];
        // SAFETY: `ptr` is the page-aligned start of the `len`-byte mapping, and `resident`
        // has the byte per page mincore writes.
        let r = unsafe {
            libc::mincore(
                self.map.ptr.as_ptr().cast(),
                self.map.len,
                resident.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut bits = vec![0u64; pages.div_ceil(64)];
        let mut p = 0;
        while p < pages {
            if resident[p] & 1 != 0 {
                bits[p / 64] |= 1 << (p % 64);
                p += 1;
                continue;
            }
            let end = (p..pages).find(|&q| resident[q] & 1 != 0).unwrap_or(pages);
            for (file, base, from, to) in self.files_between(p, end) {
                mark_data_pages(file, base, from, to, &mut bits)?;
            }
            p = end;
        }
        Ok(bits)
    }

    /// Records that the file behind the mapping was renamed to `path`.
    pub fn set_path(&mut self, path: PathBuf) {
        self.path = path;
    }

    /// The file behind the mapping.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// How the memory is mapped.
    pub fn mode(&self) -> MapMode {
        self.mode
    }

    /// Start address of the mapping (for userfaultfd registration and pagemap scans).
    pub fn addr(&self) -> u64 {
        self.map.ptr.as_ptr() as u64
    }

    /// Raw pointer to the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }

    /// The whole mapping as a mutable slice, for the single writer (the guest).
    ///
    /// [`MemoryReader`]s of it may still copy pages out meanwhile, as other processes may:
    /// like theirs, their copies then mix old and new bytes. A sender only reads through
    /// this slice, and only while its guest is paused.
    ///
    /// Panics on a read-only mapping.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.mode != MapMode::SharedReadOnly, "read-only mapping");
        // SAFETY: the mapping is `len` bytes, writable (checked above), and `&mut self`
        // guarantees no other reference into it exists in this process (readers copy
        // through raw pointers and hold none).
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr.as_ptr(), self.map.len) }
    }

    /// Copy `buf.len()` bytes starting at `offset` into `buf`.
    ///
    /// Another process may write the memory at the same time; the copy then holds a mix of
    /// old and new bytes, which dirty tracking accounts for.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) {
        self.map.read_at(offset, buf)
    }

    /// [`Self::read_at`], but the copy comes from the memory's file (`pread`), through the
    /// mapping only if that fails: reading pages another process wrote with `pwrite`
    /// through this mapping would fault its page tables in, 4 KiB at a time.
    pub fn read_from_file_at(&self, offset: usize, buf: &mut [u8]) {
        use std::os::unix::fs::FileExt;
        let (file, start, len) = self.file_at(offset);
        let within = offset + buf.len() <= start + len;
        if !within || file.read_exact_at(buf, (offset - start) as u64).is_err() {
            self.read_at(offset, buf);
        }
    }

    /// A reader of this mapping for other threads (see [`MemoryReader`]).
    pub fn reader(&self) -> MemoryReader {
        MemoryReader {
            map: Arc::clone(&self.map),
        }
    }

    /// Copy page `page` into `buf` (which must be [`PAGE_SIZE`] bytes).
    pub fn read_page(&self, page: u64, buf: &mut [u8]) {
        self.map.read_page(page, buf)
    }

    /// Atomically load the aligned little-endian u64 at `offset` (e.g. a counter that
    /// another process updates).
    pub fn load_u64(&self, offset: usize) -> u64 {
        assert!(
            offset.is_multiple_of(8) && offset + 8 <= self.map.len,
            "bad u64 offset {offset}"
        );
        // SAFETY: in bounds and 8-byte aligned (the mapping is page aligned); AtomicU64 has
        // the same layout as u64, and atomics are sound under concurrent writers.
        let a = unsafe { &*(self.map.ptr.as_ptr().add(offset) as *const AtomicU64) };
        u64::from_le(a.load(Ordering::Acquire))
    }

    /// Flush the mapping to the file (msync); only matters for disk-backed files.
    pub fn sync(&self) -> Result<(), MemoryError> {
        // SAFETY: the range is exactly our mapping.
        let rc = unsafe { libc::msync(self.map.ptr.as_ptr().cast(), self.map.len, libc::MS_SYNC) };
        if rc != 0 {
            return Err(io_err("msync")(io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("path", &self.path)
            .field("len", &self.map.len)
            .field("mode", &self.mode)
            .finish()
    }
}

/// The union of two sorted page lists (trackers', deferral's), sorted and without duplicates
/// even where an input repeats a page.
pub fn merge_pages(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let next = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) if x < y => {
                i += 1;
                x
            }
            (Some(&x), Some(&y)) if y < x => {
                j += 1;
                y
            }
            (Some(&x), Some(_)) => {
                i += 1;
                j += 1;
                x
            }
            (Some(&x), None) => {
                i += 1;
                x
            }
            (None, Some(&y)) => {
                j += 1;
                y
            }
            (None, None) => unreachable!(),
        };
        if out.last() != Some(&next) {
            out.push(next);
        }
    }
    out
}

/// Permissions of every guest memory file vmstream creates: guest memory holds the guest's
/// secrets, so only its owner may read it, whatever the umask.
pub const PRIVATE_MODE: u32 = 0o600;

/// Sets `file` to [`PRIVATE_MODE`] (a file that existed before keeps its own mode
/// otherwise, and the umask can only take bits away).
pub fn make_private(file: &File) -> io::Result<()> {
    file.set_permissions(std::fs::Permissions::from_mode(PRIVATE_MODE))
}

/// Reads from the unix socket `socket` into `buf`, with the file descriptors that came with
/// those bytes (`SCM_RIGHTS`: guest memory handed over by descriptor, see
/// `vmstream/PROTOCOL.md`). Here because adopting a passed descriptor is `unsafe`, and the
/// descriptors passed are guest memory files.
pub fn recv_with_fds(
    socket: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    loop {
        let mut iov = [io::IoSliceMut::new(buf)];
        let msg = match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` in this process for this
                    // message (SCM_RIGHTS); nothing else knows or owns it.
                    fds.push(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        return Ok((msg.bytes, fds));
    }
}

/// Why [`open_owned`] failed.
#[derive(Debug)]
pub enum OwnError {
    /// Another guest holds the file.
    InUse,
    /// Opening the file failed.
    Open(io::Error),
    /// Locking it failed for another reason than its being held.
    Lock(io::Error),
}

/// Opens the guest memory file at `path` (created if missing and `create`, never
/// truncated) and takes an exclusive `flock` on it, held while the returned file stays
/// open. The caller uses the returned handle, never the path again. With `create` (a
/// fresh guest that will write the file from scratch) a symbolic link at `path` is
/// refused rather than followed: a link planted there must not make the guest overwrite
/// the file it points to. Every guest owns its file this way (a guest process, the receiver's resumed guest,
/// KVM RAM): a second guest on the same file (a `vmstream send --size` with the path of a
/// guest still running, say) would truncate or rewrite the memory under the first, which
/// then dies of SIGBUS or corrupts its state.
pub fn open_owned(path: &Path, create: bool) -> Result<File, OwnError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(PRIVATE_MODE)
        .custom_flags(if create { libc::O_NOFOLLOW } else { 0 })
        .open(path)
        .map_err(OwnError::Open)?;
    if create {
        make_private(&file).map_err(OwnError::Open)?;
    }
    lock_owned(file)
}

/// [`open_owned`] for a file already open (a committed image, still mapped): takes the
/// lock on another handle of the same open file, returned to hold.
pub fn own_open_file(file: &File) -> Result<File, OwnError> {
    lock_owned(file.try_clone().map_err(OwnError::Open)?)
}

fn lock_owned(file: File) -> Result<File, OwnError> {
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(OwnError::InUse),
        Err(std::fs::TryLockError::Error(e)) => Err(OwnError::Lock(e)),
    }
}

/// Refuses a guest memory size that is zero or not a whole number of pages.
pub(crate) fn check_size(size: u64) -> Result<(), MemoryError> {
    if size == 0 || !size.is_multiple_of(PAGE_SIZE as u64) {
        return Err(MemoryError::BadSize(size));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmstream-mem-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn data_pages_are_the_written_ones() {
        let mut mem = GuestMemory::memfd("data-pages", 200 * PAGE_SIZE as u64).unwrap();
        assert!(mem.data_pages().unwrap().iter().all(|&w| w == 0));
        for p in [0usize, 3, 64, 199] {
            mem.as_mut_slice()[p * PAGE_SIZE + 100] = 1;
        }
        let bits = mem.data_pages().unwrap();
        let set: Vec<u64> = (0..200u64)
            .filter(|p| bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect();
        assert_eq!(set, vec![0, 3, 64, 199]);
    }

    #[test]
    fn data_pages_not_in_memory_are_found_in_the_file() {
        use std::os::unix::fs::FileExt;
        // A disk file system: the written pages leave the page cache after a sync, and
        // only SEEK_DATA still sees them.
        let p = std::env::temp_dir().join(format!("vmstream-data-pages-{}", std::process::id()));
        let mem = GuestMemory::create(&p, 200 * PAGE_SIZE as u64).unwrap();
        for pg in [5u64, 6, 150] {
            mem.file().write_at(&[1], pg * PAGE_SIZE as u64).unwrap();
        }
        mem.file().sync_all().unwrap();
        nix::fcntl::posix_fadvise(
            mem.file(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        let bits = mem.data_pages().unwrap();
        let set: Vec<u64> = (0..200u64).filter(|&p| !page_is_hole(&bits, p)).collect();
        std::fs::remove_file(&p).unwrap();
        assert_eq!(set, vec![5, 6, 150]);
    }

    #[test]
    fn a_reader_sees_later_writes_from_another_thread_and_outlives_its_memory() {
        let mut mem = GuestMemory::memfd("reader", 4 * PAGE_SIZE as u64).unwrap();
        let reader = mem.reader();
        mem.as_mut_slice()[2 * PAGE_SIZE + 5] = 0x5A;
        let page = std::thread::spawn({
            let reader = reader.clone();
            move || {
                let mut page = vec![0u8; PAGE_SIZE];
                reader.read_page(2, &mut page);
                page
            }
        })
        .join()
        .unwrap();
        assert_eq!(page[5], 0x5A);
        assert_eq!(page.iter().filter(|&&b| b != 0).count(), 1);
        // The mapping stays until its last holder goes: a reader the encode workers still
        // hold must not read unmapped memory after the guest's side dropped its own.
        mem.as_mut_slice()[3 * PAGE_SIZE] = 9;
        drop(mem);
        let mut page = vec![0u8; PAGE_SIZE];
        reader.read_page(3, &mut page);
        assert_eq!(page[0], 9);
    }

    #[test]
    fn shared_mappings_see_each_other() {
        let p = tmp("shared");
        let mut a = GuestMemory::create(&p, 8 * 4096).unwrap();
        let b = GuestMemory::open(&p, MapMode::SharedReadOnly).unwrap();
        a.as_mut_slice()[4096 + 7] = 0xAB;
        let mut page = vec![0u8; PAGE_SIZE];
        b.read_page(1, &mut page);
        assert_eq!(page[7], 0xAB);
        assert_eq!(b.pages(), 8);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn private_mapping_does_not_change_file() {
        let p = tmp("private");
        let mut a = GuestMemory::create(&p, 4096).unwrap();
        a.as_mut_slice()[0] = 1;
        let mut c = GuestMemory::open(&p, MapMode::Private).unwrap();
        c.as_mut_slice()[0] = 2;
        assert_eq!(a.as_mut_slice()[0], 1);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn merge_is_sorted_and_deduplicated() {
        assert_eq!(merge_pages(&[1, 3, 5], &[2, 3, 9]), vec![1, 2, 3, 5, 9]);
        assert_eq!(merge_pages(&[], &[4]), vec![4]);
        assert_eq!(merge_pages(&[4, 4], &[]), vec![4]);
    }

    #[test]
    fn guest_memory_files_are_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // A file that existed with wider permissions, created anew as guest memory.
        let old = tmp("private-old");
        std::fs::write(&old, b"x").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(GuestMemory::create(&old, 4096).unwrap());
        assert_eq!(mode(&old), 0o600);
        // A new file a guest owns, under the usual 022 umask or any other.
        let new = tmp("private-new");
        let _ = std::fs::remove_file(&new);
        drop(open_owned(&new, true).unwrap());
        assert_eq!(mode(&new), 0o600);
        // Opening an existing file does not change it.
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o640)).unwrap();
        drop(open_owned(&new, false).unwrap());
        assert_eq!(mode(&new), 0o640);
        std::fs::remove_file(&old).unwrap();
        std::fs::remove_file(&new).unwrap();
    }

    /// A link planted where a fresh guest's memory file is to be created is refused, not
    /// followed: the file it points to keeps its bytes and its length. An existing file is
    /// opened through a link as the operator named it.
    #[test]
    fn a_new_memory_file_is_never_created_through_a_link() {
        let victim = tmp("link-victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = tmp("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(matches!(
            GuestMemory::create(&link, 4096),
            Err(MemoryError::Io { .. })
        ));
        assert!(matches!(open_owned(&link, true), Err(OwnError::Open(_))));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        drop(open_owned(&link, false).unwrap());
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_file(&victim).unwrap();
    }

    #[test]
    fn memfd_is_reachable_by_path() {
        let mut m = GuestMemory::memfd("vmstream-test", 2 * 4096).unwrap();
        m.as_mut_slice()[4096] = 9;
        m.as_mut_slice()[8..16].copy_from_slice(&77u64.to_le_bytes());
        let other = GuestMemory::open(m.path(), MapMode::SharedReadOnly).unwrap();
        let mut b = [0u8; 1];
        other.read_at(4096, &mut b);
        assert_eq!(b[0], 9);
        assert_eq!(other.load_u64(8), 77);
    }

    #[test]
    fn bad_sizes_are_rejected() {
        let p = tmp("bad");
        assert!(matches!(
            GuestMemory::create(&p, 0),
            Err(MemoryError::BadSize(0))
        ));
        assert!(matches!(
            GuestMemory::create(&p, 100),
            Err(MemoryError::BadSize(100))
        ));
        let _ = GuestMemory::create(&p, 4096).unwrap();
        assert!(matches!(
            GuestMemory::open_sized(&p, 8192, MapMode::SharedReadOnly),
            Err(MemoryError::SizeMismatch { .. })
        ));
        std::fs::remove_file(&p).unwrap();
    }
}
