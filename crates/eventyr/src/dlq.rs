//! `eventyr dlq list|replay`: the dead letters in the consumers' own databases.
//!
//! Replaying is a request: the letter is marked for replay, and the running consumer
//! (which has the handler's code) handles it again within its housekeeping interval,
//! committing its effect with the letter's new status. So a replay works from another
//! process or machine, and a replay asked twice has its effect once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use eventyr_bus::{BusError, ConsumerName, DeadLetter, DeadLetterStatus, Inbox};
use eventyr_core::SystemClock;
use eventyr_store::readmodel::ReadModels;
use serde::Serialize;

use crate::config::Config;
use crate::output::Lines;
use crate::stores;

const LIST_LIMIT: usize = 10_000;

/// The inboxes to look in: `consumer`'s, or every consumer's.
async fn inboxes(
    models: &Arc<dyn ReadModels>,
    consumer: Option<&str>,
) -> anyhow::Result<Vec<(ConsumerName, Inbox)>> {
    let names = match consumer {
        Some(name) => vec![ConsumerName::new(name)?],
        None => Inbox::consumers(&**models).await?,
    };
    let mut inboxes = Vec::with_capacity(names.len());
    for name in names {
        let inbox = Inbox::existing(Arc::clone(models), &name, Arc::new(SystemClock)).await?;
        inboxes.push((name, inbox));
    }
    Ok(inboxes)
}

#[derive(Debug, Serialize)]
struct Row<'a> {
    consumer: &'a str,
    #[serde(flatten)]
    letter: &'a DeadLetter,
}

/// The inboxes to look in: those of a service of `eventyr up`, or the configured ones.
pub async fn models(config: &Config, service: Option<&str>) -> anyhow::Result<Arc<dyn ReadModels>> {
    match service {
        Some(service) => crate::up::service_inboxes(&config.data_dir, service),
        None => stores::open_inboxes(config).await,
    }
}

pub async fn list(
    models: &Arc<dyn ReadModels>,
    consumer: Option<&str>,
    all: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut rows: Vec<(ConsumerName, DeadLetter)> = Vec::new();
    for (name, inbox) in inboxes(models, consumer).await? {
        let letters = inbox
            .dead_letters(None, LIST_LIMIT)
            .await
            .with_context(|| format!("cannot read the dead letters of {name}"))?;
        rows.extend(
            letters
                .into_iter()
                .filter(|l| all || l.status != DeadLetterStatus::Replayed)
                .map(|l| (name.clone(), l)),
        );
    }
    rows.sort_by_key(|(_, letter)| letter.failed_at);
    if json {
        let mut lines = Lines::json_only();
        for (consumer, letter) in &rows {
            let row = Row {
                consumer: consumer.as_str(),
                letter,
            };
            if !lines.json(&row)? {
                break;
            }
        }
        return lines.finish();
    }
    if rows.is_empty() {
        println!("no dead letters");
        return Ok(());
    }
    println!(
        "{:<20} {:<36} {:<8} {:>8} {:<27} {:<32} ERROR",
        "CONSUMER", "ID", "STATUS", "ATTEMPTS", "FAILED AT", "EVENT"
    );
    for (consumer, letter) in &rows {
        let event = match (&letter.event_type, &letter.stream, letter.version) {
            (Some(event_type), Some(stream), Some(version)) => {
                format!("{event_type} {stream}@{version}")
            }
            _ => "(undecodable)".to_owned(),
        };
        let error: String = letter.error.chars().take(100).collect();
        println!(
            "{:<20} {:<36} {:<8} {:>8} {:<27} {:<32} {}",
            consumer.as_str(),
            letter.id,
            letter.status.as_str(),
            letter.attempts,
            letter.failed_at.to_rfc3339(),
            event,
            error.replace('\n', " ")
        );
    }
    Ok(())
}

pub async fn replay(
    models: &Arc<dyn ReadModels>,
    id: Option<&str>,
    consumer: Option<&str>,
    wait: Option<Duration>,
) -> anyhow::Result<()> {
    let mut queued: Vec<(ConsumerName, Inbox, String)> = Vec::new();
    for (name, inbox) in inboxes(models, consumer).await? {
        let ids: Vec<String> = match id {
            Some(id) => vec![id.to_owned()],
            None => inbox
                .dead_letters(Some(DeadLetterStatus::Dead), LIST_LIMIT)
                .await?
                .into_iter()
                .map(|l| l.id)
                .collect(),
        };
        for letter in ids {
            match inbox.request_replay(Some(&letter)).await {
                Ok(_) => queued.push((name.clone(), inbox.clone(), letter)),
                // Looking for one id in every consumer: not this one.
                Err(BusError::NotFound { .. }) if id.is_some() => {}
                Err(error) => return Err(error.into()),
            }
        }
    }
    if queued.is_empty() {
        return match id {
            Some(id) => Err(BusError::NotFound {
                what: format!("dead letter {id} (or it is not dead)"),
            }
            .into()),
            None => {
                println!("no dead letters to replay");
                Ok(())
            }
        };
    }
    println!(
        "queued {} dead letter(s) for replay; the running consumer replays them within a second",
        queued.len()
    );
    let Some(wait) = wait else {
        return Ok(());
    };
    let deadline = Instant::now() + wait;
    let mut failed = 0;
    for (consumer, inbox, letter) in &queued {
        let outcome = loop {
            let letters = inbox.dead_letters(None, LIST_LIMIT).await?;
            let current = letters.into_iter().find(|l| &l.id == letter);
            match current {
                Some(l) if l.status == DeadLetterStatus::Replay && Instant::now() < deadline => {
                    // Polling another process's progress: nothing to wait on.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Some(l) => break l,
                None => anyhow::bail!("dead letter {letter} of {consumer} disappeared"),
            }
        };
        match outcome.status {
            DeadLetterStatus::Replayed => println!("{consumer} {letter}: replayed"),
            DeadLetterStatus::Dead => {
                failed += 1;
                println!("{consumer} {letter}: failed again: {}", outcome.error);
            }
            DeadLetterStatus::Replay => {
                failed += 1;
                println!("{consumer} {letter}: still queued (is the consumer running?)");
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} replays did not succeed", queued.len());
    }
    Ok(())
}
