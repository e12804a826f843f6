//! The values that go into and come out of an [`crate::EventStore`].

use std::fmt;
use std::str::FromStr;

use eventyr_core::{Json, NewEvent, Position, RecordedEvent, StreamId, StreamVersion, Timestamp};
use serde::{Deserialize, Serialize};

/// The most events one read returns; larger limits are lowered to it.
pub const READ_LIMIT_MAX: usize = 10_000;

/// What the writer believes about the stream's current version. The append succeeds
/// only if the belief holds (optimistic concurrency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedVersion {
    /// No expectation.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream's last event must have exactly this version.
    Exact(StreamVersion),
}

impl ExpectedVersion {
    /// Whether a stream at `actual` (`None`: no stream) meets the expectation.
    pub fn is_met_by(self, actual: Option<StreamVersion>) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual.is_none(),
            Self::StreamExists => actual.is_some(),
            Self::Exact(expected) => actual == Some(expected),
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no-stream"),
            Self::StreamExists => f.write_str("exists"),
            Self::Exact(version) => write!(f, "{version}"),
        }
    }
}

impl FromStr for ExpectedVersion {
    type Err = String;

    /// `any`, `no-stream`, `exists` or a version number.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "any" => Ok(Self::Any),
            "no-stream" => Ok(Self::NoStream),
            "exists" => Ok(Self::StreamExists),
            number => number
                .parse()
                .map(|v| Self::Exact(StreamVersion(v)))
                .map_err(|_| format!("{text:?} is not any, no-stream, exists or a version number")),
        }
    }
}

/// Events for one stream, with the writer's expectation about that stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAppend {
    pub stream: StreamId,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

impl StreamAppend {
    pub fn new(stream: StreamId, expected: ExpectedVersion, events: Vec<NewEvent>) -> Self {
        Self {
            stream,
            expected,
            events,
        }
    }
}

/// Where an append's events landed. For an idempotent retry, where they landed the
/// first time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendResult {
    pub stream: StreamId,
    pub first_version: StreamVersion,
    /// The stream's version after the append: the next append expects this.
    pub last_version: StreamVersion,
    pub first_position: Position,
    pub last_position: Position,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Forwards,
    Backwards,
}

/// A read of one stream: `limit` events starting at version `from`, going forwards
/// (versions `from`, `from + 1`, …) or backwards (`from`, `from - 1`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadStream {
    pub direction: Direction,
    pub from: StreamVersion,
    pub limit: usize,
}

impl ReadStream {
    /// From `from` forwards, up to [`READ_LIMIT_MAX`] events.
    pub fn forwards(from: StreamVersion) -> Self {
        Self {
            direction: Direction::Forwards,
            from,
            limit: READ_LIMIT_MAX,
        }
    }

    /// From the last event backwards, up to [`READ_LIMIT_MAX`] events.
    pub fn backwards_from_end() -> Self {
        Self::backwards(StreamVersion(u64::MAX))
    }

    pub fn backwards(from: StreamVersion) -> Self {
        Self {
            direction: Direction::Backwards,
            from,
            limit: READ_LIMIT_MAX,
        }
    }

    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// The limit a backend applies: at least 1 and at most [`READ_LIMIT_MAX`].
    pub fn effective_limit(&self) -> usize {
        self.limit.clamp(1, READ_LIMIT_MAX)
    }
}

/// The result of a stream read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSlice {
    pub events: Vec<RecordedEvent>,
    /// The stream's version at the time of the read; `None` if it does not exist.
    pub stream_version: Option<StreamVersion>,
    /// Whether the read reached the end of the stream in its direction.
    pub is_end: bool,
}

/// Which events of `$all` a read or subscription wants. Empty prefixes match all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_prefix: Option<String>,
}

impl Filter {
    pub fn event_type_prefix(prefix: impl Into<String>) -> Self {
        Self {
            event_type_prefix: Some(prefix.into()),
            ..Self::default()
        }
    }

    pub fn stream_prefix(prefix: impl Into<String>) -> Self {
        Self {
            stream_prefix: Some(prefix.into()),
            ..Self::default()
        }
    }

    /// The event type prefix, if it restricts anything (an empty one does not).
    pub fn active_type_prefix(&self) -> Option<&str> {
        self.event_type_prefix.as_deref().filter(|p| !p.is_empty())
    }

    /// The stream prefix, if it restricts anything (an empty one does not).
    pub fn active_stream_prefix(&self) -> Option<&str> {
        self.stream_prefix.as_deref().filter(|p| !p.is_empty())
    }

    pub fn is_empty(&self) -> bool {
        self.active_type_prefix().is_none() && self.active_stream_prefix().is_none()
    }

    pub fn matches(&self, event: &RecordedEvent) -> bool {
        let type_ok = self
            .active_type_prefix()
            .is_none_or(|p| event.event_type.as_str().starts_with(p));
        let stream_ok = self
            .active_stream_prefix()
            .is_none_or(|p| event.stream_id.as_str().starts_with(p));
        type_ok && stream_ok
    }
}

/// A read of `$all`: up to `limit` events matching `filter` at positions `>= from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadAll {
    pub from: Position,
    pub limit: usize,
    pub filter: Filter,
}

impl ReadAll {
    pub fn from(from: Position) -> Self {
        Self {
            from,
            limit: READ_LIMIT_MAX,
            filter: Filter::default(),
        }
    }

    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }

    /// The limit a backend applies: at least 1 and at most [`READ_LIMIT_MAX`].
    pub fn effective_limit(&self) -> usize {
        self.limit.clamp(1, READ_LIMIT_MAX)
    }
}

/// An aggregate's state at a stream version, saved so that loading it need not replay
/// every event. Stored beside the stream, erased with it when it is deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSnapshot {
    pub stream: StreamId,
    /// The version of the last event the state includes.
    pub version: StreamVersion,
    /// The version of the state's shape; a loader ignores snapshots of other versions.
    pub schema_version: u32,
    pub data: Json,
}

/// A stored snapshot: what was saved, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub stream: StreamId,
    pub version: StreamVersion,
    pub schema_version: u32,
    pub data: Json,
    pub taken_at: Timestamp,
}

/// The result of a `$all` read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllSlice {
    /// Matching events in position order.
    pub events: Vec<RecordedEvent>,
    /// Where to continue: every position below it has been considered, including those
    /// the filter skipped.
    pub next: Position,
    /// The last committed position when the read was made (0 for an empty store).
    pub head: Position,
}

impl AllSlice {
    /// Whether the read reached the head: nothing more to read right now.
    pub fn is_end(&self) -> bool {
        self.next > self.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations() {
        let v = |n| Some(StreamVersion(n));
        assert!(ExpectedVersion::Any.is_met_by(None));
        assert!(ExpectedVersion::NoStream.is_met_by(None));
        assert!(!ExpectedVersion::NoStream.is_met_by(v(0)));
        assert!(ExpectedVersion::StreamExists.is_met_by(v(0)));
        assert!(!ExpectedVersion::StreamExists.is_met_by(None));
        assert!(ExpectedVersion::Exact(StreamVersion(2)).is_met_by(v(2)));
        assert!(!ExpectedVersion::Exact(StreamVersion(2)).is_met_by(v(3)));
        assert!(!ExpectedVersion::Exact(StreamVersion(0)).is_met_by(None));
    }

    #[test]
    fn expected_version_parses_from_the_command_line() {
        for text in ["any", "no-stream", "exists", "7"] {
            let parsed: ExpectedVersion = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
        }
        assert!("-1".parse::<ExpectedVersion>().is_err());
    }
}
