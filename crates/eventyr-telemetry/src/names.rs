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
/// Label: the producing service (`order`, `inventory`).
pub const LABEL_SERVICE: &str = "service";
/// Label: a bus consumer's name.
pub const LABEL_CONSUMER: &str = "consumer";

/// Broken cross-service invariants the last reconciliation found ("Data inconsistency
/// detected").
pub const RECONCILIATION_MISMATCHES: &str = "eventyr_reconciliation_mismatches";

/// Label: a saga type (`order`, `trip`).
pub const LABEL_SAGA_TYPE: &str = "saga_type";
/// Label: a saga step's name.
pub const LABEL_STEP: &str = "step";
/// Label: a saga's final status (`COMPLETED`, `COMPENSATED`, `FAILED`).
pub const LABEL_STATUS: &str = "status";

/// Sagas started, by type.
pub const SAGA_STARTED_TOTAL: &str = "eventyr_saga_started_total";
/// Sagas finished, by type and final status.
pub const SAGA_FINISHED_TOTAL: &str = "eventyr_saga_finished_total";
/// Sagas running in this engine.
pub const SAGA_IN_FLIGHT: &str = "eventyr_saga_in_flight";
/// From start to finish, by type and final status.
pub const SAGA_DURATION_SECONDS: &str = "eventyr_saga_duration_seconds";
/// One attempt of a step (or compensation) from call to reply, by type and step.
pub const SAGA_STEP_DURATION_SECONDS: &str = "eventyr_saga_step_duration_seconds";
/// Failed or timed-out step attempts, by type and step.
pub const SAGA_STEP_FAILURES_TOTAL: &str = "eventyr_saga_step_failures_total";
/// Compensations given up on (the saga is flagged for manual intervention).
pub const SAGA_COMPENSATIONS_FAILED_TOTAL: &str = "eventyr_saga_compensations_failed_total";
/// Choreographed flows not finished within their deadline, by flow (as of the last
/// look at the tracker).
pub const SAGA_FLOWS_STUCK: &str = "eventyr_saga_flows_stuck";
/// Orchestrated sagas running past their saga type's deadline, by type (as of the
/// saga monitor's last look).
pub const SAGA_STUCK: &str = "eventyr_saga_stuck";
/// Label: a choreographed flow's name.
pub const LABEL_FLOW: &str = "flow";
/// 1 while the circuit breaker of a saga step's HTTP participant is open, by step.
pub const SAGA_CIRCUIT_OPEN: &str = "eventyr_saga_circuit_open";
/// Step calls refused by a full bulkhead, by step.
pub const SAGA_BULKHEAD_REJECTED_TOTAL: &str = "eventyr_saga_bulkhead_rejected_total";
/// How long the gateway took to answer (OpenTelemetry's `http.server.request.duration`),
/// seconds, by method (`_OTHER` beyond the standard ones), route (its configured name,
/// `none` without one) and status code.
pub const HTTP_SERVER_REQUEST_DURATION_SECONDS: &str = "http_server_request_duration_seconds";
/// Requests under way in the gateway.
pub const HTTP_SERVER_ACTIVE_REQUESTS: &str = "http_server_active_requests";
/// How long an upstream took to answer one attempt, seconds, by cluster and status
/// code (`error` without an answer, `timeout`).
pub const HTTP_CLIENT_REQUEST_DURATION_SECONDS: &str = "http_client_request_duration_seconds";
/// Attempts the gateway made again, by cluster and reason (`connect_failure`,
/// `gateway_error`, `5xx`, `timeout`).
pub const GATEWAY_RETRIES_TOTAL: &str = "eventyr_gateway_retries_total";
/// Retries the retry budget refused, by cluster.
pub const GATEWAY_RETRY_BUDGET_EXHAUSTED_TOTAL: &str =
    "eventyr_gateway_retry_budget_exhausted_total";
