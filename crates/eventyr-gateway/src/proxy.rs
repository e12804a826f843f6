//! The proxy: a request's route, cluster and endpoint, the request on its way upstream
//! (path rewritten, hop-by-hop headers dropped, `X-Request-ID`, `X-Forwarded-For`,
//! `-Proto`, `-Host` and a W3C `traceparent` for the gateway's hop), the answer on its
//! way back, bodies streamed both ways. (Upgrades — WebSocket — are not passed through
//! yet.)
//!
//! A request whose connection to the endpoint fails is sent once more to another
//! endpoint of the cluster — when it can be: without a body, or with a small one
//! (≤ 64 KiB, buffered for the purpose); a larger body streams and is not retried.
//! Errors are the JSON error body: 404 `no_route`, 503 `no_healthy_upstream`, 502
//! `bad_gateway`, 504 `upstream_timeout`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eventyr_telemetry::names;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::auth::{Authenticated, Authenticator};
use crate::balance::Balancer;
use crate::cache::ResponseCache;
use crate::config::RetryOn;
use crate::config::{BalanceKind, GatewayConfig, HealthConfig, LimitsConfig, parse_url};
use crate::gateway::Gateway;
use crate::long_lived::{StreamEnds, tunnel, websocket_upgrade};
use crate::ratelimit::{Cidr, Rule};
use crate::resilience::{Breaker, BreakerState, RetryBudget};
use crate::route::RouteTable;
use crate::session::Sessions;
use crate::shared::SharedRedis;
use crate::stack::{BodyLimit, ClientAddr, Deadline, Routed};

/// Why a body stopped: the network, or a limit.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body of everything the gateway sends and answers.
pub type Body = BoxBody<Bytes, BodyError>;

/// Bodies up to this size are buffered so that a failed connection can be retried.
const RETRY_BODY_MAX: u64 = 64 * 1024;

/// Headers that concern one connection only (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A cluster: its balancer, each endpoint's authority and base path, and what its
/// hashing balancer hashes.
struct Cluster {
    balancer: Balancer,
    endpoints: Vec<(String, String)>,
    hash_header: Option<HeaderName>,
    hash_client_ip: bool,
    health: Option<HealthConfig>,
    breaker: Breaker,
    bulkhead: Arc<tokio::sync::Semaphore>,
    budget: RetryBudget,
    /// h2c to the endpoints.
    http2: bool,
    name: String,
    /// As configured: a reload that leaves it unchanged keeps the cluster's state.
    config: crate::config::ClusterConfig,
    /// `http_client_request_duration_seconds` by status.
    durations: crate::handles::Handles<&'static str, metrics::Histogram>,
}

impl Cluster {
    fn new(c: &crate::config::ClusterConfig) -> Self {
        let endpoints: Vec<(String, String)> = c
            .endpoints
            .iter()
            .filter_map(|e| parse_url(&e.url))
            .collect();
        let weighted: Vec<(String, u32)> = c
            .endpoints
            .iter()
            .zip(&endpoints)
            .map(|(e, (authority, _))| (authority.clone(), e.weight))
            .collect();
        Self {
            balancer: Balancer::new(c.balance, &weighted).with_outlier(c.outlier.clone()),
            health: c.health.clone(),
            breaker: Breaker::named(c.circuit_breaker.clone(), &c.name),
            bulkhead: Arc::new(tokio::sync::Semaphore::new(c.max_concurrent as usize)),
            budget: RetryBudget::new(c.retry_budget.clone()),
            endpoints,
            hash_header: c
                .hash_header
                .as_deref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            hash_client_ip: c.balance == BalanceKind::HashClientIp,
            http2: c.protocol == crate::config::Protocol::Http2,
            name: c.name.clone(),
            durations: crate::handles::Handles::default(),
            config: c.clone(),
        }
    }

    /// Records an endpoint's answer for outlier ejection (counting ejections).
    fn report(&self, i: usize, ok: bool) {
        if self.balancer.report(i, ok).is_some() {
            metrics::counter!(names::GATEWAY_EJECTIONS_TOTAL, names::LABEL_CLUSTER => self.name.clone())
                .increment(1);
        }
    }

    /// Records how long one attempt took and how it ended.
    fn observe(&self, started: std::time::Instant, status: &'static str) {
        self.durations
            .get(status, |status| {
                metrics::histogram!(
                    names::HTTP_CLIENT_REQUEST_DURATION_SECONDS,
                    names::LABEL_CLUSTER => self.name.clone(),
                    names::LABEL_STATUS => *status
                )
            })
            .record(started.elapsed().as_secs_f64());
    }

