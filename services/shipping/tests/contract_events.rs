//! The shipping service's public events match their JSON Schemas in contracts/events/.

use shipping::domain::ShipmentEvent::*;

#[test]
fn every_public_event_matches_its_contract() {
    let samples = [
        ShipmentCreated {
            order_id: "order-1".into(),
            customer_id: "alice".into(),
        },
        ShipmentCancelled {
            order_id: "order-1".into(),
            existed: true,
        },
    ];
    eventyr_testkit::contracts::check_events("shipping", samples);
}

/// What the service publishes is what its contract lists.
#[test]
fn the_public_events_are_the_contracts() {
    eventyr_testkit::contracts::check_public_events("shipping", &shipping::domain::PUBLIC_EVENTS);
}
