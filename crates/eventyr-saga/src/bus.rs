//! Sagas over the bus: a step call is a command event in the orchestrator's own store
//! (so its outbox publishes it), and the participant's answer is a reply event in the
//! participant's store, correlated by saga id, step and attempt.
//!
//! - Orchestrator: [`BusParticipants`] records `SagaStepCommand` events (public) and
//!   returns `Accepted`; [`ReplyHandler`], a consumer of each participant service's
//!   `SagaStepReplied` events, hands the replies to the engine.
//! - Participant: [`CommandHandler`], a consumer of the orchestrator's commands, runs
//!   the participant's [`StepHandler`](crate::StepHandler) for the steps it serves and
//!   records the reply.
//!
//! Commands and replies have ids derived from (key, attempt), so an attempt sent again
//! after a restart, or a command delivered again, is stored once.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use eventyr_bus::{Handler, HandlerError, Message};
use eventyr_core::{EventId, NewEvent, StreamId, Timestamp};
use eventyr_store::sql::SqlStatement;
use eventyr_store::{EventStore, ExpectedVersion, StoreError, StreamAppend};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::SagaHandle;
use crate::machine::{Failure, StepCall};
use crate::participants::{Participants, Sent, StepHandler};

/// The event type of a step command.
pub const COMMAND_TYPE: &str = "SagaStepCommand";
/// The event type of a step reply.
pub const REPLY_TYPE: &str = "SagaStepReplied";

/// A step command as it travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepCommand {
    pub saga_id: String,
    pub saga_type: String,
    pub step: String,
    pub attempt: u32,
    pub compensation: bool,
    pub idempotency_key: String,
    pub deadline: Timestamp,
    pub body: Value,
}

/// A participant's answer as it travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReply {
    pub saga_id: String,
    pub step: String,
    pub attempt: u32,
    pub compensation: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
}

/// The id of a command or reply: the same for the same attempt, whoever sends it.
fn derived_id(kind: &str, key: &str, attempt: u32) -> Result<EventId, StoreError> {
    let name = format!("{kind}:{key}:{attempt}");
    Ok(EventId::from_uuid(uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        name.as_bytes(),
    ))?)
}

async fn record(
    store: &Arc<dyn EventStore>,
    stream: String,
    event: NewEvent,
) -> Result<(), StoreError> {
    let append = StreamAppend::new(StreamId::new(stream)?, ExpectedVersion::Any, vec![event]);
    store.append(append).await.map(|_| ())
}

/// The orchestrator's side: step calls become command events in its own store.
#[derive(Debug, Clone)]
pub struct BusParticipants {
    store: Arc<dyn EventStore>,
}

impl BusParticipants {
    /// `store` is the orchestrator's store, whose public events include
    /// [`COMMAND_TYPE`].
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl Participants for BusParticipants {
    async fn call(&self, call: StepCall) -> Sent {
        let command = StepCommand {
            saga_id: call.saga_id,
            saga_type: call.saga_type,
            step: call.step,
            attempt: call.attempt,
            compensation: call.compensation,
            idempotency_key: call.idempotency_key,
            deadline: call.deadline,
            body: call.body,
        };
        let event = NewEvent::json(COMMAND_TYPE, &command)
            .map_err(StoreError::from)
            .and_then(|e| {
                // The participant's consumer continues the step's trace.
                Ok(in_current_trace(e).with_id(derived_id(
                    "command",
                    &command.idempotency_key,
                    command.attempt,
                )?))
            });
        let stream = format!("sagacmd-{}", command.saga_id);
        let recorded = match event {
            Ok(event) => record(&self.store, stream, event).await,
            Err(error) => Err(error),
        };
        match recorded {
            Ok(()) => Sent::Accepted,
            // Not sent: the attempt's deadline retries it.
            Err(error) => Sent::Replied(Err(Failure::transient(format!(
                "cannot record the command: {error}"
            )))),
        }
    }
}

/// The orchestrator's consumer of a participant service's replies.
#[derive(Clone)]
pub struct ReplyHandler {
    handle: SagaHandle,
}

impl ReplyHandler {
    pub fn new(handle: SagaHandle) -> Self {
        Self { handle }
    }
}

#[async_trait]
impl Handler for ReplyHandler {
    fn event_types(&self) -> Option<BTreeSet<String>> {
        Some(BTreeSet::from([REPLY_TYPE.to_owned()]))
    }

