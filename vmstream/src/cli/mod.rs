//! Command-line arguments and printing: the engine returns values, only this module prints.

pub mod converge;
#[cfg(feature = "fault-injection")]
pub mod fault_env;
pub mod kvm;
pub mod migration;
pub mod notices;
pub mod plot;
pub mod verified;

pub use migration::{run_recv, run_send, RecvArgs, SendArgs};
