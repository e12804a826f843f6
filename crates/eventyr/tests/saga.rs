//! `eventyr saga list|show|retry|abort` against an engine running in this process on
//! the data directory's store: a saga whose compensation is broken ends FAILED and
//! flagged, the CLI lists and shows it, the compensation is fixed, the CLI retries it
//! and the running engine compensates it; a running saga is aborted from the CLI.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use eventyr_core::{RetryPolicy, SystemClock};
use eventyr_saga::machine::SagaStatus;
use eventyr_saga::{
    EngineOptions, Failure, InProcess, SagaDefinition, SagaEngine, Step, StepHandler,
};
use eventyr_store_sqlite::{SqliteOptions, SqliteStore};
use futures::FutureExt;
use serde_json::{Value, json};

use common::{run, text, wait_for};

const QUICK: RetryPolicy = RetryPolicy {
    attempts_max: 2,
    initial_delay: Duration::from_millis(10),
    multiplier: 2.0,
    delay_max: Duration::from_millis(50),
    jitter_ratio: 0.1,
};

fn definition() -> SagaDefinition {
    let step = |s: Step| s.retry(QUICK).compensation(Duration::from_secs(5), QUICK);
    SagaDefinition::new("trip")
        .step(step(Step::compensable("flight")))
        .step(step(Step::compensable("hotel")))
        .validate()
        .expect("valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sagas_are_listed_shown_and_retried_and_running_ones_aborted_from_the_cli() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path();
    let store =
        Arc::new(SqliteStore::open(SqliteOptions::new(data.join("eventyr.db"))).expect("store"));
    let fixed = Arc::new(AtomicBool::new(false));
    let flight: StepHandler = {
        let fixed = Arc::clone(&fixed);
        Arc::new(move |call| {
            let broken = call.compensation && !fixed.load(Ordering::SeqCst);
            async move {
                if broken {
                    Err(Failure::transient("the airline is down"))
                } else {
                    Ok(json!({}))
                }
            }
            .boxed()
        })
    };
    // The hotel refuses trips to "nowhere" and never answers for "slow" ones.
    let hotel: StepHandler = Arc::new(|call| {
        async move {
            match call.body["to"].as_str() {
                Some("nowhere") if !call.compensation => Err(Failure::permanent("no hotel there")),
                Some("slow") if !call.compensation => futures::future::pending().await,
                _ => Ok(json!({})),
            }
        }
        .boxed()
    });
    let participants = InProcess::new().step("flight", flight).step("hotel", hotel);
    let engine = SagaEngine::new(
        store,
        Arc::new(participants),
        Arc::new(SystemClock),
        EngineOptions::default(),
    )
    .register(definition());
    let handle = engine.handle();
    let running = tokio::spawn(engine.run(futures::future::pending()));

    let failed = handle
        .start("trip", json!({ "to": "nowhere" }), None)
        .await
        .expect("starts");
    assert_eq!(
        handle.wait(&failed).await.expect("ends"),
        SagaStatus::Failed
    );

    let listed = run(data, &["saga", "list", "--status", "failed"]).await;
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let table = text(&listed.stdout);
    assert!(
        table.contains(&failed) && table.contains("FAILED") && table.contains("yes"),
        "{table}"
    );
    let shown = run(data, &["saga", "show", &failed]).await;
    let timeline = text(&shown.stdout);
    assert!(timeline.contains("no hotel there"), "{timeline}");
    assert!(
        timeline.contains("compensation attempt 2 failed: the airline is down (given up)"),
        "{timeline}"
    );
    let json_show = run(data, &["saga", "show", &failed, "--json"]).await;
    let document: Value = serde_json::from_slice(&json_show.stdout).expect("json");
    assert_eq!(document["status"], "FAILED");

    fixed.store(true, Ordering::SeqCst);
    let retried = run(data, &["saga", "retry", &failed, "--wait", "20s"]).await;
    assert!(retried.status.success(), "{}", text(&retried.stderr));
    assert!(
        text(&retried.stdout).contains("done"),
        "{}",
        text(&retried.stdout)
    );
    wait_for("the retried saga compensated", async || {
        handle.get(&failed).await.expect("saga").0.status == SagaStatus::Compensated
    })
    .await;
    let again = run(data, &["saga", "retry", &failed, "--wait", "20s"]).await;
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("error[saga_not_retriable]"),
        "{}",
        text(&again.stderr)
    );

    let slow = handle
        .start("trip", json!({ "to": "slow" }), None)
        .await
        .expect("starts");
    let aborted = run(
        data,
        &[
            "saga",
            "abort",
            &slow,
            "--reason",
            "customer cancelled",
            "--wait",
            "20s",
        ],
    )
    .await;
    assert!(aborted.status.success(), "{}", text(&aborted.stderr));
    assert_eq!(
        handle.wait(&slow).await.expect("ends"),
        SagaStatus::Compensated
    );

    let unknown = run(data, &["saga", "show", "no-such-saga"]).await;
    assert!(
        text(&unknown.stderr).contains("error[saga_not_found]"),
        "{}",
        text(&unknown.stderr)
    );
    let bad = run(data, &["saga", "list", "--status", "sideways"]).await;
    assert!(!bad.status.success() && text(&bad.stderr).contains("unknown status"));
    running.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulation_runs_from_the_cli_and_names_its_seeds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ran = run(
        dir.path(),
        &["saga", "simulate", "--seeds", "5", "--from", "7"],
    )
    .await;
    assert!(ran.status.success(), "{}", text(&ran.stderr));
    assert!(
        text(&ran.stdout).contains("5 seeds from 7, 20 sagas each: every invariant held"),
        "{}",
        text(&ran.stdout)
    );
}