    /// Counts a retry for `reason`.
    fn retried(&self, reason: &'static str) {
        metrics::counter!(
            names::GATEWAY_RETRIES_TOTAL,
            names::LABEL_CLUSTER => self.name.clone(),
            names::LABEL_REASON => reason
        )
        .increment(1);
    }
}

/// An endpoint the active health checks watch.
#[derive(Debug, Clone)]
pub struct HealthTarget {
    pub cluster: String,
    pub endpoint: usize,
    /// `http://host:port/base/path`.
    pub url: String,
    pub config: HealthConfig,
    /// The endpoint speaks h2c.
    pub http2: bool,
}

/// The running proxy of one configuration.
pub struct Proxy {
    table: RouteTable,
    cache: ResponseCache,
    /// Rate-limit rules, highest priority first.
    rules: Vec<Arc<Rule>>,
    trusted: Vec<Cidr>,
    authenticator: Option<Authenticator>,
    sessions: Option<Sessions>,
    redis: Option<SharedRedis>,
    limits: LimitsConfig,
    /// `internal_credential`, for every upstream request.
    credential: Option<HeaderValue>,
    /// Open WebSocket tunnels (`limits.max_tunnels`).
    tunnels: Arc<tokio::sync::Semaphore>,
    /// Rings when the gateway stops: the tunnels end.
    closing: tokio::sync::watch::Sender<bool>,
    /// Refused credentials per client address (`limits.refused_credentials_max`).
    refused_credentials: Arc<crate::lockout::FailureLimit>,
    clusters: HashMap<String, Arc<Cluster>>,
    client: Client<HttpConnector, Body>,
    /// For clusters with `protocol = "http2"`.
    h2_client: Client<HttpConnector, Body>,
    rate_limit_max_keys: usize,
    /// The gateway's own request metrics.
    pub(crate) served: Served,
}

/// The upstream clients: HTTP/1.1 keep-alive, and h2c.
fn clients() -> (Client<HttpConnector, Body>, Client<HttpConnector, Body>) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector.clone());
    let h2_client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .http2_only(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .http2_keep_alive_interval(Duration::from_secs(30))
        .build(connector);
    (client, h2_client)
}

/// Handles of the server-side request metrics.
#[derive(Debug, Default)]
pub(crate) struct Served {
    pub active: std::sync::OnceLock<metrics::Gauge>,
    /// `http_server_request_duration_seconds` by (route, method, status).
    pub durations:
        crate::handles::Handles<(Arc<str>, &'static str, &'static str), metrics::Histogram>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("routes", &self.table.order())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// The proxy of a checked configuration (`GatewayConfig::check`). Errors: the
    /// session store cannot be opened.
    pub fn new(config: &GatewayConfig) -> Result<Self, String> {
        Self::build(config, None)
    }

    /// The proxy of a reloaded configuration: clusters and rate-limit rules whose
    /// configuration did not change keep their state (endpoint health, ejections,
    /// breaker, retry budget, bulkhead; counters), and the upstream connection pools
    /// stay warm.
    pub fn reloaded(config: &GatewayConfig, previous: &Proxy) -> Result<Self, String> {
        Self::build(config, Some(previous))
    }

