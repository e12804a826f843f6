//! The saga metrics as Prometheus renders them: started and finished by type and
//! status, durations, step failures, compensations given up on, in flight, timers.

use std::sync::Arc;
use std::time::Duration;

use eventyr_core::{RetryPolicy, SystemClock};
use eventyr_saga::machine::SagaStatus;
use eventyr_saga::{
    EngineOptions, Failure, InProcess, SagaDefinition, SagaEngine, Step, StepHandler,
};
use eventyr_store::{EventStore, MemoryStore};
use futures::FutureExt;
use serde_json::json;

const ONCE: RetryPolicy = RetryPolicy {
    attempts_max: 1,
    initial_delay: Duration::from_millis(10),
    multiplier: 2.0,
    delay_max: Duration::from_millis(10),
    jitter_ratio: 0.0,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_and_steps_are_measured_with_bounded_labels() {
    let metrics = eventyr_telemetry::install_prometheus().expect("install the recorder");
    let definition = SagaDefinition::new("trip")
        .step(
            Step::compensable("flight")
                .retry(ONCE)
                .compensation(Duration::from_secs(1), ONCE),
        )
        .step(
            Step::compensable("hotel")
                .retry(ONCE)
                .compensation(Duration::from_secs(1), ONCE),
        )
        .validate()
        .expect("valid");
    // Flights cannot be cancelled; hotels refuse trips to "nowhere".
    let flight: StepHandler = Arc::new(|call| {
        async move {
            if call.compensation {
                Err(Failure::transient("cannot cancel"))
            } else {
                Ok(json!({}))
            }
        }
        .boxed()
    });
    let hotel: StepHandler = Arc::new(|call| {
        async move {
            if call.body["to"] == json!("nowhere") {
                Err(Failure::permanent("no hotel"))
            } else {
                Ok(json!({}))
            }
        }
        .boxed()
    });
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
    let engine = SagaEngine::new(
        store,
        Arc::new(InProcess::new().step("flight", flight).step("hotel", hotel)),
        Arc::new(SystemClock),
        EngineOptions::default(),
    )
    .register(definition);
    let handle = engine.handle();
    tokio::spawn(engine.run(futures::future::pending()));
    let ok = handle
        .start("trip", json!({ "to": "Oslo" }), None)
        .await
        .expect("starts");
    assert_eq!(handle.wait(&ok).await.expect("ends"), SagaStatus::Completed);
    let failed = handle
        .start("trip", json!({ "to": "nowhere" }), None)
        .await
        .expect("starts");
    assert_eq!(
        handle.wait(&failed).await.expect("ends"),
        SagaStatus::Failed
    );

    // The log is written before the metrics: wait for the last of them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut text = metrics.render();
    while !text.contains(r#"status="FAILED"} 1"#) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        text = metrics.render();
    }
    for line in [
        r#"eventyr_saga_started_total{saga_type="trip"} 2"#,
        r#"eventyr_saga_finished_total{saga_type="trip",status="COMPLETED"} 1"#,
        r#"eventyr_saga_finished_total{saga_type="trip",status="FAILED"} 1"#,
        r#"eventyr_saga_duration_seconds_count{saga_type="trip",status="COMPLETED"} 1"#,
        r#"eventyr_saga_step_duration_seconds_count{saga_type="trip",step="hotel"} 2"#,
        r#"eventyr_saga_step_failures_total{saga_type="trip",step="hotel"} 1"#,
        r#"eventyr_saga_compensations_failed_total{saga_type="trip",step="flight"} 1"#,
        "eventyr_saga_in_flight",
        "eventyr_saga_timers_pending",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(!text.contains(&ok), "no saga ids in labels");
}
