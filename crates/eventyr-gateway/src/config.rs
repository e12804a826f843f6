//! The gateway's configuration as written (TOML), and its check: every mistake is
//! reported with the key it is at, before anything starts.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//!
//! [[clusters]]
//! name = "orders"
//! balance = "round_robin"          # weighted_round_robin, least_request, peak_ewma,
//!                                  # hash_header (with hash_header = "x-user-id"), hash_client_ip
//! endpoints = [{ url = "http://127.0.0.1:9001" }, { url = "http://127.0.0.1:9002", weight = 3 }]
//! health = { path = "/health/ready", interval = "30s", timeout = "5s" }
//! outlier = { consecutive_failures = 5, base_ejection = "30s", max_ejection = "5m" }
//!
//! [[routes]]
//! name = "orders-canary"
//! path = { prefix = "/api/orders" }
//! headers = { x-canary = "true" }
//! cluster = "orders-v2"
//!
//! [[routes]]
//! name = "orders"
//! host = "api.example.com"
//! path = { template = "/api/orders/{id}" }
//! methods = ["GET"]
//! rewrite = { replace = "/orders/{id}" }
//! split = [{ cluster = "orders", weight = 90 }, { cluster = "orders-v2", weight = 10 }]
//! ```

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where the gateway listens. Default 127.0.0.1:8080.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Where the admin API listens (routes, clusters, breakers, rate limits, reload).
    /// Absent: no admin API. With `[auth]` it needs the `admin` role; without, it
    /// answers loopback clients only.
    pub admin_listen: Option<String>,
    #[serde(default)]
    pub clusters: Vec<ClusterConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Tokens, API keys and roles; absent: no route may require permissions.
    pub auth: Option<crate::auth::AuthConfig>,
    /// Rate-limit rules (`[[rate_limits]]`).
    #[serde(default)]
    pub rate_limits: Vec<crate::ratelimit::RuleConfig>,
    /// Adds the sources' default rules (see [`crate::ratelimit::default_rules`]) to
    /// `rate_limits`; a configured rule of the same name replaces its default.
    #[serde(default)]
    pub rate_limit_defaults: bool,
    /// Keys a rule keeps at most (idle ones go first). Default 100 000.
    #[serde(default = "hundred_thousand")]
    pub rate_limit_max_keys: usize,
    /// The response cache's size, at most. Default 64 MiB.
    #[serde(default = "sixty_four_mebibytes")]
    pub cache_max_bytes: usize,
    /// Proxies whose `X-Forwarded-For` names the client (CIDRs); nobody else's is
    /// believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// The Redis server shared by several gateways (shared rate limits, sessions).
    pub redis: Option<crate::shared::RedisConfig>,
    /// Logins and sessions (`/auth/login`, `/auth/refresh`, `/auth/logout`).
    pub sessions: Option<crate::session::SessionsConfig>,
    /// Sent to every cluster as `X-Eventyr-Credential` (at least 32 visible
    /// characters): the services take calls only with it. Absent: none is sent.
    pub internal_credential: Option<String>,
}

fn sixty_four_mebibytes() -> usize {
    64 * 1024 * 1024
}

fn hundred_thousand() -> usize {
    100_000
}

