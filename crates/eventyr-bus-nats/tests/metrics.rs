//! The bus metrics as Prometheus renders them, after a relay and a consumer have run
//! over NATS: published and relay lag by service; delivered, acknowledged,
//! redelivered, dead-lettered, dead letters waiting, and lag by consumer.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::NatsWorld;
use eventyr_bus::FaultPoint;
use eventyr_bus::PublicEvents;
use eventyr_bus::testkit::{Fixture, TestHandler, World, crash_at, fast_options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_is_measured_by_service_and_consumer() {
    let metrics = eventyr_telemetry::install_prometheus().expect("install the recorder");
    let world = NatsWorld::start();
    let fixture = Fixture::in_world(
        Arc::clone(&world) as Arc<dyn World>,
        PublicEvents::only(["OrderPlaced", "OrderDisputed"]),
        None,
    )
    .await;
    let handler = Arc::new(TestHandler::default());
    handler
        .permanent_types
        .lock()
        .expect("lock")
        .insert("OrderDisputed".into());
    let streams = ["order-1".to_owned(), "order-2".to_owned()];
    let mut ids = fixture.append(&streams, "OrderPlaced", 3).await;
    fixture.append(&streams[..1], "OrderDisputed", 1).await;
    fixture.append(&streams[..1], "InternalNote", 1).await;
    // The first instance crashes after its first effect: one redelivery at least.
    let crashed = fixture
        .consumer(
            "ledger",
            Arc::clone(&handler),
            fast_options(),
            Some(crash_at(FaultPoint::EffectCommitted, 1)),
        )
        .await;
    assert!(crashed.ended().await.is_err());
    let consumer = fixture
        .consumer("ledger", Arc::clone(&handler), fast_options(), None)
        .await;
    ids.sort();
    fixture.expect_exactly_once("ledger", &ids).await;
    fixture
        .wait_dead_letters("ledger", |letters| letters.len() == 1)
        .await;
    // Let housekeeping count the dead letter and the lag gauges settle.
    tokio::time::sleep(Duration::from_millis(400)).await;
    consumer.stop().await.expect("stops");
    fixture.stop().await;

    let text = metrics.render();
    for line in [
        r#"eventyr_bus_published_total{service="order"} 7"#,
        r#"eventyr_bus_relay_lag_events{service="order"} 0"#,
        r#"eventyr_bus_dead_lettered_total{consumer="ledger"} 1"#,
        r#"eventyr_bus_dead_letters{consumer="ledger"} 1"#,
        r#"eventyr_bus_consumer_lag_messages{consumer="ledger"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    for name in [
        "eventyr_bus_delivered_total{consumer=\"ledger\"}",
        "eventyr_bus_acknowledged_total{consumer=\"ledger\"}",
        "eventyr_bus_redelivered_total{consumer=\"ledger\"}",
        "eventyr_bus_consumer_lag_seconds{consumer=\"ledger\"}",
    ] {
        assert!(text.contains(name), "missing {name} in:\n{text}");
    }
    assert!(
        text.contains("# HELP eventyr_bus_dead_letters"),
        "described"
    );
    assert!(!text.contains("stream="), "no unbounded labels");
}
