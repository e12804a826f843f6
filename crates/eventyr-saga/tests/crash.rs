//! Crash recovery: the engine process is killed with SIGKILL at random moments while it
//! starts and runs sagas; each restart recovers the unfinished ones from the log. In
//! the end every saga is terminal, each step took effect at most once, and each step
//! that took effect in a compensated saga was compensated exactly once.
//!
//! The engine runs in a child process: this test binary again, with
//! `EVENTYR_SAGA_CRASH_CHILD` set, running only `child_process_entry`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eventyr_core::{RetryPolicy, StreamVersion, SystemClock};
use eventyr_saga::machine::{SagaStatus, StepCall};
use eventyr_saga::participants::{Claim, Ledger};
use eventyr_saga::{
    EngineOptions, Failure, Participants, SagaDefinition, SagaEngine, Sent, Step, StepKind,
};
use eventyr_store::{EventStore, ReadStream};
use eventyr_store_sqlite::{SqliteOptions, SqliteStore};
use serde_json::json;

const CHILD: &str = "EVENTYR_SAGA_CRASH_CHILD";
const ROUNDS: usize = 6;
const SAGAS_PER_ROUND: usize = 100;

fn definition() -> SagaDefinition {
    let retry = RetryPolicy {
        attempts_max: 4,
        initial_delay: Duration::from_millis(20),
        multiplier: 2.0,
        delay_max: Duration::from_millis(200),
        jitter_ratio: 0.1,
    };
    let timeout = Duration::from_millis(500);
    let step = |s: Step| s.timeout(timeout).retry(retry).compensation(timeout, retry);
    SagaDefinition::new("trip")
        .step(step(Step::compensable("flight")))
        .step(step(Step::compensable("hotel")).skip_if(|d| d["hotel"] == json!(false)))
        .step(step(Step::compensable("car")))
        .step(Step::pivot("payment").timeout(timeout).retry(retry))
        .step(Step::retriable_only("email").timeout(timeout).retry(retry))
        .validate()
        .expect("valid")
}

fn open(path: &Path) -> Arc<dyn EventStore> {
    Arc::new(SqliteStore::open(SqliteOptions::new(path)).expect("store"))
}

/// Participants with a durable ledger: claims and effects in one append.
struct Durable {
    ledger: Ledger,
}

#[async_trait]
impl Participants for Durable {
    async fn call(&self, call: StepCall) -> Sent {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..10))).await;
        if fastrand::f64() < 0.1 {
            return Sent::Replied(Err(Failure::transient("503")));
        }
        let key = call.idempotency_key.as_str();
        let claim = if call.compensation {
            self.ledger.compensate(key).await
        } else if call.step == "car" && call.body["refuse"] == json!(true) {
            return Sent::Replied(Err(Failure::permanent("no cars left")));
        } else {
            self.ledger.act(key).await
        };
        Sent::Replied(match claim {
            Ok(Claim::Tombstoned) => Err(Failure::permanent("compensated already")),
            Ok(_) => Ok(json!({ "key": key })),
            Err(error) => Err(Failure::transient(error.to_string())),
        })
    }
}

