//! Parallel channels (`vmstream send --channels N`): one migration over N TCP connections,
//! like QEMU's multifd. Each channel has its own encode pipeline (and so its own XBZRLE
//! page cache) and its own packet stream; pages are sharded over the channels by page
//! number ([`ChannelMap`]), so a page always travels on the same channel and its cache
//! entry stays in one place. Control messages stay on channel 0.
//!
//! ```text
//! source                                               destination
//!   connect channel 0, then channels 1..N-1 (the destination accepts them in that order)
//!   ch0: Hello { features |= CHANNELS } -------------->
//!   ch0: ChannelHello { id, index 0, count N } ------->  count in 2..=16
//!                   <-------------------------------- ch0: HelloReply (accepted | refused)
//!   chi: ChannelHello { id, index i, count N } ------->  accepted until every index is bound;
//!                   <-------------------------------- chi: HelloReply (accepted | refused:
//!                                                        wrong id, duplicate, no migration)
//!   round r, on every channel: Packet* (its pages), RoundEnd { r, its records, packets }
//!                                                        barrier: when the RoundEnd { r } of
//!                                                        every channel is in, end_round(r)
//!                   <-------------------------------- ch0: RoundAck { r, sum of all channels }
//!   GuestState, Digest, Abort ----------------------->  channel 0 only
//!                   <-------------------------------- ch0: CommitReply, Resumed, Abort
//! ```
//!
//! The migration id is 16 random bytes the source draws per migration. Until every channel
//! is bound the destination keeps listening and refuses strays (another id, an index
//! already bound, a count that differs) with a `HelloReply` of status `Channel` and a
//! reason, and carries on waiting for the right connections; a channel hello on the first
//! connection (no migration in progress) ends the receive. The source waits for every
//! channel's reply before round 0.
//!
//! The round barrier spans all channels: the source sends a round's `RoundEnd` on every
//! channel after that channel's packets and waits for the one `RoundAck`; the destination
//! reads every channel in its own thread into one decode pipeline, refuses a packet that
//! arrives on a channel after that channel's `RoundEnd` (it would belong to the next round),
//! and closes the round in the codec (every packet applied) only when all `RoundEnd`s of
//! the round are in. So no page of round r+1 is applied before all of round r.
//!
//! `--max-bandwidth` is one token bucket shared by the channels' writers (a total).
//!
//! Files: `mod.rs` (errors, refusals, sharding, ids, the round barrier), [`send`] (the
//! source's channels), [`recv`] (binding and reading them on the destination).

use crate::migration::transport::Socket;
use std::time::Duration;

use vmstream_codec::memory::CHUNK_PAGES;

use crate::migration::transport::TransportError;
use crate::migration::wire::{ChannelHello, RoundEnd};

pub mod recv;
pub mod send;

pub use recv::{ChannelFrames, DestChannels};
pub use send::{connect, merge_stats, ChannelRound, SourceChannels};

/// Why a channel could not be set up, or broke the round barrier.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The destination refused one of our channels.
    #[error("destination refused channel {channel}: {reason}")]
    Refused {
        /// The channel.
        channel: usize,
        /// Its reason.
        reason: String,
    },
    /// Not every channel connected within the timeout.
    #[error("only {bound} of {count} channels connected within {timeout:?}")]
    BindTimeout {
        /// Channels bound (channel 0 included).
        bound: usize,
        /// Channels of the migration.
        count: usize,
        /// How long we waited.
        timeout: Duration,
    },
    /// Accepting channel connections failed.
    #[error("accepting channel connections: {0}")]
    Accept(std::io::Error),
    /// A channel's connection failed.
    #[error("channel {channel}: {source}")]
    Transport {
        /// The channel.
        channel: usize,
        /// What happened.
        #[source]
        source: TransportError,
    },
    /// A packet came on a channel that had already ended the open round.
    #[error("channel {channel} sent a packet after its round-end of round {round}, before the round's barrier")]
    EarlyPacket {
        /// The channel.
        channel: usize,
        /// The open round.
        round: u64,
    },
    /// A channel ended another round than the open one.
    #[error("channel {channel} ended round {got}, the open round is {expected}")]
    RoundMismatch {
        /// The channel.
        channel: usize,
        /// The open round.
        expected: u64,
        /// The round it ended.
        got: u64,
    },
    /// A channel ended the open round twice.
    #[error("channel {channel} ended round {round} twice")]
    DuplicateRoundEnd {
        /// The channel.
        channel: usize,
        /// The round.
        round: u64,
    },
    /// Channels disagree on the flags of a round (final, forced).
    #[error("channel {channel} ended round {round} with flags {got:#x}, another channel with {expected:#x}")]
    FlagsDiffer {
        /// The channel.
        channel: usize,
        /// The round.
        round: u64,
        /// Another channel's flags.
        expected: u32,
        /// This channel's flags.
        got: u32,
    },
}

