//! The gateway's middleware, as tower layers, in one place ([`stack`]) and in the
//! issue's order: request id → access log and metrics → body limit → route → CORS →
//! authentication → authorization → rate limit → cache → timeout → proxy (which holds
//! the circuit breaker, bulkhead and retries of the cluster the route picked).
//!
//! Each layer is an async function of the request and the rest of the stack
//! ([`Next`]), wrapped by [`middleware`] into a tower `Layer`. The rest of the stack
//! is shared (an `Arc`), not cloned layer by layer per request, and always ready: the
//! gateway sheds load instead of queueing it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use eventyr_telemetry::{names, trace};
use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use tower::{Layer, Service, ServiceBuilder};

use crate::auth::Authenticated;
use crate::config::CorsConfig;
use crate::proxy::{Body, Proxy, Traceparent, error};
use crate::route::RequestHead;

/// A service of the stack (the whole of it, or the rest of it after a layer): cheap to
/// clone (one `Arc`) and always ready — the gateway sheds load (bulkheads, breakers,
/// rate limits) rather than queueing it, so no layer holds back in `poll_ready`. Each
/// layer costs one boxed future per request, no more.
#[derive(Clone)]
pub struct Stack(
    Arc<dyn Fn(Request<Incoming>) -> BoxFuture<'static, Response<Body>> + Send + Sync>,
);

impl Stack {
    /// The innermost service: an async function of the request.
    pub fn from_fn<F, Fut>(f: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        Self(Arc::new(move |request| Box::pin(f(request))))
    }
}

impl Service<Request<Incoming>> for Stack {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures::future::Map<
        BoxFuture<'static, Response<Body>>,
        fn(Response<Body>) -> Result<Response<Body>, Infallible>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        futures::FutureExt::map((self.0)(request), Ok)
    }
}

// Header names the layers use on every request, made once.
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static(trace::X_REQUEST_ID);
const X_USER_ID: http::HeaderName = http::HeaderName::from_static("x-user-id");
const X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");
const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

/// The client's address (set by the server on every request).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// A request's route, set by the route layer for the layers after it and the proxy.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The route as configured and compiled.
    pub route: Arc<crate::route::Route>,
    /// The cluster a split drew (or the route's one cluster).
    pub cluster: Arc<str>,
    /// The path to send upstream (rewritten, or the request's own).
    pub upstream_path: String,
    pub params: Vec<(String, String)>,
}

/// The route's name on the response (for the access log and metrics outside it).
#[derive(Debug, Clone)]
pub struct RouteName(pub Arc<str>);

/// The gateway: every layer, in order, around the proxy. A layer whose feature the
/// configuration does not use at all (no `[auth]`, no rate limits, no cached or CORS
/// route) is left out: it would only pass the request on.
pub fn stack(proxy: Arc<Proxy>) -> Stack {
    let uses = Uses::of(&proxy);
    let logging = Arc::clone(&proxy);
    let routing = Arc::clone(&proxy);
    let authenticating = Arc::clone(&proxy);
    let authorizing = Arc::clone(&proxy);
    let limiting = Arc::clone(&proxy);
    let caching = Arc::clone(&proxy);
    let forwarding = Arc::clone(&proxy);
    let max_body = proxy.limits().max_body_bytes;
    ServiceBuilder::new()
        .layer(middleware(request_id))
        .layer(middleware(move |request, next| {
            access_log(Arc::clone(&logging), request, next)
        }))
        .layer(middleware(move |request, next| {
            body_limit(max_body, request, next)
        }))
        .layer(middleware(move |request, next| {
            route(Arc::clone(&routing), request, next)
        }))
        .layer(option_layer(uses.cors, || middleware(cors)))
        // Always: without [auth] it still drops a client's own X-User-ID.
        .layer(middleware(move |request, next| {
            authentication(Arc::clone(&authenticating), request, next)
        }))
        .layer(option_layer(uses.authorize, || {
            middleware(move |request, next| authorization(Arc::clone(&authorizing), request, next))
        }))
        .layer(option_layer(uses.rate_limits, || {
            middleware(move |request, next| rate_limit(Arc::clone(&limiting), request, next))
        }))
        .layer(option_layer(uses.cache, || {
            middleware(move |request, next| cache(Arc::clone(&caching), request, next))
        }))
        // Circuit breaker and retries join the timeout here.
        .layer(middleware(timeout))
        .service(Stack::from_fn(move |request| {
            let proxy = Arc::clone(&forwarding);
            async move { proxy.forward(request).await }
        }))
}

