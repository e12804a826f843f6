//! A shipment (one per order, its id the order's). Creating it twice creates one;
//! cancelling it before it exists leaves a tombstone, so that the creation, arriving
//! late, is refused.

use eventyr_cqrs::{AdjacentlyTagged, Aggregate};
use serde::{Deserialize, Serialize};

/// The events of this service that leave it (`contracts/events/shipping/`): what its
/// outbox publishes.
pub const PUBLIC_EVENTS: [&str; 2] = ["ShipmentCreated", "ShipmentCancelled"];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShipmentState {
    #[default]
    None,
    Created,
    Cancelled,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    pub order_id: String,
    pub customer_id: String,
    pub state: ShipmentState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShipmentCommand {
    Create {
        order_id: String,
        customer_id: String,
    },
    Cancel {
        order_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ShipmentEvent {
    ShipmentCreated {
        order_id: String,
        customer_id: String,
    },
    /// `existed` false: cancelled before it was created (a tombstone).
    ShipmentCancelled { order_id: String, existed: bool },
}

impl AdjacentlyTagged for ShipmentEvent {}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShipmentError {
    #[error("the shipment of order {0} was cancelled")]
    Cancelled(String),
}

impl Aggregate for Shipment {
    const KIND: &'static str = "shipment";
    type Command = ShipmentCommand;
    type Event = ShipmentEvent;
    type Error = ShipmentError;

    fn handle(&self, command: &ShipmentCommand) -> Result<Vec<ShipmentEvent>, ShipmentError> {
        match (command, self.state) {
            (ShipmentCommand::Create { order_id, .. }, ShipmentState::Cancelled) => {
                Err(ShipmentError::Cancelled(order_id.clone()))
            }
            (ShipmentCommand::Create { .. }, ShipmentState::Created)
            | (ShipmentCommand::Cancel { .. }, ShipmentState::Cancelled) => Ok(Vec::new()),
            (
                ShipmentCommand::Create {
                    order_id,
                    customer_id,
                },
                ShipmentState::None,
            ) => Ok(vec![ShipmentEvent::ShipmentCreated {
                order_id: order_id.clone(),
                customer_id: customer_id.clone(),
            }]),
            (ShipmentCommand::Cancel { order_id }, state) => {
                Ok(vec![ShipmentEvent::ShipmentCancelled {
                    order_id: order_id.clone(),
                    existed: state == ShipmentState::Created,
                }])
            }
        }
    }

    fn apply(&mut self, event: &ShipmentEvent) {
        match event {
            ShipmentEvent::ShipmentCreated {
                order_id,
                customer_id,
            } => {
                self.order_id.clone_from(order_id);
                self.customer_id.clone_from(customer_id);
                self.state = ShipmentState::Created;
            }
            ShipmentEvent::ShipmentCancelled { order_id, .. } => {
                self.order_id.clone_from(order_id);
                self.state = ShipmentState::Cancelled;
            }
        }
    }

    fn command_name(command: &ShipmentCommand) -> &'static str {
        match command {
            ShipmentCommand::Create { .. } => "create",
            ShipmentCommand::Cancel { .. } => "cancel",
        }
    }
}

#[cfg(test)]
mod tests {
    use eventyr_cqrs::testing::given;

    use super::ShipmentCommand::*;
    use super::ShipmentEvent::*;
    use super::*;

    fn create() -> ShipmentCommand {
        Create {
            order_id: "o1".into(),
            customer_id: "alice".into(),
        }
    }

    #[test]
    fn a_shipment_is_created_once_and_cancelled_once() {
        let created = ShipmentCreated {
            order_id: "o1".into(),
            customer_id: "alice".into(),
        };
        given::<Shipment>([]).when(create()).then([created.clone()]);
        given::<Shipment>([created.clone()]).when(create()).then([]);
        let cancelled = ShipmentCancelled {
            order_id: "o1".into(),
            existed: true,
        };
        given::<Shipment>([created.clone()])
            .when(Cancel {
                order_id: "o1".into(),
            })
            .then([cancelled.clone()]);
        given::<Shipment>([created, cancelled])
            .when(Cancel {
                order_id: "o1".into(),
            })
            .then([]);
    }

    #[test]
    fn a_cancel_first_tombstones_the_shipment() {
        let tombstone = ShipmentCancelled {
            order_id: "o1".into(),
            existed: false,
        };
        given::<Shipment>([])
            .when(Cancel {
                order_id: "o1".into(),
            })
            .then([tombstone.clone()]);
        given::<Shipment>([tombstone])
            .when(create())
            .then_error(|e| matches!(e, ShipmentError::Cancelled(_)));
    }
}
