//! The saga state machine: `decide` turns (state, input) into events, `evolve` folds an
//! event into the state, and the effects (calls, timers) follow from recorded events.
//!
//! The engine records a decision's events (atomically, at the saga's expected version)
//! *before* it carries out their effects, so the log always knows every request that
//! may have reached a participant; after a crash, [`recovery_effects`] sends the
//! outstanding ones again, with the same idempotency keys, and re-arms their timers.
//!
//! Compensation: on the final failure or timeout of a compensable step or the pivot,
//! the steps whose action may have taken effect (succeeded, or ended with an unknown
//! outcome) are compensated one at a time in exact reverse order. Participants treat
//! a compensation as a tombstone for the action's key: an action that arrives after its
//! compensation is refused, and a compensation of an action never done does nothing.

use std::time::Duration;

use eventyr_core::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::definition::{SagaDefinition, StepKind};

/// A saga's status (PLAN.md's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SagaStatus {
    Started,
    InProgress,
    Completed,
    Compensating,
    Compensated,
    Failed,
}

impl SagaStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated | Self::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "STARTED",
            Self::InProgress => "IN_PROGRESS",
            Self::Completed => "COMPLETED",
            Self::Compensating => "COMPENSATING",
            Self::Compensated => "COMPENSATED",
            Self::Failed => "FAILED",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Started,
            Self::InProgress,
            Self::Completed,
            Self::Compensating,
            Self::Compensated,
            Self::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str().eq_ignore_ascii_case(text))
    }
}

/// A failed attempt, as the transport reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub error: String,
    /// A retry may help (network error, timeout, 5xx), and the action may have taken
    /// effect. A permanent failure is a refusal: the action did not take effect.
    pub transient: bool,
}

impl Failure {
    pub fn transient(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            transient: true,
        }
    }

    pub fn permanent(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            transient: false,
        }
    }
}

/// What happens after a failed attempt of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "then", rename_all = "snake_case")]
pub enum After {
    /// Another attempt at `at`.
    Retry { at: Timestamp },
    /// A retriable-only step out of attempts: given up, the saga goes on.
    Abandon,
    /// The step failed for good; compensation begins. `unknown`: the action may have
    /// taken effect (so it is compensated too).
    Compensate { unknown: bool },
}

/// The events of a saga's log (stream `saga-<id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SagaEvent {
    SagaStarted {
        saga_type: String,
        data: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        correlation_id: Option<String>,
        /// The W3C trace context of whoever started the saga: its spans continue it,
        /// also after a restart.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
        steps: Vec<String>,
        at: Timestamp,
    },
    StepSkipped {
        step: String,
        at: Timestamp,
    },
    StepRequested {
        step: String,
        attempt: u32,
        deadline: Timestamp,
        at: Timestamp,
    },
    StepSucceeded {
        step: String,
        attempt: u32,
        result: Value,
        at: Timestamp,
    },
    StepFailed {
        step: String,
        attempt: u32,
        error: String,
        transient: bool,
        after: After,
        at: Timestamp,
    },
    StepTimedOut {
        step: String,
        attempt: u32,
        after: After,
        at: Timestamp,
    },
    /// An operator aborted the saga while this step was under way: its outcome is
    /// unknown.
    StepAborted {
        step: String,
        at: Timestamp,
    },
    CompensationStarted {
        reason: String,
        at: Timestamp,
    },
    CompensationRequested {
        step: String,
        attempt: u32,
        deadline: Timestamp,
        at: Timestamp,
    },
    CompensationSucceeded {
        step: String,
        attempt: u32,
        at: Timestamp,
    },
    /// A failed (or timed-out) compensation attempt; `retry_at: None` means given up:
    /// the saga will end FAILED, flagged for manual intervention.
    CompensationFailed {
        step: String,
        attempt: u32,
        error: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_at: Option<Timestamp>,
        at: Timestamp,
    },
    /// An operator asked to retry the failed compensations of a FAILED saga.
    RetryRequested {
        at: Timestamp,
    },
    SagaFinished {
        status: SagaStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        flagged: bool,
        at: Timestamp,
    },
}

