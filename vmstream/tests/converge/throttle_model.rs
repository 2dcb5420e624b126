//! How a real guest's transaction (= write) rate responds to the SIGSTOP/SIGCONT throttle,
//! the model behind the strategies (`D(p) ~ D(0) x (1 - p)`; see CONVERGENCE.md).
//!
//! A measurement, not a check of timing: run by hand with
//! `cargo test -p vmstream --release --test converge_throttle_model -- --ignored --nocapture`.

#[path = "../common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Guest, TmpFile};
use vmstream::guest::file::throttle::Throttle;
use vmstream::memory::{GuestMemory, MapMode};
use vmstream::telemetry::sampler::read_tx_count;

#[test]
#[ignore = "measurement; prints a table"]
fn tx_rate_under_throttle() {
    let mem = TmpFile::new("throttle-model");
    let g = Guest::spawn(&[
        "--memory-file",
        mem.str(),
        "--size",
        "64M",
        "--workload",
        "random",
        "--init",
    ]);
    let view = GuestMemory::open(&mem.0, MapMode::SharedReadOnly).unwrap();
    let t = Throttle::new(g.child.id()).unwrap();
    let window = Duration::from_millis(1500);
    let rate = |p: f64| {
        t.set(p);
        std::thread::sleep(Duration::from_millis(200));
        let (t0, c0) = (Instant::now(), read_tx_count(&view));
        std::thread::sleep(window);
        let c1 = read_tx_count(&view);
        c1.saturating_sub(c0) as f64 / t0.elapsed().as_secs_f64()
    };
    let base = rate(0.0);
    assert!(base > 0.0, "the guest made no progress");
    println!("throttle  tx/s        ratio to p=0   model 1-p");
    println!("0.00      {base:<11.0} 1.000          1.000");
    for p in [0.2, 0.5, 0.8, 0.9, 0.95, 0.99] {
        let r = rate(p);
        println!("{p:<9.2} {r:<11.0} {:<14.3} {:.3}", r / base, 1.0 - p);
    }
}
