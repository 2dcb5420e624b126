//! The disks that travel with a migration: [`Disks`], sent after the `Hello`, announces
//! them (count, sizes, dirty granularity); [`DiskDigests`], sent after the `Digest`, proves
//! each disk's content at the pause.

use super::fields::{at_least, Fields};
use super::{FrameType, WireError};

/// Most disks one migration carries.
pub const MAX_DISKS: usize = 16;
/// Smallest dirty-tracking granule of a disk (one page).
pub const MIN_DISK_GRANULARITY: u64 = 4096;
/// Largest dirty-tracking granule of a disk.
pub const MAX_DISK_GRANULARITY: u64 = 1 << 20;

/// `Disks` (12 bytes + 8 per disk): the guest's disks, in `--disk` order. Their pages
/// follow guest memory in the codec's page numbers (`PROTOCOL.md`, *Disks*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disks {
    /// Dirty-tracking granule in bytes: a power of two in 4 KiB..=1 MiB.
    pub granularity: u64,
    /// Size in bytes of each disk, a non-zero multiple of the page size.
    pub sizes: Vec<u64>,
}

impl Disks {
    /// Body length without the sizes.
    pub const FIXED_LEN: usize = 12;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.sizes.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0; 2]);
        out.extend_from_slice(&self.granularity.to_le_bytes());
        for s in &self.sizes {
            out.extend_from_slice(&s.to_le_bytes());
        }
    }

    pub(super) fn decode(body: &[u8]) -> Result<Disks, WireError> {
        const K: FrameType = FrameType::Disks;
        at_least(K, body, Self::FIXED_LEN, 8 * MAX_DISKS)?;
        let mut f = Fields::new(body);
        let count = f.u16() as usize;
        let reserved = f.u16();
        let granularity = f.u64();
        let bad = |field, value| WireError::BadField {
            kind: K.name(),
            field,
            value,
        };
        if reserved != 0 {
            return Err(bad("reserved", reserved as u64));
        }
        if count == 0 || count > MAX_DISKS || body.len() != Self::FIXED_LEN + 8 * count {
            return Err(bad("count", count as u64));
        }
        if !granularity.is_power_of_two()
            || !(MIN_DISK_GRANULARITY..=MAX_DISK_GRANULARITY).contains(&granularity)
        {
            return Err(bad("granularity", granularity));
        }
        let sizes: Vec<u64> = (0..count).map(|_| f.u64()).collect();
        if let Some(&s) = sizes
            .iter()
            .find(|&&s| s == 0 || !s.is_multiple_of(MIN_DISK_GRANULARITY))
        {
            return Err(bad("size", s));
        }
        Ok(Disks { granularity, sizes })
    }
}

/// `DiskDigests` (8 bytes + 32 per disk): each disk's digest at the pause, in `Disks`
/// order (`digest::disk_digest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDigests {
    /// One digest per disk.
    pub digests: Vec<[u8; 32]>,
}

impl DiskDigests {
    /// Body length without the digests.
    pub const FIXED_LEN: usize = 8;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.digests.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0; 6]);
        for d in &self.digests {
            out.extend_from_slice(d);
        }
    }

    pub(super) fn decode(body: &[u8]) -> Result<DiskDigests, WireError> {
        const K: FrameType = FrameType::DiskDigests;
        at_least(K, body, Self::FIXED_LEN, 32 * MAX_DISKS)?;
        let mut f = Fields::new(body);
        let count = f.u16() as usize;
        let reserved = f.bytes(6);
        if reserved.iter().any(|&b| b != 0)
            || count == 0
            || count > MAX_DISKS
            || body.len() != Self::FIXED_LEN + 32 * count
        {
            return Err(WireError::BadField {
                kind: K.name(),
                field: "count",
                value: count as u64,
            });
        }
        let digests = (0..count)
            .map(|_| f.bytes(32).try_into().expect("32 bytes"))
            .collect();
        Ok(DiskDigests { digests })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::wire::{FrameHeader, Message, FRAME_HEADER_LEN};

    fn round_trip(m: Message) -> Result<Message, WireError> {
        let frame = m.to_frame();
        let h = FrameHeader::decode(&frame[..FRAME_HEADER_LEN].try_into().unwrap())?;
        Message::decode(h.kind, &frame[FRAME_HEADER_LEN..])
    }

    #[test]
    fn disk_messages_round_trip_and_bad_fields_are_refused() {
        let d = Message::Disks(Disks {
            granularity: 65536,
            sizes: vec![1 << 20, 8192],
        });
        assert_eq!(round_trip(d.clone()).unwrap(), d);
        let g = Message::DiskDigests(DiskDigests {
            digests: vec![[7; 32], [9; 32]],
        });
        assert_eq!(round_trip(g.clone()).unwrap(), g);
        for (granularity, sizes) in [
            (3000, vec![8192]),
            (2 << 20, vec![8192]),
            (4096, vec![0]),
            (4096, vec![4097]),
            (4096, vec![]),
            (4096, vec![4096; 17]),
        ] {
            let m = Message::Disks(Disks { granularity, sizes });
            assert!(round_trip(m).is_err(), "{granularity}");
        }
    }
}
