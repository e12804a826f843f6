//! Validation rules for everything a user or a peer can put into an event, and the
//! limits that bound it. Every violation is a [`ValidationError`] naming the field.

use crate::ids::{EventId, StreamId};

/// The longest stream id, in bytes of UTF-8.
pub const STREAM_ID_LEN_MAX_BYTES: usize = 256;
/// The longest event type, in bytes of UTF-8.
pub const EVENT_TYPE_LEN_MAX_BYTES: usize = 256;
/// The longest metadata value (correlation id, causation id, user id), in bytes.
pub const METADATA_VALUE_LEN_MAX_BYTES: usize = 256;

/// Bounds on what one append may carry. Backends enforce them before anything is
/// written; the defaults suit a service's event store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest event: its data plus its metadata, in bytes. Default 1 MiB.
    pub event_size_max_bytes: usize,
    /// The most events one append call may carry, over all its streams. Default 10 000.
    pub append_events_max: usize,
    /// The most bytes one append call may carry, over all its events. Default 64 MiB.
    pub append_size_max_bytes: usize,
    /// The largest aggregate snapshot, in bytes. Default 16 MiB.
    pub snapshot_size_max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            event_size_max_bytes: 1024 * 1024,
            append_events_max: 10_000,
            append_size_max_bytes: 64 * 1024 * 1024,
            snapshot_size_max_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Input that breaks a rule. The variants are stable: they cross process boundaries as
/// the `invalid_input` error with the field named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes long, the limit is {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} contains a control character at character {index}")]
    NotPrintable { field: &'static str, index: usize },
    #[error("{field} {value:?} is reserved: names starting with '$' belong to the store")]
    Reserved { field: &'static str, value: String },
    #[error("{field} is not valid JSON: {message}")]
    InvalidJson {
        field: &'static str,
        message: String,
    },
    #[error("{field} is not a valid id: {message}")]
    InvalidId {
        field: &'static str,
        message: String,
    },
    #[error("traceparent {value:?} is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)")]
    InvalidTraceparent { value: String },
    #[error("schema_version must be at least 1")]
    InvalidSchemaVersion,
    #[error("event {event_id} is {size} bytes, the limit is {max}")]
    EventTooLarge {
        event_id: EventId,
        size: usize,
        max: usize,
    },
    #[error("the append carries {count} events, the limit is {max}")]
    TooManyEvents { count: usize, max: usize },
    #[error("the append carries {size} bytes, the limit is {max}")]
    AppendTooLarge { size: usize, max: usize },
    #[error("the append to stream {stream} carries no events")]
    EmptyAppend { stream: StreamId },
    #[error("event id {event_id} appears twice in one append")]
    DuplicateEventId { event_id: EventId },
    #[error("stream {stream} appears twice in one atomic append")]
    DuplicateStream { stream: StreamId },
    #[error("an atomic append must name at least one stream")]
    NothingToAppend,
    #[error("the snapshot is {size} bytes, the limit is {max}")]
    SnapshotTooLarge { size: usize, max: usize },
    #[error("a snapshot at version {snapshot} is ahead of its stream, which is at {stream}")]
    SnapshotAhead { snapshot: u64, stream: u64 },
}

impl ValidationError {
    /// The name of the offending field, for the `details` of an error body.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Empty { field }
            | Self::TooLong { field, .. }
            | Self::NotPrintable { field, .. }
            | Self::Reserved { field, .. }
            | Self::InvalidJson { field, .. }
            | Self::InvalidId { field, .. } => field,
            Self::InvalidTraceparent { .. } => "metadata.traceparent",
            Self::InvalidSchemaVersion => "schema_version",
            Self::EventTooLarge { .. } => "data",
            Self::TooManyEvents { .. } | Self::AppendTooLarge { .. } | Self::EmptyAppend { .. } => {
                "events"
            }
            Self::DuplicateEventId { .. } => "id",
            Self::DuplicateStream { .. } | Self::NothingToAppend => "stream",
            Self::SnapshotTooLarge { .. } | Self::SnapshotAhead { .. } => "snapshot",
        }
    }
}

/// Checks a name (stream id, event type, metadata value): non-empty, at most `max`
/// bytes, and free of control characters.
pub(crate) fn check_name(
    field: &'static str,
    value: &str,
    max: usize,
) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    if value.len() > max {
        return Err(ValidationError::TooLong {
            field,
            len: value.len(),
            max,
        });
    }
    if let Some(index) = value.chars().position(char::is_control) {
        return Err(ValidationError::NotPrintable { field, index });
    }
    Ok(())
}

/// Checks a W3C `traceparent` header value: version `00`, a 32-hex trace id and a
/// 16-hex parent id that are not all zeros, and 2-hex flags. Lowercase only, as the
/// specification requires.
pub(crate) fn check_traceparent(value: &str) -> Result<(), ValidationError> {
    let invalid = || ValidationError::InvalidTraceparent {
        value: value.chars().take(64).collect(),
    };
    let parts: Vec<&str> = value.split('-').collect();
    let [version, trace_id, parent_id, flags] = parts.as_slice() else {
        return Err(invalid());
    };
    let is_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let all_zero = |s: &str| s.bytes().all(|b| b == b'0');
    if *version != "00"
        || !is_hex(trace_id, 32)
        || !is_hex(parent_id, 16)
        || !is_hex(flags, 2)
        || all_zero(trace_id)
        || all_zero(parent_id)
    {
        return Err(invalid());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_non_empty_bounded_and_printable() {
        assert_eq!(
            check_name("f", "", 4),
            Err(ValidationError::Empty { field: "f" })
        );
        assert_eq!(
            check_name("f", "abcde", 4),
            Err(ValidationError::TooLong {
                field: "f",
                len: 5,
                max: 4
            })
        );
        assert_eq!(
            check_name("f", "a\u{7}b", 8),
            Err(ValidationError::NotPrintable {
                field: "f",
                index: 1
            })
        );
        assert_eq!(check_name("f", "ok-ÿ-名", 64), Ok(()));
    }

    #[test]
    fn traceparent_follows_w3c() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(check_traceparent(good), Ok(()));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(check_traceparent(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
