//! An item of stock (one SKU): what is available, what is reserved by which
//! reservation, what has shipped.
//!
//! Rules: available never goes below zero; quantities are positive and bounded; a
//! reservation holds stock until confirmed (shipped) or released. Reservations are
//! idempotent by id, and a release of a reservation never made leaves a tombstone, so
//! that the reservation, arriving late, is refused (the saga participant contract).
//! Conservation: stocked + restocked = available + reserved + shipped.

use std::collections::{BTreeMap, BTreeSet};

use eventyr_cqrs::{AdjacentlyTagged, Aggregate};
use serde::{Deserialize, Serialize};

/// The events of this service that leave it (`contracts/events/inventory/`): what its
/// outbox publishes.
pub const PUBLIC_EVENTS: [&str; 5] = [
    "ItemStocked",
    "ItemRestocked",
    "InventoryReserved",
    "InventoryReleased",
    "ReservationConfirmed",
];

/// The largest quantity one command moves.
pub const QUANTITY_MAX: u64 = 10_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub price_cents: i64,
    pub available: u64,
    /// Quantity held, by reservation id.
    pub reserved: BTreeMap<String, u64>,
    /// Reservations confirmed (shipped), and released (or tombstoned).
    pub confirmed: BTreeSet<String>,
    pub released: BTreeSet<String>,
    pub stocked: u64,
    pub shipped: u64,
}

impl Item {
    pub fn reserved_total(&self) -> u64 {
        self.reserved.values().sum()
    }

