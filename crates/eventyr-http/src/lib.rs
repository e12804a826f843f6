//! HTTP conventions every Eventyr service shares (`contracts/common.yaml`):
//!
//! - [`ApiError`]: the JSON error body `{"error","message","trace_id","fields"}` with
//!   the right status; never a panic, a stack trace or an HTML page.
//! - [`Input`]: a JSON body, checked: the content type, the size limit (413), the
//!   shape with the offending field's JSON pointer (400), then the request's own
//!   rules ([`Validate`]).
//! - [`probes`]: `/health/live`, `/health/ready` (ready only when the service's
//!   dependencies answer) and `/metrics`.
//! - [`traced`]: each request in a server span that continues the caller's trace,
//!   answered with `X-Request-ID` and `X-Trace-ID`.
//! - [`caller`]: the internal credential every listener asks for, and the caller's
//!   identity and ownership rules ([`Caller`]).
//! - [`Faults`]: demonstration knobs (failure rate, added latency) on a service's
//!   step calls, settable at run time through `/admin/faults`.

pub mod caller;
#[cfg(feature = "testing")]
pub mod testing;

pub use caller::{Caller, Credential, guarded};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use eventyr_telemetry::PrometheusHandle;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The most a JSON body may weigh. Larger bodies get 413.
pub const BODY_MAX_BYTES: usize = 64 * 1024;

/// One offending field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// A JSON pointer into the body (`/items/0/quantity`), or a parameter's name.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An error as the JSON error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub fields: Vec<FieldError>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            fields: Vec::new(),
        }
    }

    /// 400 `invalid_input` with the offending fields.
    pub fn invalid(fields: Vec<FieldError>) -> Self {
        let message = match fields.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            _ => format!("{} fields are invalid", fields.len()),
        };
        Self {
            fields,
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_input", message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409 with a business code (`out_of_stock`, `payment_declined`, ...).
    pub fn conflict(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 503: a dependency is down; a retry may help.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The request's trace (see `traced`); a fresh id outside one.
        let trace_id = eventyr_telemetry::trace::current_trace_id()
            .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
        if self.status.is_server_error() {
            tracing::warn!(%trace_id, code = %self.code, detail = %self.message, "request failed");
        }
        let mut body = json!({
            "error": self.code,
            "message": self.message,
            "trace_id": trace_id,
        });
        if !self.fields.is_empty() {
            body["fields"] = json!(self.fields);
        }
        (self.status, Json(body)).into_response()
    }
}

/// A request's own rules, past its shape: ranges, known names, consistency.
pub trait Validate {
    /// The offending fields, if any.
    fn validate(&self) -> Vec<FieldError> {
        Vec::new()
    }
}

/// A JSON body of type `T`, checked (see the crate's documentation).
#[derive(Debug, Clone)]
pub struct Input<T>(pub T);

impl<T, S> FromRequest<S> for Input<T>
where
    T: DeserializeOwned + Validate,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !json {
            return Err(ApiError::invalid(vec![FieldError::new(
                "content-type",
                "expected application/json",
            )]));
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the body exceeds {BODY_MAX_BYTES} bytes"),
                )
            } else {
                ApiError::invalid(vec![FieldError::new("", e.body_text())])
            }
        })?;
        let value: T = parse(&bytes)?;
        let fields = value.validate();
        if fields.is_empty() {
            Ok(Self(value))
        } else {
            Err(ApiError::invalid(fields))
        }
    }
}

/// Deserializes `bytes`, naming the offending field as a JSON pointer.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let pointer = if path == "." {
            String::new()
        } else {
            format!(
                "/{}",
                path.replace('.', "/")
                    .replace(['[', ']'], "/")
                    .replace("//", "/")
            )
            .trim_end_matches('/')
            .to_owned()
        };
        ApiError::invalid(vec![FieldError::new(
            pointer,
            error.into_inner().to_string(),
        )])
    })
}

/// Whether the service can serve: `Err` names what is down.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

#[derive(Clone)]
struct Probes {
    ready: ReadyCheck,
    metrics: Option<PrometheusHandle>,
}

/// `/health/live`, `/health/ready` and `/metrics` (when a recorder is installed).
pub fn probes(ready: ReadyCheck, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route(
            "/health/live",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/health/ready", get(readiness))
        .route("/metrics", get(render))
        .with_state(Probes { ready, metrics })
}

async fn readiness(State(probes): State<Probes>) -> Response {
    match (probes.ready)().await {
        Ok(()) => Json(json!({ "status": "ok" })).into_response(),
        Err(down) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "checks": { "dependencies": down } })),
        )
            .into_response(),
    }
}

async fn render(State(probes): State<Probes>) -> Response {
    match probes.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            eventyr_telemetry::render(&handle),
        )
            .into_response(),
        // No recorder in this process (a test): an empty exposition.
        None => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            String::new(),
        )
            .into_response(),
    }
}

