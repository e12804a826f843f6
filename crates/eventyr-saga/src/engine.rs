//! The durable orchestrator: each saga's life is event-sourced in the engine's own
//! store (stream `saga-<id>`); a decision's events are appended, at the saga's expected
//! version, before any of their effects is carried out.
//!
//! Shape: `SagaEngine::new(...)` → `register(definition)` → `run(shutdown)`, with a
//! cheap [`SagaHandle`] to start sagas, deliver asynchronous replies and act as an
//! operator. `run` recovers every unfinished saga from the log first, then serves. Each
//! running saga is one future (its inputs handled in order: replies, timers, operator
//! requests); at most `sagas_active_max` run at once, and `start` waits for room.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventyr_core::{Clock, NewEvent, StreamId, StreamVersion, Timestamp};
use eventyr_store::{
    EventStore, ExpectedVersion, Filter, ReadAll, ReadStream, StoreError, StreamAppend,
};
use eventyr_telemetry::names;
use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::Instrument as _;

use crate::admin::{self, OperatorEvent, SagaAdmin};
use crate::definition::SagaDefinition;
use crate::machine::{self, Effect, Failure, Input, SagaError, SagaEvent, SagaState, SagaStatus};
use crate::participants::{Participants, Sent};

/// The prefix of every saga stream.
pub const STREAM_PREFIX: &str = "saga-";

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sagas running at once; `start` waits beyond it. Default 1024.
    pub sagas_active_max: usize,
    /// Inputs queued for one saga (asynchronous replies, operator requests); beyond it
    /// a reply is dropped, and the step's deadline timer retries it. Default 64.
    pub saga_inputs_max: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            sagas_active_max: 1024,
            saga_inputs_max: 64,
        }
    }
}

/// Errors of the engine's API.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("no saga type {0} is registered")]
    UnknownType(String),
    #[error("no saga {0}")]
    NotFound(String),
    #[error("a saga id must be 1 to 128 of a-z, A-Z, 0-9, '-', '_', '.' and ':': {0:?}")]
    InvalidId(String),
    #[error(transparent)]
    Refused(#[from] SagaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the saga log of {id} cannot be read: {message}")]
    Corrupt { id: String, message: String },
    #[error("the engine has stopped")]
    Stopped,
    /// The engine runs as many sagas as it may (`sagas_active_max`), or the saga's
    /// input queue is full; a retry later may work.
    #[error("the engine is busy; try again")]
    Busy,
    /// The running engine refused an operator's request.
    #[error("{message}")]
    Operator { code: String, message: String },
}

impl EngineError {
    /// A stable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownType(_) => "unknown_saga_type",
            Self::NotFound(_) => "saga_not_found",
            Self::InvalidId(_) => "invalid_input",
            Self::Refused(SagaError::Terminal(_)) => "saga_terminal",
            Self::Refused(SagaError::PastPivot(_)) => "saga_past_pivot",
            Self::Refused(SagaError::NotRetriable(_)) => "saga_not_retriable",
            Self::Refused(SagaError::UnknownStep(_)) => "saga_unknown_step",
            Self::Store(error) => error.code(),
            Self::Corrupt { .. } => "corrupt",
            Self::Stopped | Self::Busy => "unavailable",
            Self::Operator { code, .. } => match code.as_str() {
                "saga_terminal" => "saga_terminal",
                "saga_past_pivot" => "saga_past_pivot",
                "saga_not_retriable" => "saga_not_retriable",
                "saga_not_found" => "saga_not_found",
                _ => "saga_refused",
            },
        }
    }
}

type Answer = oneshot::Sender<Result<(), EngineError>>;

enum Command {
    Start {
        state: SagaState,
        events: Vec<SagaEvent>,
        permit: OwnedSemaphorePermit,
        answer: Answer,
    },
    Input {
        id: String,
        input: Input,
        answer: Option<Answer>,
    },
}

/// Callers waiting for sagas to finish.
type Waiters = Arc<std::sync::Mutex<HashMap<String, Vec<oneshot::Sender<SagaStatus>>>>>;

struct Shared {
    waiters: Waiters,
    store: Arc<dyn EventStore>,
    participants: Arc<dyn Participants>,
    clock: Arc<dyn Clock>,
    definitions: HashMap<String, Arc<SagaDefinition>>,
    options: EngineOptions,
    permits: Arc<Semaphore>,
}

