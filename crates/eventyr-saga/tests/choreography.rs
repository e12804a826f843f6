//! A choreographed checkout on the in-process bus: order, stock and payment react to
//! each other's events (no orchestrator), and a tracker follows each flow through all
//! three services by correlation id, flagging one that is stuck past its deadline.

use std::sync::Arc;
use std::time::Duration;

use eventyr_bus::{
    Consumer, ConsumerName, ConsumerOptions, Handler, InProcBus, PublicEvents, ServiceName,
};
use eventyr_core::{EventId, NewEvent, StreamId, SystemClock};
use eventyr_saga::choreography::{Flow, Mark, Reaction, Reactions, Tracker, TrackerHandler};
use eventyr_store::readmodel::ReadModels;
use eventyr_store::{EventStore, ExpectedVersion, StreamAppend};
use eventyr_store_sqlite::{SqliteOptions, SqliteReadModels, SqliteStore};
use futures::FutureExt;
use serde_json::{Value, json};

/// A reaction that appends `event_type` to `store` for the event's order (unless
/// `skip` says no), with an id derived from the event it reacts to: idempotent.
fn react(
    store: &Arc<dyn EventStore>,
    event_type: &'static str,
    skip: fn(&Value) -> bool,
) -> Reaction {
    let store = Arc::clone(store);
    Arc::new(move |message| {
        let store = Arc::clone(&store);
        async move {
            let data: Value = message.event.data.to_value().expect("json");
            if skip(&data) {
                return Ok(Vec::new());
            }
            let order = data["order_id"].as_str().expect("order id").to_owned();
            let id = uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_OID,
                format!("{event_type}:{}", message.event.id).as_bytes(),
            );
            let event = NewEvent::json(event_type, &json!({ "order_id": order }))
                .expect("event")
                .with_id(EventId::from_uuid(id).expect("id"));
            let stream = StreamId::new(format!("{event_type}-{order}")).expect("stream");
            store
                .append(StreamAppend::new(stream, ExpectedVersion::Any, vec![event]))
                .await
                .map_err(|e| eventyr_bus::HandlerError::Transient(e.to_string()))?;
            Ok(Vec::new())
        }
        .boxed()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_choreographed_flow_is_tracked_across_services_and_stuck_ones_are_flagged() {
    let dir = tempfile::tempdir().expect("dir");
    let open = |name: &str| -> Arc<dyn EventStore> {
        Arc::new(SqliteStore::open(SqliteOptions::new(dir.path().join(name))).expect("store"))
    };
    let models: Arc<dyn ReadModels> =
        Arc::new(SqliteReadModels::open_durable(dir.path().join("inbox")).expect("inboxes"));
    let bus = InProcBus::new();
    let mut stores = std::collections::HashMap::new();
    for service in ["order", "stock", "payment"] {
        let store = open(&format!("{service}.db"));
        bus.register(
            ServiceName::new(service).expect("name"),
            Arc::clone(&store),
            PublicEvents::All,
        );
        stores.insert(service, store);
    }
    let flow = Arc::new(
        Flow::new("checkout", "order_id", Duration::from_millis(300))
            .step("placed", "order", "OrderPlaced")
            .step("stock", "stock", "StockReserved")
            .step("payment", "payment", "PaymentTaken")
            .step("confirmed", "order", "OrderConfirmed")
            .mark("stock", "stock", "StockRefused", Mark::Failed),
    );
    let reactions: Vec<(&str, &str, Arc<dyn Handler>)> = vec![
        (
            "stock_on_orders",
            "order",
            Arc::new(
                Reactions::new()
                    .on(
                        "OrderPlaced",
                        react(&stores["stock"], "StockReserved", |d| {
                            d["qty"].as_u64() > Some(10)
                        }),
                    )
                    .on(
                        "OrderPlaced",
                        react(&stores["stock"], "StockRefused", |d| {
                            d["qty"].as_u64() <= Some(10)
                        }),
                    ),
            ),
        ),
        (
            "payment_on_stock",
            "stock",
            Arc::new(Reactions::new().on(
                "StockReserved",
                react(&stores["payment"], "PaymentTaken", |d| {
                    d["order_id"] == json!("o-stuck")
                }),
            )),
        ),
        (
            "order_on_payment",
            "payment",
            Arc::new(Reactions::new().on(
                "PaymentTaken",
                react(&stores["order"], "OrderConfirmed", |_| false),
            )),
        ),
        (
            "tracker_order",
            "order",
            Arc::new(TrackerHandler::new(Arc::clone(&flow))),
        ),
        (
            "tracker_stock",
            "stock",
            Arc::new(TrackerHandler::new(Arc::clone(&flow))),
        ),
        (
            "tracker_payment",
            "payment",
            Arc::new(TrackerHandler::new(Arc::clone(&flow))),
        ),
    ];
    for (name, source, handler) in reactions {
        let consumer = Consumer::new(
            ConsumerName::new(name).expect("name"),
            ServiceName::new(source).expect("name"),
            Arc::new(bus.clone()),
            Arc::clone(&models),
            handler,
        )
        .options(ConsumerOptions {
            fetch_wait: Duration::from_millis(50),
            ..ConsumerOptions::default()
        });
        tokio::spawn(consumer.run(futures::future::pending::<()>()));
    }

    for (order, qty) in [("o-1", 1), ("o-2", 20), ("o-stuck", 2)] {
        let event = NewEvent::json("OrderPlaced", &json!({ "order_id": order, "qty": qty }))
            .expect("event");
        let stream = StreamId::new(format!("order-{order}")).expect("stream");
        stores["order"]
            .append(StreamAppend::new(stream, ExpectedVersion::Any, vec![event]))
            .await
            .expect("append");
    }

    let consumers: Vec<ConsumerName> = ["tracker_order", "tracker_stock", "tracker_payment"]
        .iter()
        .map(|n| ConsumerName::new(n).expect("name"))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(tracker) = Tracker::open(
            Arc::clone(&flow),
            Arc::clone(&models),
            &consumers,
            Arc::new(SystemClock),
        )
        .await
        {
            let flows = tracker.flows().await.expect("flows");
            let by_id = |id: &str| flows.iter().find(|f| f.correlation_id == id).cloned();
            let settled = by_id("o-1").is_some_and(|f| f.status == "COMPLETED")
                && by_id("o-2").is_some_and(|f| f.status == "FAILED")
                && by_id("o-stuck").is_some_and(|f| f.stuck);
            if settled {
                let stuck = by_id("o-stuck").expect("flow");
                assert_eq!(stuck.status, "IN_PROGRESS");
                assert_eq!(
                    stuck.steps.keys().collect::<Vec<_>>(),
                    ["placed", "stock"],
                    "payment never came"
                );
                let done = by_id("o-1").expect("flow");
                assert_eq!(done.steps.len(), 4);
                assert!(!done.stuck && !by_id("o-2").expect("flow").stuck);
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flows never settled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
