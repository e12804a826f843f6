//! Telemetry for every Eventyr process: the metric names ([`names`]), the Prometheus
//! recorder the binary installs, the spans and trace context that follow a request
//! across HTTP and the bus ([`trace`]), the identity headers of every hop
//! ([`identity`]), and structured logs ([`logs`]).
//!
//! Libraries record through the `metrics` and `tracing` facades with names from this
//! crate; only the binary calls [`install_prometheus`] and [`init`]. Labels stay
//! bounded: aggregate kinds, command and projection names, outcomes — never ids or raw
//! paths.

pub mod identity;
pub mod logs;
pub mod names;
pub mod trace;

use std::io::IsTerminal as _;

pub use metrics;
pub use metrics_exporter_prometheus::PrometheusHandle;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Level;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Latency buckets in seconds, from 100 µs to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// What the logs show unless `log` says otherwise: info and up, without the gateway's
/// line per request (`eventyr_gateway::access=info` turns it on).
pub const LOG_DEFAULT: &str = "info,eventyr_gateway::access=off";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(#[from] BuildError),
    #[error("invalid log filter {filter:?}: {message}")]
    LogFilter { filter: String, message: String },
    #[error("cannot set up the OTLP trace exporter: {0}")]
    Exporter(String),
    #[error("a log subscriber is installed already")]
    Installed,
}

/// Installs the process-wide Prometheus recorder and describes every metric. Call once,
/// from the binary.
pub fn install_prometheus() -> Result<PrometheusHandle, TelemetryError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .install_recorder()?;
    names::describe();
    process_metrics().describe();
    Ok(handle)
}

/// The exposition for `/metrics`: every metric, with the process's own (CPU seconds,
/// resident memory, open files, threads, start time) read as of now.
pub fn render(handle: &PrometheusHandle) -> String {
    process_metrics().collect();
    handle.render()
}

fn process_metrics() -> &'static metrics_process::Collector {
    static COLLECTOR: std::sync::OnceLock<metrics_process::Collector> = std::sync::OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// JSON unless standard error is a terminal.
    #[default]
    Auto,
    Json,
    Text,
}

/// How a process logs and traces.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Level per module, as `RUST_LOG` directives (`info,eventyr_saga=debug`). Default
    /// [`LOG_DEFAULT`].
    pub log: Option<String>,
    pub log_format: LogFormat,
    /// The OTLP/HTTP base URL (`http://127.0.0.1:4318`); spans go to its `/v1/traces`
    /// as protobuf. Without it, `OTEL_EXPORTER_OTLP_ENDPOINT` and
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` are honoured; with none, nothing is exported
    /// (spans still give log lines and responses their trace ids).
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of exported spans.
    pub service_name: String,
}

/// The installed logging and tracing; dropping it flushes the spans not yet exported.
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    /// Whether spans leave the process.
    pub fn exporting(&self) -> bool {
        self.exporting
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if self.exporting {
            let _ = self.provider.force_flush();
        }
        let _ = self.provider.shutdown();
    }
}

/// Installs the process's log subscriber and tracer. Call once, from the binary.
pub fn init(settings: &Settings) -> Result<Telemetry, TelemetryError> {
    let directives = settings.log.as_deref().unwrap_or(LOG_DEFAULT);
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(directives)
        .map_err(|e| TelemetryError::LogFilter {
            filter: directives.to_owned(),
            message: e.to_string(),
        })?;
    let endpoint = settings
        .otlp_endpoint
        .as_deref()
        .map(|base| format!("{}/v1/traces", base.trim_end_matches('/')));
    let exporting = endpoint.is_some()
        || [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(settings.service_name.clone())
        .build();
    // Without an exporter nothing is recorded (the ids are still made: logs, answers
    // and the next hop need them), which keeps a span cheap.
    let sampler = if exporting {
        Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
    } else {
        Sampler::AlwaysOff
    };
    let mut provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(sampler);
    if exporting {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
        if let Some(endpoint) = endpoint {
            exporter = exporter.with_endpoint(endpoint);
        }
        let exporter = exporter
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    // Spans are always made (they give logs and responses their trace ids), whatever
    // the log filter; warnings and errors also become span events.
    // What the spans do not need, left out: the time between polls, an OpenTelemetry
    // context attached at every enter (nothing reads it: the context travels through
    // `trace`), the source location and thread of every span.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("eventyr"))
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_location(false)
        .with_threads(false)
        .with_filter(SpansAndWarnings);
    let json = match settings.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let lines = if json {
        tracing_subscriber::fmt::layer()
            .event_format(logs::JsonLines)
            // JsonLines takes the ids from the spans' own data: their fields need not
            // be formatted for every span.
            .fmt_fields(logs::NoSpanFields)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    };
    tracing_subscriber::registry()
        .with(logs::IdsLayer)
        .with(spans)
        .with(lines)
        .try_init()
        .map_err(|_| TelemetryError::Installed)?;
    trace::set_recording(exporting);
    Ok(Telemetry {
        provider,
        exporting,
    })
}

/// What the span layer takes: Eventyr's spans (those of [`trace`]; other crates' spans
/// would only be noise in a trace) and warnings and errors, which become span events.
///
/// Its interest in a callsite is never `always`: with per-layer filters, a callsite
/// cached as `always` skips `enabled`, and the layer then reads a decision left over
/// from another callsite (tokio-rs/tracing#2519) — a request's span went missing
/// whenever a `tracing::enabled!` check for the access log ran just before it.
struct SpansAndWarnings;

impl<S> tracing_subscriber::layer::Filter<S> for SpansAndWarnings {
    fn enabled(
        &self,
        metadata: &tracing::Metadata<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if metadata.is_span() {
            metadata.target().starts_with("eventyr")
        } else {
            *metadata.level() <= Level::WARN
        }
    }

    fn callsite_enabled(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        let wanted = if metadata.is_span() {
            metadata.target().starts_with("eventyr")
        } else {
            *metadata.level() <= Level::WARN
        };
        if wanted {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    }
}
