//! The PostgreSQL event store: the same contract as the embedded store, for the
//! distributed mode (one database per service).
//!
//! - Appends go through one writer task and connection per store instance, which groups
//!   what is queued into one transaction (group commit, see [`writer`]).
//! - Global positions are gapless and follow commit order across processes: every write
//!   transaction locks the one-row position counter first (see [`writer`]).
//! - Reads use a connection pool; each read is one statement, so one snapshot.
//! - Commits `NOTIFY` the new head; a listening connection wakes this instance's
//!   subscribers when other processes write.
//! - The schema (default `eventyr`) is created and migrated on connect.
//!
//! The writer, listener and connection tasks are spawned on the current Tokio runtime
//! by [`PostgresStore::connect`] and end when the last clone of the store is dropped.

mod error;
mod listen;
mod read;
mod readmodel;
mod row;
mod schema;
mod writer;

use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use eventyr_core::{
    Clock, EventId, Limits, Position, RecordedEvent, StreamId, StreamVersion, SystemClock,
};
use eventyr_store::group::{GroupBounds, WriteRequest, submit};
use eventyr_store::plan::{WriteOp, WriteOutcome};
use eventyr_store::{
    AllSlice, AppendResult, EventStore, ExpectedVersion, NewSnapshot, ReadAll, ReadStream,
    Snapshot, StoreError, StreamAppend, StreamSlice, validate_appends, validate_snapshot,
};
use tokio::sync::{mpsc, watch};
use tokio_postgres::{Config, NoTls};

use crate::read::ReadSql;
pub use crate::readmodel::PostgresReadModels;
pub use crate::schema::SCHEMA_VERSION;
use crate::writer::Writer;

/// How to connect a [`PostgresStore`]. Plain data; [`PostgresOptions::new`] gives the
/// defaults.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// `postgres://user[:password]@host[:port]/database[?options]`.
    pub url: String,
    /// The schema holding the store's tables. Default `eventyr`.
    pub schema: String,
    pub limits: Limits,
    /// Stamps `recorded_at`.
    pub clock: Arc<dyn Clock>,
    /// The most writes one group commit takes. Default 1 024.
    pub batch_ops_max: usize,
    /// A group stops taking writes once it holds this many events. Default 16 384.
    pub batch_events_max: usize,
    /// Writes waiting for the writer; callers wait when it is full. Default 4 096.
    pub queue_ops_max: usize,
    /// Pooled read connections. Default 8.
    pub readers_max: usize,
}

impl PostgresOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "eventyr".into(),
            limits: Limits::default(),
            clock: Arc::new(SystemClock),
            batch_ops_max: 1024,
            batch_events_max: 16_384,
            queue_ops_max: 4096,
            readers_max: 8,
        }
    }
}

/// An event store in a PostgreSQL schema. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    requests: mpsc::Sender<WriteRequest>,
    pool: Pool,
    sql: ReadSql,
    head: Arc<watch::Sender<Position>>,
    limits: Limits,
    /// Dropped with the store: tells the listener to stop.
    _alive: watch::Sender<()>,
}

fn invalid_option(message: String) -> StoreError {
    StoreError::Unavailable {
        message,
        ambiguous: false,
        source: None,
    }
}

impl PostgresStore {
    /// Connects, migrates the schema and starts the writer and listener tasks.
    pub async fn connect(options: PostgresOptions) -> Result<Self, StoreError> {
        schema::check_name(&options.schema)?;
        if [
            options.batch_ops_max,
            options.batch_events_max,
            options.queue_ops_max,
            options.readers_max,
        ]
        .contains(&0)
        {
            return Err(invalid_option(
                "postgres store batch, queue and reader bounds must be at least 1".into(),
            ));
        }
        let mut config: Config = options
            .url
            .parse()
            .map_err(|e| invalid_option(format!("invalid postgres url: {e}")))?;
        // Cached (generic) plans are costed once, often while the tables are still
        // empty, and kept while they grow faster than autovacuum analyses them. Every
        // statement here has an index path and a bounded key range, so forbidding
        // sequential scans keeps those plans sane: measured, the writer's lookups had
        // turned into full scans (28 ms per group of 250 appends instead of 2).
        config.options("-c enable_seqscan=off");
        let (mut client, connection) = config.connect(NoTls).await.map_err(error::postgres)?;
        let driver = tokio::spawn(connection);
        schema::migrate(&mut client, &options.schema).await?;
        drop(client);
        let _ = driver.await;

        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.readers_max)
            .build()
            .map_err(|e| invalid_option(format!("postgres pool: {e}")))?;
        let sql = ReadSql::new(&options.schema);
        let start = read::head(&pool.get().await.map_err(error::pool)?, &sql).await?;
        let head = Arc::new(watch::Sender::new(start));

