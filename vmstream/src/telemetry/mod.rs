//! What a migration measures: typed statistics ([`stats`]), the guest-impact timeline
//! ([`impact`], [`timeline`]), the guest's transaction sampler ([`sampler`]), plots
//! ([`plot`]) and the terminal progress bar ([`progress`]).

pub mod impact;
pub mod plot;
pub mod progress;
pub mod sampler;
pub mod stats;
pub mod timeline;
