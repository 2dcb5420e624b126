//! SIGINT and SIGTERM (a terminal's Ctrl-C, a service manager's stop) during a migration:
//! they set a flag that the migration acts on ([`super::config::SendConfig::cancel`],
//! [`super::config::RecvConfig::cancel`]) instead of ending the process on the spot, which
//! would end an in-process KVM guest with it on the source and strand a temporary image on
//! the destination.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// From now on SIGINT and SIGTERM set the returned flag instead of ending the process.
/// Whatever runs after the migration installs its own handling if it runs on (a resumed
/// guest's clean stop, the KVM run loop's); signal-hook cannot give the default action
/// back.
pub fn flag_on_interrupt() -> std::io::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register(signal, flag.clone())?;
    }
    Ok(flag)
}

/// Whether `flag` (a `cancel` setting) is set.
pub fn requested(flag: Option<&Arc<AtomicBool>>) -> bool {
    flag.is_some_and(|f| f.load(Ordering::Relaxed))
}
