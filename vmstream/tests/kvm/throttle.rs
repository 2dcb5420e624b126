//! Throttling: with p > 0 every vCPU sleeps in each 10 ms period and still
//! makes progress; with p = 0 the sleeps stop.

use std::time::{Duration, Instant};

use vmstream::guest::kvm::{kvm_available, GuestRam, KvmGuest, KvmGuestConfig};

#[test]
fn throttled_vcpus_sleep_and_still_progress() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: {why}");
        return;
    }
    let mut guest = KvmGuest::start(
        GuestRam::memfd(16 << 20).unwrap(),
        &KvmGuestConfig::default(),
    )
    .unwrap();
    guest.set_throttle(0.5).unwrap();
    assert_eq!(guest.throttle(), 0.5);
    let deadline = Instant::now() + Duration::from_secs(10);
    while guest.throttle_sleeps().iter().any(|&s| s < 5) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        guest.throttle_sleeps().iter().all(|&s| s >= 5),
        "{:?}",
        guest.throttle_sleeps()
    );
    let t0 = guest.transactions().unwrap();
    while guest
        .transactions()
        .unwrap()
        .iter()
        .zip(&t0)
        .any(|(a, b)| a <= b)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(guest
        .transactions()
        .unwrap()
        .iter()
        .zip(&t0)
        .all(|(a, b)| a > b));

    guest.set_throttle(0.0).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let s0 = guest.throttle_sleeps();
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(guest.throttle_sleeps(), s0, "sleeps continued at p = 0");
    // Out-of-range values are clamped, NaN means off.
    guest.set_throttle(7.0).unwrap();
    assert_eq!(guest.throttle(), 0.99);
    guest.set_throttle(f64::NAN).unwrap();
    assert_eq!(guest.throttle(), 0.0);
    // Pausing works while throttled.
    guest.set_throttle(0.9).unwrap();
    guest.pause().unwrap();
    guest.resume().unwrap();
    assert!(guest.failures().is_empty(), "{:?}", guest.failures());
}
