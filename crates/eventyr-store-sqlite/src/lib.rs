//! The embedded event store: one SQLite file in WAL mode.
//!
//! Appends go through one writer thread per store instance, which groups whatever is
//! queued into one transaction (group commit, see [`writer`]), and a syncer thread
//! that flushes the WAL and only then acknowledges (see [`syncer`]): the next group is
//! written while the previous one is flushed. An append is acknowledged only after it
//! is durable, and readers in this process never see an event of ours before it is
//! durable (see [`durability`]). Reads use a small pool of read-only connections.
//! Several processes may open the same file: SQLite's write lock serialises their
//! writers, so positions stay gapless and in commit order across them. (Another
//! process can see our commit up to one flush, ~0.1 ms, before it is durable.)

mod durability;
mod error;
mod read;
mod readmodel;
mod row;
mod schema;
mod syncer;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eventyr_core::{
    Clock, EventId, Limits, Position, RecordedEvent, StreamId, StreamVersion, SystemClock,
};
use eventyr_store::group::{GroupBounds, WriteRequest, submit};
use eventyr_store::plan::{WriteOp, WriteOutcome};
use eventyr_store::{
    AllSlice, AppendResult, EventStore, ExpectedVersion, NewSnapshot, ReadAll, ReadStream,
    Snapshot, StoreError, StreamAppend, StreamSlice, validate_appends, validate_snapshot,
};
use rusqlite::Connection;
use tokio::sync::{mpsc, watch};

use crate::durability::Durability;
use crate::read::Readers;
pub use crate::readmodel::SqliteReadModels;
pub use crate::schema::SCHEMA_VERSION;
use crate::syncer::Syncer;
use crate::writer::Writer;

/// How to open a [`SqliteStore`]. Plain data; [`SqliteOptions::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The database file; created with its directory if missing.
    pub path: PathBuf,
    pub limits: Limits,
    /// Stamps `recorded_at`.
    pub clock: Arc<dyn Clock>,
    /// The most writes one group commit takes. Default 1 024.
    pub batch_ops_max: usize,
    /// A group stops taking writes once it holds this many events. Default 16 384.
    pub batch_events_max: usize,
    /// Writes waiting for the writer; callers wait when it is full. Default 4 096.
    pub queue_ops_max: usize,
    /// Concurrent reads (pooled read-only connections). Default 4.
    pub readers_max: usize,
    /// How long to wait for another process's lock before failing. Default 5 000 ms.
    pub busy_timeout_ms: u64,
}

impl SqliteOptions {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            limits: Limits::default(),
            clock: Arc::new(SystemClock),
            batch_ops_max: 1024,
            batch_events_max: 16_384,
            queue_ops_max: 4096,
            readers_max: 4,
            busy_timeout_ms: 5000,
        }
    }

    fn validate(&self) -> Result<(), StoreError> {
        let positive = [
            ("batch_ops_max", self.batch_ops_max),
            ("batch_events_max", self.batch_events_max),
            ("queue_ops_max", self.queue_ops_max),
            ("readers_max", self.readers_max),
        ];
        match positive.iter().find(|(_, value)| *value == 0) {
            Some((name, _)) => Err(StoreError::Unavailable {
                message: format!("sqlite store option {name} must be at least 1"),
                ambiguous: false,
                source: None,
            }),
            None => Ok(()),
        }
    }
}

/// An event store in one SQLite file. Cheap to clone; the writer thread stops when the
/// last clone is dropped, after finishing the writes it has queued.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    requests: mpsc::Sender<WriteRequest>,
    readers: Arc<Readers>,
    head: Arc<watch::Sender<Position>>,
    durability: Arc<Durability>,
    limits: Limits,
    path: PathBuf,
}

/// Committed groups that may wait for the syncer before the writer waits too.
const SYNC_QUEUE_GROUPS: usize = 64;

/// Opens the write connection, brings the schema up to date, and reads the head.
fn open_writer_connection(
    path: &Path,
    busy_timeout: Duration,
) -> Result<(Connection, Position), StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::unavailable(format!("cannot create directory {}", dir.display()), e)
        })?;
    }
    let mut conn = Connection::open(path).map_err(error::sqlite)?;
    schema::configure(&conn, busy_timeout)?;
    schema::configure_writer(&conn)?;
    schema::migrate(&mut conn)?;
    conn.set_prepared_statement_cache_capacity(32);
    let next_position: i64 = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'next_position'",
            [],
            |r| r.get(0),
        )
        .map_err(error::sqlite)?;
    Ok((
        conn,
        Position(u64::try_from(next_position - 1).unwrap_or_default()),
    ))
}

