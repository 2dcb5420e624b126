//! Per-page compression benches (run late, on a quiet machine:
//! `cargo bench -p vmstream-codec --bench compress`); results in
//! `codec/BENCH_RESULTS.md`.
//!
//! - `compress/<corpus>/<method>/{raw_oneshot,raw_ctx,encoder}`: per-page
//!   compression; `raw_oneshot` is the library's one-shot call
//!   (LZ4_compress_fast, ZSTD_compress, compress2), `raw_ctx` the same
//!   library with a reused context (what the encoder calls), and `encoder`
//!   the PageEncoder (classification + compression + packet assembly + CRC).
//! - `decompress/<corpus>/<method>/{raw,raw_ctx,decoder}`: the library's
//!   one-shot call per page (LZ4_decompress_safe, ZSTD_decompress,
//!   uncompress), the same with a reused context, and the receiver path
//!   (CRC + validation + decode into destination memory).
//!
//! Compression ratios are printed as `RATIO ...` lines on stderr.

#[path = "common/mod.rs"]
mod common;

use std::hint::black_box;

use common::PAGE;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vmstream_codec::compress::{lz4, zlib, Compressor, Decompressor};
use vmstream_codec::decoder::PageDecoder;
use vmstream_codec::format::{parse_packet, Limits, PacketWriter};
use vmstream_codec::{Batch, Compression, EncoderConfig, PageEncoder};

const SAMPLE_PAGES: usize = 4096;

/// Up to `n` pages spread evenly over the image.
fn sample(image: &[u8], n: usize) -> Vec<u8> {
    let pages = image.len() / PAGE;
    let step = (pages / n).max(1);
    (0..pages)
        .step_by(step)
        .take(n)
        .flat_map(|p| image[p * PAGE..(p + 1) * PAGE].to_vec())
        .collect()
}

fn inputs() -> Vec<(String, Vec<u8>)> {
    let mut v = vec![(
        "synthetic".to_string(),
        sample(&common::synthetic(SAMPLE_PAGES, 0).base, SAMPLE_PAGES),
    )];
    for c in common::real_corpora() {
        v.push((c.name.clone(), sample(&c.base, SAMPLE_PAGES)));
    }
    v
}

const METHODS: [Compression; 3] = [
    Compression::Lz4 { acceleration: 1 },
    Compression::Zstd { level: 1 },
    Compression::Zlib { level: 1 },
];

fn method_name(m: Compression) -> &'static str {
    match m {
        Compression::Lz4 { .. } => "lz4",
        Compression::Zstd { .. } => "zstd1",
        Compression::Zlib { .. } => "zlib1",
        Compression::None => "none",
    }
}

/// Encodes `image` into packets of `batch` pages (no deltas).
fn encode_packets(image: &[u8], method: Compression, batch: usize) -> Vec<Vec<u8>> {
    let mut enc = PageEncoder::new(&EncoderConfig {
        compression: method,
        delta: None,
    })
    .unwrap();
    let mut w = PacketWriter::default();
    let mut out = Vec::new();
    let mut b = Batch::with_capacity(batch);
    for (i, page) in image.chunks(PAGE).enumerate() {
        b.push(i as u64, page);
        if b.len() == batch {
            let len = enc.encode_batch(0, out.len() as u64, &b, &mut w);
            out.push(w.buffer()[..len].to_vec());
            b.clear();
        }
    }
    if !b.is_empty() {
        let len = enc.encode_batch(0, out.len() as u64, &b, &mut w);
        out.push(w.buffer()[..len].to_vec());
    }
    out
}

