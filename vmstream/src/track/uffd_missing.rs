//! userfaultfd in MISSING mode, own FFI: post-copy's page placement.
//!
//! A destination registers the resumed guest's shared memory mapping (tmpfs or memfd) with
//! it; an access to a page the file does not hold (a hole) blocks the accessing thread and
//! queues a fault message, and the page is then placed atomically with `UFFDIO_COPY`, which
//! fails with `EEXIST` rather than overwrite a page already there.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;

use crate::memory::PAGE_SIZE;

use super::uffd::{
    check, iowr, UffdioApi, UffdioRange, UffdioRegister, UFFDIO_API, UFFDIO_REGISTER, UFFD_API,
};

const REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFD_FEATURE_MISSING_SHMEM`: the kernel reports MISSING faults on shmem.
const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const EVENT_PAGEFAULT: u8 = 0x12;
/// `sizeof(struct uffd_msg)`.
const MSG_LEN: usize = 32;

/// `_IOR(0xAA, nr, size)`.
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (UFFD_API << 8) | nr
}
const UFFDIO_UNREGISTER: u64 = ior(0x01, 16);
const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_COPY: u64 = iowr(UFFD_API, 0x03, 40);

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// What became of a page offered to [`MissingFaults::place`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The page was missing and now holds the bytes given.
    Placed,
    /// A page was already there (`EEXIST`): nothing was written.
    AlreadyPresent,
}

/// A userfaultfd with one address range of this process registered in MISSING mode.
/// Dropping it unregisters the range: a thread blocked on a fault then retries, and the
/// kernel fills a missing shmem page with zeros, so a destination whose pages cannot come
/// keeps it (see `POSTCOPY.md`, *When the guest cannot continue*).
#[derive(Debug)]
pub struct MissingFaults {
    fd: File,
    start: u64,
    len: u64,
}

impl MissingFaults {
    /// Creates a userfaultfd and registers `[start, start+len)` (page aligned) for MISSING
    /// faults.
    ///
    /// # Safety
    /// `[start, start+len)` must be a shared file mapping of this process (tmpfs, memfd)
    /// that stays mapped while the returned value lives.
    pub unsafe fn register(start: u64, len: u64) -> io::Result<Self> {
        // SAFETY: plain syscall with flag arguments; returns a new fd or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        check(raw as libc::c_int, "userfaultfd")?;
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let fd = unsafe { File::from_raw_fd(raw as libc::c_int) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `UffdioApi`.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        check(rc, "UFFDIO_API")?;
        if api.features & FEATURE_MISSING_SHMEM == 0 {
            return Err(io::Error::other(
                "this kernel's userfaultfd has no MISSING mode on shared memory",
            ));
        }
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `UffdioRegister`; the range is ours
        // per the caller's contract.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        check(rc, "UFFDIO_REGISTER (MISSING)")?;
        Ok(Self { fd, start, len })
    }

    /// Waits up to `timeout` for faults and appends the page numbers (from the range's
    /// start) of those that came to `pages`.
    pub fn wait_faults(&self, timeout: Duration, pages: &mut Vec<u64>) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok(()),
                _ => Err(e),
            };
        }
        if n == 0 {
            return Ok(());
        }
        let mut buf = [0u8; MSG_LEN * 64];
        loop {
            // SAFETY: reads at most `buf.len()` bytes into `buf`.
            let got =
                unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if got < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                    _ => Err(e),
                };
            }
            if got == 0 {
                return Ok(());
            }
            for msg in buf[..got as usize].chunks_exact(MSG_LEN) {
                if msg[0] != EVENT_PAGEFAULT {
                    continue;
                }
                let addr = u64::from_le_bytes(msg[16..24].try_into().expect("8 bytes"));
                if (self.start..self.start + self.len).contains(&addr) {
                    pages.push((addr - self.start) / PAGE_SIZE as u64);
                }
            }
            if (got as usize) < buf.len() {
                return Ok(());
            }
        }
    }

    /// Places `data` (one page) as page `page` of the range, atomically: the page's
    /// waiters wake once it is whole. Never overwrites a page that is there.
    pub fn place(&self, page: u64, data: &[u8]) -> io::Result<Placed> {
        assert_eq!(data.len(), PAGE_SIZE, "one page");
        let dst = self.start + page * PAGE_SIZE as u64;
        if dst + PAGE_SIZE as u64 > self.start + self.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("page {page} is beyond the registered range"),
            ));
        }
        loop {
            let mut copy = UffdioCopy {
                dst,
                src: data.as_ptr() as u64,
                len: PAGE_SIZE as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads one `UffdioCopy` and `len` bytes at `src` (our
            // slice), and fills the missing page at `dst`, inside the registered range
            // (checked above); it never overwrites a present page (EEXIST).
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut copy) };
            if rc == 0 {
                return Ok(Placed::Placed);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EEXIST) => return Ok(Placed::AlreadyPresent),
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => return Err(io::Error::new(e.kind(), format!("UFFDIO_COPY: {e}"))),
            }
        }
    }

    /// Wakes the threads waiting on page `page` (already placed by another way).
    pub fn wake(&self, page: u64) -> io::Result<()> {
        let mut r = UffdioRange {
            start: self.start + page * PAGE_SIZE as u64,
            len: PAGE_SIZE as u64,
        };
        // SAFETY: UFFDIO_WAKE reads one `UffdioRange` of the registered range.
        check(
            unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut r) },
            "UFFDIO_WAKE",
        )
    }

    /// Ends fault handling on the whole range (every owed page is placed): holes fault
    /// as usual again, and waiting threads retry.
    pub fn unregister(&self) -> io::Result<()> {
        let mut r = UffdioRange {
            start: self.start,
            len: self.len,
        };
        // SAFETY: UFFDIO_UNREGISTER reads one `UffdioRange`: the range we registered.
        check(
            unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut r) },
            "UFFDIO_UNREGISTER",
        )
    }

    /// Pages in the registered range.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemory;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
    }

    /// A thread reading a hole blocks until the page is placed, and reads what was placed;
    /// a second placement of the same page is refused, not written.
    #[test]
    fn a_fault_waits_for_the_placed_page_and_a_second_copy_is_refused() {
        let mut mem = GuestMemory::memfd("uffd-missing-test", 4 * PAGE_SIZE as u64).unwrap();
        // SAFETY: `mem` is a shared memfd mapping that outlives `uffd` (dropped first below).
        let uffd = unsafe { MissingFaults::register(mem.addr(), mem.len() as u64) }.unwrap();
        let addr = mem.addr() as usize;
        let reader = std::thread::spawn(move || {
            // SAFETY: page 2 of the live mapping; the read blocks until placed.
            unsafe { std::ptr::read_volatile((addr + 2 * PAGE_SIZE + 5) as *const u8) }
        });
        let mut pages = Vec::new();
        while pages.is_empty() {
            uffd.wait_faults(Duration::from_secs(5), &mut pages)
                .unwrap();
        }
        assert_eq!(pages, vec![2]);
        assert_eq!(uffd.place(2, &[7u8; PAGE_SIZE]).unwrap(), Placed::Placed);
        assert_eq!(reader.join().unwrap(), 7);
        assert_eq!(
            uffd.place(2, &[9u8; PAGE_SIZE]).unwrap(),
            Placed::AlreadyPresent
        );
        uffd.unregister().unwrap();
        drop(uffd);
        assert_eq!(mem.as_mut_slice()[2 * PAGE_SIZE], 7);
    }
}
