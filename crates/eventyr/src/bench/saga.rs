//! `eventyr bench saga`: a 5-step saga (3 compensable steps, a pivot, a
//! retriable-only step) against in-process participants on the SQLite backend.
//!
//! Per run, on fresh stores in the scratch directory:
//! - the baseline: `concurrency` closed-loop writers append 2-event batches (the size
//!   of a saga decision) to their own streams: the appends the disk allows at this
//!   concurrency;
//! - the sagas: `concurrency` closed-loop clients each start a saga and wait for it to
//!   finish; sagas/s completed, and start-to-finish latency. A saga records 6 appends
//!   (its start, then one per reply), so the ratio to the baseline is
//!   `6 × sagas/s ÷ appends/s`.
//!
//! Participants answer at once (an idempotency check in memory), so the figures are
//! the engine's: deciding, recording durably, and dispatching.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use eventyr_core::{NewEvent, StreamId, SystemClock};
use eventyr_saga::machine::SagaStatus;
use eventyr_saga::{
    EngineOptions, Failure, InProcess, SagaDefinition, SagaEngine, SagaHandle, Step, StepHandler,
};
use eventyr_store::{EventStore, ExpectedVersion, StreamAppend};
use futures::FutureExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;

use super::stats::{closed_loop, median, millis};
use crate::cli::SagaBenchArgs;
use crate::config::Config;
use crate::stores;

/// Appends a 5-step saga records.
const APPENDS_PER_SAGA: f64 = 6.0;

#[derive(Debug, Clone, Serialize, Default)]
struct Figures {
    appends_per_second: f64,
    append_p99_ms: f64,
    sagas_per_second: f64,
    saga_p50_ms: f64,
    saga_p99_ms: f64,
    /// 6 × sagas/s ÷ appends/s.
    ratio_to_appends: f64,
}

pub async fn run(config: &Config, args: SagaBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.concurrency > 0 && args.runs > 0,
        "--concurrency and --runs must be at least 1"
    );
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    println!(
        "eventyr bench saga: sqlite, 5-step saga, in-process participants, concurrency {}, {:?} per phase, {} runs",
        args.concurrency, args.duration, args.runs
    );
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let scratch = tempfile::Builder::new()
            .prefix("bench-saga-")
            .tempdir_in(&config.data_dir)
            .context("cannot create a scratch directory")?;
        let figures = measure(config, &args, scratch.path()).await?;
        print_run(&format!("run {run}"), &figures);
        runs.push(figures);
    }
    let of = |f: fn(&Figures) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    let medians = Figures {
        appends_per_second: of(|f| f.appends_per_second),
        append_p99_ms: of(|f| f.append_p99_ms),
        sagas_per_second: of(|f| f.sagas_per_second),
        saga_p50_ms: of(|f| f.saga_p50_ms),
        saga_p99_ms: of(|f| f.saga_p99_ms),
        ratio_to_appends: of(|f| f.ratio_to_appends),
    };
    print_run(&format!("median of {}", args.runs), &medians);
    println!(
        "targets: >= 1000 sagas/s (median {:.0}), p99 < 100 ms (median {:.1} ms)",
        medians.sagas_per_second, medians.saga_p99_ms
    );
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({ "runs": runs, "medians": medians }))?
        );
    }
    Ok(())
}

fn print_run(label: &str, f: &Figures) {
    println!(
        "{label}: {:.0} sagas/s, latency p50 {:.2} ms p99 {:.2} ms | raw 2-event appends {:.0}/s (p99 {:.2} ms) | saga appends = {:.0}% of raw",
        f.sagas_per_second,
        f.saga_p50_ms,
        f.saga_p99_ms,
        f.appends_per_second,
        f.append_p99_ms,
        100.0 * f.ratio_to_appends
    );
}

async fn measure(config: &Config, args: &SagaBenchArgs, scratch: &Path) -> anyhow::Result<Figures> {
    let raw = stores::open_sqlite(&scratch.join("raw.db"), config)?;
    let (appends, append_latency) = raw_appends(&raw, args).await?;
    let store = stores::open_sqlite(&scratch.join("saga.db"), config)?;
    let engine = SagaEngine::new(
        store,
        Arc::new(participants()),
        Arc::new(SystemClock),
        EngineOptions {
            sagas_active_max: args.concurrency * 2,
            ..EngineOptions::default()
        },
    )
    .register(definition());
    let handle = engine.handle();
    let (stop, mut stopped) = watch::channel(false);
    let running = tokio::spawn(engine.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    let (sagas, latency) = sagas(&handle, args).await?;
    let _ = stop.send(true);
    running.await.context("the engine task")??;
    Ok(Figures {
        appends_per_second: appends,
        append_p99_ms: millis(&append_latency, 0.99),
        sagas_per_second: sagas,
        saga_p50_ms: millis(&latency, 0.5),
        saga_p99_ms: millis(&latency, 0.99),
        ratio_to_appends: APPENDS_PER_SAGA * sagas / appends,
    })
}

fn definition() -> SagaDefinition {
    SagaDefinition::new("bench")
        .step(Step::compensable("reserve"))
        .step(Step::compensable("charge"))
        .step(Step::compensable("points"))
        .step(Step::pivot("ship"))
        .step(Step::retriable_only("notify"))
        .validate()
        .expect("the bench saga is valid")
}

/// Each step: an idempotency check by key, then a reply.
fn participants() -> InProcess {
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let handler: StepHandler = Arc::new(move |call| {
        let fresh = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(call.idempotency_key.clone());
        let outcome: Result<serde_json::Value, Failure> = Ok(serde_json::json!({ "fresh": fresh }));
        async move { outcome }.boxed()
    });
    ["reserve", "charge", "points", "ship", "notify"]
        .into_iter()
        .fold(InProcess::new(), |p, step| {
            p.step(step, Arc::clone(&handler))
        })
}

async fn sagas(handle: &SagaHandle, args: &SagaBenchArgs) -> anyhow::Result<(f64, Histogram<u64>)> {
    let handle = handle.clone();
    closed_loop(args.concurrency, args.duration, move |client, n, _| {
        let handle = handle.clone();
        async move {
            let data = serde_json::json!({ "client": client, "n": n });
            let id = handle.start("bench", data, None).await?;
            let status = handle.wait(&id).await?;
            anyhow::ensure!(
                status == SagaStatus::Completed,
                "saga {id} ended {status:?}"
            );
            Ok(())
        }
    })
    .await
}

/// Closed-loop writers, each appending 2-event batches to its own stream.
async fn raw_appends(
    store: &Arc<dyn EventStore>,
    args: &SagaBenchArgs,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    let store = Arc::clone(store);
    closed_loop(args.concurrency, args.duration, move |writer, _, _| {
        let store = Arc::clone(&store);
        async move {
            let stream = StreamId::new(format!("writer-{writer}"))?;
            let events = (0..2)
                .map(|_| NewEvent::json("StepSucceeded", &serde_json::json!({ "step": "x" })))
                .collect::<Result<Vec<_>, _>>()?;
            store
                .append(StreamAppend::new(stream, ExpectedVersion::Any, events))
                .await?;
            Ok(())
        }
    })
    .await
}
