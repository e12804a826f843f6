//! Operations on sagas from outside the engine's process (`eventyr saga ...`): reading
//! sagas from the engine's store, and operator requests (retry, abort) that the
//! running engine carries out.
//!
//! A request is an event in the stream `operator-sagas`; the engine reads that stream,
//! hands each request to its saga as an input, and records the outcome in the same
//! stream, so a request is carried out once (also across restarts) and its caller can
//! wait for the answer.

use std::time::Duration;

use eventyr_core::{NewEvent, StreamId, StreamVersion, Timestamp};
use eventyr_store::{EventStore, ExpectedVersion, ReadStream, StreamAppend};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use crate::engine::{EngineError, SagaSummary, list, read_log};
use crate::machine::{SagaEvent, SagaState, SagaStatus};

/// The stream of operator requests and their outcomes.
pub const OPERATOR_STREAM: &str = "operator-sagas";

/// What an operator asks of a saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Run the failed compensations of a FAILED saga again.
    Retry,
    /// Compensate a running saga now.
    Abort,
}

/// The events of the operator stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum OperatorEvent {
    OperatorRequested {
        request_id: String,
        saga_id: String,
        action: Action,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        at: Timestamp,
    },
    OperatorHandled {
        request_id: String,
        /// `None`: done. Otherwise the error's code and message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<(String, String)>,
        at: Timestamp,
    },
}

impl OperatorEvent {
    fn type_name(&self) -> &'static str {
        match self {
            Self::OperatorRequested { .. } => "OperatorRequested",
            Self::OperatorHandled { .. } => "OperatorHandled",
        }
    }
}

/// Sagas as their engine's store tells them.
#[derive(Debug, Clone)]
pub struct SagaAdmin {
    store: Arc<dyn EventStore>,
}

impl SagaAdmin {
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self { store }
    }

    /// Sagas, newest first, optionally only those in `status`.
    pub async fn list(
        &self,
        status: Option<SagaStatus>,
        limit: usize,
    ) -> Result<Vec<SagaSummary>, EngineError> {
        list(&self.store, status, limit).await
    }

    /// A saga's state and its timeline (each event with the time it was recorded).
    pub async fn get(
        &self,
        id: &str,
    ) -> Result<(SagaState, Vec<(Timestamp, SagaEvent)>), EngineError> {
        let events = read_log(&self.store, id).await?;
        if events.is_empty() {
            return Err(EngineError::NotFound(id.to_owned()));
        }
        let state = SagaState::replay(id, events.iter().map(|(_, e)| e));
        Ok((state, events))
    }

    /// Records a request for the running engine; returns its id.
    pub async fn request(
        &self,
        saga_id: &str,
        action: Action,
        reason: Option<String>,
        now: Timestamp,
    ) -> Result<String, EngineError> {
        self.get(saga_id).await?;
        let request_id = uuid::Uuid::now_v7().to_string();
        let event = OperatorEvent::OperatorRequested {
            request_id: request_id.clone(),
            saga_id: saga_id.to_owned(),
            action,
            reason,
            at: now,
        };
        append(&self.store, &event).await?;
        Ok(request_id)
    }

    /// Waits up to `wait` for the engine's answer to a request: `Ok(true)` done,
    /// `Ok(false)` no answer yet (is the engine running?), or the engine's refusal.
    pub async fn outcome(&self, request_id: &str, wait: Duration) -> Result<bool, EngineError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            for event in read_operator(&self.store, StreamVersion::FIRST).await?.0 {
                if let OperatorEvent::OperatorHandled {
                    request_id: handled,
                    error,
                    ..
                } = event
                    && handled == request_id
                {
                    return match error {
                        None => Ok(true),
                        Some((code, message)) => Err(EngineError::Operator { code, message }),
                    };
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn operator_stream() -> StreamId {
    StreamId::new(OPERATOR_STREAM).expect("a valid stream id")
}

pub(crate) async fn append(
    store: &Arc<dyn EventStore>,
    event: &OperatorEvent,
) -> Result<(), EngineError> {
    let new = NewEvent::json(event.type_name(), event).map_err(eventyr_store::StoreError::from)?;
    let append = StreamAppend::new(operator_stream(), ExpectedVersion::Any, vec![new]);
    store.append(append).await?;
    Ok(())
}

/// The operator events from version `from`, and the version to read from next.
pub(crate) async fn read_operator(
    store: &Arc<dyn EventStore>,
    from: StreamVersion,
) -> Result<(Vec<OperatorEvent>, StreamVersion), EngineError> {
    let mut events = Vec::new();
    let mut next = from;
    loop {
        let slice = store
            .read_stream(&operator_stream(), ReadStream::forwards(next).limit(1000))
            .await?;
        let Some(last) = slice.events.last().map(|e| e.version) else {
            return Ok((events, next));
        };
        for event in &slice.events {
            let decoded = event.data.decode().map_err(|e| EngineError::Corrupt {
                id: OPERATOR_STREAM.to_owned(),
                message: e.to_string(),
            })?;
            events.push(decoded);
        }
        next = StreamVersion(last.0 + 1);
        if Some(last) >= slice.stream_version {
            return Ok((events, next));
        }
    }
}
