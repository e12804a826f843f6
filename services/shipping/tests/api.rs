//! The shipping service's HTTP API on a real server on 127.0.0.1: one shipment per
//! order, created once, cancelled once, a cancel first tombstoning it.

use std::sync::Arc;

use eventyr_cqrs::{CommandHandler, HandlerOptions, Upcasters};
use eventyr_http::Faults;
use eventyr_http::testing::{self, serve};
use eventyr_store::{EventStore, MemoryStore};
use serde_json::json;
use shipping::api::{Shipping, router};

async fn service() -> String {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
    let shipments = Arc::new(CommandHandler::new(
        store,
        Arc::new(Upcasters::new()),
        HandlerOptions::default(),
    ));
    serve(testing::app(router(Shipping {
        shipments,
        faults: Faults::default(),
    })))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipment_is_created_and_cancelled_once_per_order() {
    let base = service().await;
    let create = json!({ "order_id": "o1", "customer_id": "alice" });
    for _ in 0..2 {
        let (status, body) = testing::post(&format!("{base}/internal/shipments"), &create).await;
        assert_eq!(
            (status, body["status"].clone()),
            (200, json!("CREATED")),
            "{body}"
        );
    }
    let (_, listed) = testing::get(&format!("{base}/api/shipments?order_id=o1")).await;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(1));
    for _ in 0..2 {
        let (status, body) =
            testing::post(&format!("{base}/internal/shipments/o1/cancel"), &json!({})).await;
        assert_eq!((status, body["status"].clone()), (200, json!("CANCELLED")));
    }
    // A cancel before the creation tombstones the order's shipment.
    let (status, _) =
        testing::post(&format!("{base}/internal/shipments/o3/cancel"), &json!({})).await;
    assert_eq!(status, 200);
    let late = json!({ "order_id": "o3", "customer_id": "alice" });
    let (status, body) = testing::post(&format!("{base}/internal/shipments"), &late).await;
    assert_eq!((status, body["error"].clone()), (409, json!("compensated")));
    let (_, none) = testing::get(&format!("{base}/api/shipments?order_id=o2")).await;
    assert_eq!(none["items"], json!([]));
    let bad = json!({ "order_id": "o 1", "customer_id": "Alice" });
    let (status, body) = testing::post(&format!("{base}/internal/shipments"), &bad).await;
    assert_eq!(
        (status, testing::fields(&body)),
        (400, vec!["/order_id".to_owned(), "/customer_id".to_owned()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_keeps_its_contract() {
    let base = service().await;
    let contract =
        eventyr_testkit::contracts::Contract::load("shipping").with_headers(testing::internal());
    contract.check_served(&base, &[("order_id", "o0")]).await;
    contract
        .check_access(&base, &[("order_id", "o0")], testing::customer("mallory"))
        .await;
    let cases = [
        (
            "post",
            "/internal/shipments",
            Some(json!({ "order_id": "o1", "customer_id": "alice" })),
            200,
        ),
        ("get", "/api/shipments?order_id=o1", None, 200),
        ("post", "/internal/shipments/{order_id}/cancel", None, 200),
        (
            "post",
            "/internal/shipments",
            Some(json!({ "order_id": "o 1", "customer_id": "alice" })),
            400,
        ),
    ];
    contract
        .check_cases(&base, &[("order_id", "o1")], &cases)
        .await;
}