impl SagaEvent {
    /// The event type it is stored under.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::SagaStarted { .. } => "SagaStarted",
            Self::StepSkipped { .. } => "StepSkipped",
            Self::StepRequested { .. } => "StepRequested",
            Self::StepSucceeded { .. } => "StepSucceeded",
            Self::StepFailed { .. } => "StepFailed",
            Self::StepTimedOut { .. } => "StepTimedOut",
            Self::StepAborted { .. } => "StepAborted",
            Self::CompensationStarted { .. } => "CompensationStarted",
            Self::CompensationRequested { .. } => "CompensationRequested",
            Self::CompensationSucceeded { .. } => "CompensationSucceeded",
            Self::CompensationFailed { .. } => "CompensationFailed",
            Self::RetryRequested { .. } => "RetryRequested",
            Self::SagaFinished { .. } => "SagaFinished",
        }
    }
}

/// Where a step's action stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    Pending,
    Skipped,
    /// Attempt `attempt` is out; it times out at `deadline`.
    Requested {
        attempt: u32,
        deadline: Timestamp,
    },
    /// Attempt `attempt` failed; the next one goes at `at`.
    Waiting {
        attempt: u32,
        at: Timestamp,
    },
    Succeeded,
    /// Refused: it did not take effect.
    Refused,
    /// Failed or timed out for good, or aborted: it may have taken effect.
    Unknown,
    Abandoned,
}

/// Where a step's compensation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backward {
    None,
    Requested {
        attempt: u32,
        deadline: Timestamp,
    },
    Waiting {
        attempt: u32,
        at: Timestamp,
    },
    Done,
    /// Given up after its attempts.
    Failed,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepState {
    pub name: String,
    pub forward: Forward,
    pub backward: Backward,
    pub result: Option<Value>,
}

/// A saga as its log tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaState {
    pub id: String,
    pub saga_type: String,
    /// The input, with each step's result under `results.<step>`.
    pub data: Value,
    pub correlation_id: Option<String>,
    /// The trace context the saga started in.
    pub traceparent: Option<String>,
    pub status: SagaStatus,
    pub steps: Vec<StepState>,
    pub flagged: bool,
    pub reason: Option<String>,
    /// Events folded in: the saga stream's version.
    pub version: u64,
    pub started_at: Timestamp,
    pub updated_at: Timestamp,
}

/// What the engine feeds the machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A participant answered attempt `attempt` of `step` (or of its compensation).
    Reply {
        step: String,
        attempt: u32,
        compensation: bool,
        outcome: Result<Value, Failure>,
    },
    /// A timer armed by an effect rang.
    Timer {
        step: String,
        attempt: u32,
        compensation: bool,
        kind: TimerKind,
    },
    /// An operator asks to compensate now.
    Abort { reason: String },
    /// An operator asks to retry the failed compensations of a FAILED saga.
    Retry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TimerKind {
    /// The attempt's deadline.
    Deadline,
    /// The time of the next attempt.
    Retry,
}

/// A call to a participant.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCall {
    pub saga_id: String,
    pub saga_type: String,
    pub step: String,
    pub attempt: u32,
    pub compensation: bool,
    /// The same on every attempt of this step; different for its compensation.
    pub idempotency_key: String,
    pub deadline: Timestamp,
    pub body: Value,
}

/// What the engine carries out after recording events.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Call(StepCall),
    Timer {
        step: String,
        attempt: u32,
        compensation: bool,
        kind: TimerKind,
        at: Timestamp,
    },
    Finished {
        status: SagaStatus,
        flagged: bool,
    },
}

