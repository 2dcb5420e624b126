//! A table of atomic words allocated a chunk at a time, on the first write into the chunk:
//! the destination's per-page tables are sized from the guest size a peer claims, and so
//! cost memory only for the pages that actually arrive.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Words per chunk (64 KiB of words: 4096 pages of two-word hashes, 512 Ki pages of bits).
const CHUNK_WORDS: usize = 8192;

/// `len` atomic words that read as a repeating `fill` pattern until written; updated from
/// any thread (each word's updates are atomic, `Relaxed`: readers order themselves).
pub struct LazyWords {
    len: usize,
    /// What an unwritten word `i` holds: `fill[i % fill.len()]`.
    fill: Box<[u64]>,
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl LazyWords {
    /// `len` words reading as `fill` repeated (its length divides the chunk size: 1, 2, 4
    /// ...); nothing proportional to `len` is allocated but the chunk index (a pointer per
    /// 64 KiB of words).
    pub fn new(len: usize, fill: &[u64]) -> LazyWords {
        assert!(
            !fill.is_empty() && CHUNK_WORDS.is_multiple_of(fill.len()),
            "fill pattern of {} words",
            fill.len()
        );
        LazyWords {
            len,
            fill: fill.into(),
            chunks: (0..len.div_ceil(CHUNK_WORDS))
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    /// Number of words.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no words.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Words allocated so far (chunks written, times their size): what the table costs.
    pub fn allocated(&self) -> usize {
        self.chunks.iter().filter(|c| c.get().is_some()).count() * CHUNK_WORDS
    }

    /// Word `i`, `None` past the end.
    pub fn get(&self, i: usize) -> Option<u64> {
        if i >= self.len {
            return None;
        }
        Some(match self.chunks[i / CHUNK_WORDS].get() {
            Some(chunk) => chunk[i % CHUNK_WORDS].load(Ordering::Relaxed),
            None => self.fill[i % self.fill.len()],
        })
    }

    /// Stores `value` in word `i` (ignored past the end), allocating its chunk if needed.
    pub fn store(&self, i: usize, value: u64) {
        if let Some(w) = self.word_mut(i) {
            w.store(value, Ordering::Relaxed);
        }
    }

    /// ORs `bits` into word `i` (ignored past the end), allocating its chunk if needed.
    pub fn fetch_or(&self, i: usize, bits: u64) {
        if let Some(w) = self.word_mut(i) {
            w.fetch_or(bits, Ordering::Relaxed);
        }
    }

    /// Every word in order (unwritten chunks as the fill pattern).
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks.iter().enumerate().flat_map(move |(c, chunk)| {
            let first = c * CHUNK_WORDS;
            let chunk = chunk.get();
            (first..self.len.min(first + CHUNK_WORDS)).map(move |i| match chunk {
                Some(words) => words[i - first].load(Ordering::Relaxed),
                None => self.fill[i % self.fill.len()],
            })
        })
    }

    /// Calls `f(i, word)` for each word of the chunks written so far (the others still
    /// hold the fill pattern).
    pub fn for_each_allocated(&self, mut f: impl FnMut(usize, &AtomicU64)) {
        for (c, chunk) in self.chunks.iter().enumerate() {
            if let Some(words) = chunk.get() {
                let first = c * CHUNK_WORDS;
                for (j, w) in words.iter().enumerate().take(self.len - first) {
                    f(first + j, w);
                }
            }
        }
    }

    /// Word `i`'s atomic, its chunk allocated (filled with the pattern) on first use.
    fn word_mut(&self, i: usize) -> Option<&AtomicU64> {
        if i >= self.len {
            return None;
        }
        let c = i / CHUNK_WORDS;
        let chunk = self.chunks[c].get_or_init(|| {
            (0..CHUNK_WORDS)
                .map(|j| AtomicU64::new(self.fill[j % self.fill.len()]))
                .collect()
        });
        Some(&chunk[i % CHUNK_WORDS])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_words_read_as_the_fill_and_cost_nothing() {
        // A table the size of a 1 TiB guest's two-word page hashes.
        let t = LazyWords::new(1 << 29, &[7, 9]);
        assert_eq!(t.allocated(), 0);
        assert_eq!(
            (t.get(0), t.get(1), t.get((1 << 29) - 1)),
            (Some(7), Some(9), Some(9))
        );
        assert_eq!(t.get(1 << 29), None);
        t.store(3 * CHUNK_WORDS + 5, 42);
        t.store(1 << 29, 1); // past the end: ignored
        assert_eq!(t.allocated(), CHUNK_WORDS);
        assert_eq!(t.get(3 * CHUNK_WORDS + 5), Some(42));
        // The rest of the written chunk keeps the pattern.
        assert_eq!(t.get(3 * CHUNK_WORDS + 4), Some(7));
        assert_eq!(t.get(3 * CHUNK_WORDS + 6), Some(7));
    }

    #[test]
    fn iteration_and_allocated_words_see_every_write_in_order() {
        let len = 2 * CHUNK_WORDS + 3;
        let t = LazyWords::new(len, &[0]);
        for i in [1, CHUNK_WORDS * 2 + 2] {
            t.fetch_or(i, 0b10);
            t.fetch_or(i, 0b01);
        }
        let all: Vec<u64> = t.iter().collect();
        assert_eq!(all.len(), len);
        assert_eq!(all.iter().filter(|w| **w != 0).count(), 2);
        assert_eq!((all[1], all[len - 1]), (3, 3));
        let mut seen = Vec::new();
        t.for_each_allocated(|i, w| {
            if w.swap(0, Ordering::Relaxed) != 0 {
                seen.push(i);
            }
        });
        assert_eq!(seen, vec![1, len - 1]);
        assert!(t.iter().all(|w| w == 0));
    }
}