/// Why a channel connection is refused (the reason goes back in its `HelloReply`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelRefusal {
    /// The connection belongs to another migration.
    #[error("stray channel {index}: it belongs to migration {theirs}, this destination is receiving migration {ours}")]
    WrongMigration {
        /// Its index.
        index: u16,
        /// Its migration id, hex.
        theirs: String,
        /// Ours, hex.
        ours: String,
    },
    /// The channel count differs from the one channel 0 announced.
    #[error("channel {index} says the migration has {theirs} channels, channel 0 said {ours}")]
    CountMismatch {
        /// Its index.
        index: u16,
        /// Its count.
        theirs: u16,
        /// Channel 0's count.
        ours: u16,
    },
    /// The index is bound already.
    #[error("duplicate channel {index} of migration {id}")]
    Duplicate {
        /// The index.
        index: u16,
        /// The migration id, hex.
        id: String,
    },
    /// A channel hello came first: no migration is in progress.
    #[error("channel {index} of migration {id} arrived but no migration is in progress (a migration's first connection carries its hello)")]
    NoMigration {
        /// Its index.
        index: u16,
        /// Its migration id, hex.
        id: String,
    },
    /// Channel 0's announcement after its hello is wrong or missing.
    #[error("channel 0 must announce itself after its hello: {0}")]
    BadPrimary(String),
    /// The connection did not open with a channel hello.
    #[error("expected a channel hello: {0}")]
    NotAChannel(String),
    /// The connection did not authenticate (`crate::migration::connect::auth`).
    #[error("{0}")]
    Auth(String),
}

/// Lower-case hex of a migration id.
pub fn id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why the first connection's channel hello is refused.
pub fn no_migration(c: &ChannelHello) -> ChannelRefusal {
    ChannelRefusal::NoMigration {
        index: c.index,
        id: id_hex(&c.migration_id),
    }
}

/// Checks channel hello `c` against the migration `primary` announced on channel 0, with
/// `bound[i]` telling whether channel `i` is connected already. Returns the index.
pub fn check_channel(
    c: &ChannelHello,
    primary: &ChannelHello,
    bound: &[bool],
) -> Result<usize, ChannelRefusal> {
    if c.migration_id != primary.migration_id {
        return Err(ChannelRefusal::WrongMigration {
            index: c.index,
            theirs: id_hex(&c.migration_id),
            ours: id_hex(&primary.migration_id),
        });
    }
    if c.count != primary.count {
        return Err(ChannelRefusal::CountMismatch {
            index: c.index,
            theirs: c.count,
            ours: primary.count,
        });
    }
    let i = c.index as usize;
    if bound.get(i).copied().unwrap_or(true) {
        return Err(ChannelRefusal::Duplicate {
            index: c.index,
            id: id_hex(&c.migration_id),
        });
    }
    Ok(i)
}

/// Which channel carries each page: stripes of `CHUNK_PAGES x workers` pages, round robin.
/// Inside a stripe the codec's own 64-page chunks rotate over the channel's encode workers,
/// so both levels stay balanced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelMap {
    channels: u64,
    stripe_pages: u64,
}

impl ChannelMap {
    /// `channels` channels of `workers` encode workers each.
    pub fn new(channels: usize, workers: usize) -> ChannelMap {
        ChannelMap {
            channels: channels.max(1) as u64,
            stripe_pages: CHUNK_PAGES * workers.max(1) as u64,
        }
    }

    /// The channel of `page`.
    pub fn channel_of(&self, page: u64) -> usize {
        ((page / self.stripe_pages) % self.channels) as usize
    }
}

/// A fresh random migration id (from the kernel's random source; without it, from the
/// clock, the pid and std's randomly keyed hasher).
pub fn new_migration_id() -> [u8; 16] {
    if let Ok(id) = crate::migration::connect::auth::random_bytes() {
        return id;
    }
    let mut id = [0u8; 16];
    use std::hash::{BuildHasher, Hasher};
    for half in id.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.write_u32(std::process::id());
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    id
}

pub(crate) fn setup_socket(s: &Socket, io_timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(io_timeout))?;
    // A peer that stops reading must not block a writer (and a later join of it) forever.
    s.set_write_timeout(Some(io_timeout))
}

/// The round barrier across channels: which channels ended the open round.
#[derive(Debug, Clone)]
pub struct RoundBarrier {
    round: u64,
    ended: Vec<Option<RoundEnd>>,
}

impl RoundBarrier {
    /// A barrier over `channels` channels, in round 0.
    pub fn new(channels: usize) -> RoundBarrier {
        RoundBarrier {
            round: 0,
            ended: vec![None; channels.max(1)],
        }
    }

    /// The open round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// A packet arrived on `channel`: refused if that channel already ended the round.
    pub fn packet(&self, channel: usize) -> Result<(), ChannelError> {
        match self.ended.get(channel) {
            Some(None) => Ok(()),
            _ => Err(ChannelError::EarlyPacket {
                channel,
                round: self.round,
            }),
        }
    }