/// Circuit-breaker transitions, by cluster and the state entered.
pub const GATEWAY_CIRCUIT_TRANSITIONS_TOTAL: &str = "eventyr_gateway_circuit_transitions_total";
/// 1 while an endpoint passes its active health checks, 0 while not, by cluster and
/// endpoint (`host:port`, from the configuration: bounded).
pub const GATEWAY_ENDPOINT_HEALTHY: &str = "eventyr_gateway_endpoint_healthy";
/// Endpoints ejected by passive outlier detection, by cluster.
pub const GATEWAY_EJECTIONS_TOTAL: &str = "eventyr_gateway_ejections_total";
/// Response-cache lookups, by route and result (`hit`, `miss`, `bypass`).
pub const GATEWAY_CACHE_TOTAL: &str = "eventyr_gateway_cache_total";
/// Configuration reloads, by outcome (`applied`, `refused`).
pub const GATEWAY_CONFIG_RELOADS_TOTAL: &str = "eventyr_gateway_config_reloads_total";
/// Label: an HTTP method.
pub const LABEL_METHOD: &str = "method";
/// Label: a gateway endpoint's `host:port`.
pub const LABEL_ENDPOINT: &str = "endpoint";
/// Label: a state entered.
pub const LABEL_STATE: &str = "state";
/// Label: what a lookup found.
pub const LABEL_RESULT: &str = "result";
/// 1 while a gateway cluster's circuit breaker is open (0.5 half-open), by cluster.
pub const GATEWAY_CIRCUIT_OPEN: &str = "eventyr_gateway_circuit_open";
/// Requests the gateway shed before any upstream saw them, by cluster and reason
/// (`circuit_open`, `overloaded`).
pub const GATEWAY_SHED_TOTAL: &str = "eventyr_gateway_shed_total";
/// Credentials the gateway refused (security events), by reason.
pub const GATEWAY_AUTH_FAILURES_TOTAL: &str = "eventyr_gateway_auth_failures_total";
/// Connections a listener closed at once, by listener and reason (`max_connections`,
/// `down`).
pub const HTTP_CONNECTIONS_REJECTED_TOTAL: &str = "eventyr_http_connections_rejected_total";
/// Label: which of a process's listeners (from the code: bounded).
pub const LABEL_LISTENER: &str = "listener";
/// Requests a service refused for who sent them (no internal credential, not the
/// owner, not allowed), by reason.
pub const SERVICE_SECURITY_EVENTS_TOTAL: &str = "eventyr_service_security_events_total";
/// Rate-limit decisions, by rule and decision (`allowed`, `limited`, `shadow_limited`,
/// `backend_error`).
pub const GATEWAY_RATELIMIT_DECISIONS_TOTAL: &str = "eventyr_gateway_ratelimit_decisions_total";
/// Label: a rate-limit rule's name (from the configuration: bounded).
pub const LABEL_RULE: &str = "rule";
/// Label: a rate-limit decision.
pub const LABEL_DECISION: &str = "decision";
/// Label: a gateway cluster's name (from its configuration: bounded).
pub const LABEL_CLUSTER: &str = "cluster";
/// Label: why a request was shed.
pub const LABEL_REASON: &str = "reason";
/// Label: a gateway route's name (from its configuration: bounded).
pub const LABEL_ROUTE: &str = "route";
/// Sagas whose log could not be read, ended FAILED and flagged.
pub const SAGA_CORRUPT_TOTAL: &str = "eventyr_saga_corrupt_total";
/// Timers armed and not yet rung (deadlines and retries).
pub const SAGA_TIMERS_PENDING: &str = "eventyr_saga_timers_pending";

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

