//! Pure types shared by every Eventyr crate: the event envelope and its parts, the
//! validation rules for input a user or a peer controls, the CloudEvents 1.0 mapping
//! and the [`Clock`].
//!
//! Architecture invariant: this crate does no IO and knows no async runtime, SQL, HTTP
//! or message broker. Everything here is a value or a pure function of values.

mod cloudevents;
mod event;
mod ids;
mod json;
mod retry;
mod time;
mod validate;

pub use crate::cloudevents::{CloudEvent, CloudEventError, EVENT_TYPE_PREFIX};
pub use crate::event::{Metadata, NewEvent, RecordedEvent};
pub use crate::ids::{EventId, EventType, Position, StreamId, StreamVersion};
pub use crate::json::Json;
pub use crate::retry::RetryPolicy;
pub use crate::time::{Clock, ManualClock, SystemClock, Timestamp};
pub use crate::validate::{Limits, ValidationError};
