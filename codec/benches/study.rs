//! Measurements behind two design decisions (see DESIGN.md), printed as
//! tables rather than criterion groups because they compare sizes as much
//! as speeds:
//!
//! 1. delta encodings on real (old, new) page pairs: XBZRLE, XBZRLE then
//!    LZ4, LZ4 of the XOR, and the smaller of XBZRLE and XOR-LZ4;
//! 2. compressing each page on its own vs a whole 128-page packet as one
//!    stream, for lz4, zstd-1 and zlib-1 (deflate level 1).
//!
//! Run: `cargo bench -p vmstream-codec --bench study`.

#[path = "common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::{Corpus, PAGE};
use vmstream_codec::compress::{lz4, zlib, Compression, Compressor};

/// Best of `reps` timings of `f`.
fn best(reps: usize, mut f: impl FnMut()) -> Duration {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap()
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn xor(a: &[u8], b: &[u8], out: &mut [u8]) {
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x ^ y;
    }
}

fn delta_study(c: &Corpus) {
    let pairs = c.pairs();
    let n = pairs.len();
    let bytes = n * PAGE;
    let mut out = vec![0u8; 3 * PAGE];
    let mut tmp = vec![0u8; 3 * PAGE];
    let mut lz = lz4::Lz4Compressor::new(1);
    // Sizes (no budget: a delta larger than the page is counted as is).
    let (mut xb, mut xb_lz, mut xo_lz, mut smallest, mut full_lz) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let (mut xb_fit, mut xo_fit) = (0usize, 0usize);
    for (old, new) in &pairs {
        let d = vmstream_xbzrle::encode(old, new, &mut out).unwrap();
        xb += d;
        xb_fit += (d <= PAGE / 2) as usize;
        let dl = lz
            .compress(&out[..d], &mut tmp)
            .filter(|&m| m < d)
            .unwrap_or(d);
        xb_lz += dl;
        xor(old, new, &mut tmp[..PAGE]);
        let xl = lz.compress(&tmp[..PAGE], &mut out).unwrap();
        xo_lz += xl;
        xo_fit += (xl <= PAGE / 2) as usize;
        smallest += d.min(xl);
        full_lz += lz.compress(new, &mut out).unwrap_or(PAGE).min(PAGE);
    }
    // Encode speeds.
    let t_xb = best(3, || {
        for (old, new) in &pairs {
            black_box(vmstream_xbzrle::encode(old, new, &mut out).unwrap());
        }
    });
    let t_xb_lz = best(3, || {
        for (old, new) in &pairs {
            let d = vmstream_xbzrle::encode(old, new, &mut out).unwrap();
            black_box(lz.compress(&out[..d], &mut tmp));
        }
    });
    let mut x = vec![0u8; PAGE];
    let t_xo_lz = best(3, || {
        for (old, new) in &pairs {
            xor(old, new, &mut x);
            black_box(lz.compress(&x, &mut out));
        }
    });
    // Decode speeds: apply onto a copy of old.
    let deltas: Vec<Vec<u8>> = pairs
        .iter()
        .map(|(o, nw)| {
            let d = vmstream_xbzrle::encode(o, nw, &mut out).unwrap();
            out[..d].to_vec()
        })
        .collect();
    let xors: Vec<Vec<u8>> = pairs
        .iter()
        .map(|(o, nw)| {
            xor(o, nw, &mut x);
            let m = lz.compress(&x, &mut out).unwrap();
            out[..m].to_vec()
        })
        .collect();
    let mut page = vec![0u8; PAGE];
    let t_xb_d = best(3, || {
        for ((o, _), d) in pairs.iter().zip(&deltas) {
            page.copy_from_slice(o);
            vmstream_xbzrle::decode(d, &mut page).unwrap();
            black_box(&page);
        }
    });
    let t_xo_d = best(3, || {
        for ((o, _), d) in pairs.iter().zip(&xors) {
            page.copy_from_slice(o);
            lz4::decompress(d, &mut x).unwrap();
            vmstream_codec::decoder::xor_into(&mut page, &x);
            black_box(&page);
        }
    });
    println!(
        "\n## Deltas: {} ({} page pairs over {} rounds)\n",
        c.name,
        n,
        c.rounds.len()
    );
    println!("| method | bytes out | ratio (page bytes / out) | deltas <= 2 KiB | encode MB/s | decode MB/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    let r = |o: usize| bytes as f64 / o as f64;
    println!(
        "| full page lz4 (no cache) | {full_lz} | {:.2} | | | |",
        r(full_lz)
    );
    println!(
        "| XBZRLE | {xb} | {:.2} | {:.1}% | {:.0} | {:.0} |",
        r(xb),
        100.0 * xb_fit as f64 / n as f64,
        mbps(bytes, t_xb),
        mbps(bytes, t_xb_d)
    );
    println!(
        "| XBZRLE then lz4 | {xb_lz} | {:.2} | | {:.0} | |",
        r(xb_lz),
        mbps(bytes, t_xb_lz)
    );
    println!(
        "| lz4 of XOR | {xo_lz} | {:.2} | {:.1}% | {:.0} | {:.0} |",
        r(xo_lz),
        100.0 * xo_fit as f64 / n as f64,
        mbps(bytes, t_xo_lz),
        mbps(bytes, t_xo_d)
    );
    println!(
        "| smaller of XBZRLE, XOR-lz4 | {smallest} | {:.2} | | | |",
        r(smallest)
    );
}

fn stream_compress(method: Compression, src: &[u8], dst: &mut [u8]) -> usize {
    match method {
        Compression::Lz4 { acceleration } => lz4::compress_oneshot(src, dst, acceleration).unwrap(),
        Compression::Zstd { level } => zstd::bulk::compress_to_buffer(src, dst, level).unwrap(),
        Compression::Zlib { level } => zlib::ZlibCompressor::new(level)
            .unwrap()
            .compress(src, dst)
            .unwrap(),
        Compression::None => unreachable!(),
    }
}

fn packet_study(c: &Corpus) {
    // Non-zero pages of the base image (zero pages never reach a
    // compressor), batched by 128 like packets.
    let pages: Vec<&[u8]> = c
        .base
        .chunks(PAGE)
        .filter(|p| !vmstream_simd::is_zero(p))
        .collect();
    let batch = 128;
    let bytes = pages.len() * PAGE;
    println!(
        "\n## Per page vs whole packet: {} base image, {} non-zero pages, {batch}-page packets\n",
        c.name,
        pages.len()
    );
    println!("| method | per-page ratio | packet ratio | per-page compress MB/s | packet compress MB/s | per-page decompress MB/s | packet decompress MB/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let joined: Vec<Vec<u8>> = pages.chunks(batch).map(|b| b.concat()).collect();
    for method in [
        Compression::Lz4 { acceleration: 1 },
        Compression::Zstd { level: 1 },
        Compression::Zlib { level: 1 },
    ] {
        let mut comp = Compressor::new(method).unwrap();
        let mut out = vec![0u8; PAGE];
        let mut per_page = Vec::with_capacity(pages.len());
        let mut per_page_bytes = 0;
        for p in &pages {
            let v = match comp.compress(p, &mut out[..PAGE - 1]) {
                Some(n) => out[..n].to_vec(),
                None => p.to_vec(),
            };
            per_page_bytes += v.len();
            per_page.push(v);
        }
        let t_pc = best(3, || {
            for p in &pages {
                black_box(comp.compress(p, &mut out[..PAGE - 1]));
            }
        });
        let mut big = vec![0u8; batch * PAGE * 2];
        let packets: Vec<Vec<u8>> = joined
            .iter()
            .map(|j| {
                let n = stream_compress(method, j, &mut big);
                big[..n].to_vec()
            })
            .collect();
        let packet_bytes: usize = packets.iter().map(Vec::len).sum();
        let t_bc = best(3, || {
            for j in &joined {
                black_box(stream_compress(method, j, &mut big));
            }
        });
        let mut dec = vmstream_codec::compress::Decompressor::new().unwrap();
        let enc = method.encoding();
        let mut page = vec![0u8; PAGE];
        let t_pd = best(3, || {
            for v in &per_page {
                if v.len() < PAGE {
                    dec.decompress(enc, v, &mut page).unwrap();
                } else {
                    page.copy_from_slice(v);
                }
                black_box(&page);
            }
        });
        let mut zd = zlib::ZlibDecompressor::new().unwrap();
        let t_bd = best(3, || {
            for (p, j) in packets.iter().zip(&joined) {
                let out = &mut big[..j.len()];
                let n = match method {
                    Compression::Lz4 { .. } => lz4::decompress(p, out).unwrap(),
                    Compression::Zstd { .. } => zstd::bulk::decompress_to_buffer(p, out).unwrap(),
                    _ => zd.decompress(p, out).unwrap(),
                };
                assert_eq!(n, j.len());
                black_box(&out);
            }
        });
        println!(
            "| {:?} | {:.3} | {:.3} | {:.0} | {:.0} | {:.0} | {:.0} |",
            method,
            bytes as f64 / per_page_bytes as f64,
            bytes as f64 / packet_bytes as f64,
            mbps(bytes, t_pc),
            mbps(bytes, t_bc),
            mbps(bytes, t_pd),
            mbps(bytes, t_bd)
        );
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs nothing.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let mut corpora = common::real_corpora();
    corpora.push(common::synthetic(65536, 4));
    for c in &corpora {
        delta_study(c);
        packet_study(c);
    }
}
