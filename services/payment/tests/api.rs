//! The payment service's HTTP API on a real server on 127.0.0.1: charges within the
//! credit limit, declines as refusals, refunds once, tombstones, and input errors.

use std::sync::Arc;

use eventyr_cqrs::{Command, CommandHandler, HandlerOptions, Upcasters};
use eventyr_http::Faults;
use eventyr_http::testing::{self, serve};
use eventyr_store::{EventStore, MemoryStore};
use futures::FutureExt;
use payment::api::{PaymentView, Payments, router};
use payment::domain::{CreditAccount, CreditCommand};
use serde_json::{Value, json};

struct Service {
    base: String,
    accounts: Arc<CommandHandler<CreditAccount>>,
}

async fn service() -> Service {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
    let accounts = Arc::new(CommandHandler::<CreditAccount>::new(
        store,
        Arc::new(Upcasters::new()),
        HandlerOptions::default(),
    ));
    let open = CreditCommand::Open {
        customer_id: "bob".into(),
        limit_cents: 5_000,
    };
    accounts
        .execute(Command::new("bob", open))
        .await
        .expect("seed");
    let of_order = {
        let accounts = Arc::clone(&accounts);
        Arc::new(move |order_id: String| {
            let accounts = Arc::clone(&accounts);
            async move {
                let bob = accounts.load("bob").await.expect("load").state;
                Ok(bob
                    .payments
                    .iter()
                    .filter(|(_, p)| p.order_id == order_id)
                    .map(|(id, p)| PaymentView {
                        payment_id: id.clone(),
                        order_id: p.order_id.clone(),
                        customer_id: "bob".into(),
                        status: format!("{:?}", p.state).to_uppercase(),
                        amount_cents: p.amount_cents,
                    })
                    .collect())
            }
            .boxed()
        })
    };
    let app = testing::app(router(Payments {
        accounts: Arc::clone(&accounts),
        of_order,
        faults: Faults::default(),
    }));
    let base = serve(app).await;
    Service { base, accounts }
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    testing::post(&format!("{base}{path}"), &body).await
}

fn charge(id: &str, amount: i64) -> Value {
    json!({ "payment_id": id, "order_id": format!("order-{id}"), "customer_id": "bob", "amount_cents": amount })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_decline_and_refund_once() {
    let s = service().await;
    let (status, body) = post(&s.base, "/internal/payments", charge("p1", 3_000)).await;
    assert_eq!(
        (status, body["status"].clone()),
        (200, json!("CHARGED")),
        "{body}"
    );
    assert_eq!(
        post(&s.base, "/internal/payments", charge("p1", 3_000))
            .await
            .0,
        200
    );
    assert_eq!(
        s.accounts.load("bob").await.expect("load").state.used_cents,
        3_000,
        "once"
    );

    let (status, body) = post(&s.base, "/internal/payments", charge("p2", 2_500)).await;
    assert_eq!(
        (status, body["error"].clone()),
        (409, json!("payment_declined"))
    );
    assert_eq!(
        post(&s.base, "/internal/payments", charge("p2", 2_500))
            .await
            .0,
        409,
        "decided once"
    );

    for _ in 0..2 {
        let (status, body) = post(
            &s.base,
            "/internal/payments/p1/refund",
            json!({ "customer_id": "bob" }),
        )
        .await;
        assert_eq!((status, body["status"].clone()), (200, json!("REFUNDED")));
    }
    assert_eq!(
        s.accounts.load("bob").await.expect("load").state.used_cents,
        0,
        "refunded once"
    );

    let (_, listed) = testing::get(&format!("{}/api/payments?order_id=order-p2", s.base)).await;
    assert_eq!(listed["items"][0]["status"], "DECLINED", "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_first_tombstones_and_input_is_checked() {
    let s = service().await;
    let (status, body) = post(
        &s.base,
        "/internal/payments/p9/refund",
        json!({ "customer_id": "bob" }),
    )
    .await;
    assert_eq!((status, body["amount_cents"].clone()), (200, json!(0)));
    let (status, body) = post(&s.base, "/internal/payments", charge("p9", 100)).await;
    assert_eq!((status, body["error"].clone()), (409, json!("compensated")));
    let (status, body) = post(&s.base, "/internal/payments", charge("p0", 0)).await;
    assert_eq!(
        (status, body["amount_cents"].clone()),
        (200, json!(0)),
        "paid with points"
    );

    let (status, body) = post(
        &s.base,
        "/internal/payments",
        json!({ "payment_id": "p 1", "order_id": "o1", "customer_id": "Bob", "amount_cents": -5 }),
    )
    .await;
    assert_eq!(status, 400);
    let fields = testing::fields(&body);
    assert_eq!(fields, ["/payment_id", "/customer_id", "/amount_cents"]);
    let unknown =
        json!({ "payment_id": "p1", "order_id": "o1", "customer_id": "zed", "amount_cents": 5 });
    assert_eq!(post(&s.base, "/internal/payments", unknown).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_keeps_its_contract() {
    let s = service().await;
    let contract =
        eventyr_testkit::contracts::Contract::load("payment").with_headers(testing::internal());
    contract
        .check_served(&s.base, &[("payment_id", "p0")])
        .await;
    contract
        .check_access(
            &s.base,
            &[("payment_id", "p0")],
            testing::customer("mallory"),
        )
        .await;
    let cases = [
        ("post", "/internal/payments", Some(charge("p1", 1_000)), 200),
        ("post", "/internal/payments", Some(charge("p2", 9_000)), 409),
        ("post", "/internal/payments", Some(charge("p 3", 1)), 400),
        (
            "post",
            "/internal/payments/{payment_id}/refund",
            Some(json!({ "customer_id": "bob" })),
            200,
        ),
        ("get", "/api/payments?order_id=order-p1", None, 200),
    ];
    contract
        .check_cases(&s.base, &[("payment_id", "p1")], &cases)
        .await;
}
