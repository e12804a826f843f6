//! A consumer's own database ([`Inbox`]): what makes each message's effect happen once
//! and in stream order, the consumer's dead letters, and the positions of transports
//! that read the producers' logs themselves.
//!
//! It is a read model (`inbox_<consumer>`) in a [`ReadModels`] store opened durably
//! (every commit flushed), beside the handler's own tables. Per producer stream it
//! keeps the version of the last message whose effect committed. A message's effect
//! commits in one transaction with the move of that version, guarded by the message's
//! ordering link: the move succeeds only if the stream's previous message is done and
//! this one is not. So a redelivery is recognised (and acknowledged without effect) and
//! a message that overtook its predecessor waits, whichever instance got either.
//!
//! Commits are grouped: concurrent commits of one consumer share one transaction and
//! one flush, each under its own savepoint.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use eventyr_core::{Clock, EventId, Position, StreamVersion, Timestamp};
use eventyr_store::StoreError;
use eventyr_store::readmodel::{Generation, ReadModels};
use eventyr_store::sql::{SqlRow, SqlStatement, SqlValue};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::error::BusError;
use crate::message::{ConsumerName, Message, ServiceName};
use crate::transport::Checkpoints;

/// The prefix of every inbox's model name.
pub const INBOX_PREFIX: &str = "inbox_";

const TABLES: [&str; 3] = [
    "CREATE TABLE eventyr_inbox (source TEXT NOT NULL, stream TEXT NOT NULL, \
     version BIGINT NOT NULL, event_id TEXT NOT NULL, handled_at BIGINT NOT NULL, \
     PRIMARY KEY (source, stream))",
    "CREATE TABLE eventyr_dead_letters (id TEXT PRIMARY KEY, event_id TEXT, source TEXT, \
     stream TEXT, version BIGINT, event_type TEXT, payload BYTEA NOT NULL, \
     error TEXT NOT NULL, attempts BIGINT NOT NULL, failed_at BIGINT NOT NULL, \
     status TEXT NOT NULL, replayed_at BIGINT)",
    "CREATE TABLE eventyr_bus_checkpoints (source TEXT PRIMARY KEY, position BIGINT NOT NULL)",
];

/// Where a message stands with this consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Its stream's previous message is done and it is not: handle it.
    Ready,
    /// Its effect has committed already: acknowledge it without effect.
    Duplicate,
    /// Its stream's previous message is not done yet: deliver it again later.
    Waiting,
}

impl Gate {
    /// Decides from the last version done for the stream (if any), the message's
    /// version and its ordering link.
    pub fn decide(
        done: Option<StreamVersion>,
        version: StreamVersion,
        previous: Option<StreamVersion>,
    ) -> Self {
        match (done, previous) {
            (Some(done), _) if done >= version => Self::Duplicate,
            (_, None) => Self::Ready,
            (Some(done), Some(previous)) if done >= previous => Self::Ready,
            _ => Self::Waiting,
        }
    }
}

/// The name of `consumer`'s inbox model.
pub fn inbox_model(consumer: &ConsumerName) -> String {
    format!("{INBOX_PREFIX}{consumer}")
}

/// The serving generation of a model that keeps one generation for ever, creating it
/// on first use. Safe when several instances start at once: one generation wins.
pub(crate) async fn open_model(
    models: &dyn ReadModels,
    name: &str,
    schema: &[String],
) -> Result<Generation, StoreError> {
    if let Some(generation) = models.current(name).await? {
        return Ok(generation);
    }
    let mine = models.create(name, schema).await?;
    let serving = models.adopt(name, mine).await?;
    if serving != mine {
        models.discard(name, mine).await?;
    }
    Ok(serving)
}

/// A consumer's database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Inbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    models: Arc<dyn ReadModels>,
    model: String,
    generation: Generation,
    clock: Arc<dyn Clock>,
    queue: Mutex<Vec<Queued>>,
    /// Held by the one caller that commits the queue.
    turn: tokio::sync::Mutex<()>,
}

type Queued = (Vec<SqlStatement>, oneshot::Sender<Result<(), StoreError>>);

impl Inbox {
    /// Opens `consumer`'s inbox, creating it with the handler's `schema` (its own
    /// tables) on first use.
    pub async fn open(
        models: Arc<dyn ReadModels>,
        consumer: &ConsumerName,
        schema: &[String],
        clock: Arc<dyn Clock>,
    ) -> Result<Self, BusError> {
        let model = inbox_model(consumer);
        let mut all: Vec<String> = TABLES.iter().map(|t| (*t).to_owned()).collect();
        all.extend_from_slice(schema);
        let generation = open_model(&*models, &model, &all).await?;
        Ok(Self::with(models, model, generation, clock))
    }

