//! What a migration measures: typed statistics ([`stats`], with the run's [`settings`] and
//! [`switchover`] phase times), the guest-impact timeline ([`impact`], [`timeline`]), the
//! guest's transaction sampler ([`sampler`]), each migrated disk's figures ([`disk`]), plots ([`plot`]), and what the engine tells
//! its caller while it runs: [`notice`]s, among them the sender's [`progress`].

pub mod disk;
pub mod impact;
pub mod notice;
pub mod plot;
pub mod postcopy;
pub mod progress;
pub mod sampler;
pub mod settings;
pub mod stats;
pub mod switchover;
pub mod timeline;
pub mod verification;
