//! The order saga, orchestrated, across the six services: each service on its own
//! HTTP listener on 127.0.0.1 with its own store, the saga engine in the order
//! service calling every participant over HTTP. The demo cases of PLAN.md: alice's
//! order completes; five SKU-RARE fail on inventory; bob's order above his credit is
//! declined and compensated; the same Idempotency-Key places one order.

use std::sync::Arc;
use std::time::Duration;

use eventyr_core::{RetryPolicy, SystemClock};
use eventyr_cqrs::{Aggregate, Command, CommandHandler, HandlerOptions, Upcasters};
use eventyr_http::Faults;
use eventyr_http::testing::{self, serve};
use eventyr_saga::{EngineOptions, HttpParticipants, InProcess, Participants, Routed, SagaEngine};
use eventyr_store::{EventStore, MemoryStore};
use futures::FutureExt;
use serde_json::{Value, json};

fn handler<A: Aggregate>() -> Arc<CommandHandler<A>> {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
    Arc::new(CommandHandler::new(
        store,
        Arc::new(Upcasters::new()),
        HandlerOptions::default(),
    ))
}

struct System {
    _read_dir: tempfile::TempDir,
    public: String,
    orders: Arc<CommandHandler<order::domain::Order>>,
    order_store: Arc<dyn EventStore>,
    sagas: eventyr_saga::SagaHandle,
    items: Arc<CommandHandler<inventory::domain::Item>>,
    credit: Arc<CommandHandler<payment::domain::CreditAccount>>,
}