/// Opens the WAL file for the syncer, and makes its directory entry durable.
fn open_wal(path: &Path) -> Result<std::fs::File, StoreError> {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let file = std::fs::File::open(&wal).map_err(|e| {
        StoreError::unavailable(
            format!("cannot open the WAL {}", Path::new(&wal).display()),
            e,
        )
    })?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| {
            StoreError::unavailable(format!("cannot sync directory {}", dir.display()), e)
        })?;
    Ok(file)
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map(drop)
        .map_err(|e| StoreError::unavailable(format!("cannot start the {name} thread"), e))
}

impl SqliteStore {
    /// Opens (creating or migrating) the store and starts its writer and syncer
    /// threads.
    pub fn open(options: SqliteOptions) -> Result<Self, StoreError> {
        options.validate()?;
        let busy_timeout = Duration::from_millis(options.busy_timeout_ms);
        let (conn, head) = open_writer_connection(&options.path, busy_timeout)?;
        let wal = open_wal(&options.path)?;
        let durability = Arc::new(Durability::new(head));
        let head = Arc::new(watch::Sender::new(head));
        let (to_syncer, committed) = std::sync::mpsc::sync_channel(SYNC_QUEUE_GROUPS);
        let syncer = Syncer {
            wal,
            groups: committed,
            durability: Arc::clone(&durability),
            head: Arc::clone(&head),
        };
        let (requests, queue) = mpsc::channel(options.queue_ops_max);
        let writer = Writer {
            conn,
            clock: options.clock,
            requests: queue,
            bounds: GroupBounds {
                ops_max: options.batch_ops_max,
                events_max: options.batch_events_max,
            },
            durability: Arc::clone(&durability),
            syncer: to_syncer,
        };
        spawn("eventyr-sqlite-syncer", move || syncer.run())?;
        spawn("eventyr-sqlite-writer", move || writer.run())?;
        let readers = Readers::new(options.path.clone(), busy_timeout, options.readers_max);
        Ok(Self {
            inner: Arc::new(Inner {
                requests,
                readers: Arc::new(readers),
                head,
                durability,
                limits: options.limits,
                path: options.path,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn write(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        submit(&self.inner.requests, op).await
    }
}

#[async_trait]
impl EventStore for SqliteStore {
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
        let stream = stream.clone();
        let slice = self
            .inner
            .readers
            .run(move |conn| read::read_stream(conn, &stream, read))
            .await?;
        let newest = slice
            .events
            .iter()
            .map(|e| e.position)
            .max()
            .unwrap_or_default();
        self.inner.durability.wait_for(newest).await?;
        Ok(slice)
    }

    async fn read_all(&self, read: &ReadAll) -> Result<AllSlice, StoreError> {
        let read = read.clone();
        let slice = self
            .inner
            .readers
            .run(move |conn| read::read_all(conn, &read))
            .await?;
        let newest = slice
            .events
            .last()
            .map_or(slice.head, |e| e.position.max(slice.head));
        self.inner.durability.wait_for(newest).await?;
        Ok(slice)
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
        let event = self
            .inner
            .readers
            .run(move |conn| read::read_event(conn, id))
            .await?;
        if let Some(event) = &event {
            self.inner.durability.wait_for(event.position).await?;
        }
        Ok(event)
    }

    async fn save_snapshot(&self, snapshot: NewSnapshot) -> Result<(), StoreError> {
        validate_snapshot(&snapshot, &self.inner.limits)?;
        self.write(WriteOp::SaveSnapshot(snapshot)).await.map(drop)
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let stream = stream.clone();
        self.inner
            .readers
            .run(move |conn| read::load_snapshot(conn, &stream))
            .await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        let slice = self.read_all(&ReadAll::from(Position(u64::MAX))).await?;
        Ok(slice.head)
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.head.subscribe()
    }

    fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    fn writable(&self) -> Result<(), StoreError> {
        self.inner.durability.check()?;
        if self.inner.requests.is_closed() {
            return Err(StoreError::Closed);
        }
        Ok(())
    }
}
