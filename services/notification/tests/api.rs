//! The notification service's HTTP API on a real server on 127.0.0.1: each
//! notification sent once, listed newest first in pages, and the demonstration
//! failure rate.

use std::sync::Arc;

use eventyr_cqrs::{CommandHandler, HandlerOptions, Upcasters};
use eventyr_http::testing::{self, serve};
use eventyr_http::{FaultSettings, Faults};
use eventyr_store::{EventStore, MemoryStore};
use notification::api::{Notifications, router};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_are_sent_once_and_listed_in_pages() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
    let mailboxes = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        Arc::new(Upcasters::new()),
        HandlerOptions::default(),
    ));
    let faults = Faults::default();
    let base = serve(testing::app(router(Notifications {
        mailboxes,
        store,
        faults: faults.clone(),
    })))
    .await;
    for i in 0..5 {
        let body = json!({ "notification_id": format!("n{i}"), "customer_id": "alice", "message": format!("message {i}") });
        for _ in 0..2 {
            assert_eq!(
                testing::post(&format!("{base}/internal/notifications"), &body)
                    .await
                    .0,
                200
            );
        }
    }
    let (status, page) = testing::get(&format!(
        "{base}/api/notifications?customer_id=alice&limit=3"
    ))
    .await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|n| n["notification_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["n4", "n3", "n2"], "newest first, each once");
    let cursor = page["next_cursor"].as_str().expect("more");
    let (_, rest) = testing::get(&format!(
        "{base}/api/notifications?customer_id=alice&limit=3&cursor={cursor}"
    ))
    .await;
    let ids: Vec<&str> = rest["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|n| n["notification_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["n1", "n0"]);
    assert!(rest["next_cursor"].is_null());

    faults.set(FaultSettings {
        failure_rate: 1.0,
        ..FaultSettings::default()
    });
    let body = json!({ "notification_id": "n9", "customer_id": "alice", "message": "hi" });
    assert_eq!(
        testing::post(&format!("{base}/internal/notifications"), &body)
            .await
            .0,
        503
    );
    let bad = json!({ "notification_id": "n9", "customer_id": "alice", "message": "" });
    faults.set(FaultSettings::default());
    let (status, body) = testing::post(&format!("{base}/internal/notifications"), &bad).await;
    assert_eq!(
        (status, testing::fields(&body)),
        (400, vec!["/message".to_owned()])
    );
    assert_eq!(
        testing::get(&format!(
            "{base}/api/notifications?customer_id=alice&cursor=x"
        ))
        .await
        .0,
        400
    );
}