    fn build(config: &GatewayConfig, previous: Option<&Proxy>) -> Result<Self, String> {
        let clusters = config
            .clusters
            .iter()
            .map(|c| {
                let kept = previous
                    .and_then(|p| p.clusters.get(&c.name))
                    .filter(|old| old.config == *c)
                    .map(Arc::clone);
                (
                    c.name.clone(),
                    kept.unwrap_or_else(|| Arc::new(Cluster::new(c))),
                )
            })
            .collect();
        let (client, h2_client) = match previous {
            Some(previous) => (previous.client.clone(), previous.h2_client.clone()),
            None => clients(),
        };
        let mut rules: Vec<Arc<Rule>> = config
            .rate_limit_rules()
            .into_iter()
            .map(|r| {
                let kept = previous
                    .and_then(|p| p.rules.iter().find(|old| old.config == r))
                    .filter(|_| {
                        previous
                            .is_some_and(|p| p.rate_limit_max_keys == config.rate_limit_max_keys)
                    })
                    .map(Arc::clone);
                kept.unwrap_or_else(|| Arc::new(Rule::new(r, config.rate_limit_max_keys)))
            })
            .collect();
        rules.sort_by_key(|r| std::cmp::Reverse(r.config.priority));
        let redis = config
            .redis
            .as_ref()
            .map(SharedRedis::new)
            .transpose()
            .map_err(|e| format!("redis.url: {e}"))?;
        let sessions = match &config.sessions {
            Some(sessions) => Some(Sessions::new(
                sessions,
                config.auth.as_ref().and_then(|a| a.issuer.as_deref()),
                config.auth.as_ref().and_then(|a| a.audience.as_deref()),
                redis.as_ref(),
            )?),
            None => None,
        };
        Ok(Self {
            table: RouteTable::new(config),
            cache: ResponseCache::new(config.cache_max_bytes),
            rules,
            trusted: config
                .trusted_proxies
                .iter()
                .filter_map(|c| Cidr::parse(c))
                .collect(),
            // `check` has built it once already: the keys are valid.
            authenticator: config
                .auth
                .as_ref()
                .and_then(|a| Authenticator::new(a, config.sessions.as_ref()).ok()),
            sessions,
            redis,
            tunnels: Arc::new(tokio::sync::Semaphore::new(config.limits.max_tunnels)),
            closing: tokio::sync::watch::Sender::new(false),
            refused_credentials: previous
                .filter(|p| {
                    p.limits.refused_credentials_max == config.limits.refused_credentials_max
                })
                .map_or_else(
                    || {
                        Arc::new(crate::lockout::FailureLimit::local(
                            "refused-credentials",
                            config.limits.refused_credentials_max,
                            Duration::from_secs(60),
                        ))
                    },
                    |p| Arc::clone(&p.refused_credentials),
                ),
            credential: config
                .internal_credential
                .as_deref()
                .and_then(|c| HeaderValue::from_str(c).ok()),
            limits: config.limits.clone(),
            clusters,
            client,
            h2_client,
            rate_limit_max_keys: config.rate_limit_max_keys,
            served: Served::default(),
        })
    }

    /// The endpoints with active health checks.
    pub fn health_targets(&self) -> Vec<HealthTarget> {
        let mut targets = Vec::new();
        for (name, cluster) in &self.clusters {
            let Some(config) = &cluster.health else {
                continue;
            };
            for (i, (authority, base)) in cluster.endpoints.iter().enumerate() {
                targets.push(HealthTarget {
                    cluster: name.clone(),
                    endpoint: i,
                    url: format!("http://{authority}{base}{}", config.path),
                    config: config.clone(),
                    http2: cluster.http2,
                });
            }
        }
        targets
    }

    /// Sets an endpoint's health (the active checks' verdict).
    pub fn set_healthy(&self, cluster: &str, endpoint: usize, healthy: bool) {
        if let Some(found) = self.clusters.get(cluster) {
            found.balancer.set_healthy(endpoint, healthy);
            if let Some((authority, _)) = found.endpoints.get(endpoint) {
                metrics::gauge!(
                    names::GATEWAY_ENDPOINT_HEALTHY,
                    names::LABEL_CLUSTER => cluster.to_owned(),
                    names::LABEL_ENDPOINT => authority.clone()
                )
                .set(if healthy { 1.0 } else { 0.0 });
            }
        }
    }

    /// The clusters' names, sorted.
    pub fn cluster_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.clusters.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Where a cluster's circuit breaker stands.
    pub fn breaker_state(&self, cluster: &str) -> Option<BreakerState> {
        self.clusters.get(cluster).map(|c| c.breaker.state())
    }

    /// The balancer of a cluster (state for the admin API and tests).
    pub fn balancer(&self, cluster: &str) -> Option<&Balancer> {
        self.clusters.get(cluster).map(|c| &c.balancer)
    }

    /// The HTTP/1.1 client (JWKS fetches use it too).
    pub fn client(&self) -> &Client<HttpConnector, Body> {
        &self.client
    }

    /// The client for endpoints that speak h2c (`http2`) or HTTP/1.1.
    pub fn client_for(&self, http2: bool) -> &Client<HttpConnector, Body> {
        if http2 { &self.h2_client } else { &self.client }
    }