        let channel = format!("eventyr_{}", options.schema);
        let (requests, queue) = mpsc::channel(options.queue_ops_max);
        let bounds = GroupBounds {
            ops_max: options.batch_ops_max,
            events_max: options.batch_events_max,
        };
        let mut writer = Writer::new(
            config.clone(),
            options.schema.clone(),
            channel.clone(),
            options.clock,
            Arc::clone(&head),
            queue,
            bounds,
        );
        writer.connect().await?;
        tokio::spawn(writer.run());
        let (alive, alive_rx) = watch::channel(());
        tokio::spawn(listen::listen(
            config,
            channel,
            Arc::downgrade(&head),
            alive_rx,
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                requests,
                pool,
                sql,
                head,
                limits: options.limits,
                _alive: alive,
            }),
        })
    }

    async fn write(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        submit(&self.inner.requests, op).await
    }

    async fn reader(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.inner.pool.get().await.map_err(error::pool)
    }
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn append_atomic(
        &self,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<AppendResult>, StoreError> {
        validate_appends(&appends, &self.inner.limits)?;
        self.write(WriteOp::Append(appends)).await?.into_appended()
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        read: ReadStream,
    ) -> Result<StreamSlice, StoreError> {
        read::read_stream(&self.reader().await?, &self.inner.sql, stream, read).await
    }

    async fn read_all(&self, read: &ReadAll) -> Result<AllSlice, StoreError> {
        read::read_all(&self.reader().await?, &self.inner.sql, read).await
    }

    async fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
    ) -> Result<(), StoreError> {
        let op = WriteOp::delete(stream, expected);
        self.write(op).await.map(drop)
    }

    async fn truncate_stream(
        &self,
        stream: &StreamId,
        before: StreamVersion,
    ) -> Result<(), StoreError> {
        let op = WriteOp::truncate(stream, before);
        self.write(op).await.map(drop)
    }

    async fn read_event(&self, id: EventId) -> Result<Option<RecordedEvent>, StoreError> {
        read::read_event(&self.reader().await?, &self.inner.sql, id).await
    }

    async fn save_snapshot(&self, snapshot: NewSnapshot) -> Result<(), StoreError> {
        validate_snapshot(&snapshot, &self.inner.limits)?;
        self.write(WriteOp::SaveSnapshot(snapshot)).await.map(drop)
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        read::load_snapshot(&self.reader().await?, &self.inner.sql, stream).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        read::head(&self.reader().await?, &self.inner.sql).await
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.head.subscribe()
    }

    fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    fn writable(&self) -> Result<(), StoreError> {
        if self.inner.requests.is_closed() {
            return Err(StoreError::Closed);
        }
        Ok(())
    }
}

/// Drops a store's schema and everything in it. For benchmarks and tests that create
/// throwaway schemas in a database they do not own.
pub async fn drop_schema(url: &str, schema: &str) -> Result<(), StoreError> {
    schema::check_name(schema)?;
    let config: Config = url
        .parse()
        .map_err(|e| invalid_option(format!("invalid postgres url: {e}")))?;
    let (client, connection) = config.connect(NoTls).await.map_err(error::postgres)?;
    let driver = tokio::spawn(connection);
    let dropped = client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .map_err(error::postgres);
    drop(client);
    let _ = driver.await;
    dropped
}
