//! A saga definition run as a chain (choreography) on the in-process bus: four
//! services, each with its own SQLite store and inboxes, react to their neighbours'
//! events. Completion, a refusal undone last step first, an unknown outcome undone
//! including the step itself, a retriable-only step given up, a skipped step, and the
//! tracker's view of each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventyr_bus::{
    Consumer, ConsumerName, ConsumerOptions, InProcBus, Message, PublicEvents, ServiceName,
};
use eventyr_core::{RetryPolicy, SystemClock};
use eventyr_saga::chain::{Chain, EVENT_TYPES};
use eventyr_saga::choreography::{Tracker, TrackerHandler};
use eventyr_saga::participants::{Claim, Ledger};
use eventyr_saga::{Failure, SagaDefinition, Step, StepHandler};
use eventyr_store::EventStore;
use eventyr_store::readmodel::ReadModels;
use eventyr_store_sqlite::{SqliteOptions, SqliteReadModels, SqliteStore};
use futures::FutureExt;
use serde_json::{Value, json};

const RETRY: RetryPolicy = RetryPolicy {
    attempts_max: 3,
    initial_delay: Duration::from_millis(20),
    multiplier: 2.0,
    delay_max: Duration::from_millis(100),
    jitter_ratio: 0.1,
};

fn definition() -> SagaDefinition {
    let timeout = Duration::from_secs(2);
    let step = |s: Step| s.timeout(timeout).retry(RETRY).compensation(timeout, RETRY);
    SagaDefinition::new("trip")
        .step(step(Step::compensable("book")))
        .step(step(Step::compensable("flight")))
        .step(step(Step::compensable("insurance")).skip_if(|d| d["insured"] == json!(false)))
        .step(step(Step::compensable("hotel")))
        .step(Step::retriable_only("email").timeout(timeout).retry(RETRY))
        .validate()
        .expect("valid")
}

const SERVICES: [(&str, &str); 5] = [
    ("book", "agency"),
    ("flight", "travel"),
    ("insurance", "travel"),
    ("hotel", "hotels"),
    ("email", "mail"),
];

/// A trip begins with an agency's `TripRequested`.
fn begin(message: &Message) -> Option<(String, Value)> {
    let data: Value = message.event.data.to_value().ok()?;
    Some((data["trip"].as_str()?.to_owned(), data))
}

/// What each service did, in order: "<step>", "<step>:undo", or "<step>:undo(nothing)"
/// (a compensation of an action that never took effect); once per effect.
type Journal = Arc<Mutex<Vec<String>>>;

