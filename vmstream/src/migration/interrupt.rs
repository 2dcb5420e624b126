//! SIGINT and SIGTERM (a terminal's Ctrl-C, a service manager's stop) during a migration:
//! they set a flag that the migration acts on ([`crate::migration::config::SendConfig::cancel`],
//! [`crate::migration::config::RecvConfig::cancel`]) instead of ending the process on the spot, which
//! would end an in-process KVM guest with it on the source and strand a temporary image on
//! the destination.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// From now on SIGINT and SIGTERM set the returned flag instead of ending the process.
/// Whatever runs after the migration installs its own handling if it runs on (a resumed
/// guest's clean stop, the KVM run loop's); signal-hook cannot give the default action
/// back. A signal this process was started with ignored stays ignored: a shell runs a
/// script's background jobs with SIGINT ignored so that Ctrl-C stops the script, not them.
pub fn flag_on_interrupt() -> std::io::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for signal in [SIGINT, SIGTERM] {
        if !ignored_in(&status, signal) {
            signal_hook::flag::register(signal, flag.clone())?;
        }
    }
    Ok(flag)
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

/// Whether `flag` (a `cancel` setting) is set.
pub fn requested(flag: Option<&Arc<AtomicBool>>) -> bool {
    flag.is_some_and(|f| f.load(Ordering::Relaxed))
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
