//! `eventyr projection status|rebuild`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use eventyr_core::Position;
use eventyr_cqrs::{ProjectionState, ProjectionStatus, RunnerOptions, Upcasters, projections};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::config::Config;
use crate::{builtin, stores};

/// One row of `projection status`.
#[derive(Debug, Serialize)]
struct Row {
    name: String,
    /// Whether this binary has the projection's code (can run and rebuild it).
    known: bool,
    generation: Option<u64>,
    checkpoint: u64,
    head: u64,
    lag_events: u64,
}

pub async fn status(config: &Config, json: bool) -> anyhow::Result<()> {
    let store = stores::open(config).await?;
    let models = stores::open_read_models(config).await?;
    let head = store.head().await?;
    let infos = models.list().await?;
    let mut rows: Vec<Row> = builtin::projections()
        .iter()
        .map(|p| Row {
            name: p.name().to_owned(),
            known: true,
            generation: None,
            checkpoint: 0,
            head: head.0,
            lag_events: head.0,
        })
        .collect();
    for info in infos {
        let checkpoint = info
            .current
            .and_then(|g| {
                info.generations
                    .iter()
                    .find(|(generation, _)| *generation == g)
            })
            .map_or(Position::ZERO, |(_, checkpoint)| *checkpoint);
        let row = match rows.iter_mut().find(|r| r.name == info.projection) {
            Some(row) => row,
            None => {
                rows.push(Row {
                    name: info.projection.clone(),
                    known: false,
                    generation: None,
                    checkpoint: 0,
                    head: head.0,
                    lag_events: head.0,
                });
                rows.last_mut().context("a row was just pushed")?
            }
        };
        row.generation = info.current.map(|g| g.0);
        row.checkpoint = checkpoint.0;
        row.lag_events = head.0.saturating_sub(checkpoint.0);
    }
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!(
        "{:<24} {:>10} {:>12} {:>12} {:>10}",
        "projection", "generation", "checkpoint", "head", "lag"
    );
    for row in rows {
        let generation = row
            .generation
            .map_or_else(|| "-".to_owned(), |g| g.to_string());
        let note = if row.known {
            ""
        } else {
            "  (not in this binary)"
        };
        println!(
            "{:<24} {generation:>10} {:>12} {:>12} {:>10}{note}",
            row.name, row.checkpoint, row.head, row.lag_events
        );
    }
    Ok(())
}

pub async fn rebuild(config: &Config, name: &str) -> anyhow::Result<()> {
    let known = builtin::projections();
    let names: Vec<&str> = known.iter().map(|p| p.name()).collect();
    let projection = known
        .iter()
        .find(|p| p.name() == name)
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "no projection is named {name:?}; known: {}",
                names.join(", ")
            )
        })?;
    let store = stores::open(config).await?;
    let models = stores::open_read_models(config).await?;
    let head = store.head().await?;
    let options = RunnerOptions {
        batch_size: 500,
        ..RunnerOptions::default()
    };
    let (runner, handle) = projections(
        store,
        models,
        Arc::new(Upcasters::new()),
        vec![projection],
        options,
    );
    handle.rebuild(name).await?;
    let bar = ProgressBar::new(head.0).with_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} events, {per_sec}, ETA {eta}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    bar.set_message(format!("rebuilding {name}"));
    let started = Instant::now();
    let (done, stop) = oneshot::channel::<()>();
    let watching = async {
        let outcome = follow(&handle.watch(), || handle.status(), &bar).await;
        let _ = done.send(());
        outcome
    };
    let (outcome, ()) = tokio::join!(
        watching,
        runner.run(async {
            let _ = stop.await;
        })
    );
    bar.finish_and_clear();
    let status = outcome?;
    println!(
        "rebuilt {name}: generation {}, {} events in {:.1?}",
        status.generation.map_or(0, |g| g.0),
        status.checkpoint,
        started.elapsed()
    );
    Ok(())
}

/// Follows the rebuild on the progress bar until the new generation serves.
async fn follow(
    changes: &tokio::sync::watch::Receiver<u64>,
    status: impl Fn() -> Vec<ProjectionStatus>,
    bar: &ProgressBar,
) -> anyhow::Result<ProjectionStatus> {
    let mut changes = changes.clone();
    let mut started = false;
    loop {
        let current = status()
            .into_iter()
            .next()
            .context("the runner has no projection")?;
        match &current.state {
            ProjectionState::Rebuilding { checkpoint, .. } => {
                started = true;
                bar.set_length(current.head.0.max(checkpoint.0));
                bar.set_position(checkpoint.0);
            }
            ProjectionState::Running if started => return Ok(current),
            ProjectionState::Failed { error } => bail!("the rebuild failed: {error}"),
            ProjectionState::Stopped => bail!("the runner stopped before the rebuild finished"),
            _ => {}
        }
        // A status change, or a tick so that an idle rebuild still reports.
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
    }
}
