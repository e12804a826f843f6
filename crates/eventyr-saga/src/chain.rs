//! A saga definition run as a choreography: no orchestrator. The service of each step
//! reacts to its neighbours' events — the previous step done: run its step forward;
//! the next step failed or compensated: undo its own — and records what it did as an
//! event in its own store, which its neighbours react to in turn. The same
//! [`SagaDefinition`] runs orchestrated or chained with the same request bodies,
//! idempotency keys, skips, retries and compensations, so both give the same
//! outcomes; [`Chain::flow`] is the tracker that shows where each one stands.
//!
//! The events (types [`STEP_DONE`], [`STEP_FAILED`], [`STEP_COMPENSATED`], stream
//! `chain-<id>` of the step's service, public) carry the saga's data forward, with
//! each step's result under `results` as in the orchestrator, so no service asks
//! another for anything. Their ids derive from (type, saga, step): a reaction that
//! runs again after a crash or a redelivery records nothing twice.
//!
//! What differs from the orchestrator, as in every choreography: a step whose service
//! does not react (down, its consumer stopped) is not timed out by anyone — the
//! tracker flags the saga stuck past its deadline; and a compensation that keeps
//! failing is retried by the consumer and then lands in its dead letters for an
//! operator (where the orchestrator flags the saga FAILED).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eventyr_bus::{Handler, HandlerError, Message};
use eventyr_core::{Clock, EventId, NewEvent, StreamId, SystemClock};
use eventyr_store::sql::SqlStatement;
use eventyr_store::{EventStore, ExpectedVersion, StoreError, StreamAppend};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::choreography::{Flow, Mark};
use crate::definition::{DefinitionError, SagaDefinition, StepKind};
use crate::machine::{Failure, REASON_KEY, StepCall, idempotency_key};
use crate::participants::StepHandler;

/// A step's action succeeded (or was skipped, or given up as retriable-only).
pub const STEP_DONE: &str = "ChainStepDone";
/// A step's action failed for good: the steps before it are undone, last first.
pub const STEP_FAILED: &str = "ChainStepFailed";
/// A step's compensation succeeded (or it had nothing to undo).
pub const STEP_COMPENSATED: &str = "ChainStepCompensated";
/// Every event type of a chain (a service's public events include them).
pub const EVENT_TYPES: [&str; 3] = [STEP_DONE, STEP_FAILED, STEP_COMPENSATED];

/// One chain event's data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainEvent {
    pub saga_type: String,
    /// The saga's id (the tracker's correlation id).
    pub id: String,
    pub step: String,
    /// The saga's data after this step: its input, `results`, `skipped` steps, and
    /// `saga_reason` once it fails.
    pub data: Value,
    /// Why the saga is being undone (failed and compensated events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// "skipped", "abandoned: <error>" (a retriable-only step out of attempts), or
    /// "nothing to undo".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Whether an event of the starting service begins a saga: its id and data.
pub type BeginFn = Arc<dyn Fn(&Message) -> Option<(String, Value)> + Send + Sync>;

