//! The order saga (PLAN.md), orchestrated: its definition, pure.
//!
//! Steps, each idempotent by the order id (the saga's id):
//! 1. `order` (compensable, this service): nothing forward; its compensation fails the
//!    order with the saga's reason. First, so that it is compensated last.
//! 2. `inventory` reserve (30 s) — compensation: release.
//! 3. `payment` charge the amount due after points (60 s) — compensation: refund.
//! 4. `points` deduct (10 s), skipped when the order uses none — compensation: restore.
//! 5. `shipping` create the shipment (120 s) — compensation: cancel.
//! 6. `confirm` the reservation: the stock has shipped (retriable-only).
//! 7. `notification` (30 s, retriable-only: retried, never compensated).
//! 8. `complete` (retriable-only, this service): the order is COMPLETED.
//!
//! Choreographed ([`chain`]), the same definition runs without the engine: each
//! service reacts to the events of its neighbours in [`SERVICES`], starting with a
//! choreographed order's `OrderCreated`.

use std::sync::Arc;
use std::time::Duration;

use eventyr_bus::Message;
use eventyr_core::RetryPolicy;
use eventyr_cqrs::{Aggregate, DomainEvent};
use eventyr_saga::chain::Chain;
use eventyr_saga::machine::REASON_KEY;
use eventyr_saga::{SagaDefinition, Step};
use serde_json::{Value, json};

use crate::domain::{Order, OrderEvent, SagaMode};

/// The saga type.
pub const SAGA_TYPE: &str = "order";

/// Per-step timeouts (PLAN.md), changeable for demonstrations and tests.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub inventory: Duration,
    pub payment: Duration,
    pub points: Duration,
    pub shipping: Duration,
    pub notification: Duration,
    /// The retry policy of every step and compensation.
    pub retry: RetryPolicy,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            inventory: Duration::from_secs(30),
            payment: Duration::from_secs(60),
            points: Duration::from_secs(10),
            shipping: Duration::from_secs(120),
            notification: Duration::from_secs(30),
            retry: eventyr_saga::definition::STEP_RETRY,
        }
    }
}

/// The saga's data for an order.
pub fn data(order: &Order) -> Value {
    json!({
        "order_id": order.order_id,
        "customer_id": order.customer_id,
        "items": order.lines.iter().map(|l| json!({ "sku": l.sku, "quantity": l.quantity })).collect::<Vec<_>>(),
        "total_cents": order.total_cents,
        "points_used": order.points_used,
        "amount_cents": order.amount_due_cents(),
    })
}

fn field(data: &Value, name: &str) -> Value {
    data.get(name).cloned().unwrap_or(Value::Null)
}

/// `{"skus": [...]}` of the order's lines.
fn skus(data: &Value) -> Value {
    let skus: Vec<Value> = data["items"]
        .as_array()
        .map(|items| items.iter().map(|i| i["sku"].clone()).collect())
        .unwrap_or_default();
    json!({ "skus": skus })
}

fn customer(data: &Value) -> Value {
    json!({ "customer_id": field(data, "customer_id") })
}

/// The order saga's definition.
pub fn definition(timeouts: Timeouts) -> SagaDefinition {
    let retry = timeouts.retry;
    let compensable = |name: &str, timeout: Duration| {
        Step::compensable(name)
            .timeout(timeout)
            .retry(retry)
            .compensation(timeout, retry)
    };
    SagaDefinition::new(SAGA_TYPE)
        .step(
            compensable("order", Duration::from_secs(10))
                .request(|d| json!({ "order_id": field(d, "order_id") }))
                .compensation_request(|d| {
                    json!({ "order_id": field(d, "order_id"), "reason": field(d, REASON_KEY) })
                }),
        )
        .step(
            compensable("inventory", timeouts.inventory)
                .request(|d| {
                    json!({ "reservation_id": field(d, "order_id"), "items": field(d, "items") })
                })
                .compensation_request(skus),
        )
        .step(
            compensable("payment", timeouts.payment)
                .request(|d| {
                    json!({
                        "payment_id": field(d, "order_id"),
                        "order_id": field(d, "order_id"),
                        "customer_id": field(d, "customer_id"),
                        "amount_cents": field(d, "amount_cents"),
                    })
                })
                .compensation_request(customer),
        )
        .step(
            compensable("points", timeouts.points)
                .skip_if(|d| d["points_used"].as_u64().unwrap_or(0) == 0)
                .request(|d| {
                    json!({
                        "deduction_id": field(d, "order_id"),
                        "customer_id": field(d, "customer_id"),
                        "points": field(d, "points_used"),
                    })
                })
                .compensation_request(customer),
        )
        .step(
            compensable("shipping", timeouts.shipping)
                .request(|d| {
                    json!({ "order_id": field(d, "order_id"), "customer_id": field(d, "customer_id") })
                })
                .compensation_request(|_| json!({})),
        )
        .step(
            Step::retriable_only("confirm")
                .timeout(timeouts.inventory)
                .retry(retry)
                .request(skus),
        )
        .step(
            Step::retriable_only("notification")
                .timeout(timeouts.notification)
                .retry(retry)
                .request(|d| {
                    let order = d["order_id"].as_str().unwrap_or_default();
                    json!({
                        "notification_id": order,
                        "customer_id": field(d, "customer_id"),
                        "message": format!("Your order {order} is confirmed and on its way."),
                    })
                }),
        )
        .step(
            Step::retriable_only("complete")
                .timeout(Duration::from_secs(10))
                .retry(retry)
                .request(|d| json!({ "order_id": field(d, "order_id") })),
        )
        .validate()
        .expect("the order saga's definition is valid")
}

/// The service of each step.
pub const SERVICES: [(&str, &str); 8] = [
    ("order", "order"),
    ("inventory", "inventory"),
    ("payment", "payment"),
    ("points", "points"),
    ("shipping", "shipping"),
    ("confirm", "inventory"),
    ("notification", "notification"),
    ("complete", "order"),
];

/// The order saga as a choreography: the same steps, each service reacting to its
/// neighbours' events; it starts with the `OrderCreated` of a choreographed order.
pub fn chain(timeouts: Timeouts) -> Chain {
    Chain::new(
        definition(timeouts),
        &SERVICES,
        ("order", "OrderCreated"),
        Arc::new(begin),
    )
    .expect("every step of the order saga has its service")
}

/// A choreographed order's saga id (the order id) and data, from its `OrderCreated`.
fn begin(message: &Message) -> Option<(String, Value)> {
    let event = OrderEvent::from_stored(&message.event.event_type, &message.event.data).ok()?;
    let mut order = Order::default();
    order.apply(&event);
    (order.saga_mode == SagaMode::Choreographed).then(|| (order.order_id.clone(), data(&order)))
}
