//! What the destination knows of every block of a file-backed guest's image, kept current
//! page by page as pages land, so that the verify at the pause only looks at what changed
//! since the last background pass: per block its pages' hashes, its own checks' result and
//! its ledger entry; for the whole image how many blocks would fail now, the ledger's sum
//! and the highest transaction a block names.

use crate::guest::file::layout::{get_u64, LEDGER_OFFSET};
use crate::guest::file::verify::{check_block_content, BlockContent, Superblock};
use crate::memory::PAGE_SIZE;

/// Ledger entries per ledger page (one u64 per block).
const ENTRIES_PER_PAGE: u64 = (PAGE_SIZE / 8) as u64;

/// One block as last seen (in a background copy or in memory at the pause).
#[derive(Clone, Copy, Debug, Default)]
struct BlockState {
    /// Hashes of the block's pages (at most 2) in the bytes its `content` describes.
    hashes: [u128; 2],
    /// Those bytes passed the block's own checks (active blocks only).
    content: Option<BlockContent>,
    /// The block's ledger entry, from the last copy of its ledger page.
    ledger: u64,
}

/// Every block's state and the image-wide sums over them.
pub struct KnownBlocks {
    /// The superblock the states are for (only its counters may change later).
    pub layout: Superblock,
    blocks: Vec<BlockState>,
    /// Hashes of an all-zero block's pages.
    zero: [u128; 2],
    /// Blocks that would fail the full verifier's per-block checks now.
    failing: u64,
    /// Sum of the active blocks' ledger entries (inactive ones must be 0).
    ledger_sum: u64,
    /// The highest `last_tx` of any block content seen (only ever raised: a stale high value
    /// makes the pause fall back to the full verifier, never pass wrongly).
    max_last_tx: u64,
}

impl KnownBlocks {
    /// The state of a fresh image laid out as `layout`: every page zero (the destination's
    /// image starts as a new sparse file), so inactive blocks pass and active ones fail
    /// until their pages and ledger entries land. `None` for blocks of more than two pages.
    pub fn new(layout: Superblock, zero_page: u128) -> Option<KnownBlocks> {
        let g = layout.geometry();
        let pages = g.block_size as usize / PAGE_SIZE;
        if pages > 2 {
            return None;
        }
        let mut zero = [0u128; 2];
        zero[..pages].fill(zero_page);
        let state = BlockState {
            hashes: zero,
            ..BlockState::default()
        };
        Some(KnownBlocks {
            blocks: vec![state; g.block_count as usize],
            zero,
            failing: layout.active_blocks.min(g.block_count),
            ledger_sum: 0,
            max_last_tx: 0,
            layout,
        })
    }

    /// Whether block `b` in state `st` passes the full verifier's checks of it (the
    /// transaction bound aside, see `max_last_tx`).
    fn passes(&self, b: u64, st: &BlockState) -> bool {
        if b >= self.layout.active_blocks {
            return st.ledger == 0 && st.hashes == self.zero;
        }
        st.ledger != 0 && st.content.is_some_and(|c| c.version == st.ledger)
    }

    /// Changes block `b`'s state with `change`, keeping the sums current.
    fn update(&mut self, b: u64, change: impl FnOnce(&mut BlockState)) {
        let i = b as usize;
        let before = self.blocks[i];
        let mut after = before;
        change(&mut after);
        let active = b < self.layout.active_blocks;
        match (self.passes(b, &before), self.passes(b, &after)) {
            (true, false) => self.failing += 1,
            (false, true) => self.failing -= 1,
            _ => {}
        }
        if active {
            self.ledger_sum = self
                .ledger_sum
                .wrapping_sub(before.ledger)
                .wrapping_add(after.ledger);
        }
        if let Some(c) = after.content {
            self.max_last_tx = self.max_last_tx.max(c.last_tx);
        }
        self.blocks[i] = after;
    }

    /// The ledger page `page` (a page index) now holds `bytes`: takes its entries.
    pub fn take_ledger_page(&mut self, page: u64, bytes: &[u8]) {
        let Some(first) = self.ledger_page_first_block(page) else {
            return;
        };
        let count = self.layout.geometry().block_count;
        for (j, b) in (first..(first + ENTRIES_PER_PAGE).min(count)).enumerate() {
            let entry = get_u64(bytes, j * 8);
            self.update(b, |st| st.ledger = entry);
        }
    }

    /// What block `b`'s own checks say of `bytes` (`None`: they fail, or it is inactive).
    pub fn content_of(&self, b: u64, bytes: &[u8]) -> Option<BlockContent> {
        (b < self.layout.active_blocks)
            .then(|| check_block_content(bytes, b, &self.layout).ok())
            .flatten()
    }

    /// Block `b`'s pages now hash `hashes` and its checks say `content`.
    pub fn set_block(&mut self, b: u64, hashes: [u128; 2], content: Option<BlockContent>) {
        self.update(b, |st| {
            st.hashes = hashes;
            st.content = content;
        });
    }

    /// Whether block `b`'s state is of pages hashing `hashes`.
    pub fn has_hashes(&self, b: u64, hashes: [u128; 2]) -> bool {
        self.blocks[b as usize].hashes == hashes
    }

    /// The first block whose ledger entry is on page `page`, if it is a ledger page.
    fn ledger_page_first_block(&self, page: u64) -> Option<u64> {
        let at = (page * PAGE_SIZE as u64).checked_sub(LEDGER_OFFSET)?;
        let first = at / 8;
        (at < self.layout.geometry().data_offset - LEDGER_OFFSET
            && first < self.layout.geometry().block_count)
            .then_some(first)
    }

    /// Whether page `page` holds ledger entries.
    pub fn is_ledger_page(&self, page: u64) -> bool {
        self.ledger_page_first_block(page).is_some()
    }

    /// The ledger page holding block `b`'s entry.
    pub fn ledger_page_of(&self, b: u64) -> u64 {
        self.layout.geometry().ledger_entry(b) as u64 / PAGE_SIZE as u64
    }

    /// The block page `page` belongs to (None: superblock, ledger or tail).
    pub fn block_of_page(&self, page: u64) -> Option<u64> {
        let g = self.layout.geometry();
        let b = (page * PAGE_SIZE as u64).checked_sub(g.data_offset)? / g.block_size;
        (b < g.block_count).then_some(b)
    }

    /// Whether every block passes its checks, the ledger sums to `active_blocks + tx_count`
    /// and no block names a transaction after `tx_count` (of `s`, the final superblock).
    pub fn all_pass(&self, s: &Superblock) -> bool {
        self.failing == 0
            && self.ledger_sum == s.active_blocks.wrapping_add(s.tx_count)
            && self.max_last_tx <= s.tx_count
    }
}
