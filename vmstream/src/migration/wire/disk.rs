//! The disks that travel with a migration: [`Disks`], sent after the `Hello`, announces
//! them (count, sizes, dirty granularity); [`DiskDigests`], sent after the `Digest`, proves
//! each disk's content at the pause; [`MirrorWrite`] and [`MirrorAck`] carry write-through
//! mirroring (`--disk-mode mirror`) on the mirror's own connection.

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

/// Most pages one [`MirrorWrite`] carries (1 MiB, the largest granule).
pub const MIRROR_MAX_PAGES: usize = 256;
/// [`MirrorWrite`] flag: answer with a [`MirrorAck`] once this and everything before is
/// applied.
pub const MIRROR_ACK: u32 = 1 << 0;
/// [`MirrorWrite`] flag: opens the mirror (on channel 0, announcing it, and as the first
/// frame of the mirror's connection); its data is the 16-byte migration id, no pages.
pub const MIRROR_OPEN: u32 = 1 << 1;
/// [`MirrorWrite`] flag: the mirror ends (no pages; acknowledged, then the connection
/// closes).
pub const MIRROR_END: u32 = 1 << 2;
const PAGE: usize = 4096;

/// `MirrorWrite` (64 bytes + data): pages of one disk the guest wrote while mirrored (or
/// the mirror's opening and end, see the flags), in order on the mirror's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorWrite {
    /// Increasing on the connection; a [`MirrorAck`] names the last applied.
    pub seq: u64,
    /// `MIRROR_ACK`, `MIRROR_OPEN`, `MIRROR_END`.
    pub flags: u32,
    /// Disk index, as in `Disks`.
    pub disk: u16,
    /// Byte offset of the first page in the disk, a multiple of 4096.
    pub offset: u64,
    /// Pages covered, 0..=[`MIRROR_MAX_PAGES`].
    pub pages: u32,
    /// Bit `i`: page `i` is all zeros and not carried.
    pub zero_mask: [u8; 32],
    /// The non-zero pages in order (with `MIRROR_OPEN`: the migration id).
    pub data: Vec<u8>,
}

impl MirrorWrite {
    /// Body length without the data.
    pub const FIXED_LEN: usize = 64;

    /// The pages `raw` (whole pages) of disk `disk` at `offset`, zero pages left out.
    pub fn pages(seq: u64, flags: u32, disk: u16, offset: u64, raw: &[u8]) -> MirrorWrite {
        let mut zero_mask = [0u8; 32];
        let mut data = Vec::with_capacity(raw.len());
        for (i, page) in raw.chunks(PAGE).enumerate() {
            if vmstream_simd::is_zero(page) {
                zero_mask[i / 8] |= 1 << (i % 8);
            } else {
                data.extend_from_slice(page);
            }
        }
        MirrorWrite {
            seq,
            flags,
            disk,
            offset,
            pages: raw.len().div_ceil(PAGE) as u32,
            zero_mask,
            data,
        }
    }

    /// The opening (`MIRROR_OPEN`) naming migration `id`.
    pub fn open(id: [u8; 16]) -> MirrorWrite {
        MirrorWrite {
            flags: MIRROR_OPEN,
            data: id.to_vec(),
            ..Self::pages(0, 0, 0, 0, &[])
        }
    }

    /// Whether page `i` is carried as zeros.
    pub fn is_zero_page(&self, i: usize) -> bool {
        self.zero_mask[i / 8] & (1 << (i % 8)) != 0
    }

