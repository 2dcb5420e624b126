//! Round trips through PageEncoder and PacketDecoder for every encoding,
//! over several rounds so deltas are exercised.

use vmstream_codec::format::PacketWriter;
use vmstream_codec::{
    Batch, Compression, DeltaConfig, DeltaMode, EncoderConfig, Encoding, PacketDecoder,
    PageEncoder, PAGE_SIZE,
};

const PAGES: u64 = 96;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Page `p` in round `r`: a mix of zero, random (incompressible), text
/// (compressible) pages and small edits of the previous content.
fn evolve(rng: &mut Rng, p: u64, r: u64, prev: &mut [u8]) {
    match (p + r) % 6 {
        0 => prev.fill(0),
        1 => prev.iter_mut().for_each(|b| *b = rng.next() as u8),
        2 => {
            let words = [b"alpha ".as_slice(), b"beta ", b"gamma ", b"delta "];
            let mut i = 0;
            while i < PAGE_SIZE {
                let w = words[(rng.next() % 4) as usize];
                let n = w.len().min(PAGE_SIZE - i);
                prev[i..i + n].copy_from_slice(&w[..n]);
                i += n;
            }
        }
        3 => {} // unchanged
        4 => {
            // Rewrite a region with a repeating record: a big but very
            // compressible delta.
            let at = (rng.next() % 2048) as usize;
            let rec = rng.next().to_le_bytes();
            for (i, b) in prev[at..at + 1500].iter_mut().enumerate() {
                *b = rec[i % 8];
            }
        }
        _ => {
            for _ in 0..(1 + rng.next() % 20) {
                let at = (rng.next() % PAGE_SIZE as u64) as usize;
                prev[at] = prev[at].wrapping_add(1 + (rng.next() % 255) as u8);
            }
        }
    }
}

fn run(config: EncoderConfig, rounds: u64) -> [u64; 8] {
    let mut enc = PageEncoder::new(&config).unwrap();
    let mut dec = PacketDecoder::new(PAGES).unwrap();
    let mut src = vec![0u8; PAGES as usize * PAGE_SIZE];
    let mut dst = vec![0x55u8; PAGES as usize * PAGE_SIZE];
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut writer = PacketWriter::default();
    let mut seen = [0u64; 8];
    let mut seq = 0;
    for r in 0..rounds {
        enc.begin_round(r);
        let mut batch = Batch::with_capacity(32);
        for p in 0..PAGES {
            if r > 0 && (p * 7 + r) % 3 == 0 {
                continue; // not dirty this round
            }
            let page = &mut src[p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE];
            evolve(&mut rng, p, r, page);
            batch.push(p, page);
            if batch.len() == 32 {
                let len = enc.encode_batch(r, seq, &batch, &mut writer);
                dec.apply(&writer.buffer()[..len], &mut dst).unwrap();
                seq += 1;
                batch.clear();
            }
        }
        if !batch.is_empty() {
            let len = enc.encode_batch(r, seq, &batch, &mut writer);
            dec.apply(&writer.buffer()[..len], &mut dst).unwrap();
            seq += 1;
        }
        dec.end_round(r).unwrap();
        assert!(src == dst, "round {r}: destination differs");
        for e in Encoding::ALL {
            seen[e as usize] = dec.stats().get(e).pages;
        }
    }
    seen
}

fn cfg(compression: Compression, mode: Option<DeltaMode>) -> EncoderConfig {
    EncoderConfig {
        compression,
        delta: mode.map(|mode| DeltaConfig {
            cache_bytes: 1 << 20,
            max_delta: 2048,
            mode,
            ..DeltaConfig::default()
        }),
    }
}

#[test]
fn roundtrip_lz4_no_delta() {
    let seen = run(cfg(Compression::Lz4 { acceleration: 1 }, None), 3);
    assert!(
        seen[Encoding::Zero as usize] > 0
            && seen[Encoding::Raw as usize] > 0
            && seen[Encoding::Lz4 as usize] > 0
    );
    assert_eq!(
        seen[Encoding::Xbzrle as usize] + seen[Encoding::XorLz4 as usize],
        0
    );
}

