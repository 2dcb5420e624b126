//! The same comparisons as the `compress` and `pipeline` criterion benches,
//! measured for a noisy, shared machine: the variants being compared run
//! interleaved, round after round, and each keeps its fastest round. Noise
//! only ever adds time, so the minimum is the most stable estimate, and
//! ratios between minima of the same run are what BENCH_RESULTS.md reports.
//!
//! Run: `cargo bench -p vmstream-codec --bench overhead` (ROUNDS=n to change
//! the number of interleaved rounds, default 15; WHAT=page|scaling|receiver|zero,
//! METHOD=lz4|zstd|zlib and CORPUS=synthetic|pg|linux (a name prefix) to run a part). The per-page tables compare the
//! variants batch by batch (see `interleaved_batches`).

#[path = "common/mod.rs"]
mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::PAGE;
use vmstream_codec::compress::{lz4, zlib, Compressor, Decompressor};
use vmstream_codec::decoder::PageDecoder;
use vmstream_codec::format::{parse_packet, Limits, PacketWriter, TRAILER_LEN};
use vmstream_codec::{
    receive, Batch, Compression, EncoderConfig, PageEncoder, ReceiverConfig, Sender, SenderConfig,
};

fn rounds() -> usize {
    std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15)
}

/// Runs every closure once per round, interleaved, starting each round with
/// the next closure (so none always runs right after the same neighbour);
/// returns each one's fastest time.
fn interleaved(mut fs: Vec<&mut dyn FnMut()>) -> Vec<Duration> {
    let n = fs.len();
    let mut best = vec![Duration::MAX; n];
    for r in 0..rounds() {
        for k in 0..n {
            let i = (r + k) % n;
            let t = Instant::now();
            fs[i]();
            best[i] = best[i].min(t.elapsed());
        }
    }
    best
}

/// Per-page variants compared batch by batch: every round times each
/// variant on each 128-page batch (variants interleaved per batch, in
/// rotating order), and a variant's figure is the sum over batches of its
/// fastest time for that batch. Interference on a shared machine only adds
/// time and rarely hits the same batch in every round, so this is much
/// steadier than the fastest whole pass.
fn interleaved_batches(batches: usize, fs: Vec<&mut dyn FnMut(usize)>) -> Vec<Duration> {
    let mut timed: Vec<_> = fs
        .into_iter()
        .map(|f| {
            move |b| {
                let t = Instant::now();
                f(b);
                t.elapsed()
            }
        })
        .collect();
    interleaved_batches_timed(
        batches,
        timed
            .iter_mut()
            .map(|f| f as &mut dyn FnMut(usize) -> Duration)
            .collect(),
    )
}

