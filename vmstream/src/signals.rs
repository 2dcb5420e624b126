//! SIGINT and SIGTERM (a terminal's Ctrl-C, a service manager's stop) as flags to act on,
//! instead of ending the process on the spot: that would end an in-process KVM guest with it
//! on the source, strand a temporary image on the destination, or cut a guest's transaction
//! in half. The one place this process registers for them.
//!
//! A signal this process was started with ignored stays ignored: a shell runs a script's
//! background jobs with SIGINT ignored so that Ctrl-C stops the script, not them.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// A new flag that SIGINT and SIGTERM set from now on (a migration's `cancel` setting).
/// Whatever runs after the migration registers its own ([`stop_running_guests_on_signals`]):
/// signal-hook cannot give the default action back.
pub fn new_stop_flag() -> io::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    register(&flag)?;
    Ok(flag)
}

/// The flag of the guests this process runs (a guest process's workload, a KVM guest's run
/// loop, a resumed guest): set by SIGINT or SIGTERM once
/// [`stop_running_guests_on_signals`] registered it.
static RUNNING_GUESTS_STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Makes SIGINT and SIGTERM stop the guests this process runs cleanly (the current
/// transaction finishes, the run returns as if its duration had passed), so a guest can be
/// stopped and still reported healthy. Registers once, however often it is called.
pub fn stop_running_guests_on_signals() -> io::Result<()> {
    let mut result = Ok(());
    RUNNING_GUESTS_STOP.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        result = register(&flag);
        flag
    });
    result
}

/// Whether SIGINT or SIGTERM asked the guests this process runs to stop.
pub fn running_guests_stop_requested() -> bool {
    RUNNING_GUESTS_STOP
        .get()
        .is_some_and(|f| f.load(Ordering::Relaxed))
}

/// SIGINT and SIGTERM set `flag`, unless this process was started with them ignored.
fn register(flag: &Arc<AtomicBool>) -> io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for signal in [SIGINT, SIGTERM] {
        if !ignored_in(&status, signal) {
            signal_hook::flag::register(signal, Arc::clone(flag))?;
        }
    }
    Ok(())
}

/// Whether `signal` is ignored according to `status` (the text of `/proc/PID/status`,
/// whose `SigIgn` line is a hex mask with bit `signal - 1` per signal).
fn ignored_in(status: &str, signal: i32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| (1..=64).contains(&signal) && mask >> (signal - 1) & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ignored_signals_from_the_status_mask() {
        // SIGINT (2) and SIGQUIT (3) ignored: what a shell gives a background job.
        let status = "Name:\tvmstream\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000006\n";
        assert!(ignored_in(status, 2));
        assert!(ignored_in(status, 3));
        assert!(!ignored_in(status, 15));
        assert!(!ignored_in(status, 1));
        assert!(!ignored_in(status, 0));
        assert!(!ignored_in("Name:\tx\n", 2));
        assert!(!ignored_in("SigIgn:\tnot hex\n", 2));
    }

    #[test]
    fn this_process_status_has_a_mask() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.lines().any(|l| l.starts_with("SigIgn:")));
        // Rust's runtime ignores SIGPIPE (13); nothing ignores SIGTERM.
        assert!(ignored_in(&status, 13));
        assert!(!ignored_in(&status, 15));
    }
}
