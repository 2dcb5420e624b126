//! The KVM guest's part of the background verify: what each page that lands changes in
//! every block's known state ([`KvmKnownBlocks`]), and the ledger check at the pause, which
//! reads only what changed since the last pass (or every block the hashes cannot vouch
//! for, when something fails: the full check names it).

use crate::guest::kvm::memory::RamRead;
use crate::guest::kvm::{KvmError, KvmVerifyReport, Params};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::migration::dest::verify::{BackgroundVerifier, BlockChecks, PassControl};
use crate::migration::digest::PageHashes;

use super::known::KvmKnownBlocks;

/// What the background passes learned.
#[derive(Default)]
enum Learned {
    /// No valid parameter block seen yet.
    #[default]
    Nothing,
    Known(Box<KvmKnownBlocks>),
    /// The parameter block changed, or the workload has no blocks to know (filedb).
    Unusable,
}

/// The KVM guest's background checks: each block's facts (header, checksum, zero) and
/// ledger entry, with the sums the ledger check needs.
#[derive(Default)]
pub struct KvmChecks {
    learned: Learned,
}

/// The received image as the KVM verifier reads RAM: copies read from its file (the
/// background's passes and the check at the pause alike). The receiver writes the image
/// with `pwrite`, so most of its pages are not mapped, and reading them through a mapping
/// would fault them in.
pub(super) struct FileRam<'a>(pub(super) &'a GuestMemory);

impl RamRead for FileRam<'_> {
    fn ram_size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<(), KvmError> {
        let fits = usize::try_from(gpa)
            .ok()
            .and_then(|at| at.checked_add(buf.len()))
            .is_some_and(|end| end <= self.0.len());
        if !fits {
            return Err(KvmError::GuestMemory(format!(
                "read of {} bytes at {gpa:#x} outside {} bytes of RAM",
                buf.len(),
                self.0.len()
            )));
        }
        self.0.read_from_file_at(gpa as usize, buf);
        Ok(())
    }
}

impl BlockChecks for KvmChecks {
    fn pass(&mut self, view: &GuestMemory, pages: &[u64], control: &PassControl) -> usize {
        let ram = FileRam(view);
        let Ok(params) = Params::read_from(&ram) else {
            return 0; // the parameter block has not landed yet: keep the pages
        };
        if matches!(self.learned, Learned::Nothing) {
            // The RAM started as zeros and every page written since is in `pages`.
            let zero = crate::migration::digest::page_hash(&[0u8; PAGE_SIZE]);
            self.learned = match KvmKnownBlocks::new(params.clone(), zero) {
                Some(known) => Learned::Known(Box::new(known)),
                None => Learned::Unusable,
            };
        }
        let Learned::Known(known) = &mut self.learned else {
            return pages.len();
        };
        if known.params != params {
            self.learned = Learned::Unusable;
            return pages.len();
        }
        // Asked before each page: the pages before it are checked.
        let mut checked = 0;
        let mut stop = || {
            control.checked(checked);
            checked += 1;
            control.stopped()
        };
        match known.take_pages(&ram, pages, &mut stop) {
            Ok(done) => done,
            Err(_) => {
                self.learned = Learned::Unusable;
                pages.len()
            }
        }
    }

    fn set_up(&self) -> bool {
        !matches!(self.learned, Learned::Nothing)
    }
}

/// The ledger check at the pause of `ram` (the received image, as the codec left it:
/// `hashes` describe it), with what `background` learned. Also returns how many blocks and
/// ledger pages the quick path read (`None`: the full check ran).
pub fn check_at_pause<R: RamRead + Sync + ?Sized>(
    ram: &R,
    hashes: &PageHashes,
    background: Option<BackgroundVerifier<KvmChecks>>,
) -> Result<(KvmVerifyReport, Option<u64>), KvmError> {
    let params = Params::read_from(ram)?;
    let mut known = None;
    if let Some(f) = background.and_then(BackgroundVerifier::finish) {
        if let Learned::Known(mut k) = f.checks.learned {
            if k.params == params {
                let read = k.catch_up(ram, &f.pending, hashes)?;
                if let Some(report) = k.report(ram) {
                    return Ok((report, Some(read)));
                }
                known = Some(k);
            }
        }
    }
    // Something fails (or nothing was learned): the full check, taking the facts of blocks
    // whose pages still hash as their state's, names it.
    let zero = hashes.zero_page_hash();
    let get = |b: u64| {
        let first = params.layout.block_gpa(b) / PAGE_SIZE as u64;
        let pages = (crate::guest::kvm::abi::BLOCK_SIZE as usize).div_ceil(PAGE_SIZE) as u64;
        if (first..first + pages).all(|p| hashes.get(p) == zero) {
            return Some(crate::guest::kvm::verify::BlockFacts {
                zero: true,
                ..Default::default()
            });
        }
        known.as_ref().and_then(|k| k.facts(b, hashes))
    };
    crate::guest::kvm::verify::verify_known(ram, &params, &get).map(|r| (r, None))
}

