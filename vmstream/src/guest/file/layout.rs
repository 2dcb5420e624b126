//! The fixed, little-endian layout of a vmstream guest's memory (see `WORKLOADS.md`).
//!
//! ```text
//! offset 0            superblock (one page): magic, geometry, parameters, RNG, counters, journal
//! LEDGER_OFFSET       ledger: one u64 per block = the block's latest committed version
//! data_offset         blocks of block_size bytes, each: 64-byte header + payload
//! ```
//! Every field is fixed width so guest assembly (the KVM guest) can implement the same layout.

use crate::memory::PAGE_SIZE;

/// "VMSGUEST" read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"VMSGUEST");
/// Version of this layout.
pub const LAYOUT_VERSION: u32 = 1;
/// Byte offset of the ledger (right after the superblock page).
pub const LEDGER_OFFSET: u64 = PAGE_SIZE as u64;
/// Size of the header at the start of every block.
pub const BLOCK_HEADER_SIZE: usize = 64;
/// Maximum number of byte-range updates in one journal record.
pub const JOURNAL_MAX_UPDATES: usize = 8;
/// Size of one journal update entry: u32 offset, u32 length, 56 data bytes.
pub const JOURNAL_UPDATE_SIZE: usize = 64;
/// Maximum bytes one journal update can write.
pub const JOURNAL_UPDATE_DATA: usize = 56;

/// Superblock field offsets (bytes from the start of guest memory). All u64 unless noted.
pub mod sb {
    /// [`super::MAGIC`].
    pub const MAGIC: usize = 0;
    /// u32 [`super::LAYOUT_VERSION`].
    pub const LAYOUT_VERSION: usize = 8;
    /// u32 workload kind ([`super::ImageWorkloadKind`] code).
    pub const KIND: usize = 12;
    /// Total guest memory size in bytes.
    pub const MEMORY_SIZE: usize = 16;
    /// Block size in bytes.
    pub const BLOCK_SIZE: usize = 24;
    /// Number of blocks that fit.
    pub const BLOCK_COUNT: usize = 32;
    /// Byte offset of the ledger.
    pub const LEDGER_OFFSET: usize = 40;
    /// Byte offset of block 0.
    pub const DATA_OFFSET: usize = 48;
    /// Blocks `0..active` are formatted and written; the rest stay zero forever.
    pub const ACTIVE_BLOCKS: usize = 56;
    /// Hot blocks (dbsim: every 10th block; hotset: blocks `0..hot`).
    pub const HOT_BLOCKS: usize = 64;
    /// Target transaction rate in tx/s, 0 = as fast as possible.
    pub const RATE: usize = 72;
    /// Seed given at init (also mixes into fill patterns).
    pub const SEED: usize = 80;
    /// splitmix64 state of the workload's RNG.
    pub const RNG_STATE: usize = 88;
    /// Committed transactions.
    pub const TX_COUNT: usize = 96;
    /// Next block for `sequential` / position in the hot set for `hotset`.
    pub const CURSOR: usize = 104;
    /// Journal: sequence number of the transaction being committed, 0 = empty.
    pub const JOURNAL_SEQ: usize = 128;
    /// Journal: target block.
    pub const JOURNAL_BLOCK: usize = 136;
    /// Journal: the block's new version.
    pub const JOURNAL_VERSION: usize = 144;
    /// Journal: u32 record kind ([`super::JOURNAL_ROWS`] or [`super::JOURNAL_FILL`]).
    pub const JOURNAL_KIND: usize = 152;
    /// Journal: u32 number of update entries.
    pub const JOURNAL_COUNT: usize = 156;
    /// Journal: update entries, [`super::JOURNAL_MAX_UPDATES`] x 64 bytes.
    pub const JOURNAL_UPDATES: usize = 160;
}

/// Block header field offsets (bytes from the start of the block). All u64.
pub mod hdr {
    /// The block's number.
    pub const BLOCK: usize = 0;
    /// The block's version (change number); equals the ledger entry when consistent.
    pub const VERSION: usize = 8;
    /// [`super::block_checksum`] of the block.
    pub const CHECKSUM: usize = 16;
    /// Sequence number of the transaction that wrote this version (0 = init).
    pub const LAST_TX: usize = 24;
}

/// Journal kind: apply the byte-range updates.
pub const JOURNAL_ROWS: u32 = 1;
/// Journal kind: rewrite the whole payload with [`fill_payload`].
pub const JOURNAL_FILL: u32 = 2;

/// The workloads of a guest image, recorded in its superblock: what a process guest runs.
/// The KVM guest program has its own workloads ([`KvmWorkloadKind`]); its `filedb` runs this
/// layout's `Dbsim`.
///
/// [`KvmWorkloadKind`]: crate::guest::kvm::KvmWorkloadKind
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageWorkloadKind {
    /// Database-like: 8 KiB blocks of rows, small scattered row updates, 80/20 hot blocks.
    Dbsim,
    /// Rewrite a uniformly random 4 KiB block per transaction.
    Random,
    /// Rewrite 4 KiB blocks in order, wrapping around.
    Sequential,
    /// Rewrite the blocks of a fixed hot set in order, over and over.
    Hotset,
    /// Formats memory, then writes nothing.
    Idle,
}

