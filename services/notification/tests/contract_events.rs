//! The notification service's public events match their JSON Schemas in
//! contracts/events/.

use notification::domain::MailboxEvent::*;

#[test]
fn every_public_event_matches_its_contract() {
    let samples = [NotificationSent {
        notification_id: "order-1".into(),
        customer_id: "alice".into(),
        message: "your order is on its way".into(),
    }];
    eventyr_testkit::contracts::check_events("notification", samples);
}

/// What the service publishes is what its contract lists.
#[test]
fn the_public_events_are_the_contracts() {
    eventyr_testkit::contracts::check_public_events(
        "notification",
        &notification::domain::PUBLIC_EVENTS,
    );
}
