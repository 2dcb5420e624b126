//! Shared bench inputs: the real corpora in `shared/corpus` (read directly:
//! base.zst + round-NNN.zst, see the corpus README) and a synthetic corpus.
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;

use vmstream_codec::compress::{lz4, zlib};
use vmstream_codec::{Compression, Sender};

pub const PAGE: usize = 4096;

/// `shared/corpus/<name>`, or `None` (with a printed reason) when absent.
pub fn corpus_dir(name: &str) -> Option<PathBuf> {
    let shared = match std::env::var_os("VMSTREAM_SHARED") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    };
    let dir = shared.join("corpus").join(name);
    if dir.join("base.zst").is_file() {
        Some(dir)
    } else {
        eprintln!("skipping corpus {name}: {} not found", dir.display());
        None
    }
}

fn unzstd(path: &std::path::Path) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut d = zstd::stream::read::Decoder::new(file).unwrap();
    d.window_log_max(27).unwrap();
    let mut out = Vec::new();
    d.read_to_end(&mut out).unwrap();
    out
}

/// A corpus: the base image and each later round's (page, content) list.
pub struct Corpus {
    pub name: String,
    pub base: Vec<u8>,
    pub rounds: Vec<Vec<(u32, Vec<u8>)>>,
}

impl Corpus {
    pub fn open(name: &str) -> Option<Corpus> {
        let dir = corpus_dir(name)?;
        let base = unzstd(&dir.join("base.zst"));
        let mut rounds = Vec::new();
        for i in 1.. {
            let path = dir.join(format!("round-{i:03}.zst"));
            if !path.is_file() {
                break;
            }
            let raw = unzstd(&path);
            let k = u32::from_le_bytes(raw[..4].try_into().unwrap()) as usize;
            let data = &raw[4 + 4 * k..];
            assert_eq!(data.len(), k * PAGE, "{}", path.display());
            let round = (0..k)
                .map(|j| {
                    let p = u32::from_le_bytes(raw[4 + 4 * j..8 + 4 * j].try_into().unwrap());
                    (p, data[j * PAGE..(j + 1) * PAGE].to_vec())
                })
                .collect();
            rounds.push(round);
        }
        Some(Corpus {
            name: name.to_string(),
            base,
            rounds,
        })
    }

    pub fn pages(&self) -> usize {
        self.base.len() / PAGE
    }

    /// (old, new) pairs of consecutive rounds.
    pub fn pairs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut image = self.base.clone();
        let mut pairs = Vec::new();
        for round in &self.rounds {
            for (p, new) in round {
                let slot = &mut image[*p as usize * PAGE..(*p as usize + 1) * PAGE];
                pairs.push((slot.to_vec(), new.clone()));
                slot.copy_from_slice(new);
            }
        }
        pairs
    }
}

