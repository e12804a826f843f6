//! `eventyr bench cqrs`: commands and projections on the SQLite backend.
//!
//! Per run, each phase on a fresh store in the scratch directory:
//! - A. raw appends: `clients` closed-loop writers append one event to a random one of
//!   `aggregates` streams: the ceiling for commands;
//! - B. commands on fresh aggregates: load (or take from the aggregate cache), decide,
//!   append; again with the cache off;
//! - C. commands paced at 80 % of B's rate while a projection runs live: the lag from
//!   each command's acknowledgement to the projection's checkpoint passing it;
//! - D. commands on aggregates with `history` events each, without then with
//!   snapshots (cache off, so that every command loads);
//! - E. the projection catching up over D's history: events applied per second.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use eventyr_core::{Json, NewEvent, Position, RecordedEvent, StreamId};
use eventyr_cqrs::{
    AdjacentlyTagged, Aggregate, Command, CommandHandler, HandlerOptions, Projection,
    ProjectionError, ProjectionsHandle, RunnerOptions, Upcasters, projections,
};
use eventyr_store::readmodel::ReadModels;
use eventyr_store::sql::SqlStatement;
use eventyr_store::{EventStore, ExpectedVersion, NewSnapshot, StreamAppend};
use eventyr_store_sqlite::SqliteReadModels;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::stats::{closed_loop, latency_histogram, median, millis, record};
use crate::cli::CqrsBenchArgs;
use crate::config::Config;
use crate::stores;

/// The bench's aggregate: a counter.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counter {
    count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
enum CounterEvent {
    Incremented { count: u64 },
}

impl AdjacentlyTagged for CounterEvent {}

#[derive(Debug, thiserror::Error)]
#[error("a counter never refuses")]
struct Never;

impl Aggregate for Counter {
    const KIND: &'static str = "counter";
    type Command = ();
    type Event = CounterEvent;
    type Error = Never;

    fn handle(&self, (): &()) -> Result<Vec<CounterEvent>, Never> {
        Ok(vec![CounterEvent::Incremented {
            count: self.count + 1,
        }])
    }

    fn apply(&mut self, event: &CounterEvent) {
        let CounterEvent::Incremented { count } = event;
        self.count = *count;
    }
}

/// The bench's projection: every counter's value (an upsert per event).
struct Counters;

impl Projection for Counters {
    fn name(&self) -> &str {
        "bench_counters"
    }

    fn event_types(&self) -> &[&str] {
        &["Incremented"]
    }

    fn schema(&self) -> Vec<String> {
        vec!["CREATE TABLE counters (id TEXT PRIMARY KEY, count BIGINT NOT NULL)".into()]
    }

    fn apply(&self, event: &RecordedEvent) -> Result<Vec<SqlStatement>, ProjectionError> {
        let data: serde_json::Value = event
            .data
            .to_value()
            .map_err(|e| ProjectionError::new(e.to_string()))?;
        let count = data["count"]
            .as_i64()
            .ok_or_else(|| ProjectionError::new("no count"))?;
        Ok(vec![
            SqlStatement::new(
                "INSERT INTO counters (id, count) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET count = excluded.count",
            )
            .bind(event.stream_id.as_str())
            .bind(count),
        ])
    }
}

/// One run's figures.
#[derive(Debug, Clone, Serialize, Default)]
struct Figures {
    raw_appends_per_second: f64,
    raw_append_p99_ms: f64,
    commands_per_second: f64,
    command_p50_ms: f64,
    command_p99_ms: f64,
    /// B / A.
    commands_vs_raw: f64,
    /// B again with the aggregate cache off: every command loads its aggregate.
    uncached_commands_per_second: f64,
    paced_commands_per_second: f64,
    projection_lag_p50_ms: f64,
    projection_lag_p99_ms: f64,
    history_commands_per_second: f64,
    history_command_p99_ms: f64,
    snapshot_commands_per_second: f64,
    snapshot_command_p99_ms: f64,
    projection_events_per_second: f64,
}

pub async fn run(config: &Config, args: CqrsBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.aggregates > 0 && args.clients > 0 && args.runs > 0,
        "--aggregates, --clients and --runs must be at least 1"
    );
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    println!(
        "eventyr bench cqrs: sqlite, {} aggregates, {} clients, {} events of history, snapshots every {}, {:?} per phase, {} runs",
        args.aggregates, args.clients, args.history, args.snapshot_every, args.duration, args.runs
    );
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let scratch = tempfile::Builder::new()
            .prefix("bench-cqrs-")
            .tempdir_in(&config.data_dir)
            .context("cannot create a scratch directory")?;
        let figures = measure(config, &args, scratch.path()).await?;
        print_run(run, &figures);
        runs.push(figures);
    }
    let medians = medians(&runs);
    println!("median of {} runs:", args.runs);
    print_run(0, &medians);
    println!(
        "commands are {:.0}% of raw appends (target >= 70%); projection lag p99 at 80% load: {:.1} ms (target < 50 ms)",
        100.0 * medians.commands_vs_raw,
        medians.projection_lag_p99_ms
    );
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({ "runs": runs, "medians": medians }))?
        );
    }
    Ok(())
}