/// [`interleaved_batches`] for variants that time themselves: each returns
/// how long its measured part took, so it can set up untimed first (e.g.
/// receive its input, as the transport would hand it over).
// Indices: variant and batch both pick the cell of `best`.
#[allow(clippy::needless_range_loop)]
fn interleaved_batches_timed(
    batches: usize,
    mut fs: Vec<&mut dyn FnMut(usize) -> Duration>,
) -> Vec<Duration> {
    let n = fs.len();
    let mut best = vec![vec![Duration::MAX; batches]; n];
    for r in 0..rounds() {
        for b in 0..batches {
            for k in 0..n {
                let i = (r + b + k) % n;
                best[i][b] = best[i][b].min(fs[i](b));
            }
        }
    }
    best.iter().map(|v| v.iter().sum()).collect()
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn sample(image: &[u8], n: usize) -> Vec<u8> {
    let pages = image.len() / PAGE;
    let step = (pages / n).max(1);
    (0..pages)
        .step_by(step)
        .take(n)
        .flat_map(|p| image[p * PAGE..(p + 1) * PAGE].to_vec())
        .collect()
}

fn batches(image: &[u8], size: usize) -> Vec<Batch> {
    image
        .chunks(size * PAGE)
        .enumerate()
        .map(|(i, chunk)| {
            let mut b = Batch::with_capacity(size);
            for (j, p) in chunk.chunks(PAGE).enumerate() {
                b.push((i * size + j) as u64, p);
            }
            b
        })
        .collect()
}

fn per_page(inputs: &[(String, Vec<u8>)]) {
    println!(
        "\n### Per-page compression: per 128-page batch the fastest of {} interleaved rounds, summed (MB/s of page bytes)\n",
        rounds()
    );
    println!("| corpus | method | one-shot call | reused context | PageEncoder | encoder / one-shot | encoder / reused |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let mut dec_rows = Vec::new();
    for (name, image) in inputs {
        for m in [
            Compression::Lz4 { acceleration: 1 },
            Compression::Zstd { level: 1 },
            Compression::Zlib { level: 1 },
        ] {
            if let Ok(only) = std::env::var("METHOD") {
                if !format!("{m:?}").to_lowercase().starts_with(&only) {
                    continue;
                }
            }
            let mut ctx = Compressor::new(m).unwrap();
            let mut enc = PageEncoder::new(&EncoderConfig {
                compression: m,
                delta: None,
            })
            .unwrap();
            let mut w = PacketWriter::default();
            let bs = batches(image, 128);
            // Each variant reads its own copy of the pages: with a shared
            // copy, whichever ran second found the input warm in L3 from
            // the first (the encoder's batches are a copy of their own).
            let (chunks, chunks2) = (common::batch_shaped(image), common::batch_shaped(image));
            let (mut out, mut out2) = (vec![0u8; 130 * PAGE], vec![0u8; 130 * PAGE]);
            let t = interleaved_batches(
                bs.len(),
                vec![
                    &mut |b| {
                        black_box(common::compress_into_packets(
                            &chunks[b..b + 1],
                            &mut out,
                            |p, d| common::oneshot(m, p, d),
                        ));
                    },
                    &mut |b| {
                        black_box(common::compress_into_packets(
                            &chunks2[b..b + 1],
                            &mut out2,
                            |p, d| ctx.compress(p, d),
                        ));
                    },
                    &mut |b| {
                        black_box(enc.encode_batch(0, b as u64, &bs[b], &mut w));
                    },
                ],
            );
            let r = |d: Duration| mbps(image.len(), d);
            println!(
                "| {name} | {m:?} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} |",
                r(t[0]),
                r(t[1]),
                r(t[2]),
                t[0].as_secs_f64() / t[2].as_secs_f64(),
                t[1].as_secs_f64() / t[2].as_secs_f64()
            );

            // Decompression of the same pages.
            let compressed = common::compress_each_page(image, |p, d| common::oneshot(m, p, d));
            // What the reused contexts read: the codec's own formats (raw
            // deflate for zlib, where the one-shot call speaks zlib format).
            let mut cctx = Compressor::new(m).unwrap();
            let compressed_ctx = common::compress_each_page(image, |p, d| cctx.compress(p, d));
            let mut packets = Vec::new();
            for (s, b) in bs.iter().enumerate() {
                let len = enc.encode_batch(0, s as u64, b, &mut w);
                packets.push(w.buffer()[..len].to_vec());
            }
            let (mut dctx, mut dctx2) =
                (Decompressor::new().unwrap(), Decompressor::new().unwrap());
            let (mut pdec, mut pdec2) = (PageDecoder::new().unwrap(), PageDecoder::new().unwrap());
            let guest_pages = (image.len() / PAGE) as u64;
            let e = m.encoding();
            let limits = Limits {
                guest_pages,
                verify_checksum: true,
            };
            // Every variant writes its own destination, left cold by the
            // others between two visits, as guest memory is.
            let mut mems: Vec<Vec<u8>> = (0..6).map(|_| vec![0u8; image.len()]).collect();
            let [mem0, mem1, mem2, mem3, mem4, mem5] = &mut mems[..] else {
                unreachable!()
            };
            // "As received" inputs: the variant copies its batch in (the
            // transport's socket read), untimed, then decodes it from cache.
            let (mut inbox, mut inbox_ctx, mut inbox_pkt) =
                (compressed.clone(), compressed_ctx.clone(), packets.clone());
            // Batch `b`'s pages: compressed, source image and destination.
            let span = |b: usize| b * 128..((b + 1) * 128).min(compressed.len());
            let bytes = |b: usize| span(b).start * PAGE..span(b).end * PAGE;
            let timed = |f: &mut dyn FnMut()| {
                let t = Instant::now();
                f();
                t.elapsed()
            };
            let t = interleaved_batches_timed(
                packets.len(),
                vec![
                    &mut |b| {
                        let (src, dst) = (&compressed[span(b)], &mut mem0[bytes(b)]);
                        timed(&mut || oneshot_into_memory(m, src, &image[bytes(b)], dst))
                    },
                    &mut |b| {
                        let (src, dst) = (&compressed_ctx[span(b)], &mut mem1[bytes(b)]);
                        timed(&mut || {
                            common::decompress_into_memory(src, &image[bytes(b)], dst, |c, page| {
                                dctx.decompress(e, c, page).unwrap()
                            })
                        })
                    },
                    &mut |b| {
                        timed(&mut || {
                            // As `PacketDecoder::apply`, minus the round
                            // tracking (every round resends the batch).
                            let view = parse_packet(&packets[b], limits).unwrap();
                            pdec.apply_packet(&view, mem2).unwrap();
                        })
                    },
                    &mut |b| {
                        receive_pages(&mut inbox[span(b)], &compressed[span(b)]);
                        let (src, dst) = (&inbox[span(b)], &mut mem3[bytes(b)]);
                        timed(&mut || oneshot_into_memory(m, src, &image[bytes(b)], dst))
                    },
                    &mut |b| {
                        receive_pages(&mut inbox_ctx[span(b)], &compressed_ctx[span(b)]);
                        let (src, dst) = (&inbox_ctx[span(b)], &mut mem4[bytes(b)]);
                        timed(&mut || {
                            common::decompress_into_memory(src, &image[bytes(b)], dst, |c, page| {
                                dctx2.decompress(e, c, page).unwrap()
                            })
                        })
                    },
                    &mut |b| {
                        inbox_pkt[b].copy_from_slice(&packets[b]);
                        let packet = &inbox_pkt[b];
                        timed(&mut || {
                            let view = parse_packet(packet, limits).unwrap();
                            pdec2.apply_packet(&view, mem5).unwrap();
                        })
                    },
                ],
            );
            assert!(mems.iter().all(|mem| mem == image));
            for (regime, t) in [("cold", &t[..3]), ("as received", &t[3..])] {
                dec_rows.push(format!(
                    "| {name} | {m:?} | {regime} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} |",
                    r(t[0]),
                    r(t[1]),
                    r(t[2]),
                    t[0].as_secs_f64() / t[2].as_secs_f64(),
                    t[1].as_secs_f64() / t[2].as_secs_f64()
                ));
            }
        }
    }
    println!(
        "\n### Per-page decompression: per 128-page batch the fastest of {} interleaved rounds, summed (MB/s of page bytes)\n",
        rounds()
    );
    println!("Input \"cold\": each variant reads its own copy of the batch, last touched a round ago (L3 or DRAM). \"As received\": each variant first copies its batch in, untimed, as the transport's socket read leaves a packet, and decodes it from cache. Destinations are cold in both.\n");
    println!("| corpus | method | input | one-shot call | reused context | receiver path (CRC + checks + decode into memory) | receiver / one-shot | receiver / reused |");
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    for row in dec_rows {
        println!("{row}");
    }
}

/// The library's one-shot decompression of `compressed` pages into `mem`.
fn oneshot_into_memory(
    m: Compression,
    compressed: &[Option<Vec<u8>>],
    image: &[u8],
    mem: &mut [u8],
) {
    common::decompress_into_memory(compressed, image, mem, |c, page| match m {
        Compression::Lz4 { .. } => lz4::decompress(c, page).unwrap(),
        Compression::Zstd { .. } => zstd::bulk::decompress_to_buffer(c, page).unwrap(),
        _ => zlib::decompress_oneshot(c, page).unwrap(),
    })
}

/// Writes `arrived` into `inbox` (same shapes), as a socket read would.
fn receive_pages(inbox: &mut [Option<Vec<u8>>], arrived: &[Option<Vec<u8>>]) {
    for (to, from) in inbox.iter_mut().zip(arrived) {
        if let (Some(to), Some(from)) = (to, from) {
            to.copy_from_slice(from);
        }
    }
}

fn lz4_config(pages: u64, workers: usize) -> SenderConfig {
    let mut c = SenderConfig::new(pages);
    c.workers = workers;
    c.encoder = EncoderConfig {
        compression: Compression::Lz4 { acceleration: 1 },
        delta: None,
    };
    c
}

fn scaling(inputs: &[(String, Vec<u8>)]) {
    println!("\n### Pipeline scaling, LZ4, first pass: fastest of {} interleaved rounds (MB/s of page bytes)\n", rounds());
    println!("| pipeline | corpus | 1 worker | 2 workers | 2w / 1w |");
    println!("|---|---|---:|---:|---:|");
    for (name, image) in inputs {
        let pages = (image.len() / PAGE) as u64;
        let shared: Arc<Vec<u8>> = Arc::new(image.clone());
        let (mut p1, mut p2) = (
            Sender::new(lz4_config(pages, 1)).unwrap(),
            Sender::new(lz4_config(pages, 2)).unwrap(),
        );
        let mut s1 = Sender::with_source(lz4_config(pages, 1), shared.clone()).unwrap();
        let mut s2 = Sender::with_source(lz4_config(pages, 2), shared.clone()).unwrap();
        let lz4 = Compression::Lz4 { acceleration: 1 };
        let t = interleaved(vec![
            &mut || common::send_all(&mut p1, image, false),
            &mut || common::send_all(&mut p2, image, false),
            &mut || common::send_all(&mut s1, image, true),
            &mut || common::send_all(&mut s2, image, true),
            &mut || raw_threads(image, 1, |p, d| common::oneshot(lz4, p, d)),
            &mut || raw_threads(image, 2, |p, d| common::oneshot(lz4, p, d)),
        ]);
        let r = |d: Duration| mbps(image.len(), d);
        println!(
            "| machine baseline: raw LZ4 compress calls on 1 and 2 threads | {name} | {:.0} | {:.0} | {:.2} |",
            r(t[4]),
            r(t[5]),
            t[4].as_secs_f64() / t[5].as_secs_f64()
        );
        println!(
            "| sender, push | {name} | {:.0} | {:.0} | {:.2} |",
            r(t[0]),
            r(t[1]),
            t[0].as_secs_f64() / t[1].as_secs_f64()
        );
        println!(
            "| sender, page source | {name} | {:.0} | {:.0} | {:.2} |",
            r(t[2]),
            r(t[3]),
            t[2].as_secs_f64() / t[3].as_secs_f64()
        );

        // Receiver: packets as a sender with the same worker count makes
        // them.
        let packets = [first_pass_packets(image, 1), first_pass_packets(image, 2)];
        let compressed = common::compress_each_page(image, |p, d| common::oneshot(lz4, p, d));
        let (mut mem1, mut mem2) = (vec![1u8; image.len()], vec![1u8; image.len()]);
        let t = interleaved(vec![
            &mut || raw_decompress_threads(&compressed, &mut mem1, 1),
            &mut || raw_decompress_threads(&compressed, &mut mem2, 2),
        ]);
        println!(
            "| machine baseline: raw LZ4 decompress calls on 1 and 2 threads | {name} | {:.0} | {:.0} | {:.2} |",
            r(t[0]),
            r(t[1]),
            t[0].as_secs_f64() / t[1].as_secs_f64()
        );
        // Each worker count runs in its own receive scope, so the two
        // alternate scope by scope. Two destinations: a fresh zeroed one,
        // as `vmstream recv` has in a migration's first pass (sparse file,
        // `zeroed_memory`: zero records leave never-written pages alone),
        // and one that already holds the image, where every zero record
        // reads its page first (`is_zero` before writing).
        let mut best = [[Duration::MAX; 2]; 2];
        let mut mems = [vec![0u8; image.len()], vec![0u8; image.len()]];
        for _ in 0..rounds() {
            for (d, mem) in mems.iter_mut().enumerate() {
                let fresh = d == 0;
                for (i, workers) in [1usize, 2].into_iter().enumerate() {
                    if fresh {
                        mem.fill(0);
                    }
                    best[d][i] =
                        best[d][i].min(fastest_receive(workers, mem, &packets[i], 3, fresh));
                }
            }
        }
        assert!(mems.iter().all(|mem| mem == image));
        for (d, label) in [
            "receiver, fresh destination (zero pages stay holes)",
            "receiver, destination holding the image (zero pages read)",
        ]
        .into_iter()
        .enumerate()
        {
            println!(
                "| {label} | {name} | {:.0} | {:.0} | {:.2} |",
                r(best[d][0]),
                r(best[d][1]),
                best[d][0].as_secs_f64() / best[d][1].as_secs_f64()
            );
        }
    }
}

/// The whole receive pipeline with one worker (dispatch, checksum, checks,
/// decode into memory, barrier) against a plain loop of raw
/// `LZ4_decompress_safe` calls over the same pages, interleaved: the
/// end-to-end form of the per-page decompression table.
fn receiver_overhead(inputs: &[(String, Vec<u8>)]) {
    println!(
        "\n### Receive pipeline, 1 worker, against a loop of raw LZ4 calls: fastest of {} interleaved rounds (MB/s of page bytes)\n",
        rounds()
    );
    println!("| corpus | raw LZ4_decompress_safe loop | receive(), 1 worker | pipeline / raw |");
    println!("|---|---:|---:|---:|");
    let lz4 = Compression::Lz4 { acceleration: 1 };
    for (name, image) in inputs {
        let compressed = common::compress_each_page(image, |p, d| common::oneshot(lz4, p, d));
        let packets = first_pass_packets(image, 1);
        let mut mem = vec![0u8; image.len()];
        let mut best = [Duration::MAX; 2];
        for r in 0..rounds() {
            for k in 0..2 {
                if (r + k) % 2 == 1 {
                    best[1] = best[1].min(fastest_receive(1, &mut mem, &packets, 2, false));
                    continue;
                }
                let t = Instant::now();
                common::decompress_into_memory(&compressed, image, &mut mem, |c, page| {
                    lz4::decompress(c, page).unwrap()
                });
                best[0] = best[0].min(t.elapsed());
            }
        }
        assert!(&mem == image);
        let r = |d: Duration| mbps(image.len(), d);
        println!(
            "| {name} | {:.0} | {:.0} | {:.3} |",
            r(best[0]),
            r(best[1]),
            best[0].as_secs_f64() / best[1].as_secs_f64()
        );
    }
}

/// The hardware's own scaling, for comparison with the pipeline's: `image`
/// compressed page by page with `compress`, split over `threads` scoped
/// threads (no queues, no packets).
fn raw_threads(
    image: &[u8],
    threads: usize,
    compress: impl Fn(&[u8], &mut [u8]) -> Option<usize> + Sync,
) {
    let per = image.len().div_ceil(threads * PAGE) * PAGE;
    std::thread::scope(|s| {
        for part in image.chunks(per) {
            let compress = &compress;
            s.spawn(move || {
                let mut dst = vec![0u8; PAGE - 1];
                for p in part.chunks(PAGE) {
                    black_box(compress(p, &mut dst));
                }
            });
        }
    });
}

/// Decompression counterpart of [`raw_threads`]: each thread decodes its
/// share of the pages into its part of `mem`.
fn raw_decompress_threads(compressed: &[Option<Vec<u8>>], mem: &mut [u8], threads: usize) {
    let per = compressed.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (part, out) in compressed.chunks(per).zip(mem.chunks_mut(per * PAGE)) {
            s.spawn(move || {
                for (c, page) in part.iter().zip(out.chunks_mut(PAGE)) {
                    if let Some(c) = c {
                        lz4::decompress(c, page).unwrap();
                    }
                }
            });
        }
    });
}