/// What a client may send, and how slowly.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// A request body above this is refused (413). Default 10 MiB.
    #[serde(default = "ten_mebibytes")]
    pub max_body_bytes: u64,
    /// The request line and headers, at most. Default 64 KiB (at least 8 KiB).
    #[serde(default = "sixty_four_kibibytes")]
    pub max_header_bytes: usize,
    /// A client that has not sent a request's headers within this of its connection
    /// (or of its previous answer) is disconnected: silent sockets, slowloris. Default
    /// 10 s.
    #[serde(default = "ten_seconds", with = "humantime_serde_lite")]
    pub header_read_timeout: Duration,
    /// Client connections open at once; past it new ones are closed at once. Default
    /// 10 000.
    #[serde(default = "crate::server::ten_thousand")]
    pub max_connections: usize,
    /// A keep-alive connection with nothing under way is closed after this. Default
    /// 60 s.
    #[serde(
        default = "crate::server::sixty_seconds",
        with = "humantime_serde_lite"
    )]
    pub idle_timeout: Duration,
    /// HTTP/2 clients are pinged this often and dropped when a ping goes unanswered
    /// as long. Default 20 s.
    #[serde(
        default = "crate::server::twenty_seconds",
        with = "humantime_serde_lite"
    )]
    pub http2_keep_alive: Duration,
    /// WebSocket tunnels and event streams (server-sent events) open at once; past
    /// it a new one is 503. Default 1 000.
    #[serde(default = "one_thousand")]
    pub max_tunnels: usize,
    /// Refused credentials (bad tokens, unknown API keys) an address may present in a
    /// minute; then it is refused (429) until the minute ends. Default 30.
    #[serde(default = "thirty")]
    pub refused_credentials_max: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: ten_mebibytes(),
            max_header_bytes: sixty_four_kibibytes(),
            header_read_timeout: ten_seconds(),
            max_connections: crate::server::ten_thousand(),
            idle_timeout: crate::server::sixty_seconds(),
            http2_keep_alive: crate::server::twenty_seconds(),
            max_tunnels: one_thousand(),
            refused_credentials_max: thirty(),
        }
    }
}

impl LimitsConfig {
    /// What the server applies of these limits.
    pub fn server(&self) -> crate::server::ServerLimits {
        crate::server::ServerLimits {
            max_connections: self.max_connections,
            max_header_bytes: self.max_header_bytes,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            http2_keep_alive: self.http2_keep_alive,
        }
    }
}

fn thirty() -> u32 {
    30
}
fn one_thousand() -> usize {
    1_000
}

fn ten_mebibytes() -> u64 {
    10 * 1024 * 1024
}
fn sixty_four_kibibytes() -> usize {
    64 * 1024
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}

/// A set of interchangeable endpoints.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    #[serde(default)]
    pub balance: BalanceKind,
    /// The header whose value is hashed (`balance = "hash_header"`).
    pub hash_header: Option<String>,
    pub endpoints: Vec<EndpointConfig>,
    /// Active health checks; absent: none (endpoints count as healthy).
    pub health: Option<HealthConfig>,
    /// Passive outlier ejection; on by default.
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// The cluster's circuit breaker; on by default.
    #[serde(default)]
    pub circuit_breaker: crate::resilience::BreakerConfig,
    /// The bulkhead: requests under way at once, at most; beyond, 503. Default 1024.
    #[serde(default = "bulkhead")]
    pub max_concurrent: u32,
    /// Retries to this cluster, at most, over 10 s.
    #[serde(default)]
    pub retry_budget: BudgetConfig,
    /// How the gateway speaks to the endpoints: `http1` (default, keep-alive) or
    /// `http2` (h2c, prior knowledge: many requests over one connection).
    #[serde(default)]
    pub protocol: Protocol,
}

/// An upstream's protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Http1,
    Http2,
}

/// A route's CORS policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed (`https://shop.example.com`), or `["*"]` for any.
    pub allow_origins: Vec<String>,
    /// Default GET, HEAD, POST, PUT, PATCH, DELETE.
    #[serde(default = "cors_methods")]
    pub allow_methods: Vec<String>,
    /// Request headers allowed. Default content-type, authorization, x-request-id.
    #[serde(default = "cors_headers")]
    pub allow_headers: Vec<String>,
    /// Response headers the page may read. Default x-request-id.
    #[serde(default = "cors_expose")]
    pub expose_headers: Vec<String>,
    /// Cookies and credentials allowed (never with `*`). Default false.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may keep a preflight's answer. Default 10 min.
    #[serde(default = "ten_minutes", with = "humantime_serde_lite")]
    pub max_age: Duration,
}

fn cors_methods() -> Vec<String> {
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        .map(str::to_owned)
        .to_vec()
}
fn cors_headers() -> Vec<String> {
    ["content-type", "authorization", "x-request-id"]
        .map(str::to_owned)
        .to_vec()
}
fn cors_expose() -> Vec<String> {
    vec!["x-request-id".to_owned()]
}
fn ten_minutes() -> Duration {
    Duration::from_secs(600)
}