async fn measure(config: &Config, args: &CqrsBenchArgs, scratch: &Path) -> anyhow::Result<Figures> {
    let mut figures = Figures::default();
    let raw_store = stores::open_sqlite(&scratch.join("raw.db"), config)?;
    let (raw, raw_latency) = raw_appends(&raw_store, args).await?;
    figures.raw_appends_per_second = raw;
    figures.raw_append_p99_ms = millis(&raw_latency, 0.99);

    let store = stores::open_sqlite(&scratch.join("commands.db"), config)?;
    let fresh = Arc::new(handler(&store, None, true));
    let (rate, latency) = commands(&fresh, args, None, None).await?;
    figures.commands_per_second = rate;
    figures.command_p50_ms = millis(&latency, 0.5);
    figures.command_p99_ms = millis(&latency, 0.99);
    figures.commands_vs_raw = rate / raw;
    let uncached = stores::open_sqlite(&scratch.join("uncached.db"), config)?;
    let (uncached_rate, _) =
        commands(&Arc::new(handler(&uncached, None, false)), args, None, None).await?;
    figures.uncached_commands_per_second = uncached_rate;

    let models: Arc<dyn ReadModels> = Arc::new(SqliteReadModels::open(scratch.join("read"))?);
    let target = 0.8 * figures.commands_per_second;
    let (paced, lag_p50, lag_p99) = lag_under_load(&store, &models, &fresh, args, target).await?;
    figures.paced_commands_per_second = paced;
    figures.projection_lag_p50_ms = lag_p50;
    figures.projection_lag_p99_ms = lag_p99;

    let history = stores::open_sqlite(&scratch.join("history.db"), config)?;
    build_history(&history, args).await?;
    // Without the cache, so that every command loads: the cost snapshots remove.
    let (rate, latency) =
        commands(&Arc::new(handler(&history, None, false)), args, None, None).await?;
    figures.history_commands_per_second = rate;
    figures.history_command_p99_ms = millis(&latency, 0.99);
    snapshot_all(&history, args).await?;
    let with_snapshots = Arc::new(handler(&history, Some(args.snapshot_every), false));
    let (rate, latency) = commands(&with_snapshots, args, None, None).await?;
    figures.snapshot_commands_per_second = rate;
    figures.snapshot_command_p99_ms = millis(&latency, 0.99);

    let history_models: Arc<dyn ReadModels> =
        Arc::new(SqliteReadModels::open(scratch.join("history-read"))?);
    figures.projection_events_per_second =
        projection_catch_up(&history, &history_models, args.duration * 2).await?;
    Ok(figures)
}

fn handler(
    store: &Arc<dyn EventStore>,
    snapshot_every: Option<u64>,
    cached: bool,
) -> CommandHandler<Counter> {
    let defaults = HandlerOptions::default();
    let options = HandlerOptions {
        snapshot_every,
        cache_capacity: if cached { defaults.cache_capacity } else { 0 },
        ..defaults
    };
    CommandHandler::new(Arc::clone(store), Arc::new(Upcasters::new()), options)
}

async fn raw_appends(
    store: &Arc<dyn EventStore>,
    args: &CqrsBenchArgs,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    let (store, aggregates) = (Arc::clone(store), args.aggregates);
    closed_loop(args.clients, args.duration, move |_, _, random| {
        let store = Arc::clone(&store);
        async move {
            let stream = StreamId::new(format!("counter-{}", random % aggregates))?;
            let event = NewEvent::json("Incremented", &serde_json::json!({ "count": 1 }))?;
            store
                .append(StreamAppend::new(stream, ExpectedVersion::Any, vec![event]))
                .await?;
            Ok(())
        }
    })
    .await
}

