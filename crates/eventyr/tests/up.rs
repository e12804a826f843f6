//! `eventyr up` as a process: the demo orders reach their outcomes through the public
//! API (the gateway: logins, permissions, the details aggregation); after a SIGKILL
//! and a restart on the same data directory everything is still there (sessions too)
//! and new orders go on.

mod common;

use common::{Running, login, up_with};

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use eventyr_http::testing;
use serde_json::{Value, json};

/// Starts `eventyr up` on a free port; returns the process, the URL of the services'
/// API behind the gateway (no login), and each participant service's (the gateway's,
/// the public API, under `gateway`).
fn up(dir: &Path) -> (Running, String, HashMap<String, String>) {
    up_with(dir, &[], Stdio::inherit())
}

/// Writes stock held for `order_id` into the inventory's store behind the services'
/// back: an inconsistency for the reconciliation to find.
async fn leak_reservation(dir: &Path, order_id: &str) {
    let store = eventyr_store_sqlite::SqliteStore::open(eventyr_store_sqlite::SqliteOptions::new(
        dir.join("services/inventory.db"),
    ))
    .expect("store");
    let leaked = eventyr_core::NewEvent::json(
        "InventoryReserved",
        &json!({ "reservation_id": order_id, "quantity": 1, "available": 0 }),
    )
    .expect("event");
    eventyr_store::EventStore::append(
        &store,
        eventyr_store::StreamAppend::new(
            eventyr_core::StreamId::new("item-SKU-RARE").expect("stream"),
            eventyr_store::ExpectedVersion::Any,
            vec![leaked],
        ),
    )
    .await
    .expect("append");
}

async fn place(base: &str, key: &str, body: Value) -> String {
    let response = common::internal()
        .post(format!("{base}/api/orders"))
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 202);
    let placed: Value = response.json().await.expect("json");
    placed["order_id"].as_str().expect("id").to_owned()
}

