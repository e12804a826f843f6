//! Choreography: services react to each other's events, with no orchestrator. Two
//! helpers make such a flow as reliable and as visible as an orchestrated saga:
//!
//! - [`Reactions`]: a bus handler declaring "on event E (from the consumer's source
//!   service), do C". Each reaction must be idempotent by the event id (a command id
//!   derived from it), as every bus handler's outside effects.
//! - [`Flow`] and [`TrackerHandler`]: a tracker that follows one flow through the
//!   events of every service taking part, keyed by correlation id: which steps have
//!   happened (done, failed or compensated) and when. Run one tracker consumer per
//!   service of the flow; [`Tracker`] reads them together, and flags a flow that has
//!   not finished within its deadline as stuck.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eventyr_bus::{BusError, ConsumerName, Handler, HandlerError, Inbox, Message};
use eventyr_core::{Clock, Timestamp};
use eventyr_store::readmodel::ReadModels;
use eventyr_store::sql::SqlStatement;
use eventyr_telemetry::names;
use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;

/// What a reaction does with an event: statements for the consumer's own database
/// (committed with its inbox record), after any idempotent command.
pub type Reaction = Arc<
    dyn Fn(Message) -> BoxFuture<'static, Result<Vec<SqlStatement>, HandlerError>> + Send + Sync,
>;

/// A bus handler made of reactions, by event type.
#[derive(Default, Clone)]
pub struct Reactions {
    reactions: HashMap<String, Vec<Reaction>>,
}

impl Reactions {
    pub fn new() -> Self {
        Self::default()
    }

    /// On `event_type` from the consumer's source service, do `reaction`.
    pub fn on(mut self, event_type: impl Into<String>, reaction: Reaction) -> Self {
        self.reactions
            .entry(event_type.into())
            .or_default()
            .push(reaction);
        self
    }
}

#[async_trait]
impl Handler for Reactions {
    fn event_types(&self) -> Option<BTreeSet<String>> {
        Some(self.reactions.keys().cloned().collect())
    }

    async fn handle(&self, message: &Message) -> Result<Vec<SqlStatement>, HandlerError> {
        let mut statements = Vec::new();
        for reaction in self
            .reactions
            .get(message.event.event_type.as_str())
            .into_iter()
            .flatten()
        {
            statements.extend(reaction(message.clone()).await?);
        }
        Ok(statements)
    }
}

/// What an event says of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mark {
    Done,
    Failed,
    Compensated,
}

impl Mark {
    fn as_str(self) -> &'static str {
        match self {
            Self::Done => "DONE",
            Self::Failed => "FAILED",
            Self::Compensated => "COMPENSATED",
        }
    }
}

/// A choreographed flow: its steps, and which event of which service marks each.
#[derive(Debug, Clone)]
pub struct Flow {
    pub name: String,
    /// The steps in order; the flow is complete when every one is done.
    pub steps: Vec<String>,
    /// (service, event type) → (step, mark).
    pub marks: HashMap<(String, String), (String, Mark)>,
    /// Where the correlation id is: the event's `correlation_id` metadata, else this
    /// field of its data.
    pub correlation_field: String,
    /// A flow not finished this long after its first event is stuck.
    pub deadline: Duration,
    /// The saga type of a [`crate::chain::Chain`] whose events mark the steps (the step
    /// is in their data), besides `marks`.
    pub chain: Option<String>,
}

impl Flow {
    pub fn new(
        name: impl Into<String>,
        correlation_field: impl Into<String>,
        deadline: Duration,
    ) -> Self {
        Self {
            name: name.into(),
            steps: Vec::new(),
            marks: HashMap::new(),
            correlation_field: correlation_field.into(),
            deadline,
            chain: None,
        }
    }

    /// Step `step`, marked by `event_type` of `service`.
    pub fn step(mut self, step: &str, service: &str, event_type: &str) -> Self {
        if !self.steps.iter().any(|s| s == step) {
            self.steps.push(step.to_owned());
        }
        self.mark(step, service, event_type, Mark::Done)
    }

