//! What travels on the bus: an event in its CloudEvents JSON form, the subject it is
//! routed by, and the names that address producers and consumers.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use eventyr_core::{CloudEvent, CloudEventError, EventType, RecordedEvent, StreamVersion};

use crate::error::BusError;

/// The first token of every subject.
pub const SUBJECT_PREFIX: &str = "eventyr";

/// The longest service name.
const SERVICE_NAME_LEN_MAX: usize = 32;
/// The longest consumer name (it also names the consumer's inbox database, whose name
/// is limited to 40 characters, `inbox_` included).
const CONSUMER_NAME_LEN_MAX: usize = 34;

/// Checks a name that becomes part of subjects, stream, consumer and database names: a
/// lowercase letter, then lowercase letters, digits and `_`.
fn check_name(kind: &'static str, name: &str, max: usize) -> Result<(), BusError> {
    let valid = !name.is_empty()
        && name.len() <= max
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(BusError::Invalid {
            message: format!(
                "{kind} name {name:?} must be a lowercase letter then [a-z0-9_], at most {max} characters"
            ),
        })
    }
}

/// A service's name: the `source` of its events and the second token of their subjects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(Arc<str>);

impl ServiceName {
    pub fn new(name: &str) -> Result<Self, BusError> {
        check_name("service", name, SERVICE_NAME_LEN_MAX)?;
        Ok(Self(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A consumer's name: one logical subscriber, however many instances it runs. It names
/// the durable broker consumer and the consumer's inbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerName(Arc<str>);

impl ConsumerName {
    pub fn new(name: &str) -> Result<Self, BusError> {
        check_name("consumer", name, CONSUMER_NAME_LEN_MAX)?;
        Ok(Self(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConsumerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The subject an event is published on: `eventyr.<service>.<EventType>`. Characters a
/// subject token cannot hold (`.`, `*`, `>`, whitespace, …) become `_`; the CloudEvent
/// keeps the exact type.
pub fn subject(service: &ServiceName, event_type: &EventType) -> String {
    let token: String = event_type
        .as_str()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{SUBJECT_PREFIX}.{service}.{token}")
}

/// Every subject a service publishes on.
pub fn service_subjects(service: &ServiceName) -> String {
    format!("{SUBJECT_PREFIX}.{service}.>")
}

/// Which of a service's event types leave it. The rest are private: they stay in the
/// service's store and no other service learns of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicEvents {
    /// Every event is public.
    All,
    /// Only these types.
    Only(BTreeSet<String>),
}

impl PublicEvents {
    pub fn only<I, S>(types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::Only(types.into_iter().map(Into::into).collect())
    }

    pub fn contains(&self, event_type: &EventType) -> bool {
        match self {
            Self::All => true,
            Self::Only(types) => types.contains(event_type.as_str()),
        }
    }
}

/// A message as a consumer sees it: the event, who published it, and the version of
/// the stream's previous published event (the ordering link).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub source: ServiceName,
    pub event: RecordedEvent,
    /// The version of the previous event of the same stream that `source` published,
    /// `None` when there was none or the transport keeps order itself.
    pub previous: Option<StreamVersion>,
}

impl Message {
    /// The CloudEvents JSON form.
    pub fn encode(&self) -> Bytes {
        let mut cloud = CloudEvent::from_recorded(&self.event, self.source.as_str());
        cloud.previousversion = self.previous.map(|v| v.0.to_string());
        // Serialising a struct of strings and raw JSON cannot fail.
        Bytes::from(serde_json::to_vec(&cloud).unwrap_or_default())
    }

    /// Reads a CloudEvents JSON document. Anything that is not a well-formed Eventyr
    /// event is a [`DecodeError`]: such a message goes to the dead letters at once.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let cloud: CloudEvent =
            serde_json::from_slice(bytes).map_err(|e| DecodeError(e.to_string()))?;
        let source =
            ServiceName::new(&cloud.source).map_err(|e| DecodeError(format!("source: {e}")))?;
        let previous = cloud.previous_version().map_err(decode_error)?;
        let event = cloud.to_recorded().map_err(decode_error)?;
        Ok(Self {
            source,
            event,
            previous,
        })
    }

    /// The routing key that keeps order: the producer and the stream.
    pub fn key(&self) -> (ServiceName, String) {
        (self.source.clone(), self.event.stream_id.to_string())
    }
}

/// Why a message could not be read as an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable message: {0}")]
pub struct DecodeError(pub String);

fn decode_error(error: CloudEventError) -> DecodeError {
    DecodeError(error.to_string())
}

#[cfg(test)]
mod tests {
    use eventyr_core::{
        EventId, Json, Metadata, Position, RecordedEvent, StreamId, StreamVersion, Timestamp,
    };

    use super::*;

    fn event() -> RecordedEvent {
        RecordedEvent {
            id: EventId::new(),
            stream_id: StreamId::new("order-1").expect("stream"),
            version: StreamVersion(3),
            position: Position(42),
            event_type: EventType::new("OrderPlaced").expect("type"),
            schema_version: 2,
            data: Json::from_stored(&br#"{"total":10}"#[..]),
            metadata: Metadata::default(),
            recorded_at: Timestamp::from_unix_micros(1_700_000_000_000_000),
        }
    }

    #[test]
    fn messages_round_trip_with_their_ordering_link() {
        let message = Message {
            source: ServiceName::new("order").expect("service"),
            event: event(),
            previous: Some(StreamVersion(1)),
        };
        let decoded = Message::decode(&message.encode()).expect("decode");
        assert_eq!(decoded, message);
        let first = Message {
            previous: None,
            ..message
        };
        assert_eq!(Message::decode(&first.encode()).expect("decode"), first);
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        for bytes in [
            &b""[..],
            b"not json",
            b"{}",
            br#"{"specversion":"1.0","id":"x","source":"order","type":"t"}"#,
            br#"{"specversion":"1.0","id":"0190a0e0-0000-7000-8000-000000000001","source":"Bad Source","type":"t","subject":"s","time":"2024-01-01T00:00:00Z","streamversion":"0","globalposition":"1"}"#,
        ] {
            assert!(Message::decode(bytes).is_err(), "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn subjects_are_tokens() {
        let order = ServiceName::new("order").expect("service");
        assert_eq!(
            subject(&order, &EventType::new("OrderPlaced").expect("type")),
            "eventyr.order.OrderPlaced"
        );
        assert_eq!(
            subject(&order, &EventType::new("a.b *>c").expect("type")),
            "eventyr.order.a_b___c"
        );
        assert!(ServiceName::new("Order").is_err());
        assert!(ServiceName::new("order.x").is_err());
        assert!(ConsumerName::new(&"c".repeat(35)).is_err());
    }
}
