//! SIGINT and SIGTERM (a terminal's Ctrl-C, a service manager's stop) during a migration:
//! they set a flag that the migration acts on ([`super::config::SendConfig::cancel`],
//! [`super::config::RecvConfig::cancel`]) instead of ending the process on the spot, which
//! would end an in-process KVM guest with it on the source and strand a temporary image on
//! the destination.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// SIGINT and SIGTERM set [`OnInterrupt::flag`] while this lives; afterwards they act as
/// by default again (end the process).
#[derive(Debug)]
pub struct OnInterrupt {
    flag: Arc<AtomicBool>,
    act_by_default: Arc<AtomicBool>,
}

impl OnInterrupt {
    /// Registers the handlers.
    pub fn install() -> std::io::Result<OnInterrupt> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let s = OnInterrupt {
            flag: Arc::new(AtomicBool::new(false)),
            act_by_default: Arc::new(AtomicBool::new(false)),
        };
        for signal in [SIGINT, SIGTERM] {
            // (signal-hook cannot restore the default action on unregistering: emulate it.)
            signal_hook::flag::register_conditional_default(signal, s.act_by_default.clone())?;
            signal_hook::flag::register(signal, s.flag.clone())?;
        }
        Ok(s)
    }

    /// Set once SIGINT or SIGTERM arrived.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }
}

impl Drop for OnInterrupt {
    fn drop(&mut self) {
        self.act_by_default.store(true, Ordering::Relaxed);
    }
}

/// Whether `flag` (a `cancel` setting) is set.
pub fn requested(flag: Option<&Arc<AtomicBool>>) -> bool {
    flag.is_some_and(|f| f.load(Ordering::Relaxed))
}