    /// `event_type` of `service` marks `step` failed or compensated.
    pub fn mark(mut self, step: &str, service: &str, event_type: &str, mark: Mark) -> Self {
        self.marks.insert(
            (service.to_owned(), event_type.to_owned()),
            (step.to_owned(), mark),
        );
        self
    }
}

/// The bus handler of a tracker consumer (one per service of the flow).
#[derive(Debug, Clone)]
pub struct TrackerHandler {
    flow: Arc<Flow>,
}

impl TrackerHandler {
    pub fn new(flow: Arc<Flow>) -> Self {
        Self { flow }
    }
}

const TRACKER_SCHEMA: &str = "CREATE TABLE flow_steps (flow TEXT NOT NULL, correlation_id TEXT NOT NULL, \
     step TEXT NOT NULL, mark TEXT NOT NULL, at BIGINT NOT NULL, event_id TEXT NOT NULL, \
     PRIMARY KEY (flow, correlation_id, step, mark))";

impl TrackerHandler {
    /// The step `message` marks, and how.
    fn mark(&self, message: &Message) -> Result<Option<(String, Mark)>, HandlerError> {
        let event_type = message.event.event_type.as_str();
        if let (Some(saga_type), Some(mark)) = (&self.flow.chain, crate::chain::mark(event_type)) {
            let event: crate::chain::ChainEvent = message
                .event
                .data
                .decode()
                .map_err(|e| HandlerError::Permanent(format!("not a chain event: {e}")))?;
            return Ok((&event.saga_type == saga_type).then_some((event.step, mark)));
        }
        let key = (message.source.to_string(), event_type.to_owned());
        Ok(self.flow.marks.get(&key).cloned())
    }
}

#[async_trait]
impl Handler for TrackerHandler {
    fn schema(&self) -> Vec<String> {
        vec![TRACKER_SCHEMA.to_owned()]
    }

    fn event_types(&self) -> Option<BTreeSet<String>> {
        let mut types: BTreeSet<String> = self.flow.marks.keys().map(|(_, t)| t.clone()).collect();
        if self.flow.chain.is_some() {
            types.extend(crate::chain::EVENT_TYPES.iter().map(|t| (*t).to_owned()));
        }
        Some(types)
    }

    async fn handle(&self, message: &Message) -> Result<Vec<SqlStatement>, HandlerError> {
        let Some((step, mark)) = self.mark(message)? else {
            return Ok(Vec::new());
        };
        let correlation = match &message.event.metadata.correlation_id {
            Some(id) => Some(id.clone()),
            None => {
                let data: Value =
                    message.event.data.to_value().map_err(|e| {
                        HandlerError::Permanent(format!("the data is not JSON: {e}"))
                    })?;
                match data.get(&self.flow.correlation_field) {
                    Some(Value::String(id)) => Some(id.clone()),
                    Some(other) if !other.is_null() => Some(other.to_string()),
                    _ => None,
                }
            }
        };
        let Some(correlation) = correlation else {
            return Err(HandlerError::Permanent(format!(
                "{} has no correlation id (metadata or data.{})",
                message.event.event_type, self.flow.correlation_field
            )));
        };
        Ok(vec![
            SqlStatement::new(
                "INSERT INTO flow_steps (flow, correlation_id, step, mark, at, event_id) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (flow, correlation_id, step, mark) DO NOTHING",
            )
            .bind(self.flow.name.clone())
            .bind(correlation)
            .bind(step)
            .bind(mark.as_str())
            .bind(message.event.recorded_at.unix_micros())
            .bind(message.event.id.to_string()),
        ])
    }
}

/// Where a choreographed flow stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowStatus {
    pub correlation_id: String,
    /// COMPLETED; FAILED (a step failed; compensations may follow); COMPENSATED (failed,
    /// and the first step is undone: nothing is left to undo); IN_PROGRESS.
    pub status: &'static str,
    /// Each step's marks, with when they happened.
    pub steps: BTreeMap<String, Vec<(Mark, Timestamp)>>,
    pub started_at: Timestamp,
    pub updated_at: Timestamp,
    /// Not finished within the flow's deadline.
    pub stuck: bool,
}

