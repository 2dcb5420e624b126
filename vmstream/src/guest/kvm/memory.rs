//! Guest RAM: one shared (MAP_SHARED) mapping of a memfd or a regular file, so
//! a KVM guest's memory is also a file other processes (and the file-backed
//! migration code) can map. The VMM's own writes go through vm-memory, which
//! records them in an atomic dirty bitmap that the dirty logs OR in.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};

use crate::guest::kvm::abi::PD_MAX_TABLES;
use crate::guest::kvm::error::{KvmError, Result};
use crate::memory::{open_owned, OwnError, PAGE_SIZE};
use crate::track::uffd_missing::MissingFaults;

/// Guest RAM alignment: the identity map uses 2 MiB pages.
pub const RAM_ALIGN: u64 = 2 << 20;
/// Smallest guest RAM: system area (2 MiB) plus room for ledger and blocks.
pub const RAM_MIN: u64 = 4 << 20;
/// Largest guest RAM: limited by the page tables reserved in the system area.
pub const RAM_MAX: u64 = PD_MAX_TABLES << 30;

/// Guest RAM of one VM, guest-physical address 0 up to `size`.
pub struct GuestRam {
    file: File,
    path: Option<PathBuf>,
    size: u64,
    mem: GuestMemoryMmap<AtomicBitmap>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("size", &self.size)
            .finish()
    }
}

/// Refuses a RAM size the VMM cannot map (also checked by `vmstream send` before it starts
/// anything).
pub fn check_size(size: u64) -> Result<()> {
    if !(RAM_MIN..=RAM_MAX).contains(&size) || !size.is_multiple_of(RAM_ALIGN) {
        return Err(KvmError::Config(format!(
            "guest RAM of {size} bytes: must be a multiple of 2 MiB in [{RAM_MIN}, {RAM_MAX}]"
        )));
    }
    Ok(())
}

