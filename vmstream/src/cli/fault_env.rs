//! The fault plan of `vmstream send` from `VMSTREAM_TEST_*` environment variables, for the
//! end-to-end tests; compiled only with the `fault-injection` feature, so a release binary
//! built without it never reads them.

use crate::migration::fault::{LinkFault, SourceFaults, StreamFault};

/// `OFFSET` (channel 0) or `CHANNEL:OFFSET`: the sender flips the byte at that offset of
/// that connection's stream.
pub const CORRUPT_ENV: &str = "VMSTREAM_TEST_CORRUPT_AT";

/// Set (to anything): the sender stops right after the destination's commit reply, its
/// guest neither ended nor resumed and no `Handover` sent, and exits with status
/// [`EXIT_CRASHED_AFTER_COMMIT`](super::migration::EXIT_CRASHED_AFTER_COMMIT).
pub const CRASH_AFTER_COMMIT_ENV: &str = "VMSTREAM_TEST_CRASH_AFTER_COMMIT";

/// `OFFSET`: the sender flips that byte of a KVM guest's state blob.
pub const CORRUPT_STATE_ENV: &str = "VMSTREAM_TEST_CORRUPT_STATE_AT";

/// The faults the environment asks for; an unparsable value is an error (a test hook that
/// silently did nothing would make its test pass for the wrong reason).
pub fn source_faults() -> Result<SourceFaults, String> {
    let var = |name: &str| std::env::var(name).ok();
    let mut faults = SourceFaults::default();
    if let Some(v) = var(CORRUPT_ENV) {
        let (channel, at) = corrupt_target(&v)
            .ok_or_else(|| format!("{CORRUPT_ENV}={v:?}: expected OFFSET or CHANNEL:OFFSET"))?;
        faults.link.push(LinkFault {
            channel,
            at,
            fault: StreamFault::Corrupt,
        });
    }
    faults.crash_after_commit = std::env::var_os(CRASH_AFTER_COMMIT_ENV).is_some();
    if let Some(v) = var(CORRUPT_STATE_ENV) {
        faults.corrupt_guest_state_at = Some(
            v.trim()
                .parse()
                .map_err(|_| format!("{CORRUPT_STATE_ENV}={v:?}: expected OFFSET"))?,
        );
    }
    Ok(faults)
}

/// The channel and stream offset of [`CORRUPT_ENV`]: `OFFSET` (channel 0) or
/// `CHANNEL:OFFSET`.
fn corrupt_target(value: &str) -> Option<(usize, u64)> {
    match value.split_once(':') {
        Some((c, o)) => Some((c.trim().parse().ok()?, o.trim().parse().ok()?)),
        None => Some((0, value.trim().parse().ok()?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_target_parses_both_forms() {
        assert_eq!(corrupt_target("300000"), Some((0, 300_000)));
        assert_eq!(corrupt_target("1:4096"), Some((1, 4096)));
        assert_eq!(corrupt_target("x"), None);
        assert_eq!(corrupt_target("1:"), None);
    }
}