/// The orchestrator, before it runs.
pub struct SagaEngine {
    shared: Shared,
    commands: mpsc::Receiver<Command>,
    handle: SagaHandle,
}

/// Talks to a running engine; cheap to clone.
#[derive(Clone)]
pub struct SagaHandle {
    waiters: Waiters,
    commands: mpsc::Sender<Command>,
    store: Arc<dyn EventStore>,
    clock: Arc<dyn Clock>,
    definitions: Arc<HashMap<String, Arc<SagaDefinition>>>,
    permits: Arc<Semaphore>,
}

impl SagaEngine {
    pub fn new(
        store: Arc<dyn EventStore>,
        participants: Arc<dyn Participants>,
        clock: Arc<dyn Clock>,
        options: EngineOptions,
    ) -> Self {
        let (sender, commands) = mpsc::channel(1024);
        let permits = Arc::new(Semaphore::new(options.sagas_active_max.max(1)));
        let waiters = Waiters::default();
        let handle = SagaHandle {
            waiters: Arc::clone(&waiters),
            commands: sender,
            store: Arc::clone(&store),
            clock: Arc::clone(&clock),
            definitions: Arc::new(HashMap::new()),
            permits: Arc::clone(&permits),
        };
        Self {
            shared: Shared {
                waiters,
                store,
                participants,
                clock,
                definitions: HashMap::new(),
                options,
                permits,
            },
            commands,
            handle,
        }
    }

    /// Registers a (validated) saga type.
    pub fn register(mut self, definition: SagaDefinition) -> Self {
        let definition = Arc::new(definition);
        self.shared
            .definitions
            .insert(definition.saga_type.clone(), Arc::clone(&definition));
        Arc::make_mut(&mut self.handle.definitions)
            .insert(definition.saga_type.clone(), definition);
        self
    }

    pub fn handle(&self) -> SagaHandle {
        self.handle.clone()
    }

    /// Recovers the unfinished sagas, then runs until `shutdown` completes. Sagas in
    /// flight at shutdown simply stop: their log says where they are, and the next run
    /// resumes them.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), EngineError> {
        let Self {
            shared,
            mut commands,
            handle,
        } = self;
        drop(handle);
        let shared = Arc::new(shared);
        let mut sagas = Sagas::default();
        let mut recovering = unfinished(&shared.store).await?;
        tracing::info!(sagas = recovering.len(), "recovering unfinished sagas");
        let mut shutdown = std::pin::pin!(shutdown);
        let mut operator = Operator::default();
        let mut poll = tokio::time::interval(OPERATOR_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commands_open = true;
        loop {
            metrics::gauge!(names::SAGA_IN_FLIGHT).set(sagas.running.len() as f64);
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                Some((request_id, result)) = operator.answering.next(), if !operator.answering.is_empty() => {
                    operator.handled(&shared.store, shared.clock.now(), request_id, result).await;
                }
                _ = poll.tick() => {
                    for (request_id, id, input) in operator.requests(&shared.store).await {
                        let (answer, answered) = oneshot::channel();
                        sagas.deliver(&shared, id, input, Some(answer)).await;
                        operator.answering.push(
                            async move { (request_id, answered.await.unwrap_or(Err(EngineError::Stopped))) }.boxed(),
                        );
                    }
                }
                Some((id, generation)) = sagas.running.next(), if !sagas.running.is_empty() => {
                    sagas.finished(&id, generation);
                }
                permit = Arc::clone(&shared.permits).acquire_owned(), if !recovering.is_empty() => {
                    let permit = permit.map_err(|_| EngineError::Stopped)?;
                    let id = recovering.pop().expect("guarded");
                    if !sagas.active.contains_key(&id) {
                        match load(&shared.store, &id).await {
                            Ok(state) => sagas.resume(&shared, state, permit),
                            // One saga's unreadable log stops that saga, not the engine.
                            Err(EngineError::Corrupt { message, .. }) => {
                                quarantine(&shared, &id, &message).await?;
                            }
                            Err(other) => return Err(other),
                        }
                    }
                }
                command = commands.recv(), if commands_open => match command {
                    // No handle is left: the sagas under way go on until shutdown.
                    None => commands_open = false,
                    Some(Command::Start { state, events, permit, answer }) => {
                        if sagas.active.contains_key(&state.id) {
                            let _ = answer.send(Ok(())); // Started already, and running.
                        } else {
                            sagas.spawn(&shared, state, Pending::Start(events, answer), permit);
                        }
                    }
                    Some(Command::Input { id, input, answer }) => {
                        sagas.deliver(&shared, id, input, answer).await;
                    }
                },
            }
        }
    }
}

