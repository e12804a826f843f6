//! Stopping on a signal: the first SIGINT (Ctrl-C) or SIGTERM asks a process to stop
//! gracefully (it drains); a second one while it drains stops it at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

/// The exit status of a process stopped at once by a second signal.
pub const STOPPED_AT_ONCE: i32 = 130;

/// Waits for the first SIGINT or SIGTERM and names it; from then on, a second one
/// exits the process at once.
pub async fn stop_requested() -> anyhow::Result<&'static str> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let name = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        eprintln!("a second signal: stopping at once");
        std::process::exit(STOPPED_AT_ONCE);
    });
    Ok(name)
}

/// Whether a process is draining: its readiness answers 503 from the first signal
/// on, before its listeners stop taking connections. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    pub fn start(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// `Err` while draining: what readiness says.
    pub fn check(&self) -> Result<(), String> {
        if self.0.load(Ordering::Acquire) {
            Err("stopping".to_owned())
        } else {
            Ok(())
        }
    }
}