    /// Each page in order with its contents (`None`: zeros).
    pub fn each_page(&self) -> impl Iterator<Item = Option<&[u8]>> + '_ {
        let mut chunks = self.data.chunks(PAGE);
        (0..self.pages as usize).map(move |i| {
            if self.is_zero_page(i) {
                None
            } else {
                chunks.next()
            }
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.disk.to_le_bytes());
        out.extend_from_slice(&[0; 2]);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.pages.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.zero_mask);
        out.extend_from_slice(&self.data);
    }

    pub(super) fn decode(body: &[u8]) -> Result<MirrorWrite, WireError> {
        const K: FrameType = FrameType::MirrorWrite;
        at_least(K, body, Self::FIXED_LEN, MIRROR_MAX_PAGES * PAGE)?;
        let mut f = Fields::new(body);
        let seq = f.u64();
        let flags = f.u32();
        let disk = f.u16();
        let reserved = f.u16() as u64;
        let offset = f.u64();
        let pages = f.u32();
        let reserved2 = f.u32() as u64;
        let zero_mask: [u8; 32] = f.bytes(32).try_into().expect("32 bytes");
        let data = f.rest().to_vec();
        let bad = |field, value| WireError::BadField {
            kind: K.name(),
            field,
            value,
        };
        if reserved != 0 || reserved2 != 0 {
            return Err(bad("reserved", reserved | reserved2));
        }
        if flags & !(MIRROR_ACK | MIRROR_OPEN | MIRROR_END) != 0 {
            return Err(bad("flags", flags as u64));
        }
        if disk as usize >= MAX_DISKS {
            return Err(bad("disk", disk as u64));
        }
        if !offset.is_multiple_of(PAGE as u64) {
            return Err(bad("offset", offset));
        }
        let m = MirrorWrite {
            seq,
            flags,
            disk,
            offset,
            pages,
            zero_mask,
            data,
        };
        let control = flags & (MIRROR_OPEN | MIRROR_END) != 0;
        if pages as usize > MIRROR_MAX_PAGES || (control && pages != 0) {
            return Err(bad("pages", pages as u64));
        }
        let stray = (pages as usize..256).any(|i| m.is_zero_page(i));
        let zeros = (0..pages as usize).filter(|&i| m.is_zero_page(i)).count();
        let want = match flags & (MIRROR_OPEN | MIRROR_END) {
            MIRROR_OPEN => 16,
            0 => (pages as usize - zeros) * PAGE,
            _ if flags & MIRROR_END != 0 && flags & MIRROR_OPEN == 0 => 0,
            _ => return Err(bad("flags", flags as u64)),
        };
        if stray || m.data.len() != want {
            return Err(bad("data", m.data.len() as u64));
        }
        Ok(m)
    }
}

/// `MirrorAck` (16 bytes): every [`MirrorWrite`] up to `seq` is applied on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorAck {
    /// The `seq` of the `MirrorWrite` that asked.
    pub seq: u64,
}

impl MirrorAck {
    /// Body length.
    pub const LEN: usize = 16;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
    }

    pub(super) fn decode(body: &[u8]) -> Result<MirrorAck, WireError> {
        super::fields::exact(FrameType::MirrorAck, body, Self::LEN)?;
        let mut f = Fields::new(body);
        let seq = f.u64();
        if f.u64() != 0 {
            return Err(WireError::BadField {
                kind: FrameType::MirrorAck.name(),
                field: "reserved",
                value: 1,
            });
        }
        Ok(MirrorAck { seq })
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

    #[test]
    fn mirror_messages_round_trip_leave_zero_pages_out_and_refuse_bad_fields() {
        let mut raw = vec![0u8; 3 * 4096];
        raw[4096..8192].fill(7);
        let w = MirrorWrite::pages(9, MIRROR_ACK, 1, 65536, &raw);
        assert_eq!((w.pages, w.data.len()), (3, 4096));
        let pages: Vec<Option<&[u8]>> = w.each_page().collect();
        assert_eq!(pages, vec![None, Some(&raw[4096..8192]), None]);
        let m = Message::MirrorWrite(w.clone());
        assert_eq!(round_trip(m).unwrap(), Message::MirrorWrite(w.clone()));
        let open = Message::MirrorWrite(MirrorWrite::open([3; 16]));
        assert_eq!(round_trip(open.clone()).unwrap(), open);
        let ack = Message::MirrorAck(MirrorAck { seq: 42 });
        assert_eq!(round_trip(ack.clone()).unwrap(), ack);
        let bad = [
            MirrorWrite {
                offset: 100,
                ..w.clone()
            },
            MirrorWrite {
                disk: 16,
                ..w.clone()
            },
            MirrorWrite {
                flags: 1 << 9,
                ..w.clone()
            },
            MirrorWrite {
                pages: 2,
                ..w.clone()
            },
            MirrorWrite {
                pages: 257,
                ..w.clone()
            },
            MirrorWrite {
                flags: MIRROR_OPEN | MIRROR_END,
                ..MirrorWrite::open([1; 16])
            },
            MirrorWrite {
                data: vec![1; 4095],
                ..w.clone()
            },
        ];
        for b in bad {
            assert!(
                round_trip(Message::MirrorWrite(b.clone())).is_err(),
                "{b:?}"
            );
        }
    }
}
