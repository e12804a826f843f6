//! `eventyr saga list|show|retry|abort`: sagas as the engine's store tells them, and
//! operator requests that the running engine carries out (see `eventyr_saga::admin`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use eventyr_core::{Clock, SystemClock, Timestamp};
use eventyr_saga::machine::{SagaEvent, SagaStatus};
use eventyr_saga::{Action, SagaAdmin};

use crate::config::Config;
use crate::output::Lines;
use crate::stores;

async fn admin(config: &Config) -> anyhow::Result<SagaAdmin> {
    Ok(SagaAdmin::new(stores::open(config).await?))
}

pub async fn list(
    config: &Config,
    status: Option<&str>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let status = status
        .map(|s| {
            SagaStatus::parse(s).with_context(|| {
                format!(
                    "unknown status {s:?}: STARTED, IN_PROGRESS, COMPLETED, COMPENSATING, COMPENSATED or FAILED"
                )
            })
        })
        .transpose()?;
    let sagas = admin(config).await?.list(status, limit).await?;
    if json {
        let mut lines = Lines::json_only();
        for saga in &sagas {
            if !lines.json(saga)? {
                break;
            }
        }
        return lines.finish();
    }
    if sagas.is_empty() {
        println!("no sagas");
        return Ok(());
    }
    let now = SystemClock.now();
    println!(
        "{:<36} {:<12} {:<12} {:>10} {:<7} REASON",
        "ID", "TYPE", "STATUS", "AGE", "FLAGGED"
    );
    for saga in &sagas {
        println!(
            "{:<36} {:<12} {:<12} {:>10} {:<7} {}",
            saga.id,
            saga.saga_type,
            saga.status.as_str(),
            age(now.duration_since(saga.started_at)),
            if saga.flagged { "yes" } else { "" },
            saga.reason.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

fn age(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs();
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        3600..86_400 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86_400),
    }
}

/// One row of a timeline: what happened to a step's attempt.
fn describe(event: &SagaEvent) -> (String, String) {
    match event {
        SagaEvent::StepSkipped { step, .. } => (step.clone(), "skipped".into()),
        SagaEvent::StepRequested { step, attempt, .. } => {
            (step.clone(), format!("attempt {attempt} requested"))
        }
        SagaEvent::StepSucceeded { step, attempt, .. } => {
            (step.clone(), format!("attempt {attempt} succeeded"))
        }
        SagaEvent::StepFailed {
            step,
            attempt,
            error,
            after,
            ..
        } => (
            step.clone(),
            format!("attempt {attempt} failed: {error} (then {after:?})"),
        ),
        SagaEvent::StepTimedOut {
            step,
            attempt,
            after,
            ..
        } => (
            step.clone(),
            format!("attempt {attempt} timed out (then {after:?})"),
        ),
        SagaEvent::StepAborted { step, .. } => (step.clone(), "aborted under way".into()),
        SagaEvent::CompensationRequested { step, attempt, .. } => (
            step.clone(),
            format!("compensation attempt {attempt} requested"),
        ),
        SagaEvent::CompensationSucceeded { step, attempt, .. } => (
            step.clone(),
            format!("compensation attempt {attempt} succeeded"),
        ),
        SagaEvent::CompensationFailed {
            step,
            attempt,
            error,
            retry_at,
            ..
        } => (
            step.clone(),
            format!(
                "compensation attempt {attempt} failed: {error}{}",
                if retry_at.is_none() {
                    " (given up)"
                } else {
                    ""
                }
            ),
        ),
        SagaEvent::CompensationStarted { reason, .. } => {
            ("-".into(), format!("compensating: {reason}"))
        }
        SagaEvent::RetryRequested { .. } => ("-".into(), "retry requested".into()),
        SagaEvent::SagaFinished { status, reason, .. } => (
            "-".into(),
            format!(
                "finished {}{}",
                status.as_str(),
                reason
                    .as_ref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
        ),
        SagaEvent::SagaStarted { .. } => ("-".into(), "started".into()),
    }
}

pub async fn show(config: &Config, id: &str, json: bool) -> anyhow::Result<()> {
    let (state, log) = admin(config).await?.get(id).await?;
    if json {
        let events: Vec<_> = log
            .iter()
            .map(|(at, event)| serde_json::json!({ "recorded_at": at, "event": event }))
            .collect();
        let document = serde_json::json!({
            "id": state.id,
            "saga_type": state.saga_type,
            "status": state.status,
            "flagged": state.flagged,
            "reason": state.reason,
            "data": state.data,
            "events": events,
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(());
    }
    println!(
        "saga {} ({}): {}{}",
        state.id,
        state.saga_type,
        state.status.as_str(),
        if state.flagged {
            " — flagged for manual intervention"
        } else {
            ""
        }
    );
    if let Some(reason) = &state.reason {
        println!("reason: {reason}");
    }
    let begun = log.first().map_or(Timestamp::UNIX_EPOCH, |(at, _)| *at);
    // When each step's current attempt was asked for, to show how long it took.
    let mut asked: BTreeMap<String, Timestamp> = BTreeMap::new();
    println!("{:>10} {:>9} {:<10} WHAT", "AT (+ms)", "TOOK (ms)", "STEP");
    for (at, event) in &log {
        let (step, what) = describe(event);
        let took = match event {
            SagaEvent::StepRequested { .. } | SagaEvent::CompensationRequested { .. } => {
                asked.insert(step.clone(), *at);
                String::new()
            }
            _ => asked
                .get(&step)
                .map(|from| format!("{:.1}", at.duration_since(*from).as_secs_f64() * 1000.0))
                .unwrap_or_default(),
        };
        println!(
            "{:>10.1} {:>9} {:<10} {what}",
            at.duration_since(begun).as_secs_f64() * 1000.0,
            took,
            step
        );
    }
    Ok(())
}

pub async fn request(
    config: &Config,
    id: &str,
    action: Action,
    reason: Option<String>,
    wait: Duration,
) -> anyhow::Result<()> {
    let admin = admin(config).await?;
    let request = admin.request(id, action, reason, SystemClock.now()).await?;
    match admin.outcome(&request, wait).await {
        Ok(true) => {
            println!("{action:?} of saga {id}: done (request {request})");
            Ok(())
        }
        Ok(false) => {
            println!(
                "{action:?} of saga {id}: requested ({request}); no engine answered within {wait:?} — it is carried out when the engine runs"
            );
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

pub fn simulate(seeds: u64, from: u64, sagas: usize) -> anyhow::Result<()> {
    use eventyr_saga::simulation::{SimOptions, simulate};
    anyhow::ensure!(sagas > 0, "--sagas must be at least 1");
    let options = SimOptions {
        sagas,
        ..SimOptions::default()
    };
    let progress = indicatif::ProgressBar::new(seeds);
    let (mut completed, mut compensated, mut failed, mut crashes) = (0, 0, 0, 0);
    for seed in from..from.saturating_add(seeds) {
        let report = simulate(seed, &options).map_err(|violation| {
            progress.abandon();
            anyhow::anyhow!(
                "{violation}\nreplay: eventyr saga simulate --from {seed} --seeds 1 --sagas {sagas}"
            )
        })?;
        completed += report.completed;
        compensated += report.compensated;
        failed += report.failed;
        crashes += report.crashes;
        progress.inc(1);
    }
    progress.finish_and_clear();
    println!(
        "{seeds} seeds from {from}, {sagas} sagas each: every invariant held; {completed} completed, {compensated} compensated, {failed} FAILED before the operator's retry, {crashes} engine crashes"
    );
    Ok(())
}