/// `method path` at the gateway with `token`: the status and the answer.
async fn call(
    gateway: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let url = format!("{gateway}{path}");
    let mut request = match method {
        "POST" => client.post(url),
        _ => client.get(url),
    };
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.header("Idempotency-Key", path).json(&body);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn settled(base: &str, order_id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, order) = testing::get(&format!("{base}/api/orders/{order_id}")).await;
        if order["status"] != "PENDING" && !order["status"].is_null() {
            return order;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{order_id} never settled: {order}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_serves_the_demo_and_survives_sigkill() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut first, base, services) = up(dir.path());
    let gateway = services["gateway"].clone();

    // The public API is the gateway's: a login first, then the customer's permissions.
    let order = json!({ "customer_id": "alice", "items": [{ "sku": "SKU-1", "quantity": 2 }], "points_to_use": 10 });
    let (status, answer) = call(&gateway, None, "POST", "/api/orders", Some(order.clone())).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("unauthenticated"))
    );
    let alice_token = login(&gateway, "alice").await;
    let (status, placed) = call(
        &gateway,
        Some(&alice_token),
        "POST",
        "/api/orders",
        Some(order),
    )
    .await;
    assert_eq!(status, 202, "{placed}");
    let alice = placed["order_id"].as_str().expect("id").to_owned();
    let (status, answer) = call(&gateway, Some(&alice_token), "GET", "/admin/sagas", None).await;
    assert_eq!((status, answer["error"].as_str()), (403, Some("forbidden")));
    let admin_token = login(&gateway, "admin").await;
    let (status, sagas) = call(&gateway, Some(&admin_token), "GET", "/admin/sagas", None).await;
    assert_eq!(status, 200, "{sagas}");
    let (status, limits) = call(
        &gateway,
        Some(&admin_token),
        "GET",
        "/admin/ratelimits",
        None,
    )
    .await;
    assert_eq!(status, 200, "{limits}");
    let rare = place(
        &base,
        "r",
        json!({ "customer_id": "alice", "items": [{ "sku": "SKU-RARE", "quantity": 5 }] }),
    )
    .await;
    let bob = place(
        &base,
        "b",
        json!({ "customer_id": "bob", "items": [{ "sku": "SKU-5", "quantity": 2 }] }),
    )
    .await;
    assert_eq!(settled(&base, &alice).await["status"], "COMPLETED");
    // The aggregation: the order with its payment and shipment, in one answer.
    let (status, details) = call(
        &gateway,
        Some(&alice_token),
        "GET",
        &format!("/api/orders/{alice}/details"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{details}");
    assert_eq!(details["order"]["status"], "COMPLETED", "{details}");
    assert_eq!(
        details["payments"]["items"][0]["status"], "CHARGED",
        "{details}"
    );
    assert_eq!(
        details["shipments"]["items"][0]["order_id"],
        alice.as_str(),
        "{details}"
    );
    assert_eq!(settled(&base, &rare).await["status"], "FAILED");
    assert_eq!(settled(&base, &bob).await["status"], "FAILED");
    let (_, points) = testing::get(&format!("{base}/api/customers/alice/points")).await;
    assert_eq!(points["balance"], 490);
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(r#"eventyr_saga_finished_total{saga_type="order",status="COMPLETED"}"#),
        "{metrics}"
    );

    // Orders under way when the process dies: shipping answers slowly.
    let slow = common::internal()
        .put(format!("{}/admin/faults", services["shipping"]))
        .json(&json!({ "latency_ms": 2000 }))
        .send()
        .await
        .expect("set faults");
    assert_eq!(slow.status(), 200);
    let mut under_way = Vec::new();
    for i in 0..20 {
        let key = format!("k{i}");
        under_way.push(
            place(
                &base,
                &key,
                json!({ "customer_id": "alice", "items": [{ "sku": "SKU-2", "quantity": 1 }] }),
            )
            .await,
        );
    }
    let (_, pending) =
        testing::get(&format!("{base}/admin/sagas?status=IN_PROGRESS&limit=100")).await;
    assert!(
        !pending.as_array().expect("sagas").is_empty(),
        "sagas were under way"
    );
    first.kill().expect("SIGKILL");
    first.wait().expect("reaped");

    let (mut second, base, services) = up(dir.path());
    assert_eq!(
        settled(&base, &alice).await["status"],
        "COMPLETED",
        "still there"
    );
    // Sessions and token keys outlive the process: alice is still logged in.
    let (status, order) = call(
        &services["gateway"],
        Some(&alice_token),
        "GET",
        &format!("/api/orders/{alice}"),
        None,
    )
    .await;
    assert_eq!((status, order["status"].as_str()), (200, Some("COMPLETED")));
    for order in &under_way {
        assert_eq!(
            settled(&base, order).await["status"],
            "COMPLETED",
            "resumed: {order}"
        );
    }
    let (_, stock) = testing::get(&format!("{base}/api/inventory/SKU-2")).await;
    assert_eq!(
        (stock["available"].clone(), stock["reserved"].clone()),
        (json!(980), json!(0)),
        "each once"
    );
    second.kill().expect("stop");
    second.wait().expect("reaped");

    // The invariants hold across the services.
    let reconciled = common::run(dir.path(), &["reconcile"]).await;
    let report = common::text(&reconciled.stdout);
    assert!(
        reconciled.status.success(),
        "{report}{}",
        common::text(&reconciled.stderr)
    );
    assert!(report.contains("every invariant holds"), "{report}");

    // A reservation left held for a failed order is reported.
    leak_reservation(dir.path(), &rare).await;
    let broken = common::run(dir.path(), &["reconcile"]).await;
    assert!(!broken.status.success());
    let report = common::text(&broken.stdout);
    assert!(
        report.contains(&format!("MISMATCH order_outcome {rare}")),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_drives_orders_and_every_invariant_holds_in_both_saga_modes() {
    for mode in ["orchestrated", "choreographed"] {
        let dir = tempfile::tempdir().expect("dir");
        let (mut system, _, services) =
            up_with(dir.path(), &["--saga-mode", mode], Stdio::inherit());
        let args = [
            "demo",
            "--orders",
            "60",
            "--concurrency",
            "4",
            "--mix",
            "failures",
            "--url",
            &services["gateway"],
        ];
        // Through the gateway, logged in as admin (the default).
        let demo = common::run(dir.path(), &args).await;
        let output = common::text(&demo.stdout);
        assert!(
            demo.status.success(),
            "{mode}: {output}{}",
            common::text(&demo.stderr)
        );
        for line in [
            "60 orders in",
            "COMPLETED",
            "out of stock",
            "payment declined",
            "insufficient points",
            "every invariant holds",
        ] {
            assert!(output.contains(line), "{mode}: no {line:?} in:\n{output}");
        }
        system.kill().expect("stop");
        system.wait().expect("reaped");
    }
}

/// A failure reason without the address of the service that gave it (HTTP calls name
/// the host; calls in process do not).
fn without_host(reason: &str) -> String {
    match reason.split_once("POST http://") {
        Some((before, after)) => {
            let path = after.find('/').map_or("", |i| &after[i..]);
            format!("{before}POST {path}")
        }
        None => reason.to_owned(),
    }
}

/// The same orders — completed, out of stock, declined, without enough points, and
/// with a notifier that always fails — end the same way in both saga modes, and the
/// tracker (choreographed) or the engine (orchestrated) shows each one finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_saga_modes_give_the_same_outcomes() {
    let orders = [
        json!({ "customer_id": "alice", "items": [{ "sku": "SKU-1", "quantity": 2 }], "points_to_use": 10 }),
        json!({ "customer_id": "alice", "items": [{ "sku": "SKU-2", "quantity": 1 }, { "sku": "SKU-3", "quantity": 2 }] }),
        json!({ "customer_id": "alice", "items": [{ "sku": "SKU-RARE", "quantity": 5 }] }),
        json!({ "customer_id": "alice", "items": [{ "sku": "SKU-1", "quantity": 1 }, { "sku": "SKU-RARE", "quantity": 5 }] }),
        json!({ "customer_id": "bob", "items": [{ "sku": "SKU-20", "quantity": 1 }] }),
        json!({ "customer_id": "bob", "items": [{ "sku": "SKU-1", "quantity": 1 }], "points_to_use": 10 }),
    ];
    let mut outcomes = Vec::new();
    for mode in ["orchestrated", "choreographed"] {
        let dir = tempfile::tempdir().expect("dir");
        let (mut system, base, _) = up_with(dir.path(), &["--saga-mode", mode], Stdio::inherit());
        let failing = common::internal()
            .put(format!("{base}/admin/faults/notification"))
            .json(&json!({ "failure_rate": 1.0 }))
            .send()
            .await
            .expect("set");
        assert_eq!(failing.status(), 200);
        let mut ids = Vec::new();
        for (i, body) in orders.iter().enumerate() {
            ids.push(place(&base, &format!("same-{i}"), body.clone()).await);
        }
        let mut ended = Vec::new();
        for id in &ids {
            let order = settled(&base, id).await;
            let reason = order["failure_reason"].as_str().map(without_host);
            ended.push((
                order["status"].as_str().unwrap_or_default().to_owned(),
                reason,
            ));
            let finished = if mode == "orchestrated" {
                let (_, saga) = testing::get(&format!("{base}/admin/sagas/{id}")).await;
                saga["status"].clone()
            } else {
                let (_, flow) = testing::get(&format!("{base}/admin/flows/{id}")).await;
                flow["status"].clone()
            };
            let expected = if order["status"] == "COMPLETED" {
                "COMPLETED"
            } else {
                "COMPENSATED"
            };
            assert_eq!(finished, expected, "{mode}: {id}: {order}");
        }
        let (_, sent) = testing::get(&format!("{base}/api/notifications?customer_id=alice")).await;
        assert_eq!(
            sent["items"],
            json!([]),
            "{mode}: the notifier always fails"
        );
        let reconciled = common::run(dir.path(), &["reconcile"]).await;
        assert!(
            reconciled.status.success(),
            "{mode}: {}",
            common::text(&reconciled.stdout)
        );
        outcomes.push(ended);
        system.kill().expect("stop");
        system.wait().expect("reaped");
    }
    let statuses: Vec<&str> = outcomes[0].iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        statuses,
        [
            "COMPLETED",
            "COMPLETED",
            "FAILED",
            "FAILED",
            "FAILED",
            "FAILED"
        ],
        "{outcomes:?}"
    );
    assert_eq!(outcomes[0], outcomes[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_reconciliation_reports_an_inconsistency() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut system, base, _) = up_with(dir.path(), &["--reconcile-every", "1s"], Stdio::piped());
    let stderr = system.stderr.take().expect("stderr");
    let failed = place(
        &base,
        "r",
        json!({ "customer_id": "alice", "items": [{ "sku": "SKU-RARE", "quantity": 5 }] }),
    )
    .await;
    assert_eq!(settled(&base, &failed).await["status"], "FAILED");
    leak_reservation(dir.path(), &failed).await;
    let found = tokio::task::spawn_blocking(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|line| line.contains("Data inconsistency detected"))
    });
    let line = tokio::time::timeout(Duration::from_secs(30), found)
        .await
        .expect("reported within 30 s")
        .expect("join")
        .expect("a report line");
    assert!(line.contains(&failed), "{line}");
    // Standard error is a pipe: the log line is one JSON object.
    let record: Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(record["level"], "ERROR", "{line}");
    assert_eq!(record["message"], "Data inconsistency detected", "{line}");
    system.kill().expect("stop");
    system.wait().expect("reaped");
}

