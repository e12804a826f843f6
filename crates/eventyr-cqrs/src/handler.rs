//! [`CommandHandler`]: load an aggregate (snapshot + later events), decide, append with
//! the exact expected version; on a conflict reload and decide again, with backoff.

use std::marker::PhantomData;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use eventyr_core::{
    Json, Metadata, NewEvent, RecordedEvent, RetryPolicy, StreamId, StreamVersion, ValidationError,
};
use eventyr_store::{
    AppendResult, EventStore, ExpectedVersion, NewSnapshot, ReadStream, StoreError, StreamAppend,
};
use eventyr_telemetry::names;
use lru::LruCache;

use crate::aggregate::Aggregate;
use crate::command::{Command, CommandError, CommandId, CommandOutcome};
use crate::event::DomainEvent;
use crate::upcast::Upcasters;

/// How a [`CommandHandler`] behaves. Plain data.
#[derive(Debug, Clone)]
pub struct HandlerOptions {
    /// Attempts and backoff on version conflicts. Default: 3 attempts from 100 ms.
    pub retry: RetryPolicy,
    /// Save a snapshot each time the stream crosses a multiple of this many events.
    /// `None` (the default) takes no snapshots.
    pub snapshot_every: Option<u64>,
    /// Events per read while loading. Default 1 000.
    pub read_batch: usize,
    /// Seeds the backoff jitter, for reproducible tests. Default: random.
    pub rng_seed: Option<u64>,
    /// Aggregates kept in memory between commands (least recently used evicted). A
    /// cached aggregate is used with its exact version, so a stale one (another process
    /// wrote) only costs a version conflict and a reload. 0 disables. Default 10 000.
    pub cache_capacity: usize,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::COMMANDS,
            snapshot_every: None,
            read_batch: 1000,
            rng_seed: None,
            cache_capacity: 10_000,
        }
    }
}

/// An aggregate as loaded from the store.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    pub state: A,
    /// The stream's version; `None` for an aggregate that does not exist yet.
    pub version: Option<StreamVersion>,
    /// The version of the snapshot loading started from, if one was used.
    pub snapshot: Option<StreamVersion>,
    /// Events applied on top of the snapshot (or of the empty state).
    pub replayed: usize,
}

/// The events of one command met while loading: the first and last of them.
type Handled = Option<(RecordedEvent, RecordedEvent)>;

/// Handles the commands of one aggregate type against one store. Cheap to share.
#[derive(Debug)]
pub struct CommandHandler<A: Aggregate> {
    store: Arc<dyn EventStore>,
    upcasters: Arc<Upcasters>,
    options: HandlerOptions,
    rng: Mutex<fastrand::Rng>,
    cache: Option<Mutex<LruCache<StreamId, Loaded<A>>>>,
    aggregate: PhantomData<fn() -> A>,
}

type Failure<A> = CommandError<<A as Aggregate>::Error>;

impl<A: Aggregate> CommandHandler<A> {
    pub fn new(
        store: Arc<dyn EventStore>,
        upcasters: Arc<Upcasters>,
        options: HandlerOptions,
    ) -> Self {
        let rng = options
            .rng_seed
            .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
        let cache = NonZeroUsize::new(options.cache_capacity)
            .map(|capacity| Mutex::new(LruCache::new(capacity)));
        Self {
            store,
            upcasters,
            options,
            rng: Mutex::new(rng),
            cache,
            aggregate: PhantomData,
        }
    }

    /// The stream of the aggregate `aggregate_id`, which must be non-empty (the rest of
    /// the rules are the stream id's: bounded and printable).
    pub fn stream(aggregate_id: &str) -> Result<StreamId, Failure<A>> {
        if aggregate_id.is_empty() {
            return Err(ValidationError::Empty {
                field: "aggregate_id",
            }
            .into());
        }
        Ok(StreamId::new(format!("{}-{aggregate_id}", A::KIND))?)
    }

