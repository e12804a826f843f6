//! `eventyr gateway --config gateway.toml`: the API gateway on its own. The
//! configuration is reloaded when the file changes, on SIGHUP, or by
//! `POST /admin/reload` (an invalid one is refused and the old one kept).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use eventyr_gateway::config::GatewayConfig;
use eventyr_gateway::gateway::Gateway;
use eventyr_gateway::proxy::serve_gateway;
use tokio::sync::watch;

/// The gateway's configuration file: `--config`, else ./gateway.toml.
pub fn file(global: &crate::cli::GlobalArgs) -> PathBuf {
    global
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("gateway.toml"))
}

/// `eventyr gateway [hash-password]`.
pub async fn command(
    global: &crate::cli::GlobalArgs,
    listen: Option<SocketAddr>,
    command: Option<crate::cli::GatewayCommand>,
) -> anyhow::Result<()> {
    match command {
        Some(crate::cli::GatewayCommand::HashPassword) => hash_password(),
        None => run(&file(global), listen).await,
    }
}

/// `eventyr gateway hash-password`: the argon2id hash of the line on standard input.
fn hash_password() -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let password = line.trim_end_matches(['\n', '\r']);
    anyhow::ensure!(!password.is_empty(), "an empty password");
    println!(
        "{}",
        eventyr_gateway::session::hash_password(password).map_err(anyhow::Error::msg)?
    );
    Ok(())
}

/// How long a stop waits for the requests under way.
const GRACE: Duration = Duration::from_secs(30);

/// How long readiness answers 503 before the listeners stop taking connections.
const DRAIN_DELAY: Duration = Duration::from_secs(1);

/// How often the file is checked for changes.
const WATCH_EVERY: Duration = Duration::from_secs(1);

pub async fn run(file: &Path, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the gateway configuration {}", file.display()))?;
    let config = GatewayConfig::parse(&text)
        .with_context(|| format!("invalid gateway configuration {}", file.display()))?;
    let address = match listen {
        Some(address) => address,
        None => config
            .listen
            .parse()
            .with_context(|| format!("listen: not an address: {}", config.listen))?,
    };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    println!(
        "eventyr gateway on http://{} ({} routes, {} clusters); Ctrl-C stops it",
        listener.local_addr()?,
        config.routes.len(),
        config.clusters.len()
    );
    let gateway = Gateway::new(&config, Some(file.to_path_buf())).map_err(anyhow::Error::msg)?;
    let (stopping, stopped) = watch::channel(false);
    let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    // From the first stop signal the admin port's readiness answers 503; a moment
    // later the listeners stop taking connections.
    let draining = crate::signals::Draining::default();
    let mut tasks = vec![
        tokio::spawn(Arc::clone(&gateway).health(until_stopped(stopped.clone()))),
        tokio::spawn(Arc::clone(&gateway).watch(WATCH_EVERY, until_stopped(stopped.clone()))),
    ];
    if let Some(admin) = &config.admin_listen {
        let admin: SocketAddr = admin
            .parse()
            .with_context(|| format!("admin_listen: not an address: {admin}"))?;
        let admin_listener = tokio::net::TcpListener::bind(admin)
            .await
            .with_context(|| format!("cannot listen on {admin}"))?;
        println!("admin API on http://{}", admin_listener.local_addr()?);
        // The admin port also answers the probes and /metrics (Prometheus).
        let metrics = eventyr_telemetry::install_prometheus().ok();
        let stopping = draining.clone();
        let ready: eventyr_http::ReadyCheck = Arc::new(move || {
            let stopping = stopping.clone();
            Box::pin(async move { stopping.check() })
        });
        let router = eventyr_gateway::admin::router(Arc::clone(&gateway))
            .merge(eventyr_http::probes(ready, metrics));
        tasks.push(tokio::spawn(eventyr_gateway::server::serve(
            "gateway-admin",
            admin_listener,
            config.limits.server(),
            eventyr_gateway::server::with_client(router),
            until_stopped(stopped.clone()),
            GRACE,
            None,
        )));
    }
    let stop = async move {
        match crate::signals::stop_requested().await {
            Ok(signal) => println!("stopping ({signal})"),
            Err(error) => {
                tracing::error!(%error, "cannot wait for a stop signal");
                std::future::pending::<()>().await;
            }
        }
        draining.start();
        tokio::time::sleep(DRAIN_DELAY).await;
        let _ = stopping.send(true);
    };
    serve_gateway(listener, gateway, stop, GRACE).await;
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}