/// Which optional layers a configuration needs.
struct Uses {
    cors: bool,
    /// Permissions need `[auth]`; without it no route has any.
    authorize: bool,
    rate_limits: bool,
    cache: bool,
}

impl Uses {
    fn of(proxy: &Proxy) -> Self {
        let routes = proxy.routes().routes();
        Self {
            cors: routes.iter().any(|r| r.cors.is_some()),
            authorize: proxy.authenticator().is_some(),
            rate_limits: !proxy.rules().is_empty(),
            cache: routes.iter().any(|r| r.cache.is_some()),
        }
    }
}

/// `layer()` when `used`, else a layer that adds nothing.
fn option_layer<L: Layer<Stack, Service = Stack>>(
    used: bool,
    layer: impl FnOnce() -> L,
) -> Optional<L> {
    Optional(used.then(layer))
}

/// A layer that may be absent.
pub struct Optional<L>(Option<L>);

impl<L: Layer<Stack, Service = Stack>> Layer<Stack> for Optional<L> {
    type Service = Stack;

    fn layer(&self, inner: Stack) -> Stack {
        match &self.0 {
            Some(layer) => layer.layer(inner),
            None => inner,
        }
    }
}

/// The rest of the stack, for a middleware function to call.
pub struct Next {
    inner: Stack,
}

impl Next {
    pub async fn run(self, request: Request<Incoming>) -> Response<Body> {
        (self.inner.0)(request).await
    }
}

/// A tower layer made of an async function `f(request, next)`: it wraps the rest of
/// the stack into a new [`Stack`].
pub fn middleware<F, Fut>(f: F) -> Middleware<F>
where
    F: Fn(Request<Incoming>, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    Middleware { f }
}

#[derive(Clone)]
pub struct Middleware<F> {
    f: F,
}

impl<F, Fut> Layer<Stack> for Middleware<F>
where
    F: Fn(Request<Incoming>, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    type Service = Stack;

    fn layer(&self, inner: Stack) -> Stack {
        let f = self.f.clone();
        Stack(Arc::new(move |request| {
            Box::pin(f(
                request,
                Next {
                    inner: inner.clone(),
                },
            ))
        }))
    }
}

