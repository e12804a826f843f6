//! The inventory's HTTP API on a real server on 127.0.0.1: the stock view, restock,
//! and the saga's steps with their idempotency, all-or-none reservations, tombstones
//! and error bodies.

use std::sync::Arc;

use eventyr_cqrs::{Command, CommandHandler, HandlerOptions, Upcasters};
use eventyr_http::Faults;
use eventyr_http::testing::{self, serve};
use eventyr_store::{EventStore, MemoryStore};
use inventory::api::{Inventory, router};
use inventory::domain::{Item, ItemCommand};
use serde_json::{Value, json};

struct Service {
    base: String,
    items: Arc<CommandHandler<Item>>,
    client: reqwest::Client,
}

async fn service() -> Service {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
    let items = Arc::new(CommandHandler::<Item>::new(
        store,
        Arc::new(Upcasters::new()),
        HandlerOptions::default(),
    ));
    for (sku, quantity) in [("SKU-1", 10), ("SKU-2", 5), ("SKU-RARE", 1)] {
        let stock = ItemCommand::Stock {
            sku: sku.into(),
            price_cents: 500,
            quantity,
        };
        items.execute(Command::new(sku, stock)).await.expect("seed");
    }
    let app = testing::app(router(Inventory {
        items: Arc::clone(&items),
        faults: Faults::default(),
    }));
    let base = serve(app).await;
    Service {
        base,
        items,
        client: reqwest::Client::builder()
            .default_headers(testing::internal())
            .build()
            .expect("a client"),
    }
}