    /// Handles a command: once, whatever happens to its retries.
    pub async fn execute(
        &self,
        command: Command<A::Command>,
    ) -> Result<CommandOutcome, Failure<A>> {
        let started = Instant::now();
        let result = self.run(&command).await;
        let outcome = match &result {
            Ok(done) if done.duplicate => "duplicate",
            Ok(_) => "ok",
            Err(CommandError::Rejected(_)) => "rejected",
            Err(CommandError::Conflict { .. }) => "conflict",
            Err(_) => "error",
        };
        let labels = [
            (names::LABEL_AGGREGATE, A::KIND),
            (names::LABEL_COMMAND, A::command_name(&command.body)),
        ];
        metrics::histogram!(names::COMMAND_DURATION_SECONDS, &labels)
            .record(started.elapsed().as_secs_f64());
        let with_outcome = [labels[0], labels[1], (names::LABEL_OUTCOME, outcome)];
        metrics::counter!(names::COMMANDS_TOTAL, &with_outcome).increment(1);
        result
    }

    async fn run(&self, command: &Command<A::Command>) -> Result<CommandOutcome, Failure<A>> {
        let stream = Self::stream(&command.aggregate_id)?;
        let mut attempt = 1;
        loop {
            let cached = self.cache_take(&stream);
            let from_cache = cached.is_some();
            let loaded = match cached {
                Some(loaded) => loaded,
                None => {
                    // A repeated command is found on the way: its events are in the
                    // stream tail that loading reads, or the append below meets its ids.
                    let (loaded, handled) = self.load_stream(&stream, Some(&command.id)).await?;
                    if let Some((first, last)) = handled {
                        self.cache_put(&stream, loaded);
                        return Ok(duplicate(&stream, &first, &last));
                    }
                    loaded
                }
            };
            // A rejection or a no-op may be a repeated command whose events this state
            // already includes (before a snapshot, or in a cached state): only then is
            // it worth looking its id up.
            let events = match loaded.state.handle(&command.body) {
                Ok(events) if !events.is_empty() => events,
                decided => {
                    let version = loaded.version;
                    self.cache_put(&stream, loaded);
                    if let Some(original) = self.find_handled(&stream, &command.id).await? {
                        return Ok(original);
                    }
                    decided.map_err(CommandError::Rejected)?;
                    return Ok(CommandOutcome {
                        stream,
                        events: 0,
                        stream_version: version,
                        positions: None,
                        duplicate: false,
                        attempts: attempt,
                    });
                }
            };
            let expected = loaded
                .version
                .map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
            let first_version = loaded.version.map_or(StreamVersion(0), StreamVersion::next);
            let append =
                StreamAppend::new(stream.clone(), expected, self.encode(command, &events)?);
            match self.store.append(append).await {
                // The store recognised the events as stored already: the command was
                // handled before, with the same outcome.
                Ok(result) if result.first_version < first_version => {
                    self.cache_put(&stream, loaded);
                    let mut outcome = outcome(&result, events.len(), attempt);
                    outcome.duplicate = true;
                    return Ok(outcome);
                }
                Ok(result) => {
                    let before = loaded.version;
                    let mut after = loaded;
                    for event in &events {
                        after.state.apply(event);
                    }
                    after.version = Some(result.last_version);
                    self.snapshot_if_due(&after.state, before, &result).await;
                    self.cache_put(&stream, after);
                    return Ok(outcome(&result, events.len(), attempt));
                }
                // A cached state was stale (another process wrote): reload and decide
                // again at once; this is not contention.
                Err(StoreError::WrongExpectedVersion { .. }) if from_cache => {}
                // Another writer got there first (possibly this very command, retried
                // elsewhere): decide again on the newer state.
                Err(StoreError::WrongExpectedVersion { .. }) => {
                    metrics::counter!(names::COMMAND_CONFLICTS_TOTAL, names::LABEL_AGGREGATE => A::KIND).increment(1);
                    if let Some(original) = self.find_handled(&stream, &command.id).await? {
                        return Ok(original);
                    }
                    if !self.options.retry.allows(attempt + 1) {
                        return Err(CommandError::Conflict {
                            stream,
                            attempts: attempt,
                        });
                    }
                    let random = self
                        .rng
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .f64();
                    tokio::time::sleep(self.options.retry.delay(attempt, random)).await;
                    metrics::counter!(names::COMMAND_RETRIES_TOTAL, names::LABEL_AGGREGATE => A::KIND).increment(1);
                    attempt += 1;
                }
                // The command's event ids are stored with other content: it was handled
                // before, on another state.
                Err(StoreError::IdempotencyConflict { .. }) => {
                    return match self.find_handled(&stream, &command.id).await? {
                        Some(original) => Ok(original),
                        None => Err(CommandError::Store(StoreError::corrupt(
                            "a command's event ids are stored but cannot be found",
                        ))),
                    };
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Takes a cached aggregate out of the cache (a concurrent command on it in this
    /// process then loads it from the store).
    fn cache_take(&self, stream: &StreamId) -> Option<Loaded<A>> {
        let cache = self.cache.as_ref()?;
        cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop(stream)
    }

    /// Caches an aggregate, unless a newer version of it is cached already.
    fn cache_put(&self, stream: &StreamId, loaded: Loaded<A>) {
        let Some(cache) = &self.cache else { return };
        let mut cache = cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache
            .peek(stream)
            .is_none_or(|cached| cached.version <= loaded.version)
        {
            cache.put(stream.clone(), loaded);
        }
    }

    /// Loads an aggregate: its newest compatible snapshot, then the events after it.
    pub async fn load(&self, aggregate_id: &str) -> Result<Loaded<A>, Failure<A>> {
        let (loaded, _) = self.load_stream(&Self::stream(aggregate_id)?, None).await?;
        Ok(loaded)
    }

    /// Loads a stream; with `command`, also notes that command's events if met.
    async fn load_stream(
        &self,
        stream: &StreamId,
        command: Option<&CommandId>,
    ) -> Result<(Loaded<A>, Handled), Failure<A>> {
        let first_id = command.map(|c| c.event_id(0));
        let mut handled: Handled = None;
        let mut loaded = Loaded {
            state: A::default(),
            version: None,
            snapshot: None,
            replayed: 0,
        };
        if self.options.snapshot_every.is_some()
            && let Some(snapshot) = self.store.load_snapshot(stream).await?
            && snapshot.schema_version == A::SNAPSHOT_SCHEMA
            && let Ok(state) = snapshot.data.decode::<A>()
        {
            loaded.state = state;
            loaded.version = Some(snapshot.version);
            loaded.snapshot = Some(snapshot.version);
        }
        let mut read =
            ReadStream::forwards(loaded.version.map_or(StreamVersion(0), StreamVersion::next))
                .limit(self.options.read_batch);
        loop {
            let slice = self.store.read_stream(stream, read).await?;
            for recorded in slice.events.iter().cloned() {
                match (&mut handled, command) {
                    (None, _) if Some(recorded.id) == first_id => {
                        handled = Some((recorded.clone(), recorded.clone()))
                    }
                    (Some((first, last)), Some(command))
                        if last.version.next() == recorded.version
                            && recorded.id
                                == command.event_id(
                                    usize::try_from(recorded.version.0 - first.version.0)
                                        .unwrap_or(usize::MAX),
                                ) =>
                    {
                        *last = recorded.clone();
                    }
                    _ => {}
                }
                let recorded = self.upcasters.upcast(recorded)?;
                let event = A::Event::from_stored(&recorded.event_type, &recorded.data)?;
                loaded.state.apply(&event);
                loaded.replayed += 1;
                read.from = recorded.version.next();
            }
            // The stream's own version, so that an append expects exactly what is stored.
            loaded.version = slice.stream_version.or(loaded.version);
            if slice.is_end || slice.events.is_empty() {
                return Ok((loaded, handled));
            }
        }
    }

    /// The original outcome if a command with this id was handled before.
    async fn find_handled(
        &self,
        stream: &StreamId,
        id: &CommandId,
    ) -> Result<Option<CommandOutcome>, Failure<A>> {
        let Some(first) = self.store.read_event(id.event_id(0)).await? else {
            return Ok(None);
        };
        if first.stream_id != *stream {
            return Err(CommandError::CommandIdReused {
                command_id: id.clone(),
                stream: first.stream_id,
            });
        }
        let mut last = first.clone();
        let mut read = ReadStream::forwards(first.version.next()).limit(self.options.read_batch);
        'pages: loop {
            let slice = self.store.read_stream(stream, read).await?;
            for event in &slice.events {
                let index =
                    usize::try_from(event.version.0 - first.version.0).unwrap_or(usize::MAX);
                if event.id != id.event_id(index) {
                    break 'pages;
                }
                last = event.clone();
                read.from = event.version.next();
            }
            if slice.is_end || slice.events.is_empty() {
                break;
            }
        }
        Ok(Some(duplicate(stream, &first, &last)))
    }

    /// The command's events as the store takes them: deterministic ids, current schema
    /// versions, the command's correlation and the command as their cause.
    fn encode(
        &self,
        command: &Command<A::Command>,
        events: &[A::Event],
    ) -> Result<Vec<NewEvent>, Failure<A>> {
        let metadata = Metadata {
            correlation_id: Some(
                command
                    .correlation_id
                    .clone()
                    .unwrap_or_else(|| command.id.to_string()),
            ),
            causation_id: Some(command.id.to_string()),
            // A command without a trace of its own continues the one it runs in.
            traceparent: command
                .traceparent
                .clone()
                .or_else(eventyr_telemetry::trace::current_traceparent),
            user_id: command.user_id.clone(),
        };
        events
            .iter()
            .enumerate()
            .map(|(index, event)| {
                let (event_type, data) = event.to_stored()?;
                let schema_version = self.upcasters.current_version(event_type.as_str());
                Ok(NewEvent::new(event_type, data)
                    .with_id(command.id.event_id(index))
                    .with_schema_version(schema_version)
                    .with_metadata(metadata.clone()))
            })
            .collect()
    }

    /// Saves a snapshot of `state` when the append crossed a multiple of
    /// `snapshot_every` (from `before`, the version it was decided on). A failure costs
    /// only a slower load later, so it is counted, not returned.
    async fn snapshot_if_due(
        &self,
        state: &A,
        before: Option<StreamVersion>,
        result: &AppendResult,
    ) {
        let Some(every) = self.options.snapshot_every.filter(|every| *every > 0) else {
            return;
        };
        if before.map_or(0, |v| v.0 + 1) / every == (result.last_version.0 + 1) / every {
            return;
        }
        let saved = match Json::encode(state) {
            Ok(data) => {
                let snapshot = NewSnapshot {
                    stream: result.stream.clone(),
                    version: result.last_version,
                    schema_version: A::SNAPSHOT_SCHEMA,
                    data,
                };
                self.store.save_snapshot(snapshot).await.is_ok()
            }
            Err(_) => false,
        };
        let outcome = if saved { "ok" } else { "error" };
        metrics::counter!(names::SNAPSHOTS_TOTAL, names::LABEL_AGGREGATE => A::KIND, names::LABEL_OUTCOME => outcome)
            .increment(1);
    }
}

/// The outcome of a command handled before, from its first and last events.
fn duplicate(stream: &StreamId, first: &RecordedEvent, last: &RecordedEvent) -> CommandOutcome {
    CommandOutcome {
        stream: stream.clone(),
        events: usize::try_from(last.version.0 - first.version.0 + 1).unwrap_or(usize::MAX),
        stream_version: Some(last.version),
        positions: Some((first.position, last.position)),
        duplicate: true,
        attempts: 1,
    }
}

fn outcome(result: &AppendResult, events: usize, attempts: u32) -> CommandOutcome {
    CommandOutcome {
        stream: result.stream.clone(),
        events,
        stream_version: Some(result.last_version),
        positions: Some((result.first_position, result.last_position)),
        duplicate: false,
        attempts,
    }
}
