//! The contract between the bus machinery (relay, consumers) and a broker: what a
//! backend must do, and nothing more. Backends: [`InProcBus`](crate::InProcBus) here,
//! NATS JetStream in `eventyr-bus-nats`.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use eventyr_core::{EventId, Position};

use crate::error::BusError;
use crate::message::{ConsumerName, Message, ServiceName};

/// A message on its way to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The event id: the broker drops a republished message with an id it has seen.
    pub id: EventId,
    pub subject: String,
    /// The CloudEvents JSON document.
    pub payload: Bytes,
}

/// Where an outbox relay publishes.
#[async_trait]
pub trait Publisher: Send + Sync + fmt::Debug {
    /// Publishes `messages` of `service`, in order, and returns once the broker has
    /// stored every one. On an error some may be stored: the caller publishes them all
    /// again, and the broker drops the ones whose id it has already seen.
    async fn publish(&self, service: &ServiceName, messages: &[Outgoing]) -> Result<(), BusError>;
}

/// Where a consumer keeps positions for transports that read the producer's log
/// itself (the in-process bus): the consumer's own database.
#[async_trait]
pub trait Checkpoints: Send + Sync + fmt::Debug {
    /// The position below which every event of `source` has been acknowledged.
    async fn load(&self, source: &ServiceName) -> Result<Position, BusError>;
    async fn save(&self, source: &ServiceName, position: Position) -> Result<(), BusError>;
}

/// What one consumer instance asks of a transport.
#[derive(Debug, Clone)]
pub struct SubscribeRequest {
    pub consumer: ConsumerName,
    /// The producing service.
    pub source: ServiceName,
    /// Messages delivered to this instance and not yet acknowledged, at most.
    pub max_in_flight: usize,
    /// How long the broker waits for an acknowledgement before it delivers again.
    pub ack_wait: Duration,
    pub checkpoints: Arc<dyn Checkpoints>,
    /// The event types the consumer acts on (`None`: all). A transport may leave the
    /// others out, as if they were private (the in-process bus does: a consumer then
    /// neither reads nor records what it would ignore); a broker whose ordering links
    /// count every public event (NATS) delivers them all, and the handler ignores them.
    pub event_types: Option<BTreeSet<String>>,
}

/// A message bus backend.
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug {
    /// A short name for reports (`inproc`, `nats`).
    fn name(&self) -> &'static str;

    /// Joins the consumer group `request.consumer` (creating it on first use) as one
    /// more competing instance. Instances of one consumer share its messages; each
    /// message is acknowledged once by the group.
    async fn subscribe(&self, request: SubscribeRequest)
    -> Result<Box<dyn Subscription>, BusError>;
}

/// One consumer instance's supply of messages.
#[async_trait]
pub trait Subscription: Send {
    /// Up to `max` deliveries, waiting up to `wait` for the first; empty when none came.
    /// Deliveries come as they arrive: the call does not wait to fill `max`.
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError>;

    /// Messages waiting for the consumer group (not delivered yet, or delivered and not
    /// acknowledged), when the transport knows.
    async fn pending(&mut self) -> Result<Option<u64>, BusError>;
}

/// A message's body as the transport has it.
#[derive(Debug, Clone)]
pub enum Body {
    /// Bytes from the wire: decoded by the consumer (a failure is a poison message).
    Encoded(Bytes),
    /// Already an event (the in-process bus reads the producer's store).
    Decoded(Box<Message>),
}

/// One delivery of a message to a consumer instance.
pub struct Delivery {
    pub body: Body,
    /// How many times the message has been delivered, this time included (1 = first).
    pub deliveries: u64,
    pub acker: Box<dyn Acker>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("body", &self.body)
            .field("deliveries", &self.deliveries)
            .finish_non_exhaustive()
    }
}

/// Settles a delivery with the broker.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Done with: the group will not see it again.
    async fn ack(&self) -> Result<(), BusError>;
    /// Not done: deliver it again (to any instance) after `delay`.
    async fn nak(&self, delay: Duration) -> Result<(), BusError>;
    /// Still working on it: restart the broker's acknowledgement timer.
    async fn in_progress(&self) -> Result<(), BusError>;
}
