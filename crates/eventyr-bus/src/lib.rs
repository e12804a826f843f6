//! Reliable messaging between services that own their databases and learn about each
//! other only through events.
//!
//! - The **outbox** is the producer's committed log: the [`Relay`] publishes its
//!   public events to a broker from its own checkpoint; the [`InProcBus`] needs no
//!   relay, its consumers read the producer's store directly.
//! - The **inbox** ([`Inbox`]) is in the consumer's own database: a message's effect
//!   commits with the record that it is done, so a redelivery has no second effect,
//!   and each stream's messages take effect in order.
//! - A [`Consumer`] retries transient handler failures with backoff and moves what
//!   cannot be handled to its **dead letters**, which an operator lists and replays.
//!
//! Brokers implement [`Transport`] (consume) and [`Publisher`] (relay); the
//! conformance suite in `testkit` checks both backends alike.

mod consumer;
mod error;
mod inbox;
mod inproc;
mod message;
mod relay;
mod transport;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use crate::consumer::{
    Consumer, ConsumerOptions, EffectObserver, FaultHook, FaultPoint, HANDLER_RETRY, Handler,
    HandlerError,
};
pub use crate::error::BusError;
pub use crate::inbox::{
    DeadLetter, DeadLetterStatus, Gate, INBOX_PREFIX, Inbox, NewDeadLetter, inbox_model,
};
pub use crate::inproc::InProcBus;
pub use crate::message::{
    ConsumerName, DecodeError, Message, PublicEvents, SUBJECT_PREFIX, ServiceName,
    service_subjects, subject,
};
pub use crate::relay::{Relay, RelayOptions, outbox_model};
pub use crate::transport::{
    Acker, Body, Checkpoints, Delivery, Outgoing, Publisher, SubscribeRequest, Subscription,
    Transport,
};
