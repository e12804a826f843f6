//! An order: its lines, total, points used, saga and status.
//!
//! Rules: 1 to `LINES_MAX` lines of distinct SKUs, each 1 to `QUANTITY_MAX` units at a
//! positive price; the total is Σ price × quantity; points are worth a cent each and
//! pay at most the total. Status: PENDING → COMPLETED | FAILED | CANCELLED, once.
//! Placing the same order again (its id comes from the client's idempotency key)
//! changes nothing.

use std::collections::BTreeSet;

use eventyr_cqrs::{AdjacentlyTagged, Aggregate};
use serde::{Deserialize, Serialize};

/// The events of this service that leave it (`contracts/events/order/`): what its
/// outbox publishes.
pub const PUBLIC_EVENTS: [&str; 4] = [
    "OrderCreated",
    "OrderCompleted",
    "OrderFailed",
    "OrderCancelled",
];

pub const LINES_MAX: usize = 50;
pub const QUANTITY_MAX: u64 = 1_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    /// Not placed yet.
    #[default]
    None,
    Pending,
    Completed,
    Failed,
    Cancelled,
}

/// How an order's saga runs: orchestrated by the order service's saga engine, or
/// choreographed (each service reacting to the events of the one before). Chosen when
/// the order is placed and kept with it, so a change of mode leaves the orders under
/// way to finish the way they began.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaMode {
    #[default]
    Orchestrated,
    Choreographed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub sku: String,
    pub quantity: u64,
    pub price_cents: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    pub lines: Vec<Line>,
    pub total_cents: i64,
    pub points_used: u64,
    pub saga_id: String,
    pub saga_mode: SagaMode,
    pub status: OrderStatus,
    pub failure_reason: Option<String>,
}