/// Events the outbox relay has published (broker-acknowledged), by service.
pub const BUS_PUBLISHED_TOTAL: &str = "eventyr_bus_published_total";
/// Committed events the relay has not published yet, by service.
pub const BUS_RELAY_LAG_EVENTS: &str = "eventyr_bus_relay_lag_events";
/// Messages delivered to a consumer instance, redeliveries included.
pub const BUS_DELIVERED_TOTAL: &str = "eventyr_bus_delivered_total";
/// Messages a consumer acknowledged (effect committed, duplicate, or dead-lettered).
pub const BUS_ACKNOWLEDGED_TOTAL: &str = "eventyr_bus_acknowledged_total";
/// Messages delivered again (after a crash, a timeout or an ordering wait).
pub const BUS_REDELIVERED_TOTAL: &str = "eventyr_bus_redelivered_total";
/// Deliveries whose effect had already been committed: acknowledged, not handled.
pub const BUS_DUPLICATES_TOTAL: &str = "eventyr_bus_duplicates_total";
/// Handler attempts retried after a transient error.
pub const BUS_RETRIES_TOTAL: &str = "eventyr_bus_retries_total";
/// Messages moved to the dead-letter store.
pub const BUS_DEAD_LETTERED_TOTAL: &str = "eventyr_bus_dead_lettered_total";
/// Dead letters waiting for an operator (alert when above 0).
pub const BUS_DEAD_LETTERS: &str = "eventyr_bus_dead_letters";
/// Messages handled although their stream's previous message never came.
pub const BUS_ORDER_GAPS_TOTAL: &str = "eventyr_bus_order_gaps_total";
/// Messages waiting for a consumer (not delivered, or delivered and not acknowledged).
pub const BUS_CONSUMER_LAG_MESSAGES: &str = "eventyr_bus_consumer_lag_messages";
/// Age of the messages a consumer handles, when it handles them.
pub const BUS_CONSUMER_LAG_SECONDS: &str = "eventyr_bus_consumer_lag_seconds";