    /// An aggregation route: every call at once, each within its timeout and all
    /// within the route's; one JSON document with each answer under its name, null
    /// for a call that failed (its reason under `errors`).
    async fn aggregate(&self, routed: &Routed, headers: HeaderMap) -> Response<Body> {
        let calls = routed.route.aggregate.iter().map(|call| {
            let headers = headers.clone();
            async move {
                let outcome = self.call(call, &routed.params, headers).await;
                (call.name.clone(), outcome)
            }
        });
        let all = futures::future::join_all(calls);
        let results = match tokio::time::timeout(routed.route.timeout, all).await {
            Ok(results) => results,
            Err(_) => routed
                .route
                .aggregate
                .iter()
                .map(|c| {
                    let timed_out = Failed::Other("the aggregation timed out".to_owned());
                    (c.name.clone(), Err(timed_out))
                })
                .collect(),
        };
        // A required part refused: that answer, not a document around it.
        for (call, (_, outcome)) in routed.route.aggregate.iter().zip(&results) {
            if let (true, Err(Failed::Refused(status, body))) = (call.required, outcome) {
                let mut response =
                    Response::new(Full::new(body.clone()).map_err(|e| match e {}).boxed());
                *response.status_mut() = *status;
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                return response;
            }
        }
        let mut document = serde_json::Map::new();
        let mut errors = serde_json::Map::new();
        for (name, outcome) in results {
            match outcome.map_err(|failed| failed.to_string()) {
                Ok(value) => {
                    document.insert(name, value);
                }
                Err(reason) => {
                    document.insert(name.clone(), serde_json::Value::Null);
                    errors.insert(name, serde_json::Value::String(reason));
                }
            }
        }
        if !errors.is_empty() {
            document.insert("errors".to_owned(), serde_json::Value::Object(errors));
        }
        let body = serde_json::Value::Object(document).to_string();
        let mut response =
            Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }

    /// One call of an aggregation: its answer as JSON, or why not.
    async fn call(
        &self,
        call: &crate::config::AggregateCall,
        params: &[(String, String)],
        headers: HeaderMap,
    ) -> Result<serde_json::Value, Failed> {
        let cluster = self
            .clusters
            .get(&call.cluster)
            .ok_or_else(|| format!("no cluster {}", call.cluster))?;
        let i = cluster
            .balancer
            .pick(None, &[])
            .ok_or("no healthy endpoint")?;
        let (authority, base) = &cluster.endpoints[i];
        let path = crate::route::fill(&call.path, params);
        let uri: Uri = format!("http://{authority}{base}{path}")
            .parse()
            .map_err(|e| format!("{e}"))?;
        let mut request = Request::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
        *request.uri_mut() = uri;
        if cluster.http2 {
            *request.version_mut() = http::Version::HTTP_2;
        }
        *request.headers_mut() = headers;
        request.headers_mut().remove(header::CONTENT_LENGTH);
        let timeout = call.timeout.unwrap_or(Duration::from_secs(1));
        let in_flight = cluster.balancer.start(i);
        let client = self.client_for(cluster.http2);
        let response = match tokio::time::timeout(timeout, client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                cluster.report(i, false);
                return Err(e.to_string().into());
            }
            Err(_) => {
                cluster.report(i, false);
                return Err(format!("no answer within {timeout:?}").into());
            }
        };
        if let Some(in_flight) = in_flight {
            in_flight.finish();
        }
        let status = response.status();
        cluster.report(i, !status.is_server_error());
        let body = tokio::time::timeout(timeout, response.into_body().collect())
            .await
            .map_err(|_| format!("the answer did not finish within {timeout:?}"))?
            .map_err(|e| e.to_string())?
            .to_bytes();
        if status.is_client_error() {
            return Err(Failed::Refused(status, body));
        }
        if !status.is_success() {
            return Err(Failed::Other(format!("status {}", status.as_u16())));
        }
        Ok(serde_json::from_slice(&body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
        }))
    }

    /// Who the request is from, for the upstream: the identity headers of the caller
    /// the authentication layer found (none for an anonymous one) and the internal
    /// credential — never a client's own (dropped here whatever came before, also
    /// when a client named them in `Connection`).
    fn identify(&self, headers: &mut HeaderMap, identity: Option<&crate::auth::Identity>) {
        use eventyr_telemetry::identity as names;
        for name in names::HEADERS {
            headers.remove(name);
        }
        if let Some(credential) = &self.credential {
            headers.insert(names::X_EVENTYR_CREDENTIAL, credential.clone());
        }
        match identity {
            Some(identity) => {
                for (name, value) in &identity.forwarded {
                    headers.insert(*name, value.clone());
                }
            }
            // A public route's request is nobody's: never the system's own rights.
            None => {
                headers.insert(names::X_EVENTYR_ANONYMOUS, HeaderValue::from_static("1"));
            }
        }
    }

    /// The response cache.
    pub fn cache(&self) -> &ResponseCache {
        &self.cache
    }

    /// The rate-limit rules, highest priority first.
    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    /// Proxies whose `X-Forwarded-For` is believed.
    pub fn trusted_proxies(&self) -> &[Cidr] {
        &self.trusted
    }

    /// The verifier of tokens and API keys, when the configuration has `[auth]`.
    pub fn authenticator(&self) -> Option<&Authenticator> {
        self.authenticator.as_ref()
    }

    /// Ends every WebSocket tunnel (the gateway stops).
    pub fn close_tunnels(&self) {
        self.closing.send_replace(true);
    }

    /// Refused credentials per client address.
    pub fn refused_credentials(&self) -> &crate::lockout::FailureLimit {
        &self.refused_credentials
    }

    /// What clients may send (the server and the body-limit layer apply it).
    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    /// The session service, with `[sessions]`.
    pub fn sessions(&self) -> Option<&Sessions> {
        self.sessions.as_ref()
    }

    /// The shared Redis, with `[redis]`.
    pub fn redis(&self) -> Option<&SharedRedis> {
        self.redis.as_ref()
    }

    /// The route table (the route layer uses it).
    pub fn routes(&self) -> &RouteTable {
        &self.table
    }

    /// Proxies a request the route layer has routed ([`Routed`]), from the client in
    /// its [`ClientAddr`], with the id the request-id layer gave it.
    pub async fn forward(&self, request: Request<Incoming>) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        let Some(routed) = parts.extensions.remove::<Routed>() else {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the request reached the proxy without a route",
            );
        };
        let client = parts
            .extensions
            .get::<ClientAddr>()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.0);
        // What the client called: its Host, else (HTTP/2) the URI's authority.
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        if let Some(builtin) = routed.route.builtin {
            return match &self.sessions {
                Some(sessions) => {
                    let identity = parts.extensions.get::<Authenticated>().map(|a| &*a.0);
                    crate::session::endpoint(sessions, builtin, identity, body, client.ip()).await
                }
                None => error(StatusCode::NOT_FOUND, "no_route", "no sessions here"),
            };
        }
        let identity = parts
            .extensions
            .get::<Authenticated>()
            .map(|a| Arc::clone(&a.0));
        if !routed.route.aggregate.is_empty() {
            let traceparent = parts.extensions.get::<Traceparent>().map(|t| t.0.clone());
            let mut headers = upstream_headers(parts.headers.clone(), host, client, traceparent);
            self.identify(&mut headers, identity.as_deref());
            return self.aggregate(&routed, headers).await;
        }
        let Some(cluster) = self.clusters.get(&*routed.cluster) else {
            return error(StatusCode::BAD_GATEWAY, "bad_gateway", "no such cluster");
        };
        let shed = |reason: &'static str, message: &str| {
            metrics::counter!(
                names::GATEWAY_SHED_TOTAL,
                names::LABEL_CLUSTER => routed.cluster.clone(),
                names::LABEL_REASON => reason
            )
            .increment(1);
            error(StatusCode::SERVICE_UNAVAILABLE, reason, message)
        };
        let deadline = parts.extensions.get::<Deadline>().map(|d| d.0);
        let Some(admitted) = cluster
            .breaker
            .admit()
            .map(|a| Pending::new(&cluster.breaker, a))
        else {
            return shed(
                "circuit_open",
                "the cluster's circuit breaker is open: its upstreams keep failing",
            );
        };
        let Ok(_permit) = Arc::clone(&cluster.bulkhead).try_acquire_owned() else {
            return shed(
                "overloaded",
                "the cluster has as many requests under way as it takes",
            );
        };
        let response = async {
            let upstream_path = routed.upstream_path.clone();
            let key = if cluster.hash_client_ip {
                Some(client.ip().to_string())
            } else {
                cluster
                    .hash_header
                    .as_ref()
                    .and_then(|h| parts.headers.get(h))
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let path_and_query = match parts.uri.query() {
                Some(query) => format!("{upstream_path}?{query}"),
                None => upstream_path,
            };
            // A WebSocket handshake keeps its Upgrade (hop-by-hop, so put back); the
            // client's end of the connection is taken over once the upstream agrees.
            let websocket = websocket_upgrade(&parts.headers);
            // Known from Content-Length, or an HTTP/2 request that ended with its
            // headers; an undeclared length (chunked, HTTP/2 DATA frames) is None.
            let length = hyper::body::Body::size_hint(&body).exact();
            let traceparent = parts.extensions.get::<Traceparent>().map(|t| t.0.clone());
            let mut headers = upstream_headers(
                std::mem::take(&mut parts.headers),
                host,
                client,
                traceparent,
            );
            self.identify(&mut headers, identity.as_deref());
            let client_upgrade = match &websocket {
                Some(protocol) => {
                    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    headers.insert(header::UPGRADE, protocol.clone());
                    parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
                }
                None => None,
            };
            let mut client_upgrade = client_upgrade;

            // A small body is kept, so that a failed connection can be tried elsewhere.
            let retryable = length.is_some_and(|n| n <= RETRY_BODY_MAX);
            let mut streamed = Some(body);
            let buffered = if retryable {
                match streamed.take().map(BodyExt::collect) {
                    Some(collect) => match collect.await {
                        Ok(collected) => Some(collected.to_bytes()),
                        Err(e) => {
                            return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string());
                        }
                    },
                    None => None,
                }
            } else {
                None
            };

            cluster.budget.deposit();
            let policy = &routed.route.retries;
            let per_try = policy.per_try_timeout.unwrap_or(routed.route.timeout);
            let idempotent = matches!(
                parts.method.as_str(),
                "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
            );
            // A retry of a request the upstream may have acted on: idempotent methods,
            // the route's conditions and attempts, the cluster's budget.
            let may_retry = |attempt: u32, on: RetryOn| {
                let wanted = retryable
                    && idempotent
                    && attempt < policy.attempts
                    && policy.on.contains(&on);
                if !wanted {
                    return false;
                }
                if !cluster.budget.withdraw() {
                    metrics::counter!(
                        names::GATEWAY_RETRY_BUDGET_EXHAUSTED_TOTAL,
                        names::LABEL_CLUSTER => cluster.name.clone()
                    )
                    .increment(1);
                    return false;
                }
                cluster.retried(match on {
                    RetryOn::ConnectFailure => "connect_failure",
                    RetryOn::GatewayError => "gateway_error",
                    RetryOn::ServerError => "5xx",
                    RetryOn::Timeout => "timeout",
                });
                true
            };
            let mut tried = Vec::new();
            let mut attempt = 0;
            loop {
                attempt += 1;
                let picked = cluster
                    .balancer
                    .pick(key.as_deref(), &tried)
                    .or_else(|| (!tried.is_empty()).then(|| cluster.balancer.pick(key.as_deref(), &[])).flatten());
                let Some(i) = picked else {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no_healthy_upstream",
                        "no healthy endpoint in the cluster",
                    );
                };
                tried.push(i);
                if attempt > 1 {
                    // 25 ms × 2ⁿ, at most 250 ms, with jitter.
                    let base = 25u64 << (attempt - 2).min(4);
                    let delay = base.min(250) / 2 + fastrand::u64(..=base.min(250) / 2);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                let (authority, base) = &cluster.endpoints[i];
                let uri: Uri = match format!("http://{authority}{base}{path_and_query}").parse() {
                    Ok(uri) => uri,
                    Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
                };
                let body: Body = match (&buffered, streamed.take()) {
                    (Some(bytes), _) => Full::new(bytes.clone()).map_err(|e| match e {}).boxed(),
                    (None, Some(body)) => {
                        // Streamed: cut off at the limit (the upstream sees the error).
                        let max = parts
                            .extensions
                            .get::<BodyLimit>()
                            .map_or(self.limits.max_body_bytes, |l| l.0);
                        http_body_util::Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
                            .boxed()
                    }
                    (None, None) => Full::new(Bytes::new()).map_err(|e| match e {}).boxed(),
                };
                let mut upstream = Request::new(body);
                *upstream.method_mut() = parts.method.clone();
                *upstream.uri_mut() = uri;
                *upstream.headers_mut() = headers.clone();
                if cluster.http2 {
                    *upstream.version_mut() = http::Version::HTTP_2;
                }
                let in_flight = cluster.balancer.start(i);
                let sent = std::time::Instant::now();
                let try_until = tokio::time::Instant::now() + per_try;
                let answer = tokio::time::timeout_at(
                    deadline.map_or(try_until, |d| d.min(try_until)),
                    self.client_for(cluster.http2).request(upstream),
                )
                .await;
                cluster.observe(
                    sent,
                    match &answer {
                        Ok(Ok(response)) => crate::stack::status_label(response.status()),
                        Ok(Err(_)) => "error",
                        Err(_) => "timeout",
                    },
                );
                if !matches!(answer, Ok(Ok(_))) {
                    // No answer (no connection, a timeout): a failure for outlier ejection.
                    cluster.report(i, false);
                }
                match answer {
                    Ok(Ok(response)) => {
                        if let Some(in_flight) = in_flight {
                            in_flight.finish();
                        }
                        let status = response.status();
                        cluster.report(i, !status.is_server_error());
                        let gateway_error = matches!(status.as_u16(), 502..=504);
                        let again = status.is_server_error()
                            && (may_retry(attempt, RetryOn::ServerError)
                                || gateway_error && may_retry(attempt, RetryOn::GatewayError));
                        if again {
                            tracing::debug!(endpoint = %authority, %status, attempt, "retrying");
                            continue;
                        }
                        if status == StatusCode::SWITCHING_PROTOCOLS
                            && let (Some(protocol), Some(client_side)) =
                                (&websocket, client_upgrade.take())
                        {
                            let Ok(permit) = Arc::clone(&self.tunnels).try_acquire_owned() else {
                                return error(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "overloaded",
                                    "the gateway has as many WebSocket tunnels open as it takes",
                                );
                            };
                            return tunnel(
                                response,
                                client_side,
                                protocol.clone(),
                                permit,
                                self.closing.subscribe(),
                            );
                        }
                        let (mut parts, body) = response.into_parts();
                        strip_hop_by_hop(&mut parts.headers);
                        parts.version = http::Version::HTTP_11;
                        let streams = parts
                            .headers
                            .get(header::CONTENT_TYPE)
                            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
                        if !streams {
                            return Response::from_parts(parts, body.map_err(BodyError::from).boxed());
                        }
                        // An event stream flows on: bounded like a tunnel, and ended
                        // with the gateway and with its caller's credential.
                        let Ok(permit) = Arc::clone(&self.tunnels).try_acquire_owned() else {
                            return error(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "overloaded",
                                "the gateway has as many long-lived streams open as it takes",
                            );
                        };
                        let ends = StreamEnds {
                            permit,
                            closing: self.closing.subscribe(),
                            expires: identity.as_ref().and_then(|i| i.expires),
                            session: identity.as_ref().and_then(|i| i.session.clone()).and_then(
                                |sid| self.sessions.as_ref().map(|s| (s.store(), sid)),
                            ),
                        };
                        return Response::from_parts(parts, ends.stream(body));
                    }
                    Ok(Err(e)) if e.is_connect() => {
                        // Nothing reached the endpoint: another one may take it once,
                        // whatever the method; more under the route's policy.
                        let first = retryable && attempt == 1;
                        if first {
                            cluster.retried("connect_failure");
                        }
                        let again = first || may_retry(attempt, RetryOn::ConnectFailure);
                        if !again {
                            return error(StatusCode::BAD_GATEWAY, "bad_gateway", e.to_string());
                        }
                        tracing::debug!(endpoint = %authority, error = %e, "connect failed; trying another endpoint");
                    }
                    Ok(Err(e)) if over_limit(&e) => {
                        return error(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "payload_too_large",
                            format!("a request body is at most {} bytes", self.limits.max_body_bytes),
                        );
                    }
                    Ok(Err(e)) => {
                        return error(StatusCode::BAD_GATEWAY, "bad_gateway", e.to_string());
                    }
                    Err(_) if may_retry(attempt, RetryOn::Timeout) => {
                        tracing::debug!(endpoint = %authority, attempt, "no answer in time; retrying");
                    }
                    Err(_) => {
                        return error(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream_timeout",
                            format!("no answer within {per_try:?}"),
                        );
                    }
                }
            }
        }
        .await;
        admitted.finish(!response.status().is_server_error());
        response
    }
}