/// The real corpora that are present.
pub fn real_corpora() -> Vec<Corpus> {
    ["pg-pgbench", "linux-kvm-dbsim"]
        .iter()
        .filter_map(|n| Corpus::open(n))
        .collect()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A synthetic mixed image of `pages` pages: 30% zero pages, the rest a mix
/// of text-like, structured-binary and random pages, with rewrites of 1 to
/// 5% of the bytes per round.
pub fn synthetic(pages: usize, rounds: usize) -> Corpus {
    let mut rng = Rng(0x2545F4914F6CDD1D);
    let mut base = vec![0u8; pages * PAGE];
    let words: [&[u8]; 8] = [
        b"SELECT ",
        b"balance ",
        b"account ",
        b"0000 ",
        b"teller ",
        b"history ",
        b"UPDATE ",
        b"branch ",
    ];
    for (i, page) in base.chunks_mut(PAGE).enumerate() {
        match rng.next() % 10 {
            0..=2 => {} // zero
            3..=5 => {
                let mut at = 0;
                while at < PAGE {
                    let w = words[(rng.next() % 8) as usize];
                    let n = w.len().min(PAGE - at);
                    page[at..at + n].copy_from_slice(&w[..n]);
                    at += n;
                }
            }
            6..=8 => {
                // Records: small counters, pointers and padding.
                for (j, rec) in page.chunks_mut(32).enumerate() {
                    rec[..8].copy_from_slice(&((i * 128 + j) as u64).to_le_bytes());
                    rec[8..12].copy_from_slice(&((rng.next() % 1000) as u32).to_le_bytes());
                    rec[16] = (rng.next() % 4) as u8;
                }
            }
            _ => page.iter_mut().for_each(|b| *b = rng.next() as u8),
        }
    }
    let mut image = base.clone();
    let mut all_rounds = Vec::new();
    for _ in 0..rounds {
        let mut round = Vec::new();
        let mut p = (rng.next() % 16) as usize;
        while p < pages {
            let page = &mut image[p * PAGE..(p + 1) * PAGE];
            let edits = 1 + rng.next() % 40;
            for _ in 0..edits {
                let at = (rng.next() % PAGE as u64) as usize;
                let run = (1 + rng.next() % 8) as usize;
                for b in &mut page[at..(at + run).min(PAGE)] {
                    *b = rng.next() as u8;
                }
            }
            round.push((p as u32, page.to_vec()));
            p += 1 + (rng.next() % 20) as usize;
        }
        all_rounds.push(round);
    }
    Corpus {
        name: "synthetic".into(),
        base,
        rounds: all_rounds,
    }
}

/// The image cut into separately allocated 128-page buffers, shaped like
/// the sender's batches, so library baselines read memory laid out like
/// the encoder's input.
pub fn batch_shaped(image: &[u8]) -> Vec<Vec<u8>> {
    image.chunks(128 * PAGE).map(<[u8]>::to_vec).collect()
}

/// Compresses every page of `chunks` with `compress`, writing the outputs
/// one after another into `out` as a packet would hold them (a page that
/// does not shrink is copied raw): the library baseline with the encoder's
/// memory traffic.
pub fn compress_into_packets(
    chunks: &[Vec<u8>],
    out: &mut [u8],
    mut compress: impl FnMut(&[u8], &mut [u8]) -> Option<usize>,
) -> usize {
    let mut total = 0;
    for chunk in chunks {
        let mut off = 0;
        for p in chunk.chunks(PAGE) {
            match compress(p, &mut out[off..off + PAGE - 1]) {
                Some(n) => off += n,
                None => {
                    out[off..off + PAGE].copy_from_slice(p);
                    off += PAGE;
                }
            }
        }
        total += off;
    }
    total
}

/// Decompresses page `i` of `compressed` into page `i` of `mem` with
/// `decompress` (copying `image`'s page when it was stored raw): the library
/// baseline with the receiver's memory traffic.
pub fn decompress_into_memory(
    compressed: &[Option<Vec<u8>>],
    image: &[u8],
    mem: &mut [u8],
    mut decompress: impl FnMut(&[u8], &mut [u8]) -> usize,
) {
    for (i, (c, src)) in compressed.iter().zip(image.chunks(PAGE)).enumerate() {
        let page = &mut mem[i * PAGE..(i + 1) * PAGE];
        match c {
            None => page.copy_from_slice(src),
            Some(c) => assert_eq!(decompress(c, page), PAGE),
        }
    }
}

/// The library's one-shot compression call, the baseline the codec's
/// reused contexts are measured against.
pub fn oneshot(m: Compression, src: &[u8], dst: &mut [u8]) -> Option<usize> {
    match m {
        Compression::Lz4 { .. } => lz4::compress_oneshot(src, dst, 1),
        Compression::Zstd { level } => zstd::bulk::compress_to_buffer(src, dst, level).ok(),
        Compression::Zlib { level } => zlib::compress_oneshot(src, dst, level),
        Compression::None => None,
    }
}

/// Compresses every page of `image` with `compress(page, scratch)` (which
/// returns the compressed length, or `None` when the page does not shrink
/// below a page).
pub fn compress_each_page(
    image: &[u8],
    mut compress: impl FnMut(&[u8], &mut [u8]) -> Option<usize>,
) -> Vec<Option<Vec<u8>>> {
    let mut dst = vec![0u8; PAGE - 1];
    image
        .chunks(PAGE)
        .map(|p| compress(p, &mut dst).map(|n| dst[..n].to_vec()))
        .collect()
}

/// One round over the whole image; packets are dropped (recycled).
pub fn send_all(sender: &mut Sender, image: &[u8], by_number: bool) {
    for (p, data) in image.chunks(PAGE).enumerate() {
        if by_number {
            sender.push_page(p as u64).unwrap();
        } else {
            sender.push(p as u64, data).unwrap();
        }
        while let Some(pkt) = sender.poll() {
            sender.recycle(pkt);
        }
    }
    sender.end_round().unwrap();
    while let Some(pkt) = sender.poll() {
        sender.recycle(pkt);
    }
}
