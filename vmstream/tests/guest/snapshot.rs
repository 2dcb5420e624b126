//! A running guest is stopped with SIGSTOP, its memory file copied, and the copy verified;
//! corrupt and stale copies are caught with the exact bad block.

#[path = "../common/mod.rs"]
mod common;

use std::time::Duration;

use common::{Guest, TmpFile};
use nix::sys::signal::{kill, Signal};
use vmstream::guest::file::layout::{get_u64, hdr, ImageWorkloadKind};
use vmstream::guest::file::throttle::wait_stopped;
use vmstream::guest::file::verify::{verify_file, verify_snapshot, ImageVerifyError, Superblock};

/// Run `kind` for a while, SIGSTOP it, copy the memory file and return the copy's bytes.
fn stopped_snapshots(kind: &str, count: usize) -> Vec<Vec<u8>> {
    let mem = TmpFile::new(&format!("snap-{kind}"));
    let g = Guest::spawn(&[
        "--memory-file",
        mem.str(),
        "--size",
        "4M",
        "--workload",
        kind,
        "--init",
    ]);
    let mut snaps = Vec::new();
    for _ in 0..count {
        std::thread::sleep(Duration::from_millis(150));
        kill(g.pid(), Signal::SIGSTOP).unwrap();
        wait_stopped(g.child.id(), Duration::from_secs(10)).unwrap();
        snaps.push(std::fs::read(&mem.0).unwrap());
        kill(g.pid(), Signal::SIGCONT).unwrap();
    }
    snaps
}

fn verified(mut img: Vec<u8>) -> Result<(Vec<u8>, u64), ImageVerifyError> {
    let r = verify_snapshot(&mut img)?;
    Ok((img, r.tx_count))
}

#[test]
fn stopped_copies_verify_for_every_workload() {
    for kind in ImageWorkloadKind::ALL {
        let snaps = stopped_snapshots(kind.name(), 3);
        let mut last = 0;
        for s in snaps {
            let (_, tx) = verified(s).unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
            assert!(tx >= last, "{}: counter went back", kind.name());
            if kind != ImageWorkloadKind::Idle {
                assert!(tx > last, "{}: no progress", kind.name());
            }
            last = tx;
        }
    }
}