/// One call of an aggregation route: `GET path` (a template filled with the route's
/// parameters) on `cluster`, within `timeout` (default 1 s); its answer goes under
/// `name`, or null (with the reason under `errors.<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateCall {
    pub name: String,
    pub cluster: String,
    pub path: String,
    #[serde(default, with = "humantime_serde_lite::option")]
    pub timeout: Option<Duration>,
    /// The part the others are about (an order's details: the order): when it is
    /// refused (4xx — not found, forbidden), so is the whole aggregation, with its
    /// answer; no partial document about something the caller may not see.
    #[serde(default)]
    pub required: bool,
}

/// How a route retries: at most `attempts` in all, only idempotent methods (GET,
/// HEAD, OPTIONS, PUT, DELETE, TRACE) with a body small enough to be kept, only on
/// the listed conditions, each attempt within `per_try_timeout` (default the route's
/// timeout), 25 ms × 2ⁿ apart with jitter, and within the cluster's retry budget.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default = "one")]
    pub attempts: u32,
    #[serde(default = "retry_on")]
    pub on: Vec<RetryOn>,
    #[serde(default, with = "humantime_serde_lite::option")]
    pub per_try_timeout: Option<Duration>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 1,
            on: retry_on(),
            per_try_timeout: None,
        }
    }
}

fn retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::GatewayError,
        RetryOn::Timeout,
    ]
}

/// When an attempt is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// No connection to the endpoint.
    ConnectFailure,
    /// 502, 503 or 504.
    GatewayError,
    /// Any 5xx.
    #[serde(rename = "5xx")]
    ServerError,
    /// No answer within the per-try timeout.
    Timeout,
}

/// A cluster's retry budget (Finagle's): retries within a 10 s window may be at most
/// `ratio` × the requests in it, plus `min_per_second` × 10.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Default 0.2.
    #[serde(default = "fifth")]
    pub ratio: f64,
    /// Default 3.
    #[serde(default = "three")]
    pub min_per_second: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: fifth(),
            min_per_second: three(),
        }
    }
}

fn fifth() -> f64 {
    0.2
}

fn bulkhead() -> u32 {
    1024
}

/// Active health checks: `GET path` on each endpoint every `interval`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Default `/health/ready`.
    #[serde(default = "health_path")]
    pub path: String,
    /// Default 30 s.
    #[serde(default = "thirty_seconds", with = "humantime_serde_lite")]
    pub interval: Duration,
    /// Default 5 s.
    #[serde(default = "five_seconds", with = "humantime_serde_lite")]
    pub timeout: Duration,
    /// Successes in a row that make an unhealthy endpoint healthy. Default 2.
    #[serde(default = "two")]
    pub healthy_threshold: u32,
    /// Failures in a row that make a healthy endpoint unhealthy. Default 3.
    #[serde(default = "three")]
    pub unhealthy_threshold: u32,
}

/// Passive outlier ejection: an endpoint whose answers fail `consecutive_failures`
/// times in a row (a 5xx, or no connection) is taken out for `base_ejection` × the
/// times it has been ejected, at most `max_ejection`; at most `max_ejected_percent`
/// of a cluster is out at once (at least one endpoint may be).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Default 5; 0 turns ejection off.
    #[serde(default = "five")]
    pub consecutive_failures: u32,
    /// Default 30 s.
    #[serde(default = "thirty_seconds", with = "humantime_serde_lite")]
    pub base_ejection: Duration,
    /// Default 300 s.
    #[serde(default = "five_minutes", with = "humantime_serde_lite")]
    pub max_ejection: Duration,
    /// Default 50.
    #[serde(default = "fifty")]
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: five(),
            base_ejection: thirty_seconds(),
            max_ejection: five_minutes(),
            max_ejected_percent: fifty(),
        }
    }
}

fn health_path() -> String {
    "/health/ready".to_owned()
}
fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}
fn five_seconds() -> Duration {
    Duration::from_secs(5)
}
fn five_minutes() -> Duration {
    Duration::from_secs(300)
}
fn two() -> u32 {
    2
}
fn three() -> u32 {
    3
}
fn five() -> u32 {
    5
}
fn fifty() -> u32 {
    50
}

