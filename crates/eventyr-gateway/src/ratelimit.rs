//! Rate limiting: rules matched to routes by pattern and priority, each with one of
//! the four algorithms of the sources and a key (global, tier, consumer, API key,
//! client IP); the first denial wins. This module holds the local backend (in
//! memory, sharded, idle keys evicted: memory stays bounded) and the shared one (a
//! rule with `shared = true` counts in Redis, one atomic Lua script per decision on
//! the Redis server's clock, so several gateways enforce one limit together; when
//! Redis cannot answer, the rule's `on_backend_error` lets the request through
//! (`allow`, the default: fail open) or refuses it with 503 (`deny`).
//!
//! - fixed window: at most `limit` per window aligned on multiples of `period` (one
//!   atomic word per key, as the sliding window);
//! - sliding window: the fixed-window counter of now, plus the previous window's
//!   weighted by how much of it still overlaps (Cloudflare's approximation);
//! - token bucket: `burst` tokens, refilled at `limit` per `period`;
//! - GCRA (a leaky bucket as a meter): the theoretical arrival time, moved by
//!   `period / limit` per request, at most `burst` requests early; one atomic per key.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::humantime_serde_lite;

/// One rule as configured (`[[rate_limits]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// Route names it applies to; `*` at the end matches a prefix (`orders*`), `*`
    /// alone every route. Default every route.
    #[serde(default = "every_route")]
    pub routes: Vec<String>,
    /// Higher first. Default 0.
    #[serde(default)]
    pub priority: i32,
    pub algorithm: AlgorithmKind,
    pub limit: u64,
    #[serde(with = "humantime_serde_lite")]
    pub period: Duration,
    /// Token bucket and GCRA: requests that may come at once. Default `limit`.
    pub burst: Option<u64>,
    pub key: KeyKind,
    /// Only callers of this tier (free, premium, enterprise, anonymous).
    pub tier: Option<String>,
    /// Counts without denying (to try a rule on live traffic).
    #[serde(default)]
    pub shadow: bool,
    /// Counted in the `[redis]` server, across every gateway that shares it.
    #[serde(default)]
    pub shared: bool,
    /// What a shared rule does when Redis cannot answer. Default allow.
    #[serde(default)]
    pub on_backend_error: OnBackendError,
}

/// The sources' default policy (`rate_limit_defaults = true`): the general API by
/// sliding window per caller — free 100/h, premium 1 000/h, enterprise 10 000/h —, per
/// client address 200/h, 50 000/min over everything; and the authentication endpoints
/// (`login_routes`: routes serving login or refresh, or named `auth…`) by fixed window,
/// 5 per 5 min per anonymous client address, checked first.
pub fn default_rules(login_routes: Vec<String>) -> Vec<RuleConfig> {
    let rule = |name: &str, algorithm, limit, period_s, key, tier: Option<&str>| RuleConfig {
        name: name.to_owned(),
        routes: every_route(),
        priority: 0,
        algorithm,
        limit,
        period: Duration::from_secs(period_s),
        burst: None,
        key,
        tier: tier.map(str::to_owned),
        shadow: false,
        shared: false,
        on_backend_error: OnBackendError::Allow,
    };
    use AlgorithmKind::{FixedWindow, SlidingWindow};
    let mut rules = vec![
        rule(
            "default-global",
            SlidingWindow,
            50_000,
            60,
            KeyKind::Global,
            None,
        ),
        rule(
            "default-free",
            SlidingWindow,
            100,
            3600,
            KeyKind::Consumer,
            Some("free"),
        ),
        rule(
            "default-premium",
            SlidingWindow,
            1_000,
            3600,
            KeyKind::Consumer,
            Some("premium"),
        ),
        rule(
            "default-enterprise",
            SlidingWindow,
            10_000,
            3600,
            KeyKind::Consumer,
            Some("enterprise"),
        ),
        rule(
            "default-ip",
            SlidingWindow,
            200,
            3600,
            KeyKind::ClientIp,
            None,
        ),
    ];
    // Global first, then the caller, then the address (the sources' order).
    for (priority, rule) in rules.iter_mut().rev().enumerate() {
        rule.priority = -100 + i32::try_from(priority).unwrap_or(0);
    }
    if !login_routes.is_empty() {
        let mut auth = rule(
            "default-auth",
            FixedWindow,
            5,
            300,
            KeyKind::ClientIp,
            Some("anonymous"),
        );
        auth.routes = login_routes;
        auth.priority = -90;
        rules.push(auth);
    }
    rules
}

