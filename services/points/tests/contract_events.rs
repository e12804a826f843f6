//! The points service's public events match their JSON Schemas in contracts/events/.

use points::domain::PointsEvent::*;

#[test]
fn every_public_event_matches_its_contract() {
    let samples = [
        PointsOpened {
            customer_id: "alice".into(),
            balance: 500,
        },
        PointsAwarded {
            points: 10,
            balance: 510,
        },
        PointsDeducted {
            deduction_id: "order-1".into(),
            points: 10,
            balance: 500,
        },
        PointsRestored {
            deduction_id: "order-1".into(),
            points: 10,
            balance: 510,
        },
    ];
    eventyr_testkit::contracts::check_events("points", samples);
}

/// What the service publishes is what its contract lists.
#[test]
fn the_public_events_are_the_contracts() {
    eventyr_testkit::contracts::check_public_events("points", &points::domain::PUBLIC_EVENTS);
}
