//! Sagas over HTTP: participants reached by synchronous HTTP calls, and the engine's
//! admin API.
//!
//! A step call is `POST <url>` (a template: `{saga_id}` and `{field}` take the saga's
//! id and the body's field) with the request body as JSON and the headers
//! `Idempotency-Key` (the same on every attempt of a step, another for its
//! compensation), `X-Eventyr-Saga`, `X-Eventyr-Step` and `X-Eventyr-Attempt`; it may
//! take until the attempt's deadline. A 2xx answer is the step's result; a network
//! error, a timeout, 408, 429 or a 5xx is a transient failure (the engine retries it
//! with backoff); any other answer is a refusal (permanent, not retried).
//!
//! The admin API (`admin_router`) answers with the JSON error body
//! `{"error": code, "message": ...}` on failure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use eventyr_core::Clock;
use futures::FutureExt;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::{EngineError, SagaHandle};
use crate::machine::{self, Failure, SagaStatus, StepCall};
use crate::participants::{Participants, Sent, StepHandler};
use eventyr_telemetry::names;

/// Where a step's action and compensation are.
#[derive(Debug, Clone)]
struct Endpoints {
    action: String,
    compensation: Option<String>,
}

/// Participants reached over HTTP, by step.
#[derive(Debug, Clone)]
pub struct HttpParticipants {
    client: reqwest::Client,
    clock: Arc<dyn Clock>,
    steps: HashMap<String, Endpoints>,
    resilience: Resilience,
    guards: HashMap<String, Arc<Guard>>,
}

/// How each downstream step is protected: a circuit breaker (after
/// `failures_to_open` transient failures in a row, calls fail at once for `open_for`,
/// then one trial call decides) and a bulkhead (at most `concurrent_max` calls at once;
/// beyond it, calls fail at once). Both answer with a transient failure, so the saga
/// retries the step later with its backoff.
#[derive(Debug, Clone, Copy)]
pub struct Resilience {
    pub failures_to_open: u32,
    pub open_for: Duration,
    pub concurrent_max: usize,
}

impl Default for Resilience {
    fn default() -> Self {
        Self {
            failures_to_open: 5,
            open_for: Duration::from_secs(5),
            concurrent_max: 64,
        }
    }
}

#[derive(Debug)]
enum Circuit {
    Closed {
        failures: u32,
    },
    Open {
        until: std::time::Instant,
    },
    /// One trial call is out (since then); if its answer never comes (its saga ended
    /// and dropped it), another trial goes after `open_for`.
    HalfOpen {
        since: std::time::Instant,
    },
}

#[derive(Debug)]
struct Guard {
    circuit: std::sync::Mutex<Circuit>,
    bulkhead: Arc<tokio::sync::Semaphore>,
    open_for: Duration,
}

impl Guard {
    fn new(resilience: &Resilience) -> Self {
        Self {
            circuit: std::sync::Mutex::new(Circuit::Closed { failures: 0 }),
            bulkhead: Arc::new(tokio::sync::Semaphore::new(
                resilience.concurrent_max.max(1),
            )),
            open_for: resilience.open_for,
        }
    }

    fn circuit(&self) -> std::sync::MutexGuard<'_, Circuit> {
        self.circuit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a call may go now.
    fn admit(&self) -> bool {
        let mut circuit = self.circuit();
        match *circuit {
            Circuit::Closed { .. } => true,
            Circuit::Open { until } if std::time::Instant::now() >= until => {
                *circuit = Circuit::HalfOpen {
                    since: std::time::Instant::now(),
                };
                true
            }
            Circuit::HalfOpen { since } if since.elapsed() >= self.open_for => {
                *circuit = Circuit::HalfOpen {
                    since: std::time::Instant::now(),
                };
                true
            }
            Circuit::Open { .. } | Circuit::HalfOpen { .. } => false,
        }
    }

