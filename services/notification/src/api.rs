//! The notification service's HTTP API, as `contracts/notification.yaml` specifies it:
//! a customer's notifications (newest first, read from the customer's mailbox stream),
//! and the order saga's send step, idempotent by notification id. Its demonstration
//! failure rate is the `/admin/faults` knob.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use eventyr_core::StreamVersion;
use eventyr_cqrs::{CommandError, CommandHandler, DomainEvent};
use eventyr_http::{
    ApiError, CUSTOMER_ID_RULE, Caller, Faults, FieldError, ID_RULE, Input, Validate, check,
    command_failure, valid_customer_id, valid_id,
};
use eventyr_store::{EventStore, ReadStream};
use serde::{Deserialize, Serialize};

use crate::domain::{MESSAGE_MAX_BYTES, Mailbox, MailboxCommand, MailboxError, MailboxEvent};

/// The notification service's state.
#[derive(Clone)]
pub struct Notifications {
    pub mailboxes: Arc<CommandHandler<Mailbox>>,
    pub store: Arc<dyn EventStore>,
    pub faults: Faults,
}

/// The public routes only: what the public API serves (the saga's steps stay on the
/// service's own listener).
pub fn public(notifications: Notifications) -> Router {
    public_routes().with_state(notifications)
}

fn public_routes() -> Router<Notifications> {
    Router::new().route("/api/notifications", get(list))
}

/// The order saga's step this service serves.
pub const STEPS: [eventyr_http::StepRoute; 1] = [eventyr_http::StepRoute {
    step: "notification",
    action: "/internal/notifications",
    compensation: None,
}];

pub fn router(notifications: Notifications) -> Router {
    let steps = Router::new().route("/internal/notifications", post(send));
    let public = public_routes();
    let faults = notifications.faults.clone();
    eventyr_http::service(public, steps, notifications, &faults)
}

fn failure(error: CommandError<MailboxError>) -> ApiError {
    command_failure(error, |rejected| {
        ApiError::invalid(vec![FieldError::new("/message", rejected.to_string())])
    })
}

#[derive(Debug, Serialize)]
struct View {
    notification_id: String,
    customer_id: String,
    message: String,
    sent_at: String,
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    customer_id: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// The most notifications one page holds.
const PAGE_MAX: usize = 100;

/// A customer's notifications: a customer's own (without `customer_id` too); another
/// customer's is 403.
async fn list(
    State(notifications): State<Notifications>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let customer_id = caller.list_scope(query.customer_id)?.unwrap_or_default();
    check(
        "customer_id",
        valid_customer_id(&customer_id),
        CUSTOMER_ID_RULE,
    )?;
    let limit = query.limit.unwrap_or(20);
    check("limit", (1..=PAGE_MAX).contains(&limit), "1 to 100")?;
    // The cursor is the stream version to continue below.
    let before = match query.cursor.as_deref() {
        None => None,
        Some(cursor) => Some(cursor.parse::<u64>().map_err(|_| {
            ApiError::invalid(vec![FieldError::new("cursor", "a cursor from next_cursor")])
        })?),
    };
    let stream = CommandHandler::<Mailbox>::stream(&customer_id)
        .map_err(|e| ApiError::invalid(vec![FieldError::new("customer_id", e.to_string())]))?;
    let read = match before {
        Some(0) => {
            return Ok(Json(
                serde_json::json!({ "items": [], "next_cursor": null }),
            ));
        }
        Some(version) => ReadStream::backwards(StreamVersion(version - 1)),
        None => ReadStream::backwards_from_end(),
    };
    let slice = notifications
        .store
        .read_stream(&stream, read.limit(limit))
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let mut items = Vec::with_capacity(slice.events.len());
    for event in &slice.events {
        let decoded = MailboxEvent::from_stored(&event.event_type, &event.data)
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        let MailboxEvent::NotificationSent {
            notification_id,
            customer_id,
            message,
        } = decoded;
        items.push(View {
            notification_id,
            customer_id,
            message,
            sent_at: event.recorded_at.to_rfc3339(),
        });
    }
    let next_cursor = match (slice.events.len() == limit, slice.events.last()) {
        (true, Some(last)) if last.version.0 > 0 => Some(last.version.0.to_string()),
        _ => None,
    };
    Ok(Json(
        serde_json::json!({ "items": items, "next_cursor": next_cursor }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    notification_id: String,
    customer_id: String,
    message: String,
}

impl Validate for SendBody {
    fn validate(&self) -> Vec<FieldError> {
        let mut fields = Vec::new();
        if !valid_id(&self.notification_id) {
            fields.push(FieldError::new("/notification_id", ID_RULE));
        }
        if !valid_customer_id(&self.customer_id) {
            fields.push(FieldError::new("/customer_id", CUSTOMER_ID_RULE));
        }
        if !(1..=MESSAGE_MAX_BYTES).contains(&self.message.len()) {
            fields.push(FieldError::new(
                "/message",
                format!("1 to {MESSAGE_MAX_BYTES} bytes"),
            ));
        }
        fields
    }
}

async fn send(
    State(notifications): State<Notifications>,
    Input(body): Input<SendBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let command = MailboxCommand::Send {
        notification_id: body.notification_id.clone(),
        customer_id: body.customer_id.clone(),
        message: body.message.clone(),
    };
    let id = format!("send:{}", body.notification_id);
    eventyr_http::execute(
        &notifications.mailboxes,
        &body.customer_id,
        id,
        command,
        failure,
    )
    .await?;
    Ok(Json(serde_json::json!({
        "notification_id": body.notification_id,
        "customer_id": body.customer_id,
        "message": body.message,
    })))
}