impl SagaHandle {
    /// Starts a saga of `saga_type` on `data`; returns its id once its start is
    /// durable. Waits while `sagas_active_max` sagas run.
    pub async fn start(
        &self,
        saga_type: &str,
        data: Value,
        correlation_id: Option<String>,
    ) -> Result<String, EngineError> {
        let id = uuid::Uuid::now_v7().to_string();
        self.start_with_id(saga_type, &id, data, correlation_id)
            .await?;
        Ok(id)
    }

    /// Starts saga `id` (for example derived from the business key, such as the
    /// order's id) unless it exists: a start retried after an unknown outcome starts
    /// one saga. Errors: unknown type, an invalid id, the store.
    pub async fn start_with_id(
        &self,
        saga_type: &str,
        id: &str,
        data: Value,
        correlation_id: Option<String>,
    ) -> Result<(), EngineError> {
        let valid = (1..=128).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if !valid {
            return Err(EngineError::InvalidId(id.to_owned()));
        }
        let definition = self
            .definitions
            .get(saga_type)
            .ok_or_else(|| EngineError::UnknownType(saga_type.to_owned()))?;
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| EngineError::Stopped)?;
        // The saga continues the trace it was started in.
        let traceparent = eventyr_telemetry::trace::current_traceparent();
        let events = machine::start(
            definition,
            id,
            data,
            correlation_id,
            traceparent.clone(),
            self.clock.now(),
        );
        let (answer, answered) = oneshot::channel();
        let mut state = SagaState::empty(id);
        state.saga_type.clone_from(&definition.saga_type);
        state.traceparent = traceparent;
        let command = Command::Start {
            state,
            events,
            permit,
            answer,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| EngineError::Stopped)?;
        answered.await.map_err(|_| EngineError::Stopped)?
    }

    /// An asynchronous participant's reply.
    pub async fn reply(
        &self,
        id: &str,
        step: &str,
        attempt: u32,
        compensation: bool,
        outcome: Result<Value, Failure>,
    ) -> Result<(), EngineError> {
        let input = Input::Reply {
            step: step.to_owned(),
            attempt,
            compensation,
            outcome,
        };
        self.send(id, input, None).await
    }

    /// Compensates a running saga now.
    pub async fn abort(&self, id: &str, reason: &str) -> Result<(), EngineError> {
        let input = Input::Abort {
            reason: reason.to_owned(),
        };
        self.ask(id, input).await
    }

    /// Runs the failed compensations of a FAILED saga again.
    pub async fn retry(&self, id: &str) -> Result<(), EngineError> {
        self.ask(id, Input::Retry).await
    }

    async fn ask(&self, id: &str, input: Input) -> Result<(), EngineError> {
        let (answer, answered) = oneshot::channel();
        self.send(id, input, Some(answer)).await?;
        answered.await.map_err(|_| EngineError::Stopped)?
    }

    async fn send(
        &self,
        id: &str,
        input: Input,
        answer: Option<Answer>,
    ) -> Result<(), EngineError> {
        let command = Command::Input {
            id: id.to_owned(),
            input,
            answer,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| EngineError::Stopped)
    }

    /// Waits until saga `id` finishes (of this engine's running sagas, or finished
    /// already), and returns its final status.
    pub async fn wait(&self, id: &str) -> Result<SagaStatus, EngineError> {
        let (sender, finished) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(id.to_owned())
            .or_default()
            .push(sender);
        // It may have finished before the waiter was in place.
        let state = load(&self.store, id).await?;
        if state.status.is_terminal() {
            let waiting = self
                .waiters
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(id);
            for waiter in waiting.into_iter().flatten() {
                let _ = waiter.send(state.status);
            }
            return Ok(state.status);
        }
        finished.await.map_err(|_| EngineError::Stopped)
    }

    /// A saga's state and its whole log (its timeline), read from the store.
    pub async fn get(
        &self,
        id: &str,
    ) -> Result<(SagaState, Vec<(Timestamp, SagaEvent)>), EngineError> {
        SagaAdmin::new(Arc::clone(&self.store)).get(id).await
    }

    /// Sagas, newest first, optionally only those in `status` (read from the log).
    pub async fn list(
        &self,
        status: Option<SagaStatus>,
        limit: usize,
    ) -> Result<Vec<SagaSummary>, EngineError> {
        list(&self.store, status, limit).await
    }
}

