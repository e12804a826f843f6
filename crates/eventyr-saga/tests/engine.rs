//! The durable engine on the SQLite store, with in-process participants that keep
//! their own ledger (idempotent by key, compensations tombstone their actions).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eventyr_core::{RetryPolicy, SystemClock};
use eventyr_saga::machine::{SagaEvent, SagaStatus, StepCall};
use eventyr_saga::participants::{Claim, Ledger};
use eventyr_saga::{
    EngineOptions, Failure, Participants, SagaDefinition, SagaEngine, SagaHandle, Sent, Step,
};
use eventyr_store::EventStore;
use eventyr_store_sqlite::{SqliteOptions, SqliteStore};
use futures::FutureExt;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(30);

const QUICK: RetryPolicy = RetryPolicy {
    attempts_max: 3,
    initial_delay: Duration::from_millis(20),
    multiplier: 2.0,
    delay_max: Duration::from_millis(100),
    jitter_ratio: 0.1,
};

fn trip(timeout: Duration) -> SagaDefinition {
    let step = |s: Step| s.timeout(timeout).retry(QUICK).compensation(timeout, QUICK);
    SagaDefinition::new("trip")
        .step(step(Step::compensable("flight")))
        .step(step(Step::compensable("hotel")).skip_if(|d| d["hotel"] == json!(false)))
        .step(step(Step::compensable("car")))
        .step(Step::pivot("payment").timeout(timeout).retry(QUICK))
        .step(Step::retriable_only("email").timeout(timeout).retry(QUICK))
        .validate()
        .expect("valid")
}

/// How a participant behaves, per step.
#[derive(Default)]
struct Behaviour {
    refuse: HashSet<String>,
    /// Calls to leave unanswered, per step.
    hang: HashMap<String, usize>,
    broken_compensation: HashSet<String>,
}

/// Participants backed by a ledger in their own store.
struct Trip {
    ledger: Ledger,
    behaviour: Mutex<Behaviour>,
    /// Fresh effects per action key, and the undo order per saga.
    done: Mutex<HashMap<String, u32>>,
    undone: Mutex<HashMap<String, Vec<String>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("lock")
}

#[async_trait]
impl Participants for Trip {
    async fn call(&self, call: StepCall) -> Sent {
        let (refuse, hang, broken) = {
            let mut b = lock(&self.behaviour);
            let hang = match b.hang.get_mut(&call.step) {
                Some(left) if *left > 0 && !call.compensation => {
                    *left -= 1;
                    true
                }
                _ => false,
            };
            (
                b.refuse.contains(&call.step),
                hang,
                b.broken_compensation.contains(&call.step),
            )
        };
        if call.compensation {
            if broken {
                return Sent::Replied(Err(Failure::transient("compensation broken")));
            }
            let claim = self.ledger.compensate(&call.idempotency_key).await;
            if matches!(claim, Ok(Claim::Fresh)) {
                lock(&self.undone)
                    .entry(call.saga_id.clone())
                    .or_default()
                    .push(call.step.clone());
            }
            return Sent::Replied(
                claim
                    .map(|_| json!({}))
                    .map_err(|e| Failure::transient(e.to_string())),
            );
        }
        if hang {
            futures::future::pending::<()>().await;
        }
        if refuse {
            return Sent::Replied(Err(Failure::permanent("refused")));
        }
        match self.ledger.act(&call.idempotency_key).await {
            Ok(Claim::Fresh) => {
                *lock(&self.done)
                    .entry(call.idempotency_key.clone())
                    .or_default() += 1;
                Sent::Replied(Ok(json!({ "id": call.idempotency_key })))
            }
            Ok(Claim::Again) => Sent::Replied(Ok(json!({ "id": call.idempotency_key }))),
            Ok(Claim::Tombstoned) => Sent::Replied(Err(Failure::permanent("compensated already"))),
            Err(error) => Sent::Replied(Err(Failure::transient(error.to_string()))),
        }
    }
}

struct World {
    dir: tempfile::TempDir,
    store: Arc<dyn EventStore>,
    participants: Arc<Trip>,
}

fn open(path: &std::path::Path) -> Arc<dyn EventStore> {
    Arc::new(SqliteStore::open(SqliteOptions::new(path)).expect("store"))
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let store = open(&dir.path().join("saga.db"));
        let participants = Arc::new(Trip {
            ledger: Ledger::new(open(&dir.path().join("participants.db"))),
            behaviour: Mutex::new(Behaviour::default()),
            done: Mutex::new(HashMap::new()),
            undone: Mutex::new(HashMap::new()),
        });
        Self {
            dir,
            store,
            participants,
        }
    }

    fn engine(&self, timeout: Duration, participants: Arc<dyn Participants>) -> Running {
        let engine = SagaEngine::new(
            Arc::clone(&self.store),
            participants,
            Arc::new(SystemClock),
            EngineOptions::default(),
        )
        .register(trip(timeout));
        let handle = engine.handle();
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(engine.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        Running { handle, stop, task }
    }

    fn start(&self) -> Running {
        let participants = Arc::clone(&self.participants) as Arc<dyn Participants>;
        self.engine(Duration::from_secs(5), participants)
    }
}