/// A saga definition, the service of each step, and the event that starts it.
#[derive(Clone)]
pub struct Chain {
    definition: Arc<SagaDefinition>,
    owners: Vec<String>,
    start: (String, String),
    begin: BeginFn,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("saga_type", &self.definition.saga_type)
            .field("owners", &self.owners)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

impl Chain {
    /// `owners` names the service of every step of `definition`; the saga starts on
    /// `start_type` events of `start_service` for which `begin` gives an id and data.
    /// Errors: a step without a service, or a service for a step the definition lacks.
    pub fn new(
        definition: SagaDefinition,
        owners: &[(&str, &str)],
        (start_service, start_type): (&str, &str),
        begin: BeginFn,
    ) -> Result<Self, DefinitionError> {
        let by_step: HashMap<&str, &str> = owners.iter().copied().collect();
        if let Some((step, _)) = owners
            .iter()
            .find(|(step, _)| definition.position(step).is_none())
        {
            return Err(DefinitionError::UnknownStep((*step).to_owned()));
        }
        let owners = definition
            .steps
            .iter()
            .map(|step| {
                by_step
                    .get(step.name.as_str())
                    .map(|s| (*s).to_owned())
                    .ok_or_else(|| DefinitionError::NoService(step.name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            definition: Arc::new(definition),
            owners,
            start: (start_service.to_owned(), start_type.to_owned()),
            begin,
        })
    }

    pub fn saga_type(&self) -> &str {
        &self.definition.saga_type
    }

    /// The services whose events `service` reacts to (one consumer each).
    pub fn sources(&self, service: &str) -> Vec<String> {
        let mut sources = BTreeSet::new();
        if self.owners.first().is_some_and(|o| o == service) {
            sources.insert(self.start.0.clone());
        }
        for (i, owner) in self.owners.iter().enumerate() {
            if owner != service {
                continue;
            }
            if i > 0 {
                sources.insert(self.owners[i - 1].clone());
            }
            if let Some(next) = self.owners.get(i + 1) {
                sources.insert(next.clone());
            }
        }
        sources.into_iter().collect()
    }

    /// The handler of `service`'s consumer of `source`'s events: `steps` are its
    /// handlers (each step it owns), `store` is its own store, where its chain events
    /// go.
    pub fn participant(
        &self,
        service: &str,
        source: &str,
        store: Arc<dyn EventStore>,
        steps: HashMap<String, StepHandler>,
    ) -> ChainParticipant {
        ChainParticipant {
            chain: self.clone(),
            service: service.to_owned(),
            source: source.to_owned(),
            store,
            steps,
            clock: Arc::new(SystemClock),
        }
    }

    /// The tracker's view of the chain: its steps, marked by its events.
    pub fn flow(&self, deadline: Duration) -> Flow {
        let mut flow = Flow::new(self.definition.saga_type.clone(), "id", deadline);
        flow.steps = self
            .definition
            .steps
            .iter()
            .map(|s| s.name.clone())
            .collect();
        flow.chain = Some(self.definition.saga_type.clone());
        flow
    }

    fn owner(&self, i: usize) -> Option<&str> {
        self.owners.get(i).map(String::as_str)
    }
}

/// What a chain event says of its step, for the tracker.
pub(crate) fn mark(event_type: &str) -> Option<Mark> {
    match event_type {
        STEP_DONE => Some(Mark::Done),
        STEP_FAILED => Some(Mark::Failed),
        STEP_COMPENSATED => Some(Mark::Compensated),
        _ => None,
    }
}

/// One service's consumer of one source's events in a chain.
pub struct ChainParticipant {
    chain: Chain,
    service: String,
    source: String,
    store: Arc<dyn EventStore>,
    steps: HashMap<String, StepHandler>,
    clock: Arc<dyn Clock>,
}

/// What a reaction does next.
enum Reaction {
    Forward(usize),
    Backward(usize),
}

#[async_trait]
impl Handler for ChainParticipant {
    fn event_types(&self) -> Option<BTreeSet<String>> {
        let mut types: BTreeSet<String> = EVENT_TYPES.iter().map(|t| (*t).to_owned()).collect();
        let (service, event_type) = &self.chain.start;
        if *service == self.source && self.chain.owner(0) == Some(self.service.as_str()) {
            types.insert(event_type.clone());
        }
        Some(types)
    }

    async fn handle(&self, message: &Message) -> Result<Vec<SqlStatement>, HandlerError> {
        if message.source.as_str() != self.source {
            return Ok(Vec::new());
        }
        let Some((reaction, id, data)) = self.reaction(message)? else {
            return Ok(Vec::new());
        };
        match reaction {
            Reaction::Forward(i) => self.forward(i, &id, data).await?,
            Reaction::Backward(i) => self.backward(i, &id, data).await?,
        }
        Ok(Vec::new())
    }
}

impl ChainParticipant {
    /// Whether `message` is this service's cue, and for which step.
    fn reaction(
        &self,
        message: &Message,
    ) -> Result<Option<(Reaction, String, Value)>, HandlerError> {
        let chain = &self.chain;
        let event_type = message.event.event_type.as_str();
        let mine = |i: usize| chain.owner(i) == Some(self.service.as_str());
        if (self.source.as_str(), event_type) == (chain.start.0.as_str(), chain.start.1.as_str()) {
            if !mine(0) {
                return Ok(None);
            }
            return Ok((chain.begin)(message).map(|(id, data)| (Reaction::Forward(0), id, data)));
        }
        if mark(event_type).is_none() {
            return Ok(None);
        }
        let event: ChainEvent = message
            .event
            .data
            .decode()
            .map_err(|e| HandlerError::Permanent(format!("not a chain event: {e}")))?;
        if event.saga_type != chain.definition.saga_type {
            return Ok(None);
        }
        let Some(i) = chain.definition.position(&event.step) else {
            return Err(HandlerError::Permanent(format!(
                "no step {} in saga {}",
                event.step, event.saga_type
            )));
        };
        // Only the step's own service speaks for it.
        if chain.owner(i) != Some(self.source.as_str()) {
            return Ok(None);
        }
        let reaction = match event_type {
            STEP_DONE if mine(i + 1) => Reaction::Forward(i + 1),
            STEP_FAILED | STEP_COMPENSATED if i > 0 && mine(i - 1) => Reaction::Backward(i - 1),
            _ => return Ok(None),
        };
        Ok(Some((reaction, event.id, event.data)))
    }

    fn handler(&self, step: &str) -> Result<&StepHandler, HandlerError> {
        self.steps.get(step).ok_or_else(|| {
            HandlerError::Permanent(format!("{} has no handler for step {step}", self.service))
        })
    }

    /// Step `i` forward, with its retries; records done or failed.
    async fn forward(&self, i: usize, id: &str, mut data: Value) -> Result<(), HandlerError> {
        let step = &self.chain.definition.steps[i];
        if step.skip_if.as_ref().is_some_and(|skip| skip(&data)) {
            push(&mut data, "skipped", Value::String(step.name.clone()));
            return self
                .record(STEP_DONE, id, i, data, None, Some("skipped".into()))
                .await;
        }
        let body = step
            .request
            .as_ref()
            .map_or_else(|| data.clone(), |build| build(&data));
        let handler = self.handler(&step.name)?;
        let mut attempt = 1;
        let failure = loop {
            match self
                .attempt(handler, id, i, attempt, false, body.clone(), step.timeout)
                .await
            {
                Ok(result) => {
                    insert(&mut data, "results", &step.name, result);
                    return self.record(STEP_DONE, id, i, data, None, None).await;
                }
                Err(failure) => {
                    let retryable = step
                        .retryable
                        .as_ref()
                        .map_or(failure.transient, |decide| decide(&failure));
                    if retryable && step.retry.allows(attempt + 1) {
                        tokio::time::sleep(step.retry.delay(attempt, fastrand::f64())).await;
                        attempt += 1;
                        continue;
                    }
                    break (failure, retryable);
                }
            }
        };
        let (failure, unknown) = failure;
        if step.kind == StepKind::RetriableOnly {
            let note = format!("abandoned: {}", failure.error);
            return self.record(STEP_DONE, id, i, data, None, Some(note)).await;
        }
        let reason = format!("step {} failed: {}", step.name, failure.error);
        if let Value::Object(map) = &mut data {
            map.insert(REASON_KEY.to_owned(), Value::String(reason.clone()));
        }
        if unknown {
            // It may have taken effect: undone first, as the orchestrator does.
            self.compensate(i, id, &data).await?;
        }
        self.record(STEP_FAILED, id, i, data, Some(reason), None)
            .await
    }

    /// Step `i` undone; records compensated.
    async fn backward(&self, i: usize, id: &str, data: Value) -> Result<(), HandlerError> {
        let step = &self.chain.definition.steps[i];
        let reason = data
            .get(REASON_KEY)
            .and_then(Value::as_str)
            .map(str::to_owned);
        let skipped = data
            .get("skipped")
            .and_then(Value::as_array)
            .is_some_and(|s| s.iter().any(|n| n.as_str() == Some(&step.name)));
        let note = if skipped || step.compensation.is_none() {
            Some("nothing to undo".to_owned())
        } else {
            self.compensate(i, id, &data).await?;
            None
        };
        self.record(STEP_COMPENSATED, id, i, data, reason, note)
            .await
    }

    /// Step `i`'s compensation, retried on any failure with its policy; still failing,
    /// the message goes back to the consumer (retried, then a dead letter).
    async fn compensate(&self, i: usize, id: &str, data: &Value) -> Result<(), HandlerError> {
        let step = &self.chain.definition.steps[i];
        let Some(compensation) = step.compensation else {
            return Ok(());
        };
        let body = match (&step.compensation_request, &step.request) {
            (Some(build), _) | (None, Some(build)) => build(data),
            (None, None) => data.clone(),
        };
        let handler = self.handler(&step.name)?;
        let mut attempt = 1;
        loop {
            let outcome = self
                .attempt(
                    handler,
                    id,
                    i,
                    attempt,
                    true,
                    body.clone(),
                    compensation.timeout,
                )
                .await;
            match outcome {
                Ok(_) => return Ok(()),
                Err(failure) if compensation.retry.allows(attempt + 1) => {
                    tracing::debug!(saga = %id, step = %step.name, error = %failure.error, "compensation failed; retrying");
                    tokio::time::sleep(compensation.retry.delay(attempt, fastrand::f64())).await;
                    attempt += 1;
                }
                Err(failure) => {
                    tracing::warn!(saga = %id, step = %step.name, error = %failure.error, "compensation failed");
                    return Err(HandlerError::Transient(format!(
                        "the compensation of step {} failed: {}",
                        step.name, failure.error
                    )));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        handler: &StepHandler,
        id: &str,
        i: usize,
        attempt: u32,
        compensation: bool,
        body: Value,
        timeout: Duration,
    ) -> Result<Value, Failure> {
        let step = &self.chain.definition.steps[i].name;
        let call = StepCall {
            saga_id: id.to_owned(),
            saga_type: self.chain.definition.saga_type.clone(),
            step: step.clone(),
            attempt,
            compensation,
            idempotency_key: idempotency_key(id, step, compensation),
            deadline: self.clock.now().saturating_add(timeout),
            body,
        };
        match tokio::time::timeout(timeout, handler(call)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Failure::transient(format!("no answer within {timeout:?}"))),
        }
    }

    async fn record(
        &self,
        event_type: &str,
        id: &str,
        i: usize,
        data: Value,
        reason: Option<String>,
        note: Option<String>,
    ) -> Result<(), HandlerError> {
        let step = self.chain.definition.steps[i].name.clone();
        let name = format!("chain:{event_type}:{id}:{step}");
        let event_id = EventId::from_uuid(uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            name.as_bytes(),
        ))
        .map_err(|e| HandlerError::Permanent(e.to_string()))?;
        let event = ChainEvent {
            saga_type: self.chain.definition.saga_type.clone(),
            id: id.to_owned(),
            step,
            data,
            reason,
            note,
        };
        let event = NewEvent::json(event_type, &event)
            .map_err(|e| HandlerError::Permanent(e.to_string()))?
            .with_id(event_id);
        let stream = StreamId::new(format!("chain-{id}"))
            .map_err(|e| HandlerError::Permanent(e.to_string()))?;
        let append = StreamAppend::new(stream, ExpectedVersion::Any, vec![event]);
        match self.store.append(append).await {
            // Recorded before with other data (a step whose answer changed on a second
            // run): the first record stands.
            Ok(_) | Err(StoreError::IdempotencyConflict { .. }) => Ok(()),
            Err(error) => Err(HandlerError::Transient(error.to_string())),
        }
    }
}

/// Appends `value` to the array `data[key]`.
fn push(data: &mut Value, key: &str, value: Value) {
    if let Value::Object(map) = data
        && let Value::Array(list) = map.entry(key).or_insert_with(|| Value::Array(Vec::new()))
    {
        list.push(value);
    }
}

/// Sets `data[key][name] = value`.
fn insert(data: &mut Value, key: &str, name: &str, value: Value) {
    if let Value::Object(map) = data
        && let Value::Object(inner) = map
            .entry(key)
            .or_insert_with(|| Value::Object(serde_json::Map::new()))
    {
        inner.insert(name.to_owned(), value);
    }
}
