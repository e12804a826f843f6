//! Domain events and their stored form.
//!
//! An aggregate's events are a Rust enum; the store keeps a type name and JSON data.
//! [`DomainEvent`] converts between the two. Any serde enum written as
//! `#[serde(tag = "type", content = "data")]` gets it by implementing the marker
//! [`AdjacentlyTagged`]: the variant name is the event type, its fields the data.

use eventyr_core::{EventType, Json, ValidationError};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// An event could not be turned into its stored form or back.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode event: {0}")]
    Encode(String),
    #[error("cannot decode a {event_type} event: {message}")]
    Decode { event_type: String, message: String },
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

/// A Rust value that is stored as an event.
pub trait DomainEvent: Sized + Send + Sync + 'static {
    /// The event type and data to store.
    fn to_stored(&self) -> Result<(EventType, Json), CodecError>;
    /// The event from its stored type and data (already upcast to the current schema).
    fn from_stored(event_type: &EventType, data: &Json) -> Result<Self, CodecError>;
}

/// Marks a serde enum declared `#[serde(tag = "type", content = "data")]`, which makes
/// it a [`DomainEvent`].
pub trait AdjacentlyTagged: Serialize + DeserializeOwned + Send + Sync + 'static {}

impl<T: AdjacentlyTagged> DomainEvent for T {
    fn to_stored(&self) -> Result<(EventType, Json), CodecError> {
        let value = serde_json::to_value(self).map_err(|e| CodecError::Encode(e.to_string()))?;
        let serde_json::Value::Object(mut fields) = value else {
            return Err(CodecError::Encode("not an adjacently tagged enum".into()));
        };
        let Some(serde_json::Value::String(name)) = fields.remove("type") else {
            return Err(CodecError::Encode(
                "no \"type\" tag: declare #[serde(tag = \"type\", content = \"data\")]".into(),
            ));
        };
        let data = fields.remove("data").unwrap_or(serde_json::Value::Null);
        Ok((EventType::new(name)?, Json::encode(&data)?))
    }

    fn from_stored(event_type: &EventType, data: &Json) -> Result<Self, CodecError> {
        let decode_error = |message: String| CodecError::Decode {
            event_type: event_type.to_string(),
            message,
        };
        let data = data.to_value().map_err(|e| decode_error(e.to_string()))?;
        let mut tagged = serde_json::Map::with_capacity(2);
        tagged.insert(
            "type".into(),
            serde_json::Value::String(event_type.to_string()),
        );
        if !data.is_null() {
            tagged.insert("data".into(), data);
        }
        serde_json::from_value(serde_json::Value::Object(tagged))
            .map_err(|e| decode_error(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", content = "data")]
    enum Happened {
        Opened { owner: String },
        Moved(i64),
        Closed,
    }
    impl AdjacentlyTagged for Happened {}

    #[test]
    fn variants_become_types_and_data() {
        for event in [
            Happened::Opened {
                owner: "ann".into(),
            },
            Happened::Moved(-3),
            Happened::Closed,
        ] {
            let (event_type, data) = event.to_stored().unwrap();
            assert_eq!(Happened::from_stored(&event_type, &data).unwrap(), event);
        }
        let (event_type, data) = Happened::Opened {
            owner: "ann".into(),
        }
        .to_stored()
        .unwrap();
        assert_eq!(event_type.as_str(), "Opened");
        assert_eq!(data.as_str(), Some(r#"{"owner":"ann"}"#));
    }

    #[test]
    fn unknown_types_and_bad_data_are_errors() {
        let unknown = EventType::new("Vanished").unwrap();
        assert!(Happened::from_stored(&unknown, &Json::encode(&1).unwrap()).is_err());
        let opened = EventType::new("Opened").unwrap();
        assert!(Happened::from_stored(&opened, &Json::encode(&"no fields").unwrap()).is_err());
    }
}
