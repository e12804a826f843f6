//! Cross-process head announcements: a connection that `LISTEN`s on the schema's
//! channel, where every writer `NOTIFY`s its new head at commit. It reconnects after a
//! second when its connection drops, and stops when the store is dropped. Losing a
//! notification only delays subscribers until their idle poll.

use std::sync::Weak;
use std::time::Duration;

use eventyr_core::Position;
use eventyr_store::group::advance_head;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Config, NoTls};

const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Runs until `alive`'s sender is dropped (the store is gone).
pub async fn listen(
    config: Config,
    channel: String,
    head: Weak<watch::Sender<Position>>,
    mut alive: watch::Receiver<()>,
) {
    loop {
        tokio::select! {
            () = follow(&config, &channel, &head) => {}
            _ = alive.changed() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(RECONNECT_AFTER) => {}
            _ = alive.changed() => return,
        }
    }
}

/// Follows notifications on one connection until it ends.
async fn follow(config: &Config, channel: &str, head: &Weak<watch::Sender<Position>>) {
    let Ok((client, mut connection)) = config.connect(NoTls).await else {
        return;
    };
    let (messages, mut received) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if messages.send(message).is_err() {
                return;
            }
        }
    });
    if client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .is_ok()
    {
        while let Some(message) = received.recv().await {
            let AsyncMessage::Notification(notification) = message else {
                continue;
            };
            let (Some(head), Ok(position)) = (head.upgrade(), notification.payload().parse())
            else {
                continue;
            };
            advance_head(&head, Position(position));
        }
    }
    driver.abort();
}
