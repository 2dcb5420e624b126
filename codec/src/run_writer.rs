//! A receive worker's run of consecutive decoded pages, written to the file behind
//! destination memory with one positional write, rather than through the mapping a page at a
//! time (see [`ReceiverConfig::memory_file`](crate::ReceiverConfig::memory_file) for why).
#![forbid(unsafe_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::PAGE_SIZE;

/// Pages one write covers at most: an ownership chunk ([`crate::memory::CHUNK_PAGES`]), the
/// longest run of consecutive pages one worker owns; 256 KiB stay in the core's L2 cache
/// between the decoder writing them and the kernel copying them.
pub(crate) const RUN_PAGES: usize = crate::memory::CHUNK_PAGES as usize;

/// Decoded pages waiting to be written as one run.
pub(crate) struct RunWriter {
    file: Arc<File>,
    buf: Vec<u8>,
    /// The run's first page.
    first: u64,
    /// Pages in the run.
    len: usize,
}

impl RunWriter {
    pub(crate) fn new(file: Arc<File>) -> RunWriter {
        RunWriter {
            file,
            buf: vec![0; RUN_PAGES * PAGE_SIZE],
            first: 0,
            len: 0,
        }
    }

    /// Whether `page` can join the run: it is empty, or `page` follows its last page and it
    /// has room.
    pub(crate) fn extends(&self, page: u64) -> bool {
        self.len == 0 || (page == self.first + self.len as u64 && self.len < RUN_PAGES)
    }

    /// Adds `page` to the run (it [`extends`](Self::extends) it) and returns its slot, for
    /// the decoder to fill completely.
    pub(crate) fn push(&mut self, page: u64) -> &mut [u8] {
        debug_assert!(self.extends(page));
        if self.len == 0 {
            self.first = page;
        }
        let at = self.len * PAGE_SIZE;
        self.len += 1;
        &mut self.buf[at..at + PAGE_SIZE]
    }

    /// Forgets the last page pushed (its decode failed).
    pub(crate) fn pop(&mut self) {
        self.len = self.len.saturating_sub(1);
    }

    /// Writes the run to the file at its pages' offsets, then shows each page to `written`;
    /// the run is empty afterwards, whether the write succeeded or not. On an error (no
    /// space left on the file system, say) the pages may be partly written.
    pub(crate) fn flush(
        &mut self,
        mut written: impl FnMut(u64, &[u8]),
    ) -> Result<(), (u64, usize, std::io::Error)> {
        let (first, len) = (self.first, std::mem::take(&mut self.len));
        if len == 0 {
            return Ok(());
        }
        let bytes = &self.buf[..len * PAGE_SIZE];
        self.file
            .write_all_at(bytes, first * PAGE_SIZE as u64)
            .map_err(|e| (first, len, e))?;
        for (i, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
            written(first + i as u64, page);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> (std::path::PathBuf, Arc<File>) {
        let p = std::env::temp_dir().join(format!("codec-run-{}-{name}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(200 * PAGE_SIZE as u64).unwrap();
        (p, Arc::new(f))
    }

    /// Runs break where pages stop being consecutive and at RUN_PAGES; each lands at its
    /// pages' offsets and each page is shown once, after the write, in order.
    #[test]
    fn runs_land_at_their_pages_offsets() {
        let (path, f) = file("runs");
        let mut w = RunWriter::new(Arc::clone(&f));
        let mut seen = Vec::new();
        let pages: Vec<u64> = [3u64, 4, 5, 9].into_iter().chain(100..100 + 70).collect();
        for &p in &pages {
            if !w.extends(p) {
                w.flush(|q, c| seen.push((q, c[0]))).unwrap();
            }
            w.push(p).fill(p as u8);
        }
        // A failed decode's slot is not written.
        assert!(w.extends(170));
        w.push(170).fill(0xee);
        w.pop();
        w.flush(|q, c| seen.push((q, c[0]))).unwrap();
        assert_eq!(
            seen,
            pages.iter().map(|&p| (p, p as u8)).collect::<Vec<_>>()
        );
        let bytes = std::fs::read(&path).unwrap();
        for p in 0..200u64 {
            let want = if pages.contains(&p) { p as u8 } else { 0 };
            let page = &bytes[p as usize * PAGE_SIZE..][..PAGE_SIZE];
            assert!(page.iter().all(|&b| b == want), "page {p}");
        }
        std::fs::remove_file(&path).unwrap();
    }

    /// A write that fails names the run and empties it.
    #[test]
    fn a_failed_write_names_its_run() {
        let (path, _) = file("ro");
        let ro = Arc::new(File::open(&path).unwrap());
        let mut w = RunWriter::new(ro);
        w.push(7).fill(1);
        w.push(8).fill(1);
        let (first, len, _) = w.flush(|_, _| panic!("not written")).unwrap_err();
        assert_eq!((first, len), (7, 2));
        assert!(w.extends(50));
        std::fs::remove_file(&path).unwrap();
    }
}
