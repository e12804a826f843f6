//! Traces, logs and metrics of `eventyr up` as an operator sees them: spans exported
//! over OTLP/HTTP to a receiver in this test form one trace per order — the gateway,
//! the order API, the saga, each step and the participants that carry it out, over
//! HTTP and over the bus; the projection's batch links to it — and the log lines and
//! error bodies name that trace.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::{login, up_with};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::{Value, json};

/// One received span, reduced to what the checks read.
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    kind: i32,
    attributes: HashMap<String, String>,
    /// The trace ids this span links to.
    links: Vec<String>,
}

impl Span {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

type Received = Arc<Mutex<Vec<Span>>>;

/// An OTLP/HTTP receiver: `POST /v1/traces` with an `ExportTraceServiceRequest` in
/// protobuf. Returns its base URL and what it received.
async fn receiver() -> (String, Received) {
    async fn export(State(received): State<Received>, body: Bytes) -> Vec<u8> {
        let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
        let mut spans = received.lock().expect("lock");
        for resource in request.resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let attributes = span
                        .attributes
                        .iter()
                        .filter_map(|kv| {
                            let value = match kv.value.as_ref()?.value.as_ref()? {
                                AnyValue::StringValue(s) => s.clone(),
                                AnyValue::IntValue(i) => i.to_string(),
                                AnyValue::BoolValue(b) => b.to_string(),
                                AnyValue::DoubleValue(d) => d.to_string(),
                                _ => return None,
                            };
                            Some((kv.key.clone(), value))
                        })
                        .collect();
                    spans.push(Span {
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        name: span.name,
                        kind: span.kind,
                        attributes,
                        links: span.links.iter().map(|l| hex(&l.trace_id)).collect(),
                    });
                }
            }
        }
        // An empty ExportTraceServiceResponse.
        Vec::new()
    }
    let received = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", post(export))
        .with_state(Arc::clone(&received));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}"), received)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// OTLP span kinds.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const CONSUMER: i32 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_an_order_across_the_gateway_the_saga_http_and_the_bus() {
    let (endpoint, received) = receiver().await;
    let dir = tempfile::tempdir().expect("dir");
    let (mut system, base, services) = up_with(
        dir.path(),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--log",
            "info,eventyr_gateway::access=info",
        ],
        Stdio::piped(),
    );
    // Standard error is a pipe: JSON lines, kept for the checks below.
    let lines = kept_lines(system.stderr.take().expect("stderr"));
    let gateway = &services["gateway"];
    let token = login(gateway, "alice").await;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{gateway}/api/orders"))
        .bearer_auth(&token)
        .header("Idempotency-Key", "traced-1")
        .header("X-Request-ID", "trace-test-request-1")
        .json(&json!({
            "customer_id": "alice",
            "items": [{ "sku": "SKU-1", "quantity": 1 }],
            "points_to_use": 10
        }))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 202);
    assert_eq!(
        header(&response, "x-request-id").as_deref(),
        Some("trace-test-request-1")
    );
    let trace_id = header(&response, "x-trace-id").expect("X-Trace-ID");
    assert!(
        trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{trace_id}"
    );
    let placed: Value = response.json().await.expect("json");
    let order_id = placed["order_id"].as_str().expect("id").to_owned();
    common::wait_for("the order completes", async || {
        let order = common::get_json(&format!("{gateway}/api/orders/{order_id}"), &token).await;
        order["status"] == "COMPLETED"
    })
    .await;

    // The spans of the order's trace, once the gateway's, the saga's (it ends with the
    // saga) and the last step's participant's have been exported.
    let trace = |received: &Received| -> Vec<Span> {
        received
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    };
    let exported = |spans: &[Span]| {
        spans.iter().any(|s| s.name == "saga order")
            && spans.iter().any(|s| s.name == "POST orders-write")
            && spans
                .iter()
                .any(|s| s.attribute("eventyr.service") == Some("notification"))
            && spans
                .iter()
                .filter(|s| s.name == "process SagaStepReplied")
                .count()
                >= 3
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !exported(&trace(&received)) {
        let names: Vec<String> = received
            .lock()
            .expect("lock")
            .iter()
            .map(|s| format!("{} {} {}", s.name, s.trace_id, s.span_id))
            .collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "the spans of the order were not all exported: {names:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let spans = trace(&received);
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let names: Vec<(&str, &str, &str)> = spans
        .iter()
        .map(|s| (s.name.as_str(), s.span_id.as_str(), s.parent.as_str()))
        .collect();
    let one = |what: &str, matches: &dyn Fn(&Span) -> bool| -> Span {
        let found: Vec<&Span> = spans.iter().filter(|s| matches(s)).collect();
        assert!(!found.is_empty(), "no span {what} in {names:#?}");
        found[0].clone()
    };
    let parent_of = |span: &Span| -> Span {
        by_id
            .get(span.parent.as_str())
            .map(|s| (*s).clone())
            .unwrap_or_else(|| panic!("the parent of {} was not received: {names:#?}", span.name))
    };

    // The gateway began the trace; the order API continued it.
    let gateway_span = one("of the gateway", &|s| {
        s.attribute("eventyr.service") == Some("gateway")
            && s.attribute("http.route") == Some("orders-write")
    });
    assert_eq!(gateway_span.kind, SERVER);
    assert_eq!(gateway_span.parent, "", "the client sent no traceparent");
    assert_eq!(gateway_span.name, "POST orders-write");
    let api = one("of the order API", &|s| {
        s.attribute("http.route") == Some("/api/orders")
            && s.attribute("eventyr.service") == Some("api")
    });
    assert_eq!(api.kind, SERVER);
    assert_eq!(
        api.parent, gateway_span.span_id,
        "the API continues the gateway's span"
    );
    assert_eq!(
        api.attribute("request_id"),
        Some("trace-test-request-1"),
        "the request id travels with the request"
    );

    // The order service's price lookup at the inventory is part of the order's trace.
    let lookup = one("of the price lookup", &|s| {
        s.attribute("http.route") == Some("/api/inventory/{sku}")
    });
    assert_eq!(lookup.parent, api.span_id);

    // The orchestrator: the saga under the request that started it, a span per step.
    let saga = one("of the saga", &|s| s.name == "saga order");
    assert_eq!(
        saga.parent, api.span_id,
        "the saga starts in the order API's span"
    );
    assert_eq!(saga.attribute("saga.status"), Some("COMPLETED"));
    let step = |name: &str| {
        let step = one(&format!("of step {name}"), &|s| {
            s.name == format!("step {name}")
        });
        assert_eq!(step.kind, CLIENT);
        assert_eq!(step.parent, saga.span_id, "step {name} is the saga's");
        step
    };

    // Participants over HTTP continue their step's span in their own server span.
    for (participant, route) in [
        ("inventory", "/internal/reservations"),
        ("payment", "/internal/payments"),
    ] {
        let served = one(&format!("of {participant}"), &|s| {
            s.attribute("eventyr.service") == Some(participant)
                && s.attribute("http.route") == Some(route)
        });
        assert_eq!(served.kind, SERVER);
        assert_eq!(parent_of(&served).span_id, step(participant).span_id);
    }
    // Participants over the bus: the command's consumer continues the step's span
    // (the trace context rode in the event's envelope), and the service's handler runs
    // under it.
    for participant in ["points", "shipping", "notification"] {
        let served = one(&format!("of {participant}"), &|s| {
            s.attribute("eventyr.service") == Some(participant) && s.kind == SERVER
        });
        let consumed = parent_of(&served);
        assert_eq!(consumed.kind, CONSUMER, "{participant}: {consumed:?}");
        assert_eq!(
            consumed.attribute("messaging.consumer.group.name"),
            Some(format!("{participant}_saga_commands").as_str())
        );
        assert_eq!(parent_of(&consumed).span_id, step(participant).span_id);
        // Its reply, consumed by the orchestrator, continues the participant's trace.
        let replied = one(&format!("of {participant}'s reply"), &|s| {
            s.name == "process SagaStepReplied" && s.parent == consumed.span_id
        });
        assert_eq!(replied.kind, CONSUMER);
    }

    // The order list's projection applies the order's events in a batch of its own,
    // linked to the order's trace.
    common::wait_for("the projection's batch span is exported", async || {
        received
            .lock()
            .expect("lock")
            .iter()
            .any(|s| s.name == "project orders" && s.links.contains(&trace_id))
    })
    .await;

    // Log lines name their trace, span and request.
    let logged = lines.lock().expect("lock").clone();
    let access = logged
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| {
            line["target"] == "eventyr_gateway::access"
                && line["request_id"] == "trace-test-request-1"
        })
        .unwrap_or_else(|| panic!("no access log line of the request in {logged:#?}"));
    assert_eq!(access["trace_id"], trace_id.as_str(), "{access}");
    assert_eq!(access["span_id"], gateway_span.span_id.as_str(), "{access}");

    // An error body names the trace that the answer's X-Trace-ID names.
    let missing = client
        .get(format!("{gateway}/api/orders/no-such-order"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("send");
    error_names_its_trace(missing, 404).await;
    // Also when the gateway itself answers (401 without a token).
    let refused = client
        .get(format!("{gateway}/api/orders/{order_id}"))
        .send()
        .await
        .expect("send");
    error_names_its_trace(refused, 401).await;

    // Every listener of the process serves the same metrics; promtool finds no fault
    // in them, and the families of every part are there.
    let mut listeners = vec![format!("{gateway}/metrics"), format!("{base}/metrics")];
    listeners.extend(
        ["inventory", "payment", "points", "shipping", "notification"]
            .iter()
            .map(|service| format!("{}/metrics", services[*service])),
    );
    for url in &listeners {
        let text = scrape(url).await;
        promtool_check(url, &text);
        for family in [
            "http_server_request_duration_seconds",
            "http_client_request_duration_seconds",
            "eventyr_saga_started_total",
            "eventyr_saga_duration_seconds",
            "eventyr_gateway_ratelimit_decisions_total",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{url}: no {family}"
            );
        }
    }
    system.kill().expect("stop");
    system.wait().expect("reaped");
}

/// The lines a child writes to `stderr`, kept as they come.
fn kept_lines(stderr: std::process::ChildStderr) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            kept.lock().expect("lock").push(line);
        }
    });
    lines
}