#[test]
fn resume_continues_from_a_copy_and_refuses_a_bad_one() {
    let snap = stopped_snapshots("dbsim", 1).pop().unwrap();
    let (_, tx) = verified(snap.clone()).unwrap();
    let copy = TmpFile::new("resume");
    std::fs::write(&copy.0, &snap).unwrap();
    let g = Guest::spawn(&[
        "--memory-file",
        copy.str(),
        "--resume",
        "--duration",
        "200ms",
    ]);
    assert_eq!(g.ready.tx_count, tx);
    assert_eq!(g.ready.kind, ImageWorkloadKind::Dbsim);
    let (status, out) = g.wait_output();
    assert!(status.success());
    let done: u64 = out
        .trim()
        .strip_prefix("done tx=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(done > tx);
    assert_eq!(verify_file(&copy.0).unwrap().tx_count, done);

    // A copy with one flipped byte in a data block is refused.
    let mut bad = snap;
    let s = Superblock::read(&bad).unwrap();
    let off = s.geometry().block_offset(5) + 200;
    bad[off] ^= 0x40;
    std::fs::write(&copy.0, &bad).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmstream"))
        .args(["guest", "run", "--memory-file", copy.str(), "--resume"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to resume") && err.contains("block 5"),
        "{err}"
    );
}

/// First block whose ledger version differs between two snapshots.
fn changed_block(a: &[u8], b: &[u8], from: u64) -> u64 {
    let g = Superblock::read(a).unwrap().geometry();
    (from..g.block_count)
        .find(|&blk| get_u64(a, g.ledger_entry(blk)) != get_u64(b, g.ledger_entry(blk)))
        .expect("some block changed")
}

#[test]
fn verify_names_the_first_bad_block() {
    let mut snaps = stopped_snapshots("dbsim", 2);
    let (new, _) = verified(snaps.pop().unwrap()).unwrap();
    let (old, _) = verified(snaps.pop().unwrap()).unwrap();
    let s = Superblock::read(&new).unwrap();
    let g = s.geometry();
    let bs = g.block_size as usize;

    // Flipped byte inside a row.
    let mut img = new.clone();
    img[g.block_offset(7) + 3000] ^= 1;
    assert!(matches!(
        verify_snapshot(&mut img),
        Err(ImageVerifyError::Checksum { block: 7, .. })
    ));

    // A whole block rolled back to its previous version (a lost update).
    let b = changed_block(&old, &new, 0);
    let mut img = new.clone();
    let off = g.block_offset(b);
    img[off..off + bs].copy_from_slice(&old[off..off + bs]);
    let (ov, nv) = (
        get_u64(&old, off + hdr::VERSION),
        get_u64(&new, off + hdr::VERSION),
    );
    assert_eq!(
        verify_snapshot(&mut img),
        Err(ImageVerifyError::Version {
            block: b,
            header: ov,
            ledger: nv
        })
    );

    // Only the second page of a block is stale: caught by the checksum.
    let b2 = (0..g.block_count)
        .find(|&blk| {
            let p = g.block_offset(blk) + 4096;
            old[p..p + 4096] != new[p..p + 4096]
        })
        .expect("some second page changed");
    let mut img = new.clone();
    let p = g.block_offset(b2) + 4096;
    img[p..p + 4096].copy_from_slice(&old[p..p + 4096]);
    assert!(
        matches!(verify_snapshot(&mut img), Err(ImageVerifyError::Checksum { block, .. }) if block == b2)
    );

    // A stale ledger page: the first block it covers that changed shows a version mismatch.
    let mut img = new.clone();
    img[4096..8192].copy_from_slice(&old[4096..8192]);
    let first = changed_block(&old, &new, 0);
    assert!(
        matches!(verify_snapshot(&mut img), Err(ImageVerifyError::Version { block, .. }) if block == first)
    );

    // A lost (zero) page at the start of a block.
    let mut img = new.clone();
    let off = g.block_offset(11);
    img[off..off + 4096].fill(0);
    assert_eq!(
        verify_snapshot(&mut img),
        Err(ImageVerifyError::BlockNumber {
            block: 11,
            found: 0
        })
    );

    // A stale superblock: blocks carry transactions newer than its counter.
    let mut img = new.clone();
    img[..4096].copy_from_slice(&old[..4096]);
    img[128..136].fill(0); // keep the old journal from being replayed
    assert!(matches!(
        verify_snapshot(&mut img),
        Err(ImageVerifyError::FutureTx { .. } | ImageVerifyError::Counter { .. })
    ));

    // Garbage in memory the workload never touches.
    let mut img = new.clone();
    let inactive = g.block_offset(s.active_blocks) + 77;
    img[inactive] = 1;
    assert!(matches!(
        verify_snapshot(&mut img),
        Err(ImageVerifyError::NotZero { block: Some(b), .. }) if b == s.active_blocks
    ));
}

#[test]
fn fill_workload_content_is_checked_exactly() {
    let snap = stopped_snapshots("random", 1).pop().unwrap();
    let (mut img, _) = verified(snap).unwrap();
    let g = Superblock::read(&img).unwrap().geometry();
    // Rewrite one payload word and fix the checksum: only the content check can tell.
    let off = g.block_offset(9);
    img[off + 1000] ^= 0x80;
    let sum = vmstream::guest::file::layout::block_checksum(&img[off..off + 4096]);
    img[off + hdr::CHECKSUM..off + hdr::CHECKSUM + 8].copy_from_slice(&sum.to_le_bytes());
    assert!(matches!(
        verify_snapshot(&mut img),
        Err(ImageVerifyError::Content {
            block: 9,
            offset: 1000,
            ..
        })
    ));
}
