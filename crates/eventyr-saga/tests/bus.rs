//! Sagas over the in-process bus: the orchestrator's commands go out through its own
//! store, a participant service consumes them and answers with reply events from its
//! store, and the orchestrator consumes those. Both services keep their own SQLite
//! store and inboxes; participants are idempotent by key.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventyr_bus::{
    Consumer, ConsumerName, ConsumerOptions, Handler, InProcBus, PublicEvents, ServiceName,
};
use eventyr_core::{RetryPolicy, SystemClock};
use eventyr_saga::bus::{COMMAND_TYPE, REPLY_TYPE};
use eventyr_saga::machine::SagaStatus;
use eventyr_saga::participants::{Claim, Ledger};
use eventyr_saga::{
    BusParticipants, CommandHandler, EngineOptions, Failure, ReplyHandler, SagaDefinition,
    SagaEngine, Step, StepHandler,
};
use eventyr_store::EventStore;
use eventyr_store::readmodel::ReadModels;
use eventyr_store_sqlite::{SqliteOptions, SqliteReadModels, SqliteStore};
use futures::FutureExt;
use serde_json::json;

const RETRY: RetryPolicy = RetryPolicy {
    attempts_max: 4,
    initial_delay: Duration::from_millis(50),
    multiplier: 2.0,
    delay_max: Duration::from_millis(200),
    jitter_ratio: 0.1,
};

fn definition() -> SagaDefinition {
    let timeout = Duration::from_secs(2);
    let step = |s: Step| s.timeout(timeout).retry(RETRY).compensation(timeout, RETRY);
    SagaDefinition::new("trip")
        .step(step(Step::compensable("flight")))
        .step(step(Step::compensable("hotel")))
        .step(Step::retriable_only("email").timeout(timeout).retry(RETRY))
        .validate()
        .expect("valid")
}

fn fast() -> ConsumerOptions {
    ConsumerOptions {
        fetch_wait: Duration::from_millis(50),
        housekeeping: Duration::from_millis(100),
        ..ConsumerOptions::default()
    }
}

/// The travel service's steps: idempotent by key; hotels in "nowhere" are refused.
fn travel_step(ledger: Ledger, undone: Arc<Mutex<Vec<String>>>) -> StepHandler {
    Arc::new(move |call| {
        let (ledger, undone) = (ledger.clone(), Arc::clone(&undone));
        async move {
            if call.compensation {
                let claim = ledger
                    .compensate(&call.idempotency_key)
                    .await
                    .map_err(|e| Failure::transient(e.to_string()))?;
                if claim == Claim::Fresh {
                    undone.lock().expect("lock").push(call.step.clone());
                }
                return Ok(json!({}));
            }
            if call.step == "hotel" && call.body["to"] == json!("nowhere") {
                return Err(Failure::permanent("no hotel there"));
            }
            match ledger.act(&call.idempotency_key).await {
                Ok(Claim::Tombstoned) => Err(Failure::permanent("compensated already")),
                Ok(_) => Ok(json!({ "ref": call.idempotency_key })),
                Err(error) => Err(Failure::transient(error.to_string())),
            }
        }
        .boxed()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_travel_as_commands_and_replies_over_the_bus() {
    let dir = tempfile::tempdir().expect("dir");
    let open = |name: &str| -> Arc<dyn EventStore> {
        Arc::new(SqliteStore::open(SqliteOptions::new(dir.path().join(name))).expect("store"))
    };
    let (orchestrator_store, travel_store) = (open("orchestrator.db"), open("travel.db"));
    let inboxes: Arc<dyn ReadModels> =
        Arc::new(SqliteReadModels::open_durable(dir.path().join("inbox")).expect("inboxes"));
    let (orchestrator, travel) = (
        ServiceName::new("orchestrator").expect("name"),
        ServiceName::new("travel").expect("name"),
    );
    let bus = InProcBus::new();
    bus.register(
        orchestrator.clone(),
        Arc::clone(&orchestrator_store),
        PublicEvents::only([COMMAND_TYPE]),
    );
    bus.register(
        travel.clone(),
        Arc::clone(&travel_store),
        PublicEvents::only([REPLY_TYPE]),
    );

    let engine = SagaEngine::new(
        Arc::clone(&orchestrator_store),
        Arc::new(BusParticipants::new(Arc::clone(&orchestrator_store))),
        Arc::new(SystemClock),
        EngineOptions::default(),
    )
    .register(definition());
    let handle = engine.handle();
    tokio::spawn(engine.run(futures::future::pending()));

    let undone = Arc::new(Mutex::new(Vec::new()));
    let ledger = Ledger::new(open("travel-ledger.db"));
    let step = travel_step(ledger, Arc::clone(&undone));
    let commands = CommandHandler::new(Arc::clone(&travel_store))
        .step("flight", Arc::clone(&step))
        .step("hotel", Arc::clone(&step))
        .step("email", step);
    let consumers = [
        (
            "travel_commands",
            orchestrator.clone(),
            Arc::new(commands) as Arc<dyn Handler>,
        ),
        (
            "orchestrator_replies",
            travel.clone(),
            Arc::new(ReplyHandler::new(handle.clone())) as Arc<dyn Handler>,
        ),
    ];
    for (name, source, handler) in consumers {
        let consumer = Consumer::new(
            ConsumerName::new(name).expect("name"),
            source,
            Arc::new(bus.clone()),
            Arc::clone(&inboxes),
            handler,
        )
        .options(fast());
        tokio::spawn(consumer.run(futures::future::pending::<()>()));
    }

    let completed = handle
        .start("trip", json!({ "to": "Oslo" }), None)
        .await
        .expect("starts");
    let refused = handle
        .start("trip", json!({ "to": "nowhere" }), None)
        .await
        .expect("starts");
    let wait = |id: String| {
        let handle = handle.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(30), handle.wait(&id))
                .await
                .expect("finishes in time")
                .expect("finishes")
        }
    };
    assert_eq!(wait(completed.clone()).await, SagaStatus::Completed);
    assert_eq!(wait(refused.clone()).await, SagaStatus::Compensated);
    assert_eq!(*undone.lock().expect("lock"), ["flight"]);
    let (state, log) = handle.get(&completed).await.expect("saga");
    assert!(state.steps.iter().all(|s| s.result.is_some()), "{log:?}");
}
