//! The projection runner: keeps every projection's read model up to date, each
//! independently, with exactly-once effect.
//!
//! Per projection: catch up from the read model's checkpoint, then follow `$all` live,
//! in batches; each batch's statements and the checkpoint commit in one transaction.
//! A failure (a database error, a projection bug, an unreadable event) restarts the
//! projection from its checkpoint after a backoff; after `retry.attempts_max` attempts
//! without progress it stops, its error in its status, and the others go on. A rebuild
//! fills a new generation from position 0 beside the live one, which keeps serving
//! queries, and swaps it in once it has caught up.
//!
//! Built as `Options → projections() → run(shutdown)` plus a cheap [`ProjectionsHandle`];
//! `run` drives every projection inside the caller's task.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use eventyr_core::{Clock, Position, RecordedEvent, RetryPolicy, SystemClock};
use eventyr_store::readmodel::{Generation, ReadModels};
use eventyr_store::{EventStore, Filter, ReadAll, StoreError, SubscriptionOptions, subscribe_all};
use eventyr_telemetry::names;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use crate::projection::Projection;
use crate::upcast::Upcasters;

/// How the runner behaves. Plain data.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// Events per batch (per transaction). Default 100.
    pub batch_size: usize,
    /// Restarts after failures: attempts without progress, backoff. Default 5 attempts
    /// from 100 ms, doubling, up to 5 s, 10 % jitter.
    pub retry: RetryPolicy,
    /// How often an idle projection looks for other processes' commits. Default 500 ms.
    pub idle_poll: Duration,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self {
            batch_size: 100,
            retry: RetryPolicy {
                attempts_max: 5,
                initial_delay: Duration::from_millis(100),
                multiplier: 2.0,
                delay_max: Duration::from_secs(5),
                jitter_ratio: 0.1,
            },
            idle_poll: Duration::from_millis(500),
        }
    }
}

/// What a projection is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ProjectionState {
    Starting,
    CatchingUp,
    Running,
    /// Filling a new generation; the live one keeps serving.
    Rebuilding {
        generation: Generation,
        checkpoint: Position,
    },
    /// Stopped after repeated failures.
    Failed {
        error: String,
    },
    Stopped,
}

/// A projection's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    #[serde(flatten)]
    pub state: ProjectionState,
    /// The generation serving queries.
    pub generation: Option<Generation>,
    /// The last position applied to the live generation.
    pub checkpoint: Position,
    /// The last position committed to the store, as this process knows it.
    pub head: Position,
    pub lag_events: u64,
    /// How old the oldest event of the last batch was when it was applied; 0 when
    /// caught up.
    pub lag_ms: u64,
    pub events_applied: u64,
}

/// Why a request to the runner failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProjectionsError {
    #[error("no projection is named {0}")]
    Unknown(String),
    #[error("the projection runner has stopped")]
    Stopped,
}

#[derive(Debug)]
struct Statuses {
    map: Mutex<BTreeMap<String, ProjectionStatus>>,
    changed: watch::Sender<u64>,
}

