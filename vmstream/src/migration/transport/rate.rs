//! [`TokenBucket`]: limits a byte stream to a rate, to emulate a slower link
//! (`--max-bandwidth`); a [`SharedBucket`] limits several connections together.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket limiting a byte stream to `rate` bytes per second with bursts of up to
/// `burst` bytes. A write larger than the bucket goes into debt and the writer sleeps it off,
/// so the long-run rate is exact whatever the write sizes.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `rate` bytes/s; the burst is 10 ms worth (at least 16 KiB).
    pub fn new(rate: u64) -> Self {
        Self::at(rate, Instant::now())
    }

    /// Like [`TokenBucket::new`], with the clock at `now`.
    pub fn at(rate: u64, now: Instant) -> Self {
        let rate = rate.max(1) as f64;
        let burst = (rate / 100.0).max(16384.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` bytes' worth of tokens at instant `now`; returns how long the caller must
    /// wait before sending them.
    pub fn take_at(&mut self, n: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Takes `n` bytes' worth of tokens, sleeping as long as needed.
    pub fn take(&mut self, n: usize) {
        let wait = self.take_at(n, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// The rate in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// A bucket of `rate` bytes/s that several writers share.
    pub fn shared(rate: u64) -> SharedBucket {
        Arc::new(Mutex::new(TokenBucket::new(rate)))
    }
}

/// A [`TokenBucket`] shared by the writers of several connections: each takes its bytes
/// (going into debt together) and sleeps its own wait outside the lock, so the sum of
/// their rates is the bucket's rate.
pub type SharedBucket = Arc<Mutex<TokenBucket>>;

/// Takes `n` bytes from `bucket`, sleeping as long as needed.
pub(super) fn take_shared(bucket: &SharedBucket, n: usize) {
    let wait = bucket
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take_at(n, Instant::now());
    if !wait.is_zero() {
        std::thread::sleep(wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_charges_debt_exactly() {
        let t0 = Instant::now();
        let mut b = TokenBucket::at(1_000_000, t0);
        // The first 16 KiB burst is free.
        assert_eq!(b.take_at(16384, t0), Duration::ZERO);
        // 100 000 more bytes at 1 MB/s: 100 ms of debt.
        assert_eq!(b.take_at(100_000, t0), Duration::from_millis(100));
        // After sleeping it off the bucket is empty, not in credit.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.take_at(1000, t1), Duration::from_millis(1));
        // Idle time refills at most one burst.
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(
            b.take_at(16384, t2 + Duration::from_millis(1)),
            Duration::ZERO
        );
        assert_eq!(b.rate(), 1_000_000);
    }
}