/// Keeps the client's `X-Request-ID` if it is sane (1 to 200 visible characters),
/// else gives the request a new one (UUIDv7), and runs the request in the gateway's
/// server span, which continues the client's `traceparent` (the proxy hands the span
/// on upstream). The answer carries `X-Request-ID` and `X-Trace-ID`. When no span is
/// recorded (no exporter), the hop gets a span id of its own without a span: a span
/// costs about a third of the gateway's throughput.
async fn request_id(mut request: Request<Incoming>, next: Next) -> Response<Body> {
    use tracing::Instrument as _;
    let sane = request
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .is_some_and(trace::valid_request_id);
    if !sane {
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut text);
        if let Ok(value) = HeaderValue::from_str(id) {
            request.headers_mut().insert(X_REQUEST_ID, value);
        }
    }
    let id = request.headers().get(X_REQUEST_ID).cloned();
    if !trace::recording() {
        // No span is recorded: the gateway's hop gets ids of its own, without the cost
        // of a span; log lines and error bodies find them in the request's task.
        let parent = trace::extract(request.headers()).and_then(crate::proxy::parse_traceparent);
        let traceparent = crate::proxy::gateway_span(parent);
        if let Ok(value) = HeaderValue::from_str(&traceparent) {
            request.extensions_mut().insert(Traceparent(value));
        }
        let hop = trace::Hop {
            traceparent,
            request_id: id.as_ref().and_then(|v| v.to_str().ok()).map(str::to_owned),
        };
        let trace_id = hop
            .traceparent
            .get(3..35)
            .and_then(|t| HeaderValue::from_str(t).ok());
        let mut response = trace::in_hop(hop, next.run(request)).await;
        let headers = response.headers_mut();
        if let Some(id) = id {
            headers.insert(X_REQUEST_ID, id);
        }
        if let Some(trace_id) = trace_id {
            headers.insert(trace::X_TRACE_ID, trace_id);
        }
        return response;
    }
    // The route is known once routed: the span is named by the method until then.
    let method = method_label(request.method());
    let span = trace::server(
        "gateway",
        method,
        "",
        trace::extract(request.headers()),
        id.as_ref().and_then(|v| v.to_str().ok()),
    );
    // The span's context, made once: upstream (the proxy) and on the answer.
    let traceparent = trace::traceparent_of(&span);
    if let Some(value) = traceparent
        .as_deref()
        .and_then(|t| HeaderValue::from_str(t).ok())
    {
        request.extensions_mut().insert(Traceparent(value));
    }
    let mut response = next.run(request).instrument(span.clone()).await;
    if let Some(route) = response.extensions().get::<RouteName>() {
        trace::record_route(&span, method, &route.0);
    }
    trace::record_status(&span, response.status().as_u16());
    let headers = response.headers_mut();
    if let Some(id) = id {
        headers.insert(X_REQUEST_ID, id);
    }
    // `00-<trace id>-<span id>-<flags>`.
    if let Some(value) = traceparent
        .as_deref()
        .and_then(|t| t.get(3..35))
        .and_then(|t| HeaderValue::from_str(t).ok())
    {
        headers.insert(trace::X_TRACE_ID, value);
    }
    response
}

/// One access-log line per request (target `eventyr_gateway::access`) and the request
/// metrics, around everything else.
async fn access_log(proxy: Arc<Proxy>, request: Request<Incoming>, next: Next) -> Response<Body> {
    let started = Instant::now();
    let method = method_label(request.method());
    // What only the log line needs is copied only when the line is written.
    let logged =
        tracing::enabled!(target: "eventyr_gateway::access", tracing::Level::INFO).then(|| {
            let id = request
                .headers()
                .get(X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .unwrap_or_default();
            let client = request.extensions().get::<ClientAddr>().map(|c| c.0);
            (id, client, request.uri().path().to_owned())
        });
    let served = &proxy.served;
    let active = served
        .active
        .get_or_init(|| metrics::gauge!(names::HTTP_SERVER_ACTIVE_REQUESTS))
        .clone();
    active.increment(1.0);
    let response = next.run(request).await;
    active.decrement(1.0);
    let elapsed = started.elapsed();
    let route = response
        .extensions()
        .get::<RouteName>()
        .map_or_else(|| Arc::from("none"), |r| Arc::clone(&r.0));
    let status = response.status();
    served
        .durations
        .get(
            (Arc::clone(&route), method, status_label(status)),
            |(route, method, status)| {
                metrics::histogram!(
                    names::HTTP_SERVER_REQUEST_DURATION_SECONDS,
                    names::LABEL_METHOD => *method,
                    names::LABEL_ROUTE => route.to_string(),
                    names::LABEL_STATUS => *status
                )
            },
        )
        .record(elapsed.as_secs_f64());
    if let Some((id, client, path)) = logged {
        tracing::info!(
            target: "eventyr_gateway::access",
            request_id = %id,
            client = ?client,
            method,
            path = %path,
            route = %route,
            status = status.as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
    response
}

/// A method as a label: the standard ones, else `_OTHER` (OpenTelemetry's rule), so
/// that clients cannot make up label values.
fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// A status code as a label (at most the 500 codes there are), without allocating.
pub fn status_label(status: StatusCode) -> &'static str {
    static CODES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let codes = CODES.get_or_init(|| (100..600).map(|c: u16| c.to_string()).collect());
    codes
        .get(usize::from(status.as_u16()).saturating_sub(100))
        .map_or("other", String::as_str)
}

/// A declared body above the limit is refused at once (413 `payload_too_large`); an
/// undeclared (chunked) one is cut off at the limit on its way upstream.
async fn body_limit(max: u64, request: Request<Incoming>, next: Next) -> Response<Body> {
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("a request body is at most {max} bytes"),
        );
    }
    let mut request = request;
    request.extensions_mut().insert(BodyLimit(max));
    next.run(request).await
}

