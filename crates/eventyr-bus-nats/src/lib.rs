//! The NATS JetStream backend of the Eventyr bus (distributed mode).
//!
//! - One stream per producing service, `EVENTYR_<SERVICE>`, holding the subjects
//!   `eventyr.<service>.>`; each event on `eventyr.<service>.<EventType>`.
//! - The relay publishes with `Nats-Msg-Id` = event id: within the stream's duplicate
//!   window (default 2 min) a republished event is dropped by the server.
//! - A consumer is a durable pull consumer named after it, with explicit acks; every
//!   instance of the consumer pulls from the same one (competing consumers), at most
//!   its in-flight bound at a time. Redelivery, ack timeouts and delays are the
//!   server's; ordering per stream and exactly-once effects are the inbox's.
//!
//! Durability: a publish acknowledgement is only as durable as the server's settings.
//! Run nats-server ≥ 2.10 with `jetstream { sync_interval: always }` so that an
//! acknowledged message survives `kill -9` of the server (ARCHITECTURE.md).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{Batch, Config as PullConfig};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, DiscardPolicy, StorageType};
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use eventyr_bus::{
    Acker, Body, BusError, Delivery, Outgoing, Publisher, ServiceName, SubscribeRequest,
    Subscription, Transport, service_subjects,
};
use futures::{FutureExt as _, StreamExt as _};

/// The `max_payload` a server needs: an event of the default size limit (1 MiB of
/// data) with its CloudEvents envelope and metadata.
pub const MAX_PAYLOAD_WANTED: usize = 1024 * 1024 + 64 * 1024;

/// How to reach and use the NATS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsOptions {
    /// e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// How long a service's stream keeps events. Default 7 days.
    pub max_age: Duration,
    /// How long the server remembers published ids to drop duplicates. Default 2 min.
    pub duplicate_window: Duration,
    /// Stream replicas (a cluster: 3). Default 1.
    pub replicas: usize,
    /// Unacknowledged messages of one consumer over all its instances, at most (each
    /// instance also keeps to its own in-flight bound). Default 1000.
    pub max_ack_pending: i64,
    /// How long to wait for a publish acknowledgement or an API answer. Default 5 s.
    pub request_timeout: Duration,
}

impl NatsOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            max_ack_pending: 1000,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// A connection to NATS JetStream: the bus's [`Transport`] and the relay's
/// [`Publisher`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    options: Arc<NatsOptions>,
    /// Services whose stream this connection has made sure of.
    ensured: Arc<Mutex<HashSet<ServiceName>>>,
}

fn unavailable(doing: &str) -> impl FnOnce(async_nats::Error) -> BusError + '_ {
    move |error| BusError::Unavailable {
        message: format!("{doing}: {error}"),
        source: None,
    }
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(error: E) -> async_nats::Error {
    Box::new(error)
}

/// The stream of a service: `EVENTYR_<SERVICE>`.
pub fn stream_name(service: &ServiceName) -> String {
    format!("EVENTYR_{}", service.as_str().to_ascii_uppercase())
}

