//! Runs the page kernels over the real memory corpora, the way a migration
//! would: zero-page detection over the base image, then XBZRLE (canonical
//! and compact) over every later round's changed pages against the page as
//! previously sent. Prints what each would put on the wire and how fast.
//!
//! `cargo run --release -p vmstream-benches --example kernel_demo`

use std::time::Instant;

use vmstream_benches::Corpus;
use vmstream_xbzrle::{decode, encode, encode_compact};

fn main() -> std::io::Result<()> {
    println!("SIMD backend: {}", vmstream_simd::Backend::active());
    let mut any = false;
    for name in ["pg-pgbench", "linux-kvm-dbsim"] {
        let Some(corpus) = Corpus::open_named(name) else {
            continue;
        };
        any = true;
        run(&corpus)?;
    }
    if !any {
        println!(
            "no corpus found (set VMSTREAM_SHARED to the folder holding corpus/): nothing to show"
        );
    }
    Ok(())
}

fn run(corpus: &Corpus) -> std::io::Result<()> {
    let ps = corpus.page_size;
    let mut image = corpus.base()?;
    let t = Instant::now();
    let zero = image
        .chunks_exact(ps)
        .filter(|p| vmstream_simd::is_zero(p))
        .count();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "\n{}: {} pages, {:.1} MiB; zero pages {} ({:.1}%), scanned at {:.1} GB/s",
        corpus.name,
        corpus.pages,
        mib(image.len()),
        zero,
        100.0 * zero as f64 / corpus.pages as f64,
        image.len() as f64 / secs / 1e9
    );
    println!("| round | changed pages | raw MiB | XBZRLE MiB (overflows sent raw) | overflows | compact MiB | compact saving | encode MB/s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut out = vec![0u8; ps];
    let (mut all_canon, mut all_compact) = (0usize, 0usize);
    for index in 1..=corpus.round_count() {
        let round = corpus.round(index)?;
        let (mut canon, mut compact, mut overflows) = (0usize, 0usize, 0usize);
        let mut enc_time = 0.0;
        for (page, new) in round.iter() {
            let slot = &mut image[page as usize * ps..(page as usize + 1) * ps];
            let t = Instant::now();
            let res = encode(slot, new, &mut out);
            enc_time += t.elapsed().as_secs_f64();
            match res {
                Ok(n) => {
                    // Check the delta rebuilds the page, as the receiver would.
                    let mut check = slot.to_vec();
                    decode(&out[..n], &mut check).expect("own delta decodes");
                    assert!(check == new, "round trip failed on page {page}");
                    canon += n;
                }
                Err(_) => {
                    canon += ps;
                    overflows += 1;
                }
            }
            compact += encode_compact(slot, new, &mut out).unwrap_or(ps);
            slot.copy_from_slice(new);
        }
        all_canon += canon;
        all_compact += compact;
        let raw = round.pages.len() * ps;
        println!(
            "| {index} | {} | {:.2} | {:.3} | {overflows} | {:.3} | {:.1}% | {:.0} |",
            round.pages.len(),
            mib(raw),
            mib(canon),
            mib(compact),
            100.0 * (canon - compact) as f64 / canon as f64,
            raw as f64 / enc_time / 1e6
        );
    }
    println!(
        "all rounds: XBZRLE {:.3} MiB, compact {:.3} MiB: compact mode saves {:.1}%",
        mib(all_canon),
        mib(all_compact),
        100.0 * (all_canon - all_compact) as f64 / all_canon as f64
    );
    Ok(())
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}