/// The body limit, for the proxy to apply to a streamed body.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub u64);

/// Finds the request's route (404 `no_route` without one) and its cluster (a split's
/// draw), for every layer after it.
async fn route(proxy: Arc<Proxy>, mut request: Request<Incoming>, next: Next) -> Response<Body> {
    let routed = {
        let headers = request.headers();
        let host = headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri().authority().map(|a| a.as_str()));
        let lookup = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        // A CORS preflight is routed as the request it asks about.
        let method = match request.method() {
            &http::Method::OPTIONS => headers
                .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("OPTIONS"),
            other => other.as_str(),
        };
        let head = RequestHead {
            host,
            method,
            path: request.uri().path(),
            header: &lookup,
        };
        proxy.routes().find(&head).map(|m| Routed {
            cluster: Arc::clone(m.route.cluster(fastrand::f64())),
            route: Arc::clone(m.route),
            upstream_path: m.upstream_path,
            params: m.params,
        })
    };
    let Some(routed) = routed else {
        return error(
            StatusCode::NOT_FOUND,
            "no_route",
            format!("no route for {} {}", request.method(), request.uri().path()),
        );
    };
    let host = request
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    if !routed.route.allows_host(host) {
        crate::auth::security_event("host_not_allowed", host.unwrap_or("none"));
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected_request",
            "this route does not answer for that host name",
        );
    }
    let name = RouteName(Arc::clone(&routed.route.name));
    request.extensions_mut().insert(routed);
    let mut response = next.run(request).await;
    response.extensions_mut().insert(name);
    response
}

/// The route's CORS policy: a preflight (OPTIONS with `Origin` and
/// `Access-Control-Request-Method`) is answered here — 204 with the policy for an
/// allowed origin, 403 `cors_forbidden` otherwise; an actual request from an allowed
/// origin gets `Access-Control-Allow-Origin` (and credentials, exposed headers) on its
/// answer. `Vary: Origin` whenever the answer depends on it.
async fn cors(request: Request<Incoming>, next: Next) -> Response<Body> {
    let policy = request
        .extensions()
        .get::<Routed>()
        .and_then(|r| r.route.cors.clone());
    let origin = request
        .headers()
        .get(http::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (Some(policy), Some(origin)) = (policy, origin) else {
        return next.run(request).await;
    };
    let any = policy.allow_origins.iter().any(|o| o == "*");
    let allowed = any
        || policy
            .allow_origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(&origin));
    let preflight = request.method() == http::Method::OPTIONS
        && request
            .headers()
            .contains_key("access-control-request-method");
    if preflight {
        let asked = request
            .headers()
            .get("access-control-request-method")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !allowed || !policy.allow_methods.iter().any(|m| m == asked) {
            return error(
                StatusCode::FORBIDDEN,
                "cors_forbidden",
                format!("{origin} may not send {asked} here"),
            );
        }
        let empty = http_body_util::Empty::<bytes::Bytes>::new();
        let mut response = Response::new(http_body_util::BodyExt::boxed(
            http_body_util::BodyExt::map_err(empty, |e| match e {}),
        ));
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        allow_origin(headers, &policy, &origin, any);
        let mut set = |name: &'static str, value: String| {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        };
        set(
            "access-control-allow-methods",
            policy.allow_methods.join(", "),
        );
        set(
            "access-control-allow-headers",
            policy.allow_headers.join(", "),
        );
        set(
            "access-control-max-age",
            policy.max_age.as_secs().to_string(),
        );
        return response;
    }
    let mut response = next.run(request).await;
    if allowed {
        let headers = response.headers_mut();
        allow_origin(headers, &policy, &origin, any);
        if !policy.expose_headers.is_empty()
            && let Ok(value) = HeaderValue::from_str(&policy.expose_headers.join(", "))
        {
            headers.insert("access-control-expose-headers", value);
        }
    }
    response
}