#[test]
fn roundtrip_lz4_accelerated() {
    let seen = run(cfg(Compression::Lz4 { acceleration: 8 }, None), 2);
    assert!(seen[Encoding::Lz4 as usize] > 0);
}

#[test]
fn roundtrip_zstd() {
    for level in [1, 3, 19] {
        let seen = run(cfg(Compression::Zstd { level }, Some(DeltaMode::Xbzrle)), 3);
        assert!(seen[Encoding::Zstd as usize] > 0 && seen[Encoding::Xbzrle as usize] > 0);
    }
}

#[test]
fn roundtrip_zlib() {
    for level in [0, 1, 9] {
        let seen = run(cfg(Compression::Zlib { level }, Some(DeltaMode::Xbzrle)), 3);
        // Level 0 stores: nothing shrinks, so pages go raw.
        assert_eq!(
            seen[Encoding::Zlib as usize] > 0,
            level > 0,
            "level {level}"
        );
    }
}

#[test]
fn roundtrip_uncompressed() {
    let seen = run(cfg(Compression::None, None), 2);
    assert!(seen[Encoding::Raw as usize] > 0 && seen[Encoding::Zero as usize] > 0);
    assert_eq!(seen[Encoding::Lz4 as usize], 0);
}

#[test]
fn roundtrip_xbzrle() {
    let seen = run(
        cfg(
            Compression::Lz4 { acceleration: 1 },
            Some(DeltaMode::Xbzrle),
        ),
        5,
    );
    assert!(seen[Encoding::Xbzrle as usize] > 0);
    assert_eq!(seen[Encoding::XorLz4 as usize], 0);
}

#[test]
fn roundtrip_xbzrle_lz4() {
    let seen = run(
        cfg(
            Compression::Lz4 { acceleration: 1 },
            Some(DeltaMode::XbzrleLz4),
        ),
        5,
    );
    assert!(seen[Encoding::XbzrleLz4 as usize] > 0 && seen[Encoding::Xbzrle as usize] > 0);
    assert_eq!(seen[Encoding::XorLz4 as usize], 0);
}

#[test]
fn roundtrip_xor_lz4() {
    let seen = run(
        cfg(
            Compression::Lz4 { acceleration: 1 },
            Some(DeltaMode::XorLz4),
        ),
        5,
    );
    assert!(seen[Encoding::XorLz4 as usize] > 0);
    assert_eq!(seen[Encoding::Xbzrle as usize], 0);
}

#[test]
fn roundtrip_smallest_delta() {
    let seen = run(
        cfg(Compression::Zstd { level: 1 }, Some(DeltaMode::Smallest)),
        5,
    );
    assert!(seen[Encoding::XorLz4 as usize] + seen[Encoding::Xbzrle as usize] > 0);
}

#[test]
fn unchanged_pages_send_nothing() {
    let config = cfg(
        Compression::Lz4 { acceleration: 1 },
        Some(DeltaMode::Xbzrle),
    );
    let mut enc = PageEncoder::new(&config).unwrap();
    let mut w = PacketWriter::default();
    let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7) as u8).collect();
    let mut batch = Batch::with_capacity(1);
    batch.push(3, &page);
    enc.encode_batch(0, 0, &batch, &mut w);
    enc.begin_round(1);
    let len = enc.encode_batch(1, 1, &batch, &mut w);
    let mut dec = PacketDecoder::new(8).unwrap();
    let mut mem = vec![0u8; 8 * PAGE_SIZE];
    dec.apply(&w.buffer()[..len], &mut mem).ok(); // round mismatch is fine here
    let view = vmstream_codec::format::parse_packet(
        &w.buffer()[..len],
        vmstream_codec::format::Limits {
            guest_pages: 8,
            verify_checksum: true,
        },
    )
    .unwrap();
    assert_eq!(view.header.page_count, 0);
    assert_eq!(enc.cache.unchanged, 1);
}