/// Sagas, newest first, optionally only those in `status`. (Reads every saga event;
/// a read model of saga summaries would serve it from an index.)
pub(crate) async fn list(
    store: &Arc<dyn EventStore>,
    status: Option<SagaStatus>,
    limit: usize,
) -> Result<Vec<SagaSummary>, EngineError> {
    let mut sagas: HashMap<String, SagaSummary> = HashMap::new();
    scan(store, |id, event| {
        // An unreadable event is left out (recovery ends such a saga FAILED, flagged).
        if let Ok(event) = event {
            sagas
                .entry(id.to_owned())
                .or_insert_with(|| SagaSummary::empty(id))
                .apply(event);
        }
    })
    .await?;
    let mut sagas: Vec<SagaSummary> = sagas
        .into_values()
        .filter(|s| status.is_none_or(|status| s.status == status))
        .collect();
    sagas.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
    sagas.truncate(limit.max(1));
    Ok(sagas)
}

/// How often the engine looks for operator requests.
const OPERATOR_POLL: Duration = Duration::from_millis(250);

/// Operator requests (see [`admin`]): read from their stream, handed to their sagas,
/// and answered there.
#[derive(Default)]
struct Operator {
    next: StreamVersion,
    handled: std::collections::HashSet<String>,
    answering: FuturesUnordered<BoxFuture<'static, (String, Result<(), EngineError>)>>,
}

impl Operator {
    /// New requests not answered yet: (request id, saga id, input).
    async fn requests(&mut self, store: &Arc<dyn EventStore>) -> Vec<(String, String, Input)> {
        let (events, next) = match admin::read_operator(store, self.next).await {
            Ok(read) => read,
            Err(error) => {
                tracing::warn!(%error, "cannot read operator requests");
                return Vec::new();
            }
        };
        self.next = next;
        let mut requests = Vec::new();
        for event in events {
            match event {
                OperatorEvent::OperatorHandled { request_id, .. } => {
                    self.handled.insert(request_id);
                }
                OperatorEvent::OperatorRequested {
                    request_id,
                    saga_id,
                    action,
                    reason,
                    ..
                } => {
                    let input = match action {
                        admin::Action::Retry => Input::Retry,
                        admin::Action::Abort => Input::Abort {
                            reason: reason.unwrap_or_else(|| "operator".to_owned()),
                        },
                    };
                    requests.push((request_id, saga_id, input));
                }
            }
        }
        requests.retain(|(request_id, _, _)| !self.handled.contains(request_id));
        requests
    }

    async fn handled(
        &mut self,
        store: &Arc<dyn EventStore>,
        now: Timestamp,
        request_id: String,
        result: Result<(), EngineError>,
    ) {
        let event = OperatorEvent::OperatorHandled {
            request_id: request_id.clone(),
            error: result.err().map(|e| (e.code().to_owned(), e.to_string())),
            at: now,
        };
        match admin::append(store, &event).await {
            Ok(()) => {
                self.handled.insert(request_id);
            }
            Err(error) => {
                tracing::warn!(%error, %request_id, "cannot record an operator request's outcome")
            }
        }
    }
}

/// One line of `eventyr saga list`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SagaSummary {
    pub id: String,
    pub saga_type: String,
    pub status: SagaStatus,
    pub flagged: bool,
    pub started_at: Timestamp,
    pub updated_at: Timestamp,
    pub reason: Option<String>,
}

impl SagaSummary {
    /// The summary before any event.
    pub(crate) fn empty(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            saga_type: String::new(),
            status: SagaStatus::Started,
            flagged: false,
            started_at: Timestamp::UNIX_EPOCH,
            updated_at: Timestamp::UNIX_EPOCH,
            reason: None,
        }
    }

    pub(crate) fn apply(&mut self, event: &SagaEvent) {
        let mut state = SagaState::empty(&self.id);
        state.status = self.status;
        state.flagged = self.flagged;
        state.reason = self.reason.take();
        state.started_at = self.started_at;
        state.evolve(event);
        if let SagaEvent::SagaStarted { saga_type, .. } = event {
            self.saga_type.clone_from(saga_type);
        }
        self.status = state.status;
        self.flagged = state.flagged;
        self.reason = state.reason;
        self.started_at = state.started_at;
        self.updated_at = state.updated_at;
    }
}