fn allow_origin(headers: &mut http::HeaderMap, policy: &CorsConfig, origin: &str, any: bool) {
    let value = if any && !policy.allow_credentials {
        "*"
    } else {
        origin
    };
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert("access-control-allow-origin", value);
    }
    if policy.allow_credentials {
        headers.insert(
            "access-control-allow-credentials",
            HeaderValue::from_static("true"),
        );
    }
    if value != "*" {
        headers.append(http::header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// Finds who is calling: `Authorization: Bearer <jwt>` or `X-API-Key`. A credential
/// that does not verify is 401 `invalid_token`; none is fine here (the route may be
/// public). The client's own `X-User-ID` never passes; an authenticated request
/// carries the gateway's.
async fn authentication(
    proxy: Arc<Proxy>,
    mut request: Request<Incoming>,
    next: Next,
) -> Response<Body> {
    // Nobody names themselves: the identity headers are the gateway's alone.
    for name in eventyr_telemetry::identity::HEADERS {
        request.headers_mut().remove(name);
    }
    let Some(authenticator) = proxy.authenticator() else {
        return next.run(request).await;
    };
    let bearer = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .map(str::trim)
                .map(str::to_owned)
        });
    let api_key = request
        .headers()
        .get(X_API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // An address whose credentials keep failing (guessed keys, forged tokens) is
    // refused for a while, whatever it presents.
    let presented = bearer.is_some() || api_key.is_some();
    let limit = proxy.refused_credentials();
    let client = (presented && limit.may_refuse()).then(|| client_of(&proxy, &request).to_string());
    if let Some(client) = &client
        && let Some(left) = limit.blocked(client).await
    {
        crate::auth::security_event("refused_credentials_limited", client);
        return proxy.refused_credentials().refusal(
            left,
            "too many refused credentials from this address".to_owned(),
        );
    }
    let verified = match (bearer, api_key) {
        (Some(Some(token)), _) => Some(
            authenticator
                .verify_token(&token)
                .map_err(|e| ("invalid_token", e)),
        ),
        (Some(None), _) => Some(Err((
            "invalid_token",
            crate::auth::Refused("the Authorization header is not a Bearer token".to_owned()),
        ))),
        (None, Some(key)) => Some(
            authenticator
                .verify_api_key(&key)
                .map_err(|e| ("invalid_api_key", e)),
        ),
        (None, None) => None,
    };
    match verified {
        None => next.run(request).await,
        Some(Ok(identity)) => {
            if let Some(sid) = &identity.session {
                // The gateway's own session token: only while its session lives.
                let alive = match proxy.sessions() {
                    Some(sessions) => sessions.is_active(sid).await,
                    None => Ok(false),
                };
                match alive {
                    Ok(true) => {}
                    Ok(false) => {
                        crate::auth::security_event("session_ended", &identity.user_id);
                        return invalid_token(
                            "the token's session has ended (logged out or revoked)",
                        );
                    }
                    Err(e) => {
                        return error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "session_store_unavailable",
                            e.to_string(),
                        );
                    }
                }
            }
            if let Ok(value) = HeaderValue::from_str(&identity.user_id) {
                request.headers_mut().insert(X_USER_ID, value);
            }
            request.extensions_mut().insert(Authenticated(identity));
            next.run(request).await
        }
        Some(Err((reason, refused))) => {
            let client = client.unwrap_or_else(|| client_of(&proxy, &request).to_string());
            crate::auth::security_event(reason, &format!("{client}: {}", refused.0));
            proxy.refused_credentials().fail(&client).await;
            invalid_token(refused.0)
        }
    }
}