/// A request the breaker admitted, until its outcome is recorded; dropped before that
/// (the client went away, the request was cut off), it counts as a failure — so a
/// half-open breaker's probe is never lost.
struct Pending<'a> {
    breaker: &'a Breaker,
    admitted: Option<crate::resilience::Admitted>,
}

impl<'a> Pending<'a> {
    fn new(breaker: &'a Breaker, admitted: crate::resilience::Admitted) -> Self {
        Self {
            breaker,
            admitted: Some(admitted),
        }
    }

    fn finish(mut self, ok: bool) {
        if let Some(admitted) = self.admitted.take() {
            self.breaker.record(admitted, ok);
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(admitted) = self.admitted.take() {
            self.breaker.record(admitted, false);
        }
    }
}

/// Why a call of an aggregation has no part in the document.
#[derive(Debug)]
enum Failed {
    /// The upstream refused it (4xx), with its answer.
    Refused(StatusCode, Bytes),
    Other(String),
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(status, _) => write!(f, "status {}", status.as_u16()),
            Self::Other(reason) => f.write_str(reason),
        }
    }
}

impl From<String> for Failed {
    fn from(reason: String) -> Self {
        Self::Other(reason)
    }
}

impl From<&str> for Failed {
    fn from(reason: &str) -> Self {
        Self::Other(reason.to_owned())
    }
}

