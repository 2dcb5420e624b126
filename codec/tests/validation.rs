//! One test per validation failure of the receiver.

use vmstream_codec::compress::lz4;
use vmstream_codec::format::{
    parse_packet, Encoding, Limits, PacketWriter, HEADER_LEN, RECORD_LEN, TRAILER_LEN,
};
use vmstream_codec::{
    receive, CodecError, PacketDecoder, PacketError, PacketErrorKind, ReceiverConfig, PAGE_SIZE,
};

const GUEST_PAGES: u64 = 32;

fn text_page(seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| b"vmstream page "[i % 14].wrapping_add(seed))
        .collect()
}

/// A valid packet of round 0, seq 7: page 1 raw, page 2 zero, page 3 lz4.
fn sample_packet() -> Vec<u8> {
    let mut w = PacketWriter::default();
    w.begin(3);
    w.push(1, Encoding::Raw, &text_page(1));
    w.push(2, Encoding::Zero, &[]);
    let mut c = vec![0u8; PAGE_SIZE];
    let n = lz4::compress_oneshot(&text_page(3), &mut c, 1).unwrap();
    w.push(3, Encoding::Lz4, &c[..n]);
    let len = w.finish(0, 7);
    w.buffer()[..len].to_vec()
}

/// Recomputes the CRC after a deliberate edit, so the edit is what fails.
fn reseal(p: &mut [u8]) {
    let body = p.len() - TRAILER_LEN;
    let crc = crc32c::crc32c(&p[..body]);
    p[body..].copy_from_slice(&crc.to_le_bytes());
}

fn table_at(p: &[u8], record: usize) -> usize {
    let count = u32::from_le_bytes(p[12..16].try_into().unwrap()) as usize;
    p.len() - TRAILER_LEN - count * RECORD_LEN + record * RECORD_LEN
}

/// Decodes with a fresh single-threaded decoder; checks memory stayed
/// untouched on error (validation happens before any write).
fn decode(p: &[u8]) -> Result<(), PacketError> {
    let mut mem = vec![0xAAu8; GUEST_PAGES as usize * PAGE_SIZE];
    let mut d = PacketDecoder::new(GUEST_PAGES).unwrap();
    let r = d.apply(p, &mut mem);
    if let Err(e) = &r {
        // Compressed payloads decompress straight into their page, so a
        // malformed one (that passed the CRC) may have touched that page
        // only; every other failure is detected before any write.
        let touched = match e.kind {
            PacketErrorKind::DecompressedSize { page, .. } => Some(page as usize),
            _ => None,
        };
        for (i, page) in mem.chunks(PAGE_SIZE).enumerate() {
            if Some(i) != touched {
                assert!(
                    page.iter().all(|&b| b == 0xAA),
                    "page {i} written before validation failed: {e}"
                );
            }
        }
    }
    r
}

fn kind(p: &[u8]) -> PacketErrorKind {
    let e = decode(p).expect_err("packet must be rejected");
    e.kind
}

#[test]
fn valid_packet_applies() {
    let p = sample_packet();
    let mut mem = vec![0xAAu8; GUEST_PAGES as usize * PAGE_SIZE];
    PacketDecoder::new(GUEST_PAGES)
        .unwrap()
        .apply(&p, &mut mem)
        .unwrap();
    assert_eq!(&mem[PAGE_SIZE..2 * PAGE_SIZE], &text_page(1)[..]);
    assert!(mem[2 * PAGE_SIZE..3 * PAGE_SIZE].iter().all(|&b| b == 0));
    assert_eq!(&mem[3 * PAGE_SIZE..4 * PAGE_SIZE], &text_page(3)[..]);
    assert!(mem[..PAGE_SIZE].iter().all(|&b| b == 0xAA));
}

#[test]
fn bad_magic() {
    let mut p = sample_packet();
    p[0] = b'X';
    reseal(&mut p);
    let e = decode(&p).unwrap_err();
    assert_eq!(e.seq, Some(7));
    assert_eq!(e.kind, PacketErrorKind::BadMagic { found: *b"XMSP" });
}

#[test]
fn bad_version() {
    let mut p = sample_packet();
    p[4] = 2;
    reseal(&mut p);
    assert_eq!(kind(&p), PacketErrorKind::UnsupportedVersion { found: 2 });
}

#[test]
fn bad_checksum() {
    let mut p = sample_packet();
    p[HEADER_LEN + 10] ^= 1; // a payload byte
    assert!(matches!(kind(&p), PacketErrorKind::Checksum { .. }));
    let mut p = sample_packet();
    let last = p.len() - 1;
    p[last] ^= 0x80; // the CRC itself
    assert!(matches!(kind(&p), PacketErrorKind::Checksum { .. }));
}

