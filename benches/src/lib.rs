//! Benchmark support for vmstream: a reader for the real memory corpora in
//! `shared/corpus` (see [`corpus`]) used by the criterion benches, examples
//! and tests of the other crates.

pub mod corpus;

pub use corpus::{page_pairs, shared_dir, Corpus, Round, RoundMeta};