impl Statuses {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, ProjectionStatus>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update(&self, name: &str, change: impl FnOnce(&mut ProjectionStatus)) {
        if let Some(status) = self.lock().get_mut(name) {
            change(status);
        }
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Talks to a running [`ProjectionRunner`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProjectionsHandle {
    statuses: Arc<Statuses>,
    rebuilds: Arc<HashMap<String, mpsc::Sender<()>>>,
}

impl ProjectionsHandle {
    /// Every projection's status, by name.
    pub fn status(&self) -> Vec<ProjectionStatus> {
        self.statuses.lock().values().cloned().collect()
    }

    /// Changes whenever a status changes.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.statuses.changed.subscribe()
    }

    /// Asks a projection to rebuild its read model from position 0. A rebuild already
    /// running is not restarted.
    pub async fn rebuild(&self, name: &str) -> Result<(), ProjectionsError> {
        let sender = self
            .rebuilds
            .get(name)
            .ok_or_else(|| ProjectionsError::Unknown(name.to_owned()))?;
        sender.send(()).await.map_err(|_| ProjectionsError::Stopped)
    }
}

/// Runs projections until told to stop. See the module docs.
pub struct ProjectionRunner {
    drivers: Vec<(Driver, mpsc::Receiver<()>)>,
}

/// Builds a runner for `projections` and its handle.
pub fn projections(
    store: Arc<dyn EventStore>,
    read_models: Arc<dyn ReadModels>,
    upcasters: Arc<Upcasters>,
    projections: Vec<Arc<dyn Projection>>,
    options: RunnerOptions,
) -> (ProjectionRunner, ProjectionsHandle) {
    let statuses = Arc::new(Statuses {
        map: Mutex::new(BTreeMap::new()),
        changed: watch::Sender::new(0),
    });
    let mut rebuilds = HashMap::new();
    let mut drivers = Vec::new();
    for projection in projections {
        let name = projection.name().to_owned();
        statuses.lock().insert(
            name.clone(),
            ProjectionStatus {
                name: name.clone(),
                state: ProjectionState::Starting,
                generation: None,
                checkpoint: Position::ZERO,
                head: Position::ZERO,
                lag_events: 0,
                lag_ms: 0,
                events_applied: 0,
            },
        );
        let (rebuild, requests) = mpsc::channel(4);
        rebuilds.insert(name.clone(), rebuild);
        let driver = Driver {
            name,
            projection,
            store: Arc::clone(&store),
            read_models: Arc::clone(&read_models),
            upcasters: Arc::clone(&upcasters),
            options: options.clone(),
            statuses: Arc::clone(&statuses),
            clock: Arc::new(SystemClock),
        };
        drivers.push((driver, requests));
    }
    let handle = ProjectionsHandle {
        statuses,
        rebuilds: Arc::new(rebuilds),
    };
    (ProjectionRunner { drivers }, handle)
}

impl ProjectionRunner {
    /// Runs every projection until `shutdown` completes; returns once all have stopped
    /// (each at a batch boundary).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let (stop, stopped) = watch::channel(false);
        let drivers = self
            .drivers
            .into_iter()
            .map(|(driver, requests)| driver.run(stopped.clone(), requests));
        let all = futures::future::join_all(drivers);
        futures::pin_mut!(all);
        tokio::select! {
            _ = &mut all => return,
            () = shutdown => {}
        }
        let _ = stop.send(true);
        all.await;
    }
}

/// One projection's live generation (or rebuild generation) and where it is.
#[derive(Debug, Clone, Copy)]
struct Target {
    generation: Generation,
    checkpoint: Position,
}

/// Why one run of a projection ended.
#[derive(Debug)]
enum Halt {
    /// Told to stop.
    Shutdown,
    /// Another runner of the same projection moved ahead (it applied our batch, or
    /// promoted a newer generation): start again from the read model's state.
    Contention,
    /// Failed; `progressed` says whether it applied anything before failing.
    Failed { error: String, progressed: bool },
}

/// How long a runner that met contention waits before starting again (plus jitter).
const CONTENTION_PAUSE: Duration = Duration::from_millis(20);

impl Halt {
    fn from(error: StoreError, progressed: bool) -> Self {
        match error {
            StoreError::CheckpointConflict { .. } | StoreError::ReadModelNotFound { .. } => {
                Self::Contention
            }
            error => Self::Failed {
                error: error.to_string(),
                progressed,
            },
        }
    }
}

struct Driver {
    name: String,
    projection: Arc<dyn Projection>,
    store: Arc<dyn EventStore>,
    read_models: Arc<dyn ReadModels>,
    upcasters: Arc<Upcasters>,
    options: RunnerOptions,
    statuses: Arc<Statuses>,
    clock: Arc<dyn Clock>,
}

impl Driver {
    /// Runs the projection, restarting it after failures, until shutdown or until it
    /// has failed `attempts_max` times in a row without progress.
    async fn run(self, mut shutdown: watch::Receiver<bool>, mut rebuilds: mpsc::Receiver<()>) {
        let mut rng = fastrand::Rng::new();
        let mut failures = 0;
        loop {
            match self.drive(&mut shutdown, &mut rebuilds).await {
                Halt::Shutdown => break,
                Halt::Contention => {
                    let pause = CONTENTION_PAUSE.mul_f64(1.0 + rng.f64());
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = shutdown.changed() => break,
                    }
                }
                Halt::Failed { error, progressed } => {
                    metrics::counter!(names::PROJECTION_FAILURES_TOTAL, names::LABEL_PROJECTION => self.name.clone())
                        .increment(1);
                    failures = if progressed { 1 } else { failures + 1 };
                    if !self.options.retry.allows(failures + 1) {
                        self.statuses
                            .update(&self.name, |s| s.state = ProjectionState::Failed { error });
                        return;
                    }
                    let delay = self.options.retry.delay(failures, rng.f64());
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            }
        }
        self.statuses
            .update(&self.name, |s| s.state = ProjectionState::Stopped);
    }

