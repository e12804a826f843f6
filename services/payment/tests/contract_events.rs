//! The payment service's public events match their JSON Schemas in contracts/events/.

use payment::domain::CreditEvent::*;

#[test]
fn every_public_event_matches_its_contract() {
    let samples = [
        CreditOpened {
            customer_id: "bob".into(),
            limit_cents: 5_000,
        },
        PaymentProcessed {
            payment_id: "order-1".into(),
            order_id: "order-1".into(),
            amount_cents: 1_000,
            used_cents: 1_000,
        },
        PaymentFailed {
            payment_id: "order-2".into(),
            order_id: "order-2".into(),
            amount_cents: 9_000,
            reason: "declined".into(),
        },
        PaymentRefunded {
            payment_id: "order-1".into(),
            amount_cents: 1_000,
            used_cents: 0,
        },
    ];
    eventyr_testkit::contracts::check_events("payment", samples);
}

/// What the service publishes is what its contract lists.
#[test]
fn the_public_events_are_the_contracts() {
    eventyr_testkit::contracts::check_public_events("payment", &payment::domain::PUBLIC_EVENTS);
}
