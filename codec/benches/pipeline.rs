//! Pipeline benches (run late, on a quiet machine:
//! `cargo bench -p vmstream-codec --bench pipeline`); results in
//! `codec/BENCH_RESULTS.md`.
//!
//! - `sender/<corpus>/{1,2}w_{push,source}`, `receiver/<corpus>/{1,2}w`:
//!   scaling from one to two workers (`push`: the caller copies pages into
//!   batches; `source`: workers copy them from a shared image), LZ4, no
//!   deltas (a first pass).
//! - `zero/{encoder_1t,sender_2w_push,sender_2w_source}`: the zero-page
//!   path over an all-zero 1 GiB image.

#[path = "common/mod.rs"]
mod common;

use std::hint::black_box;
use std::sync::Arc;

use common::{Corpus, PAGE};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use vmstream_codec::format::{PacketWriter, TRAILER_LEN};
use vmstream_codec::{
    receive, Compression, EncoderConfig, Encoding, PageEncoder, ReceiverConfig, Sender,
    SenderConfig,
};

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

/// Rewrites a packet's round and re-seals its CRC.
fn set_round(p: &mut [u8], round: u64) {
    p[16..24].copy_from_slice(&round.to_le_bytes());
    let body = p.len() - TRAILER_LEN;
    let crc = crc32c::crc32c(&p[..body]);
    p[body..].copy_from_slice(&crc.to_le_bytes());
}

fn bench_pipelines(c: &mut Criterion) {
    // Real data when present: lz4 pipelines over 16 Ki pages (64 MiB).
    let corpora: Vec<Corpus> = common::real_corpora();
    let mut inputs: Vec<(String, Vec<u8>)> = corpora
        .iter()
        .map(|c| (c.name.clone(), sample(&c.base, 4 * SAMPLE_PAGES)))
        .collect();
    inputs.push((
        "synthetic".into(),
        common::synthetic(4 * SAMPLE_PAGES, 0).base,
    ));
    for (name, image) in &inputs {
        let pages = (image.len() / PAGE) as u64;
        let mut g = c.benchmark_group(format!("sender/{name}"));
        g.sample_size(10)
            .throughput(Throughput::Bytes(image.len() as u64));
        let shared: Arc<Vec<u8>> = Arc::new(image.clone());
        for workers in [1, 2] {
            let mut config = SenderConfig::new(pages);
            config.workers = workers;
            config.encoder = EncoderConfig {
                compression: Compression::Lz4 { acceleration: 1 },
                delta: None,
            };
            // The caller copies each page into a batch (`push`).
            let mut sender = Sender::new(config).unwrap();
            g.bench_function(format!("{workers}w_push"), |b| {
                b.iter(|| common::send_all(&mut sender, image, false))
            });
            drop(sender);
            // The workers copy from the shared image (`push_page`).
            let mut sender = Sender::with_source(config, shared.clone()).unwrap();
            g.bench_function(format!("{workers}w_source"), |b| {
                b.iter(|| common::send_all(&mut sender, image, true))
            });
        }
        g.finish();

        let mut g = c.benchmark_group(format!("receiver/{name}"));
        g.sample_size(10)
            .throughput(Throughput::Bytes(image.len() as u64));
        for workers in [1, 2] {
            // Packets as a sender with the same worker count makes them.
            let mut config = SenderConfig::new(pages);
            config.workers = workers;
            config.encoder = EncoderConfig {
                compression: Compression::Lz4 { acceleration: 1 },
                delta: None,
            };
            let mut sender = Sender::new(config).unwrap();
            for (p, data) in image.chunks(PAGE).enumerate() {
                sender.push(p as u64, data).unwrap();
            }
            sender.end_round().unwrap();
            let mut packets = Vec::new();
            while let Some(pkt) = sender.poll() {
                packets.push(pkt.into_vec());
            }
            let mut mem = vec![0u8; image.len()];
            let rconfig = ReceiverConfig {
                workers,
                ..Default::default()
            };
            let round = std::cell::Cell::new(0u64);
            receive(&rconfig, &mut mem, |rx| {
                g.bench_function(format!("{workers}w"), |b| {
                    b.iter_batched(
                        || {
                            let mut v = packets.clone();
                            v.iter_mut().for_each(|p| set_round(p, round.get()));
                            v
                        },
                        |v| {
                            for p in v {
                                rx.submit(p).unwrap();
                            }
                            rx.end_round(round.get()).unwrap();
                            round.set(round.get() + 1);
                        },
                        BatchSize::PerIteration,
                    )
                });
            })
            .unwrap();
            // Only meaningful when the bench ran (it may be filtered out).
            assert!(round.get() == 0 || &mem == image);
        }
        g.finish();
    }
}

fn bench_zero(c: &mut Criterion) {
    const GIB: usize = 1 << 30;
    let mut image = vec![1u8; GIB];
    image.fill(0); // really backed by memory, not the shared zero page
    let pages = (GIB / PAGE) as u64;
    let mut g = c.benchmark_group("zero");
    g.sample_size(10).throughput(Throughput::Bytes(GIB as u64));
    // One thread: classify and packetize straight from the image.
    let mut enc = PageEncoder::new(&EncoderConfig::default()).unwrap();
    let mut w = PacketWriter::default();
    g.bench_function("encoder_1t", |b| {
        b.iter(|| {
            for (seq, chunk) in image.chunks(128 * PAGE).enumerate() {
                let seq = seq as u64;
                w.begin(128);
                for (j, p) in chunk.chunks(PAGE).enumerate() {
                    assert_eq!(
                        enc.encode_page(seq * 128 + j as u64, p, &mut w),
                        Some(Encoding::Zero)
                    );
                }
                black_box(w.finish(0, seq));
            }
        })
    });
    // The sender pipeline, 2 workers: the caller copies pages into batches
    // (`push`), or the workers copy from the shared image (`push_page`).
    let mut config = SenderConfig::new(pages);
    config.workers = 2;
    let mut sender = Sender::new(config).unwrap();
    g.bench_function("sender_2w_push", |b| {
        b.iter(|| common::send_all(&mut sender, &image, false))
    });
    drop(sender);
    let shared: Arc<Vec<u8>> = Arc::new(image);
    let mut sender = Sender::with_source(config, shared.clone()).unwrap();
    g.bench_function("sender_2w_source", |b| {
        b.iter(|| common::send_all(&mut sender, &shared, true))
    });
    g.finish();
}

criterion_group!(benches, bench_pipelines, bench_zero);
criterion_main!(benches);