fn stream_of(id: &str) -> Result<StreamId, EngineError> {
    StreamId::new(format!("{STREAM_PREFIX}{id}")).map_err(|e| EngineError::Corrupt {
        id: id.to_owned(),
        message: e.to_string(),
    })
}

fn decode(id: &str, data: &eventyr_core::Json) -> Result<SagaEvent, EngineError> {
    data.decode().map_err(|e| EngineError::Corrupt {
        id: id.to_owned(),
        message: e.to_string(),
    })
}

pub(crate) async fn read_log(
    store: &Arc<dyn EventStore>,
    id: &str,
) -> Result<Vec<(Timestamp, SagaEvent)>, EngineError> {
    let stream = stream_of(id)?;
    let mut events = Vec::new();
    let mut from = StreamVersion::FIRST;
    loop {
        let slice = store
            .read_stream(&stream, ReadStream::forwards(from).limit(1000))
            .await?;
        let Some(last) = slice.events.last().map(|e| e.version) else {
            return Ok(events);
        };
        for event in &slice.events {
            events.push((event.recorded_at, decode(id, &event.data)?));
        }
        if Some(last) >= slice.stream_version {
            return Ok(events);
        }
        from = StreamVersion(last.0 + 1);
    }
}

async fn load(store: &Arc<dyn EventStore>, id: &str) -> Result<SagaState, EngineError> {
    let events = read_log(store, id).await?;
    Ok(SagaState::replay(id, events.iter().map(|(_, e)| e)))
}

/// A saga whose log cannot be read (an event that does not decode): ended FAILED and
/// flagged for manual intervention, so that the engine goes on with the others.
async fn quarantine(shared: &Shared, id: &str, message: &str) -> Result<(), EngineError> {
    tracing::error!(saga = %id, error = %message, "a saga's log cannot be read; it is FAILED and flagged for manual intervention");
    let finished = SagaEvent::SagaFinished {
        status: SagaStatus::Failed,
        reason: Some(format!("the saga log cannot be read: {message}")),
        flagged: true,
        at: shared.clock.now(),
    };
    let event = NewEvent::json(finished.type_name(), &finished).map_err(StoreError::from)?;
    let append = StreamAppend::new(stream_of(id)?, ExpectedVersion::Any, vec![event]);
    shared.store.append(append).await?;
    metrics::counter!(names::SAGA_CORRUPT_TOTAL).increment(1);
    Ok(())
}

/// Calls `each(saga id, event)` for every saga event in the store, in order; an
/// event that does not decode is `Err` with why.
async fn scan(
    store: &Arc<dyn EventStore>,
    mut each: impl FnMut(&str, Result<&SagaEvent, String>),
) -> Result<(), EngineError> {
    let mut read = ReadAll::from(eventyr_core::Position::FIRST)
        .limit(1000)
        .filter(Filter::stream_prefix(STREAM_PREFIX));
    loop {
        let slice = store.read_all(&read).await?;
        for event in &slice.events {
            let id = &event.stream_id.as_str()[STREAM_PREFIX.len()..];
            match decode(id, &event.data) {
                Ok(decoded) => each(id, Ok(&decoded)),
                Err(error) => each(id, Err(error.to_string())),
            }
        }
        if slice.is_end() {
            return Ok(());
        }
        read.from = slice.next;
    }
}

/// The ids of the sagas not finished, from the log. (Reads every saga event once; a
/// read model of saga statuses would make this proportional to the unfinished ones.)
async fn unfinished(store: &Arc<dyn EventStore>) -> Result<Vec<String>, EngineError> {
    let mut open: BTreeMap<String, bool> = BTreeMap::new();
    scan(store, |id, event| match event {
        Ok(SagaEvent::SagaFinished { .. }) => {
            open.remove(id);
        }
        // An unreadable event of a saga not finished after it: recovered, so that it
        // is found corrupt and quarantined.
        Ok(SagaEvent::SagaStarted { .. } | SagaEvent::RetryRequested { .. }) | Err(_) => {
            open.insert(id.to_owned(), true);
        }
        Ok(_) => {}
    })
    .await?;
    Ok(open.into_keys().collect())
}