    /// Opens an existing inbox (an operator's tool): [`BusError::NotFound`] if
    /// `consumer` never ran here.
    pub async fn existing(
        models: Arc<dyn ReadModels>,
        consumer: &ConsumerName,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, BusError> {
        let model = inbox_model(consumer);
        let generation = models
            .current(&model)
            .await?
            .ok_or_else(|| BusError::NotFound {
                what: format!("consumer {consumer}"),
            })?;
        Ok(Self::with(models, model, generation, clock))
    }

    fn with(
        models: Arc<dyn ReadModels>,
        model: String,
        generation: Generation,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                models,
                model,
                generation,
                clock,
                queue: Mutex::new(Vec::new()),
                turn: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The consumers with an inbox in `models` (one that has started at least once).
    pub async fn consumers(models: &dyn ReadModels) -> Result<Vec<ConsumerName>, BusError> {
        Ok(models
            .list()
            .await?
            .into_iter()
            .filter(|info| info.current.is_some())
            .filter_map(|info| {
                let name = info.projection.strip_prefix(INBOX_PREFIX)?;
                ConsumerName::new(name).ok()
            })
            .collect())
    }

    fn now(&self) -> i64 {
        self.inner.clock.now().unix_micros()
    }

    /// Runs a query on the consumer's tables (the handler's and the inbox's).
    pub async fn query(&self, statement: SqlStatement) -> Result<Vec<SqlRow>, BusError> {
        Ok(self
            .inner
            .models
            .query(&self.inner.model, statement)
            .await?)
    }

    /// Where `message` stands (read outside any transaction: [`Inbox::commit`] checks
    /// again inside).
    pub async fn gate(&self, message: &Message) -> Result<Gate, BusError> {
        let rows = self
            .query(
                SqlStatement::new(
                    "SELECT version FROM eventyr_inbox WHERE source = $1 AND stream = $2",
                )
                .bind(message.source.as_str())
                .bind(message.event.stream_id.as_str()),
            )
            .await?;
        let done = rows
            .first()
            .and_then(|row| row.int("version"))
            .map(|v| StreamVersion(v.unsigned_abs()));
        Ok(Gate::decide(done, message.event.version, message.previous))
    }

    /// The statement that records `message` as done, for the transaction of its
    /// effect. It changes one row only if the message is still [`Gate::Ready`]
    /// (unless `forced`: then only if it is not done yet); otherwise its unit rolls
    /// back with [`StoreError::UnexpectedRowCount`].
    pub fn record(&self, message: &Message, forced: bool) -> SqlStatement {
        let event = &message.event;
        let base = |sql: &str| {
            SqlStatement::new(sql)
                .bind(message.source.as_str())
                .bind(event.stream_id.as_str())
                .bind(counter(event.version.0))
                .bind(event.id.to_string())
                .bind(self.now())
        };
        match message.previous {
            Some(previous) if !forced => base(
                "UPDATE eventyr_inbox SET version = $3, event_id = $4, handled_at = $5 \
                 WHERE source = $1 AND stream = $2 AND version >= $6 AND version < $3",
            )
            .bind(counter(previous.0)),
            _ => base(
                "INSERT INTO eventyr_inbox (source, stream, version, event_id, handled_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (source, stream) DO UPDATE SET \
                 version = excluded.version, event_id = excluded.event_id, \
                 handled_at = excluded.handled_at WHERE eventyr_inbox.version < excluded.version",
            ),
        }
        .expect_rows(1)
    }

    /// Commits `unit` in one transaction, grouped with the commits of other callers;
    /// returns once it is durable. A unit that fails (a refused statement, an unmet
    /// expectation) is rolled back alone.
    pub async fn commit(&self, unit: Vec<SqlStatement>) -> Result<(), StoreError> {
        let (sender, receiver) = oneshot::channel();
        lock(&self.inner.queue).push((unit, sender));
        {
            let _turn = self.inner.turn.lock().await;
            let queued = std::mem::take(&mut *lock(&self.inner.queue));
            if !queued.is_empty() {
                let (units, senders): (Vec<_>, Vec<_>) = queued.into_iter().unzip();
                let results = self
                    .inner
                    .models
                    .execute(&self.inner.model, self.inner.generation, units)
                    .await;
                match results {
                    Ok(results) => {
                        for (sender, result) in senders.into_iter().zip(results) {
                            let _ = sender.send(result);
                        }
                    }
                    Err(error) => {
                        for sender in senders {
                            let _ = sender.send(Err(error.clone()));
                        }
                    }
                }
            }
        }
        // A cancelled committer drops the sender: the outcome is unknown, as for a
        // lost commit answer. The message is not acknowledged and comes again.
        receiver.await.unwrap_or(Err(StoreError::Closed))
    }

    /// The statement that moves a message to the dead letters (once: a second move of
    /// the same message keeps the first record).
    pub fn dead_letter(&self, letter: &NewDeadLetter) -> SqlStatement {
        let event = letter.message.as_ref().map(|m| &m.event);
        SqlStatement::new(
            "INSERT INTO eventyr_dead_letters (id, event_id, source, stream, version, \
             event_type, payload, error, attempts, failed_at, status) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'dead') \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(letter.id())
        .bind(event.map(|e| e.id.to_string()))
        .bind(letter.message.as_ref().map(|m| m.source.to_string()))
        .bind(event.map(|e| e.stream_id.to_string()))
        .bind(event.map(|e| counter(e.version.0)))
        .bind(event.map(|e| e.event_type.to_string()))
        .bind(letter.payload.to_vec())
        .bind(letter.error.clone())
        .bind(i64::from(letter.attempts))
        .bind(self.now())
    }

    /// Dead letters, oldest failure first, optionally only those in `status`.
    pub async fn dead_letters(
        &self,
        status: Option<DeadLetterStatus>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BusError> {
        let mut statement = String::from(
            "SELECT id, event_id, source, stream, version, event_type, payload, error, \
             attempts, failed_at, status, replayed_at FROM eventyr_dead_letters",
        );
        let mut params = Vec::new();
        if let Some(status) = status {
            statement.push_str(" WHERE status = $1");
            params.push(SqlValue::from(status.as_str()));
        }
        statement.push_str(&format!(" ORDER BY failed_at, id LIMIT {}", limit.max(1)));
        let rows = self
            .query(SqlStatement::with_params(statement, params))
            .await?;
        rows.iter().map(DeadLetter::from_row).collect()
    }

    /// Dead letters that wait for an operator or a replay.
    pub async fn unresolved(&self) -> Result<u64, BusError> {
        let rows = self
            .query(SqlStatement::new(
                "SELECT count(*) AS n FROM eventyr_dead_letters WHERE status <> 'replayed'",
            ))
            .await?;
        Ok(rows
            .first()
            .and_then(|r| r.int("n"))
            .unwrap_or(0)
            .unsigned_abs())
    }

    /// Asks the running consumer to handle dead letters again: `id`, or every dead
    /// one. Returns how many were queued; a running instance replays them within its
    /// replay poll.
    pub async fn request_replay(&self, id: Option<&str>) -> Result<u64, BusError> {
        let ids: Vec<String> = match id {
            Some(id) => vec![id.to_owned()],
            None => self
                .query(SqlStatement::new(
                    "SELECT id FROM eventyr_dead_letters WHERE status = 'dead'",
                ))
                .await?
                .iter()
                .filter_map(|r| r.text("id").map(str::to_owned))
                .collect(),
        };
        let units = ids
            .iter()
            .map(|id| {
                vec![
                    SqlStatement::new(
                        "UPDATE eventyr_dead_letters SET status = 'replay' \
                         WHERE id = $1 AND status = 'dead'",
                    )
                    .bind(id.as_str())
                    .expect_rows(1),
                ]
            })
            .collect();
        let results = self
            .inner
            .models
            .execute(&self.inner.model, self.inner.generation, units)
            .await?;
        let queued = results.iter().filter(|r| r.is_ok()).count() as u64;
        if let (Some(id), 0) = (id, queued) {
            return Err(BusError::NotFound {
                what: format!("dead letter {id} (or it is not dead)"),
            });
        }
        Ok(queued)
    }

    /// The statement that marks a replayed dead letter done, for the transaction of
    /// its effect; it changes no row (and so rolls its unit back) if another instance
    /// replayed it first.
    pub fn replayed(&self, id: &str) -> SqlStatement {
        SqlStatement::new(
            "UPDATE eventyr_dead_letters SET status = 'replayed', replayed_at = $2 \
             WHERE id = $1 AND status = 'replay'",
        )
        .bind(id)
        .bind(self.now())
        .expect_rows(1)
    }

    /// Puts a dead letter whose replay failed back among the dead, with the new error.
    pub async fn replay_failed(
        &self,
        id: &str,
        error: &str,
        attempts: u32,
    ) -> Result<(), BusError> {
        let unit = vec![
            SqlStatement::new(
                "UPDATE eventyr_dead_letters SET status = 'dead', error = $2, \
                 attempts = attempts + $3, failed_at = $4 WHERE id = $1 AND status = 'replay'",
            )
            .bind(id)
            .bind(error)
            .bind(i64::from(attempts))
            .bind(self.now()),
        ];
        Ok(self.commit(unit).await?)
    }
}

#[async_trait]
impl Checkpoints for Inbox {
    async fn load(&self, source: &ServiceName) -> Result<Position, BusError> {
        let rows = self
            .query(
                SqlStatement::new("SELECT position FROM eventyr_bus_checkpoints WHERE source = $1")
                    .bind(source.as_str()),
            )
            .await?;
        Ok(Position(
            rows.first()
                .and_then(|r| r.int("position"))
                .unwrap_or(0)
                .unsigned_abs(),
        ))
    }

    async fn save(&self, source: &ServiceName, position: Position) -> Result<(), BusError> {
        let unit = vec![
            SqlStatement::new(
                "INSERT INTO eventyr_bus_checkpoints (source, position) VALUES ($1, $2) \
                 ON CONFLICT (source) DO UPDATE SET position = excluded.position \
                 WHERE eventyr_bus_checkpoints.position < excluded.position",
            )
            .bind(source.as_str())
            .bind(counter(position.0)),
        ];
        Ok(self.commit(unit).await?)
    }
}

/// A message on its way to the dead letters.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    /// The message, if it could be decoded.
    pub message: Option<Message>,
    /// The bytes as they arrived (or as encoded, for a decoded delivery).
    pub payload: Bytes,
    pub error: String,
    pub attempts: u32,
}

impl NewDeadLetter {
    /// The dead letter's id: the event id, or for a message that could not be decoded
    /// a UUIDv5 of its bytes, so that moving the same message twice keeps one record.
    pub fn id(&self) -> String {
        match &self.message {
            Some(message) => message.event.id.to_string(),
            None => uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &self.payload).to_string(),
        }
    }
}

/// Where a dead letter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterStatus {
    /// Waiting for an operator.
    Dead,
    /// Queued for a replay by the running consumer.
    Replay,
    /// Replayed: its effect has committed.
    Replayed,
}

impl DeadLetterStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dead => "dead",
            Self::Replay => "replay",
            Self::Replayed => "replayed",
        }
    }

    fn parse(text: &str) -> Result<Self, BusError> {
        match text {
            "dead" => Ok(Self::Dead),
            "replay" => Ok(Self::Replay),
            "replayed" => Ok(Self::Replayed),
            other => Err(StoreError::corrupt(format!("dead letter status {other:?}")).into()),
        }
    }
}