    /// stocked (initial and restocks) = available + reserved + shipped.
    pub fn conserved(&self) -> bool {
        self.stocked == self.available + self.reserved_total() + self.shipped
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemCommand {
    /// Creates the item with its first stock (seeding, or an admin).
    Stock {
        sku: String,
        price_cents: i64,
        quantity: u64,
    },
    Restock {
        quantity: u64,
    },
    /// Restocks so that `available` are available (never lowers stock).
    RestockTo {
        available: u64,
    },
    Reserve {
        reservation_id: String,
        quantity: u64,
    },
    Release {
        reservation_id: String,
    },
    Confirm {
        reservation_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ItemEvent {
    ItemStocked {
        sku: String,
        price_cents: i64,
        quantity: u64,
    },
    ItemRestocked {
        quantity: u64,
        available: u64,
    },
    InventoryReserved {
        reservation_id: String,
        quantity: u64,
        available: u64,
    },
    /// `quantity` 0: nothing was held (a tombstone).
    InventoryReleased {
        reservation_id: String,
        quantity: u64,
        available: u64,
    },
    ReservationConfirmed {
        reservation_id: String,
        quantity: u64,
    },
}

impl AdjacentlyTagged for ItemEvent {}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    #[error("the item exists already")]
    Exists,
    #[error("no such item")]
    Unknown,
    #[error("quantities are 1 to {QUANTITY_MAX}, got {0}")]
    BadQuantity(u64),
    #[error("prices are positive, got {0}")]
    BadPrice(i64),
    #[error("{requested} requested, {available} available")]
    OutOfStock { requested: u64, available: u64 },
    #[error("reservation {0} was released before it was made")]
    Released(String),
    #[error("no reservation {0}")]
    NoReservation(String),
    #[error("stock is never lowered: {available} available, {requested} requested")]
    CannotLower { available: u64, requested: u64 },
}

fn quantity(quantity: u64) -> Result<u64, ItemError> {
    if (1..=QUANTITY_MAX).contains(&quantity) {
        Ok(quantity)
    } else {
        Err(ItemError::BadQuantity(quantity))
    }
}

impl Aggregate for Item {
    const KIND: &'static str = "item";
    type Command = ItemCommand;
    type Event = ItemEvent;
    type Error = ItemError;

    fn handle(&self, command: &ItemCommand) -> Result<Vec<ItemEvent>, ItemError> {
        use ItemCommand::*;
        if let Stock {
            sku,
            price_cents,
            quantity: q,
        } = command
        {
            if !self.sku.is_empty() {
                return Err(ItemError::Exists);
            }
            if *price_cents <= 0 {
                return Err(ItemError::BadPrice(*price_cents));
            }
            return Ok(vec![ItemEvent::ItemStocked {
                sku: sku.clone(),
                price_cents: *price_cents,
                quantity: quantity(*q)?,
            }]);
        }
        if self.sku.is_empty() {
            return Err(ItemError::Unknown);
        }
        match command {
            Stock { .. } => unreachable!("handled above"),
            Restock { quantity: q } => Ok(vec![ItemEvent::ItemRestocked {
                quantity: quantity(*q)?,
                available: self.available + q,
            }]),
            RestockTo { available } => match available.checked_sub(self.available) {
                None => Err(ItemError::CannotLower {
                    available: self.available,
                    requested: *available,
                }),
                Some(0) => Ok(Vec::new()),
                Some(added) => Ok(vec![ItemEvent::ItemRestocked {
                    quantity: added,
                    available: *available,
                }]),
            },
            Reserve {
                reservation_id,
                quantity: q,
            } => self.reserve(reservation_id, quantity(*q)?),
            Release { reservation_id } => Ok(self.release(reservation_id)),
            Confirm { reservation_id } => self.confirm(reservation_id),
        }
    }

    fn apply(&mut self, event: &ItemEvent) {
        match event {
            ItemEvent::ItemStocked {
                sku,
                price_cents,
                quantity,
            } => {
                self.sku.clone_from(sku);
                self.price_cents = *price_cents;
                self.available = *quantity;
                self.stocked = *quantity;
            }
            ItemEvent::ItemRestocked { quantity, .. } => {
                self.available += quantity;
                self.stocked += quantity;
            }
            ItemEvent::InventoryReserved {
                reservation_id,
                quantity,
                ..
            } => {
                self.available -= quantity;
                self.reserved.insert(reservation_id.clone(), *quantity);
            }
            ItemEvent::InventoryReleased { reservation_id, .. } => {
                if let Some(held) = self.reserved.remove(reservation_id) {
                    self.available += held;
                }
                self.released.insert(reservation_id.clone());
            }
            ItemEvent::ReservationConfirmed { reservation_id, .. } => {
                if let Some(held) = self.reserved.remove(reservation_id) {
                    self.shipped += held;
                }
                self.confirmed.insert(reservation_id.clone());
            }
        }
    }

    fn command_name(command: &ItemCommand) -> &'static str {
        match command {
            ItemCommand::Stock { .. } => "stock",
            ItemCommand::Restock { .. } | ItemCommand::RestockTo { .. } => "restock",
            ItemCommand::Reserve { .. } => "reserve",
            ItemCommand::Release { .. } => "release",
            ItemCommand::Confirm { .. } => "confirm",
        }
    }
}

impl Item {
    fn reserve(&self, id: &str, quantity: u64) -> Result<Vec<ItemEvent>, ItemError> {
        if self.released.contains(id) {
            return Err(ItemError::Released(id.to_owned()));
        }
        if self.reserved.contains_key(id) || self.confirmed.contains(id) {
            return Ok(Vec::new()); // Made already: the same answer, nothing new.
        }
        if quantity > self.available {
            return Err(ItemError::OutOfStock {
                requested: quantity,
                available: self.available,
            });
        }
        Ok(vec![ItemEvent::InventoryReserved {
            reservation_id: id.to_owned(),
            quantity,
            available: self.available - quantity,
        }])
    }

    fn release(&self, id: &str) -> Vec<ItemEvent> {
        if self.released.contains(id) || self.confirmed.contains(id) {
            return Vec::new();
        }
        let held = self.reserved.get(id).copied().unwrap_or(0);
        vec![ItemEvent::InventoryReleased {
            reservation_id: id.to_owned(),
            quantity: held,
            available: self.available + held,
        }]
    }

    fn confirm(&self, id: &str) -> Result<Vec<ItemEvent>, ItemError> {
        if self.confirmed.contains(id) {
            return Ok(Vec::new());
        }
        let held = self
            .reserved
            .get(id)
            .ok_or_else(|| ItemError::NoReservation(id.to_owned()))?;
        Ok(vec![ItemEvent::ReservationConfirmed {
            reservation_id: id.to_owned(),
            quantity: *held,
        }])
    }
}

#[cfg(test)]
mod tests {
    use eventyr_cqrs::testing::given;

    use super::ItemCommand::*;
    use super::ItemEvent::*;
    use super::*;

    fn stocked(quantity: u64) -> ItemEvent {
        ItemStocked {
            sku: "SKU-1".into(),
            price_cents: 500,
            quantity,
        }
    }

    fn reserved(id: &str, quantity: u64, available: u64) -> ItemEvent {
        InventoryReserved {
            reservation_id: id.into(),
            quantity,
            available,
        }
    }

    #[test]
    fn reservations_hold_stock_and_never_overdraw() {
        let item = given::<Item>([stocked(3)])
            .when(Reserve {
                reservation_id: "o1".into(),
                quantity: 2,
            })
            .then([reserved("o1", 2, 1)]);
        assert!(item.conserved());
        given::<Item>([stocked(3), reserved("o1", 2, 1)])
            .when(Reserve {
                reservation_id: "o2".into(),
                quantity: 2,
            })
            .then_error(|e| matches!(e, ItemError::OutOfStock { available: 1, .. }));
        given::<Item>([stocked(3)])
            .when(Reserve {
                reservation_id: "o1".into(),
                quantity: 0,
            })
            .then_error(|e| matches!(e, ItemError::BadQuantity(0)));
    }

    #[test]
    fn a_reservation_is_made_once_and_a_release_first_tombstones_it() {
        given::<Item>([stocked(3), reserved("o1", 2, 1)])
            .when(Reserve {
                reservation_id: "o1".into(),
                quantity: 2,
            })
            .then([]);
        let item = given::<Item>([stocked(3)])
            .when(Release {
                reservation_id: "o1".into(),
            })
            .then([InventoryReleased {
                reservation_id: "o1".into(),
                quantity: 0,
                available: 3,
            }]);
        assert_eq!(item.available, 3);
        given::<Item>([
            stocked(3),
            InventoryReleased {
                reservation_id: "o1".into(),
                quantity: 0,
                available: 3,
            },
        ])
        .when(Reserve {
            reservation_id: "o1".into(),
            quantity: 1,
        })
        .then_error(|e| matches!(e, ItemError::Released(_)));
    }

    #[test]
    fn released_stock_returns_and_confirmed_stock_ships() {
        let released = given::<Item>([stocked(3), reserved("o1", 2, 1)])
            .when(Release {
                reservation_id: "o1".into(),
            })
            .then([InventoryReleased {
                reservation_id: "o1".into(),
                quantity: 2,
                available: 3,
            }]);
        assert!(released.conserved() && released.available == 3);
        let shipped = given::<Item>([stocked(3), reserved("o1", 2, 1)])
            .when(Confirm {
                reservation_id: "o1".into(),
            })
            .then([ReservationConfirmed {
                reservation_id: "o1".into(),
                quantity: 2,
            }]);
        assert!(shipped.conserved() && shipped.shipped == 2 && shipped.available == 1);
        given::<Item>([stocked(3), reserved("o1", 2, 1)])
            .when(Restock { quantity: 5 })
            .then([ItemRestocked {
                quantity: 5,
                available: 6,
            }]);
    }
}
