//! Event schema evolution: a registry of upcasters, each taking one event type from
//! one schema version to the next. Aggregates and projections read every stored event
//! through it, so they only ever see the current version.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use eventyr_core::{Json, RecordedEvent};

/// One step: the data of version N in, the data of version N + 1 out.
pub type UpcastStep = dyn Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync;

/// Why a stored event cannot be brought to the current version of its type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpcastError {
    #[error(
        "event {event_type} has schema version {version}, newer than the {current} this code knows"
    )]
    NewerThanKnown {
        event_type: String,
        version: u32,
        current: u32,
    },
    #[error("no upcaster for event {event_type} from schema version {from}")]
    MissingStep { event_type: String, from: u32 },
    #[error("upcasting event {event_type} from schema version {from} failed: {message}")]
    Failed {
        event_type: String,
        from: u32,
        message: String,
    },
}

/// Upcasters by (event type, from version). Cheap to clone.
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: HashMap<(String, u32), Arc<UpcastStep>>,
    current: HashMap<String, u32>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upcasters")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl Upcasters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the step of `event_type` from `from_version` to `from_version + 1`. The
    /// current version of the type becomes the highest version its steps reach.
    pub fn step(
        mut self,
        event_type: &str,
        from_version: u32,
        step: impl Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync + 'static,
    ) -> Self {
        self.steps
            .insert((event_type.to_owned(), from_version), Arc::new(step));
        let current = self.current.entry(event_type.to_owned()).or_insert(1);
        *current = (*current).max(from_version + 1);
        self
    }

    /// The schema version events of this type are written with now.
    pub fn current_version(&self, event_type: &str) -> u32 {
        self.current.get(event_type).copied().unwrap_or(1)
    }

    /// The event at the current version of its type. An event already current is
    /// returned as it is, without parsing its data.
    pub fn upcast(&self, mut event: RecordedEvent) -> Result<RecordedEvent, UpcastError> {
        let event_type = event.event_type.as_str();
        let current = self.current_version(event_type);
        let version = event.schema_version;
        if version == current {
            return Ok(event);
        }
        if version > current {
            return Err(UpcastError::NewerThanKnown {
                event_type: event_type.to_owned(),
                version,
                current,
            });
        }
        let failed = |from: u32, message: String| UpcastError::Failed {
            event_type: event_type.to_owned(),
            from,
            message,
        };
        let mut data = event
            .data
            .to_value()
            .map_err(|e| failed(version, e.to_string()))?;
        for from in version..current {
            let step = self
                .steps
                .get(&(event_type.to_owned(), from))
                .ok_or_else(|| UpcastError::MissingStep {
                    event_type: event_type.to_owned(),
                    from,
                })?;
            data = step(data).map_err(|message| failed(from, message))?;
        }
        event.data = Json::encode(&data).map_err(|e| failed(current - 1, e.to_string()))?;
        event.schema_version = current;
        Ok(event)
    }
}
