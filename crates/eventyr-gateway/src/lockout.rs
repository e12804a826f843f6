//! Failure limits: after `limit` failures of a key (an account's logins, an address's
//! refused credentials) within a fixed window, the key is refused until the window
//! ends — whatever it presents then. Only failures count, and a success resets
//! nothing (an attacker who also holds an account cannot clear a victim's count).
//!
//! Counted in this process (bounded: the idlest keys go first when full) or, for
//! gateways that share their sessions, in Redis (`eventyr:lockout:{scope}:{key}`, one
//! `INCR` and an expiry per failure, on the server's clock).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::shared::SharedRedis;

/// Where the counts live.
enum Backend {
    Local(Mutex<HashMap<String, (Instant, u32)>>),
    Redis(SharedRedis),
}

/// Failures per key within a window.
pub struct FailureLimit {
    scope: &'static str,
    limit: u32,
    window: Duration,
    keys_max: usize,
    backend: Backend,
    /// When the last refusal that a local count began ends, in milliseconds since
    /// `epoch`: before it nobody is refused, and the counts need no look (the common
    /// case costs one atomic read).
    refusing_until_ms: std::sync::atomic::AtomicU64,
    epoch: Instant,
}

/// Keys a local limit keeps at most.
const KEYS_MAX: usize = 100_000;

impl FailureLimit {
    /// Counted in this process.
    pub fn local(scope: &'static str, limit: u32, window: Duration) -> Self {
        Self {
            scope,
            limit,
            window,
            keys_max: KEYS_MAX,
            backend: Backend::Local(Mutex::new(HashMap::new())),
            refusing_until_ms: std::sync::atomic::AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Whether any key may be refused now (always, for counts kept in Redis).
    pub fn may_refuse(&self) -> bool {
        match self.backend {
            Backend::Redis(_) => true,
            Backend::Local(_) => {
                let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.refusing_until_ms
                    .load(std::sync::atomic::Ordering::Acquire)
                    > now
            }
        }
    }

    /// Counted in Redis, shared by every gateway that uses it.
    pub fn shared(scope: &'static str, limit: u32, window: Duration, redis: SharedRedis) -> Self {
        Self {
            backend: Backend::Redis(redis),
            ..Self::local(scope, limit, window)
        }
    }

    /// 429 `rate_limited` for a key refused for `left` more, with `Retry-After` and
    /// the RateLimit headers of this limit.
    pub fn refusal(&self, left: Duration, message: String) -> http::Response<crate::proxy::Body> {
        let decision = crate::ratelimit::Decision {
            allowed: false,
            limit: u64::from(self.limit),
            remaining: 0,
            reset: left,
        };
        let name = format!("{}-failures", self.scope);
        crate::stack::too_many(&name, decision, self.window.as_secs().max(1), message)
    }

    /// How long `key` is still refused, if it is. Without Redis a shared limit lets
    /// the attempt through (the password check still stands).
    pub async fn blocked(&self, key: &str) -> Option<Duration> {
        match &self.backend {
            Backend::Local(counts) => {
                let counts = counts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let (start, failures) = counts.get(key)?;
                let ends = *start + self.window;
                (*failures >= self.limit && ends > Instant::now())
                    .then(|| ends.saturating_duration_since(Instant::now()))
            }
            Backend::Redis(redis) => {
                let mut connection = redis.connection().ok()?;
                let (failures, ttl_ms): (Option<u32>, i64) = redis::pipe()
                    .get(self.redis_key(key))
                    .pttl(self.redis_key(key))
                    .query_async(&mut connection)
                    .await
                    .ok()?;
                (failures? >= self.limit && ttl_ms > 0)
                    .then(|| Duration::from_millis(ttl_ms.unsigned_abs()))
            }
        }
    }

    /// Counts a failure of `key`; whether it reached the limit with it.
    pub async fn fail(&self, key: &str) -> bool {
        let failures = match &self.backend {
            Backend::Local(counts) => {
                let now = Instant::now();
                let mut counts = counts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if counts.len() >= self.keys_max && !counts.contains_key(key) {
                    let window = self.window;
                    counts.retain(|_, (start, _)| *start + window > now);
                    if counts.len() >= self.keys_max {
                        // Still full of live keys: the oldest half goes.
                        let mut starts: Vec<Instant> = counts.values().map(|(s, _)| *s).collect();
                        starts.sort_unstable();
                        let cut = starts[starts.len() / 2];
                        counts.retain(|_, (start, _)| *start > cut);
                    }
                }
                let entry = counts.entry(key.to_owned()).or_insert((now, 0));
                if entry.0 + self.window <= now {
                    *entry = (now, 0);
                }
                entry.1 = entry.1.saturating_add(1);
                if entry.1 >= self.limit {
                    let ends = (entry.0 + self.window).saturating_duration_since(self.epoch);
                    let ends = u64::try_from(ends.as_millis()).unwrap_or(u64::MAX);
                    self.refusing_until_ms
                        .fetch_max(ends, std::sync::atomic::Ordering::AcqRel);
                }
                entry.1
            }
            Backend::Redis(redis) => {
                let Ok(mut connection) = redis.connection() else {
                    return false;
                };
                let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
                let counted: Result<(u32, i64), _> = redis::pipe()
                    .atomic()
                    .incr(self.redis_key(key), 1)
                    .cmd("PEXPIRE")
                    .arg(self.redis_key(key))
                    .arg(window_ms)
                    .arg("NX")
                    .query_async(&mut connection)
                    .await;
                match counted {
                    Ok((failures, _)) => failures,
                    Err(_) => return false,
                }
            }
        };
        failures == self.limit
    }

    fn redis_key(&self, key: &str) -> String {
        format!("eventyr:lockout:{}:{key}", self.scope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_is_refused_after_its_failures_and_others_are_not() {
        let limit = FailureLimit::local("test", 3, Duration::from_secs(60));
        assert!(!limit.fail("alice").await);
        assert!(!limit.fail("alice").await);
        assert!(limit.blocked("alice").await.is_none());
        assert!(!limit.may_refuse(), "nobody is refused yet");
        assert!(limit.fail("alice").await, "the third reaches the limit");
        assert!(limit.may_refuse());
        let left = limit.blocked("alice").await.expect("refused");
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(58));
        assert!(limit.blocked("bob").await.is_none(), "another key goes on");
    }

    #[tokio::test]
    async fn the_window_ends_and_memory_stays_bounded() {
        let mut limit = FailureLimit::local("test", 1, Duration::from_millis(50));
        limit.keys_max = 10;
        limit.fail("k").await;
        assert!(limit.blocked("k").await.is_some());
        // Waiting for the window itself to pass.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(limit.blocked("k").await.is_none());
        for i in 0..100 {
            limit.fail(&format!("key-{i}")).await;
        }
        let Backend::Local(counts) = &limit.backend else {
            unreachable!("a local limit")
        };
        assert!(counts.lock().unwrap().len() <= 10);
    }
}