/// Clients executing commands on random aggregates: closed loop, or paced to
/// `rate_per_second` in all. Each acknowledged command's last position and ack time go
/// to `acks` when given.
async fn commands(
    handler: &Arc<CommandHandler<Counter>>,
    args: &CqrsBenchArgs,
    rate_per_second: Option<f64>,
    acks: Option<mpsc::UnboundedSender<(Position, Instant)>>,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    let started = Instant::now();
    let deadline = started + args.duration;
    let interval =
        rate_per_second.map(|rate| Duration::from_secs_f64(args.clients as f64 / rate.max(1.0)));
    let clients: Vec<_> = (0..args.clients)
        .map(|c| {
            let (handler, acks) = (Arc::clone(handler), acks.clone());
            let aggregates = args.aggregates;
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(c as u64 + 1000);
                let mut latency = latency_histogram();
                let mut next =
                    started + interval.map_or(Duration::ZERO, |i| i.mul_f64(c as f64 / 8.0));
                while Instant::now() < deadline {
                    if let Some(interval) = interval {
                        tokio::time::sleep_until(next.into()).await;
                        next += interval;
                    }
                    let begun = Instant::now();
                    let done = handler
                        .execute(Command::new(rng.u64(..aggregates).to_string(), ()))
                        .await?;
                    record(&mut latency, begun.elapsed());
                    if let (Some(acks), Some((_, last))) = (&acks, done.positions) {
                        let _ = acks.send((last, Instant::now()));
                    }
                }
                anyhow::Ok(latency)
            })
        })
        .collect();
    let mut latency = latency_histogram();
    for client in clients {
        latency.add(client.await??).context("histogram")?;
    }
    Ok((
        latency.len() as f64 / started.elapsed().as_secs_f64(),
        latency,
    ))
}