impl NatsBus {
    /// Connects; reconnects by itself for ever afterwards (operations fail while the
    /// server is away and succeed again when it is back).
    pub async fn connect(options: NatsOptions) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name("eventyr")
            .connection_timeout(options.request_timeout)
            .request_timeout(Some(options.request_timeout))
            .retry_on_initial_connect()
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(100 * attempts.min(10) as u64)
            })
            .connect(&options.url)
            .await
            .map_err(|e| BusError::unavailable(format!("connecting to {}", options.url), e))?;
        let mut jetstream = jetstream::new(client.clone());
        jetstream.set_timeout(options.request_timeout);
        let bus = Self {
            client,
            jetstream,
            options: Arc::new(options),
            ensured: Arc::new(Mutex::new(HashSet::new())),
        };
        bus.warn_if_unsynced();
        Ok(bus)
    }

    /// The server's version, e.g. `2.10.22`.
    pub fn server_version(&self) -> String {
        self.client.server_info().version
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Servers before 2.10 cannot sync every message: an acknowledged publish may be
    /// lost if the server is killed. A `max_payload` below the largest event (1 MiB
    /// of data, plus its envelope) would stop the relay at the first large event.
    fn warn_if_unsynced(&self) {
        let max_payload = self.client.server_info().max_payload;
        if max_payload < MAX_PAYLOAD_WANTED {
            tracing::warn!(
                max_payload,
                wanted = MAX_PAYLOAD_WANTED,
                "nats-server's max_payload is below the largest event Eventyr accepts; \
                 set max_payload: 2MB in its configuration"
            );
        }
        let version = self.server_version();
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) < (2, 10) {
            tracing::warn!(
                %version,
                "nats-server before 2.10 cannot sync each message (sync_interval: always); \
                 a crash of the server may lose acknowledged messages"
            );
        }
    }

    /// Creates `service`'s stream if it does not exist.
    pub async fn ensure_stream(&self, service: &ServiceName) -> Result<(), BusError> {
        if lock(&self.ensured).contains(service) {
            return Ok(());
        }
        let config = StreamConfig {
            name: stream_name(service),
            subjects: vec![service_subjects(service)],
            max_age: self.options.max_age,
            duplicate_window: self.options.duplicate_window,
            num_replicas: self.options.replicas.max(1),
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            ..StreamConfig::default()
        };
        self.jetstream
            .get_or_create_stream(config)
            .await
            .map_err(|e| unavailable("creating the stream")(boxed(e)))?;
        lock(&self.ensured).insert(service.clone());
        Ok(())
    }

    async fn publish_all(&self, messages: &[Outgoing]) -> Result<(), async_nats::Error> {
        let mut acks = Vec::with_capacity(messages.len());
        for message in messages {
            let publish = PublishMessage::build()
                .payload(message.payload.clone())
                .message_id(message.id.to_string());
            acks.push(
                self.jetstream
                    .send_publish(message.subject.clone(), publish)
                    .await?,
            );
        }
        for ack in acks {
            ack.await?;
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait]
impl Publisher for NatsBus {
    async fn publish(&self, service: &ServiceName, messages: &[Outgoing]) -> Result<(), BusError> {
        self.ensure_stream(service).await?;
        self.publish_all(messages).await.map_err(|error| {
            // The stream may have been removed behind our back: make sure of it again.
            lock(&self.ensured).remove(service);
            unavailable("publishing")(error)
        })
    }
}

#[async_trait]
impl Transport for NatsBus {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn subscribe(
        &self,
        request: SubscribeRequest,
    ) -> Result<Box<dyn Subscription>, BusError> {
        self.ensure_stream(&request.source).await?;
        let stream = self
            .jetstream
            .get_stream(stream_name(&request.source))
            .await
            .map_err(|e| unavailable("opening the stream")(boxed(e)))?;
        let name = request.consumer.to_string();
        let config = PullConfig {
            durable_name: Some(name.clone()),
            filter_subject: service_subjects(&request.source),
            ack_policy: AckPolicy::Explicit,
            ack_wait: request.ack_wait,
            deliver_policy: DeliverPolicy::All,
            // Never give up on a message: the consumer decides when it is dead.
            max_deliver: -1,
            max_ack_pending: self.options.max_ack_pending,
            ..PullConfig::default()
        };
        let consumer = stream
            .get_or_create_consumer(&name, config)
            .await
            .map_err(|e| unavailable("creating the consumer")(boxed(e)))?;
        Ok(Box::new(NatsSubscription {
            consumer,
            batch: None,
        }))
    }
}

struct NatsSubscription {
    consumer: PullConsumer,
    /// The open pull request: its messages are taken as they arrive, over several
    /// fetches, so that none is left behind unread.
    batch: Option<Batch>,
}

#[async_trait]
impl Subscription for NatsSubscription {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        let max = max.max(1);
        let wait = wait.max(Duration::from_millis(100));
        let batch = match &mut self.batch {
            Some(batch) => batch,
            None => self.batch.insert(
                self.consumer
                    .batch()
                    .max_messages(max)
                    .expires(wait)
                    .messages()
                    .await
                    .map_err(|e| unavailable("pulling messages")(boxed(e)))?,
            ),
        };
        let mut deliveries = Vec::new();
        // The server ends the request at `wait`; the margin covers a lost ending.
        let first = tokio::time::timeout(wait + Duration::from_secs(1), batch.next()).await;
        let mut next = match first {
            Err(_) => {
                self.batch = None;
                return Ok(deliveries);
            }
            Ok(next) => Some(next),
        };
        while let Some(item) = next {
            match item {
                Some(Ok(message)) => deliveries.push(delivery(message)),
                Some(Err(error)) => {
                    self.batch = None;
                    if deliveries.is_empty() {
                        return Err(unavailable("pulling messages")(error));
                    }
                    return Ok(deliveries);
                }
                None => {
                    self.batch = None;
                    return Ok(deliveries);
                }
            }
            if deliveries.len() >= max {
                break;
            }
            let Some(batch) = self.batch.as_mut() else {
                break;
            };
            next = batch.next().now_or_never();
        }
        Ok(deliveries)
    }

    async fn pending(&mut self) -> Result<Option<u64>, BusError> {
        let info = self
            .consumer
            .get_info()
            .await
            .map_err(|e| unavailable("reading the consumer")(boxed(e)))?;
        Ok(Some(info.num_pending + info.num_ack_pending as u64))
    }
}

fn delivery(message: jetstream::Message) -> Delivery {
    let deliveries = message
        .info()
        .map(|info| info.delivered.max(1).unsigned_abs())
        .unwrap_or(1);
    Delivery {
        body: Body::Encoded(message.payload.clone()),
        deliveries,
        acker: Box::new(NatsAcker(message)),
    }
}

struct NatsAcker(jetstream::Message);

impl NatsAcker {
    async fn send(&self, kind: AckKind) -> Result<(), BusError> {
        self.0
            .ack_with(kind)
            .await
            .map_err(unavailable("acknowledging"))
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.send(AckKind::Ack).await
    }

    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.send(AckKind::Nak((!delay.is_zero()).then_some(delay)))
            .await
    }

    async fn in_progress(&self) -> Result<(), BusError> {
        self.send(AckKind::Progress).await
    }
}