/// Demonstration knobs of a service's step calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSettings {
    /// Share of step calls answered 503, 0 to 1.
    #[serde(default)]
    pub failure_rate: f64,
    /// Added to every step call, at most 60 000.
    #[serde(default)]
    pub latency_ms: u64,
    /// Handled by the process wiring (it closes the service's listener); kept here so
    /// that one document sets every knob.
    #[serde(default)]
    pub down: bool,
}

impl Validate for FaultSettings {
    fn validate(&self) -> Vec<FieldError> {
        let mut fields = Vec::new();
        if !(0.0..=1.0).contains(&self.failure_rate) {
            fields.push(FieldError::new("/failure_rate", "must be between 0 and 1"));
        }
        if self.latency_ms > 60_000 {
            fields.push(FieldError::new("/latency_ms", "must be at most 60000"));
        }
        fields
    }
}

/// The knobs in effect, shared by a service's routes; cheap to clone.
#[derive(Debug, Clone)]
pub struct Faults {
    settings: Arc<tokio::sync::watch::Sender<FaultSettings>>,
}

impl Default for Faults {
    fn default() -> Self {
        Self::new(FaultSettings::default())
    }
}

impl Faults {
    pub fn new(settings: FaultSettings) -> Self {
        Self {
            settings: Arc::new(tokio::sync::watch::Sender::new(settings)),
        }
    }

    pub fn get(&self) -> FaultSettings {
        *self.settings.borrow()
    }

    pub fn set(&self, settings: FaultSettings) {
        self.settings.send_replace(settings);
    }

    /// Follows the knobs (the wiring closes a service's listener while it is "down").
    pub fn watch(&self) -> tokio::sync::watch::Receiver<FaultSettings> {
        self.settings.subscribe()
    }

    /// `GET` and `PUT /admin/faults`.
    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/admin/faults",
                get(|State(faults): State<Faults>| async move { Json(faults.get()) }).put(
                    |State(faults): State<Faults>, Input(settings): Input<FaultSettings>| async move {
                        faults.set(settings);
                        Json(faults.get())
                    },
                ),
            )
            .with_state(self.clone())
    }

    /// Middleware for step routes: waits the added latency, then fails the configured
    /// share of calls with 503.
    pub async fn apply(State(faults): State<Faults>, request: Request, next: Next) -> Response {
        let settings = faults.get();
        if settings.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(settings.latency_ms)).await;
        }
        if settings.failure_rate > 0.0 && fastrand::f64() < settings.failure_rate {
            return ApiError::unavailable("a demonstration fault").into_response();
        }
        next.run(request).await
    }
}

/// Runs each request of `router` in a server span of `service` (named by the matched
/// route's template, never the raw path) that continues the caller's `traceparent`;
/// keeps the caller's `X-Request-ID` (or makes one) and answers with it and with
/// `X-Trace-ID`. Probes (`/health/*`) and `/metrics` are not traced.
pub fn traced(service: &'static str, router: Router) -> Router {
    router.layer(axum::middleware::from_fn(
        move |request: Request, next: Next| trace_request(service, request, next),
    ))
}

async fn trace_request(service: &'static str, mut request: Request, next: Next) -> Response {
    use tracing::Instrument as _;
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |path| path.as_str())
        .to_owned();
    // Probes and scrapes come every few seconds and say nothing about a request: no
    // trace of their own.
    if route.starts_with("/health/") || route == "/metrics" {
        return next.run(request).await;
    }
    let headers = request.headers_mut();
    let request_id = match headers
        .get(eventyr_telemetry::trace::X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
    {
        Some(id) if eventyr_telemetry::trace::valid_request_id(id) => id.to_owned(),
        _ => {
            let id = uuid::Uuid::now_v7().to_string();
            if let Ok(value) = header::HeaderValue::from_str(&id) {
                headers.insert(eventyr_telemetry::trace::X_REQUEST_ID, value);
            }
            id
        }
    };
    let span = eventyr_telemetry::trace::server(
        service,
        request.method().as_str(),
        &route,
        eventyr_telemetry::trace::extract(request.headers()),
        Some(&request_id),
    );
    let mut response = next.run(request).instrument(span.clone()).await;
    eventyr_telemetry::trace::record_status(&span, response.status().as_u16());
    let headers = response.headers_mut();
    if let Ok(value) = header::HeaderValue::from_str(&request_id) {
        headers.insert(eventyr_telemetry::trace::X_REQUEST_ID, value);
    }
    if let Some(value) = eventyr_telemetry::trace::trace_id_of(&span)
        .and_then(|id| header::HeaderValue::from_str(&id).ok())
    {
        headers.insert(eventyr_telemetry::trace::X_TRACE_ID, value);
    }
    response
}

