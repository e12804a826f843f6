//! `eventyr dlq list|replay` against a consumer running in this process: a message
//! its handler refuses goes to the dead letters, the CLI lists it, the handler is
//! fixed, the CLI replays it and the running consumer gives it its one effect.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use eventyr_bus::{
    Consumer, ConsumerName, ConsumerOptions, Handler, HandlerError, InProcBus, Inbox, Message,
    PublicEvents, ServiceName,
};
use eventyr_core::{NewEvent, StreamId, SystemClock};
use eventyr_store::readmodel::ReadModels;
use eventyr_store::sql::SqlStatement;
use eventyr_store::{EventStore, ExpectedVersion, StreamAppend};
use eventyr_store_sqlite::{SqliteOptions, SqliteReadModels, SqliteStore};
use serde_json::Value;

use common::{run, text, wait_for};

/// Refuses `Refund` events until fixed.
#[derive(Default)]
struct Ledger {
    fixed: AtomicBool,
}

#[async_trait]
impl Handler for Ledger {
    fn schema(&self) -> Vec<String> {
        vec!["CREATE TABLE entries (event_id TEXT PRIMARY KEY, n BIGINT NOT NULL)".into()]
    }

    async fn handle(&self, message: &Message) -> Result<Vec<SqlStatement>, HandlerError> {
        if message.event.event_type.as_str() == "Refund" && !self.fixed.load(Ordering::SeqCst) {
            return Err(HandlerError::Permanent(
                "refunds are not supported yet".into(),
            ));
        }
        Ok(vec![
            SqlStatement::new(
                "INSERT INTO entries (event_id, n) VALUES ($1, 1) \
                 ON CONFLICT (event_id) DO UPDATE SET n = entries.n + 1",
            )
            .bind(message.event.id.to_string()),
        ])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_from_the_cli() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path();
    let store: Arc<dyn EventStore> =
        Arc::new(SqliteStore::open(SqliteOptions::new(data.join("payment.db"))).expect("store"));
    let inboxes: Arc<dyn ReadModels> =
        Arc::new(SqliteReadModels::open_durable(data.join("inbox")).expect("inboxes"));
    let service = ServiceName::new("payment").expect("service");
    let bus = InProcBus::new();
    bus.register(service.clone(), Arc::clone(&store), PublicEvents::All);
    let handler = Arc::new(Ledger::default());
    let consumer = Consumer::new(
        ConsumerName::new("ledger").expect("name"),
        service,
        Arc::new(bus),
        Arc::clone(&inboxes),
        Arc::clone(&handler) as Arc<dyn Handler>,
    )
    .options(ConsumerOptions {
        housekeeping: Duration::from_millis(100),
        ..ConsumerOptions::default()
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(consumer.run(async move {
        let _ = stopped.await;
    }));

    for event_type in ["Charge", "Refund", "Charge"] {
        let event =
            NewEvent::json(event_type, &serde_json::json!({ "cents": 500 })).expect("event");
        store
            .append(StreamAppend::new(
                StreamId::new("payment-1").expect("stream"),
                ExpectedVersion::Any,
                vec![event],
            ))
            .await
            .expect("append");
    }
    let consumer = ConsumerName::new("ledger").expect("name");
    let inbox_of = || Inbox::existing(Arc::clone(&inboxes), &consumer, Arc::new(SystemClock));
    wait_for("a dead letter and two effects", async || {
        let Ok(inbox) = inbox_of().await else {
            return false;
        };
        let letters = inbox.dead_letters(None, 10).await.expect("dead letters");
        let entries = inbox
            .query(SqlStatement::new("SELECT n FROM entries"))
            .await
            .expect("entries");
        letters.len() == 1 && entries.len() == 2
    })
    .await;

    let listed = run(data, &["dlq", "list"]).await;
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let table = text(&listed.stdout);
    assert!(table.contains("ledger"), "{table}");
    assert!(table.contains("Refund payment-1@1"), "{table}");
    assert!(table.contains("refunds are not supported yet"), "{table}");

    let json = run(data, &["dlq", "list", "--json", "--consumer", "ledger"]).await;
    assert!(json.status.success(), "{}", text(&json.stderr));
    let lines: Vec<Value> = text(&json.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["consumer"], "ledger");
    assert_eq!(lines[0]["status"], "dead");
    assert_eq!(lines[0]["attempts"], 1);
    assert_eq!(lines[0]["event_type"], "Refund");

    // The fix is deployed; the operator replays.
    handler.fixed.store(true, Ordering::SeqCst);
    let replayed = run(data, &["dlq", "replay", "--all", "--wait", "30s"]).await;
    assert!(
        replayed.status.success(),
        "{}{}",
        text(&replayed.stdout),
        text(&replayed.stderr)
    );
    assert!(
        text(&replayed.stdout).contains("replayed"),
        "{}",
        text(&replayed.stdout)
    );
    let entries = inbox_of()
        .await
        .expect("inbox")
        .query(SqlStatement::new("SELECT n FROM entries"))
        .await
        .expect("entries");
    assert_eq!(entries.len(), 3, "the refund took effect");
    assert!(
        entries.iter().all(|r| r.int("n") == Some(1)),
        "once each: {entries:?}"
    );

    let empty = run(data, &["dlq", "list"]).await;
    assert!(
        text(&empty.stdout).contains("no dead letters"),
        "{}",
        text(&empty.stdout)
    );
    let all = run(data, &["dlq", "list", "--all"]).await;
    assert!(
        text(&all.stdout).contains("replayed"),
        "{}",
        text(&all.stdout)
    );

    let unknown = run(
        data,
        &["dlq", "replay", "0190a0e0-0000-7000-8000-000000000001"],
    )
    .await;
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        text(&unknown.stderr).contains("error[not_found]"),
        "{}",
        text(&unknown.stderr)
    );
    let nobody = run(data, &["dlq", "list", "--consumer", "nobody"]).await;
    assert_eq!(nobody.status.code(), Some(1));
    assert!(
        text(&nobody.stderr).contains("error[not_found]"),
        "{}",
        text(&nobody.stderr)
    );
    assert!(!text(&nobody.stderr).contains("panicked"));

    let _ = stop.send(());
    running
        .await
        .expect("join")
        .expect("the consumer stops cleanly");
}
