//! A customer's mailbox: every notification sent to them, once each by id.

use std::collections::BTreeSet;

use eventyr_cqrs::{AdjacentlyTagged, Aggregate};
use serde::{Deserialize, Serialize};

/// The events of this service that leave it (`contracts/events/notification/`): what its
/// outbox publishes.
pub const PUBLIC_EVENTS: [&str; 1] = ["NotificationSent"];

/// The longest message.
pub const MESSAGE_MAX_BYTES: usize = 2_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    pub customer_id: String,
    pub sent: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailboxCommand {
    Send {
        notification_id: String,
        customer_id: String,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum MailboxEvent {
    NotificationSent {
        notification_id: String,
        customer_id: String,
        message: String,
    },
}

impl AdjacentlyTagged for MailboxEvent {}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailboxError {
    #[error("a message is 1 to {MESSAGE_MAX_BYTES} bytes, got {0}")]
    BadMessage(usize),
}

impl Aggregate for Mailbox {
    const KIND: &'static str = "mailbox";
    type Command = MailboxCommand;
    type Event = MailboxEvent;
    type Error = MailboxError;

    fn handle(&self, command: &MailboxCommand) -> Result<Vec<MailboxEvent>, MailboxError> {
        let MailboxCommand::Send {
            notification_id,
            customer_id,
            message,
        } = command;
        if !(1..=MESSAGE_MAX_BYTES).contains(&message.len()) {
            return Err(MailboxError::BadMessage(message.len()));
        }
        if self.sent.contains(notification_id) {
            return Ok(Vec::new());
        }
        Ok(vec![MailboxEvent::NotificationSent {
            notification_id: notification_id.clone(),
            customer_id: customer_id.clone(),
            message: message.clone(),
        }])
    }

    fn apply(&mut self, event: &MailboxEvent) {
        let MailboxEvent::NotificationSent {
            notification_id,
            customer_id,
            ..
        } = event;
        self.customer_id.clone_from(customer_id);
        self.sent.insert(notification_id.clone());
    }

    fn command_name(_command: &MailboxCommand) -> &'static str {
        "send"
    }
}

#[cfg(test)]
mod tests {
    use eventyr_cqrs::testing::given;

    use super::*;

    #[test]
    fn a_notification_is_sent_once() {
        let send = MailboxCommand::Send {
            notification_id: "o1".into(),
            customer_id: "alice".into(),
            message: "your order o1 is on its way".into(),
        };
        let sent = MailboxEvent::NotificationSent {
            notification_id: "o1".into(),
            customer_id: "alice".into(),
            message: "your order o1 is on its way".into(),
        };
        given::<Mailbox>([]).when(send.clone()).then([sent.clone()]);
        given::<Mailbox>([sent]).when(send).then([]);
        given::<Mailbox>([])
            .when(MailboxCommand::Send {
                notification_id: "o2".into(),
                customer_id: "alice".into(),
                message: String::new(),
            })
            .then_error(|e| matches!(e, MailboxError::BadMessage(0)));
    }
}