    /// One run: open the live generation, then apply batches (and rebuild steps) until
    /// shutdown or the first failure.
    async fn drive(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        rebuilds: &mut mpsc::Receiver<()>,
    ) -> Halt {
        let mut progressed = false;
        let failed = Halt::from;
        let mut live = match self.open_live().await {
            Ok(live) => live,
            Err(error) => return failed(error, false),
        };
        let mut rebuild: Option<Target> = None;
        let mut events = self.follow(live.checkpoint);
        loop {
            if *shutdown.borrow() {
                return Halt::Shutdown;
            }
            if let Some(target) = rebuild.as_mut() {
                match self.rebuild_step(target, live.checkpoint).await {
                    Ok(false) => {}
                    Ok(true) => {
                        // Caught up: the rebuilt generation takes over, live from where
                        // it stands.
                        if let Err(error) = self
                            .read_models
                            .promote(&self.name, target.generation)
                            .await
                        {
                            return failed(error, progressed);
                        }
                        live = *target;
                        rebuild = None;
                        events = self.follow(live.checkpoint);
                        self.statuses.update(&self.name, |s| {
                            s.generation = Some(live.generation);
                            s.checkpoint = live.checkpoint;
                            s.state = ProjectionState::Running;
                        });
                        continue;
                    }
                    Err(error) => return failed(error, progressed),
                }
                // Keep the live generation current without waiting.
                while let Some(Some(batch)) = events.next().now_or_never() {
                    if let Err(error) = self.apply_live(&mut live, batch).await {
                        return failed(error, progressed);
                    }
                    progressed = true;
                }
                continue;
            }
            tokio::select! {
                _ = shutdown.changed() => return Halt::Shutdown,
                Some(()) = rebuilds.recv() => match self.start_rebuild().await {
                    Ok(target) => rebuild = Some(target),
                    Err(error) => return failed(error, progressed),
                },
                batch = events.next() => {
                    let Some(batch) = batch else {
                        return failed(StoreError::Closed, progressed);
                    };
                    if let Err(error) = self.apply_live(&mut live, batch).await {
                        return failed(error, progressed);
                    }
                    progressed = true;
                }
            }
        }
    }

    /// The generation serving queries (created and promoted on first start).
    async fn open_live(&self) -> Result<Target, StoreError> {
        let generation = match self.read_models.current(&self.name).await? {
            Some(generation) => generation,
            None => {
                let generation = self
                    .read_models
                    .create(&self.name, &self.projection.schema())
                    .await?;
                self.read_models.promote(&self.name, generation).await?;
                generation
            }
        };
        let checkpoint = self.read_models.checkpoint(&self.name, generation).await?;
        self.statuses.update(&self.name, |s| {
            s.generation = Some(generation);
            s.checkpoint = checkpoint;
            s.state = ProjectionState::CatchingUp;
        });
        Ok(Target {
            generation,
            checkpoint,
        })
    }

    /// `$all` after `checkpoint`, in batches of what is ready (up to `batch_size`).
    fn follow(
        &self,
        checkpoint: Position,
    ) -> futures::stream::BoxStream<'static, Vec<Result<RecordedEvent, StoreError>>> {
        let options = SubscriptionOptions {
            batch_size: self.options.batch_size,
            idle_poll: self.options.idle_poll,
        };
        subscribe_all(
            Arc::clone(&self.store),
            checkpoint.next(),
            Filter::default(),
            options,
        )
        .ready_chunks(self.options.batch_size.max(1))
        .boxed()
    }