async fn system() -> System {
    use inventory::domain::{Item, ItemCommand};
    use payment::domain::{CreditAccount, CreditCommand};
    use points::domain::{PointsAccount, PointsCommand};

    let items = handler::<Item>();
    for (sku, price, quantity) in [
        ("SKU-1", 500, 1000),
        ("SKU-2", 20_000, 1000),
        ("SKU-RARE", 900, 1),
    ] {
        let stock = ItemCommand::Stock {
            sku: sku.into(),
            price_cents: price,
            quantity,
        };
        items.execute(Command::new(sku, stock)).await.expect("seed");
    }
    let credit = handler::<CreditAccount>();
    let points = handler::<PointsAccount>();
    for (customer, limit, balance) in [("alice", 10_000_000, 500), ("bob", 5_000, 0)] {
        let open = CreditCommand::Open {
            customer_id: customer.into(),
            limit_cents: limit,
        };
        credit
            .execute(Command::new(customer, open))
            .await
            .expect("seed");
        let open = PointsCommand::Open {
            customer_id: customer.into(),
            balance,
        };
        points
            .execute(Command::new(customer, open))
            .await
            .expect("seed");
    }
    let notification_store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
    let faults = Faults::default;
    let urls = [
        serve(testing::app(inventory::api::router(
            inventory::api::Inventory {
                items: Arc::clone(&items),
                faults: faults(),
            },
        )))
        .await,
        serve(testing::app(payment::api::router(payment::api::Payments {
            accounts: Arc::clone(&credit),
            of_order: Arc::new(|_| async { Ok(Vec::new()) }.boxed()),
            faults: faults(),
        })))
        .await,
        serve(testing::app(points::api::router(points::api::Points {
            accounts: points,
            faults: faults(),
        })))
        .await,
        serve(testing::app(shipping::api::router(
            shipping::api::Shipping {
                shipments: handler(),
                faults: faults(),
            },
        )))
        .await,
        serve(testing::app(notification::api::router(
            notification::api::Notifications {
                mailboxes: Arc::new(CommandHandler::new(
                    Arc::clone(&notification_store),
                    Arc::new(Upcasters::new()),
                    HandlerOptions::default(),
                )),
                store: notification_store,
                faults: faults(),
            },
        )))
        .await,
    ];
    let [inv, pay, pts, ship, note] = &urls;
    let remote = HttpParticipants::with_headers(Arc::new(SystemClock), testing::internal())
        .expect("client")
        .step(
            "inventory",
            format!("{inv}/internal/reservations"),
            Some(format!("{inv}/internal/reservations/{{saga_id}}/release")),
        )
        .step(
            "confirm",
            format!("{inv}/internal/reservations/{{saga_id}}/confirm"),
            None,
        )
        .step(
            "payment",
            format!("{pay}/internal/payments"),
            Some(format!("{pay}/internal/payments/{{saga_id}}/refund")),
        )
        .step(
            "points",
            format!("{pts}/internal/points/deductions"),
            Some(format!(
                "{pts}/internal/points/deductions/{{saga_id}}/restore"
            )),
        )
        .step(
            "shipping",
            format!("{ship}/internal/shipments"),
            Some(format!("{ship}/internal/shipments/{{saga_id}}/cancel")),
        )
        .step(
            "notification",
            format!("{note}/internal/notifications"),
            None,
        );
    let order_store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
    let orders: Arc<CommandHandler<order::domain::Order>> = Arc::new(CommandHandler::new(
        Arc::clone(&order_store),
        Arc::new(Upcasters::new()),
        HandlerOptions::default(),
    ));
    let local = Arc::new(
        order::api::steps(Arc::clone(&orders))
            .into_iter()
            .fold(InProcess::new(), |p, (name, step)| p.step(name, step)),
    );
    let timeouts = order::saga::Timeouts {
        retry: RetryPolicy {
            attempts_max: 3,
            initial_delay: Duration::from_millis(20),
            multiplier: 2.0,
            delay_max: Duration::from_millis(100),
            jitter_ratio: 0.1,
        },
        ..order::saga::Timeouts::default()
    };
    let engine = SagaEngine::new(
        Arc::new(MemoryStore::default()),
        Arc::new(
            Routed::new(Arc::new(remote))
                .route("order", Arc::clone(&local) as Arc<dyn Participants>)
                .route("complete", local as Arc<dyn Participants>),
        ),
        Arc::new(SystemClock),
        EngineOptions::default(),
    )
    .register(order::saga::definition(timeouts));
    let sagas = engine.handle();
    tokio::spawn(engine.run(futures::future::pending()));
    let prices = {
        let items = Arc::clone(&items);
        Arc::new(move |sku: String| {
            let items = Arc::clone(&items);
            async move {
                let item = items.load(&sku).await.ok()?.state;
                (!item.sku.is_empty()).then_some(item.price_cents)
            }
            .boxed()
        })
    };
    let read_dir = tempfile::tempdir().expect("dir");
    let read_models: Arc<dyn eventyr_store::readmodel::ReadModels> = Arc::new(
        eventyr_store_sqlite::SqliteReadModels::open(read_dir.path()).expect("read models"),
    );
    let (runner, _) = eventyr_cqrs::projections(
        Arc::clone(&order_store),
        Arc::clone(&read_models),
        Arc::new(Upcasters::new()),
        vec![Arc::new(order::read::OrdersView) as Arc<dyn eventyr_cqrs::Projection>],
        eventyr_cqrs::RunnerOptions::default(),
    );
    tokio::spawn(runner.run(futures::future::pending()));
    let public = serve(testing::app(order::api::router(order::api::Orders {
        orders: Arc::clone(&orders),
        sagas: sagas.clone(),
        prices,
        read_models,
        mode: order::domain::SagaMode::Orchestrated,
    })))
    .await;
    System {
        _read_dir: read_dir,
        public,
        orders,
        order_store,
        sagas,
        items,
        credit,
    }
}

impl System {
    /// An orchestrated order of alice's, placed as if its request ended before it
    /// started the saga.
    async fn place_without_saga(&self, order_id: &str) {
        let orphan = order::domain::OrderCommand::Place {
            order_id: order_id.into(),
            customer_id: "alice".into(),
            lines: vec![order::domain::Line {
                sku: "SKU-1".into(),
                quantity: 1,
                price_cents: 500,
            }],
            points_used: 0,
            saga_id: order_id.into(),
            saga_mode: order::domain::SagaMode::Orchestrated,
        };
        self.orders
            .execute(Command::new(order_id, orphan))
            .await
            .expect("placed");
    }

