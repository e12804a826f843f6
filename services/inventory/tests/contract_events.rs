//! The inventory's public events match their JSON Schemas in contracts/events/.

use inventory::domain::ItemEvent::*;

#[test]
fn every_public_event_matches_its_contract() {
    let samples = [
        ItemStocked {
            sku: "SKU-1".into(),
            price_cents: 500,
            quantity: 1000,
        },
        ItemRestocked {
            quantity: 5,
            available: 1005,
        },
        InventoryReserved {
            reservation_id: "order-1".into(),
            quantity: 2,
            available: 1003,
        },
        InventoryReleased {
            reservation_id: "order-1".into(),
            quantity: 0,
            available: 1005,
        },
        ReservationConfirmed {
            reservation_id: "order-1".into(),
            quantity: 2,
        },
    ];
    eventyr_testkit::contracts::check_events("inventory", samples);
}

/// What the service publishes is what its contract lists.
#[test]
fn the_public_events_are_the_contracts() {
    eventyr_testkit::contracts::check_public_events("inventory", &inventory::domain::PUBLIC_EVENTS);
}
