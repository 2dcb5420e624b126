//! The KVM guest's part of the background verify: the facts of each block (header,
//! checksum, zero) from background copies, and what the ledger check at the pause may take
//! from them and from the page hashes instead of reading the block.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::guest::kvm::abi::BLOCK_SIZE as KVM_BLOCK_SIZE;
use crate::guest::kvm::verify::BlockFacts;
use crate::guest::kvm::GuestLayout;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::migration::dest::verify::{block_page_hashes, BackgroundVerifier, BlockChecks};
use crate::migration::digest::PageHashes;

/// Pages per KVM block (the block facts keep a hash for each).
const KVM_BLOCK_PAGES: usize = (KVM_BLOCK_SIZE as usize).div_ceil(PAGE_SIZE);
// A copy's hashes are kept in a [u128; 2] (`block_page_hashes`).
const _: () = assert!(KVM_BLOCK_PAGES <= 2);

/// A KVM block's facts with the page hashes of the copy they were computed on.
type KvmChecked = ([u128; 2], BlockFacts);

/// The KVM guest's background checks: the facts of each block copy (header, checksum, zero;
/// see [`BlockFacts`]). The ledger check at the pause combines them with the ledger and the
/// vCPU records it reads then, reading only blocks whose pages changed since their copy.
#[derive(Default)]
pub struct KvmChecks {
    /// The block layout (it follows from the RAM size) and, per block, the page hashes of
    /// the copy checked and its facts.
    learned: Option<(GuestLayout, Vec<Option<KvmChecked>>)>,
    block: Vec<u8>,
}

impl BlockChecks for KvmChecks {
    fn pass(&mut self, view: &GuestMemory, pages: &[u64], stop: &AtomicBool) -> usize {
        if self.learned.is_none() {
            let Ok(layout) = GuestLayout::for_memory(view.len() as u64) else {
                return pages.len(); // not a KVM guest's RAM size: the pause reads everything
            };
            self.learned = Some((layout, vec![None; layout.block_count as usize]));
        }
        let Some((layout, facts)) = self.learned.as_mut() else {
            return pages.len();
        };
        let block = &mut self.block;
        block.resize(KVM_BLOCK_SIZE as usize, 0);
        let mut last = u64::MAX;
        for (i, &p) in pages.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                return i;
            }
            let Some(b) = (p * PAGE_SIZE as u64)
                .checked_sub(layout.blocks_gpa)
                .map(|off| off / KVM_BLOCK_SIZE)
                .filter(|&b| b < layout.block_count)
            else {
                continue;
            };
            if b == last {
                continue;
            }
            last = b;
            view.read_at(layout.block_gpa(b) as usize, block);
            facts[b as usize] = Some((block_page_hashes(block), BlockFacts::of(block)));
        }
        pages.len()
    }
}

/// What the KVM ledger check at the pause knows of each block without reading it, from
/// the image's current page hashes ([`PageHashes`]: the codec keeps them as it writes): a
/// block whose pages hash as zero pages is all zero (most never-written blocks), and a block
/// whose pages still hash as in the copy the background checked has that copy's facts.
pub struct KvmKnownFacts<'a> {
    /// The background's facts, when they are for this layout.
    learned: Option<Vec<Option<KvmChecked>>>,
    hashes: &'a PageHashes,
    zero: u128,
    layout: GuestLayout,
}