#[test]
fn unknown_flags() {
    let mut p = sample_packet();
    p[6] = 1;
    reseal(&mut p);
    assert_eq!(kind(&p), PacketErrorKind::UnknownFlags { flags: 1 });
}

#[test]
fn page_out_of_range() {
    let mut p = sample_packet();
    let at = table_at(&p, 1);
    p[at..at + 8].copy_from_slice(&GUEST_PAGES.to_le_bytes());
    reseal(&mut p);
    assert_eq!(
        kind(&p),
        PacketErrorKind::PageOutOfRange {
            record: 1,
            page: GUEST_PAGES,
            guest_pages: GUEST_PAGES
        }
    );
}

#[test]
fn packet_length_mismatch() {
    // Declared shorter than what arrived (trailing bytes).
    let mut p = sample_packet();
    p.extend_from_slice(&[0; 4]);
    let n = p.len();
    reseal(&mut p[..n]);
    assert_eq!(
        kind(&p),
        PacketErrorKind::PacketLength {
            declared: (n - 4) as u32,
            actual: n
        }
    );
}

#[test]
fn record_lengths_do_not_add_up() {
    // Record 2 (lz4) claims one byte less than its payload: the sum no
    // longer matches the payload area.
    let mut p = sample_packet();
    let at = table_at(&p, 2) + 10;
    let len = u16::from_le_bytes([p[at], p[at + 1]]);
    p[at..at + 2].copy_from_slice(&(len - 1).to_le_bytes());
    reseal(&mut p);
    assert!(
        matches!(kind(&p), PacketErrorKind::PayloadLength { declared, actual } if declared + 1 == actual)
    );
}

#[test]
fn oversized_length() {
    let mut p = sample_packet();
    let at = table_at(&p, 2) + 10;
    p[at..at + 2].copy_from_slice(&5000u16.to_le_bytes());
    reseal(&mut p);
    assert_eq!(
        kind(&p),
        PacketErrorKind::OversizedLength {
            record: 2,
            len: 5000,
            max: PAGE_SIZE
        }
    );
}

#[test]
fn length_invalid_for_encoding() {
    // A raw page must be exactly one page; relabel the lz4 record as raw.
    let mut p = sample_packet();
    let at = table_at(&p, 2);
    p[at + 8] = Encoding::Raw.tag();
    let len = u16::from_le_bytes([p[at + 10], p[at + 11]]) as usize;
    reseal(&mut p);
    assert_eq!(
        kind(&p),
        PacketErrorKind::BadRecordLength {
            record: 2,
            encoding: Encoding::Raw,
            len
        }
    );
}

#[test]
fn unknown_encoding_tag() {
    let mut p = sample_packet();
    let at = table_at(&p, 0);
    p[at + 8] = 200;
    reseal(&mut p);
    assert_eq!(
        kind(&p),
        PacketErrorKind::UnknownEncoding {
            record: 0,
            tag: 200
        }
    );
}

#[test]
fn reserved_byte_nonzero() {
    let mut p = sample_packet();
    let at = table_at(&p, 0);
    p[at + 9] = 1;
    reseal(&mut p);
    assert_eq!(
        kind(&p),
        PacketErrorKind::ReservedNonZero {
            record: 0,
            value: 1
        }
    );
}

#[test]
fn truncated_packet() {
    let p = sample_packet();
    // Shorter than a header.
    assert_eq!(
        kind(&p[..10]),
        PacketErrorKind::Truncated {
            len: 10,
            needed: HEADER_LEN + TRAILER_LEN
        }
    );
    let e = decode(&p[..10]).unwrap_err();
    assert_eq!(e.seq, None);
    // Cut in the middle.
    let cut = &p[..p.len() - 100];
    assert_eq!(
        kind(cut),
        PacketErrorKind::Truncated {
            len: cut.len(),
            needed: p.len()
        }
    );
}

#[test]
fn record_table_larger_than_packet() {
    let mut p = sample_packet();
    p[12..16].copy_from_slice(&4000u32.to_le_bytes());
    reseal(&mut p);
    assert!(matches!(kind(&p), PacketErrorKind::Truncated { .. }));
    p[12..16].copy_from_slice(&100_000u32.to_le_bytes());
    reseal(&mut p);
    assert!(matches!(
        kind(&p),
        PacketErrorKind::TooManyPages { count: 100_000, .. }
    ));
}