/// What a shared rule does without its backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBackendError {
    /// Let the request through (fail open): an outage of Redis is no outage of the API.
    #[default]
    Allow,
    /// Refuse it, 503 `rate_limit_unavailable` (fail closed): for limits that protect
    /// something that must not be overrun.
    Deny,
}

fn every_route() -> Vec<String> {
    vec!["*".to_owned()]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmKind {
    FixedWindow,
    SlidingWindow,
    TokenBucket,
    Gcra,
}

/// What a rule counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    Global,
    Tier,
    /// The authenticated caller, else the client address.
    Consumer,
    /// Only requests with an API key.
    ApiKey,
    ClientIp,
}

/// A decision of one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// Until the limit is whole again (allowed) or a request may pass (denied).
    pub reset: Duration,
}

/// A window counter in one atomic word: the window's number (low 24 bits: windows are
/// compared modulo 2²⁴, so a key idle for 2²⁴ periods may be read as current — it is
/// evicted long before), its count and the previous window's (20 bits each: limits of a
/// windowed rule are at most 1 000 000, checked with the configuration).
struct Packed;

impl Packed {
    const WINDOW_MASK: u64 = (1 << 24) - 1;
    const COUNT_MASK: u64 = (1 << 20) - 1;

    fn pack(window: u64, count: u64, previous: u64) -> u64 {
        ((window & Self::WINDOW_MASK) << 40)
            | ((count & Self::COUNT_MASK) << 20)
            | (previous & Self::COUNT_MASK)
    }

    fn unpack(word: u64) -> (u64, u64, u64) {
        (
            word >> 40,
            (word >> 20) & Self::COUNT_MASK,
            word & Self::COUNT_MASK,
        )
    }
}

/// The largest `limit` of a fixed- or sliding-window rule (its counts are 20 bits).
pub const MAX_WINDOW_LIMIT: u64 = 1_000_000;

/// How many shards the counters are spread over.
const SHARDS: usize = 16;

/// Per-key state.
enum Cell {
    /// (window, count in it, count in the one before), packed: see [`Packed`].
    Window(AtomicU64),
    Bucket(Mutex<(f64, Instant)>),
    Gcra(AtomicU64),
}

struct Entry {
    cell: Cell,
    /// Last use, in ms since the limiter began (for eviction).
    touched: AtomicU64,
    /// What the key's last request left of the limit, and its requests denied (for
    /// monitoring: the hottest and the most limited keys).
    remaining: AtomicU64,
    denied: AtomicU64,
}

/// One key of a rule as monitoring sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyUsage {
    pub key: String,
    /// Of the limit, used as of the key's last request.
    pub used: u64,
    pub limit: u64,
    /// Requests denied while the key was held.
    pub denied: u64,
}