/// The packets a `workers`-worker sender makes of `image` in its first pass.
fn first_pass_packets(image: &[u8], workers: usize) -> Vec<Vec<u8>> {
    let mut s = Sender::new(lz4_config((image.len() / PAGE) as u64, workers)).unwrap();
    for (p, data) in image.chunks(PAGE).enumerate() {
        s.push(p as u64, data).unwrap();
    }
    s.end_round().unwrap();
    let mut packets = Vec::new();
    while let Some(pkt) = s.poll() {
        packets.push(pkt.into_vec());
    }
    packets
}

/// The fastest of `rounds` rounds of submitting `packets` (fresh copies, as
/// the transport hands them over) and waiting for the barrier, in one
/// receive scope of `workers` workers over `mem` (all zero when `zeroed`).
fn fastest_receive(
    workers: usize,
    mem: &mut [u8],
    packets: &[Vec<u8>],
    rounds: u64,
    zeroed: bool,
) -> Duration {
    let config = ReceiverConfig {
        workers,
        zeroed_memory: zeroed,
        ..Default::default()
    };
    let mut best = Duration::MAX;
    receive(&config, mem, |rx| {
        for round in 0..rounds {
            let mut v = packets.to_vec();
            for p in &mut v {
                set_round(p, round);
            }
            let t = Instant::now();
            for p in v {
                rx.submit(p).unwrap();
            }
            rx.end_round(round).unwrap();
            best = best.min(t.elapsed());
        }
    })
    .unwrap();
    best
}