#[test]
fn duplicate_page_in_round() {
    // Within one packet.
    let mut w = PacketWriter::default();
    w.begin(2);
    w.push(5, Encoding::Zero, &[]);
    w.push(5, Encoding::Raw, &text_page(0));
    let len = w.finish(0, 1);
    assert_eq!(
        kind(&w.buffer()[..len]),
        PacketErrorKind::DuplicatePage {
            record: 1,
            page: 5,
            round: 0
        }
    );

    // Across packets of one round, but fine in the next round.
    let mut mem = vec![0u8; GUEST_PAGES as usize * PAGE_SIZE];
    let mut d = PacketDecoder::new(GUEST_PAGES).unwrap();
    let p = sample_packet();
    d.apply(&p, &mut mem).unwrap();
    let e = d.apply(&p, &mut mem).unwrap_err();
    assert_eq!(
        e.kind,
        PacketErrorKind::DuplicatePage {
            record: 0,
            page: 1,
            round: 0
        }
    );
    d.end_round(0).unwrap();
    let mut next = p.clone();
    next[16..24].copy_from_slice(&1u64.to_le_bytes());
    reseal(&mut next);
    d.apply(&next, &mut mem).unwrap();
}

#[test]
fn wrong_round() {
    let mut p = sample_packet();
    p[16..24].copy_from_slice(&3u64.to_le_bytes());
    reseal(&mut p);
    assert_eq!(
        kind(&p),
        PacketErrorKind::WrongRound {
            expected: 0,
            found: 3
        }
    );
}

fn single_record(encoding: Encoding, payload: &[u8]) -> Vec<u8> {
    let mut w = PacketWriter::default();
    w.begin(1);
    w.push(4, encoding, payload);
    let len = w.finish(0, 9);
    w.buffer()[..len].to_vec()
}

#[test]
fn decompressed_size_mismatch() {
    let half = &text_page(2)[..PAGE_SIZE / 2];
    let double: Vec<u8> = text_page(2).repeat(2);
    let mut out = vec![0u8; 2 * PAGE_SIZE];
    // lz4: too short, and a bomb (two pages' worth).
    let n = lz4::compress_oneshot(half, &mut out, 1).unwrap();
    let e = decode(&single_record(Encoding::Lz4, &out[..n])).unwrap_err();
    assert!(matches!(
        e.kind,
        PacketErrorKind::DecompressedSize {
            record: 0,
            page: 4,
            encoding: Encoding::Lz4,
            ..
        }
    ));
    assert_eq!(e.seq, Some(9));
    let n = lz4::compress_oneshot(&double, &mut out, 1).unwrap();
    assert!(matches!(
        kind(&single_record(Encoding::Lz4, &out[..n])),
        PacketErrorKind::DecompressedSize { .. }
    ));
    // zstd bomb.
    let z = zstd::bulk::compress(&double, 1).unwrap();
    assert!(matches!(
        kind(&single_record(Encoding::Zstd, &z)),
        PacketErrorKind::DecompressedSize {
            encoding: Encoding::Zstd,
            ..
        }
    ));
    // deflate: short, bomb, and garbage.
    let mut c = vmstream_codec::compress::zlib::ZlibCompressor::new(1).unwrap();
    let n = c.compress(half, &mut out).unwrap();
    assert!(matches!(
        kind(&single_record(Encoding::Zlib, &out[..n])),
        PacketErrorKind::DecompressedSize {
            encoding: Encoding::Zlib,
            ..
        }
    ));
    let n = c.compress(&double, &mut out).unwrap();
    assert!(matches!(
        kind(&single_record(Encoding::Zlib, &out[..n])),
        PacketErrorKind::DecompressedSize { .. }
    ));
    assert!(matches!(
        kind(&single_record(Encoding::Zlib, &[0xff; 40])),
        PacketErrorKind::DecompressedSize { .. }
    ));
    // XOR-lz4 that inflates to a half page.
    let n = lz4::compress_oneshot(half, &mut out, 1).unwrap();
    assert!(matches!(
        kind(&single_record(Encoding::XorLz4, &out[..n])),
        PacketErrorKind::DecompressedSize {
            encoding: Encoding::XorLz4,
            ..
        }
    ));
}

