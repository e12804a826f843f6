//! The CloudEvents 1.0 JSON form (structured mode) of a [`RecordedEvent`].
//!
//! Every event that leaves a service travels in this form, so that any CloudEvents SDK
//! can read it. The mapping is lossless: `CloudEvent::from_recorded(e, s).to_recorded()`
//! gives back `e`. Attribute by attribute:
//!
//! | CloudEvents | envelope |
//! |---|---|
//! | `id` | event id (UUID) |
//! | `source` | the producing service |
//! | `type` | `eventyr.<source>.<event type>.v<schema version>` |
//! | `subject` | stream id |
//! | `time` | recorded-at time |
//! | `datacontenttype` | always `application/json` |
//! | `data` | the data, verbatim |
//! | `streamversion`, `globalposition` | stream version, global position (decimal strings) |
//! | `previousversion` | the version of the stream's previous *published* event, when there is one (set by the outbox relay; consumers use it to keep each stream in order) |
//! | `correlationid`, `causationid`, `traceparent`, `userid` | metadata |
//!
//! `streamversion` and `globalposition` are written as strings because the CloudEvents
//! Integer type is 32-bit and positions outgrow it; both forms are accepted on input.

use serde::{Deserialize, Deserializer, Serialize};

use crate::event::{Metadata, RecordedEvent};
use crate::ids::{EventId, EventType, Position, StreamId, StreamVersion};
use crate::json::Json;
use crate::time::Timestamp;
use crate::validate::ValidationError;

/// The first segment of every Eventyr CloudEvents `type`.
pub const EVENT_TYPE_PREFIX: &str = "eventyr";

const SPEC_VERSION: &str = "1.0";
const JSON_CONTENT_TYPE: &str = "application/json";

/// A CloudEvents 1.0 event in JSON structured mode, with Eventyr's extension attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Json>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integer_or_string"
    )]
    pub streamversion: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integer_or_string"
    )]
    pub globalposition: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integer_or_string"
    )]
    pub previousversion: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlationid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causationid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userid: Option<String>,
}

