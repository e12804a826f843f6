//! The live dashboard of `eventyr up`: `GET /dashboard` (a page and its script and
//! style, embedded in the binary) and, for the admin role (the gateway's `/admin`
//! route), `GET /admin/dashboard` (a snapshot), `GET /admin/dashboard/stream`
//! (server-sent events: a snapshot a second) and `GET /admin/projections`,
//! `POST /admin/projections/{name}/rebuild`.
//!
//! One sampler task takes a snapshot a second — the saga monitor's figures, each
//! service's readiness, the projections, the bus consumers, the gateway and its rate
//! limits — and hands it to every stream; rates (events, requests, rate-limit
//! decisions a second) are differences between samples, and the last five minutes
//! of them are kept for the charts. Figures that the process also exports as metrics
//! are read from its own `/metrics` exposition, so the dashboard and Prometheus agree.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use eventyr_core::Timestamp;
use eventyr_cqrs::{ProjectionState, ProjectionsHandle};
use eventyr_gateway::gateway::Gateway;
use eventyr_gateway::ratelimit::KeyUsage;
use eventyr_http::ApiError;
use eventyr_saga::{SagaFigures, SagaMonitor};
use eventyr_store::EventStore;
use eventyr_telemetry::{PrometheusHandle, names};
use serde::Serialize;
use tokio::sync::watch;

/// How often a snapshot is taken (the page updates as often).
const EVERY: Duration = Duration::from_secs(1);
/// Samples kept for the charts: five minutes.
const HISTORY: usize = 300;
/// The window of the saga figures.
const SAGA_WINDOW: Duration = Duration::from_secs(3600);
/// Keys shown per rate-limit rule.
const KEYS_SHOWN: usize = 10;

const INDEX: &str = include_str!("../assets/dashboard/index.html");
const SCRIPT: &str = include_str!("../assets/dashboard/app.js");
const STYLE: &str = include_str!("../assets/dashboard/app.css");