    /// Records a call's outcome; returns whether the circuit is open after it.
    fn record(&self, transient_failure: bool, resilience: &Resilience) -> bool {
        let mut circuit = self.circuit();
        let failures = match (&*circuit, transient_failure) {
            (_, false) => 0,
            (Circuit::Closed { failures }, true) => failures + 1,
            (Circuit::HalfOpen { .. } | Circuit::Open { .. }, true) => resilience.failures_to_open,
        };
        *circuit = if failures >= resilience.failures_to_open.max(1) {
            Circuit::Open {
                until: std::time::Instant::now() + resilience.open_for,
            }
        } else {
            Circuit::Closed { failures }
        };
        matches!(*circuit, Circuit::Open { .. })
    }
}

/// The shortest time an attempt is given, even past its deadline (a recovered call).
const ATTEMPT_MIN: Duration = Duration::from_millis(100);

impl HttpParticipants {
    /// Errors: the HTTP client cannot be built.
    pub fn new(clock: Arc<dyn Clock>) -> Result<Self, reqwest::Error> {
        Self::with_headers(clock, reqwest::header::HeaderMap::new())
    }

    /// Sending `headers` (the participants' internal credential) with every call.
    /// Errors: the HTTP client cannot be built.
    pub fn with_headers(
        clock: Arc<dyn Clock>,
        headers: reqwest::header::HeaderMap,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(30))
            .default_headers(headers)
            .build()?;
        Ok(Self {
            client,
            clock,
            steps: HashMap::new(),
            resilience: Resilience::default(),
            guards: HashMap::new(),
        })
    }

    /// The circuit breaker and bulkhead of every step (set before adding steps).
    pub fn resilience(mut self, resilience: Resilience) -> Self {
        self.resilience = resilience;
        self
    }

    /// Step `step` is `POST action`, its compensation `POST compensation`.
    pub fn step(
        mut self,
        step: impl Into<String>,
        action: impl Into<String>,
        compensation: Option<String>,
    ) -> Self {
        let endpoints = Endpoints {
            action: action.into(),
            compensation,
        };
        let step = step.into();
        self.guards
            .insert(step.clone(), Arc::new(Guard::new(&self.resilience)));
        self.steps.insert(step, endpoints);
        self
    }
}

#[async_trait]
impl Participants for HttpParticipants {
    async fn call(&self, call: StepCall) -> Sent {
        let url = self.steps.get(&call.step).and_then(|e| {
            if call.compensation {
                e.compensation.clone()
            } else {
                Some(e.action.clone())
            }
        });
        let Some(url) = url else {
            let what = if call.compensation {
                "compensation"
            } else {
                "action"
            };
            return Sent::Replied(Err(Failure::permanent(format!(
                "no URL for the {what} of step {}",
                call.step
            ))));
        };
        let url = fill(&url, &call);
        let Some(guard) = self.guards.get(&call.step).cloned() else {
            return Sent::Replied(Err(Failure::permanent("no guard for the step")));
        };
        let label = [(names::LABEL_STEP, call.step.clone())];
        if !guard.admit() {
            return Sent::Replied(Err(Failure::transient(format!(
                "the circuit of step {} is open: its participant keeps failing",
                call.step
            ))));
        }
        let Ok(_permit) = Arc::clone(&guard.bulkhead).try_acquire_owned() else {
            metrics::counter!(names::SAGA_BULKHEAD_REJECTED_TOTAL, &label).increment(1);
            return Sent::Replied(Err(Failure::transient(format!(
                "the bulkhead of step {} is full ({} calls at once)",
                call.step, self.resilience.concurrent_max
            ))));
        };
        let sent = self.send(&url, &call).await;
        let transient = matches!(&sent, Sent::Replied(Err(failure)) if failure.transient);
        let open = guard.record(transient, &self.resilience);
        metrics::gauge!(names::SAGA_CIRCUIT_OPEN, &label).set(if open { 1.0 } else { 0.0 });
        sent
    }
}

impl HttpParticipants {
    /// One HTTP call of a step.
    async fn send(&self, url: &str, call: &StepCall) -> Sent {
        let timeout = machine::until(self.clock.now(), call.deadline).max(ATTEMPT_MIN);
        // The participant continues the step's trace.
        let request = self
            .client
            .post(url)
            .headers(eventyr_telemetry::trace::headers())
            .timeout(timeout)
            .header("Idempotency-Key", &call.idempotency_key)
            .header("X-Eventyr-Saga", &call.saga_id)
            .header("X-Eventyr-Step", &call.step)
            .header("X-Eventyr-Attempt", call.attempt.to_string())
            .json(&call.body);
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) if error.is_timeout() => {
                let message = format!("POST {url}: no answer within {timeout:?}");
                return Sent::Replied(Err(Failure::transient(message)));
            }
            Err(error) => {
                return Sent::Replied(Err(Failure::transient(format!("POST {url}: {error}"))));
            }
        };
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        Sent::Replied(outcome(url, status, &body))
    }
}

