//! [`RetryPolicy`]: bounded retries with exponential backoff and jitter, as a value. It
//! computes delays from a random number it is given, so callers choose (and tests seed)
//! the randomness, and nothing here sleeps.

use std::time::Duration;

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. At least 1.
    pub attempts_max: u32,
    /// The delay before the first retry.
    pub initial_delay: Duration,
    /// Each retry waits this many times longer than the one before.
    pub multiplier: f64,
    /// No delay is longer than this (before jitter).
    pub delay_max: Duration,
    /// Up to this fraction of the delay is added at random, so that clients that failed
    /// together do not retry together.
    pub jitter_ratio: f64,
}

impl RetryPolicy {
    /// Commands on a version conflict: 3 attempts from 100 ms, doubling, up to 50 % jitter.
    pub const COMMANDS: Self = Self {
        attempts_max: 3,
        initial_delay: Duration::from_millis(100),
        multiplier: 2.0,
        delay_max: Duration::from_secs(5),
        jitter_ratio: 0.5,
    };

    /// Whether attempt number `attempt` (1 for the first) may be made.
    pub fn allows(&self, attempt: u32) -> bool {
        attempt <= self.attempts_max.max(1)
    }

    /// The delay before retry number `retry` (1 for the first retry), given `random`
    /// in `[0, 1)`: `initial × multiplier^(retry-1)`, capped at `delay_max`, plus up to
    /// `jitter_ratio` of that.
    pub fn delay(&self, retry: u32, random: f64) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = self.initial_delay.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        let capped = base.min(self.delay_max.as_secs_f64());
        let jitter = capped * self.jitter_ratio.clamp(0.0, 1.0) * random.clamp(0.0, 1.0);
        Duration::try_from_secs_f64(capped + jitter).unwrap_or(self.delay_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_cap_and_jitter() {
        let policy = RetryPolicy {
            attempts_max: 5,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            delay_max: Duration::from_millis(300),
            jitter_ratio: 0.1,
        };
        assert_eq!(policy.delay(1, 0.0), Duration::from_millis(100));
        assert_eq!(policy.delay(2, 0.0), Duration::from_millis(200));
        assert_eq!(policy.delay(3, 0.0), Duration::from_millis(300), "capped");
        assert_eq!(policy.delay(30, 0.0), Duration::from_millis(300));
        let jittered = policy.delay(1, 0.999_999);
        assert!(jittered > Duration::from_millis(109) && jittered <= Duration::from_millis(110));
        assert!(policy.allows(5) && !policy.allows(6));
    }
}