/// Why an input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SagaError {
    #[error("the saga is {0} already")]
    Terminal(&'static str),
    #[error("the saga is past its pivot {0} and can no longer be compensated")]
    PastPivot(String),
    #[error("the saga is {0}; only a FAILED saga with failed compensations can be retried")]
    NotRetriable(&'static str),
    #[error("the saga has no step {0}")]
    UnknownStep(String),
}

/// The key of the saga's data under which compensations find why the saga
/// compensates (set when compensation starts).
pub const REASON_KEY: &str = "saga_reason";

/// The key a participant deduplicates a step's action (or compensation) by.
pub fn idempotency_key(saga_id: &str, step: &str, compensation: bool) -> String {
    if compensation {
        format!("{saga_id}/{step}/compensation")
    } else {
        format!("{saga_id}/{step}")
    }
}

impl SagaState {
    /// The state before any event.
    pub fn empty(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            saga_type: String::new(),
            data: Value::Null,
            correlation_id: None,
            traceparent: None,
            status: SagaStatus::Started,
            steps: Vec::new(),
            flagged: false,
            reason: None,
            version: 0,
            started_at: Timestamp::UNIX_EPOCH,
            updated_at: Timestamp::UNIX_EPOCH,
        }
    }

    /// Folds a log into a state.
    pub fn replay<'a>(
        id: impl Into<String>,
        events: impl IntoIterator<Item = &'a SagaEvent>,
    ) -> Self {
        let mut state = Self::empty(id);
        for event in events {
            state.evolve(event);
        }
        state
    }

    fn step_mut(&mut self, name: &str) -> Option<&mut StepState> {
        self.steps.iter_mut().find(|s| s.name == name)
    }

    pub fn step(&self, name: &str) -> Option<&StepState> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Folds one event in.
    pub fn evolve(&mut self, event: &SagaEvent) {
        self.version += 1;
        match event {
            SagaEvent::SagaStarted {
                saga_type,
                data,
                correlation_id,
                traceparent,
                steps,
                at,
            } => {
                self.saga_type.clone_from(saga_type);
                self.data = data.clone();
                self.correlation_id.clone_from(correlation_id);
                self.traceparent.clone_from(traceparent);
                self.steps = steps
                    .iter()
                    .map(|name| StepState {
                        name: name.clone(),
                        forward: Forward::Pending,
                        backward: Backward::None,
                        result: None,
                    })
                    .collect();
                self.status = SagaStatus::Started;
                self.started_at = *at;
            }
            SagaEvent::StepSkipped { step, .. } => {
                self.set_forward(step, Forward::Skipped);
                self.status = SagaStatus::InProgress;
            }
            SagaEvent::StepRequested {
                step,
                attempt,
                deadline,
                ..
            } => {
                self.set_forward(
                    step,
                    Forward::Requested {
                        attempt: *attempt,
                        deadline: *deadline,
                    },
                );
                self.status = SagaStatus::InProgress;
            }
            SagaEvent::StepSucceeded { step, result, .. } => {
                if let Some(state) = self.step_mut(step) {
                    state.forward = Forward::Succeeded;
                    state.result = Some(result.clone());
                }
                if let Value::Object(data) = &mut self.data {
                    let results = data
                        .entry("results")
                        .or_insert_with(|| Value::Object(serde_json::Map::new()));
                    if let Value::Object(results) = results {
                        results.insert(step.clone(), result.clone());
                    }
                }
            }
            SagaEvent::StepFailed {
                step,
                attempt,
                after,
                ..
            }
            | SagaEvent::StepTimedOut {
                step,
                attempt,
                after,
                ..
            } => {
                let forward = match after {
                    After::Retry { at } => Forward::Waiting {
                        attempt: *attempt,
                        at: *at,
                    },
                    After::Abandon => Forward::Abandoned,
                    After::Compensate { unknown: true } => Forward::Unknown,
                    After::Compensate { unknown: false } => Forward::Refused,
                };
                self.set_forward(step, forward);
            }
            SagaEvent::StepAborted { step, .. } => self.set_forward(step, Forward::Unknown),
            SagaEvent::CompensationStarted { reason, .. } => {
                self.status = SagaStatus::Compensating;
                self.reason = Some(reason.clone());
                // Compensations see why (their bodies are built from the data).
                if let Value::Object(data) = &mut self.data {
                    data.insert(REASON_KEY.to_owned(), Value::String(reason.clone()));
                }
            }
            SagaEvent::CompensationRequested {
                step,
                attempt,
                deadline,
                ..
            } => self.set_backward(
                step,
                Backward::Requested {
                    attempt: *attempt,
                    deadline: *deadline,
                },
            ),
            SagaEvent::CompensationSucceeded { step, .. } => {
                self.set_backward(step, Backward::Done)
            }
            SagaEvent::CompensationFailed {
                step,
                attempt,
                retry_at,
                ..
            } => self.set_backward(
                step,
                retry_at.map_or(Backward::Failed, |at| Backward::Waiting {
                    attempt: *attempt,
                    at,
                }),
            ),
            SagaEvent::RetryRequested { .. } => {
                self.status = SagaStatus::Compensating;
                self.flagged = false;
                for step in &mut self.steps {
                    if step.backward == Backward::Failed {
                        step.backward = Backward::None;
                    }
                }
            }
            SagaEvent::SagaFinished {
                status,
                reason,
                flagged,
                ..
            } => {
                self.status = *status;
                self.flagged = *flagged;
                if reason.is_some() {
                    self.reason.clone_from(reason);
                }
            }
        }
        if let Some(at) = event_time(event) {
            self.updated_at = at;
        }
    }

    fn set_forward(&mut self, step: &str, forward: Forward) {
        if let Some(state) = self.step_mut(step) {
            state.forward = forward;
        }
    }

    fn set_backward(&mut self, step: &str, backward: Backward) {
        if let Some(state) = self.step_mut(step) {
            state.backward = backward;
        }
    }
}