/// A message a consumer gave up on, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub event_id: Option<EventId>,
    pub source: Option<String>,
    pub stream: Option<String>,
    pub version: Option<u64>,
    pub event_type: Option<String>,
    #[serde(skip)]
    pub payload: Bytes,
    pub error: String,
    pub attempts: u32,
    pub failed_at: Timestamp,
    pub status: DeadLetterStatus,
    pub replayed_at: Option<Timestamp>,
}

impl DeadLetter {
    fn from_row(row: &SqlRow) -> Result<Self, BusError> {
        let text = |c: &str| row.text(c).map(str::to_owned);
        let corrupt = |c: &str| BusError::from(StoreError::corrupt(format!("dead letter {c}")));
        Ok(Self {
            id: text("id").ok_or_else(|| corrupt("id"))?,
            event_id: row.text("event_id").and_then(|t| EventId::parse(t).ok()),
            source: text("source"),
            stream: text("stream"),
            version: row.int("version").map(i64::unsigned_abs),
            event_type: text("event_type"),
            payload: row
                .get("payload")
                .and_then(SqlValue::as_bytes)
                .map(Bytes::copy_from_slice)
                .ok_or_else(|| corrupt("payload"))?,
            error: text("error").unwrap_or_default(),
            attempts: row
                .int("attempts")
                .and_then(|a| u32::try_from(a).ok())
                .unwrap_or(0),
            failed_at: Timestamp::from_unix_micros(row.int("failed_at").unwrap_or(0)),
            status: DeadLetterStatus::parse(row.text("status").unwrap_or_default())?,
            replayed_at: row.int("replayed_at").map(Timestamp::from_unix_micros),
        })
    }
}

fn counter(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_keeps_each_stream_in_order_and_once() {
        let v = StreamVersion;
        assert_eq!(Gate::decide(None, v(0), None), Gate::Ready);
        assert_eq!(Gate::decide(None, v(5), None), Gate::Ready, "no link");
        assert_eq!(Gate::decide(None, v(5), Some(v(4))), Gate::Waiting);
        assert_eq!(Gate::decide(Some(v(3)), v(5), Some(v(4))), Gate::Waiting);
        assert_eq!(Gate::decide(Some(v(4)), v(5), Some(v(4))), Gate::Ready);
        assert_eq!(Gate::decide(Some(v(5)), v(5), Some(v(4))), Gate::Duplicate);
        assert_eq!(Gate::decide(Some(v(9)), v(5), None), Gate::Duplicate);
    }
}