    async fn handle(&self, message: &Message) -> Result<Vec<SqlStatement>, HandlerError> {
        if message.event.event_type.as_str() != REPLY_TYPE {
            return Ok(Vec::new());
        }
        let reply: StepReply = message
            .event
            .data
            .decode()
            .map_err(|e| HandlerError::Permanent(format!("not a step reply: {e}")))?;
        let outcome = match (reply.result, reply.failure) {
            (_, Some(failure)) => Err(failure),
            (result, None) => Ok(result.unwrap_or(Value::Null)),
        };
        // A reply the engine no longer waits for is ignored by it; one it cannot take
        // now is retried by the step's deadline. Either way the message is done.
        let _ = self
            .handle
            .reply(
                &reply.saga_id,
                &reply.step,
                reply.attempt,
                reply.compensation,
                outcome,
            )
            .await;
        Ok(Vec::new())
    }
}

/// A participant service's consumer of the orchestrator's commands: runs its handler
/// for each step it serves and records the reply in its own store (public events
/// must include [`REPLY_TYPE`]). The handler must be idempotent by the command's key
/// (see [`crate::participants::Ledger`]): a command may come more than once.
pub struct CommandHandler {
    store: Arc<dyn EventStore>,
    steps: HashMap<String, StepHandler>,
}

impl CommandHandler {
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            steps: HashMap::new(),
        }
    }

    pub fn step(mut self, step: impl Into<String>, handler: StepHandler) -> Self {
        self.steps.insert(step.into(), handler);
        self
    }
}

#[async_trait]
impl Handler for CommandHandler {
    fn event_types(&self) -> Option<BTreeSet<String>> {
        Some(BTreeSet::from([COMMAND_TYPE.to_owned()]))
    }

    async fn handle(&self, message: &Message) -> Result<Vec<SqlStatement>, HandlerError> {
        if message.event.event_type.as_str() != COMMAND_TYPE {
            return Ok(Vec::new());
        }
        let command: StepCommand = message
            .event
            .data
            .decode()
            .map_err(|e| HandlerError::Permanent(format!("not a step command: {e}")))?;
        let Some(handler) = self.steps.get(&command.step) else {
            return Ok(Vec::new()); // Another service's step.
        };
        let call = StepCall {
            saga_id: command.saga_id.clone(),
            saga_type: command.saga_type,
            step: command.step.clone(),
            attempt: command.attempt,
            compensation: command.compensation,
            idempotency_key: command.idempotency_key.clone(),
            deadline: command.deadline,
            body: command.body,
        };
        let outcome = handler(call).await;
        let (result, failure) = match outcome {
            Ok(result) => (Some(result), None),
            Err(failure) => (None, Some(failure)),
        };
        let reply = StepReply {
            saga_id: command.saga_id.clone(),
            step: command.step,
            attempt: command.attempt,
            compensation: command.compensation,
            result,
            failure,
        };
        let id = derived_id("reply", &command.idempotency_key, command.attempt)
            .map_err(|e| HandlerError::Permanent(e.to_string()))?;
        // The orchestrator's reply consumer continues the participant's trace.
        let event = NewEvent::json(REPLY_TYPE, &reply)
            .map(in_current_trace)
            .map_err(|e| HandlerError::Permanent(e.to_string()))?
            .with_id(id);
        match record(&self.store, format!("sagareply-{}", command.saga_id), event).await {
            Ok(()) => Ok(Vec::new()),
            // Delivered again after the reply was stored with another outcome: the
            // first answer stands.
            Err(StoreError::IdempotencyConflict { .. }) => Ok(Vec::new()),
            Err(error) => Err(HandlerError::Transient(error.to_string())),
        }
    }
}

/// `event` carrying the current span's trace context.
fn in_current_trace(mut event: NewEvent) -> NewEvent {
    event.metadata.traceparent = eventyr_telemetry::trace::current_traceparent();
    event
}
