//! Telemetry for every Eventyr process: the metric names ([`names`]), their
//! descriptions, and the Prometheus recorder that the binary installs.
//!
//! Libraries record through the `metrics` facade with names from [`names`]; only the
//! binary calls [`install_prometheus`] and serves [`PrometheusHandle::render`] on
//! `/metrics`. Labels stay bounded: aggregate kinds, command and projection names,
//! outcomes — never ids or raw paths.

pub mod names;

pub use metrics;
pub use metrics_exporter_prometheus::PrometheusHandle;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// Latency buckets in seconds, from 100 µs to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

#[derive(Debug, thiserror::Error)]
#[error("cannot install the metrics recorder: {0}")]
pub struct TelemetryError(#[from] BuildError);

/// Installs the process-wide Prometheus recorder and describes every metric. Call once,
/// from the binary.
pub fn install_prometheus() -> Result<PrometheusHandle, TelemetryError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .install_recorder()?;
    names::describe();
    Ok(handle)
}