#[test]
fn xbzrle_lz4_bomb_and_bad_inner_delta() {
    let mut out = vec![0u8; 3 * PAGE_SIZE];
    // An "XBZRLE delta" of two pages' worth: decompression stops at the
    // 4 KiB scratch and the record is rejected.
    let n = lz4::compress_oneshot(&vec![0u8; 2 * PAGE_SIZE], &mut out, 1).unwrap();
    assert!(matches!(
        kind(&single_record(Encoding::XbzrleLz4, &out[..n])),
        PacketErrorKind::DecompressedSize {
            encoding: Encoding::XbzrleLz4,
            ..
        }
    ));
    // A well-compressed but malformed delta: caught by XBZRLE validation,
    // page untouched.
    let delta = [0xa0, 0x1f, 0xc8, 0x01, 1, 2, 3];
    let n = lz4::compress_oneshot(&delta, &mut out, 1).unwrap();
    assert!(matches!(
        kind(&single_record(Encoding::XbzrleLz4, &out[..n])),
        PacketErrorKind::BadDelta { record: 0, .. }
    ));
}

#[test]
fn malformed_xbzrle_leaves_page_untouched() {
    // A literal run reaching past the page: zrun 4000, nzrun 200.
    let delta = [0xa0, 0x1f, 0xc8, 0x01, 1, 2, 3];
    let e = decode(&single_record(Encoding::Xbzrle, &delta)).unwrap_err();
    assert!(
        matches!(
            e.kind,
            PacketErrorKind::BadDelta {
                record: 0,
                page: 4,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn error_display_names_packet_and_field() {
    let mut p = sample_packet();
    p[4] = 9;
    reseal(&mut p);
    let msg = decode(&p).unwrap_err().to_string();
    assert!(msg.contains("seq 7") && msg.contains("version"), "{msg}");
}

#[test]
fn parse_reports_checksum_before_structure_when_unverified() {
    // Corrupt a record tag without resealing: a parse that skips the CRC
    // must still blame the checksum, not the tag.
    let mut p = sample_packet();
    let at = table_at(&p, 0);
    p[at + 8] = 99;
    let e = parse_packet(
        &p,
        Limits {
            guest_pages: GUEST_PAGES,
            verify_checksum: false,
        },
    )
    .unwrap_err();
    assert!(matches!(e.kind, PacketErrorKind::Checksum { .. }));
}

#[test]
fn pipeline_reports_bad_packet_from_end_round() {
    let mut mem = vec![0u8; GUEST_PAGES as usize * PAGE_SIZE];
    let config = ReceiverConfig {
        workers: 2,
        ..Default::default()
    };
    let good = sample_packet();
    let mut bad = single_record(Encoding::Lz4, &[0xff; 30]); // CRC fine, lz4 garbage
    bad[24..32].copy_from_slice(&8u64.to_le_bytes());
    reseal(&mut bad);
    let r = receive(&config, &mut mem, |rx| {
        rx.submit(good.clone()).unwrap();
        rx.submit(bad).unwrap(); // structurally valid: accepted, fails in a worker
        let e = rx.end_round(0).unwrap_err();
        // Stopped for good: later calls fail too.
        assert!(rx.submit(good).is_err());
        assert!(rx.end_round(0).is_err());
        e
    })
    .unwrap();
    assert!(
        matches!(
            r,
            CodecError::Packet(PacketError {
                seq: Some(8),
                kind: PacketErrorKind::DecompressedSize { .. }
            })
        ),
        "{r}"
    );
}

#[test]
fn pipeline_rejects_before_queueing() {
    let mut mem = vec![0u8; GUEST_PAGES as usize * PAGE_SIZE];
    let config = ReceiverConfig {
        workers: 2,
        ..Default::default()
    };
    let mut bad = sample_packet();
    bad[HEADER_LEN] ^= 0xff;
    let mut bad_spread = bad.clone();
    // Page 64 belongs to the other worker: the dispatcher verifies the CRC.
    let at = table_at(&bad_spread, 2);
    bad_spread[at..at + 8].copy_from_slice(&64u64.to_le_bytes());
    receive(&config, &mut vec![0u8; 128 * PAGE_SIZE], |rx| {
        let e = rx.submit(bad_spread).unwrap_err();
        assert!(matches!(
            e,
            CodecError::Packet(PacketError {
                kind: PacketErrorKind::Checksum { .. },
                ..
            })
        ));
        assert_eq!(rx.end_round(0).unwrap_err(), e);
    })
    .unwrap();
    // A single-owner packet has its CRC checked by the worker, before it
    // writes anything; the error comes out of end_round.
    receive(&config, &mut mem, |rx| {
        rx.submit(bad).unwrap();
        let e = rx.end_round(0).unwrap_err();
        assert!(matches!(
            e,
            CodecError::Packet(PacketError {
                kind: PacketErrorKind::Checksum { .. },
                ..
            })
        ));
    })
    .unwrap();
    assert!(mem.iter().all(|&b| b == 0));
}

/// Random corruption of valid packets (with and without a fixed-up CRC)
/// must give a typed error or a correct decode, never a panic.
#[test]
fn corrupted_packets_never_panic() {
    use quickcheck::{quickcheck, TestResult};
    fn prop(edits: Vec<(u16, u8)>, cut: u16, reseal_crc: bool, which: u8) -> TestResult {
        let packets = corpus_packets();
        let mut p = packets[which as usize % packets.len()].clone();
        for (at, x) in edits {
            let at = at as usize % p.len();
            p[at] ^= x;
        }
        if (cut as usize).is_multiple_of(4) {
            p.truncate(cut as usize % p.len());
        }
        if reseal_crc && p.len() >= HEADER_LEN + TRAILER_LEN {
            reseal(&mut p);
        }
        let mut mem = vec![0u8; GUEST_PAGES as usize * PAGE_SIZE];
        let _ = PacketDecoder::new(GUEST_PAGES).unwrap().apply(&p, &mut mem);
        TestResult::passed()
    }
    quickcheck(prop as fn(Vec<(u16, u8)>, u16, bool, u8) -> TestResult);
}

/// Valid packets of every encoding, made by the real encoder.
fn corpus_packets() -> Vec<Vec<u8>> {
    use vmstream_codec::{Batch, Compression, DeltaConfig, DeltaMode, EncoderConfig, PageEncoder};
    let mut out = Vec::new();
    for (compression, mode) in [
        (Compression::Lz4 { acceleration: 1 }, DeltaMode::Xbzrle),
        (Compression::Zstd { level: 1 }, DeltaMode::XbzrleLz4),
        (Compression::Zlib { level: 1 }, DeltaMode::XorLz4),
    ] {
        let config = EncoderConfig {
            compression,
            delta: Some(DeltaConfig {
                cache_bytes: 1 << 20,
                max_delta: 2048,
                mode,
                ..DeltaConfig::default()
            }),
        };
        let mut enc = PageEncoder::new(&config).unwrap();
        let mut w = PacketWriter::default();
        let mut pages: Vec<Vec<u8>> = (0..4).map(|i| text_page(i as u8)).collect();
        pages[3] = vec![0; PAGE_SIZE];
        pages[2]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = ((i * 2654435761usize) >> 13) as u8);
        for round in 0..2u64 {
            let mut batch = Batch::with_capacity(4);
            for (i, p) in pages.iter_mut().enumerate() {
                if round == 1 {
                    p[100 + i * 50..400 + i * 50].fill(i as u8 + 1);
                }
                batch.push(i as u64 + 1, p);
            }
            enc.begin_round(round);
            let len = enc.encode_batch(0, round, &batch, &mut w);
            out.push(w.buffer()[..len].to_vec());
        }
    }
    out
}

/// A memory file the workers cannot write (read-only here; a full file system alike) fails
/// the round with an error naming the pages, and a file shorter than memory is refused
/// before anything runs.
#[test]
fn memory_file_errors_are_typed() {
    let path = std::env::temp_dir().join(format!("codec-memfile-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; GUEST_PAGES as usize * PAGE_SIZE]).unwrap();
    let mut mem = vec![0u8; GUEST_PAGES as usize * PAGE_SIZE];
    let config = ReceiverConfig {
        workers: 1,
        memory_file: Some(std::sync::Arc::new(std::fs::File::open(&path).unwrap())),
        ..Default::default()
    };
    let e = receive(&config, &mut mem, |rx| {
        rx.submit(sample_packet()).unwrap();
        rx.end_round(0).unwrap_err()
    })
    .unwrap();
    // Pages 1 (raw) and 3 (lz4) are whole pages; the zero record between them ends the
    // first run.
    assert!(
        matches!(
            e,
            CodecError::Write {
                first: 1,
                end: 2,
                ..
            }
        ),
        "{e}"
    );
    std::fs::write(&path, vec![0u8; PAGE_SIZE]).unwrap();
    let short = ReceiverConfig {
        memory_file: Some(std::sync::Arc::new(std::fs::File::open(&path).unwrap())),
        ..config
    };
    let e = receive(&short, &mut mem, |_| ()).unwrap_err();
    assert!(
        matches!(&e, CodecError::Config(m) if m.contains("shorter")),
        "{e}"
    );
    std::fs::remove_file(&path).unwrap();
}