    async fn apply_live(
        &self,
        live: &mut Target,
        batch: Vec<Result<RecordedEvent, StoreError>>,
    ) -> Result<(), StoreError> {
        let batch = batch.into_iter().collect::<Result<Vec<_>, _>>()?;
        let Some(last) = batch.last().map(|e| e.position) else {
            return Ok(());
        };
        self.apply(live, &batch, last).await?;
        let head = (*self.store.watch_head().borrow()).max(live.checkpoint);
        let now = self.clock.now();
        let oldest = batch.first().map_or(now, |e| e.recorded_at);
        let lag_events = head.0 - live.checkpoint.0;
        let lag = if lag_events == 0 {
            Duration::ZERO
        } else {
            now.duration_since(oldest)
        };
        metrics::gauge!(names::PROJECTION_LAG_EVENTS, names::LABEL_PROJECTION => self.name.clone())
            .set(lag_events as f64);
        metrics::gauge!(names::PROJECTION_LAG_SECONDS, names::LABEL_PROJECTION => self.name.clone()).set(lag.as_secs_f64());
        let catching_up = lag_events > self.options.batch_size as u64;
        self.statuses.update(&self.name, |s| {
            s.checkpoint = live.checkpoint;
            s.head = head;
            s.lag_events = lag_events;
            s.lag_ms = u64::try_from(lag.as_millis()).unwrap_or(u64::MAX);
            if !matches!(s.state, ProjectionState::Rebuilding { .. }) {
                s.state = if catching_up {
                    ProjectionState::CatchingUp
                } else {
                    ProjectionState::Running
                };
            }
        });
        Ok(())
    }

    /// Applies `batch` to `target` and moves its checkpoint to `to`, in one transaction.
    async fn apply(
        &self,
        target: &mut Target,
        batch: &[RecordedEvent],
        to: Position,
    ) -> Result<(), StoreError> {
        // A span of its own, linked to each applied event's trace.
        let span = eventyr_telemetry::trace::projection_batch(
            &self.name,
            batch
                .iter()
                .filter_map(|e| e.metadata.traceparent.as_deref()),
        );
        self.apply_in(target, batch, to).instrument(span).await
    }

    async fn apply_in(
        &self,
        target: &mut Target,
        batch: &[RecordedEvent],
        to: Position,
    ) -> Result<(), StoreError> {
        let mut statements = Vec::new();
        let mut consumed = 0u64;
        for event in batch
            .iter()
            .filter(|e| self.projection.consumes(e.event_type.as_str()))
        {
            let event =
                self.upcasters
                    .upcast(event.clone())
                    .map_err(|e| StoreError::Statement {
                        message: e.to_string(),
                    })?;
            let more = self
                .projection
                .apply(&event)
                .map_err(|e| StoreError::Statement {
                    message: format!(
                        "projection {} failed on event {} (position {}): {e}",
                        self.name, event.id, event.position
                    ),
                })?;
            statements.extend(more);
            consumed += 1;
        }
        self.read_models
            .apply(
                &self.name,
                target.generation,
                statements,
                target.checkpoint,
                to,
            )
            .await?;
        target.checkpoint = to;
        self.statuses
            .update(&self.name, |s| s.events_applied += consumed);
        metrics::counter!(names::PROJECTION_EVENTS_APPLIED_TOTAL, names::LABEL_PROJECTION => self.name.clone())
            .increment(consumed);
        Ok(())
    }

    async fn start_rebuild(&self) -> Result<Target, StoreError> {
        let generation = self
            .read_models
            .create(&self.name, &self.projection.schema())
            .await?;
        let target = Target {
            generation,
            checkpoint: Position::ZERO,
        };
        self.statuses.update(&self.name, |s| {
            s.state = ProjectionState::Rebuilding {
                generation,
                checkpoint: Position::ZERO,
            };
        });
        Ok(target)
    }

    /// Applies the next batch of `$all` to the rebuild generation. `Ok(true)` once it
    /// has read up to the store's head and is at least where the live generation is
    /// (`live`), so that promoting it loses nothing the live one had.
    async fn rebuild_step(&self, target: &mut Target, live: Position) -> Result<bool, StoreError> {
        let read = ReadAll::from(target.checkpoint.next()).limit(self.options.batch_size);
        let slice = self.store.read_all(&read).await?;
        // Everything below `next` has been considered, erased positions included.
        let to = Position(slice.next.0.saturating_sub(1)).max(target.checkpoint);
        if to > target.checkpoint {
            self.apply(target, &slice.events, to).await?;
        }
        let (generation, checkpoint) = (target.generation, target.checkpoint);
        self.statuses.update(&self.name, |s| {
            s.state = ProjectionState::Rebuilding {
                generation,
                checkpoint,
            };
            s.head = s.head.max(slice.head);
        });
        Ok(slice.is_end() && target.checkpoint >= live)
    }
}
