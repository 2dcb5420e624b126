//! The directory of a receive's target, opened once: every file the receiver creates, opens,
//! renames or removes in it is named relative to this handle and never through a symbolic
//! link, so a link planted in the directory cannot redirect a write to another file.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::memory::PRIVATE_MODE;

/// An open directory and its path (for messages only: nothing is looked up by it again).
#[derive(Debug)]
pub(super) struct TargetDir {
    handle: File,
    path: PathBuf,
}

/// Whether two `stat` results are of the same file.
fn same_file(a: &FileStat, b: &FileStat) -> bool {
    a.st_dev == b.st_dev && a.st_ino == b.st_ino
}

impl TargetDir {
    /// Opens the directory `path` (the operator's path: its components are followed).
    pub(super) fn open(path: &Path) -> io::Result<TargetDir> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(TargetDir {
            handle: File::from(fd),
            path: path.to_path_buf(),
        })
    }

    /// The path of `name` in this directory, for messages.
    pub(super) fn shown(&self, name: &OsStr) -> PathBuf {
        self.path.join(name)
    }

    /// The directory's path, for messages.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// A second handle of the same directory (its own open file description, so its
    /// `flock` is separate from this one's).
    pub(super) fn reopen(&self) -> io::Result<File> {
        let fd = openat(
            self.handle.as_fd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    /// Creates `name` as a new, empty, private file and opens it read-write. Fails with
    /// `AlreadyExists` if anything has that name, a symbolic link included (`O_EXCL` never
    /// follows one).
    pub(super) fn create_new(&self, name: &OsStr) -> io::Result<File> {
        let fd = openat(
            self.handle.as_fd(),
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(PRIVATE_MODE),
        )?;
        Ok(File::from(fd))
    }

    /// Opens the regular file `name` read-only, without following a link and without
    /// blocking on a FIFO: `Ok(None)` if `name` is absent or not a regular file.
    pub(super) fn open_regular(&self, name: &OsStr) -> io::Result<Option<File>> {
        let fd = match openat(
            self.handle.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            // ELOOP: a symbolic link.
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ELOOP) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let st = fstat(&fd)?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Ok(None);
        }
        Ok(Some(File::from(fd)))
    }

    /// Whether `name` is (not following a link) the very file `file` is open on.
    pub(super) fn names(&self, name: &OsStr, file: &File) -> io::Result<bool> {
        let ours = fstat(file)?;
        match fstatat(self.handle.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(same_file(&st, &ours)),
            Err(nix::errno::Errno::ENOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames `from` to `to` in this directory (replacing whatever `to` is, a link
    /// itself rather than what it points to).
    pub(super) fn rename(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        renameat(self.handle.as_fd(), from, self.handle.as_fd(), to)?;
        Ok(())
    }

    /// Removes the name `name` (a link itself, never what it points to).
    pub(super) fn remove(&self, name: &OsStr) -> io::Result<()> {
        unlinkat(self.handle.as_fd(), name, UnlinkatFlags::NoRemoveDir)?;
        Ok(())
    }

    /// The names in the directory.
    pub(super) fn list(&self) -> io::Result<Vec<OsString>> {
        use std::os::unix::ffi::OsStrExt;
        let mut dir = nix::dir::Dir::from_fd(self.reopen()?.into())?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let name = entry?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(OsStr::from_bytes(&name).to_os_string());
            }
        }
        Ok(names)
    }

    /// Makes the directory's entries durable (after a rename).
    pub(super) fn sync(&self) -> io::Result<()> {
        self.handle.sync_all()
    }
}