/// The conventions every service router gets: the body limit, and JSON error bodies
/// for unknown paths and wrong methods.
pub fn conventions(router: Router) -> Router {
    router
        .fallback(|| async { ApiError::not_found("no such path") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this path does not take this method",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_MAX_BYTES))
}

/// An id chosen by a caller or derived from an idempotency key
/// (`contracts/common.yaml` `Id`): 1 to 128 of A-Z, a-z, 0-9, '-', '_', '.' and ':'.
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A SKU (`contracts/common.yaml` `Sku`): 1 to 32 of A-Z, 0-9 and '-', not from '-'.
pub fn valid_sku(sku: &str) -> bool {
    (1..=32).contains(&sku.len())
        && sku
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
        && !sku.starts_with('-')
}

/// A saga step a service serves: its name in the saga, and the paths of its action
/// and compensation (templates taking `{saga_id}`), the same over HTTP, from the bus
/// and in the choreography. Each service lists its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRoute {
    pub step: &'static str,
    pub action: &'static str,
    pub compensation: Option<&'static str>,
}

/// A customer id (`CustomerId`): 1 to 64 of a-z, 0-9, '-' and '_', from a letter or digit.
pub fn valid_customer_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'))
}

/// Checks a path parameter; 400 naming it otherwise.
pub fn check(name: &str, valid: bool, rule: &str) -> Result<(), ApiError> {
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid(vec![FieldError::new(name, rule)]))
    }
}

/// The rule of [`valid_id`], for field errors.
pub const ID_RULE: &str = "1 to 128 of A-Z, a-z, 0-9, '-', '_', '.' and ':'";
/// The rule of [`valid_customer_id`], for field errors.
pub const CUSTOMER_ID_RULE: &str = "1 to 64 of a-z, 0-9, '-' and '_'";

/// A command's failure as the error body: the aggregate's refusal through `rejected`,
/// invalid input 400, the rest 503 (a retry may help).
pub fn command_failure<E: std::error::Error + 'static>(
    error: eventyr_cqrs::CommandError<E>,
    rejected: impl FnOnce(E) -> ApiError,
) -> ApiError {
    match error {
        eventyr_cqrs::CommandError::Rejected(refusal) => rejected(refusal),
        eventyr_cqrs::CommandError::Invalid(invalid) => {
            ApiError::invalid(vec![FieldError::new("", invalid.to_string())])
        }
        other => ApiError::unavailable(other.to_string()),
    }
}

/// A body naming only a customer (compensations that need the customer's aggregate).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerBody {
    pub customer_id: String,
}

impl Validate for CustomerBody {
    fn validate(&self) -> Vec<FieldError> {
        if valid_customer_id(&self.customer_id) {
            Vec::new()
        } else {
            vec![FieldError::new("/customer_id", CUSTOMER_ID_RULE)]
        }
    }
}

/// Runs a command (its id derived by the caller, so that a retry is the same command),
/// mapping failures with `failure`.
pub async fn execute<A: eventyr_cqrs::Aggregate>(
    handler: &eventyr_cqrs::CommandHandler<A>,
    aggregate_id: &str,
    command_id: String,
    body: A::Command,
    failure: impl Fn(eventyr_cqrs::CommandError<A::Error>) -> ApiError,
) -> Result<(), ApiError> {
    let command_id = eventyr_cqrs::CommandId::new(command_id)
        .map_err(|e| ApiError::invalid(vec![FieldError::new("", e.to_string())]))?;
    handler
        .execute(eventyr_cqrs::Command::new(aggregate_id, body).with_id(command_id))
        .await
        .map(|_| ())
        .map_err(failure)
}

/// [`execute`], then the aggregate's state after it.
pub async fn execute_and_load<A: eventyr_cqrs::Aggregate>(
    handler: &eventyr_cqrs::CommandHandler<A>,
    aggregate_id: &str,
    command_id: String,
    body: A::Command,
    failure: impl Fn(eventyr_cqrs::CommandError<A::Error>) -> ApiError,
) -> Result<A, ApiError> {
    execute(handler, aggregate_id, command_id, body, &failure).await?;
    Ok(handler.load(aggregate_id).await.map_err(failure)?.state)
}

/// A service's routes: its `public` ones, its saga `steps` (behind the demonstration
/// faults), and `/admin/faults`, over its `state`.
pub fn service<S: Clone + Send + Sync + 'static>(
    public: Router<S>,
    steps: Router<S>,
    state: S,
    faults: &Faults,
) -> Router {
    let steps = steps.layer(axum::middleware::from_fn_with_state(
        faults.clone(),
        Faults::apply,
    ));
    public.merge(steps).with_state(state).merge(faults.router())
}