fn invalid_token(message: impl Into<String>) -> Response<Body> {
    let mut response = error(StatusCode::UNAUTHORIZED, "invalid_token", message);
    response.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    response
}

/// The route's permissions: none needed, anyone; else a caller (401
/// `unauthenticated`) whose roles grant every one (403 `forbidden`).
async fn authorization(
    proxy: Arc<Proxy>,
    request: Request<Incoming>,
    next: Next,
) -> Response<Body> {
    let needed = request
        .extensions()
        .get::<Routed>()
        .map(|r| Arc::clone(&r.route.permissions))
        .unwrap_or_else(|| Arc::from(Vec::new()));
    if needed.is_empty() {
        return next.run(request).await;
    }
    let Some(Authenticated(identity)) = request.extensions().get::<Authenticated>().cloned() else {
        crate::auth::security_event("unauthenticated", request.uri().path());
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "this route needs a bearer token or an API key",
        );
        response.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        return response;
    };
    let granted = proxy
        .authenticator()
        .is_some_and(|a| needed.iter().all(|p| a.grants(&identity, p)));
    if !granted {
        crate::auth::security_event("forbidden", &identity.user_id);
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} may not {}", identity.user_id, needed.join(", ")),
        );
    }
    next.run(request).await
}

/// The rate-limit rules that cover the request's route and caller, highest priority
/// first: each counts the request under its key; the first denial answers 429 with
/// `Retry-After` (a rule in shadow mode only counts it). Every limited answer carries
/// the IETF draft headers (`RateLimit-Policy`, `RateLimit`, of the tightest rule) and
/// `X-RateLimit-Limit/-Remaining/-Reset`.
async fn rate_limit(proxy: Arc<Proxy>, request: Request<Incoming>, next: Next) -> Response<Body> {
    use crate::ratelimit::{Decision, KeyKind, OnBackendError};
    if proxy.rules().is_empty() {
        return next.run(request).await;
    }
    let route = request
        .extensions()
        .get::<Routed>()
        .map_or_else(|| Arc::from("none"), |r| Arc::clone(&r.route.name));
    let identity = request
        .extensions()
        .get::<Authenticated>()
        .map(|a| Arc::clone(&a.0));
    let tier = identity.as_ref().map_or("anonymous", |i| i.tier.as_str());
    let client = client_of(&proxy, &request);
    let mut tightest: Option<(&str, Decision, u64)> = None;
    for rule in proxy.rules().iter().filter(|r| r.covers(&route, tier)) {
        let key = match rule.config.key {
            KeyKind::Global => "global".to_owned(),
            KeyKind::Tier => format!("tier:{tier}"),
            KeyKind::Consumer => match &identity {
                Some(identity) => format!("consumer:{}", identity.user_id),
                None => format!("ip:{client}"),
            },
            KeyKind::ApiKey => match &identity {
                Some(identity) if identity.method == "api_key" => {
                    format!("key:{}", identity.user_id)
                }
                _ => continue,
            },
            KeyKind::ClientIp => format!("ip:{client}"),
        };
        let decision = if rule.config.shared {
            match (proxy.redis(), rule.config.on_backend_error) {
                (Some(redis), fail) => match rule.check_shared(redis, &key).await {
                    Ok(decision) => decision,
                    Err(e) => {
                        backend_error(&rule.config.name, &e);
                        if fail == OnBackendError::Deny && !rule.config.shadow {
                            return error(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "rate_limit_unavailable",
                                format!("rate limit {} cannot be checked now", rule.config.name),
                            );
                        }
                        continue;
                    }
                },
                (None, _) => continue,
            }
        } else {
            rule.check(&key)
        };
        let outcome = match (decision.allowed, rule.config.shadow) {
            (true, _) => "allowed",
            (false, true) => "shadow_limited",
            (false, false) => "limited",
        };
        metrics::counter!(
            names::GATEWAY_RATELIMIT_DECISIONS_TOTAL,
            names::LABEL_RULE => rule.config.name.clone(),
            names::LABEL_DECISION => outcome
        )
        .increment(1);
        let window = rule.config.period.as_secs().max(1);
        if !decision.allowed && rule.config.shadow {
            tracing::info!(rule = %rule.config.name, key, "would be rate limited (shadow)");
            continue;
        }
        if !decision.allowed {
            tracing::info!(rule = %rule.config.name, key, "rate limited");
            return too_many(
                &rule.config.name,
                decision,
                window,
                format!("rate limit {} exceeded", rule.config.name),
            );
        }
        // A shadow rule stays invisible to the client.
        if !rule.config.shadow && tightest.is_none_or(|(_, d, _)| decision.remaining < d.remaining)
        {
            tightest = Some((&rule.config.name, decision, window));
        }
    }
    let tightest = tightest.map(|(name, d, w)| (name.to_owned(), d, w));
    let mut response = next.run(request).await;
    if let Some((name, decision, window)) = tightest {
        set_limit_headers(&mut response, &name, decision, window);
    }
    response
}

