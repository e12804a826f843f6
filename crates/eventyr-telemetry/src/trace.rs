//! Traces: the spans Eventyr opens (their names and fields live here, as metric names
//! live in [`crate::names`]) and the W3C trace context that joins them across hops —
//! in `traceparent` headers over HTTP and in the `traceparent` of an event's envelope
//! over the bus.
//!
//! A span opened here carries `trace_id` and `span_id` fields, so every log line written
//! inside it names its trace (see [`crate::logs`]). Without the subscriber that
//! [`crate::init`] installs (a library's own tests), spans are inert and every function
//! here answers `None`.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Whether spans are recorded (an exporter takes them). Without, a hot path may carry
/// its ids in a [`Hop`] instead of a span: spans cost a few microseconds each.
static RECORDING: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_recording(recording: bool) {
    RECORDING.store(recording, Ordering::Relaxed);
}

/// Whether spans are recorded (see [`in_hop`]).
pub fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed)
}

/// The ids of a request handled without a span of its own: its `traceparent` (the
/// trace and the hop's span id) and its request id. Log lines, error bodies and
/// [`current_traceparent`] inside [`in_hop`] take them when no span has ids.
#[derive(Debug, Clone)]
pub struct Hop {
    pub traceparent: String,
    pub request_id: Option<String>,
}

tokio::task_local! {
    static HOP: Hop;
}

/// Runs `future` as the request `hop` (a task-local: it costs next to nothing).
pub async fn in_hop<F: Future>(hop: Hop, future: F) -> F::Output {
    HOP.scope(hop, future).await
}

/// The current hop's (trace id, span id, request id), inside [`in_hop`].
pub(crate) fn hop_ids() -> Option<(String, String, Option<String>)> {
    HOP.try_with(|hop| {
        let trace = hop.traceparent.get(3..35)?;
        let span = hop.traceparent.get(36..52)?;
        Some((trace.to_owned(), span.to_owned(), hop.request_id.clone()))
    })
    .ok()
    .flatten()
}

/// The `traceparent` header's name.
pub const TRACEPARENT: &str = "traceparent";
/// The response header that names a request's trace.
pub const X_TRACE_ID: &str = "x-trace-id";
/// The header that names a request, kept from hop to hop.
pub const X_REQUEST_ID: &str = "x-request-id";