/// Registers help texts and units with the installed recorder.
pub fn describe() {
    describe_counter!(
        BUS_PUBLISHED_TOTAL,
        "Events the outbox relay has published, by service."
    );
    describe_gauge!(
        BUS_RELAY_LAG_EVENTS,
        "Committed events the outbox relay has not published yet."
    );
    describe_counter!(
        BUS_DELIVERED_TOTAL,
        "Messages delivered to a consumer, redeliveries included."
    );
    describe_counter!(BUS_ACKNOWLEDGED_TOTAL, "Messages a consumer acknowledged.");
    describe_counter!(
        BUS_REDELIVERED_TOTAL,
        "Messages delivered to a consumer again."
    );
    describe_counter!(
        BUS_DUPLICATES_TOTAL,
        "Deliveries whose effect was already committed."
    );
    describe_counter!(
        BUS_RETRIES_TOTAL,
        "Handler attempts retried after a transient error."
    );
    describe_counter!(
        BUS_DEAD_LETTERED_TOTAL,
        "Messages moved to the dead-letter store."
    );
    describe_gauge!(
        BUS_DEAD_LETTERS,
        "Dead letters waiting for an operator; alert when above 0."
    );
    describe_counter!(
        BUS_ORDER_GAPS_TOTAL,
        "Messages handled although their stream's previous message never came."
    );
    describe_gauge!(
        BUS_CONSUMER_LAG_MESSAGES,
        "Messages waiting for a consumer."
    );
    describe_gauge!(
        BUS_CONSUMER_LAG_SECONDS,
        Unit::Seconds,
        "Age of the messages a consumer handles, when it handles them."
    );
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
    describe_gauge!(
        RECONCILIATION_MISMATCHES,
        "Broken cross-service invariants the last reconciliation found."
    );
    describe_counter!(SAGA_STARTED_TOTAL, "Sagas started, by type.");
    describe_counter!(
        SAGA_FINISHED_TOTAL,
        "Sagas finished, by type and final status (COMPLETED, COMPENSATED, FAILED)."
    );
    describe_gauge!(
        SAGA_STUCK,
        "Sagas running past their saga type's deadline, by type."
    );
    describe_gauge!(SAGA_IN_FLIGHT, "Sagas running in this engine.");
    describe_histogram!(
        SAGA_DURATION_SECONDS,
        Unit::Seconds,
        "Saga duration from start to finish, by type and final status."
    );
    describe_histogram!(
        SAGA_STEP_DURATION_SECONDS,
        Unit::Seconds,
        "One attempt of a saga step or compensation, from call to reply, by type and step."
    );
    describe_counter!(
        SAGA_STEP_FAILURES_TOTAL,
        "Failed or timed-out saga step attempts, by type and step."
    );
    describe_counter!(
        SAGA_COMPENSATIONS_FAILED_TOTAL,
        "Compensations given up on: the saga is FAILED and flagged for manual intervention."
    );
    describe_gauge!(SAGA_TIMERS_PENDING, "Saga timers armed and not yet rung.");
    describe_counter!(
        SAGA_CORRUPT_TOTAL,
        "Sagas whose log could not be read at recovery: ended FAILED and flagged for manual intervention."
    );
    describe_gauge!(
        SAGA_CIRCUIT_OPEN,
        "1 while the circuit breaker of a saga step's HTTP participant is open, by step."
    );
    describe_counter!(
        SAGA_BULKHEAD_REJECTED_TOTAL,
        "Saga step calls refused by a full bulkhead, by step."
    );
    describe_gauge!(
        SAGA_FLOWS_STUCK,
        "Choreographed flows not finished within their deadline, by flow."
    );
    describe_counter!(
        GATEWAY_AUTH_FAILURES_TOTAL,
        "Credentials the gateway refused (invalid tokens, unknown API keys, missing or insufficient credentials), by reason."
    );
    describe_counter!(
        HTTP_CONNECTIONS_REJECTED_TOTAL,
        "Connections a listener closed at once (at its connection limit, or while down), by listener and reason."
    );
    describe_counter!(
        SERVICE_SECURITY_EVENTS_TOTAL,
        "Requests the services refused for who sent them (no internal credential, another customer's resource, an admin operation), by reason."
    );
    describe_counter!(
        GATEWAY_RATELIMIT_DECISIONS_TOTAL,
        "Rate-limit decisions of the gateway, by rule and decision."
    );
    describe_gauge!(
        GATEWAY_CIRCUIT_OPEN,
        "1 while a gateway cluster's circuit breaker is open, 0.5 half-open, 0 closed."
    );
    describe_counter!(
        GATEWAY_SHED_TOTAL,
        "Requests shed by the gateway before reaching an upstream, by cluster and reason."
    );
    describe_histogram!(
        HTTP_SERVER_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "How long the gateway took to answer, by method, route and status code."
    );
    describe_gauge!(
        HTTP_SERVER_ACTIVE_REQUESTS,
        "Requests under way in the gateway."
    );
    describe_histogram!(
        HTTP_CLIENT_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "How long one upstream attempt took, by cluster and status code (error, timeout)."
    );
    describe_counter!(
        GATEWAY_RETRIES_TOTAL,
        "Upstream attempts made again, by cluster and reason."
    );
    describe_counter!(
        GATEWAY_RETRY_BUDGET_EXHAUSTED_TOTAL,
        "Retries the cluster's retry budget refused, by cluster."
    );
    describe_counter!(
        GATEWAY_CIRCUIT_TRANSITIONS_TOTAL,
        "Circuit-breaker transitions, by cluster and the state entered."
    );
    describe_gauge!(
        GATEWAY_ENDPOINT_HEALTHY,
        "1 while an endpoint passes its active health checks, by cluster and endpoint."
    );
    describe_counter!(
        GATEWAY_EJECTIONS_TOTAL,
        "Endpoints ejected as outliers, by cluster."
    );
    describe_counter!(
        GATEWAY_CACHE_TOTAL,
        "Response-cache lookups, by route and result."
    );
    describe_counter!(
        GATEWAY_CONFIG_RELOADS_TOTAL,
        "Configuration reloads, by outcome."
    );
}