fn bench_compress(c: &mut Criterion) {
    for (name, image) in inputs() {
        let pages = image.len() / PAGE;
        let zero = image
            .chunks(PAGE)
            .filter(|p| vmstream_simd::is_zero(p))
            .count();
        for m in METHODS {
            let mut g = c.benchmark_group(format!("compress/{name}/{}", method_name(m)));
            g.sample_size(10)
                .throughput(Throughput::Bytes(image.len() as u64));
            let mut dst = vec![0u8; 2 * PAGE];
            // Ratios: library alone (raw page when it does not shrink) and
            // the whole packet stream.
            let raw_bytes: usize = image
                .chunks(PAGE)
                .map(|p| common::oneshot(m, p, &mut dst[..PAGE - 1]).unwrap_or(PAGE))
                .sum();
            let packets = encode_packets(&image, m, 128);
            let wire: usize = packets.iter().map(Vec::len).sum();
            eprintln!(
                "RATIO compress/{name}/{}: pages {pages} zero {zero} library {:.3} packets {:.3}",
                method_name(m),
                image.len() as f64 / raw_bytes as f64,
                image.len() as f64 / wire as f64
            );
            let chunks = common::batch_shaped(&image);
            let mut out = vec![0u8; 130 * PAGE];
            g.bench_function("raw_oneshot", |b| {
                b.iter(|| {
                    black_box(common::compress_into_packets(&chunks, &mut out, |p, d| {
                        common::oneshot(m, p, d)
                    }))
                })
            });
            let mut ctx = Compressor::new(m).unwrap();
            g.bench_function("raw_ctx", |b| {
                b.iter(|| {
                    black_box(common::compress_into_packets(&chunks, &mut out, |p, d| {
                        ctx.compress(p, d)
                    }))
                })
            });
            let mut enc = PageEncoder::new(&EncoderConfig {
                compression: m,
                delta: None,
            })
            .unwrap();
            let mut w = PacketWriter::default();
            let batches: Vec<Batch> = image
                .chunks(128 * PAGE)
                .enumerate()
                .map(|(i, chunk)| {
                    let mut b = Batch::with_capacity(128);
                    for (j, p) in chunk.chunks(PAGE).enumerate() {
                        b.push((i * 128 + j) as u64, p);
                    }
                    b
                })
                .collect();
            g.bench_function("encoder", |b| {
                b.iter(|| {
                    for (seq, batch) in batches.iter().enumerate() {
                        black_box(enc.encode_batch(0, seq as u64, batch, &mut w));
                    }
                })
            });
            g.finish();

            let mut g = c.benchmark_group(format!("decompress/{name}/{}", method_name(m)));
            g.sample_size(10)
                .throughput(Throughput::Bytes(image.len() as u64));
            let compressed = common::compress_each_page(&image, |p, d| common::oneshot(m, p, d));
            // What the reused contexts read: the codec's own formats (raw
            // deflate for zlib, where the one-shot call speaks zlib format).
            let mut cctx = Compressor::new(m).unwrap();
            let compressed_ctx = common::compress_each_page(&image, |p, d| cctx.compress(p, d));
            let mut raw_mem = vec![0u8; image.len()];
            g.bench_function("raw", |b| {
                b.iter(|| {
                    common::decompress_into_memory(&compressed, &image, &mut raw_mem, |c, page| {
                        match m {
                            Compression::Lz4 { .. } => lz4::decompress(c, page).unwrap(),
                            Compression::Zstd { .. } => {
                                zstd::bulk::decompress_to_buffer(c, page).unwrap()
                            }
                            _ => zlib::decompress_oneshot(c, page).unwrap(),
                        }
                    })
                })
            });
            let mut ctx = Decompressor::new().unwrap();
            let enc = m.encoding();
            g.bench_function("raw_ctx", |b| {
                b.iter(|| {
                    common::decompress_into_memory(
                        &compressed_ctx,
                        &image,
                        &mut raw_mem,
                        |c, page| ctx.decompress(enc, c, page).unwrap(),
                    )
                })
            });
            let mut dec = PageDecoder::new().unwrap();
            let mut mem = vec![0u8; image.len()];
            let guest_pages = pages as u64;
            let mut decode_all = |mem: &mut [u8]| {
                for p in &packets {
                    let view = parse_packet(
                        p,
                        Limits {
                            guest_pages,
                            verify_checksum: true,
                        },
                    )
                    .unwrap();
                    for r in view.records() {
                        let at = r.page as usize * PAGE;
                        dec.apply(view.header.seq, &r, &mut mem[at..at + PAGE])
                            .unwrap();
                    }
                }
            };
            decode_all(&mut mem);
            assert!(mem == image);
            g.bench_function("decoder", |b| b.iter(|| decode_all(&mut mem)));
            g.finish();
        }
    }
}

criterion_group!(benches, bench_compress);
criterion_main!(benches);
