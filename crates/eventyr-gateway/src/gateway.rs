//! The running gateway: its current configuration, swapped whole on a reload (the
//! file changed, SIGHUP, or `POST /admin/reload`) without dropping a connection or a
//! request under way — requests already in the stack finish with the old
//! configuration, the next ones take the new. An invalid new configuration is refused
//! and the old one kept.
//!
//! A cluster or a rate-limit rule whose configuration the reload leaves unchanged keeps
//! its state (endpoint health, ejections, breaker, retry budget and bulkhead;
//! counters), and the upstream connection pools stay warm; a changed one starts
//! afresh.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::config::GatewayConfig;
use crate::proxy::Proxy;
use crate::stack::{Stack, stack};

struct Current {
    proxy: Arc<Proxy>,
    stack: Stack,
}

/// A gateway whose configuration may be reloaded.
pub struct Gateway {
    current: RwLock<Current>,
    file: Option<PathBuf>,
    modified: RwLock<Option<SystemTime>>,
    generation: watch::Sender<u64>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway of a checked configuration; `file` is where reloads read it again.
    /// Errors: its session store cannot be opened.
    pub fn new(config: &GatewayConfig, file: Option<PathBuf>) -> Result<Arc<Self>, String> {
        let proxy = Arc::new(Proxy::new(config)?);
        let modified = file.as_ref().and_then(|f| modified(f));
        Ok(Arc::new(Self {
            current: RwLock::new(Current {
                stack: stack(Arc::clone(&proxy)),
                proxy,
            }),
            file,
            modified: RwLock::new(modified),
            generation: watch::Sender::new(0),
        }))
    }

    /// A gateway of one proxy that never reloads.
    pub fn fixed(proxy: Arc<Proxy>) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Current {
                stack: stack(Arc::clone(&proxy)),
                proxy,
            }),
            file: None,
            modified: RwLock::new(None),
            generation: watch::Sender::new(0),
        })
    }

    /// The proxy of the configuration in force.
    pub fn proxy(&self) -> Arc<Proxy> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .proxy,
        )
    }

    /// The stack of the configuration in force.
    pub fn stack(&self) -> Stack {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .stack
            .clone()
    }

    /// Rings after each reload (health checks restart on it).
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Reads the file again and, if it is valid, puts it in force. Errors: no file, it
    /// cannot be read, or it is invalid (the message names the key).
    pub fn reload(&self) -> Result<(), String> {
        let outcome = self.try_reload();
        metrics::counter!(
            eventyr_telemetry::names::GATEWAY_CONFIG_RELOADS_TOTAL,
            eventyr_telemetry::names::LABEL_OUTCOME => if outcome.is_ok() { "applied" } else { "refused" }
        )
        .increment(1);
        outcome
    }

    fn try_reload(&self) -> Result<(), String> {
        let file = self
            .file
            .as_ref()
            .ok_or("this gateway has no configuration file")?;
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let config = GatewayConfig::parse(&text).map_err(|e| e.to_string())?;
        let proxy = Arc::new(Proxy::reloaded(&config, &self.proxy())?);
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Current {
            stack: stack(Arc::clone(&proxy)),
            proxy,
        };
        *self
            .modified
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = modified(file);
        self.generation.send_modify(|g| *g += 1);
        tracing::info!(file = %file.display(), routes = config.routes.len(), "configuration reloaded");
        Ok(())
    }

    /// Reloads when the file changes (checked every `every`) or on SIGHUP, until
    /// `shutdown`. A failed reload is logged; the configuration in force stays.
    pub async fn watch(self: Arc<Self>, every: Duration, shutdown: impl Future<Output = ()>) {
        let Some(file) = self.file.clone() else {
            return shutdown.await;
        };
        let mut hangups =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            let hangup = async {
                match hangups.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let reason = tokio::select! {
                () = &mut shutdown => return,
                () = hangup => "SIGHUP",
                _ = interval.tick() => {
                    let now = modified(&file);
                    let before = *self.modified.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if now == before {
                        continue;
                    }
                    "the file changed"
                }
            };
            if let Err(error) = self.reload() {
                tracing::error!(reason, %error, "the new configuration is refused; the old one stays");
                // Do not try the same broken file again until it changes.
                *self
                    .modified
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = modified(&file);
            }
        }
    }

    /// Runs the background work of the configuration in force — active health checks
    /// and JWKS refreshes — restarting it with each reload, until `shutdown`.
    pub async fn health(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let mut reloads = self.reloads();
        tokio::pin!(shutdown);
        loop {
            let proxy = self.proxy();
            let mut next = reloads.clone();
            let reloaded = async move {
                let _ = next.changed().await;
            };
            let reloaded = futures::FutureExt::shared(Box::pin(reloaded));
            let work = futures::future::join(
                crate::health::run(Arc::clone(&proxy), reloaded.clone()),
                crate::jwks::run(proxy, reloaded),
            );
            tokio::select! {
                () = &mut shutdown => return,
                _ = work => {}
            }
            let _ = reloads.borrow_and_update();
        }
    }
}

fn modified(file: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(file).and_then(|m| m.modified()).ok()
}
