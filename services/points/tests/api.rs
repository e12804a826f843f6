//! The points service's HTTP API on a real server on 127.0.0.1: balances, deductions
//! that never overdraw and happen once, restores once, tombstones, input errors.

use std::sync::Arc;

use eventyr_cqrs::{Command, CommandHandler, HandlerOptions, Upcasters};
use eventyr_http::Faults;
use eventyr_http::testing::{self, serve};
use eventyr_store::{EventStore, MemoryStore};
use points::api::{Points, router};
use points::domain::{PointsAccount, PointsCommand};
use serde_json::json;

async fn service() -> String {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
    let accounts = Arc::new(CommandHandler::<PointsAccount>::new(
        store,
        Arc::new(Upcasters::new()),
        HandlerOptions::default(),
    ));
    let open = PointsCommand::Open {
        customer_id: "alice".into(),
        balance: 500,
    };
    accounts
        .execute(Command::new("alice", open))
        .await
        .expect("seed");
    serve(testing::app(router(Points {
        accounts,
        faults: Faults::default(),
    })))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deductions_never_overdraw_and_happen_once() {
    let base = service().await;
    let deduct = |id: &str, points: u64| json!({ "deduction_id": id, "customer_id": "alice", "points": points });
    for _ in 0..2 {
        let (status, body) = testing::post(
            &format!("{base}/internal/points/deductions"),
            &deduct("d1", 200),
        )
        .await;
        assert_eq!(
            (status, body["balance"].clone()),
            (200, json!(300)),
            "{body}"
        );
    }
    let (status, body) = testing::post(
        &format!("{base}/internal/points/deductions"),
        &deduct("d2", 301),
    )
    .await;
    assert_eq!(
        (status, body["error"].clone()),
        (409, json!("insufficient_points"))
    );
    for _ in 0..2 {
        let (status, body) = testing::post(
            &format!("{base}/internal/points/deductions/d1/restore"),
            &json!({ "customer_id": "alice" }),
        )
        .await;
        assert_eq!((status, body["balance"].clone()), (200, json!(500)));
    }
    let (status, body) = testing::get(&format!("{base}/api/customers/alice/points")).await;
    assert_eq!(
        (status, body),
        (200, json!({ "customer_id": "alice", "balance": 500 }))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_first_tombstones_and_input_is_checked() {
    let base = service().await;
    let (status, _) = testing::post(
        &format!("{base}/internal/points/deductions/d9/restore"),
        &json!({ "customer_id": "alice" }),
    )
    .await;
    assert_eq!(status, 200);
    let late = json!({ "deduction_id": "d9", "customer_id": "alice", "points": 5 });
    let (status, body) = testing::post(&format!("{base}/internal/points/deductions"), &late).await;
    assert_eq!((status, body["error"].clone()), (409, json!("compensated")));

    let bad = json!({ "deduction_id": "d 1", "customer_id": "alice", "points": 0 });
    let (status, body) = testing::post(&format!("{base}/internal/points/deductions"), &bad).await;
    assert_eq!(status, 400);
    assert_eq!(testing::fields(&body), ["/deduction_id", "/points"]);
    assert_eq!(
        testing::get(&format!("{base}/api/customers/nobody/points"))
            .await
            .0,
        404
    );
    assert_eq!(
        testing::get(&format!("{base}/api/customers/Bad%20Id/points"))
            .await
            .0,
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_keeps_its_contract() {
    let base = service().await;
    let contract =
        eventyr_testkit::contracts::Contract::load("points").with_headers(testing::internal());
    let fill = [("customer_id", "alice"), ("deduction_id", "d0")];
    contract.check_served(&base, &fill).await;
    contract
        .check_access(&base, &fill, testing::customer("mallory"))
        .await;
    // Someone else's balance is 404, as if there were none; one's own is 200.
    let url = format!("{base}/api/customers/alice/points");
    let as_mallory = testing::request_with(
        reqwest::Method::GET,
        &url,
        None,
        testing::customer("mallory"),
    );
    assert_eq!(as_mallory.await.0, 404);
    let as_alice =
        testing::request_with(reqwest::Method::GET, &url, None, testing::customer("alice"));
    assert_eq!(as_alice.await.0, 200);
    let deduct = |id: &str, points: u64| json!({ "deduction_id": id, "customer_id": "alice", "points": points });
    let cases = [
        (
            "post",
            "/internal/points/deductions",
            Some(deduct("d1", 10)),
            200,
        ),
        (
            "post",
            "/internal/points/deductions",
            Some(deduct("d2", 10_000)),
            409,
        ),
        (
            "post",
            "/internal/points/deductions",
            Some(deduct("d3", 0)),
            400,
        ),
        (
            "post",
            "/internal/points/deductions/{deduction_id}/restore",
            Some(json!({ "customer_id": "alice" })),
            200,
        ),
        ("get", "/api/customers/{customer_id}/points", None, 200),
    ];
    contract
        .check_cases(
            &base,
            &[("customer_id", "alice"), ("deduction_id", "d1")],
            &cases,
        )
        .await;
}