impl Order {
    /// What the customer pays after points.
    pub fn amount_due_cents(&self) -> i64 {
        self.total_cents - i64::try_from(self.points_used).unwrap_or(i64::MAX)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    Place {
        order_id: String,
        customer_id: String,
        lines: Vec<Line>,
        points_used: u64,
        saga_id: String,
        saga_mode: SagaMode,
    },
    Complete,
    Fail {
        reason: String,
    },
    Cancel {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum OrderEvent {
    OrderCreated {
        order_id: String,
        customer_id: String,
        lines: Vec<Line>,
        total_cents: i64,
        points_used: u64,
        saga_id: String,
        /// Absent in events recorded before modes existed: orchestrated.
        #[serde(default, skip_serializing_if = "is_orchestrated")]
        saga_mode: SagaMode,
    },
    OrderCompleted {
        order_id: String,
    },
    OrderFailed {
        order_id: String,
        reason: String,
    },
    OrderCancelled {
        order_id: String,
        reason: String,
    },
}

impl AdjacentlyTagged for OrderEvent {}

fn is_orchestrated(mode: &SagaMode) -> bool {
    *mode == SagaMode::Orchestrated
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("an order has 1 to {LINES_MAX} lines, got {0}")]
    BadLines(usize),
    #[error("SKU {0} appears on two lines")]
    DuplicateSku(String),
    #[error("line {sku}: quantities are 1 to {QUANTITY_MAX}, got {quantity}")]
    BadQuantity { sku: String, quantity: u64 },
    #[error("line {sku}: prices are positive, got {price_cents}")]
    BadPrice { sku: String, price_cents: i64 },
    #[error("{points} points exceed the order's total of {total_cents} cents")]
    TooManyPoints { points: u64, total_cents: i64 },
    #[error("order {0} exists with other content")]
    Exists(String),
    #[error("no such order")]
    Unknown,
    #[error("the order is {0:?} and cannot become {1:?}")]
    Transition(OrderStatus, OrderStatus),
}

fn total(lines: &[Line]) -> Result<i64, OrderError> {
    if !(1..=LINES_MAX).contains(&lines.len()) {
        return Err(OrderError::BadLines(lines.len()));
    }
    let mut skus = BTreeSet::new();
    let mut total: i64 = 0;
    for line in lines {
        if !skus.insert(line.sku.as_str()) {
            return Err(OrderError::DuplicateSku(line.sku.clone()));
        }
        if !(1..=QUANTITY_MAX).contains(&line.quantity) {
            return Err(OrderError::BadQuantity {
                sku: line.sku.clone(),
                quantity: line.quantity,
            });
        }
        if line.price_cents <= 0 {
            return Err(OrderError::BadPrice {
                sku: line.sku.clone(),
                price_cents: line.price_cents,
            });
        }
        // Bounded: 50 lines × 1 000 units × an i64 price would overflow only for
        // absurd prices; those are refused rather than wrapped.
        let amount = line
            .price_cents
            .checked_mul(i64::try_from(line.quantity).unwrap_or(i64::MAX))
            .and_then(|a| total.checked_add(a))
            .ok_or_else(|| OrderError::BadPrice {
                sku: line.sku.clone(),
                price_cents: line.price_cents,
            })?;
        total = amount;
    }
    Ok(total)
}

impl Aggregate for Order {
    const KIND: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    fn handle(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderCommand::*;
        let order_id = self.order_id.clone();
        let (to, event) = match command {
            Place {
                order_id,
                customer_id,
                lines,
                points_used,
                saga_id,
                saga_mode,
            } => {
                let created = OrderEvent::OrderCreated {
                    order_id: order_id.clone(),
                    customer_id: customer_id.clone(),
                    lines: lines.clone(),
                    total_cents: total(lines)?,
                    points_used: *points_used,
                    saga_id: saga_id.clone(),
                    saga_mode: *saga_mode,
                };
                return self.place(created);
            }
            Complete => (
                OrderStatus::Completed,
                OrderEvent::OrderCompleted { order_id },
            ),
            Fail { reason } => (
                OrderStatus::Failed,
                OrderEvent::OrderFailed {
                    order_id,
                    reason: reason.clone(),
                },
            ),
            Cancel { reason } => (
                OrderStatus::Cancelled,
                OrderEvent::OrderCancelled {
                    order_id,
                    reason: reason.clone(),
                },
            ),
        };
        match self.status {
            OrderStatus::None => Err(OrderError::Unknown),
            OrderStatus::Pending => Ok(vec![event]),
            status if status == to => Ok(Vec::new()),
            status => Err(OrderError::Transition(status, to)),
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::OrderCreated {
                order_id,
                customer_id,
                lines,
                total_cents,
                points_used,
                saga_id,
                saga_mode,
            } => {
                *self = Order {
                    order_id: order_id.clone(),
                    customer_id: customer_id.clone(),
                    lines: lines.clone(),
                    total_cents: *total_cents,
                    points_used: *points_used,
                    saga_id: saga_id.clone(),
                    saga_mode: *saga_mode,
                    status: OrderStatus::Pending,
                    failure_reason: None,
                };
            }
            OrderEvent::OrderCompleted { .. } => self.status = OrderStatus::Completed,
            OrderEvent::OrderFailed { reason, .. } => {
                self.status = OrderStatus::Failed;
                self.failure_reason = Some(reason.clone());
            }
            OrderEvent::OrderCancelled { reason, .. } => {
                self.status = OrderStatus::Cancelled;
                self.failure_reason = Some(reason.clone());
            }
        }
    }

    fn command_name(command: &OrderCommand) -> &'static str {
        match command {
            OrderCommand::Place { .. } => "place",
            OrderCommand::Complete => "complete",
            OrderCommand::Fail { .. } => "fail",
            OrderCommand::Cancel { .. } => "cancel",
        }
    }
}

impl Order {
    fn place(&self, created: OrderEvent) -> Result<Vec<OrderEvent>, OrderError> {
        let OrderEvent::OrderCreated {
            order_id,
            customer_id,
            lines,
            total_cents,
            points_used,
            ..
        } = &created
        else {
            return Ok(Vec::new());
        };
        let (total_cents, points_used) = (*total_cents, *points_used);
        if i64::try_from(points_used).map_or(true, |p| p > total_cents) {
            return Err(OrderError::TooManyPoints {
                points: points_used,
                total_cents,
            });
        }
        if self.status == OrderStatus::None {
            return Ok(vec![created]);
        }
        let same = &self.customer_id == customer_id
            && &self.lines == lines
            && self.points_used == points_used;
        if same {
            Ok(Vec::new())
        } else {
            Err(OrderError::Exists(order_id.clone()))
        }
    }
}

/// Why an order failed, as its customer is told: a business code, never the saga's
/// own reason (internal addresses, status lines — those stay in the admin's saga
/// timeline).
pub fn failure_code(reason: &str) -> &'static str {
    const BUSINESS: [&str; 3] = ["out_of_stock", "payment_declined", "insufficient_points"];
    if let Some(code) = BUSINESS.iter().find(|code| reason.contains(*code)) {
        return code;
    }
    if reason.starts_with("aborted") {
        return "cancelled_by_operator";
    }
    "processing_failed"
}