/// Whether a request failed because its streamed body passed the limit.
fn over_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none: one pass over their few names decides.
    if !headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(&name.as_str()))
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The `traceparent` of the gateway's span for a request (set by the request id
/// layer; the proxy hands it upstream).
#[derive(Debug, Clone)]
pub struct Traceparent(pub HeaderValue);

/// The headers upstream: the client's, less the hop-by-hop ones, plus the gateway's.
fn upstream_headers(
    mut headers: HeaderMap,
    host: Option<HeaderValue>,
    client: SocketAddr,
    traceparent: Option<HeaderValue>,
) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    let forwarded_for = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(chain) => HeaderValue::from_str(&format!("{chain}, {}", client.ip())).ok(),
        None => HeaderValue::from_str(&client.ip().to_string()).ok(),
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host);
    }
    // The request id layer has set X-Request-ID already: it goes on as it is. The
    // upstream continues the gateway's span (`traceparent`, from the request id layer);
    // without a tracer installed (the gateway as a library), a span id of the
    // gateway's own in the caller's trace.
    let traceparent = traceparent.or_else(|| {
        let parent = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        HeaderValue::from_str(&gateway_span(parent)).ok()
    });
    if let Some(value) = traceparent {
        headers.insert(TRACEPARENT, value);
    }
    headers
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// (trace id, flags) of a valid W3C traceparent (version 00).
pub(crate) fn parse_traceparent(value: &str) -> Option<([u8; 32], [u8; 2])> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = parts.next().is_none()
        && version == "00"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    if !valid {
        return None;
    }
    let mut trace_id = [0u8; 32];
    trace_id.copy_from_slice(trace.as_bytes());
    trace_id.make_ascii_lowercase();
    let mut flag_bytes = [0u8; 2];
    flag_bytes.copy_from_slice(flags.as_bytes());
    flag_bytes.make_ascii_lowercase();
    Some((trace_id, flag_bytes))
}