/// Choreographed orders under way when the process dies finish after the restart —
/// in orchestrated mode, which changes only how new orders run — each effect once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choreographed_orders_survive_sigkill_and_a_change_of_mode() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut first, base, services) = up_with(
        dir.path(),
        &["--saga-mode", "choreographed"],
        Stdio::inherit(),
    );
    let slow = common::internal()
        .put(format!("{}/admin/faults", services["shipping"]))
        .json(&json!({ "latency_ms": 1500 }))
        .send()
        .await
        .expect("set faults");
    assert_eq!(slow.status(), 200);
    let mut under_way = Vec::new();
    for i in 0..20 {
        let body = if i % 5 == 4 {
            json!({ "customer_id": "bob", "items": [{ "sku": "SKU-2", "quantity": 1 }], "points_to_use": 10 })
        } else {
            json!({ "customer_id": "alice", "items": [{ "sku": "SKU-2", "quantity": 1 }] })
        };
        under_way.push((place(&base, &format!("c{i}"), body).await, i % 5 != 4));
    }
    common::wait_for("choreographed orders under way", async || {
        let (_, flows) = testing::get(&format!("{base}/admin/flows")).await;
        flows
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["status"] == "IN_PROGRESS"))
    })
    .await;
    first.kill().expect("SIGKILL");
    first.wait().expect("reaped");

    let (mut second, base, _) = up_with(
        dir.path(),
        &["--saga-mode", "orchestrated"],
        Stdio::inherit(),
    );
    for (order, completes) in &under_way {
        let expected = if *completes { "COMPLETED" } else { "FAILED" };
        assert_eq!(settled(&base, order).await["status"], expected, "{order}");
        let (_, flow) = testing::get(&format!("{base}/admin/flows/{order}")).await;
        let expected = if *completes {
            "COMPLETED"
        } else {
            "COMPENSATED"
        };
        assert_eq!(flow["status"], expected, "{flow}");
    }
    let (_, stock) = testing::get(&format!("{base}/api/inventory/SKU-2")).await;
    assert_eq!(
        (stock["available"].clone(), stock["reserved"].clone()),
        (json!(984), json!(0)),
        "each once"
    );
    second.kill().expect("stop");
    second.wait().expect("reaped");
    let reconciled = common::run(dir.path(), &["reconcile"]).await;
    assert!(
        reconciled.status.success(),
        "{}",
        common::text(&reconciled.stdout)
    );
}

