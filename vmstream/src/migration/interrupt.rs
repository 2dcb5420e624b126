//! Cancellation of a migration: SIGINT or SIGTERM (see [`crate::signals`]) set the `cancel`
//! flag of its config ([`crate::migration::config::SendConfig::cancel`],
//! [`crate::migration::config::RecvConfig::cancel`]), which the state machines act on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Whether `flag` (a `cancel` setting) is set.
pub fn requested(flag: Option<&Arc<AtomicBool>>) -> bool {
    flag.is_some_and(|f| f.load(Ordering::Relaxed))
}