/// One rule with its counters.
pub struct Rule {
    pub config: RuleConfig,
    shards: Vec<RwLock<HashMap<String, Arc<Entry>>>>,
    hasher: std::collections::hash_map::RandomState,
    began: Instant,
    /// Keys kept per shard at most; beyond, idle keys go first.
    max_keys: usize,
    /// The algorithm's script, for a shared rule.
    script: Option<redis::Script>,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Rule {
    pub fn new(config: RuleConfig, max_keys: usize) -> Self {
        Self {
            script: config
                .shared
                .then(|| redis::Script::new(script(config.algorithm))),
            config,
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            began: Instant::now(),
            max_keys: (max_keys / SHARDS).max(16),
        }
    }

    /// Whether the rule applies to `route`.
    pub fn covers(&self, route: &str, tier: &str) -> bool {
        let route_matches = self.config.routes.iter().any(|pattern| {
            pattern == "*"
                || pattern == route
                || pattern
                    .strip_suffix('*')
                    .is_some_and(|prefix| route.starts_with(prefix))
        });
        route_matches && self.config.tier.as_deref().is_none_or(|t| t == tier)
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.began).as_millis()).unwrap_or(u64::MAX)
    }

    fn entry(&self, key: &str, now: Instant) -> Arc<Entry> {
        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS];
        let stamp = self.millis(now);
        if let Some(entry) = shard
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
        {
            entry.touched.store(stamp, Ordering::Relaxed);
            return Arc::clone(entry);
        }
        let mut map = shard
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= self.max_keys {
            // Idle keys (untouched for two periods) go; if none, the oldest half.
            let idle = self.millis(now).saturating_sub(2 * self.period_millis());
            map.retain(|_, e| e.touched.load(Ordering::Relaxed) > idle);
            if map.len() >= self.max_keys {
                let mut stamps: Vec<u64> = map
                    .values()
                    .map(|e| e.touched.load(Ordering::Relaxed))
                    .collect();
                stamps.sort_unstable();
                let cut = stamps[stamps.len() / 2];
                map.retain(|_, e| e.touched.load(Ordering::Relaxed) > cut);
            }
        }
        let cell = match self.config.algorithm {
            AlgorithmKind::FixedWindow | AlgorithmKind::SlidingWindow => {
                Cell::Window(AtomicU64::new(0))
            }
            AlgorithmKind::TokenBucket => Cell::Bucket(Mutex::new((self.burst() as f64, now))),
            AlgorithmKind::Gcra => Cell::Gcra(AtomicU64::new(0)),
        };
        Arc::clone(map.entry(key.to_owned()).or_insert_with(|| {
            Arc::new(Entry {
                cell,
                touched: AtomicU64::new(stamp),
                remaining: AtomicU64::new(u64::MAX),
                denied: AtomicU64::new(0),
            })
        }))
    }

    fn period_millis(&self) -> u64 {
        u64::try_from(self.config.period.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn burst(&self) -> u64 {
        self.config.burst.unwrap_or(self.config.limit).max(1)
    }

    /// Counts one request of `key` now.
    pub fn check(&self, key: &str) -> Decision {
        self.check_at(key, Instant::now())
    }

    /// Counts one request of `key` at `now` (tests pass their own clock).
    pub fn check_at(&self, key: &str, now: Instant) -> Decision {
        let entry = self.entry(key, now);
        let decision = self.decide(&entry, now);
        entry.remaining.store(decision.remaining, Ordering::Relaxed);
        if !decision.allowed {
            entry.denied.fetch_add(1, Ordering::Relaxed);
        }
        decision
    }

    /// The algorithm's decision on one more request of `entry`.
    fn decide(&self, entry: &Entry, now: Instant) -> Decision {
        let limit = self.config.limit.max(1);
        let period = self.period_millis();
        let t = self.millis(now);
        match &entry.cell {
            Cell::Window(state) => {
                let window = t / period;
                let elapsed = t % period;
                let sliding = self.config.algorithm == AlgorithmKind::SlidingWindow;
                let mut seen = state.load(Ordering::Acquire);
                loop {
                    let (at, count, before) = Packed::unpack(seen);
                    // This window's count and the previous one's, as of now.
                    let (current, previous) = match window.wrapping_sub(at) & Packed::WINDOW_MASK {
                        0 => (count, before),
                        1 => (0, count),
                        _ => (0, 0),
                    };
                    let used = if sliding {
                        let overlap = (period - elapsed) as f64 / period as f64;
                        current as f64 + previous as f64 * overlap
                    } else {
                        current as f64
                    };
                    let allowed = used + 1.0 <= limit as f64;
                    let next = Packed::pack(window, current + u64::from(allowed), previous);
                    if next != seen
                        && let Err(now_seen) = state.compare_exchange_weak(
                            seen,
                            next,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                    {
                        seen = now_seen;
                        continue;
                    }
                    let used_after = used + f64::from(u8::from(allowed));
                    return Decision {
                        allowed,
                        limit,
                        remaining: (limit as f64 - used_after).max(0.0) as u64,
                        reset: Duration::from_millis(period - elapsed),
                    };
                }
            }
            Cell::Bucket(state) => {
                let mut state = state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let burst = self.burst() as f64;
                let rate = limit as f64 / period as f64; // tokens per ms
                let (ref mut tokens, ref mut last) = *state;
                let refill = now.saturating_duration_since(*last).as_secs_f64() * 1000.0 * rate;
                *tokens = (*tokens + refill).min(burst);
                *last = now;
                let allowed = *tokens >= 1.0;
                if allowed {
                    *tokens -= 1.0;
                }
                let missing = if allowed {
                    burst - *tokens
                } else {
                    1.0 - *tokens
                };
                Decision {
                    allowed,
                    limit,
                    remaining: tokens.floor() as u64,
                    reset: Duration::from_millis((missing / rate).ceil() as u64),
                }
            }
            Cell::Gcra(tat) => {
                // Emission interval and burst tolerance, in µs.
                let interval = (period * 1000 / limit).max(1);
                let tolerance = interval * (self.burst() - 1);
                let now_us = t * 1000;
                let mut current = tat.load(Ordering::Acquire);
                loop {
                    let theoretical = current.max(now_us);
                    let allow_at = theoretical.saturating_sub(tolerance);
                    if now_us < allow_at {
                        return Decision {
                            allowed: false,
                            limit,
                            remaining: 0,
                            reset: Duration::from_micros(allow_at - now_us),
                        };
                    }
                    let next = theoretical + interval;
                    match tat.compare_exchange_weak(
                        current,
                        next,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => {
                            let ahead = next.saturating_sub(now_us);
                            let remaining = (tolerance + interval).saturating_sub(ahead) / interval;
                            return Decision {
                                allowed: true,
                                limit,
                                remaining,
                                reset: Duration::from_micros(ahead),
                            };
                        }
                        Err(seen) => current = seen,
                    }
                }
            }
        }
    }

    /// The keys that have used most of the limit as of their last request (at most
    /// `n`).
    pub fn hottest(&self, n: usize) -> Vec<KeyUsage> {
        let mut keys = self.usage();
        keys.sort_by(|a, b| b.used.cmp(&a.used).then_with(|| a.key.cmp(&b.key)));
        keys.truncate(n);
        keys
    }

    /// The keys denied most often while held (at most `n`, none that was never denied).
    pub fn most_limited(&self, n: usize) -> Vec<KeyUsage> {
        let mut keys = self.usage();
        keys.retain(|k| k.denied > 0);
        keys.sort_by(|a, b| b.denied.cmp(&a.denied).then_with(|| a.key.cmp(&b.key)));
        keys.truncate(n);
        keys
    }

    fn usage(&self) -> Vec<KeyUsage> {
        let limit = match self.config.algorithm {
            AlgorithmKind::TokenBucket | AlgorithmKind::Gcra => self.burst(),
            AlgorithmKind::FixedWindow | AlgorithmKind::SlidingWindow => self.config.limit,
        };
        self.shards
            .iter()
            .flat_map(|shard| {
                shard
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .map(|(key, entry)| {
                        let remaining = entry.remaining.load(Ordering::Relaxed).min(limit);
                        KeyUsage {
                            key: key.clone(),
                            used: limit - remaining,
                            limit,
                            denied: entry.denied.load(Ordering::Relaxed),
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Keys held now (memory bound check).
    pub fn keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum()
    }

    /// Counts one request of `key` in the shared Redis (a rule with `shared = true`):
    /// one script call, atomic on the server, timed by the server's clock.
    pub async fn check_shared(
        &self,
        redis: &crate::shared::SharedRedis,
        key: &str,
    ) -> redis::RedisResult<Decision> {
        let script = self.script.as_ref().ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Client, "the rule is not shared"))
        })?;
        let mut connection = redis.connection()?;
        let limit = self.config.limit.max(1);
        let (allowed, remaining, reset_ms): (u8, u64, u64) = script
            .key(format!("eventyr:rl:{}:{key}", self.config.name))
            .arg(limit)
            .arg(self.period_millis())
            .arg(self.burst())
            .invoke_async(&mut connection)
            .await?;
        Ok(Decision {
            allowed: allowed == 1,
            limit,
            remaining,
            reset: Duration::from_millis(reset_ms),
        })
    }
}

/// The Lua script of an algorithm: `KEYS[1]` the key, `ARGV` limit, period (ms) and
/// burst; answers `{allowed, remaining, reset_ms}`. The same arithmetic as the local
/// backend, on the Redis server's clock (`TIME`), so gateways with skewed clocks
/// still agree.
fn script(algorithm: AlgorithmKind) -> &'static str {
    match algorithm {
        AlgorithmKind::FixedWindow => FIXED_WINDOW,
        AlgorithmKind::SlidingWindow => SLIDING_WINDOW,
        AlgorithmKind::TokenBucket => TOKEN_BUCKET,
        AlgorithmKind::Gcra => GCRA,
    }
}

const FIXED_WINDOW: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local limit, period = tonumber(ARGV[1]), tonumber(ARGV[2])
local key = KEYS[1] .. ':' .. math.floor(now / period)
local reset = period - now % period
local used = tonumber(redis.call('GET', key) or '0')
if used + 1 > limit then return {0, 0, reset} end
used = redis.call('INCR', key)
if used == 1 then redis.call('PEXPIRE', key, period * 2) end
return {1, limit - used, reset}";

const SLIDING_WINDOW: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local limit, period = tonumber(ARGV[1]), tonumber(ARGV[2])
local window = math.floor(now / period)
local current = KEYS[1] .. ':' .. window
local elapsed = now % period
local count = tonumber(redis.call('GET', current) or '0')
local previous = tonumber(redis.call('GET', KEYS[1] .. ':' .. (window - 1)) or '0')
local used = count + previous * (period - elapsed) / period
if used + 1 > limit then return {0, 0, period - elapsed} end
if redis.call('INCR', current) == 1 then redis.call('PEXPIRE', current, period * 2) end
return {1, math.max(0, math.floor(limit - used - 1)), period - elapsed}";

const TOKEN_BUCKET: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
local limit, period, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rate = limit / period
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local last = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local allowed = 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate) + 1000)
local missing = 1 - tokens
if allowed == 1 then missing = burst - tokens end
return {allowed, math.floor(tokens), math.ceil(missing / rate)}";

