//! The guest's disk write limiter: a token bucket whose rate is the bitmap header's write
//! limit, which the sender sets (disk write QoS); re-read before every wait, so a change
//! takes effect within one sleep slice.

use std::time::{Duration, Instant};

/// Longest single sleep: a loosened or lifted limit is seen this soon.
const SLEEP_SLICE: Duration = Duration::from_millis(20);

/// Burst the bucket holds: this long at the current rate.
const BURST: Duration = Duration::from_millis(100);

/// A token bucket in bytes.
#[derive(Debug)]
pub struct WriteLimiter {
    tokens: f64,
    last: Instant,
}

impl Default for WriteLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl WriteLimiter {
    /// An empty bucket.
    pub fn new() -> Self {
        Self {
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Waits until `bytes` may be written at the rate `limit()` returns (bytes/s, 0 =
    /// unlimited, asked again before every sleep slice); returns the time waited (zero
    /// when it did not sleep).
    pub fn acquire(&mut self, bytes: u64, limit: impl Fn() -> u64) -> Duration {
        let start = Instant::now();
        let mut slept = false;
        let waited = |slept: bool| {
            if slept {
                start.elapsed()
            } else {
                Duration::ZERO
            }
        };
        loop {
            let rate = limit();
            let now = Instant::now();
            if rate == 0 {
                self.tokens = 0.0;
                self.last = now;
                return waited(slept);
            }
            let cap = (rate as f64 * BURST.as_secs_f64()).max(bytes as f64);
            let refill = now.duration_since(self.last).as_secs_f64() * rate as f64;
            self.tokens = (self.tokens + refill).min(cap);
            self.last = now;
            if self.tokens >= bytes as f64 {
                self.tokens -= bytes as f64;
                return waited(slept);
            }
            let need = (bytes as f64 - self.tokens) / rate as f64;
            std::thread::sleep(Duration::from_secs_f64(need).min(SLEEP_SLICE));
            slept = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits_and_a_limit_makes_writes_wait() {
        let mut l = WriteLimiter::new();
        for _ in 0..100 {
            assert_eq!(l.acquire(1 << 20, || 0), Duration::ZERO);
        }
        // 400 KiB at 1 MiB/s: at least about 0.3 s of waiting once the burst is spent.
        let mut waited = Duration::ZERO;
        for _ in 0..100 {
            waited += l.acquire(4096, || 1 << 20);
        }
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
    }

    #[test]
    fn a_lifted_limit_ends_the_wait() {
        let mut l = WriteLimiter::new();
        let calls = std::cell::Cell::new(0u32);
        // 1 byte/s for a 1 MiB write would take days; lifted after a few slices.
        let waited = l.acquire(1 << 20, || {
            calls.set(calls.get() + 1);
            if calls.get() < 4 {
                1
            } else {
                0
            }
        });
        assert!(waited < Duration::from_secs(10));
        assert!(calls.get() >= 4);
    }
}