fn event_time(event: &SagaEvent) -> Option<Timestamp> {
    match event {
        SagaEvent::SagaStarted { at, .. }
        | SagaEvent::StepSkipped { at, .. }
        | SagaEvent::StepRequested { at, .. }
        | SagaEvent::StepSucceeded { at, .. }
        | SagaEvent::StepFailed { at, .. }
        | SagaEvent::StepTimedOut { at, .. }
        | SagaEvent::StepAborted { at, .. }
        | SagaEvent::CompensationStarted { at, .. }
        | SagaEvent::CompensationRequested { at, .. }
        | SagaEvent::CompensationSucceeded { at, .. }
        | SagaEvent::CompensationFailed { at, .. }
        | SagaEvent::RetryRequested { at }
        | SagaEvent::SagaFinished { at, .. } => Some(*at),
    }
}

/// A decision under way: the events so far, folded into a working copy of the state.
struct Decision<'a> {
    definition: &'a SagaDefinition,
    state: SagaState,
    events: Vec<SagaEvent>,
    now: Timestamp,
}

impl Decision<'_> {
    fn push(&mut self, event: SagaEvent) {
        self.state.evolve(&event);
        self.events.push(event);
    }
}

/// The events that start a saga: its start, then its first step (or skips).
pub fn start(
    definition: &SagaDefinition,
    id: &str,
    data: Value,
    correlation_id: Option<String>,
    traceparent: Option<String>,
    now: Timestamp,
) -> Vec<SagaEvent> {
    let mut decision = Decision {
        definition,
        state: SagaState::empty(id),
        events: Vec::new(),
        now,
    };
    decision.push(SagaEvent::SagaStarted {
        saga_type: definition.saga_type.clone(),
        data,
        correlation_id,
        traceparent,
        steps: definition.steps.iter().map(|s| s.name.clone()).collect(),
        at: now,
    });
    advance(&mut decision);
    decision.events
}