/// The child: starts `start` sagas, runs until killed, or (with `start` = 0) until
/// every saga is terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process_entry() {
    let Ok(dir) = std::env::var(CHILD) else {
        return; // Not a child: nothing to do here (the parent is the test below).
    };
    let dir = PathBuf::from(dir);
    let start: usize = std::env::var("EVENTYR_SAGA_CRASH_START")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let participants = Arc::new(Durable {
        ledger: Ledger::new(open(&dir.join("participants.db"))),
    });
    let engine = SagaEngine::new(
        open(&dir.join("saga.db")),
        participants,
        Arc::new(SystemClock),
        EngineOptions::default(),
    )
    .register(definition());
    let handle = engine.handle();
    let run = tokio::spawn(engine.run(futures::future::pending()));
    for i in 0..start {
        let handle = handle.clone();
        tokio::spawn(async move {
            let data = json!({ "n": i, "hotel": i % 3 != 0, "refuse": i % 4 == 0 });
            let _ = handle.start("trip", data, None).await;
        });
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    if start > 0 {
        let _ = run.await; // Until killed.
        return;
    }
    loop {
        let sagas = handle.list(None, 100_000).await.expect("list");
        if sagas.iter().all(|s| s.status.is_terminal()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn child(dir: &Path, start: usize) -> Child {
    Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD, dir)
        .env("EVENTYR_SAGA_CRASH_START", start.to_string())
        .spawn()
        .expect("the child starts")
}

/// Sagas not finished, as the log says.
async fn under_way(dir: &Path) -> usize {
    let engine = SagaEngine::new(
        open(&dir.join("saga.db")),
        Arc::new(eventyr_saga::InProcess::new()),
        Arc::new(SystemClock),
        EngineOptions::default(),
    );
    let sagas = engine.handle().list(None, 100_000).await.expect("list");
    sagas.iter().filter(|s| !s.status.is_terminal()).count()
}

async fn key_events(store: &Arc<dyn EventStore>, key: &str) -> Vec<String> {
    let stream = eventyr_core::StreamId::new(format!("key-{}", key.replace('/', ":"))).expect("id");
    store
        .read_stream(
            &stream,
            ReadStream::forwards(StreamVersion::FIRST).limit(10),
        )
        .await
        .expect("read")
        .events
        .iter()
        .map(|e| e.event_type.as_str().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_survive_sigkill_of_the_engine() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let mut unfinished = 0;
    for _ in 0..ROUNDS {
        let mut process = child(dir.path(), SAGAS_PER_ROUND);
        tokio::time::sleep(Duration::from_millis(fastrand::u64(150..700))).await;
        process.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix.
        process.wait().expect("reaped");
        unfinished += under_way(dir.path()).await;
    }
    assert!(unfinished > 0, "the kills left sagas under way");
    let mut last = child(dir.path(), 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = last.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the last run never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "the last run ends cleanly");

    let sagas_store = open(&dir.path().join("saga.db"));
    let ledger = open(&dir.path().join("participants.db"));
    let engine = SagaEngine::new(
        Arc::clone(&sagas_store),
        Arc::new(Durable {
            ledger: Ledger::new(Arc::clone(&ledger)),
        }),
        Arc::new(SystemClock),
        EngineOptions::default(),
    )
    .register(definition());
    let handle = engine.handle();
    let sagas = handle.list(None, 100_000).await.expect("list");
    assert!(
        sagas.len() >= ROUNDS * 5,
        "sagas were started: {}",
        sagas.len()
    );
    let definition = definition();
    let (mut completed, mut compensated) = (0, 0);
    for saga in &sagas {
        let (state, _) = handle.get(&saga.id).await.expect("saga");
        assert!(
            state.status.is_terminal(),
            "{} is {:?}",
            saga.id,
            state.status
        );
        for (step, def) in state.steps.iter().zip(&definition.steps) {
            let key = format!("{}/{}", saga.id, step.name);
            let events = key_events(&ledger, &key).await;
            let done = events.first().map(String::as_str) == Some("Done");
            let undone = events.iter().filter(|t| *t == "Undone").count();
            assert!(events.len() <= 2, "{key}: {events:?}");
            match state.status {
                SagaStatus::Completed => {
                    use eventyr_saga::machine::Forward;
                    let ok = match step.forward {
                        Forward::Skipped => events.is_empty(),
                        Forward::Abandoned => def.kind == StepKind::RetriableOnly,
                        _ => done && undone == 0,
                    };
                    assert!(ok, "COMPLETED {key}: {:?} {events:?}", step.forward);
                }
                SagaStatus::Compensated => {
                    let ok = match def.kind {
                        StepKind::Compensable => usize::from(done) == undone,
                        StepKind::Pivot | StepKind::RetriableOnly => !done,
                    };
                    assert!(ok, "COMPENSATED {key}: {events:?}");
                }
                _ => assert!(state.flagged, "{} FAILED and not flagged", saga.id),
            }
        }
        match state.status {
            SagaStatus::Completed => completed += 1,
            SagaStatus::Compensated => compensated += 1,
            _ => {}
        }
    }
    eprintln!(
        "{} sagas after {ROUNDS} SIGKILLs ({unfinished} under way at the kills): {completed} completed, {compensated} compensated",
        sagas.len()
    );
    assert!(completed > 0 && compensated > 0);
}
