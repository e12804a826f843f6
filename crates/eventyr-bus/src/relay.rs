//! [`Relay`]: the transactional outbox of a service, for brokers. A service's
//! committed events are its outbox; the relay reads them from its own checkpoint,
//! publishes the public ones, and moves the checkpoint once the broker has stored
//! them. Nothing is published before it is committed; a crash between publishing and
//! moving the checkpoint publishes the batch again (the broker drops ids it has seen
//! within its duplicate window, and consumers' inboxes recognise the rest).
//!
//! Each message carries its ordering link (`previousversion`): the version of the
//! previous event of its stream that the relay published. The relay keeps, per
//! stream, the last version it published, in the same transaction as its checkpoint,
//! so the links are the same however often a batch is published. Its state is a read
//! model (`outbox_<service>`) in the service's read-model store; two relays of one
//! service contend safely through its checkpoint, like projection runners.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use eventyr_core::{Position, RecordedEvent, RetryPolicy, StreamVersion};
use eventyr_store::ReadAll;
use eventyr_store::readmodel::{Generation, ReadModels};
use eventyr_store::sql::{SqlStatement, SqlValue};
use eventyr_store::{EventStore, StoreError};
use eventyr_telemetry::names;
use futures::FutureExt as _;
use lru::LruCache;

use crate::consumer::{FaultHook, FaultPoint};
use crate::error::BusError;
use crate::inbox::open_model;
use crate::message::{Message, PublicEvents, ServiceName, subject};
use crate::transport::{Outgoing, Publisher};

const STREAMS_TABLE: &str =
    "CREATE TABLE eventyr_outbox_streams (stream TEXT PRIMARY KEY, version BIGINT NOT NULL)";

/// How a relay runs.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Events read (and published) per batch. Default 100.
    pub batch_size: usize,
    /// How long to wait for a head announcement before reading anyway (commits by
    /// other processes). Default 500 ms.
    pub idle_poll: Duration,
    /// Backoff between failed attempts (publishing, reading, saving); a relay never
    /// gives up, it retries until the broker is back. Default from 100 ms to 5 s.
    pub retry: RetryPolicy,
    /// Streams whose last published version is kept in memory. Default 100 000.
    pub cache_capacity: usize,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            batch_size: 100,
            idle_poll: Duration::from_millis(500),
            retry: RetryPolicy {
                attempts_max: u32::MAX,
                initial_delay: Duration::from_millis(100),
                multiplier: 2.0,
                delay_max: Duration::from_secs(5),
                jitter_ratio: 0.2,
            },
            cache_capacity: 100_000,
        }
    }
}

/// The outbox relay of one service.
pub struct Relay {
    service: ServiceName,
    store: Arc<dyn EventStore>,
    models: Arc<dyn ReadModels>,
    public: PublicEvents,
    publisher: Arc<dyn Publisher>,
    options: RelayOptions,
    faults: Option<FaultHook>,
}

/// The name of a service's relay state model.
pub fn outbox_model(service: &ServiceName) -> String {
    format!("outbox_{service}")
}

impl Relay {
    /// The relay of `service`, reading `store`, keeping its state in `models`,
    /// publishing the `public` events to `publisher`.
    pub fn new(
        service: ServiceName,
        store: Arc<dyn EventStore>,
        models: Arc<dyn ReadModels>,
        public: PublicEvents,
        publisher: Arc<dyn Publisher>,
    ) -> Self {
        Self {
            service,
            store,
            models,
            public,
            publisher,
            options: RelayOptions::default(),
            faults: None,
        }
    }

    pub fn options(mut self, options: RelayOptions) -> Self {
        self.options = options;
        self
    }