/// A step's answer: a 2xx is its result; 408, 429 and 5xx are transient failures; any
/// other status a refusal.
fn outcome(url: &str, status: StatusCode, body: &[u8]) -> Result<Value, Failure> {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(value);
    }
    let message = value
        .get("message")
        .and_then(Value::as_str)
        .map_or_else(|| String::from_utf8_lossy(body).into_owned(), str::to_owned);
    // The participant's stable code first (`out_of_stock`, `payment_declined`...):
    // what the saga's owner can tell its own customers.
    let error = match value.get("error").and_then(Value::as_str) {
        Some(code) => format!("POST {url}: {status}: {code}: {message}"),
        None => format!("POST {url}: {status}: {message}"),
    };
    let transient = status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS;
    Err(Failure { error, transient })
}

/// The answers a step may give, at most (a larger body is a transient failure).
const ANSWER_MAX_BYTES: usize = 1 << 20;

/// A step served by a service's own `router` in this process: the same request as
/// [`HttpParticipants`] sends (`POST action` or `POST compensation`, templates filled,
/// the same headers) and the same reading of the answer, without a socket. For a
/// service that takes its steps from the bus ([`crate::CommandHandler`]) or reacts in
/// a choreography ([`crate::choreography::Chain`]) with the handlers its HTTP API has.
/// `headers` go with every call (the service's internal credential).
pub fn local_step(
    router: Router,
    action: &str,
    compensation: Option<&str>,
    headers: axum::http::HeaderMap,
) -> StepHandler {
    let (action, compensation) = (action.to_owned(), compensation.map(str::to_owned));
    Arc::new(move |call: StepCall| {
        let router = router.clone();
        let headers = headers.clone();
        let template = if call.compensation {
            compensation.clone()
        } else {
            Some(action.clone())
        };
        async move {
            use tower::ServiceExt;
            let Some(template) = template else {
                return Err(Failure::permanent(format!(
                    "step {} has no compensation here",
                    call.step
                )));
            };
            let url = fill(&template, &call);
            let body = serde_json::to_vec(&call.body)
                .map_err(|e| Failure::permanent(format!("the request is not JSON: {e}")))?;
            let mut request = axum::http::Request::post(&url);
            if let Some(request_headers) = request.headers_mut() {
                request_headers.extend(headers);
                request_headers.extend(eventyr_telemetry::trace::headers());
            }
            let request = request
                .header(axum::http::header::CONTENT_TYPE, "application/json")
                .header("Idempotency-Key", &call.idempotency_key)
                .header("X-Eventyr-Saga", &call.saga_id)
                .header("X-Eventyr-Step", &call.step)
                .header("X-Eventyr-Attempt", call.attempt.to_string())
                .body(axum::body::Body::from(body))
                .map_err(|e| Failure::permanent(format!("POST {url}: {e}")))?;
            let response = match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), ANSWER_MAX_BYTES)
                .await
                .map_err(|e| Failure::transient(format!("POST {url}: {e}")))?;
            outcome(&url, status, &body)
        }
        .boxed()
    })
}

/// Fills a URL template: `{saga_id}`, and `{field}` with the body's string (or
/// number) field of that name, percent-encoded.
fn fill(template: &str, call: &StepCall) -> String {
    let mut url = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        url.push_str(&rest[..open]);
        let name = &rest[open + 1..open + close];
        let value = match (name, call.body.get(name)) {
            ("saga_id", _) => call.saga_id.clone(),
            (_, Some(Value::String(text))) => text.clone(),
            (_, Some(Value::Number(number))) => number.to_string(),
            _ => String::new(),
        };
        url.extend(value.bytes().map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        }));
        rest = &rest[open + close + 1..];
    }
    url.push_str(rest);
    url
}