impl ImageWorkloadKind {
    /// All kinds, in code order.
    pub const ALL: [ImageWorkloadKind; 5] = [
        ImageWorkloadKind::Dbsim,
        ImageWorkloadKind::Random,
        ImageWorkloadKind::Sequential,
        ImageWorkloadKind::Hotset,
        ImageWorkloadKind::Idle,
    ];

    /// The u32 stored in the superblock.
    pub fn code(self) -> u32 {
        match self {
            ImageWorkloadKind::Dbsim => 1,
            ImageWorkloadKind::Random => 2,
            ImageWorkloadKind::Sequential => 3,
            ImageWorkloadKind::Hotset => 4,
            ImageWorkloadKind::Idle => 5,
        }
    }

    /// Decode a superblock code.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }

    /// Name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ImageWorkloadKind::Dbsim => "dbsim",
            ImageWorkloadKind::Random => "random",
            ImageWorkloadKind::Sequential => "sequential",
            ImageWorkloadKind::Hotset => "hotset",
            ImageWorkloadKind::Idle => "idle",
        }
    }

    /// Parse a command-line name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Block size this workload uses.
    pub fn block_size(self) -> u64 {
        match self {
            ImageWorkloadKind::Dbsim => 8192,
            _ => 4096,
        }
    }

    /// True if blocks are rewritten whole with [`fill_payload`] (so verify can check content).
    pub fn fills_blocks(self) -> bool {
        self != ImageWorkloadKind::Dbsim
    }
}

/// Where things are in a guest memory of a given size and block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Total memory size.
    pub memory_size: u64,
    /// Block size.
    pub block_size: u64,
    /// Number of blocks.
    pub block_count: u64,
    /// Offset of block 0 (page aligned, after the ledger).
    pub data_offset: u64,
}

impl Geometry {
    /// Compute the layout; `None` if not even one block fits.
    pub fn new(memory_size: u64, block_size: u64) -> Option<Self> {
        let page = PAGE_SIZE as u64;
        let first_guess = memory_size.checked_sub(LEDGER_OFFSET)? / block_size;
        let ledger_pages = (first_guess * 8).div_ceil(page).max(1);
        let data_offset = LEDGER_OFFSET + ledger_pages * page;
        let block_count = memory_size.checked_sub(data_offset)? / block_size;
        (block_count > 0).then_some(Self {
            memory_size,
            block_size,
            block_count,
            data_offset,
        })
    }

    /// Byte offset of block `b`.
    pub fn block_offset(&self, b: u64) -> usize {
        (self.data_offset + b * self.block_size) as usize
    }

    /// Byte offset of block `b`'s ledger entry.
    pub fn ledger_entry(&self, b: u64) -> usize {
        (LEDGER_OFFSET + b * 8) as usize
    }

    /// Pages `[first, last]` that block `b` occupies.
    pub fn block_pages(&self, b: u64) -> std::ops::RangeInclusive<u64> {
        let start = self.block_offset(b) as u64 / PAGE_SIZE as u64;
        start..=start + self.block_size / PAGE_SIZE as u64 - 1
    }
}

/// Read the little-endian u64 at `off`.
pub fn get_u64(mem: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(mem[off..off + 8].try_into().unwrap())
}

/// Read the little-endian u32 at `off`.
pub fn get_u32(mem: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(mem[off..off + 4].try_into().unwrap())
}

/// Store a little-endian u64 at `off` with a volatile write, so ordering fences around it
/// hold even though nothing in this process reads it back.
pub fn put_u64(mem: &mut [u8], off: usize, v: u64) {
    let slot = &mut mem[off..off + 8];
    // SAFETY: `slot` is an 8-byte in-bounds region we hold `&mut` to; an unaligned
    // volatile write of [u8; 8] has no alignment requirement.
    unsafe { std::ptr::write_volatile(slot.as_mut_ptr() as *mut [u8; 8], v.to_le_bytes()) }
}

