//! Identifiers and counters: event ids, stream ids, event types, stream versions and
//! global positions. Names are validated when they are made, so a value of these types
//! is always well-formed.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::validate::{
    EVENT_TYPE_LEN_MAX_BYTES, STREAM_ID_LEN_MAX_BYTES, ValidationError, check_name,
};

/// The identity of an event: a UUID, by default a UUIDv7 (time-ordered, so the store's
/// id index grows at its end). Callers may bring their own (for example one derived from
/// a command id) to make a retried append idempotent. The nil UUID is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "Uuid", into = "Uuid")]
pub struct EventId(Uuid);

impl EventId {
    /// A new UUIDv7 from the system clock and the thread's random generator.
    #[allow(clippy::new_without_default)] // a fresh id is not a "default" value
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn from_uuid(uuid: Uuid) -> Result<Self, ValidationError> {
        if uuid.is_nil() {
            return Err(ValidationError::InvalidId {
                field: "id",
                message: "the nil UUID is not an event id".into(),
            });
        }
        Ok(Self(uuid))
    }

    /// Reads an id from its 16 stored bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ValidationError> {
        let uuid = Uuid::from_slice(bytes).map_err(|e| ValidationError::InvalidId {
            field: "id",
            message: e.to_string(),
        })?;
        Self::from_uuid(uuid)
    }

    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        let uuid = Uuid::parse_str(text).map_err(|e| ValidationError::InvalidId {
            field: "id",
            message: e.to_string(),
        })?;
        Self::from_uuid(uuid)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl TryFrom<Uuid> for EventId {
    type Error = ValidationError;
    fn try_from(uuid: Uuid) -> Result<Self, Self::Error> {
        Self::from_uuid(uuid)
    }
}

impl From<EventId> for Uuid {
    fn from(id: EventId) -> Self {
        id.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Declares a validated string name type with the same shape: `new` validates,
/// `from_stored` trusts a value the store validated when it was written. The text is
/// shared (`Arc<str>`): every event of a stream carries its name, and a clone is a
/// reference count, not an allocation.
macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr, reserve_dollar = $reserve:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, ValidationError> {
                let value = value.into();
                check_name($field, &value, $max)?;
                if $reserve && value.starts_with('$') {
                    return Err(ValidationError::Reserved { field: $field, value });
                }
                Ok(Self(value.into()))
            }

            /// Wraps a value that was validated when it was written. Storage backends
            /// use it on their read path; everything else uses [`Self::new`].
            pub fn from_stored(value: &str) -> Self {
                Self(value.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = ValidationError;
            fn try_from(value: &str) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0.to_string()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// The name of a stream: one aggregate's history, such as `order-42`. Any printable
    /// Unicode up to 256 bytes; names starting with `$` are reserved for the store
    /// (`$all`).
    StreamId, "stream", STREAM_ID_LEN_MAX_BYTES, reserve_dollar = true
);

name_type!(
    /// The name of an event's type, such as `OrderPlaced`. Any printable Unicode up to
    /// 256 bytes. Its schema version travels beside it, not inside it.
    EventType, "type", EVENT_TYPE_LEN_MAX_BYTES, reserve_dollar = false
);

/// A place in the store's global order (`$all`). The first event is at position 1;
/// position 0 means "before everything". Positions are gapless and follow commit order:
/// once a reader has seen position N, no event committed later has a position below N.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Position(pub u64);

impl Position {
    /// Before the first event.
    pub const ZERO: Self = Self(0);
    /// The first position an event can have.
    pub const FIRST: Self = Self(1);

    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An event's place within its stream. The first event of a stream has version 0; a
/// stream's version is the version of its last event.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct StreamVersion(pub u64);

impl StreamVersion {
    pub const FIRST: Self = Self(0);

    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for StreamVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_are_validated() {
        assert!(StreamId::new("order-1").is_ok());
        assert!(StreamId::new("заказ-🚀").is_ok());
        assert!(matches!(
            StreamId::new(""),
            Err(ValidationError::Empty { .. })
        ));
        assert!(matches!(
            StreamId::new("$all"),
            Err(ValidationError::Reserved { .. })
        ));
        assert!(matches!(
            StreamId::new("a\nb"),
            Err(ValidationError::NotPrintable { .. })
        ));
        assert!(matches!(
            StreamId::new("x".repeat(257)),
            Err(ValidationError::TooLong { .. })
        ));
        assert!(
            EventType::new("$Internal").is_ok(),
            "only stream ids reserve '$'"
        );
    }

    #[test]
    fn serde_validates_names() {
        let err = serde_json::from_str::<StreamId>("\"\"").unwrap_err();
        assert!(err.to_string().contains("must not be empty"));
        let ok: StreamId = serde_json::from_str("\"s-1\"").unwrap();
        assert_eq!(ok.as_str(), "s-1");
    }

    #[test]
    fn event_ids_refuse_nil_and_garbage() {
        assert!(EventId::from_uuid(Uuid::nil()).is_err());
        assert!(EventId::parse("not-a-uuid").is_err());
        assert!(EventId::from_bytes(&[1, 2, 3]).is_err());
        let id = EventId::new();
        assert_eq!(EventId::from_bytes(id.as_bytes()).unwrap(), id);
        assert_eq!(EventId::parse(&id.to_string()).unwrap(), id);
    }
}
