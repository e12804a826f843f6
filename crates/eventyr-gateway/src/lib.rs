//! The API gateway (issue 7, under way): the single entry point of the system, and a
//! product that runs on its own in front of any HTTP services.
//!
//! Built so far:
//! - [`config`]: the gateway's configuration (routes, clusters, limits), read from
//!   TOML and checked once, with the key of every mistake.
//! - [`route`]: the route table: a request's host, path (exact, prefix, template with
//!   parameters), method and headers pick a route by priority and specificity; its
//!   path is rewritten; a weighted split picks the upstream cluster.
//! - [`balance`]: the load balancers of a cluster (round robin, smooth weighted round
//!   robin, least outstanding requests, power of two choices on peak-EWMA latency,
//!   Maglev consistent hashing on a header or the client address) and passive outlier
//!   ejection.
//! - [`health`]: active health checks (interval, timeout, thresholds).
//! - [`resilience`]: a circuit breaker per cluster (error rate over a sliding window,
//!   minimum requests, open, half-open probes) and a retry budget; the proxy also
//!   holds a bulkhead per cluster.
//! - [`stack`]: the middleware as tower layers, in one place, in the order:
//!   request id → access log and metrics → body limit → route → CORS →
//!   authentication → authorization → rate limit → cache → timeout → proxy.
//! - [`proxy`]: the proxy on hyper (HTTP/1.1 with keep-alive and h2c to clients and
//!   upstreams, bodies streamed): endpoint, forwarded headers, request id, a
//!   traceparent for the gateway's hop, retries (one more endpoint after a failed
//!   connection; idempotent requests on configured conditions within the budget),
//!   breaker and bulkhead; aggregation routes (parallel calls, partial results);
//!   `serve` with header limits, a header-read timeout and
//!   graceful shutdown.
//!
//! - [`auth`], [`ratelimit`], [`cache`]: what those layers use. [`gateway`]: the
//!   configuration in force, hot-reloaded; [`admin`]: the admin API.
//! - [`session`]: logins, rotating refresh tokens with reuse detection, logout and
//!   server-side revocation; [`session_store`]: kept in SQLite or Redis; [`shared`]: the Redis that
//!   several gateways share (sessions, and rate-limit rules with `shared = true`).
//!
//! - [`jwks`]: identity providers' key sets kept fresh in the background.
//! - [`lockout`]: failure limits (failed logins per account, refused credentials per
//!   address).
//! - [`server`]: the HTTP server of every listener (the gateway's and the
//!   services'), with its connections bounded.

pub mod admin;
pub mod auth;
pub mod balance;
pub mod cache;
pub mod config;
pub mod gateway;
pub mod handles;
pub mod health;
pub mod jwks;
pub mod lockout;
mod long_lived;
pub mod proxy;
pub mod ratelimit;
pub mod resilience;
pub mod route;
pub mod server;
pub mod session;
pub mod session_store;
pub mod shared;
pub mod stack;
