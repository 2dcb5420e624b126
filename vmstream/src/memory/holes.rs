//! The holes of guest memory files: which pages hold data (`SEEK_DATA` / `SEEK_HOLE`), so
//! that neither side reads (and so allocates) a page nobody wrote.

use std::fs::File;
use std::io;

use super::PAGE_SIZE;

/// The data pages of the first `len` bytes of `file` (any handle of it: the scrubber keeps
/// its own), as [`super::GuestMemory::data_pages`] finds them but from `SEEK_DATA` / `SEEK_HOLE`
/// alone (there is no mapping to ask `mincore`).
pub fn data_pages_of(file: &File, len: usize) -> io::Result<Vec<u64>> {
    let pages = len.div_ceil(PAGE_SIZE);
    let mut bits = vec![0u64; pages.div_ceil(64)];
    mark_data_pages(file, 0, 0, pages, &mut bits)?;
    Ok(bits)
}

/// Sets in `bits` the pages of `from..to` that hold data in `file`, whose first page is
/// page `base` of `bits` (`SEEK_DATA` / `SEEK_HOLE`; a page partly data counts as data).
pub(super) fn mark_data_pages(
    file: &File,
    base: usize,
    from: usize,
    to: usize,
    bits: &mut [u64],
) -> io::Result<()> {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    let page = PAGE_SIZE as i64;
    let mut q = from;
    while q < to {
        let data = match lseek(file, (q - base) as i64 * page, Whence::SeekData) {
            Ok(d) => (d / page) as usize + base,
            Err(Errno::ENXIO) => break, // no data after `q`
            Err(e) => return Err(e.into()),
        };
        if data >= to {
            break;
        }
        let hole = lseek(file, (data - base) as i64 * page, Whence::SeekHole)?;
        let hole = (((hole + page - 1) / page) as usize + base).clamp(data + 1, to);
        for p in data..hole {
            bits[p / 64] |= 1 << (p % 64);
        }
        q = hole;
    }
    Ok(())
}
