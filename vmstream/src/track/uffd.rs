//! userfaultfd write-protect in asynchronous mode (`UFFD_FEATURE_WP_ASYNC`), own FFI.
//!
//! The guest arms it on its memory mapping: every page is write-protected, and the first
//! write to a page clears its protection in the kernel without a fault message. A tracker
//! then finds the written pages with the `PAGEMAP_SCAN` ioctl (see [`crate::track`]), which
//! also re-protects them. Only writes through this mapping in this process are tracked
//! (not `pwrite(2)`, not other processes' mappings).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

/// The userfaultfd ABI pieces both modes use (`linux/userfaultfd.h`): `uffd_missing` takes
/// them from here.
pub(super) const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: WP on shmem / hugetlbfs.
const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED`: protect pages that were never faulted in, too.
const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`: the kernel resolves WP faults itself.
const FEATURE_WP_ASYNC: u64 = 1 << 15;
const REGISTER_MODE_WP: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `_IOWR(0xAA, nr, size)`.
pub(super) const fn iowr(ty: u64, nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (ty << 8) | nr
}
pub(super) const UFFDIO_API: u64 = iowr(0xAA, 0x3F, 24);
pub(super) const UFFDIO_REGISTER: u64 = iowr(0xAA, 0x00, 32);
const UFFDIO_WRITEPROTECT: u64 = iowr(0xAA, 0x06, 24);

#[repr(C)]
pub(super) struct UffdioApi {
    pub(super) api: u64,
    pub(super) features: u64,
    pub(super) ioctls: u64,
}

#[repr(C)]
pub(super) struct UffdioRange {
    pub(super) start: u64,
    pub(super) len: u64,
}

#[repr(C)]
pub(super) struct UffdioRegister {
    pub(super) range: UffdioRange,
    pub(super) mode: u64,
    pub(super) ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// A userfaultfd with async write-protect armed on one address range of this process.
/// Keep it alive as long as tracking is wanted: closing it drops the protection.
#[derive(Debug)]
pub struct WpAsync {
    fd: File,
    start: u64,
    len: u64,
}

/// `Err` with `what` and errno if `rc` is negative.
pub(super) fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

impl WpAsync {
    /// Create a userfaultfd, register `[start, start+len)` for WP and write-protect it all.
    ///
    /// # Safety
    /// `[start, start+len)` must be a mapping of this process that stays mapped while the
    /// returned value lives (the kernel only changes page protections, never contents).
    pub unsafe fn arm(start: u64, len: u64) -> io::Result<Self> {
        // SAFETY: plain syscall with flag arguments; returns a new fd or -1.
        let raw = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
            )
        };
        check(raw as libc::c_int, "userfaultfd")?;
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let fd = unsafe { File::from_raw_fd(raw as libc::c_int) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED | FEATURE_WP_HUGETLBFS_SHMEM,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `UffdioApi`.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        check(rc, "UFFDIO_API (WP_ASYNC)")?;
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `UffdioRegister`; the range is ours
        // per the caller's contract.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        check(rc, "UFFDIO_REGISTER (WP)")?;
        let wp = Self { fd, start, len };
        wp.protect_all()?;
        Ok(wp)
    }

    /// Write-protect the whole range again (every page counts as not written).
    pub fn protect_all(&self) -> io::Result<()> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange {
                start: self.start,
                len: self.len,
            },
            mode: WRITEPROTECT_MODE_WP,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one `UffdioWriteprotect` for a registered range.
        check(
            unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut w) },
            "UFFDIO_WRITEPROTECT",
        )
    }

    /// Start address of the protected range.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Length of the protected range.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(super::UFFDIO_API, 0xc018_aa3f);
        assert_eq!(super::UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(super::UFFDIO_WRITEPROTECT, 0xc018_aa06);
    }
}