fn definition_of(shared: &Shared, state: &SagaState) -> Option<Arc<SagaDefinition>> {
    let found = shared.definitions.get(&state.saga_type).cloned();
    if found.is_none() {
        tracing::error!(saga = %state.id, saga_type = %state.saga_type, "no definition for this saga type; it waits");
    }
    found
}

/// What a saga future does first.
enum Pending {
    /// Append the start events, then answer.
    Start(Vec<SagaEvent>, Answer),
    /// Carry out these effects (a recovered saga).
    Effects(Vec<Effect>),
}

struct Inbound {
    input: Input,
    answer: Option<Answer>,
}

/// The sagas running in this engine. A saga that finishes and is woken again (an
/// operator's retry, a late reply) runs as a new generation; only the generation that
/// ended leaves the registry.
#[derive(Default)]
struct Sagas {
    active: HashMap<String, (u64, mpsc::Sender<Inbound>)>,
    running: FuturesUnordered<BoxFuture<'static, (String, u64)>>,
    generation: u64,
}

impl Sagas {
    fn spawn(
        &mut self,
        shared: &Arc<Shared>,
        state: SagaState,
        pending: Pending,
        permit: OwnedSemaphorePermit,
    ) {
        let Some(definition) = definition_of(shared, &state) else {
            if let Pending::Start(_, answer) = pending {
                let _ = answer.send(Err(EngineError::UnknownType(state.saga_type.clone())));
            }
            return;
        };
        let (sender, inbox) = mpsc::channel(shared.options.saga_inputs_max.max(1));
        self.generation += 1;
        let generation = self.generation;
        self.active.insert(state.id.clone(), (generation, sender));
        let span = eventyr_telemetry::trace::saga(
            &state.saga_type,
            &state.id,
            state.traceparent.as_deref(),
        );
        let saga = Saga {
            shared: Arc::clone(shared),
            definition,
            state,
            timers: BTreeMap::new(),
            timer_seq: 0,
            calls: FuturesUnordered::new(),
            began: Instant::now(),
            span: span.clone(),
        };
        self.running.push(
            saga.run(pending, inbox, permit)
                .instrument(span)
                .map(move |id| (id, generation))
                .boxed(),
        );
    }

    /// Runs a saga read from its log: what it waits on (calls, timers) goes again.
    fn resume(&mut self, shared: &Arc<Shared>, state: SagaState, permit: OwnedSemaphorePermit) {
        let effects = definition_of(shared, &state)
            .map(|d| machine::recovery_effects(&d, &state))
            .unwrap_or_default();
        self.spawn(shared, state, Pending::Effects(effects), permit);
    }

    fn finished(&mut self, id: &str, generation: u64) {
        if self.active.get(id).is_some_and(|(g, _)| *g == generation) {
            self.active.remove(id);
        }
    }

    /// Hands an input to its saga, waking a finished or idle one from its log.
    async fn deliver(
        &mut self,
        shared: &Arc<Shared>,
        id: String,
        input: Input,
        answer: Option<Answer>,
    ) {
        let inbound = Inbound { input, answer };
        let sent = match self.active.get(&id) {
            Some((_, sender)) => sender.try_send(inbound),
            None => Err(mpsc::error::TrySendError::Closed(inbound)),
        };
        let (input, answer) = match sent {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(inbound)) => {
                tracing::warn!(saga = %id, "saga input queue full; input dropped (its timers retry)");
                answer_with(inbound.answer, EngineError::Busy);
                return;
            }
            // Not running, or has just finished: read it from its log.
            Err(mpsc::error::TrySendError::Closed(inbound)) => (inbound.input, inbound.answer),
        };
        let state = match load(&shared.store, &id).await {
            Ok(state) if state.version == 0 => Err(EngineError::NotFound(id.clone())),
            other => other,
        };
        let state = match state {
            Ok(state) => state,
            Err(error) => return answer_with(answer, error),
        };
        if state.status.is_terminal() && !matches!(input, Input::Retry) {
            let refused = SagaError::Terminal(state.status.as_str());
            return answer_with(answer, refused.into());
        }
        let Ok(permit) = Arc::clone(&shared.permits).try_acquire_owned() else {
            return answer_with(answer, EngineError::Busy);
        };
        self.resume(shared, state, permit);
        if let Some((_, sender)) = self.active.get(&id) {
            let _ = sender.try_send(Inbound { input, answer });
        }
    }
}

fn answer_with(answer: Option<Answer>, error: EngineError) {
    if let Some(answer) = answer {
        let _ = answer.send(Err(error));
    }
}