/// Waits until `order`'s saga has an event of `event_type` for `step`.
async fn saga_event(base: &str, order: &str, event_type: &str, step: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, saga) = testing::get(&format!("{base}/admin/sagas/{order}")).await;
        let seen = saga["events"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["event"]["type"] == event_type && e["event"]["step"] == step);
        if seen {
            return saga;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {event_type} of {step}: {saga}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_is_down_refuses_connections_and_the_saga_waits_for_it() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut system, base, services) = up(dir.path());
    let client = common::internal();
    let down = |service: &str, down: bool| {
        client
            .put(format!("{base}/admin/faults/{service}"))
            .json(&json!({ "down": down }))
            .send()
    };

    // Payment, called over HTTP: its listener closes; the step fails to connect and
    // is retried until it is back.
    assert_eq!(down("payment", true).await.expect("set").status(), 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reqwest::get(format!("{}/health/live", services["payment"]))
        .await
        .is_ok()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let order = place(
        &base,
        "d",
        json!({ "customer_id": "alice", "items": [{ "sku": "SKU-3", "quantity": 1 }] }),
    )
    .await;
    saga_event(&base, &order, "StepFailed", "payment").await;
    assert_eq!(down("payment", false).await.expect("set").status(), 200);
    assert_eq!(
        settled(&base, &order).await["status"],
        "COMPLETED",
        "retried once it was up"
    );

    // Shipping, reached over the bus: while it is down its commands wait on the bus;
    // once it is up it takes them and the saga goes on.
    assert_eq!(down("shipping", true).await.expect("set").status(), 200);
    let order = place(
        &base,
        "e",
        json!({ "customer_id": "alice", "items": [{ "sku": "SKU-3", "quantity": 1 }] }),
    )
    .await;
    saga_event(&base, &order, "StepRequested", "shipping").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, saga) = testing::get(&format!("{base}/admin/sagas/{order}")).await;
    assert_eq!(
        saga["status"], "IN_PROGRESS",
        "shipping answered while down: {saga}"
    );
    assert_eq!(down("shipping", false).await.expect("set").status(), 200);
    assert_eq!(settled(&base, &order).await["status"], "COMPLETED");
    system.kill().expect("stop");
    system.wait().expect("reaped");
}