impl Service {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        testing::post(&format!("{}{path}", self.base), &body).await
    }

    async fn stock(&self, sku: &str) -> Value {
        testing::get(&format!("{}/api/inventory/{sku}", self.base))
            .await
            .1
    }

    async fn conserved(&self) -> bool {
        let mut all = true;
        for sku in ["SKU-1", "SKU-2", "SKU-RARE"] {
            all &= self.items.load(sku).await.expect("load").state.conserved();
        }
        all
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_take_every_line_or_none_and_once() {
    let s = service().await;
    let order = json!({ "reservation_id": "order-1", "items": [
        { "sku": "SKU-2", "quantity": 2 }, { "sku": "SKU-1", "quantity": 3 } ] });
    let (status, body) = s.post("/internal/reservations", order.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total_cents"], 2_500);
    assert_eq!(s.stock("SKU-1").await["available"], 7);
    let (again, _) = s.post("/internal/reservations", order).await;
    assert_eq!(again, 200);
    assert_eq!(s.stock("SKU-1").await["available"], 7, "once");

    let rare = json!({ "reservation_id": "order-2", "items": [
        { "sku": "SKU-1", "quantity": 1 }, { "sku": "SKU-RARE", "quantity": 5 } ] });
    let (status, body) = s.post("/internal/reservations", rare).await;
    assert_eq!(
        (status, body["error"].clone()),
        (409, json!("out_of_stock")),
        "{body}"
    );
    assert_eq!(s.stock("SKU-1").await["available"], 7, "none held");
    assert!(s.conserved().await);

    let (status, _) = s
        .post(
            "/internal/reservations/order-1/release",
            json!({ "skus": ["SKU-1", "SKU-2"] }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(s.stock("SKU-1").await["available"], 10);
    assert_eq!(s.stock("SKU-1").await["reserved"], 0);
    assert!(s.conserved().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_first_tombstones_and_confirmed_stock_ships() {
    let s = service().await;
    let (status, _) = s
        .post(
            "/internal/reservations/order-9/release",
            json!({ "skus": ["SKU-1", "SKU-404"] }),
        )
        .await;
    assert_eq!(status, 200, "unknown items hold nothing");
    let late = json!({ "reservation_id": "order-9", "items": [{ "sku": "SKU-1", "quantity": 1 }] });
    let (status, body) = s.post("/internal/reservations", late).await;
    assert_eq!((status, body["error"].clone()), (409, json!("compensated")));

    let order =
        json!({ "reservation_id": "order-3", "items": [{ "sku": "SKU-2", "quantity": 5 }] });
    assert_eq!(s.post("/internal/reservations", order).await.0, 200);
    let (status, _) = s
        .post(
            "/internal/reservations/order-3/confirm",
            json!({ "skus": ["SKU-2"] }),
        )
        .await;
    assert_eq!(status, 200);
    let item = s.items.load("SKU-2").await.expect("load").state;
    assert_eq!((item.available, item.shipped), (0, 5));
    assert!(s.conserved().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restock_and_bad_input() {
    let s = service().await;
    let put = |body: Value, sku: &str| {
        s.client
            .put(format!("{}/api/inventory/{sku}", s.base))
            .json(&body)
            .send()
    };
    let restocked: Value = put(json!({ "available": 40 }), "SKU-1")
        .await
        .expect("put")
        .json()
        .await
        .expect("json");
    assert_eq!(restocked["available"], 40);
    let lower = put(json!({ "available": 1 }), "SKU-1").await.expect("put");
    assert_eq!(lower.status(), 409);
    let unknown = put(json!({ "available": 1 }), "SKU-404")
        .await
        .expect("put");
    assert_eq!(unknown.status(), 404);
    let bad = s
        .client
        .get(format!("{}/api/inventory/lower-case", s.base))
        .send()
        .await
        .expect("get");
    assert_eq!(bad.status(), 400);

    let invalid = json!({ "reservation_id": "o 1", "items": [
        { "sku": "SKU-1", "quantity": 0 }, { "sku": "SKU-1", "quantity": 1 } ] });
    let (status, body) = s.post("/internal/reservations", invalid).await;
    assert_eq!(status, 400);
    let fields = testing::fields(&body);
    assert_eq!(
        fields,
        ["/reservation_id", "/items/0/quantity", "/items/1/sku"],
        "{body}"
    );
    let (status, body) = s
        .post(
            "/internal/reservations",
            json!({ "reservation_id": "o1", "items": [] }),
        )
        .await;
    assert_eq!(
        (status, body["fields"][0]["field"].clone()),
        (400, json!("/items"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_keeps_its_contract() {
    let s = service().await;
    let contract =
        eventyr_testkit::contracts::Contract::load("inventory").with_headers(testing::internal());
    let ids = [("sku", "SKU-1"), ("reservation_id", "r0")];
    contract.check_served(&s.base, &ids).await;
    contract
        .check_access(&s.base, &ids, testing::customer("mallory"))
        .await;
    // Restocking is for admins: a customer's is 403 and changes nothing.
    let (status, _) = testing::request_with(
        reqwest::Method::PUT,
        &format!("{}/api/inventory/SKU-1", s.base),
        Some(&json!({ "available": 1 })),
        testing::customer("mallory"),
    )
    .await;
    assert_eq!(status, 403);
    let fill = [("sku", "SKU-1"), ("reservation_id", "r1")];
    let cases = [
        ("get", "/api/inventory/{sku}", None, 200),
        (
            "put",
            "/api/inventory/{sku}",
            Some(json!({ "available": 200 })),
            200,
        ),
        (
            "put",
            "/api/inventory/{sku}",
            Some(json!({ "available": -1 })),
            400,
        ),
        (
            "post",
            "/internal/reservations",
            Some(json!({ "reservation_id": "r1", "items": [{ "sku": "SKU-1", "quantity": 2 }] })),
            200,
        ),
        (
            "post",
            "/internal/reservations",
            Some(
                json!({ "reservation_id": "r2", "items": [{ "sku": "SKU-RARE", "quantity": 5 }] }),
            ),
            409,
        ),
        (
            "post",
            "/internal/reservations/{reservation_id}/confirm",
            Some(json!({ "skus": ["SKU-1"] })),
            200,
        ),
        (
            "post",
            "/internal/reservations/{reservation_id}/release",
            Some(json!({ "skus": ["SKU-1"] })),
            200,
        ),
        (
            "put",
            "/admin/faults",
            Some(json!({ "latency_ms": 0 })),
            200,
        ),
    ];
    contract.check_cases(&s.base, &fill, &cases).await;
}