type CallFuture = BoxFuture<'static, (String, u32, bool, Instant, Sent)>;

/// One running saga.
struct Saga {
    shared: Arc<Shared>,
    definition: Arc<SagaDefinition>,
    state: SagaState,
    timers: BTreeMap<(Timestamp, u64), Input>,
    timer_seq: u64,
    calls: FuturesUnordered<CallFuture>,
    began: Instant,
    /// This run of the saga (a recovered saga's run is a new span in the same trace).
    span: tracing::Span,
}

impl Saga {
    async fn run(
        mut self,
        pending: Pending,
        mut inbox: mpsc::Receiver<Inbound>,
        _permit: OwnedSemaphorePermit,
    ) -> String {
        match pending {
            Pending::Start(events, answer) => {
                let started = self.record(events).await;
                // A failed append may have committed (its answer lost): the reload
                // says. If the saga exists, it runs and its start succeeded.
                if started.is_err() && self.state.version == 0 {
                    let _ = answer.send(started);
                    return self.state.id;
                }
                let _ = answer.send(Ok(()));
                metrics::counter!(names::SAGA_STARTED_TOTAL, names::LABEL_SAGA_TYPE => self.state.saga_type.clone()).increment(1);
            }
            Pending::Effects(effects) => self.carry_out(effects),
        }
        while !self.state.status.is_terminal() || !inbox.is_empty() {
            let next_timer = self.timers.first_key_value().map(|((at, _), _)| *at);
            let wait = next_timer.map(|at| machine::until(self.shared.clock.now(), at));
            tokio::select! {
                inbound = inbox.recv() => {
                    let Some(Inbound { input, answer }) = inbound else { break };
                    let result = self.handle(&input).await;
                    if let Some(answer) = answer {
                        let _ = answer.send(result);
                    }
                }
                Some((step, attempt, compensation, began, sent)) = self.calls.next(), if !self.calls.is_empty() => {
                    let labels = [
                        (names::LABEL_SAGA_TYPE, self.state.saga_type.clone()),
                        (names::LABEL_STEP, step.clone()),
                    ];
                    metrics::histogram!(names::SAGA_STEP_DURATION_SECONDS, &labels).record(began.elapsed());
                    if let Sent::Replied(outcome) = sent {
                        if outcome.is_err() {
                            metrics::counter!(names::SAGA_STEP_FAILURES_TOTAL, &labels).increment(1);
                        }
                        let input = Input::Reply { step, attempt, compensation, outcome };
                        let _ = self.handle(&input).await;
                    }
                }
                () = tokio::time::sleep(wait.unwrap_or(Duration::ZERO)), if wait.is_some() => {
                    let now = self.shared.clock.now();
                    while let Some(entry) = self.timers.first_entry() {
                        if entry.key().0 > now {
                            break;
                        }
                        let input = entry.remove();
                        metrics::gauge!(names::SAGA_TIMERS_PENDING).decrement(1.0);
                        let _ = self.handle(&input).await;
                    }
                }
            }
        }
        let left = self.timers.len() as f64;
        metrics::gauge!(names::SAGA_TIMERS_PENDING).decrement(left);
        self.state.id
    }

    /// Decides on `input`, records the events, carries out their effects.
    async fn handle(&mut self, input: &Input) -> Result<(), EngineError> {
        let now = self.shared.clock.now();
        let events = machine::decide(&self.definition, &self.state, input, now, fastrand::f64())?;
        if events.is_empty() {
            return Ok(());
        }
        if let Input::Timer { step, .. } = input
            && events
                .iter()
                .any(|e| matches!(e, SagaEvent::StepTimedOut { .. }))
        {
            let labels = [
                (names::LABEL_SAGA_TYPE, self.state.saga_type.clone()),
                (names::LABEL_STEP, step.clone()),
            ];
            metrics::counter!(names::SAGA_STEP_FAILURES_TOTAL, &labels).increment(1);
        }
        self.record(events).await
    }