/// The events that `input` leads to (none for a stale or duplicate reply or timer).
/// `random` in `[0, 1)` draws the retry jitter.
pub fn decide(
    definition: &SagaDefinition,
    state: &SagaState,
    input: &Input,
    now: Timestamp,
    random: f64,
) -> Result<Vec<SagaEvent>, SagaError> {
    let mut decision = Decision {
        definition,
        state: state.clone(),
        events: Vec::new(),
        now,
    };
    match input {
        Input::Reply {
            step,
            attempt,
            compensation: false,
            outcome,
        } => reply(&mut decision, step, *attempt, outcome, random)?,
        Input::Reply {
            step,
            attempt,
            compensation: true,
            outcome,
        } => compensation_reply(&mut decision, step, *attempt, outcome, random)?,
        Input::Timer {
            step,
            attempt,
            compensation,
            kind,
        } => timer(&mut decision, step, *attempt, *compensation, *kind, random)?,
        Input::Abort { reason } => abort(&mut decision, reason)?,
        Input::Retry => retry(&mut decision)?,
    }
    advance(&mut decision);
    Ok(decision.events)
}

fn index(decision: &Decision<'_>, step: &str) -> Result<usize, SagaError> {
    decision
        .definition
        .position(step)
        .filter(|i| *i < decision.state.steps.len())
        .ok_or_else(|| SagaError::UnknownStep(step.to_owned()))
}

fn reply(
    decision: &mut Decision<'_>,
    step: &str,
    attempt: u32,
    outcome: &Result<Value, Failure>,
    random: f64,
) -> Result<(), SagaError> {
    let i = index(decision, step)?;
    let current = matches!(decision.state.steps[i].forward,
        Forward::Requested { attempt: a, .. } if a == attempt);
    if !current || decision.state.status.is_terminal() {
        return Ok(());
    }
    let now = decision.now;
    match outcome {
        Ok(result) => decision.push(SagaEvent::StepSucceeded {
            step: step.to_owned(),
            attempt,
            result: result.clone(),
            at: now,
        }),
        Err(failure) => {
            let definition = &decision.definition.steps[i];
            let retryable = definition
                .retryable
                .as_ref()
                .map_or(failure.transient, |decide| decide(failure));
            let after = after_failure(decision, i, attempt, retryable, failure.transient, random);
            decision.push(SagaEvent::StepFailed {
                step: step.to_owned(),
                attempt,
                error: failure.error.clone(),
                transient: failure.transient,
                after,
                at: now,
            });
            begin_compensation(decision, after, step, &failure.error);
        }
    }
    Ok(())
}

/// What follows a failed attempt of step `i`.
fn after_failure(
    decision: &Decision<'_>,
    i: usize,
    attempt: u32,
    retryable: bool,
    unknown: bool,
    random: f64,
) -> After {
    let step = &decision.definition.steps[i];
    if retryable && step.retry.allows(attempt + 1) {
        return After::Retry {
            at: decision
                .now
                .saturating_add(step.retry.delay(attempt, random)),
        };
    }
    match step.kind {
        StepKind::RetriableOnly => After::Abandon,
        StepKind::Compensable | StepKind::Pivot => After::Compensate { unknown },
    }
}

fn begin_compensation(decision: &mut Decision<'_>, after: After, step: &str, error: &str) {
    if let After::Compensate { .. } = after {
        decision.push(SagaEvent::CompensationStarted {
            reason: format!("step {step} failed: {error}"),
            at: decision.now,
        });
    }
}

fn compensation_reply(
    decision: &mut Decision<'_>,
    step: &str,
    attempt: u32,
    outcome: &Result<Value, Failure>,
    random: f64,
) -> Result<(), SagaError> {
    let i = index(decision, step)?;
    let current = matches!(decision.state.steps[i].backward,
        Backward::Requested { attempt: a, .. } if a == attempt);
    if !current || decision.state.status.is_terminal() {
        return Ok(());
    }
    match outcome {
        Ok(_) => decision.push(SagaEvent::CompensationSucceeded {
            step: step.to_owned(),
            attempt,
            at: decision.now,
        }),
        Err(failure) => compensation_failed(decision, i, attempt, &failure.error, random),
    }
    Ok(())
}