/// An error answer has `status`, and its JSON body names the trace its `X-Trace-ID`
/// names.
async fn error_names_its_trace(response: reqwest::Response, status: u16) {
    assert_eq!(response.status(), status);
    let trace_id = header(&response, "x-trace-id").expect("X-Trace-ID");
    let body: Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["trace_id"], trace_id.as_str(), "{body}");
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn scrape(url: &str) -> String {
    let response = reqwest::get(url).await.expect("scrape");
    assert_eq!(response.status(), 200, "{url}");
    let kind = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        kind.starts_with("text/plain; version=0.0.4"),
        "{url}: {kind}"
    );
    response.text().await.expect("text")
}

/// `promtool check metrics` (Prometheus's own linter) on an exposition: it must pass
/// without a remark.
fn promtool_check(url: &str, text: &str) {
    use std::io::Write as _;
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/test installs the prometheus package)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let output = promtool.wait_with_output().expect("promtool ends");
    let remarks = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && remarks.trim().is_empty(),
        "promtool check metrics on {url}: {remarks}"
    );
}

/// `eventyr gateway` on its own serves its metrics on the admin port; promtool finds
/// no fault in them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_gateway_serves_metrics_that_promtool_accepts() {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream_address = upstream.local_addr().expect("address");
    let app = axum::Router::new().route("/hello", axum::routing::get(|| async { "hello" }));
    tokio::spawn(async move { axum::serve(upstream, app).await });
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "admin_listen = \"127.0.0.1:0\"\nlimits = {{ max_body_bytes = 1024 }}\n\n\
             [[clusters]]\nname = \"hello\"\nendpoints = [{{ url = \"http://{upstream_address}\" }}]\n\n\
             [[routes]]\nname = \"hello\"\npath = {{ prefix = \"/\" }}\ncluster = \"hello\"\n"
        ),
    )
    .expect("config");
    let mut gateway = common::Running(
        common::eventyr(
            dir.path(),
            &[
                "gateway",
                "--config",
                config.to_str().expect("utf-8"),
                "--listen",
                "127.0.0.1:0",
                "--log",
                "info,eventyr_gateway::access=info",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("eventyr gateway starts"),
    );
    let logs = kept_lines(gateway.stderr.take().expect("stderr"));
    let stdout = gateway.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (mut public, mut admin) = (None, None);
    while public.is_none() || admin.is_none() {
        let line = lines
            .next()
            .expect("the gateway printed its addresses")
            .expect("line");
        if let Some(rest) = line.strip_prefix("eventyr gateway on ") {
            public = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(url) = line.strip_prefix("admin API on ") {
            admin = Some(url.to_owned());
        }
    }
    let (public, admin) = (public.expect("public"), admin.expect("admin"));
    // No exporter: the gateway gives each request ids without a span of its own; the
    // answer, the access log line and an error body all name the same trace.
    let mut traces = Vec::new();
    for i in 0..3 {
        let response = reqwest::Client::new()
            .get(format!("{public}/hello"))
            .header("x-request-id", format!("standalone-{i}"))
            .send()
            .await
            .expect("proxied");
        assert_eq!(response.status(), 200);
        traces.push(header(&response, "x-trace-id").expect("X-Trace-ID"));
    }
    common::wait_for("the access log lines", async || {
        logs.lock()
            .expect("lock")
            .iter()
            .any(|l| l.contains("standalone-2"))
    })
    .await;
    let logged = logs.lock().expect("lock").clone();
    for (i, trace_id) in traces.iter().enumerate() {
        let line = logged
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["request_id"] == format!("standalone-{i}"))
            .unwrap_or_else(|| panic!("no access log line of request {i}: {logged:#?}"));
        assert_eq!(line["trace_id"], trace_id.as_str(), "{line}");
    }
    // An answer of the gateway's own (the body is over its limit; small enough for the
    // socket's buffer, so that the early answer does not cut the client's write).
    let refused = reqwest::Client::new()
        .post(format!("{public}/hello"))
        .body(vec![b'x'; 2048])
        .send()
        .await
        .expect("send");
    error_names_its_trace(refused, 413).await;
    let url = format!("{admin}/metrics");
    let text = scrape(&url).await;
    promtool_check(&url, &text);
    assert!(
        text.contains("http_server_request_duration_seconds_count{method=\"GET\",route=\"hello\",status=\"200\"} 3"),
        "{text}"
    );
}

/// The alert rules of `deploy/observability/` pass `promtool check rules`, their unit
/// tests (`promtool test rules`: each alert fires on a synthetic series) pass, and the
/// sample Prometheus configuration that loads them is valid.
#[test]
fn the_alert_rules_are_valid_and_each_one_fires() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/observability");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
        ["check", "config", "prometheus.yml"],
    ] {
        let output = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool runs (scripts/test installs the prometheus package)");
        assert!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The Grafana dashboard and the alert rules of `deploy/observability/` name only
/// metrics that Eventyr records (those of `eventyr-telemetry`'s `names`), and every
/// panel of the dashboard has a query.
#[test]
fn the_grafana_dashboard_and_the_alerts_use_only_metrics_that_exist() {
    use std::collections::BTreeSet;
    let names = include_str!("../../eventyr-telemetry/src/names.rs");
    let known: BTreeSet<&str> = names
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("eventyr_") || s.starts_with("http_"))
        .collect();
    assert!(known.len() > 40, "{known:?}");
    let used = |text: &str| -> Vec<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|t| t.starts_with("eventyr_") || t.starts_with("http_"))
            .map(|t| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| t.strip_suffix(suffix))
                    .unwrap_or(t)
                    .to_owned()
            })
            .collect()
    };
    let dashboard: Value = serde_json::from_str(include_str!(
        "../../../deploy/observability/grafana-dashboard.json"
    ))
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = 0;
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("an expr");
            queries += 1;
            for metric in used(expr) {
                assert!(
                    known.contains(metric.as_str()),
                    "{metric} (panel {})",
                    panel["title"]
                );
            }
        }
    }
    assert!(queries >= 20, "{queries} queries");
    let alerts = include_str!("../../../deploy/observability/alerts.yml");
    for metric in used(alerts) {
        assert!(known.contains(metric.as_str()), "{metric} in alerts.yml");
    }
}