impl<'a> KvmKnownFacts<'a> {
    /// Stops the background checks (if any) and takes what they learned; `layout` is the
    /// guest's, as read from its parameter block.
    pub fn new(
        background: Option<BackgroundVerifier<KvmChecks>>,
        hashes: &'a PageHashes,
        layout: GuestLayout,
    ) -> KvmKnownFacts<'a> {
        let learned = background
            .and_then(BackgroundVerifier::finish)
            .and_then(|f| f.checks.learned)
            .filter(|(l, _)| *l == layout)
            .map(|(_, facts)| facts);
        KvmKnownFacts {
            learned,
            hashes,
            zero: hashes.zero_page_hash(),
            layout,
        }
    }

    /// The facts of block `b`, when they follow from the page hashes.
    pub fn get(&self, b: u64) -> Option<BlockFacts> {
        let first = self.layout.block_gpa(b) / PAGE_SIZE as u64;
        let mut now = [0u128; 2];
        for (j, h) in now.iter_mut().enumerate().take(KVM_BLOCK_PAGES) {
            *h = self.hashes.get(first + j as u64);
        }
        if now[..KVM_BLOCK_PAGES].iter().all(|&h| h == self.zero) {
            return Some(BlockFacts {
                zero: true,
                ..BlockFacts::default()
            });
        }
        let (copy, facts) = self.learned.as_ref()?.get(b as usize)?.as_ref()?;
        (*copy == now).then_some(*facts)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    use super::*;
    use crate::migration::dest::verify::test_support::{rehash, run_pass};
    use crate::migration::dest::verify::{open_view, TouchedPages};

    /// Runs the KVM guest until it committed `more` further transactions, then pauses it.
    fn run_kvm(guest: &mut crate::guest::kvm::KvmGuest, more: u64) {
        let start = guest.total_transactions().unwrap();
        guest.resume().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        // Polled without sleeping: the guest runs millions of transactions a second, and
        // every millisecond of overshoot rewrites more blocks.
        while guest.total_transactions().unwrap() < start + more
            && std::time::Instant::now() < deadline
        {
            std::hint::spin_loop();
        }
        guest.pause().unwrap();
    }

    /// The KVM ledger check at the pause, with block facts from a background pass taken
    /// before more transactions ran, gives the full check's result: blocks changed since are
    /// read again (through the page hashes), and a block corrupted after its background check
    /// is reported as the full check reports it.
    #[test]
    fn kvm_ledger_check_with_background_facts_equals_the_full_check() {
        use crate::guest::kvm::verify::{verify, verify_known};
        use crate::guest::kvm::{kvm_available, GuestRam, KvmGuest, KvmGuestConfig};
        if let Err(why) = kvm_available() {
            eprintln!("skipping: {why}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("vmstream-kvm-bg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ram");
        // 64 MiB, 95% of transactions in the hot set: the few cold blocks the second run
        // rewrites leave most of those the first run wrote with current background facts,
        // even when pausing the guest overshoots the count by a million transactions.
        let size = 64u64 << 20;
        let cfg = KvmGuestConfig {
            vcpus: 2,
            workload: crate::guest::kvm::WorkloadConfig {
                hot_hit_permille: 950,
                ..Default::default()
            },
            ..KvmGuestConfig::default()
        };
        let mut guest = KvmGuest::start(GuestRam::open(&path, size).unwrap(), &cfg).unwrap();
        guest.pause().unwrap();
        let mem = open_view(&path).unwrap();
        let hashes = PageHashes::zeroed(mem.pages(), PAGE_SIZE);
        let touched = Arc::new(TouchedPages::new(mem.pages()));
        let bg = BackgroundVerifier::start(
            Arc::new(open_view(&path).unwrap()),
            Arc::clone(&touched),
            KvmChecks::default(),
        )
        .unwrap();
        run_kvm(&mut guest, 50_000);
        rehash(&mem, &hashes, &touched);
        run_pass(&bg);
        // More transactions after the pass: their blocks' facts are stale.
        run_kvm(&mut guest, 20_000);
        rehash(&mem, &hashes, &touched);
        let (ram, params) = (Arc::clone(guest.ram()), guest.params().clone());
        let known = KvmKnownFacts::new(Some(bg), &hashes, params.layout);
        let from_background = AtomicU64::new(0);
        let get = |b: u64| {
            let f = known.get(b);
            if f.is_some_and(|f| !f.zero) {
                from_background.fetch_add(1, Ordering::Relaxed);
            }
            f
        };
        let full = verify(&ram, &params).unwrap();
        assert_eq!(verify_known(&*ram, &params, &get).unwrap(), full);
        let used = from_background.load(Ordering::Relaxed);
        assert!(
            used > 0 && used < full.written_blocks,
            "background facts used for {used} of {} written blocks",
            full.written_blocks
        );
        // Corrupt a block whose background facts were current.
        let b = (0..params.layout.block_count)
            .find(|&b| known.get(b).is_some_and(|f| !f.zero))
            .unwrap();
        let gpa = params.layout.block_gpa(b) + 5000;
        ram.write_u64(gpa, ram.read_u64(gpa).unwrap() ^ 4).unwrap();
        rehash(&mem, &hashes, &touched);
        let expected = verify(&ram, &params).unwrap_err().to_string();
        assert!(expected.contains(&format!("block {b}")), "{expected}");
        let got = verify_known(&*ram, &params, &get).unwrap_err();
        assert_eq!(got.to_string(), expected);
        ram.write_u64(gpa, ram.read_u64(gpa).unwrap() ^ 4).unwrap();
        // A block that must stay zero and holds data is found although its neighbours'
        // facts come from the hashes.
        let tail = params.layout.block_count - 1;
        assert!(known.get(tail).is_some_and(|f| f.zero));
        ram.write_u64(params.layout.block_gpa(tail) + 64, 1)
            .unwrap();
        rehash(&mem, &hashes, &touched);
        let expected = verify(&ram, &params).unwrap_err().to_string();
        assert!(expected.contains("should be all zero"), "{expected}");
        assert_eq!(
            verify_known(&*ram, &params, &get).unwrap_err().to_string(),
            expected
        );
        guest.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
