//! A QEMU VM's memory as several files (`MemoryRegions`): a destination whose
//! `--memory-file`s, or whose QEMU command line's backend sizes, do not match the source's
//! regions refuses the hello with a typed error (`RefuseCode::MemoryRegions`) before any
//! image is sized or its QEMU started, and leaves its directory as it was. The source is
//! played over a real socket with the wire's own messages (a real one needs a QEMU VM:
//! `tests/tests/qemu.rs` migrates one).

use std::io::{Read, Write};
use std::net::TcpStream;

use vmstream::migration::dest::{listen, receive_on, QemuLaunch};
use vmstream::migration::error::RecvError;
use vmstream::migration::wire::{
    DeltaWire, FrameHeader, GuestKind, Hello, MemoryRegions, Message, RefuseCode,
    FEATURE_MEMORY_DIGEST, FEATURE_MEMORY_REGIONS, FRAME_HEADER_LEN,
};
use vmstream_codec::Compression;

use crate::harness::{recv_config, Dir};

const NODE: u64 = 8 << 20;

/// A destination into `files` memory files whose QEMU gives each backend `NODE` bytes.
fn destination(dir: &Dir, files: usize) -> vmstream::migration::config::RecvConfig {
    let mut cfg = recv_config(dir);
    let first = dir.path("dst.ram0");
    cfg.memory_file = Some(first.clone());
    cfg.memory_regions = (1..files)
        .map(|i| dir.path(&format!("dst.ram{i}")))
        .collect();
    let backends: String = (0..files)
        .map(|i| {
            format!(" -object memory-backend-file,id=m{i},size=8M,mem-path={{memory{i}}},share=on")
        })
        .collect();
    cfg.qemu = Some(QemuLaunch::beside(format!("false{backends}"), &first));
    cfg.resume = true;
    cfg
}

/// Plays a source of a QEMU VM whose memory is `sizes` (one size: one file, no
/// `MemoryRegions`) against `cfg`; returns the destination's error and the status of the
/// `HelloReply` the source read.
fn refused(
    dir: &Dir,
    cfg: vmstream::migration::config::RecvConfig,
    sizes: &[u64],
) -> (RecvError, RefuseCode) {
    let listening = listen(&cfg).expect("listen");
    let addr = listening.local_addr().to_string();
    let dest = std::thread::spawn(move || receive_on(&cfg, listening));
    let mut source = TcpStream::connect(addr.trim_start_matches("tcp:")).unwrap();
    let several = sizes.len() > 1;
    let hello = Hello {
        guest_kind: GuestKind::Qemu,
        page_size: 4096,
        guest_size: sizes.iter().sum(),
        features: FEATURE_MEMORY_DIGEST | if several { FEATURE_MEMORY_REGIONS } else { 0 },
        compression: Compression::None,
        delta: DeltaWire::Off,
        codec_version: Hello::CODEC_VERSION,
        sender_workers: 1,
        cache_bytes: 0,
        batch_pages: 64,
    };
    source.write_all(&Message::Hello(hello).to_frame()).unwrap();
    if several {
        let regions = MemoryRegions {
            sizes: sizes.to_vec(),
        };
        source
            .write_all(&Message::MemoryRegions(regions).to_frame())
            .unwrap();
    }
    let mut header = [0u8; FRAME_HEADER_LEN];
    source.read_exact(&mut header).unwrap();
    let header = FrameHeader::decode(&header).unwrap();
    let mut payload = vec![0u8; header.len as usize];
    source.read_exact(&mut payload).unwrap();
    let status = match Message::decode(header.kind, &payload).unwrap() {
        Message::HelloReply(r) => r.refuse,
        other => panic!("expected a hello reply, got {other:?}"),
    };
    let err = dest
        .join()
        .unwrap()
        .result
        .expect_err("the destination refuses");
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
    (err, status)
}

fn assert_regions_refusal((err, status): (RecvError, RefuseCode), why: &str) {
    assert_eq!(status, RefuseCode::MemoryRegions);
    match err {
        RecvError::Refused {
            code: RefuseCode::MemoryRegions,
            reason,
        } => assert!(reason.contains(why), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_region_count_mismatch_is_refused() {
    let dir = Dir::new("regions-count");
    assert_regions_refusal(
        refused(&dir, destination(&dir, 3), &[NODE, NODE]),
        "memory is 2 file(s) (RAM backends), this destination receives 3",
    );
    assert_regions_refusal(
        refused(&dir, destination(&dir, 2), &[2 * NODE]),
        "memory is 1 file(s) (RAM backends), this destination receives 2",
    );
}

#[test]
fn a_region_size_mismatch_is_refused() {
    let dir = Dir::new("regions-size");
    assert_regions_refusal(
        refused(&dir, destination(&dir, 2), &[NODE, 2 * NODE]),
        "the source's region 1 has 16777216 bytes, the --qemu command line's backend on \
         {memory1} has size 8388608",
    );
}