/// A caller's request id worth keeping (every hop applies the same rule, so that an id
/// kept by one is kept by the next): 1 to 200 visible ASCII characters.
pub fn valid_request_id(id: &str) -> bool {
    (1..=200).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// A request served over HTTP (`otel.kind = server`): `method` and `route` (a template
/// or a configured route name, never a raw path), continuing the caller's trace from
/// `traceparent` when it sent a valid one. `service` names the component in a process
/// that runs several (`gateway`, `order`, `inventory`).
pub fn server(
    service: &'static str,
    method: &str,
    route: &str,
    traceparent: Option<&str>,
    request_id: Option<&str>,
) -> Span {
    let span = tracing::info_span!(
        "http.server",
        otel.name = format!("{method} {route}").trim_end(),
        otel.kind = "server",
        otel.status_code = Empty,
        eventyr.service = service,
        http.request.method = method,
        http.route = route,
        http.response.status_code = Empty,
        request_id = request_id,
        trace_id = Empty,
        span_id = Empty,
    );
    continue_trace(&span, traceparent);
    span
}

/// Names a server span by the route that took the request (the gateway knows it
/// only once routed).
pub fn record_route(span: &Span, method: &str, route: &str) {
    // The span has begun (its ids went upstream): it is renamed through its context.
    span.context()
        .span()
        .update_name(format!("{method} {route}"));
    span.record("http.route", route);
}

/// Records a server span's answer: its status code, and an error status for a 5xx.
pub fn record_status(span: &Span, status: u16) {
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// One message handled by a bus consumer (`otel.kind = consumer`), continuing the
/// trace of the event it carries.
pub fn consumer(consumer: &str, event_type: &str, traceparent: Option<&str>) -> Span {
    let span = tracing::info_span!(
        "bus.process",
        otel.name = format!("process {event_type}"),
        otel.kind = "consumer",
        messaging.system = "eventyr",
        messaging.consumer.group.name = consumer,
        messaging.message.type = event_type,
        trace_id = Empty,
        span_id = Empty,
    );
    continue_trace(&span, traceparent);
    span
}

/// The most events a projection batch's span links to.
const LINKS_MAX: usize = 128;

/// A batch of events applied by a projection (`otel.kind = consumer`): a trace of its
/// own — a batch mixes many — linked to the context of each event it applies (the
/// first 128).
pub fn projection_batch<'a>(projection: &str, traceparents: impl Iterator<Item = &'a str>) -> Span {
    let span = tracing::info_span!(
        "projection.apply",
        otel.name = format!("project {projection}"),
        otel.kind = "consumer",
        projection = projection,
        trace_id = Empty,
        span_id = Empty,
    );
    for traceparent in traceparents.take(LINKS_MAX) {
        if let Some(context) = remote_context(traceparent) {
            span.add_link(context.span().span_context().clone());
        }
    }
    record_ids(&span);
    span
}

/// A saga's life in the engine that runs it, under the trace that started it.
pub fn saga(saga_type: &str, saga_id: &str, traceparent: Option<&str>) -> Span {
    let span = tracing::info_span!(
        "saga",
        otel.name = format!("saga {saga_type}"),
        otel.kind = "internal",
        otel.status_code = Empty,
        saga.type = saga_type,
        saga.id = saga_id,
        saga.status = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    continue_trace(&span, traceparent);
    span
}

/// One attempt of a saga step (or of its compensation) sent to its participant
/// (`otel.kind = client`); the participant continues this span's trace.
pub fn saga_step(step: &str, attempt: u32, compensation: bool, saga: &Span) -> Span {
    let what = if compensation { "compensate" } else { "step" };
    let span = tracing::info_span!(
        parent: saga,
        "saga.step",
        otel.name = format!("{what} {step}"),
        otel.kind = "client",
        otel.status_code = Empty,
        saga.step = step,
        saga.attempt = attempt,
        saga.compensation = compensation,
        trace_id = Empty,
        span_id = Empty,
    );
    record_ids(&span);
    span
}

/// Sets `span`'s parent to the remote context in `traceparent` (when valid; otherwise
/// the span begins a trace) and records its ids.
fn continue_trace(span: &Span, traceparent: Option<&str>) {
    if let Some(parent) = traceparent.and_then(remote_context) {
        let _ = span.set_parent(parent);
    }
    record_ids(span);
}

fn record_ids(span: &Span) {
    if let Some(ids) = span_context(span) {
        span.record("trace_id", ids.trace_id().to_string());
        span.record("span_id", ids.span_id().to_string());
    }
}

/// `span`'s OpenTelemetry ids, if it has valid ones.
fn span_context(span: &Span) -> Option<opentelemetry::trace::SpanContext> {
    let context = span.context();
    let ids = context.span().span_context().clone();
    ids.is_valid().then_some(ids)
}

/// The remote parent in a `traceparent` value, if it is a valid one.
fn remote_context(traceparent: &str) -> Option<opentelemetry::Context> {
    let carrier = One(traceparent);
    let context = TraceContextPropagator::new().extract(&carrier);
    context.span().span_context().is_valid().then_some(context)
}

/// `span`'s context as a `traceparent` value, to hand to the next hop.
pub fn traceparent_of(span: &Span) -> Option<String> {
    span_context(span).map(|ids| {
        format!(
            "00-{}-{}-{:02x}",
            ids.trace_id(),
            ids.span_id(),
            ids.trace_flags().to_u8()
        )
    })
}

/// The current span's context as a `traceparent` value (or the current [`Hop`]'s).
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&Span::current()).or_else(|| HOP.try_with(|hop| hop.traceparent.clone()).ok())
}

/// The current trace's id (32 hex digits), for error bodies and `X-Trace-ID`.
pub fn current_trace_id() -> Option<String> {
    trace_id_of(&Span::current()).or_else(|| hop_ids().map(|(trace, _, _)| trace))
}

/// `span`'s trace id (32 hex digits).
pub fn trace_id_of(span: &Span) -> Option<String> {
    span_context(span).map(|ids| ids.trace_id().to_string())
}

/// Headers for an outgoing request that continue the current span's trace (empty
/// outside one).
pub fn headers() -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    if let Some(value) = current_traceparent().and_then(|v| http::HeaderValue::from_str(&v).ok()) {
        headers.insert(TRACEPARENT, value);
    }
    headers
}

/// The `traceparent` a request came with, if it is text.
pub fn extract(headers: &http::HeaderMap) -> Option<&str> {
    headers.get(TRACEPARENT).and_then(|v| v.to_str().ok())
}

struct One<'a>(&'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_subscriber_spans_are_inert() {
        let span = server("gateway", "GET", "/x", None, None);
        assert_eq!(traceparent_of(&span), None);
        assert_eq!(current_trace_id(), None);
    }

    #[test]
    fn request_ids_of_up_to_200_visible_characters_are_kept() {
        assert!(valid_request_id("r-1"));
        assert!(valid_request_id(&"x".repeat(200)));
        for bad in [String::new(), "x".repeat(201), "a b".into(), "é".into()] {
            assert!(!valid_request_id(&bad), "{bad:?}");
        }
    }

    #[test]
    fn a_valid_traceparent_is_a_remote_parent_and_garbage_is_not() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = remote_context(good).expect("valid");
        assert_eq!(
            context.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        for bad in [
            "",
            "00-xyz",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(remote_context(bad).is_none(), "{bad:?}");
        }
    }
}
