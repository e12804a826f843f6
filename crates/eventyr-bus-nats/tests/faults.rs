//! Faults only a broker has: the relay killed between publishing and saving its
//! checkpoint, and nats-server restarted or killed (SIGKILL) while events flow. In
//! every case each public event must take effect exactly once, and the broker must
//! hold each event once.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::NatsWorld;
use eventyr_bus::testkit::{Fixture, TestHandler, WAIT, World, crash_at, fast_options};
use eventyr_bus::{FaultPoint, PublicEvents};
use eventyr_bus_nats::stream_name;
use eventyr_core::EventId;

/// How many messages the service's stream holds.
async fn stored(world: &NatsWorld, fixture: &Fixture) -> u64 {
    let bus = world.bus().await;
    let mut stream = bus
        .jetstream()
        .get_stream(stream_name(&fixture.service))
        .await
        .expect("stream");
    stream.info().await.expect("stream info").state.messages
}

/// Waits until the stream holds `count` messages, then checks it stays there.
async fn expect_stored(world: &NatsWorld, fixture: &Fixture, count: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while stored(world, fixture).await < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "events never published"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        stored(world, fixture).await,
        count,
        "every event is stored once: republished ones were dropped as duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_between_publish_and_checkpoint_publishes_again() {
    let world = NatsWorld::start();
    let mut fixture = Fixture::in_world(
        Arc::clone(&world) as Arc<dyn World>,
        PublicEvents::All,
        Some(crash_at(FaultPoint::Published, 1)),
    )
    .await;
    let ids = fixture
        .append(&["order-1".into(), "order-2".into()], "OrderPlaced", 10)
        .await;
    let crashed = fixture.take_relay().expect("relay");
    assert!(
        crashed.ended().await.is_err(),
        "the injected crash stops it"
    );
    assert!(
        stored(&world, &fixture).await > 0,
        "the batch reached the broker before the crash"
    );

    fixture.start_relay(PublicEvents::All, None).await;
    let consumer = fixture
        .consumer(
            "payments",
            Arc::new(TestHandler::default()),
            fast_options(),
            None,
        )
        .await;
    fixture.expect_exactly_once("payments", &ids).await;
    expect_stored(&world, &fixture, ids.len() as u64).await;
    assert_eq!(fixture.violations("payments").await, 0);
    consumer.stop().await.expect("stops");
    fixture.stop().await;
}

/// Appends `rounds` waves to 8 streams while `fault` strikes the server half way.
async fn survive(fault: impl FnOnce(&NatsWorld)) {
    let world = NatsWorld::start();
    let fixture = Fixture::in_world(
        Arc::clone(&world) as Arc<dyn World>,
        PublicEvents::All,
        None,
    )
    .await;
    let handler = Arc::new(TestHandler::default());
    let one = fixture
        .consumer("ledger", Arc::clone(&handler), fast_options(), None)
        .await;
    let two = fixture
        .consumer("ledger", Arc::clone(&handler), fast_options(), None)
        .await;
    let streams: Vec<String> = (0..8).map(|i| format!("order-{i}")).collect();
    let mut ids: Vec<EventId> = Vec::new();
    for _ in 0..20 {
        ids.extend(fixture.append(&streams, "OrderPlaced", 1).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fault(&world);
    for _ in 0..20 {
        ids.extend(fixture.append(&streams, "OrderPaid", 1).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fixture.expect_exactly_once("ledger", &ids).await;
    expect_stored(&world, &fixture, ids.len() as u64).await;
    assert_eq!(fixture.violations("ledger").await, 0, "stream order kept");
    one.stop().await.expect("stops");
    two.stop().await.expect("stops");
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restarted_mid_stream() {
    survive(|world| {
        let mut server = world.server();
        server.stop();
        server.restart().expect("nats-server starts again");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_under_load_loses_nothing() {
    survive(|world| {
        let mut server = world.server();
        server.kill().expect("SIGKILL");
        server
            .restart()
            .expect("nats-server starts again on its store");
    })
    .await;
}