/// Store a little-endian u32 at `off` (volatile, see [`put_u64`]).
pub fn put_u32(mem: &mut [u8], off: usize, v: u32) {
    let slot = &mut mem[off..off + 4];
    // SAFETY: as in `put_u64`, for 4 bytes.
    unsafe { std::ptr::write_volatile(slot.as_mut_ptr() as *mut [u8; 4], v.to_le_bytes()) }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Checksum of one block: four-lane word-wise FNV-1a over the block's u64 words, with the
/// checksum word (word 2) read as zero. Lane `j` starts at `FNV_OFFSET ^ j` and takes the
/// words `i` with `i % 4 == j`; lanes fold as `h = (h ^ lane) * FNV_PRIME` from lane 0.
/// Each step is a bijection, so any single-word change always changes the checksum.
pub fn block_checksum(block: &[u8]) -> u64 {
    fnv_lanes(block, true)
}

/// [`block_checksum`]'s four FNV-1a lanes over every word of `bytes` (a multiple of 32
/// bytes), none read as zero: the checksum of a disk checkpoint's ledger pages.
pub fn words_checksum(bytes: &[u8]) -> u64 {
    fnv_lanes(bytes, false)
}

#[inline]
fn fnv_lanes(bytes: &[u8], skip_checksum_word: bool) -> u64 {
    debug_assert!(bytes.len().is_multiple_of(32));
    let mut lanes = [FNV_OFFSET, FNV_OFFSET ^ 1, FNV_OFFSET ^ 2, FNV_OFFSET ^ 3];
    for (i, chunk) in bytes.chunks_exact(32).enumerate() {
        for (j, lane) in lanes.iter_mut().enumerate() {
            let w = if skip_checksum_word && i == 0 && j == 2 {
                0
            } else {
                u64::from_le_bytes(chunk[j * 8..j * 8 + 8].try_into().unwrap())
            };
            *lane = (*lane ^ w).wrapping_mul(FNV_PRIME);
        }
    }
    let mut h = lanes[0];
    for lane in &lanes[1..] {
        h = (h ^ lane).wrapping_mul(FNV_PRIME);
    }
    h
}

/// First state of the xorshift stream that fills block `b` at `version`.
pub fn fill_state(seed: u64, block: u64, version: u64) -> u64 {
    (seed ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.wrapping_mul(0xD1B5_4A32_D192_ED03))
        | 1
}

/// Fill the payload (everything after the header) with the xorshift64 stream
/// `s ^= s << 13; s ^= s >> 7; s ^= s << 17; word = s`, starting from [`fill_state`].
pub fn fill_payload(payload: &mut [u8], seed: u64, block: u64, version: u64) {
    let mut s = fill_state(seed, block, version);
    for word in payload.chunks_exact_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        word.copy_from_slice(&s.to_le_bytes());
    }
}

/// Offset of the first payload byte that differs from [`fill_payload`], if any.
pub fn check_fill(payload: &[u8], seed: u64, block: u64, version: u64) -> Option<usize> {
    let mut s = fill_state(seed, block, version);
    for (i, word) in payload.chunks_exact(8).enumerate() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        if word != s.to_le_bytes() {
            let pos = word.iter().zip(s.to_le_bytes()).position(|(a, b)| *a != b);
            return Some(i * 8 + pos.unwrap_or(0));
        }
    }
    None
}

/// splitmix64 step: advance `state` and return the next random value.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_fits_ledger_and_blocks() {
        for &(size, bs) in &[(64u64 << 10, 4096u64), (1 << 30, 8192), (3 << 20, 8192)] {
            let g = Geometry::new(size, bs).unwrap();
            assert_eq!(g.data_offset % PAGE_SIZE as u64, 0);
            assert!(LEDGER_OFFSET + g.block_count * 8 <= g.data_offset);
            assert!(g.data_offset + g.block_count * bs <= size);
            assert!(g.data_offset + (g.block_count + 1) * bs > size);
        }
        // 64 KiB / 4 KiB blocks: superblock + 1 ledger page + 14 blocks.
        let g = Geometry::new(64 << 10, 4096).unwrap();
        assert_eq!((g.data_offset, g.block_count), (8192, 14));
        assert_eq!(Geometry::new(8192, 4096), None);
    }

    #[test]
    fn checksum_ignores_its_own_field_and_sees_every_byte() {
        let mut block = vec![0u8; 8192];
        fill_payload(&mut block[64..], 1, 2, 3);
        let c = block_checksum(&block);
        block[16] ^= 0xFF;
        assert_eq!(block_checksum(&block), c);
        for pos in [0usize, 8, 24, 64, 4095, 4096, 8191] {
            block[pos] ^= 1;
            assert_ne!(block_checksum(&block), c, "flip at {pos} not seen");
            block[pos] ^= 1;
        }
    }

    #[test]
    fn checksum_known_values() {
        // Pinned (computed independently) so guest assembly can be checked against them.
        assert_eq!(block_checksum(&[0u8; 4096]), 0x03f3_05ff_aa0b_22ee);
        let block: Vec<u8> = (0..1024u64)
            .flat_map(|i| i.wrapping_mul(0x0101_0101_0101_0101).to_le_bytes())
            .collect();
        assert_eq!(block_checksum(&block), 0xb5bb_8fae_89b4_8a0c);
    }

    #[test]
    fn fill_check_finds_first_difference() {
        let mut p = vec![0u8; 4032];
        fill_payload(&mut p, 7, 5, 9);
        assert_eq!(check_fill(&p, 7, 5, 9), None);
        assert_eq!(check_fill(&p, 7, 5, 8), Some(0));
        p[1000] ^= 4;
        assert_eq!(check_fill(&p, 7, 5, 9), Some(1000));
    }

    #[test]
    fn kinds_round_trip() {
        for k in ImageWorkloadKind::ALL {
            assert_eq!(ImageWorkloadKind::from_code(k.code()), Some(k));
            assert_eq!(ImageWorkloadKind::from_name(k.name()), Some(k));
        }
        assert_eq!(ImageWorkloadKind::from_code(0), None);
    }
}
