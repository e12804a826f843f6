//! Projections built into the binary, run and rebuilt by `eventyr projection`. The
//! reference services add theirs here.

use std::sync::Arc;

use eventyr_core::RecordedEvent;
use eventyr_cqrs::{Projection, ProjectionError};
use eventyr_store::sql::SqlStatement;

/// Every projection this binary knows.
pub fn projections() -> Vec<Arc<dyn Projection>> {
    vec![Arc::new(EventTypes)]
}

/// What the store holds, by event type: how many events, where the first and last
/// ones are, when the last one was recorded.
pub struct EventTypes;

impl Projection for EventTypes {
    fn name(&self) -> &str {
        "event_types"
    }

    fn event_types(&self) -> &[&str] {
        &[]
    }

    fn schema(&self) -> Vec<String> {
        vec![
            "CREATE TABLE event_types (type TEXT PRIMARY KEY, events BIGINT NOT NULL, \
             first_position BIGINT NOT NULL, last_position BIGINT NOT NULL, last_recorded_at TEXT NOT NULL)"
                .into(),
        ]
    }

    fn apply(&self, event: &RecordedEvent) -> Result<Vec<SqlStatement>, ProjectionError> {
        let position =
            i64::try_from(event.position.0).map_err(|e| ProjectionError::new(e.to_string()))?;
        Ok(vec![
            SqlStatement::new(
                "INSERT INTO event_types (type, events, first_position, last_position, last_recorded_at) \
                 VALUES ($1, 1, $2, $2, $3) ON CONFLICT (type) DO UPDATE SET events = event_types.events + 1, \
                 last_position = excluded.last_position, last_recorded_at = excluded.last_recorded_at",
            )
            .bind(event.event_type.as_str())
            .bind(position)
            .bind(event.recorded_at.to_rfc3339()),
        ])
    }
}