fn compensation_failed(
    decision: &mut Decision<'_>,
    i: usize,
    attempt: u32,
    error: &str,
    random: f64,
) {
    let step = &decision.definition.steps[i];
    let retry = step.compensation.map(|c| c.retry).unwrap_or(step.retry);
    let retry_at = retry
        .allows(attempt + 1)
        .then(|| decision.now.saturating_add(retry.delay(attempt, random)));
    decision.push(SagaEvent::CompensationFailed {
        step: step.name.clone(),
        attempt,
        error: error.to_owned(),
        retry_at,
        at: decision.now,
    });
}

fn timer(
    decision: &mut Decision<'_>,
    step: &str,
    attempt: u32,
    compensation: bool,
    kind: TimerKind,
    random: f64,
) -> Result<(), SagaError> {
    let i = index(decision, step)?;
    if decision.state.status.is_terminal() {
        return Ok(());
    }
    let now = decision.now;
    let state = &decision.state.steps[i];
    match (compensation, kind) {
        (false, TimerKind::Deadline) => {
            if matches!(state.forward, Forward::Requested { attempt: a, deadline } if a == attempt && deadline <= now)
            {
                let after = after_failure(decision, i, attempt, true, true, random);
                decision.push(SagaEvent::StepTimedOut {
                    step: step.to_owned(),
                    attempt,
                    after,
                    at: now,
                });
                begin_compensation(decision, after, step, "timed out");
            }
        }
        (false, TimerKind::Retry) => {
            if matches!(state.forward, Forward::Waiting { attempt: a, at } if a == attempt && at <= now)
                && decision.state.status != SagaStatus::Compensating
            {
                request(decision, i, attempt + 1);
            }
        }
        (true, TimerKind::Deadline) => {
            if matches!(state.backward, Backward::Requested { attempt: a, deadline } if a == attempt && deadline <= now)
            {
                compensation_failed(decision, i, attempt, "timed out", random);
            }
        }
        (true, TimerKind::Retry) => {
            if matches!(state.backward, Backward::Waiting { attempt: a, at } if a == attempt && at <= now)
            {
                request_compensation(decision, i, attempt + 1);
            }
        }
    }
    Ok(())
}

fn abort(decision: &mut Decision<'_>, reason: &str) -> Result<(), SagaError> {
    let status = decision.state.status;
    if status.is_terminal() {
        return Err(SagaError::Terminal(status.as_str()));
    }
    if status == SagaStatus::Compensating {
        return Ok(());
    }
    // Past the point of no return, or at it with the outcome not known yet.
    let definition = decision.definition;
    if let Some(pivot) = definition
        .steps
        .iter()
        .zip(&decision.state.steps)
        .find(|(d, s)| {
            d.kind == StepKind::Pivot
                && matches!(
                    s.forward,
                    Forward::Succeeded | Forward::Requested { .. } | Forward::Waiting { .. }
                )
        })
    {
        return Err(SagaError::PastPivot(pivot.0.name.clone()));
    }
    let now = decision.now;
    let under_way: Vec<String> = decision
        .state
        .steps
        .iter()
        .filter(|s| {
            matches!(
                s.forward,
                Forward::Requested { .. } | Forward::Waiting { .. }
            )
        })
        .map(|s| s.name.clone())
        .collect();
    for step in under_way {
        decision.push(SagaEvent::StepAborted { step, at: now });
    }
    decision.push(SagaEvent::CompensationStarted {
        reason: format!("aborted: {reason}"),
        at: now,
    });
    Ok(())
}

fn retry(decision: &mut Decision<'_>) -> Result<(), SagaError> {
    let state = &decision.state;
    let failed = state.steps.iter().any(|s| s.backward == Backward::Failed);
    if state.status != SagaStatus::Failed || !failed {
        return Err(SagaError::NotRetriable(state.status.as_str()));
    }
    decision.push(SagaEvent::RetryRequested { at: decision.now });
    Ok(())
}