/// The demonstration knobs can be set in eventyr.toml; a knob of no service, or out of
/// range, is refused with its name before anything starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_set_in_the_config_file_apply_from_the_start() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("eventyr.toml"),
        "[faults.notification]\nfailure_rate = 0.5\n\n[faults.shipping]\nlatency_ms = 20\n",
    )
    .expect("config");
    let (mut system, base, _) = up(dir.path());
    let (_, knobs) = testing::get(&format!("{base}/admin/faults/notification")).await;
    assert_eq!(
        knobs,
        json!({ "failure_rate": 0.5, "latency_ms": 0, "down": false })
    );
    let (_, knobs) = testing::get(&format!("{base}/admin/faults/shipping")).await;
    assert_eq!(knobs["latency_ms"], 20);
    system.kill().expect("stop");
    system.wait().expect("reaped");

    // The services' consumers keep their dead letters where `dlq --service` looks.
    let listed = common::run(dir.path(), &["dlq", "list", "--service", "notification"]).await;
    assert!(listed.status.success(), "{}", common::text(&listed.stderr));
    let unknown = common::run(dir.path(), &["dlq", "list", "--service", "../x"]).await;
    assert!(!unknown.status.success());
    assert!(common::text(&unknown.stderr).contains("no service ../x"));

    for (config, error) in [
        (
            "[faults.warehouse]\ndown = true\n",
            "faults.warehouse: no such service",
        ),
        (
            "[faults.payment]\nfailure_rate = 2.0\n",
            "faults.payment.failure_rate",
        ),
    ] {
        std::fs::write(dir.path().join("eventyr.toml"), config).expect("config");
        let refused = common::run(dir.path(), &["up", "--listen", "127.0.0.1:0"]).await;
        let stderr = common::text(&refused.stderr);
        assert!(!refused.status.success(), "{stderr}");
        assert!(stderr.contains(error), "{stderr}");
    }
}