    /// `channel` ended a round. Once every channel ended the open round, returns the
    /// round's totals and opens the next round.
    pub fn round_end(
        &mut self,
        channel: usize,
        end: RoundEnd,
    ) -> Result<Option<RoundEnd>, ChannelError> {
        if end.round != self.round {
            return Err(ChannelError::RoundMismatch {
                channel,
                expected: self.round,
                got: end.round,
            });
        }
        let slot = self
            .ended
            .get_mut(channel)
            .ok_or(ChannelError::DuplicateRoundEnd {
                channel,
                round: end.round,
            })?;
        if slot.is_some() {
            return Err(ChannelError::DuplicateRoundEnd {
                channel,
                round: end.round,
            });
        }
        *slot = Some(end);
        if let Some(other) = self.ended.iter().flatten().find(|e| e.flags != end.flags) {
            return Err(ChannelError::FlagsDiffer {
                channel,
                round: end.round,
                expected: other.flags,
                got: end.flags,
            });
        }
        if self.ended.iter().any(Option::is_none) {
            return Ok(None);
        }
        let mut total = RoundEnd {
            records: 0,
            packets: 0,
            packet_bytes: 0,
            ..end
        };
        for e in self.ended.iter_mut().map(|e| e.take().expect("all ended")) {
            total.records += e.records;
            total.packets += e.packets;
            total.packet_bytes += e.packet_bytes;
        }
        self.round += 1;
        Ok(Some(total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(round: u64, records: u64, flags: u32) -> RoundEnd {
        RoundEnd {
            round,
            records,
            packets: 1,
            packet_bytes: 10,
            flags,
        }
    }

    #[test]
    fn barrier_waits_for_every_channel_and_sums() {
        let mut b = RoundBarrier::new(3);
        b.packet(1).unwrap();
        assert_eq!(b.round_end(1, end(0, 5, 0)).unwrap(), None);
        // Channel 1 ended round 0: a packet on it now would be round 1's, too early.
        assert!(matches!(
            b.packet(1),
            Err(ChannelError::EarlyPacket {
                channel: 1,
                round: 0
            })
        ));
        b.packet(0).unwrap();
        assert!(matches!(
            b.round_end(1, end(0, 5, 0)),
            Err(ChannelError::DuplicateRoundEnd { channel: 1, .. })
        ));
        assert_eq!(b.round_end(0, end(0, 7, 0)).unwrap(), None);
        let total = b.round_end(2, end(0, 1, 0)).unwrap().unwrap();
        assert_eq!((total.round, total.records, total.packets), (0, 13, 3));
        assert_eq!(total.packet_bytes, 30);
        assert_eq!(b.round(), 1);
        b.packet(1).unwrap();
        assert!(matches!(
            b.round_end(0, end(0, 1, 0)),
            Err(ChannelError::RoundMismatch {
                expected: 1,
                got: 0,
                ..
            })
        ));
        b.round_end(0, end(1, 1, 1)).unwrap();
        assert!(matches!(
            b.round_end(2, end(1, 1, 0)),
            Err(ChannelError::FlagsDiffer { channel: 2, .. })
        ));
        assert!(b.round_end(7, end(1, 1, 1)).is_err());
    }

    #[test]
    fn single_channel_barrier_passes_every_round_end() {
        let mut b = RoundBarrier::new(1);
        for r in 0..3 {
            assert_eq!(b.round_end(0, end(r, 2, 0)).unwrap().unwrap().records, 2);
        }
    }

    #[test]
    fn map_stripes_are_balanced_and_stable() {
        let m = ChannelMap::new(2, 2);
        assert_eq!(m.channel_of(0), 0);
        assert_eq!(m.channel_of(127), 0);
        assert_eq!(m.channel_of(128), 1);
        assert_eq!(m.channel_of(256), 0);
        let mut per = [0u64; 3];
        let m = ChannelMap::new(3, 1);
        for p in 0..64 * 300 {
            per[m.channel_of(p)] += 1;
        }
        assert_eq!(per, [6400; 3]);
        assert_eq!(ChannelMap::new(1, 4).channel_of(123_456), 0);
    }

    #[test]
    fn channels_are_checked_against_the_primary() {
        let primary = ChannelHello {
            migration_id: [1; 16],
            index: 0,
            count: 3,
        };
        let bound = [true, false, true];
        let c = |id, index, count| ChannelHello {
            migration_id: [id; 16],
            index,
            count,
        };
        assert_eq!(check_channel(&c(1, 1, 3), &primary, &bound), Ok(1));
        assert!(matches!(
            check_channel(&c(2, 1, 3), &primary, &bound),
            Err(ChannelRefusal::WrongMigration { .. })
        ));
        assert!(matches!(
            check_channel(&c(1, 2, 3), &primary, &bound),
            Err(ChannelRefusal::Duplicate { index: 2, .. })
        ));
        assert!(matches!(
            check_channel(&c(1, 0, 3), &primary, &bound),
            Err(ChannelRefusal::Duplicate { index: 0, .. })
        ));
        assert!(matches!(
            check_channel(&c(1, 1, 2), &primary, &bound),
            Err(ChannelRefusal::CountMismatch { .. })
        ));
        let msg = check_channel(&c(2, 1, 3), &primary, &bound)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("stray channel 1") && msg.contains(&"01".repeat(16)),
            "{msg}"
        );
    }

    #[test]
    fn migration_ids_differ() {
        assert_ne!(new_migration_id(), new_migration_id());
    }
}
