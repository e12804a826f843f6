//! The event envelope: [`NewEvent`] is what a writer proposes, [`RecordedEvent`] is what
//! the store committed (the same fields plus stream, version, position and time).

use serde::{Deserialize, Serialize};

use crate::ids::{EventId, EventType, Position, StreamId, StreamVersion};
use crate::json::Json;
use crate::time::Timestamp;
use crate::validate::{
    Limits, METADATA_VALUE_LEN_MAX_BYTES, ValidationError, check_name, check_traceparent,
};

/// What ties an event to the work that caused it. All fields are optional, bounded and
/// printable; `traceparent` is a W3C trace context so that a trace continues across
/// the store and the bus.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The id shared by everything one request or saga caused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The id of the command or event that directly caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// W3C trace context of the operation that wrote the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The authenticated user on whose behalf the event was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

impl Metadata {
    pub fn validate(&self) -> Result<(), ValidationError> {
        let fields = [
            ("metadata.correlation_id", &self.correlation_id),
            ("metadata.causation_id", &self.causation_id),
            ("metadata.user_id", &self.user_id),
        ];
        for (field, value) in fields {
            if let Some(value) = value {
                check_name(field, value, METADATA_VALUE_LEN_MAX_BYTES)?;
            }
        }
        if let Some(traceparent) = &self.traceparent {
            check_traceparent(traceparent)?;
        }
        Ok(())
    }

    /// Bytes the metadata adds to an event, for the event size limit.
    pub fn size_bytes(&self) -> usize {
        [
            &self.correlation_id,
            &self.causation_id,
            &self.traceparent,
            &self.user_id,
        ]
        .iter()
        .map(|v| v.as_ref().map_or(0, String::len))
        .sum()
    }
}

/// An event proposed for appending. Its id makes the append idempotent: appending the
/// same id with the same content again returns the first result and writes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub id: EventId,
    pub event_type: EventType,
    /// The version of the data's schema for this event type, from 1. Upcasters bring
    /// old versions up to date on read.
    pub schema_version: u32,
    pub data: Json,
    pub metadata: Metadata,
}

impl NewEvent {
    /// A new event with a fresh UUIDv7 id, schema version 1 and no metadata.
    pub fn new(event_type: EventType, data: Json) -> Self {
        Self {
            id: EventId::new(),
            event_type,
            schema_version: 1,
            data,
            metadata: Metadata::default(),
        }
    }

    /// Shorthand: validates the type name and serialises `data`.
    pub fn json<T: Serialize + ?Sized>(
        event_type: &str,
        data: &T,
    ) -> Result<Self, ValidationError> {
        Ok(Self::new(EventType::new(event_type)?, Json::encode(data)?))
    }

    pub fn with_id(mut self, id: EventId) -> Self {
        self.id = id;
        self
    }

    pub fn with_schema_version(mut self, schema_version: u32) -> Self {
        self.schema_version = schema_version;
        self
    }

    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Data plus metadata, the measure the event size limit applies to.
    pub fn size_bytes(&self) -> usize {
        self.data.len() + self.metadata.size_bytes()
    }

    /// Checks everything the type system does not: schema version, metadata and size.
    pub fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        if self.schema_version == 0 {
            return Err(ValidationError::InvalidSchemaVersion);
        }
        self.metadata.validate()?;
        let size = self.size_bytes();
        if size > limits.event_size_max_bytes {
            return Err(ValidationError::EventTooLarge {
                event_id: self.id,
                size,
                max: limits.event_size_max_bytes,
            });
        }
        Ok(())
    }

    /// True when `recorded` is this event as stored: same id, type, schema version, data
    /// and metadata. The stream, version, position and time are the store's and are
    /// compared by the caller where they matter.
    pub fn same_content_as(&self, recorded: &RecordedEvent) -> bool {
        self.id == recorded.id
            && self.event_type == recorded.event_type
            && self.schema_version == recorded.schema_version
            && self.data == recorded.data
            && self.metadata == recorded.metadata
    }

    /// The committed form of this event, as a store records it.
    pub fn record(
        self,
        stream_id: StreamId,
        version: StreamVersion,
        position: Position,
        recorded_at: Timestamp,
    ) -> RecordedEvent {
        RecordedEvent {
            id: self.id,
            stream_id,
            version,
            position,
            event_type: self.event_type,
            schema_version: self.schema_version,
            data: self.data,
            metadata: self.metadata,
            recorded_at,
        }
    }
}

/// A committed event: the envelope every reader, projection and consumer sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedEvent {
    pub id: EventId,
    #[serde(rename = "stream")]
    pub stream_id: StreamId,
    pub version: StreamVersion,
    pub position: Position,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub schema_version: u32,
    pub data: Json,
    #[serde(default)]
    pub metadata: Metadata,
    pub recorded_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str) -> NewEvent {
        NewEvent::new(
            EventType::new("Happened").unwrap(),
            Json::from_slice(data.to_owned()).unwrap(),
        )
    }

    #[test]
    fn size_counts_data_and_metadata() {
        let limits = Limits {
            event_size_max_bytes: 10,
            ..Limits::default()
        };
        assert!(event("\"12345678\"").validate(&limits).is_ok());
        let mut e = event("\"12345678\"");
        e.metadata.user_id = Some("u".into());
        assert!(matches!(
            e.validate(&limits),
            Err(ValidationError::EventTooLarge {
                size: 11,
                max: 10,
                ..
            })
        ));
    }

    #[test]
    fn validation_covers_schema_version_and_metadata() {
        let limits = Limits::default();
        assert_eq!(
            event("1").with_schema_version(0).validate(&limits),
            Err(ValidationError::InvalidSchemaVersion)
        );
        let mut e = event("1");
        e.metadata.correlation_id = Some(String::new());
        assert!(matches!(
            e.validate(&limits),
            Err(ValidationError::Empty {
                field: "metadata.correlation_id"
            })
        ));
        e.metadata.correlation_id = Some("c".into());
        e.metadata.traceparent = Some("nonsense".into());
        assert!(matches!(
            e.validate(&limits),
            Err(ValidationError::InvalidTraceparent { .. })
        ));
    }

    #[test]
    fn recorded_events_serialise_with_stable_names() {
        let recorded = event(r#"{"n":1}"#).record(
            StreamId::new("s").unwrap(),
            StreamVersion(0),
            Position(7),
            Timestamp::from_unix_micros(1),
        );
        let json = serde_json::to_value(&recorded).unwrap();
        assert_eq!(json["stream"], "s");
        assert_eq!(json["type"], "Happened");
        assert_eq!(json["position"], 7);
        assert_eq!(json["data"]["n"], 1);
        let back: RecordedEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, recorded);
    }
}