/// A participant idempotent by key: hotels in "nowhere" are refused; in "fog" they
/// never answer in time (an unknown outcome); mail to "void" always fails.
fn participant(ledger: Ledger, journal: Journal) -> StepHandler {
    Arc::new(move |call| {
        let (ledger, journal) = (ledger.clone(), Arc::clone(&journal));
        async move {
            let trip = format!("{}:{}", call.saga_id, call.step);
            if call.compensation {
                let claim = ledger
                    .compensate(&call.idempotency_key)
                    .await
                    .map_err(|e| Failure::transient(e.to_string()))?;
                let entry = match claim {
                    Claim::Fresh => format!("{trip}:undo"),
                    _ => format!("{trip}:undo(nothing)"),
                };
                journal.lock().expect("lock").push(entry);
                return Ok(json!({}));
            }
            match (call.step.as_str(), call.body["to"].as_str()) {
                ("hotel", Some("nowhere")) => return Err(Failure::permanent("no hotel there")),
                ("hotel", Some("fog")) => return Err(Failure::transient("no answer")),
                ("email", _) if call.body["mail"] == json!("void") => {
                    return Err(Failure::transient("mail server down"));
                }
                _ => {}
            }
            match ledger.act(&call.idempotency_key).await {
                Ok(Claim::Tombstoned) => Err(Failure::permanent("compensated already")),
                Ok(Claim::Fresh) => {
                    journal.lock().expect("lock").push(trip);
                    Ok(json!({ "ref": call.idempotency_key }))
                }
                Ok(Claim::Again) => Ok(json!({ "ref": call.idempotency_key })),
                Err(error) => Err(Failure::transient(error.to_string())),
            }
        }
        .boxed()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_runs_the_saga_by_reactions_and_undoes_it_last_step_first() {
    let dir = tempfile::tempdir().expect("dir");
    let open = |name: &str| -> Arc<dyn EventStore> {
        Arc::new(SqliteStore::open(SqliteOptions::new(dir.path().join(name))).expect("store"))
    };
    let inboxes: Arc<dyn ReadModels> =
        Arc::new(SqliteReadModels::open_durable(dir.path().join("inbox")).expect("inboxes"));
    let chain = Chain::new(
        definition(),
        &SERVICES,
        ("agency", "TripRequested"),
        Arc::new(begin),
    )
    .expect("chain");
    let bus = InProcBus::new();
    let journal: Journal = Arc::default();
    let mut stores = HashMap::new();
    for service in ["agency", "travel", "hotels", "mail"] {
        let store = open(&format!("{service}.db"));
        let public = PublicEvents::only(EVENT_TYPES.into_iter().chain(["TripRequested"]));
        bus.register(
            ServiceName::new(service).expect("name"),
            Arc::clone(&store),
            public,
        );
        stores.insert(service, store);
    }
    let options = ConsumerOptions {
        fetch_wait: Duration::from_millis(50),
        housekeeping: Duration::from_millis(100),
        ..ConsumerOptions::default()
    };
    let flow = Arc::new(chain.flow(Duration::from_secs(60)));
    let mut trackers = Vec::new();
    for service in ["agency", "travel", "hotels", "mail"] {
        let handler = participant(
            Ledger::new(open(&format!("{service}-ledger.db"))),
            Arc::clone(&journal),
        );
        let steps: HashMap<String, StepHandler> = SERVICES
            .iter()
            .filter(|(_, owner)| *owner == service)
            .map(|(step, _)| ((*step).to_owned(), Arc::clone(&handler)))
            .collect();
        let mut consumers = Vec::new();
        for source in chain.sources(service) {
            let participant = chain.participant(
                service,
                &source,
                Arc::clone(&stores[service]),
                steps.clone(),
            );
            consumers.push((
                format!("{service}_chain_{source}"),
                source,
                Arc::new(participant) as _,
            ));
        }
        let tracker = format!("tracker_{service}");
        trackers.push(ConsumerName::new(&tracker).expect("name"));
        consumers.push((
            tracker,
            service.to_owned(),
            Arc::new(TrackerHandler::new(Arc::clone(&flow))) as _,
        ));
        for (name, source, handler) in consumers {
            let consumer = Consumer::new(
                ConsumerName::new(&name).expect("name"),
                ServiceName::new(&source).expect("name"),
                Arc::new(bus.clone()),
                Arc::clone(&inboxes),
                handler,
            )
            .options(options.clone());
            tokio::spawn(consumer.run(futures::future::pending::<()>()));
        }
    }

    let trips = [
        ("t-ok", json!({ "to": "Oslo", "insured": true })),
        ("t-uninsured", json!({ "to": "Bergen", "insured": false })),
        ("t-refused", json!({ "to": "nowhere", "insured": true })),
        ("t-fog", json!({ "to": "fog", "insured": false })),
        (
            "t-void",
            json!({ "to": "Oslo", "insured": false, "mail": "void" }),
        ),
    ];
    for (trip, data) in &trips {
        let mut data = data.clone();
        data["trip"] = json!(trip);
        let event = eventyr_core::NewEvent::json("TripRequested", &data).expect("event");
        let stream = eventyr_core::StreamId::new(format!("trip-{trip}")).expect("stream");
        stores["agency"]
            .append(eventyr_store::StreamAppend::new(
                stream,
                eventyr_store::ExpectedVersion::Any,
                vec![event],
            ))
            .await
            .expect("append");
    }

    // The trackers' inboxes exist once their consumers have started.
    let opened = tokio::time::Instant::now() + Duration::from_secs(10);
    let tracker = loop {
        let clock = Arc::new(SystemClock);
        match Tracker::open(Arc::clone(&flow), Arc::clone(&inboxes), &trackers, clock).await {
            Ok(tracker) => break tracker,
            Err(error) => assert!(tokio::time::Instant::now() < opened, "{error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let statuses = loop {
        let flows = tracker.flows().await.expect("flows");
        let finished: HashMap<String, &str> = flows
            .iter()
            .filter(|f| f.status != "IN_PROGRESS" && f.status != "FAILED")
            .map(|f| (f.correlation_id.clone(), f.status))
            .collect();
        if finished.len() == trips.len() {
            break finished;
        }
        assert!(tokio::time::Instant::now() < deadline, "{flows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(statuses["t-ok"], "COMPLETED");
    assert_eq!(statuses["t-uninsured"], "COMPLETED");
    assert_eq!(statuses["t-refused"], "COMPENSATED");
    assert_eq!(statuses["t-fog"], "COMPENSATED");
    assert_eq!(
        statuses["t-void"], "COMPLETED",
        "a retriable-only step is given up"
    );

    let journal = journal.lock().expect("lock").clone();
    let of = |trip: &str| -> Vec<&str> {
        journal
            .iter()
            .filter_map(|entry| entry.strip_prefix(&format!("{trip}:")))
            .collect()
    };
    assert_eq!(
        of("t-ok"),
        ["book", "flight", "insurance", "hotel", "email"]
    );
    assert_eq!(
        of("t-uninsured"),
        ["book", "flight", "hotel", "email"],
        "skipped"
    );
    assert_eq!(
        of("t-refused"),
        [
            "book",
            "flight",
            "insurance",
            "insurance:undo",
            "flight:undo",
            "book:undo"
        ],
        "undone last step first"
    );
    assert_eq!(
        of("t-fog"),
        [
            "book",
            "flight",
            "hotel:undo(nothing)",
            "flight:undo",
            "book:undo"
        ],
        "an unknown outcome is undone too; a skipped step has nothing to undo"
    );
    assert_eq!(of("t-void"), ["book", "flight", "hotel"]);
}
