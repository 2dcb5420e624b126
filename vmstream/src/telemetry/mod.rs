//! What a migration measures: typed statistics ([`stats`]), the guest-impact timeline
//! ([`impact`], [`timeline`]), the guest's transaction sampler ([`sampler`]) and plots
//! ([`plot`]).

pub mod impact;
pub mod plot;
pub mod sampler;
pub mod stats;
pub mod timeline;