    /// Injects crashes (tests).
    pub fn faults(mut self, faults: FaultHook) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Relays until `shutdown` completes. A batch being published when it does is
    /// finished first. Errors: the state model cannot be opened, or an injected crash.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), BusError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let model = outbox_model(&self.service);
        let mut state = loop {
            let opened = async {
                let generation =
                    open_model(&*self.models, &model, &[STREAMS_TABLE.to_owned()]).await?;
                let checkpoint = self.models.checkpoint(&model, generation).await?;
                Ok::<_, StoreError>((generation, checkpoint))
            };
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                opened = opened => match opened {
                    Ok((generation, checkpoint)) => break State {
                        model,
                        generation,
                        checkpoint,
                        cache: LruCache::new(
                            NonZeroUsize::new(self.options.cache_capacity.max(1)).unwrap_or(NonZeroUsize::MIN),
                        ),
                    },
                    Err(error) if error.is_retryable() => {
                        tracing::warn!(service = %self.service, %error, "cannot open the relay state; retrying");
                        tokio::time::sleep(self.options.retry.delay(1, fastrand::f64())).await;
                    }
                    Err(error) => return Err(error.into()),
                },
            }
        };
        let mut heads = self.store.watch_head();
        let mut failures = 0u32;
        loop {
            // A step runs to its end (publishing is bounded by the publisher's
            // timeout), so a shutdown does not leave a published batch unsaved.
            if shutdown.as_mut().now_or_never().is_some() {
                return Ok(());
            }
            match self.step(&mut state).await {
                Ok(Step::Relayed) => failures = 0,
                Ok(Step::CaughtUp) => {
                    failures = 0;
                    tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        _ = heads.changed() => {}
                        () = tokio::time::sleep(self.options.idle_poll) => {}
                    }
                }
                Err(Stop::Crash(error)) => return Err(error),
                Err(Stop::Retry(error)) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(service = %self.service, %error, "relaying failed; retrying");
                    let delay = self.options.retry.delay(failures.min(16), fastrand::f64());
                    tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Reads one batch after the checkpoint, publishes it and saves the checkpoint.
    async fn step(&self, state: &mut State) -> Result<Step, Stop> {
        let slice = self
            .store
            .read_all(&ReadAll::from(state.checkpoint.next()).limit(self.options.batch_size.max(1)))
            .await
            .map_err(|e| Stop::Retry(e.into()))?;
        let to = Position(slice.next.0.saturating_sub(1));
        metrics::gauge!(names::BUS_RELAY_LAG_EVENTS, names::LABEL_SERVICE => self.service.to_string())
            .set(slice.head.0.saturating_sub(to.0) as f64);
        if to <= state.checkpoint {
            return Ok(Step::CaughtUp);
        }
        let public: Vec<&RecordedEvent> = slice
            .events
            .iter()
            .filter(|e| self.public.contains(&e.event_type))
            .collect();
        let mut published: HashMap<String, u64> = HashMap::new();
        let known = self.last_published(state, &public).await?;
        let mut outgoing = Vec::with_capacity(public.len());
        for event in &public {
            let stream = event.stream_id.as_str();
            let previous = published
                .get(stream)
                .or_else(|| known.get(stream))
                .copied()
                .map(StreamVersion);
            published.insert(stream.to_owned(), event.version.0);
            let message = Message {
                source: self.service.clone(),
                event: (*event).clone(),
                previous,
            };
            outgoing.push(Outgoing {
                id: event.id,
                subject: subject(&self.service, &event.event_type),
                payload: message.encode(),
            });
        }
        if !outgoing.is_empty() {
            self.publisher
                .publish(&self.service, &outgoing)
                .await
                .map_err(Stop::Retry)?;
            if let Some(faults) = &self.faults {
                faults(FaultPoint::Published).map_err(Stop::Crash)?;
            }
        }
        let statements = published
            .iter()
            .map(|(stream, version)| {
                SqlStatement::new(
                    "INSERT INTO eventyr_outbox_streams (stream, version) VALUES ($1, $2) \
                     ON CONFLICT (stream) DO UPDATE SET version = excluded.version",
                )
                .bind(stream.as_str())
                .bind(i64::try_from(*version).unwrap_or(i64::MAX))
            })
            .collect();
        match self
            .models
            .apply(
                &state.model,
                state.generation,
                statements,
                state.checkpoint,
                to,
            )
            .await
        {
            Ok(()) => {
                state.checkpoint = to;
                for (stream, version) in published {
                    state.cache.put(stream, version);
                }
                metrics::counter!(names::BUS_PUBLISHED_TOTAL, names::LABEL_SERVICE => self.service.to_string())
                    .increment(outgoing.len() as u64);
                Ok(Step::Relayed)
            }
            Err(StoreError::CheckpointConflict { actual, .. }) => {
                // Another relay of this service moved on: continue after it.
                state.checkpoint = actual;
                state.cache.clear();
                Ok(Step::Relayed)
            }
            Err(error) => Err(Stop::Retry(error.into())),
        }
    }

    /// The last published version of each stream of `events` that had one before
    /// them: from the cache, else one query for all the others. A stream's first event
    /// (version 0) needs no lookup.
    async fn last_published(
        &self,
        state: &mut State,
        events: &[&RecordedEvent],
    ) -> Result<HashMap<String, u64>, Stop> {
        let mut known = HashMap::new();
        let mut missing: Vec<String> = Vec::new();
        for event in events {
            let stream = event.stream_id.as_str();
            if event.version.0 == 0
                || known.contains_key(stream)
                || missing.iter().any(|s| s == stream)
            {
                continue;
            }
            match state.cache.get(stream) {
                Some(version) => {
                    known.insert(stream.to_owned(), *version);
                }
                None => missing.push(stream.to_owned()),
            }
        }
        if missing.is_empty() {
            return Ok(known);
        }
        let placeholders: Vec<String> = (1..=missing.len()).map(|i| format!("${i}")).collect();
        let statement = SqlStatement::with_params(
            format!(
                "SELECT stream, version FROM eventyr_outbox_streams WHERE stream IN ({})",
                placeholders.join(", ")
            ),
            missing.into_iter().map(SqlValue::from).collect(),
        );
        let rows = self
            .models
            .query(&state.model, statement)
            .await
            .map_err(|e| Stop::Retry(e.into()))?;
        for row in rows {
            if let (Some(stream), Some(version)) = (row.text("stream"), row.int("version")) {
                state.cache.put(stream.to_owned(), version.unsigned_abs());
                known.insert(stream.to_owned(), version.unsigned_abs());
            }
        }
        Ok(known)
    }
}

struct State {
    model: String,
    generation: Generation,
    checkpoint: Position,
    cache: LruCache<String, u64>,
}

enum Step {
    Relayed,
    CaughtUp,
}

enum Stop {
    Retry(BusError),
    Crash(BusError),
}