#[cfg(test)]
mod tests {
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

    /// The KVM ledger check at the pause, after a background pass and more transactions,
    /// gives the full check's result reading only the blocks changed since; a block
    /// corrupted after its background check, and a block that must stay zero and holds
    /// data, are reported as the full check reports them.
    #[test]
    fn kvm_ledger_check_at_the_pause_equals_the_full_check() {
        use crate::guest::kvm::verify::verify;
        use crate::guest::kvm::{kvm_available, GuestRam, KvmGuest, KvmGuestConfig};
        if let Err(why) = kvm_available() {
            eprintln!("skipping: {why}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("vmstream-kvm-bg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ram");
        // 64 MiB, 95% of transactions in the hot set: the second run rewrites few blocks.
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
        // Hashes and a background that have seen the RAM as it is now (a pass done).
        let checked_now = || {
            let hashes = PageHashes::zeroed(mem.pages(), PAGE_SIZE);
            let touched = Arc::new(TouchedPages::new(mem.pages()));
            let bg = BackgroundVerifier::start(
                Arc::new(open_view(&path).unwrap()),
                Arc::clone(&touched),
                KvmChecks::default(),
            )
            .unwrap();
            rehash(&mem, &hashes, &touched);
            run_pass(&bg);
            (hashes, touched, bg)
        };
        run_kvm(&mut guest, 50_000);
        let (hashes, touched, bg) = checked_now();
        // More transactions after the pass: their blocks are read at the pause.
        run_kvm(&mut guest, 20_000);
        rehash(&mem, &hashes, &touched);
        let (ram, params) = (Arc::clone(guest.ram()), guest.params().clone());
        let full = verify(&ram, &params).unwrap();
        let (got, read) = check_at_pause(&*ram, &hashes, Some(bg)).unwrap();
        assert_eq!(got, full);
        let read = read.expect("the quick path ran");
        assert!(
            read > 0 && read < full.written_blocks,
            "read {read} blocks and ledger pages of {} written blocks",
            full.written_blocks
        );
        // Corrupt a written block after its background check.
        let (hashes, touched, bg) = checked_now();
        let b = (0..params.layout.block_count)
            .find(|&b| ram.read_u64(params.layout.block_gpa(b)).unwrap() != 0)
            .unwrap();
        let gpa = params.layout.block_gpa(b) + 5000;
        ram.write_u64(gpa, ram.read_u64(gpa).unwrap() ^ 4).unwrap();
        rehash(&mem, &hashes, &touched);
        let expected = verify(&ram, &params).unwrap_err().to_string();
        assert!(expected.contains(&format!("block {b}")), "{expected}");
        let got = check_at_pause(&*ram, &hashes, Some(bg)).unwrap_err();
        assert_eq!(got.to_string(), expected);
        ram.write_u64(gpa, ram.read_u64(gpa).unwrap() ^ 4).unwrap();
        // Data in a block that must stay zero.
        let (hashes, touched, bg) = checked_now();
        let tail = params.layout.block_count - 1;
        ram.write_u64(params.layout.block_gpa(tail) + 64, 1)
            .unwrap();
        rehash(&mem, &hashes, &touched);
        let expected = verify(&ram, &params).unwrap_err().to_string();
        assert!(expected.contains("should be all zero"), "{expected}");
        assert_eq!(
            check_at_pause(&*ram, &hashes, Some(bg))
                .unwrap_err()
                .to_string(),
            expected
        );
        guest.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
