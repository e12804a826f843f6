//! `eventyr up` as a process: the demo orders reach their outcomes through the public
//! API; after a SIGKILL and a restart on the same data directory everything is still
//! there and new orders go on.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use eventyr_http::testing;
use serde_json::{Value, json};

/// Starts `eventyr up` on a free port; returns the process, the public API's URL and
/// the shipping service's.
fn up(dir: &Path) -> (Child, String, String) {
    up_with(dir, &[], Stdio::inherit())
}

fn up_with(dir: &Path, extra: &[&str], stderr: Stdio) -> (Child, String, String) {
    let mut args = vec!["up", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut child = common::eventyr(dir, &args)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("eventyr up starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut base = None;
    let shipping = loop {
        let line = lines
            .next()
            .expect("eventyr up printed its addresses")
            .expect("a line");
        if let Some(url) = line.strip_prefix("public API on ") {
            base = Some(url.to_owned());
        }
        if let Some(url) = line.trim().strip_prefix("shipping") {
            break url.trim().trim_start_matches("steps on ").to_owned();
        }
    };
    let base = base.expect("the public API's address comes first");
    // Keep reading so that the process never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, base, shipping)
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
    let response = reqwest::Client::new()
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
    let (mut first, base, shipping) = up(dir.path());
    let alice = place(&base, "a", json!({ "customer_id": "alice", "items": [{ "sku": "SKU-1", "quantity": 2 }], "points_to_use": 10 })).await;
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
    let slow = reqwest::Client::new()
        .put(format!("{shipping}/admin/faults"))
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

    let (mut second, base, _) = up(dir.path());
    assert_eq!(
        settled(&base, &alice).await["status"],
        "COMPLETED",
        "still there"
    );
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
async fn the_demo_drives_orders_and_every_invariant_holds() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut system, base, _) = up(dir.path());
    let args = [
        "demo",
        "--orders",
        "60",
        "--concurrency",
        "4",
        "--mix",
        "failures",
        "--url",
        &base,
    ];
    let demo = common::run(dir.path(), &args).await;
    let output = common::text(&demo.stdout);
    assert!(
        demo.status.success(),
        "{output}{}",
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
        assert!(output.contains(line), "no {line:?} in:\n{output}");
    }
    system.kill().expect("stop");
    system.wait().expect("reaped");
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
    system.kill().expect("stop");
    system.wait().expect("reaped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_is_down_refuses_connections_and_the_saga_waits_for_it() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut system, base, shipping) = up(dir.path());
    let client = reqwest::Client::new();
    let down = |down: bool| {
        client
            .put(format!("{base}/admin/faults/shipping"))
            .json(&json!({ "down": down }))
            .send()
    };
    assert_eq!(down(true).await.expect("set").status(), 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reqwest::get(format!("{shipping}/health/live"))
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, saga) = testing::get(&format!("{base}/admin/sagas/{order}")).await;
        let refused = saga["events"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["event"]["type"] == "StepFailed" && e["event"]["step"] == "shipping");
        if refused {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "shipping was never tried: {saga}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(down(false).await.expect("set").status(), 200);
    assert_eq!(
        settled(&base, &order).await["status"],
        "COMPLETED",
        "retried once it was up"
    );
    system.kill().expect("stop");
    system.wait().expect("reaped");
}