/// What the dashboard watches.
pub struct Dashboard {
    pub monitor: Arc<SagaMonitor>,
    pub projections: ProjectionsHandle,
    pub metrics: Option<PrometheusHandle>,
    /// Each service's store, for the event throughput.
    pub stores: Vec<(&'static str, Arc<dyn EventStore>)>,
    /// Each service's own address, for its readiness (known once they listen).
    pub services: OnceLock<Vec<(&'static str, SocketAddr)>>,
    /// The gateway in front (known once it runs).
    pub gateway: OnceLock<Arc<Gateway>>,
    client: reqwest::Client,
    latest: watch::Sender<Option<Arc<str>>>,
    sampler: Mutex<Sampler>,
}

#[derive(Debug, Clone, Serialize)]
struct Snapshot {
    at: Timestamp,
    sagas: SagaFigures,
    services: Vec<ServiceHealth>,
    projections: Vec<ProjectionLine>,
    consumers: Vec<ConsumerLine>,
    gateway: GatewayFigures,
    ratelimits: Vec<RuleLine>,
    /// The last five minutes, a sample a second, oldest first.
    history: Vec<Sample>,
}

#[derive(Debug, Clone, Serialize)]
struct ServiceHealth {
    name: &'static str,
    address: String,
    ready: bool,
    detail: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct ProjectionLine {
    name: String,
    state: &'static str,
    error: Option<String>,
    /// The generation serving queries (a rebuild's promotion moves it on).
    generation: Option<u64>,
    position: u64,
    head: u64,
    lag_events: u64,
    lag_seconds: f64,
    events_applied: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
struct ConsumerLine {
    name: String,
    lag_messages: f64,
    acknowledged: f64,
    retries: f64,
    dead_letters: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
struct GatewayFigures {
    requests_total: f64,
    requests_per_second: f64,
    errors_per_second: f64,
    active: f64,
}

#[derive(Debug, Clone, Serialize)]
struct RuleLine {
    name: String,
    algorithm: String,
    limit: u64,
    period_s: f64,
    key: String,
    tier: Option<String>,
    shadow: bool,
    allowed: f64,
    limited: f64,
    allowed_per_second: f64,
    limited_per_second: f64,
    /// Allowed and limited a second, the last five minutes.
    history: Vec<RatePoint>,
    hottest: Vec<KeyUsage>,
    top_limited: Vec<KeyCount>,
}

#[derive(Debug, Clone, Serialize)]
struct KeyCount {
    key: String,
    count: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct RatePoint {
    allowed: f64,
    limited: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    at: Timestamp,
    events_per_second: f64,
    requests_per_second: f64,
    errors_per_second: f64,
}

/// Counters as of one sample, to take rates from.
#[derive(Default)]
struct Totals {
    at: Option<Instant>,
    events: u64,
    requests: f64,
    errors: f64,
    decisions: HashMap<String, RatePoint>,
}

#[derive(Default)]
struct Sampler {
    last: Totals,
    history: VecDeque<Sample>,
    rules: HashMap<String, VecDeque<RatePoint>>,
}

impl Dashboard {
    pub fn new(
        monitor: Arc<SagaMonitor>,
        projections: ProjectionsHandle,
        metrics: Option<PrometheusHandle>,
        stores: Vec<(&'static str, Arc<dyn EventStore>)>,
    ) -> Arc<Self> {
        Arc::new(Self {
            monitor,
            projections,
            metrics,
            stores,
            services: OnceLock::new(),
            gateway: OnceLock::new(),
            client: reqwest::Client::new(),
            latest: watch::Sender::new(None),
            sampler: Mutex::new(Sampler::default()),
        })
    }

    /// Takes a snapshot a second until `stop` rings.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = every.tick() => {}
            }
            let snapshot = self.sample().await;
            match serde_json::to_string(&snapshot) {
                Ok(json) => {
                    self.latest.send_replace(Some(Arc::from(json)));
                }
                Err(error) => tracing::warn!(%error, "cannot encode a dashboard snapshot"),
            }
        }
    }

    async fn sample(&self) -> Snapshot {
        let now = Instant::now();
        let exposition = self
            .metrics
            .as_ref()
            .map(PrometheusHandle::render)
            .unwrap_or_default();
        let metrics = Exposition(&exposition);
        let mut events = 0;
        for (_, store) in &self.stores {
            events += store.head().await.map_or(0, |head| head.0);
        }
        let services = self.health().await;
        let count = format!("{}_count", names::HTTP_SERVER_REQUEST_DURATION_SECONDS);
        let requests = metrics.sum(&count, |_| true);
        let errors = metrics.sum(&count, |labels| {
            label(labels, names::LABEL_STATUS).is_some_and(|s| s.starts_with('5'))
        });
        let mut decisions: HashMap<String, RatePoint> = HashMap::new();
        for (labels, value) in metrics.samples(names::GATEWAY_RATELIMIT_DECISIONS_TOTAL) {
            let Some(rule) = label(&labels, names::LABEL_RULE) else {
                continue;
            };
            let point = decisions.entry(rule.to_owned()).or_default();
            match label(&labels, names::LABEL_DECISION) {
                Some("allowed") => point.allowed += value,
                Some("limited" | "shadow_limited") => point.limited += value,
                _ => {}
            }
        }
        let totals = Totals {
            at: Some(now),
            events,
            requests,
            errors,
            decisions,
        };

        let mut sampler = self
            .sampler
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seconds = sampler
            .last
            .at
            .map_or(0.0, |at| now.duration_since(at).as_secs_f64());
        let rate = |now: f64, before: f64| {
            if seconds > 0.0 {
                ((now - before) / seconds).max(0.0)
            } else {
                0.0
            }
        };
        let sample = Sample {
            at: Timestamp::from_system_time(std::time::SystemTime::now()),
            events_per_second: rate(totals.events as f64, sampler.last.events as f64),
            requests_per_second: rate(totals.requests, sampler.last.requests),
            errors_per_second: rate(totals.errors, sampler.last.errors),
        };
        push(&mut sampler.history, sample);
        let mut ratelimits = Vec::new();
        if let Some(gateway) = self.gateway.get() {
            for rule in gateway.proxy().rules() {
                let config = &rule.config;
                let now_point = totals
                    .decisions
                    .get(&config.name)
                    .copied()
                    .unwrap_or_default();
                let before = sampler
                    .last
                    .decisions
                    .get(&config.name)
                    .copied()
                    .unwrap_or_default();
                let point = RatePoint {
                    allowed: rate(now_point.allowed, before.allowed),
                    limited: rate(now_point.limited, before.limited),
                };
                let history = sampler.rules.entry(config.name.clone()).or_default();
                push(history, point);
                ratelimits.push(RuleLine {
                    name: config.name.clone(),
                    algorithm: format!("{:?}", config.algorithm),
                    limit: config.limit,
                    period_s: config.period.as_secs_f64(),
                    key: format!("{:?}", config.key),
                    tier: config.tier.clone(),
                    shadow: config.shadow,
                    allowed: now_point.allowed,
                    limited: now_point.limited,
                    allowed_per_second: point.allowed,
                    limited_per_second: point.limited,
                    history: history.iter().copied().collect(),
                    hottest: rule.hottest(KEYS_SHOWN),
                    top_limited: rule
                        .most_limited(KEYS_SHOWN)
                        .into_iter()
                        .map(|k| KeyCount {
                            key: k.key,
                            count: k.denied,
                        })
                        .collect(),
                });
            }
        }
        let history = sampler.history.iter().copied().collect();
        sampler.last = totals;
        drop(sampler);

        Snapshot {
            at: sample.at,
            sagas: self.monitor.figures(sample.at, SAGA_WINDOW),
            services,
            projections: self.projections(),
            consumers: consumers(&metrics),
            gateway: GatewayFigures {
                requests_total: requests,
                requests_per_second: sample.requests_per_second,
                errors_per_second: sample.errors_per_second,
                active: metrics.sum(names::HTTP_SERVER_ACTIVE_REQUESTS, |_| true),
            },
            ratelimits,
            history,
        }
    }

    /// Each service's `/health/ready`, asked at once, a second at most.
    async fn health(&self) -> Vec<ServiceHealth> {
        let services = self.services.get().map(Vec::as_slice).unwrap_or_default();
        let asks = services.iter().map(|(name, address)| async move {
            let answer = self
                .client
                .get(format!("http://{address}/health/ready"))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            let (ready, detail) = match answer {
                Ok(response) if response.status().is_success() => (true, None),
                Ok(response) => (false, Some(format!("not ready ({})", response.status()))),
                Err(error) => (false, Some(format!("unreachable: {error}"))),
            };
            ServiceHealth {
                name,
                address: address.to_string(),
                ready,
                detail,
            }
        });
        futures::future::join_all(asks).await
    }

    fn projections(&self) -> Vec<ProjectionLine> {
        self.projections
            .status()
            .into_iter()
            .map(|p| {
                let (state, error) = match &p.state {
                    ProjectionState::Starting => ("starting", None),
                    ProjectionState::CatchingUp => ("catching up", None),
                    ProjectionState::Running => ("running", None),
                    ProjectionState::Rebuilding { .. } => ("rebuilding", None),
                    ProjectionState::Failed { error } => ("failed", Some(error.clone())),
                    ProjectionState::Stopped => ("stopped", None),
                };
                ProjectionLine {
                    name: p.name,
                    state,
                    error,
                    generation: p.generation.map(|g| g.0),
                    position: p.checkpoint.0,
                    head: p.head.0,
                    lag_events: p.lag_events,
                    lag_seconds: p.lag_ms as f64 / 1000.0,
                    events_applied: p.events_applied,
                }
            })
            .collect()
    }

    /// The latest snapshot, as JSON (taken now if the sampler has not run yet).
    async fn snapshot(&self) -> Arc<str> {
        if let Some(json) = self.latest.borrow().clone() {
            return json;
        }
        let json = serde_json::to_string(&self.sample().await).unwrap_or_default();
        Arc::from(json)
    }
}

fn push<T>(history: &mut VecDeque<T>, value: T) {
    if history.len() == HISTORY {
        history.pop_front();
    }
    history.push_back(value);
}

/// Each bus consumer, from the metrics.
fn consumers(metrics: &Exposition<'_>) -> Vec<ConsumerLine> {
    let mut lines: BTreeMap<String, ConsumerLine> = BTreeMap::new();
    type Field = fn(&mut ConsumerLine) -> &mut f64;
    let fields: [(&str, Field); 4] = [
        (names::BUS_CONSUMER_LAG_MESSAGES, |c| &mut c.lag_messages),
        (names::BUS_ACKNOWLEDGED_TOTAL, |c| &mut c.acknowledged),
        (names::BUS_RETRIES_TOTAL, |c| &mut c.retries),
        (names::BUS_DEAD_LETTERS, |c| &mut c.dead_letters),
    ];
    for (family, field) in fields {
        for (labels, value) in metrics.samples(family) {
            if let Some(consumer) = label(&labels, names::LABEL_CONSUMER) {
                let line = lines
                    .entry(consumer.to_owned())
                    .or_insert_with(|| ConsumerLine {
                        name: consumer.to_owned(),
                        ..ConsumerLine::default()
                    });
                *field(line) += value;
            }
        }
    }
    lines.into_values().collect()
}

/// A Prometheus text exposition, read back.
struct Exposition<'a>(&'a str);

impl<'a> Exposition<'a> {
    /// The samples of `family` (exactly that name: not its `_bucket`s), with labels.
    fn samples(&self, family: &str) -> impl Iterator<Item = (Vec<(&'a str, String)>, f64)> {
        self.0.lines().filter_map(move |line| {
            let rest = line.strip_prefix(family)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => {
                    let end = rest.rfind('}')?;
                    (parse_labels(&rest[..end]), rest[end + 1..].trim())
                }
                None if rest.starts_with(' ') => (Vec::new(), rest.trim()),
                None => return None,
            };
            let value = value.split_whitespace().next()?.parse().ok()?;
            Some((labels, value))
        })
    }

    fn sum(&self, family: &str, keep: impl Fn(&[(&str, String)]) -> bool) -> f64 {
        self.samples(family)
            .filter(|(labels, _)| keep(labels))
            .map(|(_, value)| value)
            .sum()
    }
}

/// `a="x",b="y\"z"` as pairs.
fn parse_labels(text: &str) -> Vec<(&str, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                other => value.push(other),
            }
        }
        labels.push((name.trim_start_matches(',').trim(), value));
        rest = &after[end..];
    }
    labels
}