    /// Appends `events` at the saga's version; then its effects. If the append's
    /// outcome is unknown (or another writer moved the saga), the state is reloaded from
    /// the log and what it waits on is carried out again.
    async fn record(&mut self, events: Vec<SagaEvent>) -> Result<(), EngineError> {
        let expected = match self.state.version {
            0 => ExpectedVersion::NoStream,
            n => ExpectedVersion::Exact(StreamVersion(n - 1)),
        };
        let mut batch = Vec::with_capacity(events.len());
        for event in &events {
            let new = NewEvent::json(event.type_name(), event).map_err(StoreError::from)?;
            batch.push(new);
        }
        let append = StreamAppend::new(stream_of(&self.state.id)?, expected, batch);
        match self.shared.store.append(append).await {
            Ok(_) => {
                for event in &events {
                    self.state.evolve(event);
                }
                let effects = machine::effects(&self.definition, &self.state, &events);
                self.observe(&events);
                self.carry_out(effects);
                Ok(())
            }
            Err(error) => {
                tracing::warn!(saga = %self.state.id, %error, "recording a saga decision failed; reloading it");
                self.reload().await;
                Err(error.into())
            }
        }
    }

    async fn reload(&mut self) {
        let mut delay = Duration::from_millis(50);
        loop {
            match load(&self.shared.store, &self.state.id).await {
                Ok(state) => {
                    self.state = state;
                    self.timers.clear();
                    let effects = machine::recovery_effects(&self.definition, &self.state);
                    self.carry_out(effects);
                    return;
                }
                Err(error) => {
                    tracing::warn!(saga = %self.state.id, %error, "reloading a saga failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn observe(&self, events: &[SagaEvent]) {
        let saga_type = self.state.saga_type.clone();
        for event in events {
            match event {
                SagaEvent::CompensationFailed {
                    step,
                    retry_at: None,
                    error,
                    ..
                } => {
                    tracing::error!(saga = %self.state.id, %step, %error, "Order compensation failed: manual intervention needed");
                    metrics::counter!(names::SAGA_COMPENSATIONS_FAILED_TOTAL, names::LABEL_SAGA_TYPE => saga_type.clone(), names::LABEL_STEP => step.clone()).increment(1);
                }
                SagaEvent::SagaFinished {
                    status,
                    reason,
                    flagged,
                    ..
                } => {
                    let labels = [
                        (names::LABEL_SAGA_TYPE, saga_type.clone()),
                        (names::LABEL_STATUS, status.as_str().to_owned()),
                    ];
                    metrics::counter!(names::SAGA_FINISHED_TOTAL, &labels).increment(1);
                    self.span.record("saga.status", status.as_str());
                    if *status != SagaStatus::Completed {
                        self.span.record("otel.status_code", "ERROR");
                    }
                    metrics::histogram!(names::SAGA_DURATION_SECONDS, &labels)
                        .record(self.began.elapsed());
                    if *flagged {
                        tracing::error!(saga = %self.state.id, reason = ?reason, "saga FAILED: flagged for manual intervention");
                    } else if *status == SagaStatus::Completed {
                        tracing::debug!(saga = %self.state.id, "saga completed");
                    } else {
                        tracing::info!(saga = %self.state.id, status = status.as_str(), reason = ?reason, "saga finished");
                    }
                    // After the metrics, so that a waiter sees them.
                    let waiting = self
                        .shared
                        .waiters
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&self.state.id);
                    for waiter in waiting.into_iter().flatten() {
                        let _ = waiter.send(*status);
                    }
                }
                _ => {}
            }
        }
    }

    fn carry_out(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Call(call) => {
                    let participants = Arc::clone(&self.shared.participants);
                    // The participant continues this span's trace.
                    let span = eventyr_telemetry::trace::saga_step(
                        &call.step,
                        call.attempt,
                        call.compensation,
                        &self.span,
                    );
                    self.calls.push(
                        async move {
                            let began = Instant::now();
                            let (step, attempt, compensation) =
                                (call.step.clone(), call.attempt, call.compensation);
                            let sent = participants.call(call).await;
                            if matches!(sent, Sent::Replied(Err(_))) {
                                tracing::Span::current().record("otel.status_code", "ERROR");
                            }
                            (step, attempt, compensation, began, sent)
                        }
                        .instrument(span)
                        .boxed(),
                    );
                }
                Effect::Timer {
                    step,
                    attempt,
                    compensation,
                    kind,
                    at,
                } => {
                    self.timer_seq += 1;
                    let input = Input::Timer {
                        step,
                        attempt,
                        compensation,
                        kind,
                    };
                    self.timers.insert((at, self.timer_seq), input);
                    metrics::gauge!(names::SAGA_TIMERS_PENDING).increment(1.0);
                }
                Effect::Finished { .. } => {}
            }
        }
    }
}