/// Why a CloudEvent does not map to an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudEventError {
    #[error("specversion {0:?} is not supported; only 1.0 is")]
    UnsupportedSpecVersion(String),
    #[error("attribute {0} is required")]
    Missing(&'static str),
    #[error("attribute {attribute} is invalid: {message}")]
    Invalid {
        attribute: &'static str,
        message: String,
    },
    #[error(transparent)]
    Validation(#[from] ValidationError),
}

impl CloudEvent {
    /// The CloudEvents `type` of an event type at a schema version from a source.
    pub fn type_name(source: &str, event_type: &EventType, schema_version: u32) -> String {
        format!("{EVENT_TYPE_PREFIX}.{source}.{event_type}.v{schema_version}")
    }

    /// The CloudEvents form of `event` as published by the service `source`.
    pub fn from_recorded(event: &RecordedEvent, source: &str) -> Self {
        let metadata = event.metadata.clone();
        Self {
            specversion: SPEC_VERSION.to_owned(),
            id: event.id.to_string(),
            source: source.to_owned(),
            event_type: Self::type_name(source, &event.event_type, event.schema_version),
            subject: Some(event.stream_id.to_string()),
            time: Some(event.recorded_at.to_rfc3339()),
            datacontenttype: Some(JSON_CONTENT_TYPE.to_owned()),
            data: Some(event.data.clone()),
            streamversion: Some(event.version.0.to_string()),
            globalposition: Some(event.position.0.to_string()),
            previousversion: None,
            correlationid: metadata.correlation_id,
            causationid: metadata.causation_id,
            traceparent: metadata.traceparent,
            userid: metadata.user_id,
        }
    }

    /// The envelope this CloudEvent carries. Every attribute is validated as if it had
    /// been appended. A `type` that does not follow `eventyr.<source>.<type>.v<n>` (an
    /// event from outside Eventyr) is taken whole as the event type, schema version 1.
    pub fn to_recorded(&self) -> Result<RecordedEvent, CloudEventError> {
        if self.specversion != SPEC_VERSION {
            return Err(CloudEventError::UnsupportedSpecVersion(
                self.specversion.clone(),
            ));
        }
        if let Some(content_type) = &self.datacontenttype {
            let json =
                content_type.starts_with(JSON_CONTENT_TYPE) || content_type.contains("+json");
            if !json {
                return Err(invalid(
                    "datacontenttype",
                    format!("{content_type:?} is not JSON"),
                ));
            }
        }
        let (event_type, schema_version) = self.split_type()?;
        let metadata = Metadata {
            correlation_id: self.correlationid.clone(),
            causation_id: self.causationid.clone(),
            traceparent: self.traceparent.clone(),
            user_id: self.userid.clone(),
        };
        metadata.validate()?;
        let time = self
            .time
            .as_deref()
            .ok_or(CloudEventError::Missing("time"))?;
        Ok(RecordedEvent {
            id: EventId::parse(&self.id)?,
            stream_id: StreamId::new(
                self.subject
                    .clone()
                    .ok_or(CloudEventError::Missing("subject"))?,
            )?,
            version: StreamVersion(parse_counter("streamversion", &self.streamversion)?),
            position: Position(parse_counter("globalposition", &self.globalposition)?),
            event_type,
            schema_version,
            data: self
                .data
                .clone()
                .unwrap_or_else(|| Json::from_stored(&b"null"[..])),
            metadata,
            recorded_at: Timestamp::parse_rfc3339(time)
                .map_err(|e| invalid("time", e.to_string()))?,
        })
    }

    /// The `previousversion` extension: the version of the stream's previous published
    /// event, `None` when the producer published none before this one.
    pub fn previous_version(&self) -> Result<Option<StreamVersion>, CloudEventError> {
        if self.previousversion.is_none() {
            return Ok(None);
        }
        parse_counter("previousversion", &self.previousversion).map(|v| Some(StreamVersion(v)))
    }

    fn split_type(&self) -> Result<(EventType, u32), CloudEventError> {
        let prefix = format!("{EVENT_TYPE_PREFIX}.{}.", self.source);
        let ours = self.event_type.strip_prefix(&prefix).and_then(|rest| {
            let (name, version) = rest.rsplit_once(".v")?;
            let version: u32 = version.parse().ok().filter(|v| *v >= 1)?;
            (!name.is_empty()).then_some((name, version))
        });
        let (name, version) = ours.unwrap_or((self.event_type.as_str(), 1));
        Ok((EventType::new(name)?, version))
    }
}

fn invalid(attribute: &'static str, message: String) -> CloudEventError {
    CloudEventError::Invalid { attribute, message }
}

fn parse_counter(attribute: &'static str, value: &Option<String>) -> Result<u64, CloudEventError> {
    let value = value
        .as_deref()
        .ok_or(CloudEventError::Missing(attribute))?;
    value.parse().map_err(|_| {
        invalid(
            attribute,
            format!("{value:?} is not a non-negative integer"),
        )
    })
}

/// Accepts a JSON number or a string for an integer extension attribute.
fn integer_or_string<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Number(u64),
        Text(String),
    }
    Ok(
        Option::<Either>::deserialize(deserializer)?.map(|v| match v {
            Either::Number(n) => n.to_string(),
            Either::Text(s) => s,
        }),
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> RecordedEvent {
        RecordedEvent {
            id: EventId::parse("01932c6e-8a4b-7cc3-9d1e-6f7a8b9c0d1e").unwrap(),
            stream_id: StreamId::new("order-42").unwrap(),
            version: StreamVersion(3),
            position: Position(9_000_000_000),
            event_type: EventType::new("OrderPlaced").unwrap(),
            schema_version: 2,
            data: Json::from_slice(&br#"{"total_cents": 1250, "items": [ ]}"#[..]).unwrap(),
            metadata: Metadata {
                correlation_id: Some("req-1".into()),
                causation_id: Some("cmd-1".into()),
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
                user_id: Some("alice".into()),
            },
            recorded_at: Timestamp::from_unix_micros(1_764_101_538_123_456),
        }
    }

    #[test]
    fn structured_json_has_the_spec_attributes() {
        let ce = CloudEvent::from_recorded(&sample(), "order");
        let json: serde_json::Value = serde_json::to_value(&ce).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["type"], "eventyr.order.OrderPlaced.v2");
        assert_eq!(json["subject"], "order-42");
        assert_eq!(json["time"], "2025-11-25T20:12:18.123456Z");
        assert_eq!(json["datacontenttype"], "application/json");
        assert_eq!(json["data"]["total_cents"], 1250);
        assert_eq!(json["streamversion"], "3");
        assert_eq!(json["globalposition"], "9000000000");
        assert_eq!(
            json["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }

    #[test]
    fn accepts_numeric_extensions_and_foreign_types() {
        let text = r#"{"specversion":"1.0","id":"01932c6e-8a4b-7cc3-9d1e-6f7a8b9c0d1e","source":"/billing",
            "type":"com.example.invoice.paid","subject":"invoice-7","time":"2025-11-25T21:00:00+01:00",
            "data":{"amount":5},"streamversion":4,"globalposition":11}"#;
        let ce: CloudEvent = serde_json::from_str(text).unwrap();
        let event = ce.to_recorded().unwrap();
        assert_eq!(event.event_type.as_str(), "com.example.invoice.paid");
        assert_eq!(event.schema_version, 1);
        assert_eq!(event.version, StreamVersion(4));
        assert_eq!(event.position, Position(11));
    }

    #[test]
    fn refuses_what_cannot_be_an_envelope() {
        let good = CloudEvent::from_recorded(&sample(), "order");
        type Spoil = Box<dyn Fn(&mut CloudEvent)>;
        let cases: Vec<(Spoil, &str)> = vec![
            (Box::new(|ce| ce.specversion = "0.3".into()), "specversion"),
            (Box::new(|ce| ce.subject = None), "subject"),
            (Box::new(|ce| ce.subject = Some("$all".into())), "reserved"),
            (Box::new(|ce| ce.id = "nope".into()), "not a valid id"),
            (
                Box::new(|ce| ce.streamversion = Some("-1".into())),
                "streamversion",
            ),
            (Box::new(|ce| ce.time = Some("soon".into())), "time"),
            (
                Box::new(|ce| ce.datacontenttype = Some("text/plain".into())),
                "datacontenttype",
            ),
            (
                Box::new(|ce| ce.traceparent = Some("00-bad".into())),
                "traceparent",
            ),
        ];
        for (spoil, expected) in cases {
            let mut ce = good.clone();
            spoil(&mut ce);
            let err = ce.to_recorded().unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
        }
    }

    fn printable(max: usize) -> impl Strategy<Value = String> {
        proptest::string::string_regex(&format!("[^\\p{{Cc}}$]{{1,{max}}}")).unwrap()
    }

    fn optional_meta() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(printable(40))
    }

    prop_compose! {
        fn recorded()(
            stream in printable(60),
            event_type in printable(60),
            schema_version in 1u32..=u32::MAX,
            version in any::<u64>(),
            position in any::<u64>(),
            number in any::<i64>(),
            text in ".{0,40}",
            correlation_id in optional_meta(),
            causation_id in optional_meta(),
            user_id in optional_meta(),
            micros in -62_135_596_800_000_000i64..253_402_300_799_000_000i64,
        ) -> RecordedEvent {
            RecordedEvent {
                id: EventId::new(),
                stream_id: StreamId::new(stream).unwrap(),
                version: StreamVersion(version),
                position: Position(position),
                event_type: EventType::new(event_type).unwrap(),
                schema_version,
                data: Json::encode(&serde_json::json!({ "n": number, "text": text })).unwrap(),
                metadata: Metadata { correlation_id, causation_id, traceparent: None, user_id },
                recorded_at: Timestamp::from_unix_micros(micros),
            }
        }
    }

    proptest! {
        #[test]
        fn the_mapping_is_lossless(event in recorded(), source in "[a-z][a-z0-9-]{0,20}") {
            let ce = CloudEvent::from_recorded(&event, &source);
            let text = serde_json::to_string(&ce).unwrap();
            let parsed: CloudEvent = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(&parsed, &ce);
            prop_assert_eq!(parsed.to_recorded().unwrap(), event);
        }
    }
}
