//! The fault plan of `vmstream send` from `VMSTREAM_TEST_*` environment variables, for the
//! end-to-end tests; compiled only with the `fault-injection` feature, so a release binary
//! built without it never reads them.

use crate::migration::fault::{LinkFault, MissedWrite, MissedWriteAt, SourceFaults, StreamFault};

/// `OFFSET` (channel 0) or `CHANNEL:OFFSET`: the sender flips the byte at that offset of
/// that connection's stream.
pub const CORRUPT_ENV: &str = "VMSTREAM_TEST_CORRUPT_AT";

/// Set (to anything): the sender stops right after the destination's commit reply, its
/// guest neither ended nor resumed and no `Handover` sent, and exits with status
/// [`EXIT_CRASHED_AFTER_COMMIT`](super::migration::EXIT_CRASHED_AFTER_COMMIT).
pub const CRASH_AFTER_COMMIT_ENV: &str = "VMSTREAM_TEST_CRASH_AFTER_COMMIT";

/// `DISK`: the sender flips a byte of that disk's digest (`DiskDigests`) after the pause.
pub const CORRUPT_DISK_DIGEST_ENV: &str = "VMSTREAM_TEST_CORRUPT_DISK_DIGEST";

/// `OFFSET`: the sender flips that byte of a KVM guest's state blob.
pub const CORRUPT_STATE_ENV: &str = "VMSTREAM_TEST_CORRUPT_STATE_AT";

/// `PAGE@round0` or `PAGE@pause`: the sender writes that page behind its dirty tracker's
/// back once round 0 is acknowledged, or right after the pause
/// ([`SourceFaults::missed_write`]).
pub const MISSED_WRITE_ENV: &str = "VMSTREAM_TEST_MISSED_WRITE";

/// `N`: the sender flips a byte of the N-th page (from 0) it sends during post-copy, after
/// its check was computed ([`SourceFaults::corrupt_postcopy_page`]).
pub const CORRUPT_POSTCOPY_PAGE_ENV: &str = "VMSTREAM_TEST_CORRUPT_POSTCOPY_PAGE";

/// `N`: the sender cuts its connection once N pages went out during post-copy
/// ([`SourceFaults::drop_postcopy_link_after`]).
pub const DROP_POSTCOPY_LINK_ENV: &str = "VMSTREAM_TEST_DROP_POSTCOPY_LINK_AFTER";

/// Set (to anything): a handover's first live round lists a page beyond the guest
/// ([`SourceFaults::handover_page_beyond`]).
pub const HANDOVER_PAGE_BEYOND_ENV: &str = "VMSTREAM_TEST_HANDOVER_PAGE_BEYOND";

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
    faults.handover_page_beyond = std::env::var_os(HANDOVER_PAGE_BEYOND_ENV).is_some();
    if let Some(v) = var(CORRUPT_STATE_ENV) {
        faults.corrupt_guest_state_at = Some(
            v.trim()
                .parse()
                .map_err(|_| format!("{CORRUPT_STATE_ENV}={v:?}: expected OFFSET"))?,
        );
    }
    if let Some(v) = var(CORRUPT_DISK_DIGEST_ENV) {
        faults.corrupt_disk_digest = Some(
            v.trim()
                .parse()
                .map_err(|_| format!("{CORRUPT_DISK_DIGEST_ENV}={v:?}: expected DISK"))?,
        );
    }
    if let Some(v) = var(MISSED_WRITE_ENV) {
        faults.missed_write = Some(missed_write(&v).ok_or_else(|| {
            format!("{MISSED_WRITE_ENV}={v:?}: expected PAGE@round0 or PAGE@pause")
        })?);
    }
    if let Some(v) = var(CORRUPT_POSTCOPY_PAGE_ENV) {
        faults.corrupt_postcopy_page = Some(
            v.trim()
                .parse()
                .map_err(|_| format!("{CORRUPT_POSTCOPY_PAGE_ENV}={v:?}: expected N"))?,
        );
    }
    if let Some(v) = var(DROP_POSTCOPY_LINK_ENV) {
        faults.drop_postcopy_link_after = Some(
            v.trim()
                .parse()
                .map_err(|_| format!("{DROP_POSTCOPY_LINK_ENV}={v:?}: expected N"))?,
        );
    }
    Ok(faults)
}

/// [`MISSED_WRITE_ENV`]'s value.
fn missed_write(value: &str) -> Option<MissedWrite> {
    let (page, at) = value.trim().split_once('@')?;
    Some(MissedWrite {
        page: page.parse().ok()?,
        at: match at {
            "round0" => MissedWriteAt::AfterRound0,
            "pause" => MissedWriteAt::AtPause,
            _ => return None,
        },
    })
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
    fn missed_write_parses_page_and_instant() {
        let w = missed_write("77@pause").unwrap();
        assert_eq!((w.page, w.at), (77, MissedWriteAt::AtPause));
        assert_eq!(
            missed_write("3@round0").unwrap().at,
            MissedWriteAt::AfterRound0
        );
        assert!(missed_write("3").is_none() && missed_write("x@pause").is_none());
        assert!(missed_write("3@later").is_none());
    }

    #[test]
    fn corrupt_target_parses_both_forms() {
        assert_eq!(corrupt_target("300000"), Some((0, 300_000)));
        assert_eq!(corrupt_target("1:4096"), Some((1, 4096)));
        assert_eq!(corrupt_target("x"), None);
        assert_eq!(corrupt_target("1:"), None);
    }
}