fn request(decision: &mut Decision<'_>, i: usize, attempt: u32) {
    let step = &decision.definition.steps[i];
    decision.push(SagaEvent::StepRequested {
        step: step.name.clone(),
        attempt,
        deadline: decision.now.saturating_add(step.timeout),
        at: decision.now,
    });
}

fn request_compensation(decision: &mut Decision<'_>, i: usize, attempt: u32) {
    let step = &decision.definition.steps[i];
    let timeout = step.compensation.map_or(step.timeout, |c| c.timeout);
    decision.push(SagaEvent::CompensationRequested {
        step: step.name.clone(),
        attempt,
        deadline: decision.now.saturating_add(timeout),
        at: decision.now,
    });
}

/// Moves the saga on as far as it can without waiting: skips, the next request, the
/// next compensation, or the end.
fn advance(decision: &mut Decision<'_>) {
    loop {
        match decision.state.status {
            SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Failed => return,
            SagaStatus::Compensating => return advance_compensation(decision),
            SagaStatus::Started | SagaStatus::InProgress => {
                let next = decision.state.steps.iter().position(|s| {
                    !matches!(
                        s.forward,
                        Forward::Succeeded | Forward::Skipped | Forward::Abandoned
                    )
                });
                let Some(i) = next else {
                    let flagged = false;
                    decision.push(SagaEvent::SagaFinished {
                        status: SagaStatus::Completed,
                        reason: None,
                        flagged,
                        at: decision.now,
                    });
                    return;
                };
                match decision.state.steps[i].forward {
                    Forward::Pending => {
                        let skip = decision.definition.steps[i]
                            .skip_if
                            .as_ref()
                            .is_some_and(|skip| skip(&decision.state.data));
                        if skip {
                            decision.push(SagaEvent::StepSkipped {
                                step: decision.definition.steps[i].name.clone(),
                                at: decision.now,
                            });
                            continue;
                        }
                        return request(decision, i, 1);
                    }
                    Forward::Refused | Forward::Unknown => {
                        // Cannot happen (a final failure starts compensation in the
                        // same decision); compensate rather than stall.
                        decision.push(SagaEvent::CompensationStarted {
                            reason: format!("step {} failed", decision.state.steps[i].name),
                            at: decision.now,
                        });
                    }
                    _ => return,
                }
            }
        }
    }
}

/// Whether step `i`'s action may have taken effect and it has a compensation.
fn needs_compensation(decision: &Decision<'_>, i: usize) -> bool {
    decision.definition.steps[i].compensation.is_some()
        && matches!(
            decision.state.steps[i].forward,
            Forward::Succeeded | Forward::Unknown
        )
}

fn advance_compensation(decision: &mut Decision<'_>) {
    let steps = &decision.state.steps;
    if steps.iter().any(|s| {
        matches!(
            s.backward,
            Backward::Requested { .. } | Backward::Waiting { .. }
        )
    }) {
        return;
    }
    // The highest step not yet compensated, so compensations go in reverse order.
    let next = (0..steps.len())
        .rev()
        .find(|&i| needs_compensation(decision, i) && steps[i].backward == Backward::None);
    if let Some(i) = next {
        return request_compensation(decision, i, 1);
    }
    let failed: Vec<&str> = steps
        .iter()
        .filter(|s| s.backward == Backward::Failed)
        .map(|s| s.name.as_str())
        .collect();
    let pivot_unknown = decision
        .definition
        .steps
        .iter()
        .zip(steps)
        .find(|(d, s)| d.kind == StepKind::Pivot && s.forward == Forward::Unknown)
        .map(|(d, _)| d.name.clone());
    let (status, reason) = if !failed.is_empty() {
        (
            SagaStatus::Failed,
            Some(format!("compensation failed: {}", failed.join(", "))),
        )
    } else if let Some(pivot) = pivot_unknown {
        (
            SagaStatus::Failed,
            Some(format!("the outcome of pivot {pivot} is unknown")),
        )
    } else {
        (SagaStatus::Compensated, None)
    };
    decision.push(SagaEvent::SagaFinished {
        status,
        reason,
        flagged: status == SagaStatus::Failed,
        at: decision.now,
    });
}

