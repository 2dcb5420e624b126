//! The typed fault plan a test gives a migration ([`SourceFaults`] in
//! [`SendConfig`](crate::migration::SendConfig), [`DestFaults`] in
//! [`RecvConfig`](crate::migration::RecvConfig)): corrupted, dropped and stalled
//! connections, a source that dies after the commit, a damaged guest state. The default
//! plan injects nothing; only tests (and the CLI built with the `fault-injection` feature)
//! set one.

use std::io;
use std::time::Duration;

/// What happens to a connection's outgoing byte stream at a given offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFault {
    /// The byte at the offset is flipped (XOR 0x5a): a corrupted frame.
    Corrupt,
    /// The connection is shut down (both directions) before the byte at the offset: a
    /// dropped link. The writer fails with [`dropped`]'s error.
    Drop,
    /// Nothing more is written for this long before the byte at the offset: a stalled
    /// link.
    Stall(Duration),
}

/// A [`StreamFault`] at stream offset `at` of the source's connection `channel` (0 carries
/// the control messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFault {
    /// The connection (`--channels` index).
    pub channel: usize,
    /// Offset in the bytes written on it (sealed bytes once the connection is sealed).
    pub at: u64,
    /// What happens there.
    pub fault: StreamFault,
}

/// Faults the source injects into its migration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceFaults {
    /// Byte-level faults on its connections, applied by their writers.
    pub link: Vec<LinkFault>,
    /// Right after the destination's commit reply the source stops as a killed process
    /// would: its guest neither ended nor resumed (left paused), no `Handover`, the
    /// connections closed; `migrate` returns `Outcome::CrashedAfterCommit`.
    pub crash_after_commit: bool,
    /// The byte at this offset of the guest state blob (`GuestState`, KVM guests) is
    /// flipped after the pause.
    pub corrupt_guest_state_at: Option<usize>,
    /// A write the dirty tracker misses: the source writes the page through the memory
    /// file (`pwrite`, which no write-protection sees) and hides it from every later
    /// collection (so a content-hashing tracker misses it too).
    pub missed_write: Option<MissedWrite>,
    /// Bytes appended to the guest state blob after the pause: a file-backed guest's
    /// state, empty on the wire, then carries a blob the destination must refuse.
    pub pad_guest_state: Vec<u8>,
    /// Post-copy: the page sent this many pages into the post-copy phase (0: the first)
    /// goes out with one byte of its data flipped after its check was computed; the
    /// destination must refuse it, never place it, and ask again.
    pub corrupt_postcopy_page: Option<u64>,
    /// Post-copy: once this many pages were sent in the post-copy phase, the source cuts
    /// its connection (both directions, once), as a dropped link would.
    pub drop_postcopy_link_after: Option<u64>,
    /// A byte of this disk's digest (`DiskDigests`) is flipped after the pause: the
    /// destination must refuse the commit (digest mismatch) and commit no image.
    pub corrupt_disk_digest: Option<usize>,
    /// A handover's first live round also lists the page after the guest's last (a broken
    /// or hostile source): the destination must refuse it, and the guest runs on here.
    pub handover_page_beyond: bool,
}

/// See [`SourceFaults::missed_write`]. The page should be one the guest never writes (its
/// own writes to it would be hidden too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissedWrite {
    /// The page written.
    pub page: u64,
    /// When.
    pub at: MissedWriteAt,
}

/// When a [`MissedWrite`] happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissedWriteAt {
    /// Once round 0 is acknowledged: the scrubber can find it before the pause.
    AfterRound0,
    /// Right after the pause: only the post-commit audit (or a full digest) can find it.
    AtPause,
}

impl MissedWrite {
    /// The bytes written: a pattern no page holds by chance.
    pub fn contents(&self) -> Vec<u8> {
        (0..crate::memory::PAGE_SIZE)
            .map(|i| (i as u64 ^ self.page.wrapping_mul(0x9e37_79b9)) as u8 | 1)
            .collect()
    }
}

impl SourceFaults {
    /// The stream faults of connection `channel`, as (offset, fault).
    pub fn on_channel(&self, channel: usize) -> Vec<(u64, StreamFault)> {
        self.link
            .iter()
            .filter(|f| f.channel == channel)
            .map(|f| (f.at, f.fault))
            .collect()
    }

    /// Applies [`Self::corrupt_guest_state_at`] to the state `blob` (a blob shorter than
    /// the offset is left alone).
    pub fn corrupt_guest_state(&self, blob: &mut [u8]) {
        if let Some(b) = self.corrupt_guest_state_at.and_then(|at| blob.get_mut(at)) {
            *b ^= 0x5a;
        }
    }

    /// Applies [`Self::pad_guest_state`] to the state `blob`.
    pub fn pad_guest_state(&self, blob: &mut Vec<u8>) {
        blob.extend_from_slice(&self.pad_guest_state);
    }
}

/// Faults the destination injects into its receive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestFaults {
    /// Applied to the `CommitReply { committed }` frame, after the image was committed:
    /// `Corrupt` flips its first byte, `Drop` shuts the connection down instead of sending
    /// it, `Stall` sends it that much later.
    pub commit_reply: Option<StreamFault>,
}

/// Why a [`StreamFault::Drop`] ended a connection.
#[derive(Debug, thiserror::Error)]
#[error("injected fault: connection dropped at stream offset {at}")]
pub struct Dropped {
    /// The offset where it was dropped.
    pub at: u64,
}

/// The write error of a connection dropped at stream offset `at`
/// ([`io::ErrorKind::ConnectionAborted`], carrying [`Dropped`]).
pub fn dropped(at: u64) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, Dropped { at })
}

/// Whether `e` is the error of a [`StreamFault::Drop`]: the writer's owner then shuts the
/// socket down, as a dropped link would.
pub fn is_dropped(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Dropped>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_split_by_channel_and_the_state_flip_stays_in_the_blob() {
        let plan = SourceFaults {
            link: vec![
                LinkFault {
                    channel: 1,
                    at: 5,
                    fault: StreamFault::Corrupt,
                },
                LinkFault {
                    channel: 0,
                    at: 9,
                    fault: StreamFault::Drop,
                },
            ],
            crash_after_commit: false,
            corrupt_guest_state_at: Some(2),
            missed_write: None,
            pad_guest_state: vec![9],
            corrupt_postcopy_page: None,
            drop_postcopy_link_after: None,
            corrupt_disk_digest: None,
            handover_page_beyond: false,
        };
        assert_eq!(plan.on_channel(0), vec![(9, StreamFault::Drop)]);
        assert_eq!(plan.on_channel(1), vec![(5, StreamFault::Corrupt)]);
        assert!(plan.on_channel(2).is_empty());
        let mut blob = [1u8, 2, 3];
        plan.corrupt_guest_state(&mut blob);
        assert_eq!(blob, [1, 2, 3 ^ 0x5a]);
        let mut short = [1u8, 2];
        plan.corrupt_guest_state(&mut short);
        assert_eq!(short, [1, 2]);
        let mut empty = Vec::new();
        plan.pad_guest_state(&mut empty);
        assert_eq!(empty, [9]);
        assert!(is_dropped(&dropped(9)));
        assert!(!is_dropped(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
    }
}
