//! The HTTP conventions on a real server on 127.0.0.1: error bodies with field
//! pointers, size limits, probes and faults.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::routing::post;
use axum::{Json, Router, middleware};
use eventyr_http::{
    ApiError, FaultSettings, Faults, FieldError, Input, ReadyCheck, Validate, conventions, probes,
};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Order {
    items: Vec<Line>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[allow(dead_code)]
    sku: String,
    quantity: u64,
}

impl Validate for Order {
    fn validate(&self) -> Vec<FieldError> {
        self.items
            .iter()
            .enumerate()
            .filter(|(_, l)| l.quantity == 0)
            .map(|(i, _)| FieldError::new(format!("/items/{i}/quantity"), "must be at least 1"))
            .collect()
    }
}

async fn serve() -> (String, Faults, Arc<AtomicBool>) {
    let faults = Faults::default();
    let up = Arc::new(AtomicBool::new(true));
    let ready: ReadyCheck = {
        let up = Arc::clone(&up);
        Arc::new(move || {
            let up = up.load(Ordering::SeqCst);
            Box::pin(async move {
                if up {
                    Ok(())
                } else {
                    Err("the store is down".into())
                }
            })
        })
    };
    let steps = Router::new()
        .route(
            "/internal/orders",
            post(|Input(order): Input<Order>| async move {
                Json(json!({ "lines": order.items.len() }))
            }),
        )
        .route(
            "/internal/refuse",
            post(|| async { ApiError::conflict("out_of_stock", "none left") }),
        )
        .layer(middleware::from_fn_with_state(
            faults.clone(),
            Faults::apply,
        ));
    let router = conventions(steps.merge(faults.router()).merge(probes(ready, None)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, router).await });
    (base, faults, up)
}

async fn post_json(base: &str, path: &str, body: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_error_body_with_the_offending_field() {
    let (base, _, _) = serve().await;
    let (status, body) = post_json(
        &base,
        "/internal/orders",
        r#"{"items":[{"sku":"A","quantity":2}]}"#,
    )
    .await;
    assert_eq!((status, body["lines"].clone()), (200, json!(1)));

    let (status, body) = post_json(
        &base,
        "/internal/orders",
        r#"{"items":[{"sku":"A","quantity":"two"}]}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_input");
    assert_eq!(body["fields"][0]["field"], "/items/0/quantity", "{body}");
    assert!(body["trace_id"].is_string());

    let (status, body) = post_json(
        &base,
        "/internal/orders",
        r#"{"items":[{"sku":"A","quantity":0}]}"#,
    )
    .await;
    assert_eq!(
        (status, body["fields"][0]["field"].clone()),
        (400, json!("/items/0/quantity"))
    );
    let (status, body) = post_json(&base, "/internal/orders", r#"{"items":[], "extra": 1}"#).await;
    assert_eq!(
        (status, body["fields"][0]["field"].clone()),
        (400, json!("/extra")),
        "{body}"
    );
    let (status, _) = post_json(&base, "/internal/orders", "{not json").await;
    assert_eq!(status, 400);

    let huge = format!(
        r#"{{"items":[{}]}}"#,
        vec![r#"{"sku":"A","quantity":1}"#; 5000].join(",")
    );
    let (status, body) = post_json(&base, "/internal/orders", &huge).await;
    assert_eq!(
        (status, body["error"].clone()),
        (413, json!("payload_too_large"))
    );

    let plain = reqwest::Client::new()
        .post(format!("{base}/internal/orders"))
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(plain.status(), 400);
    let missing = reqwest::get(format!("{base}/nowhere")).await.expect("get");
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.expect("json");
    assert_eq!(body["error"], "not_found");
    let wrong = reqwest::get(format!("{base}/internal/orders"))
        .await
        .expect("get");
    assert_eq!(wrong.status(), 405);
    let (status, body) = post_json(&base, "/internal/refuse", "{}").await;
    assert_eq!(
        (status, body["error"].clone()),
        (409, json!("out_of_stock"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_faults() {
    let (base, faults, up) = serve().await;
    assert_eq!(
        reqwest::get(format!("{base}/health/live"))
            .await
            .expect("live")
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{base}/health/ready"))
            .await
            .expect("ready")
            .status(),
        200
    );
    up.store(false, Ordering::SeqCst);
    let unready = reqwest::get(format!("{base}/health/ready"))
        .await
        .expect("ready");
    assert_eq!(unready.status(), 503);

    let client = reqwest::Client::new();
    let set = client
        .put(format!("{base}/admin/faults"))
        .json(&json!({ "failure_rate": 1.0 }))
        .send()
        .await
        .expect("set");
    assert_eq!(set.status(), 200);
    assert_eq!(
        faults.get(),
        FaultSettings {
            failure_rate: 1.0,
            ..FaultSettings::default()
        }
    );
    let (status, body) = post_json(&base, "/internal/orders", r#"{"items":[]}"#).await;
    assert_eq!((status, body["error"].clone()), (503, json!("unavailable")));
    let bad = client
        .put(format!("{base}/admin/faults"))
        .json(&json!({ "failure_rate": 2.0 }))
        .send()
        .await
        .expect("set");
    assert_eq!(bad.status(), 400);
}