fn set_round(p: &mut [u8], round: u64) {
    p[16..24].copy_from_slice(&round.to_le_bytes());
    let body = p.len() - TRAILER_LEN;
    let crc = crc32c::crc32c(&p[..body]);
    p[body..].copy_from_slice(&crc.to_le_bytes());
}

fn zero() {
    const GIB: usize = 1 << 30;
    let mut image = vec![1u8; GIB];
    image.fill(0);
    let pages = (GIB / PAGE) as u64;
    let mut enc = PageEncoder::new(&EncoderConfig::default()).unwrap();
    let mut w = PacketWriter::default();
    let bs: Vec<Batch> = (0..pages as usize / 128)
        .map(|i| {
            let mut b = Batch::with_capacity(128);
            for j in 0..128 {
                b.push_number((i * 128 + j) as u64);
            }
            b
        })
        .collect();
    let shared: Arc<Vec<u8>> = Arc::new(image);
    let mut config = SenderConfig::new(pages);
    config.workers = 2;
    let mut push = Sender::new(config).unwrap();
    let mut source = Sender::with_source(config, shared.clone()).unwrap();
    let t = interleaved(vec![
        &mut || {
            for (s, b) in bs.iter().enumerate() {
                black_box(enc.encode_batch_from(0, s as u64, b, Some(&*shared), &mut w));
            }
        },
        &mut || common::send_all(&mut push, &shared, false),
        &mut || common::send_all(&mut source, &shared, true),
    ]);
    println!(
        "\n### Zero-page path, all-zero 1 GiB image: fastest of {} interleaved rounds\n",
        rounds()
    );
    println!("| path | GB/s |");
    println!("|---|---:|");
    println!(
        "| PageEncoder, one thread, reading the image | {:.2} |",
        GIB as f64 / t[0].as_secs_f64() / 1e9
    );
    println!(
        "| Sender, 2 workers, `push` (caller checks and copies) | {:.2} |",
        GIB as f64 / t[1].as_secs_f64() / 1e9
    );
    println!(
        "| Sender, 2 workers, `push_page` (workers read the image) | {:.2} |",
        GIB as f64 / t[2].as_secs_f64() / 1e9
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let what = std::env::var("WHAT").unwrap_or_else(|_| "all".into());
    let mut inputs = vec![("synthetic".to_string(), common::synthetic(4096, 0).base)];
    for c in common::real_corpora() {
        inputs.push((c.name.clone(), sample(&c.base, 4096)));
    }
    if let Ok(only) = std::env::var("CORPUS") {
        inputs.retain(|(name, _)| name.starts_with(&only));
    }
    if what == "all" || what == "page" {
        per_page(&inputs);
    }
    if what == "all" || what == "scaling" {
        let big: Vec<(String, Vec<u8>)> = inputs
            .iter()
            .map(|(n, i)| (n.clone(), i.repeat(4)))
            .collect();
        scaling(&big);
    }
    if what == "all" || what == "receiver" {
        let big: Vec<(String, Vec<u8>)> = inputs
            .iter()
            .map(|(n, i)| (n.clone(), i.repeat(4)))
            .collect();
        receiver_overhead(&big);
    }
    if what == "all" || what == "zero" {
        zero();
    }
}
