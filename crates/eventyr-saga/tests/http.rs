//! Sagas over HTTP: participants behind a real HTTP server on 127.0.0.1 (idempotent by
//! the `Idempotency-Key` header, with a ledger in their own store), failing the way
//! services fail; and the engine's admin API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use eventyr_core::{RetryPolicy, SystemClock, Timestamp};
use eventyr_saga::machine::{SagaEvent, SagaStatus, StepCall};
use eventyr_saga::participants::{Claim, Ledger};
use eventyr_saga::{
    EngineOptions, HttpParticipants, Participants, SagaDefinition, SagaEngine, SagaHandle, Sent,
    Step, admin_router,
};
use eventyr_store::EventStore;
use eventyr_store_sqlite::{SqliteOptions, SqliteStore};
use serde_json::{Value, json};

const RETRY: RetryPolicy = RetryPolicy {
    attempts_max: 4,
    initial_delay: Duration::from_millis(20),
    multiplier: 2.0,
    delay_max: Duration::from_millis(100),
    jitter_ratio: 0.1,
};

const STEPS: [&str; 4] = ["flight", "hotel", "car", "payment"];

fn definition() -> SagaDefinition {
    let timeout = Duration::from_millis(400);
    let step = |s: Step| s.timeout(timeout).retry(RETRY).compensation(timeout, RETRY);
    SagaDefinition::new("trip")
        .step(step(Step::compensable("flight")))
        .step(step(Step::compensable("hotel")))
        .step(step(Step::compensable("car")))
        .step(Step::pivot("payment").timeout(timeout).retry(RETRY))
        .validate()
        .expect("valid")
}

/// The participants' service: its ledger, and how often each key was seen.
struct Service {
    ledger: Ledger,
    seen: Mutex<HashMap<String, u32>>,
    undone: Mutex<Vec<String>>,
}

type Shared = Arc<Service>;

/// The first delivery of every key fails: a 503 for actions of flight and car, a
/// response too slow for the attempt's deadline for hotel. Cars are refused (409)
/// when the trip asks for "no car".
async fn act(
    State(service): State<Shared>,
    Path(step): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let key = headers["idempotency-key"].to_str().expect("key").to_owned();
    let first = {
        let mut seen = service.seen.lock().expect("lock");
        let n = seen.entry(key.clone()).or_default();
        *n += 1;
        *n == 1
    };
    if first && step == "hotel" {
        tokio::time::sleep(Duration::from_millis(600)).await;
    } else if first {
        let body = json!({ "error": "unavailable", "message": "try again" });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body));
    }
    if step == "car" && body["car"] == json!(false) {
        let body = json!({ "error": "rejected", "message": "no car wanted" });
        return (StatusCode::CONFLICT, Json(body));
    }
    match service.ledger.act(&key).await.expect("ledger") {
        Claim::Fresh | Claim::Again => (StatusCode::OK, Json(json!({ "ref": key }))),
        Claim::Tombstoned => (
            StatusCode::CONFLICT,
            Json(json!({ "message": "compensated" })),
        ),
    }
}

async fn compensate(
    State(service): State<Shared>,
    Path(step): Path<String>,
    headers: HeaderMap,
) -> StatusCode {
    let key = headers["idempotency-key"].to_str().expect("key").to_owned();
    if service.ledger.compensate(&key).await.expect("ledger") == Claim::Fresh {
        service.undone.lock().expect("lock").push(step);
    }
    StatusCode::NO_CONTENT
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{address}")
}

struct World {
    _dir: tempfile::TempDir,
    service: Shared,
    handle: SagaHandle,
}

