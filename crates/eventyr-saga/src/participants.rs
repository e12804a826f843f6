//! How the engine reaches the services that carry out steps: the [`Participants`]
//! trait, and participants in the same process.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use serde_json::Value;

use crate::machine::{Failure, StepCall};

/// What became of a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    /// A synchronous transport's answer.
    Replied(Result<Value, Failure>),
    /// An asynchronous transport sent the command; the reply comes later, through
    /// [`crate::SagaHandle::reply`], correlated by saga id, step and attempt.
    Accepted,
}

/// Carries out step calls. A call carries its idempotency key: participants use it so
/// that a retried step or compensation has its effect once, and a compensation
/// tombstones its action's key (see [`crate::machine`]).
#[async_trait]
pub trait Participants: Send + Sync {
    async fn call(&self, call: StepCall) -> Sent;
}

/// A step handler in this process.
pub type StepHandler =
    Arc<dyn Fn(StepCall) -> BoxFuture<'static, Result<Value, Failure>> + Send + Sync>;

/// Participants in this process, by step name (the same handler gets the step's
/// action and its compensation; `call.compensation` tells which).
#[derive(Clone, Default)]
pub struct InProcess {
    handlers: HashMap<String, StepHandler>,
}

impl InProcess {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn step(mut self, step: impl Into<String>, handler: StepHandler) -> Self {
        self.handlers.insert(step.into(), handler);
        self
    }
}

#[async_trait]
impl Participants for InProcess {
    async fn call(&self, call: StepCall) -> Sent {
        let Some(handler) = self.handlers.get(&call.step).cloned() else {
            return Sent::Replied(Err(Failure::permanent(format!(
                "no participant for step {}",
                call.step
            ))));
        };
        Sent::Replied(handler(call).await)
    }
}

/// A participant's record of what it did, by idempotency key, over an event store:
/// each action key has a stream whose first event decides, once and for all, whether
/// the action was done (`Done`) or compensated first (`Tombstone`). It gives any
/// participant the contract the engine relies on:
/// - an action retried with the same key has its effect once;
/// - a compensation undoes a done action once (`Undone`), and of an action never done
///   it leaves a tombstone, so that the action, arriving late, is refused.
///
/// The effect itself is the caller's, done when the claim is `Fresh`. A participant
/// whose effect lives in the same store makes claim and effect one atomic append
/// (`act_with`, `compensate_with`); otherwise a crash between claim and effect loses
/// the effect, and the effect should be idempotent by the key itself.
#[derive(Debug, Clone)]
pub struct Ledger {
    store: Arc<dyn eventyr_store::EventStore>,
}

/// What a [`Ledger`] says of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First time: do it.
    Fresh,
    /// Done before: answer as before, do nothing.
    Again,
    /// The action was compensated before it arrived: refuse it.
    Tombstoned,
}

impl Ledger {
    pub fn new(store: Arc<dyn eventyr_store::EventStore>) -> Self {
        Self { store }
    }

    fn stream(key: &str) -> Result<eventyr_core::StreamId, eventyr_store::StoreError> {
        let key = key.strip_suffix("/compensation").unwrap_or(key);
        Ok(eventyr_core::StreamId::new(format!(
            "key-{}",
            key.replace('/', ":")
        ))?)
    }

    async fn append(
        &self,
        key: &str,
        expected: eventyr_store::ExpectedVersion,
        event_type: &str,
        extra: Vec<eventyr_core::NewEvent>,
    ) -> Result<bool, eventyr_store::StoreError> {
        let mut events = vec![eventyr_core::NewEvent::json(
            event_type,
            &serde_json::json!({ "key": key }),
        )?];
        events.extend(extra);
        let mut appends = vec![eventyr_store::StreamAppend::new(
            Self::stream(key)?,
            expected,
            Vec::new(),
        )];
        appends[0].events = events;
        match self.store.append_atomic(appends).await {
            Ok(_) => Ok(true),
            Err(eventyr_store::StoreError::WrongExpectedVersion { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    async fn first_types(&self, key: &str) -> Result<Vec<String>, eventyr_store::StoreError> {
        let slice = self
            .store
            .read_stream(
                &Self::stream(key)?,
                eventyr_store::ReadStream::forwards(eventyr_core::StreamVersion::FIRST).limit(2),
            )
            .await?;
        Ok(slice
            .events
            .iter()
            .map(|e| e.event_type.as_str().to_owned())
            .collect())
    }

    /// Claims an action's key, appending `effect` events (to the key's stream) in the
    /// same atomic write when it is fresh.
    pub async fn act_with(
        &self,
        key: &str,
        effect: Vec<eventyr_core::NewEvent>,
    ) -> Result<Claim, eventyr_store::StoreError> {
        if self
            .append(
                key,
                eventyr_store::ExpectedVersion::NoStream,
                "Done",
                effect,
            )
            .await?
        {
            return Ok(Claim::Fresh);
        }
        let types = self.first_types(key).await?;
        Ok(if types.first().map(String::as_str) == Some("Tombstone") {
            Claim::Tombstoned
        } else {
            Claim::Again
        })
    }

    /// Claims an action's key.
    pub async fn act(&self, key: &str) -> Result<Claim, eventyr_store::StoreError> {
        self.act_with(key, Vec::new()).await
    }

    /// Claims a compensation: `Fresh` when a done action is undone now (the caller
    /// undoes its effect), `Again` when there is nothing (more) to undo.
    pub async fn compensate(&self, key: &str) -> Result<Claim, eventyr_store::StoreError> {
        self.compensate_with(key, Vec::new()).await
    }

    /// Claims a compensation, appending `undo` events in the same atomic write when a
    /// done action is undone now.
    pub async fn compensate_with(
        &self,
        key: &str,
        undo: Vec<eventyr_core::NewEvent>,
    ) -> Result<Claim, eventyr_store::StoreError> {
        use eventyr_store::ExpectedVersion;
        if self
            .append(key, ExpectedVersion::NoStream, "Tombstone", Vec::new())
            .await?
        {
            return Ok(Claim::Again); // Never done: nothing to undo, and now never will be.
        }
        let types = self.first_types(key).await?;
        match types.as_slice() {
            [first] if first == "Done" => {
                let undone = self
                    .append(
                        key,
                        ExpectedVersion::Exact(eventyr_core::StreamVersion::FIRST),
                        "Undone",
                        undo,
                    )
                    .await?;
                Ok(if undone { Claim::Fresh } else { Claim::Again })
            }
            _ => Ok(Claim::Again),
        }
    }
}

/// Participants chosen by step: some steps in this process, others over HTTP or the
/// bus.
#[derive(Clone)]
pub struct Routed {
    by_step: HashMap<String, Arc<dyn Participants>>,
    default: Arc<dyn Participants>,
}

impl Routed {
    /// Steps not routed otherwise go to `default`.
    pub fn new(default: Arc<dyn Participants>) -> Self {
        Self {
            by_step: HashMap::new(),
            default,
        }
    }

    pub fn route(mut self, step: impl Into<String>, participants: Arc<dyn Participants>) -> Self {
        self.by_step.insert(step.into(), participants);
        self
    }
}

#[async_trait]
impl Participants for Routed {
    async fn call(&self, call: StepCall) -> Sent {
        let participants = self.by_step.get(&call.step).unwrap_or(&self.default);
        participants.call(call).await
    }
}