/// The client's address: the peer, or what a trusted proxy says of it.
fn client_of(proxy: &Proxy, request: &Request<Incoming>) -> std::net::IpAddr {
    let peer = request
        .extensions()
        .get::<ClientAddr>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let forwarded = request
        .headers()
        .get(X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok());
    crate::ratelimit::client_ip(peer, forwarded, proxy.trusted_proxies())
}

/// Counts a shared rule that could not be checked, and says so in the log at most
/// once a second (an outage of Redis would otherwise log every request).
fn backend_error(rule: &str, e: &redis::RedisError) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_LOGGED: AtomicU64 = AtomicU64::new(0);
    metrics::counter!(
        names::GATEWAY_RATELIMIT_DECISIONS_TOTAL,
        names::LABEL_RULE => rule.to_owned(),
        names::LABEL_DECISION => "backend_error"
    )
    .increment(1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST_LOGGED.swap(now, Ordering::Relaxed) != now {
        tracing::warn!(rule, error = %e, "a shared rate limit cannot reach Redis");
    }
}

/// 429 `rate_limited` for `rule`'s denial: `Retry-After`, and the IETF draft and
/// `X-RateLimit-*` headers.
pub(crate) fn too_many(
    rule: &str,
    decision: crate::ratelimit::Decision,
    window: u64,
    message: String,
) -> Response<Body> {
    let mut response = error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
    let retry_after = decision.reset.as_secs_f64().ceil().max(1.0) as u64;
    set_limit_headers(&mut response, rule, decision, window);
    if let Ok(value) = HeaderValue::from_str(&retry_after.to_string()) {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, value);
    }
    response
}

fn set_limit_headers(
    response: &mut Response<Body>,
    rule: &str,
    decision: crate::ratelimit::Decision,
    window: u64,
) {
    let reset = decision.reset.as_secs_f64().ceil() as u64;
    let headers = response.headers_mut();
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set(
        "ratelimit-policy",
        format!("\"{rule}\";q={};w={window}", decision.limit),
    );
    set(
        "ratelimit",
        format!("\"{rule}\";r={};t={reset}", decision.remaining),
    );
    set("x-ratelimit-limit", decision.limit.to_string());
    set("x-ratelimit-remaining", decision.remaining.to_string());
    set("x-ratelimit-reset", reset.to_string());
}