async fn world() -> World {
    let dir = tempfile::tempdir().expect("dir");
    let open = |name: &str| -> Arc<dyn EventStore> {
        Arc::new(SqliteStore::open(SqliteOptions::new(dir.path().join(name))).expect("store"))
    };
    let service = Arc::new(Service {
        ledger: Ledger::new(open("participants.db")),
        seen: Mutex::new(HashMap::new()),
        undone: Mutex::new(Vec::new()),
    });
    let base = serve(
        Router::new()
            .route("/{step}", post(act))
            .route("/{step}/compensate", post(compensate))
            .with_state(Arc::clone(&service)),
    )
    .await;
    let participants = STEPS.iter().fold(
        HttpParticipants::new(Arc::new(SystemClock)).expect("client"),
        |p, step| {
            p.step(
                *step,
                format!("{base}/{step}"),
                Some(format!("{base}/{step}/compensate")),
            )
        },
    );
    let engine = SagaEngine::new(
        open("saga.db"),
        Arc::new(participants),
        Arc::new(SystemClock),
        EngineOptions::default(),
    )
    .register(definition());
    let handle = engine.handle();
    tokio::spawn(engine.run(futures::future::pending()));
    World {
        _dir: dir,
        service,
        handle,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_over_http_retry_5xx_and_timeouts_with_the_same_key_and_take_effect_once() {
    let world = world().await;
    let id = world
        .handle
        .start("trip", json!({ "car": true }), None)
        .await
        .expect("starts");
    assert_eq!(
        world.handle.wait(&id).await.expect("ends"),
        SagaStatus::Completed
    );
    let (state, log) = world.handle.get(&id).await.expect("saga");
    assert!(state.steps.iter().all(|s| s.result.is_some()), "{state:?}");
    // The hotel's first attempt ends at its deadline: by the engine's timer or by the
    // HTTP client's timeout, whichever comes first; a transient failure either way.
    let failed: Vec<String> = log
        .iter()
        .filter_map(|(_, e)| match e {
            SagaEvent::StepFailed { step, .. } | SagaEvent::StepTimedOut { step, .. } => {
                Some(step.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(failed, STEPS, "each step's first delivery failed: {log:?}");
    let seen = world.service.seen.lock().expect("lock").clone();
    for step in STEPS {
        assert_eq!(
            seen[&format!("{id}/{step}")],
            2,
            "one key per step, two deliveries"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_over_http_compensates_in_reverse() {
    let world = world().await;
    let id = world
        .handle
        .start("trip", json!({ "car": false }), None)
        .await
        .expect("starts");
    assert_eq!(
        world.handle.wait(&id).await.expect("ends"),
        SagaStatus::Compensated
    );
    assert_eq!(
        *world.service.undone.lock().expect("lock"),
        ["hotel", "flight"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_participant_is_a_transient_failure() {
    let participants = HttpParticipants::new(Arc::new(SystemClock))
        .expect("client")
        .step("flight", "http://127.0.0.1:9/flight", None);
    let call = StepCall {
        saga_id: "s".into(),
        saga_type: "trip".into(),
        step: "flight".into(),
        attempt: 1,
        compensation: false,
        idempotency_key: "s/flight".into(),
        deadline: Timestamp::from_system_time(std::time::SystemTime::now())
            .saturating_add(Duration::from_secs(2)),
        body: json!({}),
    };
    let Sent::Replied(Err(failure)) = participants.call(call.clone()).await else {
        panic!("a failure");
    };
    assert!(failure.transient, "{failure:?}");
    let compensation = StepCall {
        compensation: true,
        ..call
    };
    let Sent::Replied(Err(failure)) = participants.call(compensation).await else {
        panic!("a failure");
    };
    assert!(
        !failure.transient,
        "no URL is a configuration error: {failure:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_lists_shows_and_refuses_with_json_errors() {
    let world = world().await;
    let id = world
        .handle
        .start("trip", json!({ "car": true }), None)
        .await
        .expect("starts");
    world.handle.wait(&id).await.expect("ends");
    let base = serve(admin_router(world.handle.clone())).await;
    let client = reqwest::Client::new();
    let get = |path: String| client.get(format!("{base}{path}")).send();

    let list: Value = get("/admin/sagas?status=completed".into())
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list[0]["id"], json!(id));
    let shown = get(format!("/admin/sagas/{id}")).await.expect("show");
    assert_eq!(shown.status(), 200);
    let shown: Value = shown.json().await.expect("json");
    assert_eq!(shown["status"], "COMPLETED");
    assert!(shown["events"].as_array().expect("events").len() > 5);

    let missing = get("/admin/sagas/nope".into()).await.expect("show");
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.expect("json");
    assert_eq!(body["error"], "saga_not_found");
    let bad = get("/admin/sagas?status=sideways".into())
        .await
        .expect("list");
    assert_eq!(bad.status(), 400);
    let abort = client
        .post(format!("{base}/admin/sagas/{id}/abort"))
        .json(&json!({ "reason": "too late" }))
        .send()
        .await
        .expect("abort");
    assert_eq!(abort.status(), 409);
    let body: Value = abort.json().await.expect("json");
    assert_eq!(body["error"], "saga_terminal");
    let retry = client
        .post(format!("{base}/admin/sagas/{id}/retry"))
        .send()
        .await
        .expect("retry");
    assert_eq!(retry.status(), 409);
}

fn call_of(step: &str, attempt: u32) -> StepCall {
    StepCall {
        saga_id: "s".into(),
        saga_type: "trip".into(),
        step: step.into(),
        attempt,
        compensation: false,
        idempotency_key: format!("s/{step}"),
        deadline: Timestamp::from_system_time(std::time::SystemTime::now())
            .saturating_add(Duration::from_secs(5)),
        body: json!({}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_participant_opens_its_circuit_and_a_busy_one_fills_its_bulkhead() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let hits = Arc::new(AtomicU32::new(0));
    let router = Router::new()
        .route(
            "/down",
            post({
                let hits = Arc::clone(&hits);
                move || {
                    hits.fetch_add(1, Ordering::SeqCst);
                    async { StatusCode::SERVICE_UNAVAILABLE }
                }
            }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                StatusCode::OK
            }),
        );
    let base = serve(router).await;
    let resilience = eventyr_saga::http::Resilience {
        failures_to_open: 3,
        open_for: Duration::from_millis(300),
        concurrent_max: 1,
    };
    let participants = HttpParticipants::new(Arc::new(SystemClock))
        .expect("client")
        .resilience(resilience)
        .step("down", format!("{base}/down"), None)
        .step("slow", format!("{base}/slow"), None);

    for attempt in 1..=5 {
        let Sent::Replied(Err(failure)) = participants.call(call_of("down", attempt)).await else {
            panic!("a failure");
        };
        assert!(failure.transient);
        if attempt > 3 {
            assert!(failure.error.contains("circuit"), "{failure:?}");
        }
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        3,
        "open: no call reaches the participant"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let _ = participants.call(call_of("down", 6)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 4, "one trial after the pause");

    let (first, second) = tokio::join!(participants.call(call_of("slow", 1)), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        participants.call(call_of("slow", 1)).await
    });
    assert!(matches!(first, Sent::Replied(Ok(_))), "{first:?}");
    let Sent::Replied(Err(full)) = second else {
        panic!("the bulkhead is full: {second:?}");
    };
    assert!(
        full.transient && full.error.contains("bulkhead"),
        "{full:?}"
    );
}
