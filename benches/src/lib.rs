//! Benchmark support for vmstream: a reader for the real memory corpora in
//! `shared/corpus` (see [`corpus`]) used by the criterion benches, examples
//! and tests of the other crates, and a migration replay of a corpus through
//! the XBZRLE page cache (see [`replay`]).

pub mod corpus;
pub mod replay;

pub use corpus::{page_pairs, shared_dir, Corpus, Round, RoundMeta};