fn label<'a>(labels: &'a [(&str, String)], name: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.as_str())
}

/// The dashboard's routes (see the module documentation).
pub fn router(dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/dashboard", get(index))
        .route("/dashboard/", get(index))
        .route(
            "/dashboard/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/dashboard/app.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route("/admin/dashboard", get(snapshot))
        .route("/admin/dashboard/stream", get(stream))
        .route("/admin/projections", get(projections))
        .route("/admin/projections/{name}/rebuild", post(rebuild))
        .with_state(dashboard)
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn snapshot(State(dashboard): State<Arc<Dashboard>>) -> Response {
    let json = dashboard.snapshot().await;
    (
        [(header::CONTENT_TYPE, "application/json")],
        json.to_string(),
    )
        .into_response()
}

/// Server-sent events: the latest snapshot at once, then each new one.
async fn stream(
    State(dashboard): State<Arc<Dashboard>>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let first = dashboard.snapshot().await;
    let mut updates = dashboard.latest.subscribe();
    updates.mark_unchanged();
    let events =
        futures::stream::unfold((Some(first), updates), |(first, mut updates)| async move {
            if let Some(json) = first {
                return Some((
                    Ok(Event::default().event("snapshot").data(&*json)),
                    (None, updates),
                ));
            }
            updates.changed().await.ok()?;
            let json = updates.borrow_and_update().clone()?;
            Some((
                Ok(Event::default().event("snapshot").data(&*json)),
                (None, updates),
            ))
        });
    Sse::new(events).keep_alive(KeepAlive::default())
}

async fn projections(State(dashboard): State<Arc<Dashboard>>) -> Response {
    axum::Json(dashboard.projections()).into_response()
}

async fn rebuild(State(dashboard): State<Arc<Dashboard>>, Path(name): Path<String>) -> Response {
    match dashboard.projections.rebuild(&name).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({ "name": name, "accepted": true })),
        )
            .into_response(),
        Err(eventyr_cqrs::ProjectionsError::Unknown(_)) => {
            ApiError::not_found(format!("no projection is named {name}")).into_response()
        }
        Err(error) => ApiError::unavailable(error.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_reads_back_families_labels_and_values() {
        let text = "# TYPE x_total counter\n\
                    x_total{rule=\"a\",decision=\"allowed\"} 3\n\
                    x_total{rule=\"a\\\"b\",decision=\"limited\"} 2\n\
                    x_total_more 9\n\
                    y 1.5\n";
        let metrics = Exposition(text);
        let samples: Vec<_> = metrics.samples("x_total").collect();
        assert_eq!(samples.len(), 2);
        assert_eq!(label(&samples[1].0, "rule"), Some("a\"b"));
        assert_eq!(metrics.sum("x_total", |_| true), 5.0);
        assert_eq!(metrics.sum("y", |_| true), 1.5);
    }
}