/// Reads a flow's tracker consumers together.
pub struct Tracker {
    flow: Arc<Flow>,
    inboxes: Vec<Inbox>,
    clock: Arc<dyn Clock>,
}

impl Tracker {
    /// The tracker over `consumers` (the flow's tracker consumers, whose inboxes live in
    /// `models`).
    pub async fn open(
        flow: Arc<Flow>,
        models: Arc<dyn ReadModels>,
        consumers: &[ConsumerName],
        clock: Arc<dyn Clock>,
    ) -> Result<Self, BusError> {
        let mut inboxes = Vec::new();
        for consumer in consumers {
            inboxes.push(Inbox::existing(Arc::clone(&models), consumer, Arc::clone(&clock)).await?);
        }
        Ok(Self {
            flow,
            inboxes,
            clock,
        })
    }

    /// Every flow the trackers have seen, newest first.
    pub async fn flows(&self) -> Result<Vec<FlowStatus>, BusError> {
        let mut marks: BTreeMap<String, Vec<(String, Mark, Timestamp)>> = BTreeMap::new();
        for inbox in &self.inboxes {
            let rows = inbox
                .query(
                    SqlStatement::new(
                        "SELECT correlation_id, step, mark, at FROM flow_steps WHERE flow = $1",
                    )
                    .bind(self.flow.name.clone()),
                )
                .await?;
            for row in rows {
                let mark = match row.text("mark") {
                    Some("DONE") => Mark::Done,
                    Some("FAILED") => Mark::Failed,
                    _ => Mark::Compensated,
                };
                marks
                    .entry(row.text("correlation_id").unwrap_or_default().to_owned())
                    .or_default()
                    .push((
                        row.text("step").unwrap_or_default().to_owned(),
                        mark,
                        Timestamp::from_unix_micros(row.int("at").unwrap_or(0)),
                    ));
            }
        }
        let now = self.clock.now();
        let mut flows: Vec<FlowStatus> = marks
            .into_iter()
            .map(|(correlation_id, marks)| self.status(correlation_id, marks, now))
            .collect();
        flows.sort_by_key(|f| std::cmp::Reverse(f.started_at));
        let stuck = flows.iter().filter(|f| f.stuck).count();
        metrics::gauge!(names::SAGA_FLOWS_STUCK, names::LABEL_FLOW => self.flow.name.clone())
            .set(stuck as f64);
        for flow in flows.iter().filter(|f| f.stuck) {
            tracing::warn!(flow = %self.flow.name, correlation_id = %flow.correlation_id, "choreographed flow stuck past its deadline");
        }
        Ok(flows)
    }

    fn status(
        &self,
        correlation_id: String,
        marks: Vec<(String, Mark, Timestamp)>,
        now: Timestamp,
    ) -> FlowStatus {
        let started_at = marks.iter().map(|m| m.2).min().unwrap_or(now);
        let updated_at = marks.iter().map(|m| m.2).max().unwrap_or(now);
        let mut steps: BTreeMap<String, Vec<(Mark, Timestamp)>> = BTreeMap::new();
        for (step, mark, at) in marks {
            steps.entry(step).or_default().push((mark, at));
        }
        let failed = steps.values().flatten().any(|(m, _)| *m == Mark::Failed);
        let complete = self.flow.steps.iter().all(|step| {
            steps
                .get(step)
                .is_some_and(|marks| marks.iter().any(|(m, _)| *m == Mark::Done))
        });
        let first_undone = self.flow.steps.first().is_some_and(|step| {
            steps
                .get(step)
                .is_some_and(|marks| marks.iter().any(|(m, _)| *m == Mark::Compensated))
        });
        let status = if failed && first_undone {
            "COMPENSATED"
        } else if failed {
            "FAILED"
        } else if complete {
            "COMPLETED"
        } else {
            "IN_PROGRESS"
        };
        let stuck = status == "IN_PROGRESS" && now.duration_since(started_at) > self.flow.deadline;
        FlowStatus {
            correlation_id,
            status,
            steps,
            started_at,
            updated_at,
            stuck,
        }
    }
}