/// An engine error as the JSON error body.
struct ApiError(EngineError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.0.code();
        let status = match code {
            "saga_not_found" | "unknown_saga_type" => StatusCode::NOT_FOUND,
            "saga_terminal" | "saga_past_pivot" | "saga_not_retriable" | "saga_refused" => {
                StatusCode::CONFLICT
            }
            "invalid_input" => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        let body = json!({ "error": code, "message": self.0.to_string() });
        (status, Json(body)).into_response()
    }
}

fn bad_request(message: String) -> Response {
    let body = json!({ "error": "invalid_input", "message": message });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
struct AbortBody {
    reason: Option<String>,
}

/// The most sagas one list returns.
const LIST_LIMIT_MAX: usize = 1000;

/// `GET /admin/sagas?status=&limit=`, `GET /admin/sagas/{id}`,
/// `POST /admin/sagas/{id}/retry`, `POST /admin/sagas/{id}/abort` (body
/// `{"reason": ...}`, optional). Authorisation (the admin role) is the gateway's.
pub fn admin_router(handle: SagaHandle) -> Router {
    Router::new()
        .route("/admin/sagas", get(list))
        .route("/admin/sagas/{id}", get(show))
        .route("/admin/sagas/{id}/retry", post(retry))
        .route("/admin/sagas/{id}/abort", post(abort))
        .with_state(handle)
}

async fn list(State(handle): State<SagaHandle>, Query(query): Query<ListQuery>) -> Response {
    let status = match query.status.as_deref().map(SagaStatus::parse) {
        None => None,
        Some(Some(status)) => Some(status),
        Some(None) => return bad_request(format!("unknown status {:?}", query.status)),
    };
    let limit = query.limit.unwrap_or(100).clamp(1, LIST_LIMIT_MAX);
    match handle.list(status, limit).await {
        Ok(sagas) => Json(sagas).into_response(),
        Err(error) => ApiError(error).into_response(),
    }
}

async fn show(State(handle): State<SagaHandle>, Path(id): Path<String>) -> Response {
    match handle.get(&id).await {
        Ok((state, log)) => {
            let events: Vec<Value> = log
                .iter()
                .map(|(at, event)| json!({ "recorded_at": at, "event": event }))
                .collect();
            Json(json!({
                "id": state.id,
                "saga_type": state.saga_type,
                "status": state.status,
                "flagged": state.flagged,
                "reason": state.reason,
                "correlation_id": state.correlation_id,
                "data": state.data,
                "started_at": state.started_at,
                "updated_at": state.updated_at,
                "events": events,
            }))
            .into_response()
        }
        Err(error) => ApiError(error).into_response(),
    }
}

async fn retry(State(handle): State<SagaHandle>, Path(id): Path<String>) -> Response {
    match handle.retry(&id).await {
        Ok(()) => Json(json!({ "id": id, "accepted": true })).into_response(),
        Err(error) => ApiError(error).into_response(),
    }
}

async fn abort(
    State(handle): State<SagaHandle>,
    Path(id): Path<String>,
    body: Option<Json<AbortBody>>,
) -> Response {
    let reason = body
        .and_then(|Json(b)| b.reason)
        .unwrap_or_else(|| "aborted by an operator".to_owned());
    match handle.abort(&id, &reason).await {
        Ok(()) => Json(json!({ "id": id, "accepted": true })).into_response(),
        Err(error) => ApiError(error).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_templates_take_the_saga_id_and_body_fields_encoded() {
        let call = StepCall {
            saga_id: "order-1".into(),
            saga_type: "order".into(),
            step: "payment".into(),
            attempt: 1,
            compensation: true,
            idempotency_key: "order-1/payment/compensation".into(),
            deadline: eventyr_core::Timestamp::UNIX_EPOCH,
            body: json!({ "customer_id": "a b", "n": 7 }),
        };
        assert_eq!(
            fill(
                "http://h/internal/payments/{saga_id}/refund?c={customer_id}&n={n}&x={missing}",
                &call
            ),
            "http://h/internal/payments/order-1/refund?c=a%20b&n=7&x="
        );
    }
}
