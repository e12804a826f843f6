//! A customer's points: a balance that never goes negative, and each deduction by id.
//!
//! Deductions are idempotent by id; a restore gives a deduction back once, and a
//! restore of a deduction never made leaves a tombstone, so that the deduction,
//! arriving late, is refused.

use std::collections::BTreeMap;

use eventyr_cqrs::{AdjacentlyTagged, Aggregate};
use serde::{Deserialize, Serialize};

/// The events of this service that leave it (`contracts/events/points/`): what its
/// outbox publishes.
pub const PUBLIC_EVENTS: [&str; 4] = [
    "PointsOpened",
    "PointsAwarded",
    "PointsDeducted",
    "PointsRestored",
];

/// The most points one command moves.
pub const POINTS_MAX: u64 = 10_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeductionState {
    Deducted,
    Restored,
    Tombstoned,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointsAccount {
    pub customer_id: String,
    pub balance: u64,
    /// Points and state, by deduction id.
    pub deductions: BTreeMap<String, (u64, DeductionState)>,
    /// Everything credited (opening balance and awards): balance + deducted = credited.
    pub credited: u64,
}

impl PointsAccount {
    /// credited = balance + points currently deducted.
    pub fn balanced(&self) -> bool {
        let held: u64 = self
            .deductions
            .values()
            .filter(|(_, s)| *s == DeductionState::Deducted)
            .map(|(p, _)| p)
            .sum();
        self.credited == self.balance + held
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointsCommand {
    Open { customer_id: String, balance: u64 },
    Award { points: u64 },
    Deduct { deduction_id: String, points: u64 },
    Restore { deduction_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum PointsEvent {
    PointsOpened {
        customer_id: String,
        balance: u64,
    },
    PointsAwarded {
        points: u64,
        balance: u64,
    },
    PointsDeducted {
        deduction_id: String,
        points: u64,
        balance: u64,
    },
    /// `points` 0: nothing was deducted (a tombstone).
    PointsRestored {
        deduction_id: String,
        points: u64,
        balance: u64,
    },
}

impl AdjacentlyTagged for PointsEvent {}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PointsError {
    #[error("the account exists already")]
    Exists,
    #[error("no such account")]
    Unknown,
    #[error("points are 1 to {POINTS_MAX}, got {0}")]
    BadPoints(u64),
    #[error("{requested} points requested, the balance is {balance}")]
    Insufficient { requested: u64, balance: u64 },
    #[error("deduction {0} was restored before it was made")]
    Restored(String),
}

fn points(points: u64) -> Result<u64, PointsError> {
    if (1..=POINTS_MAX).contains(&points) {
        Ok(points)
    } else {
        Err(PointsError::BadPoints(points))
    }
}

impl Aggregate for PointsAccount {
    const KIND: &'static str = "points";
    type Command = PointsCommand;
    type Event = PointsEvent;
    type Error = PointsError;

    fn handle(&self, command: &PointsCommand) -> Result<Vec<PointsEvent>, PointsError> {
        use PointsCommand::*;
        match command {
            Open {
                customer_id,
                balance,
            } => {
                if !self.customer_id.is_empty() {
                    return Err(PointsError::Exists);
                }
                if *balance > POINTS_MAX {
                    return Err(PointsError::BadPoints(*balance));
                }
                Ok(vec![PointsEvent::PointsOpened {
                    customer_id: customer_id.clone(),
                    balance: *balance,
                }])
            }
            _ if self.customer_id.is_empty() => Err(PointsError::Unknown),
            Award { points: p } => Ok(vec![PointsEvent::PointsAwarded {
                points: points(*p)?,
                balance: self.balance + p,
            }]),
            Deduct {
                deduction_id,
                points: p,
            } => self.deduct(deduction_id, points(*p)?),
            Restore { deduction_id } => Ok(self.restore(deduction_id)),
        }
    }

    fn apply(&mut self, event: &PointsEvent) {
        match event {
            PointsEvent::PointsOpened {
                customer_id,
                balance,
            } => {
                self.customer_id.clone_from(customer_id);
                self.balance = *balance;
                self.credited = *balance;
            }
            PointsEvent::PointsAwarded { points, balance } => {
                self.balance = *balance;
                self.credited += points;
            }
            PointsEvent::PointsDeducted {
                deduction_id,
                points,
                balance,
            } => {
                self.balance = *balance;
                self.deductions
                    .insert(deduction_id.clone(), (*points, DeductionState::Deducted));
            }
            PointsEvent::PointsRestored {
                deduction_id,
                points,
                balance,
            } => {
                self.balance = *balance;
                let state = if *points > 0 {
                    DeductionState::Restored
                } else {
                    DeductionState::Tombstoned
                };
                self.deductions
                    .insert(deduction_id.clone(), (*points, state));
            }
        }
    }

    fn command_name(command: &PointsCommand) -> &'static str {
        match command {
            PointsCommand::Open { .. } => "open",
            PointsCommand::Award { .. } => "award",
            PointsCommand::Deduct { .. } => "deduct",
            PointsCommand::Restore { .. } => "restore",
        }
    }
}

impl PointsAccount {
    fn deduct(&self, id: &str, points: u64) -> Result<Vec<PointsEvent>, PointsError> {
        match self.deductions.get(id) {
            Some((_, DeductionState::Tombstoned)) => {
                return Err(PointsError::Restored(id.to_owned()));
            }
            Some(_) => return Ok(Vec::new()),
            None => {}
        }
        if points > self.balance {
            return Err(PointsError::Insufficient {
                requested: points,
                balance: self.balance,
            });
        }
        Ok(vec![PointsEvent::PointsDeducted {
            deduction_id: id.to_owned(),
            points,
            balance: self.balance - points,
        }])
    }

    fn restore(&self, id: &str) -> Vec<PointsEvent> {
        let points = match self.deductions.get(id) {
            Some((points, DeductionState::Deducted)) => *points,
            Some(_) => return Vec::new(),
            None => 0,
        };
        vec![PointsEvent::PointsRestored {
            deduction_id: id.to_owned(),
            points,
            balance: self.balance + points,
        }]
    }
}

#[cfg(test)]
mod tests {
    use eventyr_cqrs::testing::given;

    use super::PointsCommand::*;
    use super::PointsEvent::*;
    use super::*;

    fn opened(balance: u64) -> PointsEvent {
        PointsOpened {
            customer_id: "alice".into(),
            balance,
        }
    }

    fn deduct(id: &str, points: u64) -> PointsCommand {
        Deduct {
            deduction_id: id.into(),
            points,
        }
    }

    #[test]
    fn deductions_never_take_the_balance_below_zero() {
        let account = given::<PointsAccount>([opened(500)])
            .when(deduct("d1", 200))
            .then([PointsDeducted {
                deduction_id: "d1".into(),
                points: 200,
                balance: 300,
            }]);
        assert!(account.balanced());
        given::<PointsAccount>([opened(100)])
            .when(deduct("d1", 200))
            .then_error(|e| matches!(e, PointsError::Insufficient { balance: 100, .. }));
    }

    #[test]
    fn a_deduction_is_made_once_restored_once_and_a_restore_first_tombstones_it() {
        let deducted = PointsDeducted {
            deduction_id: "d1".into(),
            points: 200,
            balance: 300,
        };
        given::<PointsAccount>([opened(500), deducted.clone()])
            .when(deduct("d1", 200))
            .then([]);
        let account = given::<PointsAccount>([opened(500), deducted.clone()])
            .when(Restore {
                deduction_id: "d1".into(),
            })
            .then([PointsRestored {
                deduction_id: "d1".into(),
                points: 200,
                balance: 500,
            }]);
        assert!(account.balanced() && account.balance == 500);
        let tombstone = PointsRestored {
            deduction_id: "d2".into(),
            points: 0,
            balance: 500,
        };
        given::<PointsAccount>([opened(500)])
            .when(Restore {
                deduction_id: "d2".into(),
            })
            .then([tombstone.clone()]);
        given::<PointsAccount>([opened(500), tombstone])
            .when(deduct("d2", 10))
            .then_error(|e| matches!(e, PointsError::Restored(_)));
    }
}
