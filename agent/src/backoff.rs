//! How long to wait before dialling a relay again.
//!
//! Delays grow exponentially from [`BACKOFF_MIN`] to [`BACKOFF_MAX`] with jitter over the upper
//! half of each step (so a relay restart is not met by every agent at the same instant, and the
//! delay never collapses to zero), and start over after a session that stayed up for
//! [`HEALTHY_AFTER`].

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// First reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// The delay before reconnect attempt `attempt` (0-based): exponential, capped, jittered.
pub fn delay(attempt: u32) -> Duration {
    let exp = BACKOFF_MIN.saturating_mul(2u32.saturating_pow(attempt.min(16)));
    let cap = exp.min(BACKOFF_MAX);
    let jitter: f64 = rand::rng().random_range(0.5..=1.0);
    cap.mul_f64(jitter)
}

/// The reconnect state of one session loop.
#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The delay after a session (or attempt) that started at `started` ended: back to the
    /// shortest delay if it was healthy for [`HEALTHY_AFTER`], else one step longer than last time.
    pub fn after(&mut self, started: Instant) -> Duration {
        if started.elapsed() >= HEALTHY_AFTER {
            self.attempt = 0;
        }
        let d = delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Starts over (a session came up and was handed on, e.g. a take-over or a drain).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_cap_and_jitter() {
        for attempt in 0..40 {
            let d = delay(attempt);
            let exp = BACKOFF_MIN
                .saturating_mul(2u32.saturating_pow(attempt.min(16)))
                .min(BACKOFF_MAX);
            assert!(d >= exp / 2 && d <= exp, "attempt {attempt}: {d:?}");
        }
        assert!(delay(0) <= BACKOFF_MIN);
        assert!(delay(30) >= BACKOFF_MAX / 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_grow_the_delay_and_a_healthy_session_resets_it() {
        let mut b = Backoff::default();
        // Attempts that fail at once: 0.25-0.5 s, 0.5-1 s, 1-2 s, ...
        let mut last = Duration::ZERO;
        for step in 0..6 {
            let d = b.after(Instant::now());
            let ceiling = BACKOFF_MIN * 2u32.pow(step);
            assert!(d <= ceiling && d >= ceiling / 2, "step {step}: {d:?}");
            assert!(d >= last / 2, "never shrinks by more than the jitter");
            last = d;
        }
        assert!(last >= Duration::from_secs(8));
        // A session that stayed up for HEALTHY_AFTER: the next delay is the shortest again.
        let started = Instant::now();
        tokio::time::advance(HEALTHY_AFTER).await;
        assert!(b.after(started) <= BACKOFF_MIN);
        // One that ended sooner keeps growing.
        let started = Instant::now();
        tokio::time::advance(HEALTHY_AFTER - Duration::from_secs(1)).await;
        let d = b.after(started);
        assert!(d > BACKOFF_MIN / 2 && d <= BACKOFF_MIN * 2, "{d:?}");
        b.reset();
        assert!(b.after(Instant::now()) <= BACKOFF_MIN);
    }
}