/// The route's response cache (GET only): a fresh kept answer is served with
/// `X-Cache: HIT` and its `Age`; otherwise the answer is fetched (`X-Cache: MISS`)
/// and kept if it may be (see [`crate::cache`]). A request's `no-cache`/`no-store`
/// goes around the cache (`X-Cache: BYPASS`).
async fn cache(proxy: Arc<Proxy>, request: Request<Incoming>, next: Next) -> Response<Body> {
    use http_body_util::BodyExt;
    // Only what the cache needs, not the whole route, on every request.
    let cached = request
        .extensions()
        .get::<Routed>()
        .and_then(|r| Some((Arc::clone(&r.route.name), r.route.cache.clone()?)));
    let Some((route, policy)) = cached else {
        return next.run(request).await;
    };
    if request.method() != http::Method::GET {
        return next.run(request).await;
    }
    let mark = |mut response: Response<Body>, state: &'static str| {
        metrics::counter!(
            names::GATEWAY_CACHE_TOTAL,
            names::LABEL_ROUTE => route.to_string(),
            names::LABEL_RESULT => match state {
                "HIT" => "hit",
                "MISS" => "miss",
                _ => "bypass",
            }
        )
        .increment(1);
        response
            .headers_mut()
            .insert("x-cache", HeaderValue::from_static(state));
        response
    };
    let bypass = crate::cache::directives(request.headers())
        .iter()
        .any(|d| d == "no-cache" || d == "no-store");
    if bypass {
        return mark(next.run(request).await, "BYPASS");
    }
    let caller = request
        .extensions()
        .get::<Authenticated>()
        .map(|a| a.0.user_id.clone());
    let mut key = format!("{route}\n{}", request.uri());
    for name in &policy.vary {
        key.push('\n');
        key.push_str(
            request
                .headers()
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default(),
        );
    }
    if let Some(caller) = &caller {
        key.push_str("\nuser:");
        key.push_str(caller);
    }
    if let Some(hit) = proxy.cache().get(&key) {
        let mut response = Response::new(
            http_body_util::Full::new(hit.body)
                .map_err(|e| match e {})
                .boxed(),
        );
        *response.status_mut() = hit.status;
        *response.headers_mut() = hit.headers;
        if let Ok(age) = HeaderValue::from_str(&hit.stored.elapsed().as_secs().to_string()) {
            response.headers_mut().insert(http::header::AGE, age);
        }
        return mark(response, "HIT");
    }
    let response = next.run(request).await;
    let length = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let keep = (response.status() == StatusCode::OK
        && length.is_some_and(|n| n <= policy.max_body_bytes))
    .then(|| crate::cache::keep_for(policy.ttl, response.headers(), caller.is_some()))
    .flatten();
    let Some(keep) = keep else {
        return mark(response, "MISS");
    };
    let (parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return error(StatusCode::BAD_GATEWAY, "bad_gateway", e.to_string()),
    };
    let now = Instant::now();
    proxy.cache().put(
        key,
        crate::cache::Cached {
            status: parts.status,
            headers: parts.headers.clone(),
            body: body.clone(),
            stored: now,
            expires: now + keep,
        },
    );
    let response = Response::from_parts(
        parts,
        http_body_util::Full::new(body)
            .map_err(|e| match e {})
            .boxed(),
    );
    mark(response, "MISS")
}

/// The route's timeout: no answer in time is 504 `upstream_timeout`. The deadline goes
/// to the proxy too ([`Deadline`]), whose attempts end by it themselves — so a timeout
/// counts against the cluster's breaker and the endpoint — before this layer would cut
/// the request off.
async fn timeout(mut request: Request<Incoming>, next: Next) -> Response<Body> {
    let limit = request
        .extensions()
        .get::<Routed>()
        .map_or(crate::route::DEFAULT_TIMEOUT, |r| r.route.timeout);
    let deadline = tokio::time::Instant::now() + limit;
    request.extensions_mut().insert(Deadline(deadline));
    // `Timeout` polls the request first: at the deadline, the proxy's own answer wins.
    match tokio::time::timeout_at(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            format!("no answer within {limit:?}"),
        ),
    }
}

/// When the request's route gives up on it.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub tokio::time::Instant);