struct Running {
    handle: SagaHandle,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), eventyr_saga::EngineError>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("stops")
            .expect("joins")
            .expect("runs cleanly");
    }
}

async fn wait_for(handle: &SagaHandle, id: &str, status: SagaStatus) -> Vec<SagaEvent> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (state, log) = handle.get(id).await.expect("saga");
        if state.status == status {
            return log.into_iter().map(|(_, e)| e).collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "saga {id} is {:?}, not {status:?}: {log:?}",
            state.status
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn count(log: &[SagaEvent], type_name: &str) -> usize {
    log.iter().filter(|e| e.type_name() == type_name).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_complete_and_each_step_takes_effect_once() {
    let world = World::new();
    let engine = world.start();
    let mut ids = Vec::new();
    for i in 0..40 {
        let data = json!({ "trip": i, "hotel": i % 2 == 0 });
        ids.push(
            engine
                .handle
                .start("trip", data, None)
                .await
                .expect("starts"),
        );
    }
    for (i, id) in ids.iter().enumerate() {
        let log = wait_for(&engine.handle, id, SagaStatus::Completed).await;
        let steps = if i % 2 == 0 { 5 } else { 4 };
        assert_eq!(count(&log, "StepSucceeded"), steps, "{log:?}");
        assert_eq!(count(&log, "StepSkipped"), 5 - steps);
    }
    let done = lock(&world.participants.done).clone();
    assert_eq!(done.len(), 40 * 5 - 20, "one effect per step that ran");
    assert!(done.values().all(|n| *n == 1), "each once: {done:?}");
    let listed = engine
        .handle
        .list(Some(SagaStatus::Completed), 100)
        .await
        .expect("list");
    assert_eq!(listed.len(), 40);
    assert_eq!(
        engine
            .handle
            .start("no-such-type", json!({}), None)
            .await
            .expect_err("unknown")
            .code(),
        "unknown_saga_type"
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_compensates_in_reverse_and_a_broken_compensation_waits_for_retry() {
    let world = World::new();
    {
        let mut behaviour = lock(&world.participants.behaviour);
        behaviour.refuse.insert("car".into());
        behaviour.broken_compensation.insert("flight".into());
    }
    let engine = world.start();
    let id = engine
        .handle
        .start("trip", json!({ "hotel": true }), None)
        .await
        .expect("starts");
    let log = wait_for(&engine.handle, &id, SagaStatus::Failed).await;
    let (state, _) = engine.handle.get(&id).await.expect("saga");
    assert!(state.flagged, "flagged for manual intervention");
    assert_eq!(
        count(&log, "CompensationFailed"),
        3,
        "the broken one, 3 attempts"
    );
    assert_eq!(
        lock(&world.participants.undone)
            .get(&id)
            .cloned()
            .unwrap_or_default(),
        ["hotel"],
        "the rest still ran"
    );

    // After the fix, the operator retries.
    lock(&world.participants.behaviour)
        .broken_compensation
        .clear();
    engine.handle.retry(&id).await.expect("retry");
    wait_for(&engine.handle, &id, SagaStatus::Compensated).await;
    assert_eq!(
        lock(&world.participants.undone)
            .get(&id)
            .cloned()
            .unwrap_or_default(),
        ["hotel", "flight"]
    );
    let again = engine.handle.retry(&id).await.expect_err("not FAILED now");
    assert_eq!(again.code(), "saga_not_retriable");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_compensates_now_including_the_step_under_way() {
    let world = World::new();
    lock(&world.participants.behaviour)
        .hang
        .insert("car".into(), usize::MAX);
    let engine = world.start();
    let id = engine
        .handle
        .start("trip", json!({ "hotel": true }), None)
        .await
        .expect("starts");
    let deadline = tokio::time::Instant::now() + WAIT;
    while count(
        &engine
            .handle
            .get(&id)
            .await
            .expect("saga")
            .1
            .iter()
            .map(|(_, e)| e.clone())
            .collect::<Vec<_>>(),
        "StepRequested",
    ) < 3
    {
        assert!(tokio::time::Instant::now() < deadline, "car requested");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine.handle.abort(&id, "customer").await.expect("abort");
    let log = wait_for(&engine.handle, &id, SagaStatus::Compensated).await;
    assert_eq!(count(&log, "StepAborted"), 1);
    assert_eq!(
        count(&log, "CompensationSucceeded"),
        3,
        "car (its outcome unknown), hotel, flight"
    );
    let late = engine
        .handle
        .abort(&id, "again")
        .await
        .expect_err("terminal");
    assert_eq!(late.code(), "saga_terminal");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_survives_a_restart_and_fires_once() {
    let world = World::new();
    lock(&world.participants.behaviour)
        .hang
        .insert("flight".into(), 2); // the first call and its resending after the restart
    let timeout = Duration::from_millis(300);
    let participants = Arc::clone(&world.participants) as Arc<dyn Participants>;
    let first = world.engine(timeout, Arc::clone(&participants));
    let id = first
        .handle
        .start("trip", json!({}), None)
        .await
        .expect("starts");
    first.stop().await;
    // Down past the deadline; the next engine recovers the saga and its timer.
    tokio::time::sleep(timeout * 2).await;
    let second = world.engine(timeout, participants);
    let log = wait_for(&second.handle, &id, SagaStatus::Completed).await;
    assert_eq!(
        count(&log, "StepTimedOut"),
        1,
        "the deadline fired once: {log:?}"
    );
    assert_eq!(count(&log, "StepSucceeded"), 5, "attempt 2 went through");
    second.stop().await;
    drop(world.dir);
}

/// A transport that sends commands and gets replies later, like the bus.
struct Asynchronous {
    sent: mpsc::UnboundedSender<StepCall>,
}

#[async_trait]
impl Participants for Asynchronous {
    async fn call(&self, call: StepCall) -> Sent {
        let _ = self.sent.send(call);
        Sent::Accepted
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asynchronous_participants_reply_later_and_duplicates_are_harmless() {
    let world = World::new();
    let (sent, mut calls) = mpsc::unbounded_channel();
    let engine = world.engine(Duration::from_secs(5), Arc::new(Asynchronous { sent }));
    let handle = engine.handle.clone();
    let replier = tokio::spawn(async move {
        while let Some(call) = calls.recv().await {
            let result: Result<Value, Failure> = Ok(json!({ "ok": true }));
            for _ in 0..2 {
                handle
                    .reply(
                        &call.saga_id,
                        &call.step,
                        call.attempt,
                        call.compensation,
                        result.clone(),
                    )
                    .await
                    .expect("reply");
            }
        }
    });
    let id = engine
        .handle
        .start("trip", json!({ "hotel": true }), None)
        .await
        .expect("starts");
    let log = wait_for(&engine.handle, &id, SagaStatus::Completed).await;
    assert_eq!(count(&log, "StepSucceeded"), 5, "each reply counted once");
    engine.stop().await;
    replier.abort();
    let _ = replier.map(|_| ()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_by_business_key_is_idempotent() {
    let world = World::new();
    let engine = world.start();
    for _ in 0..3 {
        engine
            .handle
            .start_with_id("trip", "order-42", json!({ "hotel": true }), None)
            .await
            .expect("starts once, then answers as started");
    }
    let log = wait_for(&engine.handle, "order-42", SagaStatus::Completed).await;
    assert_eq!(count(&log, "SagaStarted"), 1, "{log:?}");
    engine
        .handle
        .start_with_id("trip", "order-42", json!({}), None)
        .await
        .expect("a finished saga is not started again");
    let (_, log) = engine.handle.get("order-42").await.expect("saga");
    assert_eq!(log.len(), 12, "nothing added");
    let bad = engine
        .handle
        .start_with_id("trip", "", json!({}), None)
        .await
        .expect_err("an empty id");
    assert_eq!(bad.code(), "invalid_input");
    engine.stop().await;
}

/// A saga whose log holds an event that does not decode (a damaged store, a newer
/// version's event) ends FAILED and flagged at recovery; the engine goes on with the
/// others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_saga_log_fails_that_saga_and_the_others_go_on() {
    let world = World::new();
    lock(&world.participants.behaviour)
        .hang
        .insert("flight".into(), 2);
    let first = world.start();
    let damaged = first
        .handle
        .start("trip", json!({}), None)
        .await
        .expect("starts");
    let healthy = first
        .handle
        .start("trip", json!({}), None)
        .await
        .expect("starts");
    first.stop().await;
    let garbage = eventyr_core::NewEvent::json("StepSucceeded", &json!({ "not": "a saga event" }))
        .expect("json");
    let stream = eventyr_core::StreamId::new(format!("saga-{damaged}")).expect("id");
    world
        .store
        .append(eventyr_store::StreamAppend::new(
            stream,
            eventyr_store::ExpectedVersion::Any,
            vec![garbage],
        ))
        .await
        .expect("append");

    let second = world.start();
    wait_for(&second.handle, &healthy, SagaStatus::Completed).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let failed = second
            .handle
            .list(Some(SagaStatus::Failed), 10)
            .await
            .expect("list");
        if let Some(summary) = failed.iter().find(|s| s.id == damaged) {
            assert!(summary.flagged, "{summary:?}");
            assert!(
                summary
                    .reason
                    .as_deref()
                    .is_some_and(|r| r.contains("cannot be read")),
                "{summary:?}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never failed: {failed:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    second.stop().await;
    // A third start finds nothing left to recover of it.
    let third = world.start();
    third.stop().await;
    drop(world.dir);
}
