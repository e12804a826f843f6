//! The order service's public events match their JSON Schemas in contracts/events/.

use order::domain::Line;
use order::domain::OrderEvent::*;

#[test]
fn every_public_event_matches_its_contract() {
    let samples = [
        OrderCreated {
            order_id: "order-1".into(),
            customer_id: "alice".into(),
            lines: vec![Line {
                sku: "SKU-1".into(),
                quantity: 2,
                price_cents: 500,
            }],
            total_cents: 1_000,
            points_used: 10,
            saga_id: "order-1".into(),
            saga_mode: order::domain::SagaMode::Choreographed,
        },
        OrderCompleted {
            order_id: "order-1".into(),
        },
        OrderFailed {
            order_id: "order-1".into(),
            reason: "out of stock".into(),
        },
        OrderCancelled {
            order_id: "order-1".into(),
            reason: "customer".into(),
        },
    ];
    eventyr_testkit::contracts::check_events("order", samples);
}

/// What the service publishes is what its contract lists.
#[test]
fn the_public_events_are_the_contracts() {
    eventyr_testkit::contracts::check_public_events("order", &order::domain::PUBLIC_EVENTS);
}
