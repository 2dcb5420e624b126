//! The post-commit audit: every page of the source's memory as it was at the pause,
//! compared with the hash of what was sent of it (which the digest proved the destination
//! holds). A difference is a write the dirty tracker missed after the scrubber last passed:
//! the destination's guest runs on a stale copy of that page.

use rayon::prelude::*;

use crate::memory::{page_is_hole, PAGE_SIZE};
use crate::migration::digest::page_hash;
use crate::migration::wire::{Audit, AuditStatus};

use super::sent::SentPages;

/// Compares `memory` (the paused guest's, whole) with `sent`; pages clear in `data` (holes)
/// are zero and not read.
pub fn audit(memory: &[u8], data: Option<&[u64]>, sent: &SentPages) -> Audit {
    let pages = (memory.len() / PAGE_SIZE) as u64;
    if pages != sent.pages() {
        return Audit {
            status: AuditStatus::Incomplete,
            pages_checked: 0,
            mismatched: 0,
            pages: Vec::new(),
        };
    }
    let zero = sent.hashes().zero_page_hash();
    let mut differ: Vec<u64> = memory
        .par_chunks(PAGE_SIZE)
        .enumerate()
        .filter_map(|(p, page)| {
            let p = p as u64;
            let now = match data {
                Some(d) if page_is_hole(d, p) => zero,
                _ => page_hash(page),
            };
            (now != sent.hash(p)).then_some(p)
        })
        .collect();
    differ.sort_unstable();
    let mismatched = differ.len() as u64;
    differ.truncate(Audit::MAX_PAGES);
    Audit {
        status: if mismatched == 0 {
            AuditStatus::Match
        } else {
            AuditStatus::Mismatch
        },
        pages_checked: pages,
        mismatched,
        pages: differ,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_names_pages_that_differ_from_what_was_sent() {
        let mut mem = vec![0u8; 8 * PAGE_SIZE];
        let sent = SentPages::new(8);
        mem[PAGE_SIZE..2 * PAGE_SIZE].fill(1);
        sent.record(1, &mem[PAGE_SIZE..2 * PAGE_SIZE]);
        assert_eq!(audit(&mem, None, &sent).status, AuditStatus::Match);
        // A write nobody sent, and one to a page sent as something else.
        mem[6 * PAGE_SIZE] = 9;
        mem[PAGE_SIZE] = 2;
        let a = audit(&mem, None, &sent);
        assert_eq!(
            (a.status, a.mismatched, a.pages),
            (AuditStatus::Mismatch, 2, vec![1, 6])
        );
        // Pages the bitmap calls holes are taken as zero.
        let data = vec![!(1u64 << 6)];
        assert_eq!(audit(&mem, Some(&data), &sent).pages, vec![1]);
        assert_eq!(
            audit(&mem[PAGE_SIZE..], None, &sent).status,
            AuditStatus::Incomplete
        );
    }
}