/// Durations written as humantime text ("30s", "1m 30s").
pub(crate) mod humantime_serde_lite {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use std::time::Duration;

        use serde::Deserializer;

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Duration>, D::Error> {
            super::deserialize(deserializer).map(Some)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// `http://host:port`.
    pub url: String,
    /// Its share in weighted balancing. Default 1.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// How a cluster picks an endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceKind {
    #[default]
    RoundRobin,
    /// Smooth and deterministic (nginx's): weights 5, 1, 1 give a a b a c a a.
    WeightedRoundRobin,
    /// The endpoint with the fewest requests under way.
    LeastRequest,
    /// Two endpoints at random; the one with the lower peak-EWMA latency × load.
    PeakEwma,
    /// Maglev consistent hashing on a header's value.
    HashHeader,
    /// Maglev consistent hashing on the client's address.
    HashClientIp,
}

/// One route: what it matches, where it goes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// Higher first; among equal priorities the more specific route wins (exact path,
    /// then template, then the longest prefix; then more conditions), then the first.
    #[serde(default)]
    pub priority: i32,
    /// `api.example.com`, or `*.example.com` for any subdomain. Absent: any host.
    pub host: Option<String>,
    /// The `Host` names (without port) the route answers for; another is 421
    /// `misdirected_request`. For browser-facing routes of a gateway on a local
    /// address (the dashboard, the admin API): a page of another site whose name was
    /// rebound to this address (DNS rebinding) names its own host. Empty: any.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    pub path: PathConfig,
    /// Absent: any method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Headers that must have these values (`"*"`: present, any value).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub rewrite: Option<RewriteConfig>,
    /// How long the upstream may take to answer, e.g. "5s". Default 30 s.
    #[serde(default, with = "humantime_serde_lite::option")]
    pub timeout: Option<Duration>,
    /// Permissions (`orders:read`) a caller needs; empty: a public route.
    #[serde(default)]
    pub permissions: Vec<String>,
    /// Caches this route's GET answers; absent: no caching.
    pub cache: Option<crate::cache::CacheConfig>,
    /// Cross-origin requests from browsers; absent: no CORS headers.
    pub cors: Option<CorsConfig>,
    /// Retries of failed attempts; none by default (beyond the one retry of a failed
    /// connection on another endpoint, which every route has).
    #[serde(default)]
    pub retries: RetryConfig,
    /// An aggregation route: these calls in parallel, one JSON document of their
    /// answers (instead of `cluster` or `split`).
    #[serde(default)]
    pub aggregate: Vec<AggregateCall>,
    /// The one cluster, or `split`.
    pub cluster: Option<String>,
    #[serde(default)]
    pub split: Vec<SplitConfig>,
    /// Served by the gateway itself (instead of a cluster): the session endpoints.
    pub builtin: Option<Builtin>,
}

/// An endpoint the gateway serves itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Builtin {
    /// `{"username","password"}` → a token pair.
    Login,
    /// `{"refresh_token"}` → a new pair (the old refresh token is spent).
    Refresh,
    /// Ends the caller's session (bearer token, or `{"refresh_token"}`);
    /// `{"all": true}` ends all of the caller's sessions.
    Logout,
}