#[cfg(test)]
mod tests {
    use eventyr_cqrs::testing::given;

    use super::OrderCommand::*;
    use super::OrderEvent::*;
    use super::*;

    fn lines() -> Vec<Line> {
        vec![Line {
            sku: "SKU-1".into(),
            quantity: 2,
            price_cents: 5_000,
        }]
    }

    fn place(points_used: u64) -> OrderCommand {
        Place {
            order_id: "o1".into(),
            customer_id: "alice".into(),
            lines: lines(),
            points_used,
            saga_id: "o1".into(),
            saga_mode: SagaMode::Orchestrated,
        }
    }

    fn created() -> OrderEvent {
        OrderCreated {
            order_id: "o1".into(),
            customer_id: "alice".into(),
            lines: lines(),
            total_cents: 10_000,
            points_used: 10,
            saga_id: "o1".into(),
            saga_mode: SagaMode::Orchestrated,
        }
    }

    #[test]
    fn an_order_totals_its_lines_and_points_pay_part_of_it() {
        let order = given::<Order>([]).when(place(10)).then([created()]);
        assert_eq!(
            (order.status, order.amount_due_cents()),
            (OrderStatus::Pending, 9_990)
        );
        given::<Order>([])
            .when(place(10_001))
            .then_error(|e| matches!(e, OrderError::TooManyPoints { .. }));
        let mut twice = lines();
        twice.push(twice[0].clone());
        given::<Order>([])
            .when(Place {
                order_id: "o1".into(),
                customer_id: "alice".into(),
                lines: twice,
                points_used: 0,
                saga_id: "o1".into(),
                saga_mode: SagaMode::Orchestrated,
            })
            .then_error(|e| matches!(e, OrderError::DuplicateSku(_)));
    }

    #[test]
    fn placing_again_changes_nothing_and_other_content_is_refused() {
        given::<Order>([created()]).when(place(10)).then([]);
        given::<Order>([created()])
            .when(place(0))
            .then_error(|e| matches!(e, OrderError::Exists(_)));
    }

    #[test]
    fn an_order_ends_once() {
        let failed = given::<Order>([created()])
            .when(Fail {
                reason: "out of stock".into(),
            })
            .then([OrderFailed {
                order_id: "o1".into(),
                reason: "out of stock".into(),
            }]);
        assert_eq!(failed.failure_reason.as_deref(), Some("out of stock"));
        assert_eq!(failure_code("out of stock"), "processing_failed");
        let refused = "step inventory failed: POST http://127.0.0.1:9/internal/reservations: \
                       409 Conflict: out_of_stock: SKU-RARE has 1";
        assert_eq!(failure_code(refused), "out_of_stock");
        assert_eq!(
            failure_code("aborted: by an operator"),
            "cancelled_by_operator"
        );
        given::<Order>([
            created(),
            OrderCompleted {
                order_id: "o1".into(),
            },
        ])
        .when(Complete)
        .then([]);
        given::<Order>([
            created(),
            OrderCompleted {
                order_id: "o1".into(),
            },
        ])
        .when(Fail {
            reason: "late".into(),
        })
        .then_error(|e| {
            matches!(
                e,
                OrderError::Transition(OrderStatus::Completed, OrderStatus::Failed)
            )
        });
        given::<Order>([])
            .when(Complete)
            .then_error(|e| matches!(e, OrderError::Unknown));
    }
}