/// The effects of newly recorded events.
pub fn effects(
    definition: &SagaDefinition,
    state: &SagaState,
    events: &[SagaEvent],
) -> Vec<Effect> {
    let mut effects = Vec::new();
    for event in events {
        match event {
            SagaEvent::StepRequested {
                step,
                attempt,
                deadline,
                ..
            } => call(
                definition,
                state,
                step,
                *attempt,
                false,
                *deadline,
                &mut effects,
            ),
            SagaEvent::CompensationRequested {
                step,
                attempt,
                deadline,
                ..
            } => call(
                definition,
                state,
                step,
                *attempt,
                true,
                *deadline,
                &mut effects,
            ),
            SagaEvent::StepFailed {
                step,
                attempt,
                after: After::Retry { at },
                ..
            }
            | SagaEvent::StepTimedOut {
                step,
                attempt,
                after: After::Retry { at },
                ..
            } => effects.push(retry_timer(step, *attempt, false, *at)),
            SagaEvent::CompensationFailed {
                step,
                attempt,
                retry_at: Some(at),
                ..
            } => effects.push(retry_timer(step, *attempt, true, *at)),
            SagaEvent::SagaFinished {
                status, flagged, ..
            } => effects.push(Effect::Finished {
                status: *status,
                flagged: *flagged,
            }),
            _ => {}
        }
    }
    effects
}

/// The effects a saga waits on, from its state alone: after a restart, the calls
/// still outstanding go again (same keys) and their timers are re-armed.
pub fn recovery_effects(definition: &SagaDefinition, state: &SagaState) -> Vec<Effect> {
    let mut effects = Vec::new();
    if state.status.is_terminal() {
        return effects;
    }
    for step in &state.steps {
        match step.forward {
            Forward::Requested { attempt, deadline } => {
                call(
                    definition,
                    state,
                    &step.name,
                    attempt,
                    false,
                    deadline,
                    &mut effects,
                );
            }
            Forward::Waiting { attempt, at } if state.status != SagaStatus::Compensating => {
                effects.push(retry_timer(&step.name, attempt, false, at));
            }
            _ => {}
        }
        match step.backward {
            Backward::Requested { attempt, deadline } => {
                call(
                    definition,
                    state,
                    &step.name,
                    attempt,
                    true,
                    deadline,
                    &mut effects,
                );
            }
            Backward::Waiting { attempt, at } => {
                effects.push(retry_timer(&step.name, attempt, true, at));
            }
            _ => {}
        }
    }
    effects
}

fn retry_timer(step: &str, attempt: u32, compensation: bool, at: Timestamp) -> Effect {
    Effect::Timer {
        step: step.to_owned(),
        attempt,
        compensation,
        kind: TimerKind::Retry,
        at,
    }
}

fn call(
    definition: &SagaDefinition,
    state: &SagaState,
    step: &str,
    attempt: u32,
    compensation: bool,
    deadline: Timestamp,
    effects: &mut Vec<Effect>,
) {
    let body = definition
        .position(step)
        .and_then(|i| {
            let step = &definition.steps[i];
            match (compensation, &step.compensation_request) {
                (true, Some(build)) => Some(build),
                _ => step.request.as_ref(),
            }
        })
        .map_or_else(|| state.data.clone(), |build| build(&state.data));
    effects.push(Effect::Call(StepCall {
        saga_id: state.id.clone(),
        saga_type: state.saga_type.clone(),
        step: step.to_owned(),
        attempt,
        compensation,
        idempotency_key: idempotency_key(&state.id, step, compensation),
        deadline,
        body,
    }));
    effects.push(Effect::Timer {
        step: step.to_owned(),
        attempt,
        compensation,
        kind: TimerKind::Deadline,
        at: deadline,
    });
}

/// How long until `at`, from `now` (zero if it is past).
pub fn until(now: Timestamp, at: Timestamp) -> Duration {
    at.duration_since(now)
}