/// How a route matches the path.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PathConfig {
    Exact(String),
    /// At a segment boundary: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
    /// Segments, `{name}` taking one segment, a final `{*name}` the rest.
    Template(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RewriteConfig {
    /// Removes this prefix from the path (`/api/orders/1` → `/orders/1`).
    StripPrefix(String),
    /// The new path, a template filled with the route's parameters.
    Replace(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    pub cluster: String,
    pub weight: u32,
}

/// A configuration that cannot run, at the key that says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn error(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

impl GatewayConfig {
    /// Reads and checks a configuration.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| {
            let key = e.span().map_or_else(String::new, |s| format!("at {s:?}"));
            error(key, e.message().to_owned())
        })?;
        config.check()?;
        Ok(config)
    }

    /// The rate-limit rules in force: the configured ones, and the defaults when asked
    /// for (those not replaced by a configured rule of their name).
    pub fn rate_limit_rules(&self) -> Vec<crate::ratelimit::RuleConfig> {
        let mut rules = self.rate_limits.clone();
        if self.rate_limit_defaults {
            let login_routes: Vec<String> = self
                .routes
                .iter()
                .filter(|r| {
                    matches!(r.builtin, Some(Builtin::Login | Builtin::Refresh))
                        || r.name.starts_with("auth")
                })
                .map(|r| r.name.clone())
                .collect();
            for rule in crate::ratelimit::default_rules(login_routes) {
                if !rules.iter().any(|r| r.name == rule.name) {
                    rules.push(rule);
                }
            }
        }
        rules
    }

    /// Every rule a configuration must keep.
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(mistake) = self.limits.server().check("limits").into_iter().next() {
            let (key, message) = mistake.split_once(": ").unwrap_or((&mistake, ""));
            return Err(error(key, message));
        }
        if let Some(credential) = &self.internal_credential
            && (credential.len() < 32 || !credential.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(error(
                "internal_credential",
                "at least 32 visible ASCII characters",
            ));
        }
        if let Some(redis) = &self.redis {
            crate::shared::SharedRedis::new(redis).map_err(|e| error("redis.url", e))?;
            if redis.timeout.is_zero() {
                return Err(error("redis.timeout", "above 0"));
            }
        }
        if let Some(sessions) = &self.sessions {
            crate::session::check(sessions, self.redis.is_some())
                .map_err(|(key, message)| error(key, message))?;
            if self.auth.is_none() {
                return Err(error(
                    "sessions",
                    "sessions need an [auth] section (its roles and issuer)",
                ));
            }
        }
        if let Some(auth) = &self.auth {
            crate::auth::Authenticator::new(auth, self.sessions.as_ref()).map_err(|message| {
                let (key, message) = message.split_once(": ").unwrap_or(("auth", &message));
                error(key, message)
            })?;
        }
        for (i, proxy) in self.trusted_proxies.iter().enumerate() {
            if crate::ratelimit::Cidr::parse(proxy).is_none() {
                return Err(error(
                    format!("trusted_proxies[{i}]"),
                    "an address or a CIDR, e.g. 10.0.0.0/8",
                ));
            }
        }
        let mut rules = HashSet::new();
        for (i, rule) in self.rate_limits.iter().enumerate() {
            let key = format!("rate_limits[{i}]");
            if !valid_name(&rule.name) {
                return Err(error(format!("{key}.name"), NAME_RULE));
            }
            if !rules.insert(rule.name.as_str()) {
                return Err(error(format!("{key}.name"), "appears twice"));
            }
            if rule.limit == 0 || rule.burst == Some(0) {
                return Err(error(
                    format!("{key}.limit"),
                    "limit and burst are at least 1",
                ));
            }
            if matches!(
                rule.algorithm,
                crate::ratelimit::AlgorithmKind::FixedWindow
                    | crate::ratelimit::AlgorithmKind::SlidingWindow
            ) && rule.limit > crate::ratelimit::MAX_WINDOW_LIMIT
            {
                return Err(error(
                    format!("{key}.limit"),
                    "a windowed rule counts at most 1000000 per period; use gcra or token_bucket above",
                ));
            }
            if rule.shared && self.redis.is_none() {
                return Err(error(
                    format!("{key}.shared"),
                    "a shared rule needs a [redis] section",
                ));
            }
            if rule.period < Duration::from_millis(1) {
                return Err(error(format!("{key}.period"), "at least 1ms"));
            }
            let tiers = ["free", "premium", "enterprise", "anonymous"];
            if rule.tier.as_deref().is_some_and(|t| !tiers.contains(&t)) {
                return Err(error(
                    format!("{key}.tier"),
                    "free, premium, enterprise or anonymous",
                ));
            }
        }
        let mut clusters = HashSet::new();
        for (i, cluster) in self.clusters.iter().enumerate() {
            let key = format!("clusters[{i}]");
            if !valid_name(&cluster.name) {
                return Err(error(format!("{key}.name"), NAME_RULE));
            }
            if !clusters.insert(cluster.name.as_str()) {
                return Err(error(format!("{key}.name"), "appears twice"));
            }
            if cluster.endpoints.is_empty() {
                return Err(error(format!("{key}.endpoints"), "at least one endpoint"));
            }
            for (j, endpoint) in cluster.endpoints.iter().enumerate() {
                let key = format!("{key}.endpoints[{j}]");
                if parse_url(&endpoint.url).is_none() {
                    return Err(error(
                        format!("{key}.url"),
                        "http://host:port, with an optional path and nothing else",
                    ));
                }
                if endpoint.weight == 0 || endpoint.weight > 1_000 {
                    return Err(error(format!("{key}.weight"), "1 to 1000"));
                }
            }
            if let Some(health) = &cluster.health {
                let key = format!("{key}.health");
                if !health.path.starts_with('/') {
                    return Err(error(format!("{key}.path"), "a path, from '/'"));
                }
                if health.interval < Duration::from_millis(10) {
                    return Err(error(format!("{key}.interval"), "at least 10ms"));
                }
                if health.timeout.is_zero() || health.timeout > health.interval {
                    return Err(error(
                        format!("{key}.timeout"),
                        "above 0, at most the interval",
                    ));
                }
                if health.healthy_threshold == 0 || health.unhealthy_threshold == 0 {
                    return Err(error(
                        format!("{key}.healthy_threshold"),
                        "thresholds are at least 1",
                    ));
                }
            }
            let breaker = &cluster.circuit_breaker;
            if !(0.0..=1.0).contains(&breaker.error_rate) || breaker.error_rate == 0.0 {
                return Err(error(
                    format!("{key}.circuit_breaker.error_rate"),
                    "above 0, at most 1",
                ));
            }
            if breaker.window < Duration::from_millis(100) || breaker.open_for.is_zero() {
                return Err(error(
                    format!("{key}.circuit_breaker.window"),
                    "a window of at least 100ms and a non-zero open_for",
                ));
            }
            if !(0.0..=10.0).contains(&cluster.retry_budget.ratio) {
                return Err(error(format!("{key}.retry_budget.ratio"), "0 to 10"));
            }
            if cluster.max_concurrent == 0 {
                return Err(error(format!("{key}.max_concurrent"), "at least 1"));
            }
            if cluster.outlier.max_ejected_percent > 100 {
                return Err(error(
                    format!("{key}.outlier.max_ejected_percent"),
                    "0 to 100",
                ));
            }
            let wants_header = cluster.balance == BalanceKind::HashHeader;
            if wants_header != cluster.hash_header.is_some() {
                return Err(error(
                    format!("{key}.hash_header"),
                    "given exactly when balance = \"hash_header\"",
                ));
            }
        }
        let mut routes = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if !valid_name(&route.name) {
                return Err(error(format!("{key}.name"), NAME_RULE));
            }
            if !routes.insert(route.name.as_str()) {
                return Err(error(format!("{key}.name"), "appears twice"));
            }
            crate::route::PathPattern::parse(&route.path)
                .map_err(|message| error(format!("{key}.path"), message))?;
            if route
                .timeout
                .is_some_and(|t| t.is_zero() || t > Duration::from_secs(3600))
            {
                return Err(error(format!("{key}.timeout"), "above 0, at most 1h"));
            }
            for permission in &route.permissions {
                let valid = permission
                    .split_once(':')
                    .is_some_and(|(resource, action)| {
                        valid_name(resource) && (valid_name(action) || action == "*")
                    });
                if !valid {
                    return Err(error(
                        format!("{key}.permissions"),
                        "resource:action, e.g. orders:read",
                    ));
                }
            }
            if !route.permissions.is_empty() && self.auth.is_none() {
                return Err(error(
                    format!("{key}.permissions"),
                    "permissions need an [auth] section",
                ));
            }
            if let Some(cache) = &route.cache {
                if cache.ttl.is_zero() {
                    return Err(error(format!("{key}.cache.ttl"), "above 0"));
                }
                if !route.methods.is_empty() && !route.methods.iter().any(|m| m == "GET") {
                    return Err(error(format!("{key}.cache"), "only GET answers are cached"));
                }
            }
            if let Some(cors) = &route.cors {
                let any = cors.allow_origins.iter().any(|o| o == "*");
                if cors.allow_origins.is_empty() {
                    return Err(error(
                        format!("{key}.cors.allow_origins"),
                        "at least one origin, or \"*\"",
                    ));
                }
                if any && cors.allow_credentials {
                    return Err(error(
                        format!("{key}.cors.allow_credentials"),
                        "credentials cannot go with any origin (\"*\")",
                    ));
                }
            }
            if route.retries.attempts == 0 || route.retries.attempts > 10 {
                return Err(error(format!("{key}.retries.attempts"), "1 to 10"));
            }
            if route.retries.per_try_timeout.is_some_and(|t| t.is_zero()) {
                return Err(error(format!("{key}.retries.per_try_timeout"), "above 0"));
            }
            for method in &route.methods {
                if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(error(
                        format!("{key}.methods"),
                        "upper-case methods, e.g. GET",
                    ));
                }
            }
            if route.builtin.is_some() {
                if route.cluster.is_some() || !route.split.is_empty() || !route.aggregate.is_empty()
                {
                    return Err(error(
                        format!("{key}.builtin"),
                        "a built-in route has no cluster, split or aggregate",
                    ));
                }
                if self.sessions.is_none() {
                    return Err(error(
                        format!("{key}.builtin"),
                        "the session endpoints need a [sessions] section",
                    ));
                }
                continue;
            }
            if !route.aggregate.is_empty() {
                if route.cluster.is_some() || !route.split.is_empty() {
                    return Err(error(
                        format!("{key}.aggregate"),
                        "an aggregation route has no cluster or split",
                    ));
                }
                let names = crate::route::PathPattern::parse(&route.path)
                    .map(|p| p.parameters())
                    .unwrap_or_default();
                let mut seen = HashSet::new();
                for (j, call) in route.aggregate.iter().enumerate() {
                    let at = format!("{key}.aggregate[{j}]");
                    if !valid_name(&call.name) || !seen.insert(call.name.as_str()) {
                        return Err(error(
                            format!("{at}.name"),
                            "a unique name, a-z, 0-9, '-' and '_'",
                        ));
                    }
                    if !clusters.contains(call.cluster.as_str()) {
                        return Err(error(
                            format!("{at}.cluster"),
                            format!("no cluster {}", call.cluster),
                        ));
                    }
                    if !call.path.starts_with('/') {
                        return Err(error(format!("{at}.path"), "a path, from '/'"));
                    }
                    if let Some(name) = crate::route::template_names(&call.path)
                        .into_iter()
                        .find(|n| !names.contains(n))
                    {
                        return Err(error(
                            format!("{at}.path"),
                            format!("{{{name}}} is not a parameter of the route"),
                        ));
                    }
                }
                continue;
            }
            match (&route.cluster, route.split.is_empty()) {
                (Some(cluster), true) if !clusters.contains(cluster.as_str()) => {
                    return Err(error(
                        format!("{key}.cluster"),
                        format!("no cluster {cluster}"),
                    ));
                }
                (Some(_), true) => {}
                (None, false) => {
                    for (j, split) in route.split.iter().enumerate() {
                        if !clusters.contains(split.cluster.as_str()) {
                            return Err(error(
                                format!("{key}.split[{j}].cluster"),
                                format!("no cluster {}", split.cluster),
                            ));
                        }
                    }
                    if route.split.iter().all(|s| s.weight == 0) {
                        return Err(error(format!("{key}.split"), "some weight above 0"));
                    }
                }
                _ => {
                    return Err(error(
                        format!("{key}.cluster"),
                        "either cluster or split, not both, not neither",
                    ));
                }
            }
            if let Some(RewriteConfig::Replace(template)) = &route.rewrite {
                let names = crate::route::PathPattern::parse(&route.path)
                    .map(|p| p.parameters())
                    .unwrap_or_default();
                for name in crate::route::template_names(template) {
                    if !names.contains(&name) {
                        return Err(error(
                            format!("{key}.rewrite.replace"),
                            format!("{{{name}}} is not a parameter of the path"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

const NAME_RULE: &str = "1 to 64 of a-z, 0-9, '-' and '_'";

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// `http://host:port[/path]` → (authority, base path).
pub fn parse_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (host, port) = authority.rsplit_once(':')?;
    let valid_host = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'));
    let valid_path = path
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#');
    (valid_host && port.parse::<u16>().is_ok_and(|p| p > 0) && valid_path)
        .then(|| (authority.to_owned(), path.trim_end_matches('/').to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [[clusters]]
        name = "orders"
        endpoints = [{ url = "http://127.0.0.1:9001" }, { url = "http://127.0.0.1:9002", weight = 3 }]

        [[clusters]]
        name = "orders-v2"
        balance = "hash_header"
        hash_header = "x-user-id"
        endpoints = [{ url = "http://127.0.0.1:9003/v2" }]

        [[routes]]
        name = "orders"
        path = { template = "/api/orders/{id}" }
        rewrite = { replace = "/orders/{id}" }
        split = [{ cluster = "orders", weight = 90 }, { cluster = "orders-v2", weight = 10 }]
    "#;

    #[test]
    fn a_good_configuration_reads() {
        let config = GatewayConfig::parse(GOOD).expect("valid");
        assert_eq!(config.listen, "127.0.0.1:8080");
        assert_eq!(config.clusters[0].endpoints[0].weight, 1);
        assert_eq!(config.clusters[1].balance, BalanceKind::HashHeader);
        assert_eq!(config.routes[0].split.len(), 2);
    }

    #[test]
    fn mistakes_name_their_key() {
        let cases = [
            (
                GOOD.replace("orders-v2\"\n        balance", "orders\"\n        balance"),
                "clusters[1].name",
            ),
            (
                GOOD.replace("http://127.0.0.1:9002", "https://x"),
                "clusters[0].endpoints[1].url",
            ),
            (
                GOOD.replace("weight = 3", "weight = 0"),
                "clusters[0].endpoints[1].weight",
            ),
            (
                GOOD.replace("hash_header = \"x-user-id\"", ""),
                "clusters[1].hash_header",
            ),
            (
                GOOD.replace(
                    "{ cluster = \"orders\", weight = 90 }",
                    "{ cluster = \"nope\", weight = 90 }",
                ),
                "routes[0].split[0].cluster",
            ),
            (
                GOOD.replace("\"/orders/{id}\"", "\"/orders/{order}\""),
                "routes[0].rewrite.replace",
            ),
            (
                GOOD.replace("\"/api/orders/{id}\"", "\"api/orders\""),
                "routes[0].path",
            ),
        ];
        for (text, key) in cases {
            let error = GatewayConfig::parse(&text).expect_err(key);
            assert_eq!(error.key, key, "{error}");
        }
        let unknown = GatewayConfig::parse("colour = 1").expect_err("unknown key");
        assert!(unknown.message.contains("colour"), "{unknown}");
    }

    #[test]
    fn auth_mistakes_name_their_key_too() {
        let with_permissions = GOOD.replace(
            "rewrite = { replace",
            "permissions = [\"orders:read\"]\n        rewrite = { replace",
        );
        let error = GatewayConfig::parse(&with_permissions).expect_err("no [auth]");
        assert_eq!(error.key, "routes[0].permissions");
        let short = format!(
            "{with_permissions}\n[auth]\nkeys = [{{ algorithm = \"HS256\", secret = \"short\" }}]\n"
        );
        let error = GatewayConfig::parse(&short).expect_err("short secret");
        assert_eq!(error.key, "auth.keys[0].secret", "{error}");
        let none = short.replace("HS256", "none");
        let error = GatewayConfig::parse(&none).expect_err("alg none");
        assert_eq!(error.key, "auth.keys[0].algorithm", "{error}");
    }

    #[test]
    fn endpoint_urls_are_plain_http_with_a_port() {
        assert_eq!(
            parse_url("http://127.0.0.1:9001/base/"),
            Some(("127.0.0.1:9001".into(), "/base".into()))
        );
        assert_eq!(
            parse_url("http://host:80"),
            Some(("host:80".into(), String::new()))
        );
        for bad in [
            "http://host",
            "http://:80",
            "https://h:1",
            "http://h:0",
            "http://h:1/a?b",
        ] {
            assert_eq!(parse_url(bad), None, "{bad}");
        }
    }
}
