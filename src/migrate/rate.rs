//! Token buckets for keys/s and bytes/s: the copy (and cleanup) spend them before
//! each page, so the source and target see a bounded load whatever their size.

use std::time::Duration;

use tokio::time::Instant;

/// One bucket: `rate` per second, holding at most one second's worth. A take larger
/// than what is there goes into debt and waits it off, so any size passes.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
}

impl Bucket {
    fn refill(&mut self, secs: f64) {
        self.tokens = (self.tokens + secs * self.rate).min(self.rate);
    }

    /// Takes `n`; how long to wait until the bucket is out of debt.
    fn take(&mut self, n: f64) -> Duration {
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Keys/s and bytes/s limits; a rate of 0 is no limit.
#[derive(Debug)]
pub struct RateLimit {
    keys: Option<Bucket>,
    bytes: Option<Bucket>,
    last: Instant,
}

impl RateLimit {
    pub fn new(keys_per_sec: u64, bytes_per_sec: u64) -> RateLimit {
        let bucket = |r: u64| (r > 0).then_some(Bucket { rate: r as f64, tokens: r as f64 });
        RateLimit { keys: bucket(keys_per_sec), bytes: bucket(bytes_per_sec), last: Instant::now() }
    }

    /// How long `keys` keys of `bytes` bytes must wait (and takes them).
    fn wait_for(&mut self, keys: u64, bytes: u64) -> Duration {
        let now = Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        let mut wait = Duration::ZERO;
        if let Some(b) = &mut self.keys {
            b.refill(secs);
            wait = wait.max(b.take(keys as f64));
        }
        if let Some(b) = &mut self.bytes {
            b.refill(secs);
            wait = wait.max(b.take(bytes as f64));
        }
        wait
    }

    pub async fn take(&mut self, keys: u64, bytes: u64) {
        let wait = self.wait_for(keys, bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_slower_limit_sets_the_pace() {
        let mut r = RateLimit::new(100, 1_000_000);
        let start = Instant::now();
        // One second's burst is free; the next 300 keys take 3 s.
        for _ in 0..40 {
            r.take(10, 10).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        assert!((2.9..3.2).contains(&elapsed), "{elapsed}");

        let mut r = RateLimit::new(0, 1000);
        let start = Instant::now();
        r.take(1, 5000).await; // 1000 free, 4000 of debt
        assert!((3.9..4.1).contains(&start.elapsed().as_secs_f64()));

        let mut free = RateLimit::new(0, 0);
        let start = Instant::now();
        free.take(1_000_000, 1 << 40).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