/// The traceparent of the gateway's own span: the caller's trace (or a new one,
/// sampled), a new span id.
pub(crate) fn gateway_span(parent: Option<([u8; 32], [u8; 2])>) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    match parent {
        Some((trace, flags)) => {
            out.push_str(std::str::from_utf8(&trace).unwrap_or("0"));
            let _ = write!(out, "-{:016x}-", fastrand::u64(1..));
            out.push_str(std::str::from_utf8(&flags).unwrap_or("01"));
        }
        None => {
            let _ = write!(
                out,
                "{:016x}{:016x}-{:016x}-01",
                fastrand::u64(..),
                fastrand::u64(1..),
                fastrand::u64(1..)
            );
        }
    }
    out
}

/// The JSON error body.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    let mut body = serde_json::json!({ "error": code, "message": message.into() });
    // The request's trace, as X-Trace-ID names it (the request id layer's span).
    if let Some(trace_id) = eventyr_telemetry::trace::current_trace_id() {
        body["trace_id"] = trace_id.into();
    }
    let body = body.to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Serves `proxy` on `listener` until `shutdown` completes, then lets the requests
/// under way finish (at most `grace`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    serve_gateway(listener, Gateway::fixed(proxy), shutdown, grace).await;
}

/// Serves a (reloadable) gateway: each request goes through the stack in force when
/// it arrives.
pub async fn serve_gateway(
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    // The limits in force at the start (a reload changes routes, not the server).
    let limits = gateway.proxy().limits().server();
    let stopping = Arc::clone(&gateway);
    let service = move |peer: SocketAddr| {
        let gateway = Arc::clone(&gateway);
        tower::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ClientAddr(peer));
            tower::ServiceExt::oneshot(gateway.stack(), request)
        })
    };
    let shutdown = async move {
        shutdown.await;
        stopping.proxy().close_tunnels();
    };
    crate::server::serve("gateway", listener, limits, service, shutdown, grace, None).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_continued_or_begun() {
        let parent = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let span = gateway_span(parent);
        assert!(
            span.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{span}"
        );
        assert!(!span.contains("00f067aa0ba902b7"), "a new span id");
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        let begun = gateway_span(None);
        assert!(parse_traceparent(&begun).is_some(), "{begun}");
    }

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }
}
