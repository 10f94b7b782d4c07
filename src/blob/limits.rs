//! Rates a mount holds itself to, across all its traffic to the service:
//! `--max-download-rate`, `--max-upload-rate` (bytes per second) and
//! `--max-requests-per-second`.
//!
//! Each is a token bucket that may go into debt: a taker subtracts what it takes and, when
//! the balance is negative, waits until the refill would have covered it. A large request
//! (an 8 MiB range, a 4 MiB block) is therefore never refused for being larger than the
//! bucket, and the rate over any window longer than the burst stays at the limit: each
//! taker waits for the debt of those before it too. The burst is a fifth of a second's
//! worth. Requests and uploaded bytes are taken before a request is sent (every attempt,
//! retries included); downloaded bytes as the answer's frames are read, which slows the
//! reading and so the sender (TCP's flow control).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limits of a mount; None: unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RateLimits {
    pub download_bytes_per_s: Option<u64>,
    pub upload_bytes_per_s: Option<u64>,
    pub requests_per_s: Option<f64>,
}

struct Bucket {
    rate: f64,
    burst: f64,
    /// (tokens, when they were counted).
    st: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: f64) -> Bucket {
        let burst = (rate / 5.0).max(1.0);
        Bucket {
            rate,
            burst,
            st: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes `n`; how long the taker must wait before going on.
    fn take_at(&self, n: f64, now: Instant) -> Duration {
        let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        let refill = now.saturating_duration_since(st.1).as_secs_f64() * self.rate;
        st.0 = (st.0 + refill).min(self.burst) - n;
        st.1 = now;
        if st.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-st.0 / self.rate)
        }
    }

    async fn take(&self, n: f64) {
        let wait = self.take_at(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// The buckets of one store.
#[derive(Default)]
pub struct Limits {
    download: Option<Bucket>,
    upload: Option<Bucket>,
    requests: Option<Bucket>,
}

impl Limits {
    pub fn new(l: RateLimits) -> Limits {
        Limits {
            download: l.download_bytes_per_s.map(|r| Bucket::new(r as f64)),
            upload: l.upload_bytes_per_s.map(|r| Bucket::new(r as f64)),
            requests: l.requests_per_s.map(Bucket::new),
        }
    }

    /// Before sending a request carrying `upload` bytes.
    pub async fn send(&self, upload: u64) {
        if let Some(b) = &self.requests {
            b.take(1.0).await;
        }
        if let (Some(b), true) = (&self.upload, upload > 0) {
            b.take(upload as f64).await;
        }
    }

    /// After reading `n` bytes of an answer.
    pub async fn received(&self, n: u64) {
        if let Some(b) = &self.download {
            b.take(n as f64).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takers_in_debt_wait_so_the_rate_holds_over_any_window_past_the_burst() {
        let b = Bucket::new(100.0);
        let t0 = Instant::now();
        // The burst (20) goes at once; then each taker waits for everyone's debt.
        assert_eq!(b.take_at(20.0, t0), Duration::ZERO);
        let w = b.take_at(50.0, t0);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-9, "{w:?}");
        let w = b.take_at(50.0, t0);
        assert!((w.as_secs_f64() - 1.0).abs() < 1e-9, "{w:?}");
        // A second later, half of that debt is paid.
        let w = b.take_at(0.0, t0 + Duration::from_secs(1));
        assert!(w.as_secs_f64().abs() < 1e-9, "{w:?}");
        // Idle time refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.take_at(20.0, later), Duration::ZERO);
        assert!(b.take_at(1.0, later) > Duration::ZERO);
    }
}