    async fn place(&self, key: &str, body: Value) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(format!("{}/api/orders", self.public))
            .headers(testing::internal())
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .expect("send");
        (
            response.status().as_u16(),
            response.json().await.expect("json"),
        )
    }

    async fn settled(&self, order_id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, order) = testing::get(&format!("{}/api/orders/{order_id}", self.public)).await;
            if order["status"] != "PENDING" {
                return order;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "order {order_id} stays PENDING"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_orders_reach_their_outcomes_across_the_services() {
    let s = system().await;
    let (status, placed) = s
        .place("k1", json!({ "customer_id": "alice", "items": [{ "sku": "SKU-1", "quantity": 2 }], "points_to_use": 10 }))
        .await;
    assert_eq!(status, 202, "{placed}");
    let completed = s.settled(placed["order_id"].as_str().expect("id")).await;
    assert_eq!(completed["status"], "COMPLETED", "{completed}");
    assert_eq!(completed["total_cents"], 1_000);
    let sku1 = s.items.load("SKU-1").await.expect("load").state;
    assert_eq!(
        (sku1.available, sku1.shipped, sku1.reserved_total()),
        (998, 2, 0)
    );

    let (_, again) = s
        .place("k1", json!({ "customer_id": "alice", "items": [{ "sku": "SKU-1", "quantity": 2 }], "points_to_use": 10 }))
        .await;
    assert_eq!(
        again["order_id"], placed["order_id"],
        "the same key, the same order"
    );
    let (status, _) = s
        .place(
            "k1",
            json!({ "customer_id": "alice", "items": [{ "sku": "SKU-2", "quantity": 1 }] }),
        )
        .await;
    assert_eq!(status, 409, "the key was used for another order");

    let (_, rare) = s
        .place(
            "k2",
            json!({ "customer_id": "alice", "items": [{ "sku": "SKU-RARE", "quantity": 5 }] }),
        )
        .await;
    let failed = s.settled(rare["order_id"].as_str().expect("id")).await;
    assert_eq!(failed["status"], "FAILED");
    assert_eq!(failed["failure_reason"], "out_of_stock", "{failed}");

    let (_, declined) = s
        .place(
            "k3",
            json!({ "customer_id": "bob", "items": [{ "sku": "SKU-2", "quantity": 1 }] }),
        )
        .await;
    let failed = s.settled(declined["order_id"].as_str().expect("id")).await;
    assert_eq!(failed["status"], "FAILED");
    assert_eq!(failed["failure_reason"], "payment_declined", "{failed}");
    let sku2 = s.items.load("SKU-2").await.expect("load").state;
    assert_eq!(
        (sku2.available, sku2.reserved_total()),
        (1000, 0),
        "the reservation was released"
    );
    assert_eq!(
        s.credit.load("bob").await.expect("load").state.used_cents,
        0
    );

    // An order placed whose saga never started (a crash in between) is picked up.
    s.place_without_saga("orphan-1").await;
    order::api::restart_sagas(&s.orders, &s.order_store, &s.sagas)
        .await
        .expect("restart");
    assert_eq!(s.settled("orphan-1").await["status"], "COMPLETED");

    // The order service keeps its contract.
    let contract =
        eventyr_testkit::contracts::Contract::load("order").with_headers(testing::internal());
    let id = completed["order_id"].as_str().expect("id").to_owned();
    let (status, _) = contract
        .call(
            &s.public,
            "get",
            "/api/orders/{order_id}",
            &[("order_id", &id)],
            None,
        )
        .await;
    assert_eq!(status, 200);
    let unknown = [("order_id", "no-such-order")];
    assert_eq!(
        contract
            .call(&s.public, "get", "/api/orders/{order_id}", &unknown, None)
            .await
            .0,
        404
    );
    contract.check_served(&s.public, &unknown).await;
    contract
        .check_access(&s.public, &unknown, testing::customer("mallory"))
        .await;
    // Who may: the owner reads her order, another customer gets 404 (as if there were
    // none) and may not place for her (403), nor list hers (403).
    let path = [("order_id", id.as_str())];
    for (caller, status) in [("alice", 200), ("mallory", 404)] {
        let as_caller = contract.clone().with_headers(testing::customer(caller));
        let (seen, answer) = as_caller
            .call(&s.public, "get", "/api/orders/{order_id}", &path, None)
            .await;
        assert_eq!(seen, status, "{caller}: {answer}");
    }
    let mallory = contract.clone().with_headers(testing::customer("mallory"));
    let for_alice = json!({ "customer_id": "alice", "items": [{ "sku": "SKU-1", "quantity": 1 }] });
    let (status, answer) = mallory
        .call(&s.public, "post", "/api/orders", &[], Some(&for_alice))
        .await;
    assert_eq!((status, answer["error"].as_str()), (403, Some("forbidden")));
    let (status, _) = mallory
        .call(&s.public, "get", "/api/orders?customer_id=alice", &[], None)
        .await;
    assert_eq!(status, 403);
    // The order list (a projection, so eventually): alice's orders, newest first, in pages.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, page) = contract
            .call(
                &s.public,
                "get",
                "/api/orders?customer_id=alice&limit=1",
                &[],
                None,
            )
            .await;
        assert_eq!(status, 200);
        let newest = &page["items"][0];
        if newest["order_id"] == "orphan-1" && newest["status"] == "COMPLETED" {
            // The page before the newest: the order of SKU-RARE, failed.
            let cursor = page["next_cursor"].as_str().expect("more pages");
            let next = format!("/api/orders?customer_id=alice&limit=1&cursor={cursor}");
            let (_, older) = contract.call(&s.public, "get", &next, &[], None).await;
            assert_eq!(older["items"][0]["status"], "FAILED", "{older}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the list never caught up: {page}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, failed) = contract
        .call(&s.public, "get", "/api/orders?status=FAILED", &[], None)
        .await;
    assert_eq!(
        failed["items"].as_array().map(Vec::len),
        Some(2),
        "SKU-RARE and bob: {failed}"
    );

    let (status, body) = s
        .place(
            "k4",
            json!({ "customer_id": "alice", "items": [{ "sku": "SKU-404", "quantity": 1 }] }),
        )
        .await;
    assert_eq!(
        (status, testing::fields(&body)),
        (400, vec!["/items/0/sku".to_owned()])
    );
    // The running system finds such an order by itself, within seconds.
    s.place_without_saga("orphan-2").await;
    tokio::spawn(order::api::start_orphaned_sagas(
        Arc::clone(&s.orders),
        Arc::clone(&s.order_store),
        s.sagas.clone(),
        Duration::from_millis(100),
        Duration::from_millis(200),
        futures::future::pending(),
    ));
    assert_eq!(s.settled("orphan-2").await["status"], "COMPLETED");
}

/// The saga's own public events (commands and replies over the bus, the chain's
/// events) match their schemas in contracts/events/saga/.
#[test]
fn the_saga_events_on_the_bus_match_their_contracts() {
    use eventyr_saga::bus::{StepCommand, StepReply};
    use eventyr_saga::chain::ChainEvent;
    use eventyr_saga::machine::Failure;
    let command = StepCommand {
        saga_id: "ord-1".into(),
        saga_type: "order".into(),
        step: "points".into(),
        attempt: 1,
        compensation: false,
        idempotency_key: "ord-1/points".into(),
        deadline: eventyr_core::Timestamp::from_unix_micros(1_790_000_000_000_000),
        body: json!({ "deduction_id": "ord-1", "customer_id": "alice", "points": 10 }),
    };
    let replied = StepReply {
        saga_id: "ord-1".into(),
        step: "points".into(),
        attempt: 1,
        compensation: false,
        result: Some(json!({ "balance": 490 })),
        failure: None,
    };
    let refused = StepReply {
        result: None,
        failure: Some(Failure::permanent("10 points requested, the balance is 0")),
        ..replied.clone()
    };
    let step = |note: Option<&str>, reason: Option<&str>| ChainEvent {
        saga_type: "order".into(),
        id: "ord-1".into(),
        step: "payment".into(),
        data: json!({ "order_id": "ord-1", "results": { "inventory": {} } }),
        reason: reason.map(str::to_owned),
        note: note.map(str::to_owned),
    };
    let samples = [
        ("SagaStepCommand", serde_json::to_value(&command)),
        ("SagaStepReplied", serde_json::to_value(&replied)),
        ("SagaStepReplied", serde_json::to_value(&refused)),
        ("ChainStepDone", serde_json::to_value(step(None, None))),
        (
            "ChainStepDone",
            serde_json::to_value(step(Some("skipped"), None)),
        ),
        (
            "ChainStepFailed",
            serde_json::to_value(step(None, Some("declined"))),
        ),
        (
            "ChainStepCompensated",
            serde_json::to_value(step(None, Some("declined"))),
        ),
    ];
    let mut seen = Vec::new();
    for (event_type, data) in samples {
        eventyr_testkit::contracts::check_event("saga", event_type, &data.expect("json"));
        seen.push(event_type.to_owned());
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen, eventyr_testkit::contracts::event_types("saga"));
}