const GCRA: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local limit, period, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local interval = math.max(1, math.floor(period * 1000 / limit))
local tolerance = interval * (burst - 1)
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
local allow_at = tat - tolerance
if now < allow_at then return {0, 0, math.ceil((allow_at - now) / 1000)} end
local next = tat + interval
local ahead = next - now
redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.ceil(ahead / 1000) + 1)
return {1, math.floor((tolerance + interval - ahead) / interval), math.ceil(ahead / 1000)}";

/// An address range of proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    bits: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `::1/128`, or a bare address.
    pub fn parse(text: &str) -> Option<Self> {
        let (address, bits) = match text.split_once('/') {
            Some((a, b)) => (a.parse::<IpAddr>().ok()?, b.parse::<u8>().ok()?),
            None => {
                let a = text.parse::<IpAddr>().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if address.is_ipv4() { 32 } else { 128 };
        (bits <= max).then_some(Self {
            network: address,
            bits,
        })
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let prefix = |a: IpAddr| -> Option<u128> {
            match a {
                IpAddr::V4(v4) => Some(u128::from(u32::from(v4)) << 96),
                IpAddr::V6(v6) => Some(u128::from(v6)),
            }
        };
        if self.network.is_ipv4() != address.is_ipv4() {
            return false;
        }
        let (Some(network), Some(address)) = (prefix(self.network), prefix(address)) else {
            return false;
        };
        if self.bits == 0 {
            return true;
        }
        let mask = u128::MAX << (128 - u32::from(self.bits));
        network & mask == address & mask
    }
}

/// The client's address: the peer, or — when the peer is a trusted proxy — the
/// right-most address in `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[Cidr]) -> IpAddr {
    if !trusted.iter().any(|c| c.contains(peer)) {
        return peer;
    }
    let Some(chain) = forwarded_for else {
        return peer;
    };
    for hop in chain.rsplit(',') {
        let Ok(address) = hop.trim().parse::<IpAddr>() else {
            return peer; // A garbled chain is not believed.
        };
        if !trusted.iter().any(|c| c.contains(address)) {
            return address;
        }
    }
    peer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(algorithm: AlgorithmKind, limit: u64, period_ms: u64, burst: Option<u64>) -> Rule {
        Rule::new(
            RuleConfig {
                name: "r".into(),
                routes: every_route(),
                priority: 0,
                algorithm,
                limit,
                period: Duration::from_millis(period_ms),
                burst,
                key: KeyKind::Global,
                tier: None,
                shadow: false,
                shared: false,
                on_backend_error: OnBackendError::Allow,
            },
            1_000,
        )
    }

    #[test]
    fn monitoring_sees_each_keys_usage_and_denials() {
        let r = rule(AlgorithmKind::FixedWindow, 3, 60_000, None);
        let now = Instant::now();
        for _ in 0..5 {
            r.check_at("busy", now);
        }
        r.check_at("calm", now);
        let hottest = r.hottest(10);
        assert_eq!(
            (hottest[0].key.as_str(), hottest[0].used, hottest[0].denied),
            ("busy", 3, 2)
        );
        assert_eq!((hottest[1].key.as_str(), hottest[1].used), ("calm", 1));
        let limited: Vec<String> = r.most_limited(10).into_iter().map(|k| k.key).collect();
        assert_eq!(limited, ["busy"]);
    }

    fn allowed(rule: &Rule, at: Instant, n: usize) -> usize {
        (0..n).filter(|_| rule.check_at("k", at).allowed).count()
    }

    /// The counters are atomic: threads racing on one key never let more through
    /// than the limit, nor fewer.
    #[test]
    fn racing_threads_get_exactly_the_limit() {
        for algorithm in [
            AlgorithmKind::FixedWindow,
            AlgorithmKind::SlidingWindow,
            AlgorithmKind::TokenBucket,
            AlgorithmKind::Gcra,
        ] {
            let rule = Arc::new(rule(algorithm, 1_500, 3_600_000, None));
            let at = Instant::now();
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let rule = Arc::clone(&rule);
                    std::thread::spawn(move || allowed(&rule, at, 1_000))
                })
                .collect();
            let total: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
            assert_eq!(total, 1_500, "{algorithm:?}");
        }
    }

    #[test]
    fn fixed_window_resets_at_the_window() {
        let r = rule(AlgorithmKind::FixedWindow, 5, 1_000, None);
        let start = r.began;
        assert_eq!(allowed(&r, start, 10), 5);
        assert_eq!(allowed(&r, start + Duration::from_millis(999), 1), 0);
        assert_eq!(allowed(&r, start + Duration::from_millis(1_000), 10), 5);
    }

    #[test]
    fn sliding_window_weighs_the_previous_window() {
        let r = rule(AlgorithmKind::SlidingWindow, 10, 1_000, None);
        let start = r.began;
        assert_eq!(allowed(&r, start, 10), 10);
        // Half way through the next window, half of the last one still counts: 5 left.
        assert_eq!(allowed(&r, start + Duration::from_millis(1_500), 10), 5);
        assert_eq!(allowed(&r, start + Duration::from_millis(3_000), 20), 10);
    }

    #[test]
    fn token_bucket_allows_its_burst_then_the_rate() {
        let r = rule(AlgorithmKind::TokenBucket, 10, 1_000, Some(3));
        let start = Instant::now();
        assert_eq!(allowed(&r, start, 10), 3, "the burst");
        assert_eq!(
            allowed(&r, start + Duration::from_millis(100), 10),
            1,
            "1 per 100 ms"
        );
        let denied = r.check_at("k", start + Duration::from_millis(100));
        assert!(!denied.allowed && denied.reset <= Duration::from_millis(100));
    }

    #[test]
    fn gcra_spaces_requests_after_the_burst_and_says_when_to_come_back() {
        let r = rule(AlgorithmKind::Gcra, 10, 1_000, Some(2));
        let start = r.began + Duration::from_secs(1);
        assert_eq!(allowed(&r, start, 10), 2, "the burst");
        let denied = r.check_at("k", start);
        assert!(!denied.allowed);
        assert!(
            denied.reset <= Duration::from_millis(100),
            "{:?}",
            denied.reset
        );
        assert_eq!(allowed(&r, start + Duration::from_millis(100), 10), 1);
    }

    #[test]
    fn idle_keys_are_evicted_so_memory_stays_bounded() {
        let r = rule(AlgorithmKind::Gcra, 10, 10, None);
        let start = r.began;
        for i in 0..10_000 {
            r.check_at(&format!("client-{i}"), start + Duration::from_millis(i));
        }
        assert!(r.keys() <= 1_000 + SHARDS, "{} keys", r.keys());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = [Cidr::parse("10.0.0.0/8").expect("cidr")];
        let peer: IpAddr = "10.1.2.3".parse().expect("ip");
        let outsider: IpAddr = "198.51.100.7".parse().expect("ip");
        assert_eq!(
            client_ip(peer, Some("203.0.113.9, 10.9.9.9"), &trusted),
            "203.0.113.9".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            client_ip(outsider, Some("203.0.113.9"), &trusted),
            outsider,
            "not a proxy"
        );
        assert_eq!(client_ip(peer, Some("garbage"), &trusted), peer);
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(
            Cidr::parse("::1")
                .expect("v6")
                .contains("::1".parse().expect("ip"))
        );
    }
}
