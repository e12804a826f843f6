//! `eventyr gateway --config gateway.toml`: the API gateway on its own.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use eventyr_gateway::config::GatewayConfig;
use eventyr_gateway::proxy::{Proxy, serve};

/// The gateway's configuration file: `--config`, else ./gateway.toml.
pub fn file(global: &crate::cli::GlobalArgs) -> std::path::PathBuf {
    global
        .config
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("gateway.toml"))
}

/// How long a stop waits for the requests under way.
const GRACE: Duration = Duration::from_secs(30);

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
    let proxy = Arc::new(Proxy::new(&config));
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let mut checks_stopped = stopped.clone();
    let checks = tokio::spawn(eventyr_gateway::health::run(
        Arc::clone(&proxy),
        async move {
            let _ = checks_stopped.wait_for(|s| *s).await;
        },
    ));
    let stop = async move {
        let _ = tokio::signal::ctrl_c().await;
        println!("stopping");
        let _ = stopping.send(true);
    };
    serve(listener, proxy, stop, GRACE).await;
    let _ = checks.await;
    drop(stopped);
    Ok(())
}
