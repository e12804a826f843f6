//! The response cache of GET routes that opt in (`cache = { ttl = "30s" }`): keyed by
//! route, path, query, the route's `vary` headers and — for a request with a
//! credential — the caller, so a private answer is never served to someone else.
//! `Cache-Control` is respected both ways: a request's `no-cache`/`no-store` skips the
//! cache; an answer's `no-store`, `private` (for anonymous requests) or `max-age`
//! (shorter than the route's ttl) decides whether and how long it is kept. Only 200
//! answers with a known length within the route's `max_body_bytes` are kept; the
//! cache holds at most `cache_max_bytes` (least recently used out first).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use lru::LruCache;
use serde::Deserialize;

use crate::config::humantime_serde_lite;

/// A route's cache settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(with = "humantime_serde_lite")]
    pub ttl: Duration,
    /// Request headers whose values are part of the key.
    #[serde(default)]
    pub vary: Vec<String>,
    /// Larger answers are not kept. Default 1 MiB.
    #[serde(default = "one_mebibyte")]
    pub max_body_bytes: usize,
}

fn one_mebibyte() -> usize {
    1024 * 1024
}

/// A kept answer.
#[derive(Debug, Clone)]
pub struct Cached {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stored: Instant,
    pub expires: Instant,
}

impl Cached {
    fn size(&self, key: &str) -> usize {
        key.len()
            + self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len())
                .sum::<usize>()
    }
}

/// The gateway's response cache, bounded in bytes.
pub struct ResponseCache {
    inner: Mutex<(LruCache<String, Cached>, usize)>,
    max_bytes: usize,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl ResponseCache {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new((LruCache::unbounded(), 0)),
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (LruCache<String, Cached>, usize)> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A fresh answer for `key`.
    pub fn get(&self, key: &str) -> Option<Cached> {
        let mut inner = self.lock();
        let (cache, used) = &mut *inner;
        match cache.get(key) {
            Some(hit) if hit.expires > Instant::now() => Some(hit.clone()),
            Some(_) => {
                if let Some(stale) = cache.pop(key) {
                    *used -= stale.size(key);
                }
                None
            }
            None => None,
        }
    }

    /// Keeps an answer, making room by dropping the least recently used.
    pub fn put(&self, key: String, answer: Cached) {
        let size = answer.size(&key);
        if size > self.max_bytes {
            return;
        }
        let mut inner = self.lock();
        let (cache, used) = &mut *inner;
        if let Some(old) = cache.put(key.clone(), answer) {
            *used -= old.size(&key);
        }
        *used += size;
        while *used > self.max_bytes {
            match cache.pop_lru() {
                Some((k, v)) => *used -= v.size(&k),
                None => break,
            }
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.lock().1
    }
}

/// The directives of a `Cache-Control` header, lower case.
pub fn directives(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .collect()
}

/// How long an answer may be kept, if at all.
pub fn keep_for(ttl: Duration, answer: &HeaderMap, private_key: bool) -> Option<Duration> {
    let directives = directives(answer);
    if directives
        .iter()
        .any(|d| d == "no-store" || d == "no-cache" || (d == "private" && !private_key))
    {
        return None;
    }
    let max_age = directives
        .iter()
        .find_map(|d| {
            d.strip_prefix("max-age=")
                .and_then(|s| s.parse::<u64>().ok())
        })
        .map(Duration::from_secs);
    let keep = max_age.map_or(ttl, |m| m.min(ttl));
    (!keep.is_zero()).then_some(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &str) -> Cached {
        let now = Instant::now();
        Cached {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_owned()),
            stored: now,
            expires: now + Duration::from_secs(60),
        }
    }

    #[test]
    fn the_cache_stays_within_its_bytes_least_recently_used_out_first() {
        let cache = ResponseCache::new(100);
        cache.put("a".into(), answer(&"x".repeat(40)));
        cache.put("b".into(), answer(&"y".repeat(40)));
        assert!(cache.get("a").is_some(), "a is now the most recently used");
        cache.put("c".into(), answer(&"z".repeat(40)));
        assert!(cache.get("b").is_none(), "b went to make room");
        assert!(cache.get("a").is_some() && cache.get("c").is_some());
        assert!(cache.bytes() <= 100);
        cache.put("huge".into(), answer(&"h".repeat(200)));
        assert!(cache.get("huge").is_none(), "larger than the whole cache");
    }

    #[test]
    fn cache_control_decides_what_is_kept_and_how_long() {
        let ttl = Duration::from_secs(30);
        let headers = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CACHE_CONTROL, value.parse().expect("value"));
            h
        };
        assert_eq!(keep_for(ttl, &HeaderMap::new(), false), Some(ttl));
        assert_eq!(
            keep_for(ttl, &headers("max-age=5"), false),
            Some(Duration::from_secs(5))
        );
        assert_eq!(keep_for(ttl, &headers("max-age=500"), false), Some(ttl));
        assert_eq!(keep_for(ttl, &headers("no-store"), false), None);
        assert_eq!(keep_for(ttl, &headers("private, max-age=5"), false), None);
        assert_eq!(
            keep_for(ttl, &headers("private, max-age=5"), true),
            Some(Duration::from_secs(5)),
            "kept per caller"
        );
        assert_eq!(keep_for(ttl, &headers("max-age=0"), false), None);
    }
}
