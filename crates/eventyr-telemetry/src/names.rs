//! Every metric name and label name Eventyr records, in one place. Names follow the
//! Prometheus conventions: `eventyr_` prefix, unit last (`_seconds`), `_total` on
//! counters.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Label: the aggregate kind (`account`, `order`).
pub const LABEL_AGGREGATE: &str = "aggregate";
/// Label: the command's name.
pub const LABEL_COMMAND: &str = "command";
/// Label: how it ended (`ok`, `rejected`, `conflict`, `duplicate`, `error`).
pub const LABEL_OUTCOME: &str = "outcome";
/// Label: the projection's name.
pub const LABEL_PROJECTION: &str = "projection";

/// Commands handled, by aggregate, command and outcome.
pub const COMMANDS_TOTAL: &str = "eventyr_commands_total";
/// Time from receiving a command to its events being durable.
pub const COMMAND_DURATION_SECONDS: &str = "eventyr_command_duration_seconds";
/// Version conflicts met while appending a command's events.
pub const COMMAND_CONFLICTS_TOTAL: &str = "eventyr_command_conflicts_total";
/// Commands decided again after a version conflict.
pub const COMMAND_RETRIES_TOTAL: &str = "eventyr_command_retries_total";
/// Snapshots saved (or failed to save), by aggregate and outcome.
pub const SNAPSHOTS_TOTAL: &str = "eventyr_snapshots_total";

/// Events a projection has applied (consumed types only).
pub const PROJECTION_EVENTS_APPLIED_TOTAL: &str = "eventyr_projection_events_applied_total";
/// Events committed that a projection has not yet applied.
pub const PROJECTION_LAG_EVENTS: &str = "eventyr_projection_lag_events";
/// How old the events a projection applies are when it applies them.
pub const PROJECTION_LAG_SECONDS: &str = "eventyr_projection_lag_seconds";
/// Failed attempts to apply a batch, by projection.
pub const PROJECTION_FAILURES_TOTAL: &str = "eventyr_projection_failures_total";

/// Registers help texts and units with the installed recorder.
pub fn describe() {
    describe_counter!(
        COMMANDS_TOTAL,
        "Commands handled, by aggregate, command and outcome."
    );
    describe_histogram!(
        COMMAND_DURATION_SECONDS,
        Unit::Seconds,
        "Time from receiving a command to its events being durable."
    );
    describe_counter!(
        COMMAND_CONFLICTS_TOTAL,
        "Version conflicts met while appending a command's events."
    );
    describe_counter!(
        COMMAND_RETRIES_TOTAL,
        "Commands decided again after a version conflict."
    );
    describe_counter!(SNAPSHOTS_TOTAL, "Aggregate snapshots saved, by outcome.");
    describe_counter!(
        PROJECTION_EVENTS_APPLIED_TOTAL,
        "Events a projection has applied."
    );
    describe_gauge!(
        PROJECTION_LAG_EVENTS,
        "Committed events a projection has not applied yet."
    );
    describe_gauge!(
        PROJECTION_LAG_SECONDS,
        Unit::Seconds,
        "Age of the events a projection applied last, when it applied them."
    );
    describe_counter!(
        PROJECTION_FAILURES_TOTAL,
        "Failed attempts to apply a batch, by projection."
    );
}
