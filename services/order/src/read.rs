//! The order list: a projection of the order events into a read model, newest first
//! (the `seq` column is minus the order's first position, so that the keyset pages of
//! `eventyr_cqrs::fetch_page`, ascending, run newest first).

use eventyr_core::RecordedEvent;
use eventyr_cqrs::{DomainEvent, Projection, ProjectionError};
use eventyr_store::sql::SqlStatement;

use crate::domain::OrderEvent;

/// The read model's name.
pub const ORDERS_VIEW: &str = "orders";

/// The projection of the order list.
#[derive(Debug, Default)]
pub struct OrdersView;

impl Projection for OrdersView {
    fn name(&self) -> &str {
        ORDERS_VIEW
    }

    fn event_types(&self) -> &[&str] {
        &[
            "OrderCreated",
            "OrderCompleted",
            "OrderFailed",
            "OrderCancelled",
        ]
    }

    fn schema(&self) -> Vec<String> {
        vec![
            "CREATE TABLE orders (order_id TEXT PRIMARY KEY, seq BIGINT NOT NULL UNIQUE, \
             customer_id TEXT NOT NULL, status TEXT NOT NULL, items TEXT NOT NULL, \
             total_cents BIGINT NOT NULL, points_used BIGINT NOT NULL, saga_id TEXT NOT NULL, \
             failure_reason TEXT)"
                .into(),
            "CREATE INDEX orders_by_customer ON orders (customer_id, seq)".into(),
        ]
    }

    fn apply(&self, event: &RecordedEvent) -> Result<Vec<SqlStatement>, ProjectionError> {
        let decoded = OrderEvent::from_stored(&event.event_type, &event.data)
            .map_err(|e| ProjectionError::new(e.to_string()))?;
        let status = |order_id: String, status: &str, reason: Option<String>| {
            SqlStatement::new(
                "UPDATE orders SET status = $1, failure_reason = $2 WHERE order_id = $3",
            )
            .bind(status.to_owned())
            .bind(reason)
            .bind(order_id)
        };
        Ok(vec![match decoded {
            OrderEvent::OrderCreated {
                order_id,
                customer_id,
                lines,
                total_cents,
                points_used,
                saga_id,
                ..
            } => SqlStatement::new(
                "INSERT INTO orders (order_id, seq, customer_id, status, items, total_cents, \
                 points_used, saga_id) VALUES ($1, $2, $3, 'PENDING', $4, $5, $6, $7)",
            )
            .bind(order_id)
            .bind(-i64::try_from(event.position.0).unwrap_or(i64::MAX))
            .bind(customer_id)
            .bind(serde_json::to_string(&lines).unwrap_or_default())
            .bind(total_cents)
            .bind(i64::try_from(points_used).unwrap_or(i64::MAX))
            .bind(saga_id),
            OrderEvent::OrderCompleted { order_id } => status(order_id, "COMPLETED", None),
            OrderEvent::OrderFailed { order_id, reason } => {
                status(order_id, "FAILED", Some(reason))
            }
            OrderEvent::OrderCancelled { order_id, reason } => {
                status(order_id, "CANCELLED", Some(reason))
            }
        }])
    }
}
