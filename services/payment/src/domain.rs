//! A customer's credit account: a limit, what is in use, and each payment by id.
//!
//! Rules: a charge never takes the amount in use above the limit (beyond it the
//! payment is declined: an event, not an error); amounts are positive; payments are
//! idempotent by id (a second charge with the same id answers as the first); a refund
//! restores the amount once, and a refund of a payment never made leaves a tombstone
//! so that the charge, arriving late, is declined.

use std::collections::BTreeMap;

use eventyr_cqrs::{AdjacentlyTagged, Aggregate};
use serde::{Deserialize, Serialize};

/// The events of this service that leave it (`contracts/events/payment/`): what its
/// outbox publishes.
pub const PUBLIC_EVENTS: [&str; 4] = [
    "CreditOpened",
    "PaymentProcessed",
    "PaymentFailed",
    "PaymentRefunded",
];

/// The largest amount one payment moves: 1 000 000.00.
pub const AMOUNT_MAX_CENTS: i64 = 100_000_000;

/// Where a payment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentState {
    Charged,
    Declined,
    Refunded,
    /// Refunded before it was charged.
    Tombstoned,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub order_id: String,
    pub amount_cents: i64,
    pub state: PaymentState,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditAccount {
    pub customer_id: String,
    pub limit_cents: i64,
    pub used_cents: i64,
    pub payments: BTreeMap<String, Payment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreditCommand {
    Open {
        customer_id: String,
        limit_cents: i64,
    },
    Charge {
        payment_id: String,
        order_id: String,
        amount_cents: i64,
    },
    Refund {
        payment_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum CreditEvent {
    CreditOpened {
        customer_id: String,
        limit_cents: i64,
    },
    PaymentProcessed {
        payment_id: String,
        order_id: String,
        amount_cents: i64,
        used_cents: i64,
    },
    PaymentFailed {
        payment_id: String,
        order_id: String,
        amount_cents: i64,
        reason: String,
    },
    /// `amount_cents` 0: nothing was charged (a tombstone, or a declined payment).
    PaymentRefunded {
        payment_id: String,
        amount_cents: i64,
        used_cents: i64,
    },
}

impl AdjacentlyTagged for CreditEvent {}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreditError {
    #[error("the account exists already")]
    Exists,
    #[error("no such account")]
    Unknown,
    #[error("amounts are 1 to {AMOUNT_MAX_CENTS} cents, got {0}")]
    BadAmount(i64),
}

impl CreditAccount {
    /// The answer to an earlier charge with this id, if any.
    pub fn payment(&self, payment_id: &str) -> Option<&Payment> {
        self.payments.get(payment_id)
    }
}

impl Aggregate for CreditAccount {
    const KIND: &'static str = "credit";
    type Command = CreditCommand;
    type Event = CreditEvent;
    type Error = CreditError;

    fn handle(&self, command: &CreditCommand) -> Result<Vec<CreditEvent>, CreditError> {
        use CreditCommand::*;
        match command {
            Open {
                customer_id,
                limit_cents,
            } => {
                if !self.customer_id.is_empty() {
                    return Err(CreditError::Exists);
                }
                if *limit_cents < 0 || *limit_cents > AMOUNT_MAX_CENTS {
                    return Err(CreditError::BadAmount(*limit_cents));
                }
                Ok(vec![CreditEvent::CreditOpened {
                    customer_id: customer_id.clone(),
                    limit_cents: *limit_cents,
                }])
            }
            _ if self.customer_id.is_empty() => Err(CreditError::Unknown),
            Charge {
                payment_id,
                order_id,
                amount_cents,
            } => self.charge(payment_id, order_id, *amount_cents),
            Refund { payment_id } => Ok(self.refund(payment_id)),
        }
    }

    fn apply(&mut self, event: &CreditEvent) {
        match event {
            CreditEvent::CreditOpened {
                customer_id,
                limit_cents,
            } => {
                self.customer_id.clone_from(customer_id);
                self.limit_cents = *limit_cents;
            }
            CreditEvent::PaymentProcessed {
                payment_id,
                order_id,
                amount_cents,
                used_cents,
            } => {
                self.used_cents = *used_cents;
                self.payments.insert(
                    payment_id.clone(),
                    Payment {
                        order_id: order_id.clone(),
                        amount_cents: *amount_cents,
                        state: PaymentState::Charged,
                    },
                );
            }
            CreditEvent::PaymentFailed {
                payment_id,
                order_id,
                amount_cents,
                ..
            } => {
                self.payments.insert(
                    payment_id.clone(),
                    Payment {
                        order_id: order_id.clone(),
                        amount_cents: *amount_cents,
                        state: PaymentState::Declined,
                    },
                );
            }
            CreditEvent::PaymentRefunded {
                payment_id,
                used_cents,
                ..
            } => {
                self.used_cents = *used_cents;
                let payment = self
                    .payments
                    .entry(payment_id.clone())
                    .or_insert_with(|| Payment {
                        order_id: String::new(),
                        amount_cents: 0,
                        state: PaymentState::Tombstoned,
                    });
                if payment.state == PaymentState::Charged {
                    payment.state = PaymentState::Refunded;
                }
            }
        }
    }

    fn command_name(command: &CreditCommand) -> &'static str {
        match command {
            CreditCommand::Open { .. } => "open",
            CreditCommand::Charge { .. } => "charge",
            CreditCommand::Refund { .. } => "refund",
        }
    }
}

impl CreditAccount {
    fn charge(
        &self,
        payment_id: &str,
        order_id: &str,
        amount: i64,
    ) -> Result<Vec<CreditEvent>, CreditError> {
        if !(1..=AMOUNT_MAX_CENTS).contains(&amount) {
            return Err(CreditError::BadAmount(amount));
        }
        if self.payments.contains_key(payment_id) {
            return Ok(Vec::new()); // Decided already; `payment` tells how.
        }
        let used = self.used_cents + amount;
        if used > self.limit_cents {
            return Ok(vec![CreditEvent::PaymentFailed {
                payment_id: payment_id.to_owned(),
                order_id: order_id.to_owned(),
                amount_cents: amount,
                reason: format!(
                    "declined: {amount} cents over the available credit of {} cents",
                    self.limit_cents - self.used_cents
                ),
            }]);
        }
        Ok(vec![CreditEvent::PaymentProcessed {
            payment_id: payment_id.to_owned(),
            order_id: order_id.to_owned(),
            amount_cents: amount,
            used_cents: used,
        }])
    }

    fn refund(&self, payment_id: &str) -> Vec<CreditEvent> {
        let amount = match self.payments.get(payment_id) {
            Some(payment) if payment.state == PaymentState::Charged => payment.amount_cents,
            Some(_) => return Vec::new(), // Refunded, declined or tombstoned already.
            None => 0,
        };
        vec![CreditEvent::PaymentRefunded {
            payment_id: payment_id.to_owned(),
            amount_cents: amount,
            used_cents: self.used_cents - amount,
        }]
    }
}

#[cfg(test)]
mod tests {
    use eventyr_cqrs::testing::given;

    use super::CreditCommand::*;
    use super::CreditEvent::*;
    use super::*;

    fn opened(limit: i64) -> CreditEvent {
        CreditOpened {
            customer_id: "bob".into(),
            limit_cents: limit,
        }
    }

    fn charge(id: &str, amount: i64) -> CreditCommand {
        Charge {
            payment_id: id.into(),
            order_id: format!("order-{id}"),
            amount_cents: amount,
        }
    }

    fn processed(id: &str, amount: i64, used: i64) -> CreditEvent {
        PaymentProcessed {
            payment_id: id.into(),
            order_id: format!("order-{id}"),
            amount_cents: amount,
            used_cents: used,
        }
    }

    #[test]
    fn charges_stay_within_the_limit_and_beyond_it_are_declined() {
        given::<CreditAccount>([opened(5_000)])
            .when(charge("p1", 3_000))
            .then([processed("p1", 3_000, 3_000)]);
        let account = given::<CreditAccount>([opened(5_000), processed("p1", 3_000, 3_000)])
            .when(charge("p2", 2_500))
            .then([PaymentFailed {
                payment_id: "p2".into(),
                order_id: "order-p2".into(),
                amount_cents: 2_500,
                reason: "declined: 2500 cents over the available credit of 2000 cents".into(),
            }]);
        assert_eq!(
            account.payment("p2").map(|p| p.state),
            Some(PaymentState::Declined)
        );
        given::<CreditAccount>([opened(5_000)])
            .when(charge("p1", 0))
            .then_error(|e| matches!(e, CreditError::BadAmount(0)));
    }

    #[test]
    fn a_payment_is_decided_once_and_refunded_once() {
        given::<CreditAccount>([opened(5_000), processed("p1", 3_000, 3_000)])
            .when(charge("p1", 3_000))
            .then([]);
        let account = given::<CreditAccount>([opened(5_000), processed("p1", 3_000, 3_000)])
            .when(Refund {
                payment_id: "p1".into(),
            })
            .then([PaymentRefunded {
                payment_id: "p1".into(),
                amount_cents: 3_000,
                used_cents: 0,
            }]);
        assert_eq!(account.used_cents, 0);
        given::<CreditAccount>([
            opened(5_000),
            processed("p1", 3_000, 3_000),
            PaymentRefunded {
                payment_id: "p1".into(),
                amount_cents: 3_000,
                used_cents: 0,
            },
        ])
        .when(Refund {
            payment_id: "p1".into(),
        })
        .then([]);
    }

    #[test]
    fn a_refund_first_tombstones_the_payment() {
        let account = given::<CreditAccount>([opened(5_000)])
            .when(Refund {
                payment_id: "p1".into(),
            })
            .then([PaymentRefunded {
                payment_id: "p1".into(),
                amount_cents: 0,
                used_cents: 0,
            }]);
        assert_eq!(
            account.payment("p1").map(|p| p.state),
            Some(PaymentState::Tombstoned)
        );
        given::<CreditAccount>([
            opened(5_000),
            PaymentRefunded {
                payment_id: "p1".into(),
                amount_cents: 0,
                used_cents: 0,
            },
        ])
        .when(charge("p1", 1_000))
        .then([]);
    }
}