/// Runs the projection live (caught up first), paces commands at `rate`, and measures
/// each command's time from acknowledgement to the projection's checkpoint passing it.
async fn lag_under_load(
    store: &Arc<dyn EventStore>,
    models: &Arc<dyn ReadModels>,
    handler: &Arc<CommandHandler<Counter>>,
    args: &CqrsBenchArgs,
    rate: f64,
) -> anyhow::Result<(f64, f64, f64)> {
    let list: Vec<Arc<dyn Projection>> = vec![Arc::new(Counters)];
    let options = RunnerOptions {
        idle_poll: Duration::from_millis(100),
        ..RunnerOptions::default()
    };
    let (runner, handle) = projections(
        Arc::clone(store),
        Arc::clone(models),
        Arc::new(Upcasters::new()),
        list,
        options,
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(runner.run(async {
        let _ = stopped.await;
    }));
    let head = store.head().await?;
    wait_for(&handle, head).await?;
    let (acks, received) = mpsc::unbounded_channel();
    let tracker = tokio::spawn(track_lag(handle.clone(), received));
    let (paced, _) = commands(handler, args, Some(rate), Some(acks)).await?;
    let lag = tracker.await??;
    let _ = stop.send(());
    running.await?;
    Ok((paced, millis(&lag, 0.5), millis(&lag, 0.99)))
}

async fn wait_for(handle: &ProjectionsHandle, position: Position) -> anyhow::Result<()> {
    let mut changes = handle.watch();
    while handle
        .status()
        .first()
        .map_or(Position::ZERO, |s| s.checkpoint)
        < position
    {
        tokio::time::timeout(Duration::from_secs(120), changes.changed())
            .await
            .context("the projection did not catch up")??;
    }
    Ok(())
}

/// Lag per acknowledged command: from its ack to the projection's checkpoint passing
/// its position. Ends when the acks end and every one was seen.
async fn track_lag(
    handle: ProjectionsHandle,
    mut acks: mpsc::UnboundedReceiver<(Position, Instant)>,
) -> anyhow::Result<Histogram<u64>> {
    let mut changes = handle.watch();
    let mut pending: BTreeMap<Position, Vec<Instant>> = BTreeMap::new();
    let mut lag = latency_histogram();
    let mut open = true;
    while open || !pending.is_empty() {
        tokio::select! {
            ack = acks.recv(), if open => match ack {
                Some((position, at)) => pending.entry(position).or_default().push(at),
                None => open = false,
            },
            changed = tokio::time::timeout(Duration::from_secs(30), changes.changed()) => {
                changed.context("the projection stopped following")??;
            }
        }
        let checkpoint = handle
            .status()
            .first()
            .map_or(Position::ZERO, |s| s.checkpoint);
        let later = pending.split_off(&checkpoint.next());
        let now = Instant::now();
        for at in std::mem::replace(&mut pending, later)
            .into_values()
            .flatten()
        {
            record(&mut lag, now.saturating_duration_since(at));
        }
    }
    Ok(lag)
}

/// Gives every aggregate `history` events, in appends of 100.
async fn build_history(store: &Arc<dyn EventStore>, args: &CqrsBenchArgs) -> anyhow::Result<()> {
    let workers: Vec<_> = (0..args.clients as u64)
        .map(|w| {
            let store = Arc::clone(store);
            let (aggregates, history, clients) =
                (args.aggregates, args.history, args.clients as u64);
            tokio::spawn(async move {
                for aggregate in (w..aggregates).step_by(clients as usize) {
                    let stream = StreamId::new(format!("counter-{aggregate}"))?;
                    let mut count = 0;
                    while count < history {
                        let batch = (history - count).min(100);
                        let events = (0..batch)
                            .map(|i| {
                                NewEvent::json(
                                    "Incremented",
                                    &serde_json::json!({ "count": count + i + 1 }),
                                )
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        store
                            .append(StreamAppend::new(
                                stream.clone(),
                                ExpectedVersion::Any,
                                events,
                            ))
                            .await?;
                        count += batch;
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    Ok(())
}

/// Saves every aggregate's snapshot at the end of its history.
async fn snapshot_all(store: &Arc<dyn EventStore>, args: &CqrsBenchArgs) -> anyhow::Result<()> {
    let handler = handler(store, None, false);
    for aggregate in 0..args.aggregates {
        let loaded = handler.load(&aggregate.to_string()).await?;
        let Some(version) = loaded.version else {
            continue;
        };
        let snapshot = NewSnapshot {
            stream: StreamId::new(format!("counter-{aggregate}"))?,
            version,
            schema_version: Counter::SNAPSHOT_SCHEMA,
            data: Json::encode(&loaded.state)?,
        };
        store.save_snapshot(snapshot).await?;
    }
    Ok(())
}

/// The projection catching up from position 0, for at most `limit`: events applied
/// per second.
async fn projection_catch_up(
    store: &Arc<dyn EventStore>,
    models: &Arc<dyn ReadModels>,
    limit: Duration,
) -> anyhow::Result<f64> {
    let list: Vec<Arc<dyn Projection>> = vec![Arc::new(Counters)];
    let (runner, handle) = projections(
        Arc::clone(store),
        Arc::clone(models),
        Arc::new(Upcasters::new()),
        list,
        RunnerOptions::default(),
    );
    let head = store.head().await?;
    let started = Instant::now();
    runner
        .run(async {
            let _ = tokio::time::timeout(limit, wait_for(&handle, head)).await;
        })
        .await;
    let applied = handle.status().first().map_or(0, |s| s.events_applied);
    Ok(applied as f64 / started.elapsed().as_secs_f64())
}

fn medians(runs: &[Figures]) -> Figures {
    let of = |get: fn(&Figures) -> f64| median(&mut runs.iter().map(get).collect::<Vec<_>>());
    Figures {
        raw_appends_per_second: of(|f| f.raw_appends_per_second),
        raw_append_p99_ms: of(|f| f.raw_append_p99_ms),
        commands_per_second: of(|f| f.commands_per_second),
        command_p50_ms: of(|f| f.command_p50_ms),
        command_p99_ms: of(|f| f.command_p99_ms),
        commands_vs_raw: of(|f| f.commands_vs_raw),
        uncached_commands_per_second: of(|f| f.uncached_commands_per_second),
        paced_commands_per_second: of(|f| f.paced_commands_per_second),
        projection_lag_p50_ms: of(|f| f.projection_lag_p50_ms),
        projection_lag_p99_ms: of(|f| f.projection_lag_p99_ms),
        history_commands_per_second: of(|f| f.history_commands_per_second),
        history_command_p99_ms: of(|f| f.history_command_p99_ms),
        snapshot_commands_per_second: of(|f| f.snapshot_commands_per_second),
        snapshot_command_p99_ms: of(|f| f.snapshot_command_p99_ms),
        projection_events_per_second: of(|f| f.projection_events_per_second),
    }
}

fn print_run(run: usize, f: &Figures) {
    let label = if run == 0 {
        "median".to_owned()
    } else {
        format!("run {run}")
    };
    println!(
        "{label}: raw appends {:.0}/s (p99 {:.2} ms) | commands {:.0}/s (p50 {:.2}, p99 {:.2} ms) = {:.0}% of raw, \
         uncached {:.0}/s | at {:.0}/s projection lag p50 {:.1} ms, p99 {:.1} ms | history commands {:.0}/s (p99 {:.1} ms), \
         with snapshots {:.0}/s (p99 {:.1} ms) | projection {:.0} events/s",
        f.raw_appends_per_second,
        f.raw_append_p99_ms,
        f.commands_per_second,
        f.command_p50_ms,
        f.command_p99_ms,
        100.0 * f.commands_vs_raw,
        f.uncached_commands_per_second,
        f.paced_commands_per_second,
        f.projection_lag_p50_ms,
        f.projection_lag_p99_ms,
        f.history_commands_per_second,
        f.history_command_p99_ms,
        f.snapshot_commands_per_second,
        f.snapshot_command_p99_ms,
        f.projection_events_per_second
    );
}
