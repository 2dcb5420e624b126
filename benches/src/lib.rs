//! Benchmark support for vmstream: a reader for the real memory corpora in
//! `shared/corpus` (see [`corpus`]) used by the criterion benches, examples
//! and tests of the other crates, and a migration replay of a corpus through
//! the XBZRLE page cache (see [`replay`]), and the page sets of the kernel
//! benchmarks (see [`pages`]).

pub mod corpus;
pub mod pages;
pub mod replay;

pub use corpus::{page_pairs, shared_dir, Corpus, Round, RoundMeta};