/// Readiness tells the truth: a projection that stops (its read model's table gone
/// from under it, by another process) makes the order service unready, naming it,
/// while the participants stay ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_goes_503_when_a_projection_stops() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut system, base, services) = up(dir.path());
    let ready = format!("{base}/health/ready");
    assert_eq!(reqwest::get(&ready).await.expect("probe").status(), 200);
    let body = json!({ "customer_id": "alice", "items": [{ "sku": "SKU-1", "quantity": 1 }] });
    let first = place(&base, "r1", body.clone()).await;
    settled(&base, &first).await;
    // The fault: the order list's table dropped by another process.
    let read = dir.path().join("services/order-read");
    let file = std::fs::read_dir(&read)
        .expect("the read models")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("orders.") && n.ends_with(".db"))
        })
        .expect("the order list's file");
    rusqlite::Connection::open(&file)
        .and_then(|c| c.execute_batch("DROP TABLE orders"))
        .expect("dropped");
    place(&base, "r2", body).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let response = reqwest::get(&ready).await.expect("probe");
        if response.status() == 503 {
            let answer: Value = response.json().await.expect("json");
            assert!(
                answer["checks"]["dependencies"]
                    .as_str()
                    .is_some_and(|d| d.contains("projection orders stopped")),
                "{answer}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never unready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let payment = format!("{}/health/ready", services["payment"]);
    assert_eq!(reqwest::get(&payment).await.expect("probe").status(), 200);
    system.kill().expect("kill");
}

/// Sends `signal` (TERM, INT) to `process`.
fn signal(process: &Running, signal: &str) {
    let sent = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(process.id().to_string())
        .status()
        .expect("kill");
    assert!(sent.success());
}

/// Waits up to `within` for `process` to exit; its status.
async fn exited(process: &mut Running, within: Duration) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(status) = process.try_wait().expect("wait") {
            return status;
        }
        assert!(tokio::time::Instant::now() < deadline, "still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM under load: readiness goes 503 first, no request is answered with an
/// error, the process exits 0, and every order it took reaches its end after a
/// restart. A second signal stops at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut system, base, _) = up_with(dir.path(), &["--drain-delay", "1s"], Stdio::inherit());
    let client = common::internal();
    // The signal comes once the load is under way (a few orders answered).
    let (progress, mut under_way) = tokio::sync::watch::channel(0usize);
    let load = {
        let (base, client) = (base.clone(), client.clone());
        tokio::spawn(async move {
            let mut answered = Vec::new();
            for i in 0..10_000 {
                let body =
                    json!({ "customer_id": "alice", "items": [{ "sku": "SKU-4", "quantity": 1 }] });
                let sent = client
                    .post(format!("{base}/api/orders"))
                    .header("Idempotency-Key", format!("drain-{i}"))
                    .json(&body)
                    .send()
                    .await;
                match sent {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let order: Value = response.json().await.unwrap_or(Value::Null);
                        answered.push((status, order["order_id"].as_str().map(str::to_owned)));
                        progress.send_replace(answered.len());
                    }
                    // The listener has stopped taking connections: the load ends.
                    Err(_) => return answered,
                }
            }
            answered
        })
    };
    tokio::time::timeout(Duration::from_secs(30), under_way.wait_for(|n| *n >= 5))
        .await
        .expect("the load gets going")
        .expect("the load runs");
    signal(&system, "TERM");
    // Readiness says so before the listeners go.
    let ready = format!("{base}/health/ready");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = client.get(&ready).send().await.map(|r| r.status().as_u16());
        if status.as_ref().is_ok_and(|s| *s == 503) {
            break;
        }
        assert!(
            status.is_ok() && tokio::time::Instant::now() < deadline,
            "readiness never said 503 before the listener closed: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = exited(&mut system, Duration::from_secs(40)).await;
    assert!(status.success(), "{status:?}");
    let answered = load.await.expect("joined");
    assert!(!answered.is_empty());
    assert!(
        answered.iter().all(|(status, _)| *status == 202),
        "only acceptances: {:?}",
        answered
            .iter()
            .filter(|(s, _)| *s != 202)
            .collect::<Vec<_>>()
    );

    // Every order it took ends after a restart; a second signal stops at once.
    let (mut second, base, _) = up_with(dir.path(), &[], Stdio::inherit());
    for (_, order) in &answered {
        let order = order.as_deref().expect("an order id");
        let done = settled(&base, order).await;
        assert_eq!(done["status"], "COMPLETED", "{done}");
    }
    signal(&second, "TERM");
    signal(&second, "TERM");
    let status = exited(&mut second, Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(130), "stopped at once");
}
