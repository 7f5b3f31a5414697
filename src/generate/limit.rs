//! One retry policy and one adaptive concurrency limiter for every HTTP backend.
//!
//! The limiter is AIMD (additive increase, multiplicative decrease), as TCP and the peers that
//! handle rate limits well do: every success lets one more request through, up to the
//! configured ceiling; a 429 halves the limit and pauses every request until the endpoint's
//! `Retry-After` has passed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Retries with full-jitter exponential backoff.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub max_retries: u32,
    pub base: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_retries: 6, base: Duration::from_millis(500), max_delay: Duration::from_secs(30) }
    }
}

impl RetryPolicy {
    /// The wait before retry `attempt` (0-based): uniform in [0, min(max, base·2^attempt)].
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let cap = self.base.saturating_mul(1u32 << attempt.min(20)).min(self.max_delay);
        cap.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: usize,
    paused_until: Option<Instant>,
}

/// An adaptive bound on concurrent requests to one endpoint.
#[derive(Debug)]
pub struct AdaptiveLimiter {
    max: usize,
    state: Mutex<State>,
    notify: Notify,
}

/// Holds a slot; dropping it frees the slot.
pub struct Permit<'a> {
    limiter: &'a AdaptiveLimiter,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.limiter.state.lock().expect("limiter lock").in_flight -= 1;
        self.limiter.notify.notify_waiters();
    }
}

impl AdaptiveLimiter {
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        AdaptiveLimiter {
            max,
            state: Mutex::new(State { limit: max as f64, in_flight: 0, paused_until: None }),
            notify: Notify::new(),
        }
    }

    /// Waits for a slot (and for any pause to end).
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            let notified = self.notify.notified();
            let wait = {
                let mut s = self.state.lock().expect("limiter lock");
                match s.paused_until {
                    Some(t) if t > Instant::now() => Some(t - Instant::now()),
                    _ => {
                        s.paused_until = None;
                        if (s.in_flight as f64) < s.limit.floor().max(1.0) {
                            s.in_flight += 1;
                            return Permit { limiter: self };
                        }
                        None
                    }
                }
            };
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => notified.await,
            }
        }
    }

    /// A request succeeded: grow the limit by one per window of successes.
    pub fn on_success(&self) {
        let mut s = self.state.lock().expect("limiter lock");
        s.limit = (s.limit + 1.0 / s.limit.max(1.0)).min(self.max as f64);
        drop(s);
        self.notify.notify_waiters();
    }

    /// The endpoint said 429: halve the limit and pause everyone for `retry_after`.
    pub fn on_rate_limited(&self, retry_after: Option<Duration>) {
        let mut s = self.state.lock().expect("limiter lock");
        s.limit = (s.limit / 2.0).max(1.0);
        if let Some(d) = retry_after {
            let until = Instant::now() + d;
            s.paused_until = Some(s.paused_until.map_or(until, |t| t.max(until)));
        }
    }

    /// The current limit (for progress output and tests).
    pub fn limit(&self) -> usize {
        self.state.lock().expect("limiter lock").limit.floor() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy { max_retries: 5, base: Duration::from_millis(100), max_delay: Duration::from_secs(1) };
        assert_eq!(p.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(p.delay(3, 1.0), Duration::from_millis(800));
        assert_eq!(p.delay(10, 1.0), Duration::from_secs(1));
        assert_eq!(p.delay(3, 0.5), Duration::from_millis(400));
        assert_eq!(p.delay(3, 0.0), Duration::ZERO);
    }

    #[test]
    fn rate_limits_halve_and_successes_regrow() {
        let l = AdaptiveLimiter::new(8);
        assert_eq!(l.limit(), 8);
        l.on_rate_limited(None);
        assert_eq!(l.limit(), 4);
        l.on_rate_limited(None);
        l.on_rate_limited(None);
        l.on_rate_limited(None);
        assert_eq!(l.limit(), 1, "never below one");
        for _ in 0..40 {
            l.on_success();
        }
        assert_eq!(l.limit(), 8, "back to the ceiling, not beyond");
    }

    #[test]
    fn concurrency_never_exceeds_the_limit_and_pauses_are_honoured() {
        crate::runtime::block_on(async {
            let l = std::sync::Arc::new(AdaptiveLimiter::new(3));
            let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let now = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for _ in 0..12 {
                let (l, peak, now) = (l.clone(), peak.clone(), now.clone());
                tasks.push(tokio::spawn(async move {
                    let _p = l.acquire().await;
                    let n = now.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    peak.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 3);

            l.on_rate_limited(Some(Duration::from_millis(150)));
            let start = Instant::now();
            drop(l.acquire().await);
            assert!(start.elapsed() >= Duration::from_millis(140), "waited out Retry-After");
        });
    }
}
