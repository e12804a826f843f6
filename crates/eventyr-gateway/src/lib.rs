//! The API gateway (issue 7, under way): the single entry point of the system, and a
//! product that runs on its own in front of any HTTP services.
//!
//! Built so far, pure and tested on their own:
//! - [`config`]: the gateway's configuration (routes, clusters), read from TOML and
//!   checked once, with the key of every mistake.
//! - [`route`]: the route table: a request's host, path (exact, prefix, template with
//!   parameters), method and headers pick a route by priority and specificity; its
//!   path is rewritten; a weighted split picks the upstream cluster.
//! - [`balance`]: the load balancers of a cluster: round robin, smooth weighted round
//!   robin, least outstanding requests, power of two choices on peak-EWMA latency, and
//!   Maglev consistent hashing on a header or the client address.
//!
//! - [`proxy`]: the proxy on hyper (HTTP/1.1 with keep-alive to clients and
//!   upstreams, bodies streamed): route, split, endpoint,
//!   forwarded headers, request id, a traceparent for the gateway's hop, one more
//!   endpoint after a failed connection; `serve` with graceful shutdown.
//!
//! - [`health`]: active health checks (interval, timeout, thresholds); with the
//!   balancers' passive outlier ejection (failures in a row eject an endpoint for a
//!   growing time).
//!
//! - [`resilience`]: a circuit breaker per cluster (error rate over a sliding window,
//!   minimum requests, open, half-open probes); the proxy also holds a bulkhead per
//!   cluster.
//! - [`stack`]: the middleware as tower layers in the order, in one place:
//!   request id, access log and metrics, route, timeout so far, around the proxy.
//!
//! Next: the other tower layers of the issue in one
//! visible order (request id → access log → CORS → authentication → authorization →
//! rate limit → cache → circuit breaker / retries / timeout → proxy), h2c, WebSocket
//! upgrades, the rest.

pub mod balance;
pub mod config;
pub mod health;
pub mod proxy;
pub mod resilience;
pub mod route;
pub mod stack;