impl GuestRam {
    /// Fresh zeroed RAM in an anonymous memfd.
    pub fn memfd(size: u64) -> Result<Self> {
        check_size(size)?;
        // SAFETY: memfd_create takes a NUL-terminated name and flags; the
        // returned descriptor (checked below) is owned by nobody else.
        let fd = unsafe { libc::memfd_create(c"vmstream-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(KvmError::Memory(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, valid descriptor that we now own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(KvmError::Memory)?;
        Self::from_file(file, size)
    }

    /// Opens (creating if needed) a regular file as guest RAM of `size` bytes.
    /// A shorter file is extended with zeros; existing contents are kept.
    pub fn open(path: &Path, size: u64) -> Result<Self> {
        Self::owned(path, size, false)
    }

    /// Like [`open`](Self::open), for a fresh guest: the file's old contents are dropped
    /// (after the lock is taken, so never under a guest still running on it).
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        Self::owned(path, size, true)
    }

    /// Opens `path` and holds its lock for the RAM's life, as every guest owns its memory
    /// file ([`open_owned`]).
    fn owned(path: &Path, size: u64, fresh: bool) -> Result<Self> {
        // An existing file is opened as named (the receiver resumes a handed-over memfd
        // through its /proc/self/fd link); only a new one is created, never through a link.
        let opened = match open_owned(path, false) {
            Err(OwnError::Open(e)) if e.kind() == io::ErrorKind::NotFound => open_owned(path, true),
            other => other,
        };
        let file = opened.map_err(|e| match e {
            OwnError::InUse => KvmError::Config(format!(
                "{} is in use by another running guest",
                path.display()
            )),
            OwnError::Open(e) | OwnError::Lock(e) => KvmError::Memory(e),
        })?;
        if fresh {
            file.set_len(0).map_err(KvmError::Memory)?;
        }
        let mut ram = Self::from_file(file, size)?;
        ram.path = Some(path.to_path_buf());
        Ok(ram)
    }

    /// Maps `file` (a memfd or regular file) shared as guest RAM of `size`
    /// bytes; the file is extended to `size` if shorter.
    pub fn from_file(file: File, size: u64) -> Result<Self> {
        check_size(size)?;
        let len = file.metadata().map_err(KvmError::Memory)?.len();
        if len < size {
            file.set_len(size).map_err(KvmError::Memory)?;
        }
        let mapped = file.try_clone().map_err(KvmError::Memory)?;
        let region =
            MmapRegion::<AtomicBitmap>::from_file(FileOffset::new(mapped, 0), size as usize)
                .map_err(|e| KvmError::GuestMemory(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| KvmError::GuestMemory("region overflows".into()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| KvmError::GuestMemory(e.to_string()))?;
        Ok(Self {
            file,
            path: None,
            size,
            mem,
        })
    }

    /// A new memfd holding a byte-exact copy of this RAM (e.g. a migration target).
    pub fn copy_to_memfd(&self) -> Result<Self> {
        let copy = Self::memfd(self.size)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < self.size {
            let n = buf.len().min((self.size - at) as usize);
            self.read(at, &mut buf[..n])?;
            copy.write_untracked(at, &buf[..n])?;
            at += n as u64;
        }
        Ok(copy)
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE as u64
    }

    /// The backing file (memfd or regular file).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path given to [`GuestRam::open`], if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// A path any process may open to map the same RAM (also for memfds):
    /// the `open` path, else `/proc/PID/fd/FD` of this process.
    pub fn shared_path(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                self.file.as_raw_fd()
            ))
        })
    }

    /// Registers this RAM's mapping, the one KVM's memory slot and the VMM access, for
    /// userfaultfd MISSING faults (post-copy): a vCPU or VMM thread touching a hole of the
    /// backing file (tmpfs, memfd) then blocks until the page is placed. Call it before
    /// the VM exists or anything reads the RAM.
    pub fn register_missing(&self) -> io::Result<MissingFaults> {
        // SAFETY: `[host_addr, host_addr + size)` is this RAM's shared file mapping, which
        // lives as long as the RAM (the VM holds it in an `Arc`); a placement after it was
        // unmapped fails with an error and never writes elsewhere.
        unsafe { MissingFaults::register(self.host_addr(), self.size) }
    }

    /// Host address of guest-physical 0 (for the KVM memory slot).
    pub(crate) fn host_addr(&self) -> u64 {
        self.region().as_ptr() as u64
    }

    fn region(&self) -> &GuestRegionMmap<AtomicBitmap> {
        self.mem.iter().next().expect("one region")
    }

    /// The VMM's own writes since the last reset, one bit per 4 KiB page.
    pub(crate) fn vmm_dirty(&self) -> &AtomicBitmap {
        MmapRegion::bitmap(self.region())
    }

    /// Copies guest bytes at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| KvmError::GuestMemory(e.to_string()))
    }

    /// Writes `data` at `gpa`; the pages are marked dirty for the dirty logs.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| KvmError::GuestMemory(e.to_string()))
    }

    /// Writes without marking pages dirty (only for filling a fresh copy).
    fn write_untracked(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.write(gpa, data)?;
        self.vmm_dirty().reset_addr_range(gpa as usize, data.len());
        Ok(())
    }

    /// Reads an aligned u64 atomically (relaxed): safe while vCPUs run.
    pub fn load_u64(&self, gpa: u64) -> Result<u64> {
        self.mem
            .load::<u64>(GuestAddress(gpa), Ordering::Relaxed)
            .map_err(|e| KvmError::GuestMemory(e.to_string()))
    }

    /// Reads a u64 (little-endian, any alignment).
    pub fn read_u64(&self, gpa: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a u64 (little-endian); marks the page dirty.
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<()> {
        self.write(gpa, &value.to_le_bytes())
    }
}

/// Read access to guest RAM for the checks that only read it (parameter block, ledger
/// check): the VM's [`GuestRam`], or a byte image of it, such as the image a migration
/// destination received, read through the mapping it was written through (a fresh mapping
/// would fault every page in again, during the downtime).
pub trait RamRead: Sync {
    /// Size in bytes.
    fn ram_size(&self) -> u64;

    /// Copies guest bytes at `gpa` into `buf`.
    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<()>;

    /// Reads a u64 (little-endian, any alignment).
    fn read_le_u64(&self, gpa: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read_bytes(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

impl RamRead for GuestRam {
    fn ram_size(&self) -> u64 {
        self.size()
    }

    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.read(gpa, buf)
    }
}

impl RamRead for [u8] {
    fn ram_size(&self) -> u64 {
        self.len() as u64
    }

    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let src = usize::try_from(gpa)
            .ok()
            .and_then(|at| self.get(at..at.checked_add(buf.len())?))
            .ok_or_else(|| {
                KvmError::GuestMemory(format!(
                    "read of {} bytes at {gpa:#x} outside {} bytes of RAM",
                    buf.len(),
                    self.len()
                ))
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }
}
