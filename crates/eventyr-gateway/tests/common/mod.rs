//! What the gateway's tests share: upstreams on 127.0.0.1 and gateways in front of
//! them.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::routing::any;
use eventyr_gateway::config::GatewayConfig;
use eventyr_gateway::proxy::{Proxy, serve};
use serde_json::{Value, json};

/// An upstream that answers with what it saw.
pub async fn upstream(name: &'static str) -> String {
    async fn echo(State(name): State<&'static str>, request: Request) -> axum::Json<Value> {
        let (parts, body) = request.into_parts();
        let header = |h: &str| {
            parts
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let seen = json!({
            "upstream": name,
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "x-request-id": header("x-request-id"),
            "x-forwarded-for": header("x-forwarded-for"),
            "x-forwarded-host": header("x-forwarded-host"),
            "x-forwarded-proto": header("x-forwarded-proto"),
            "traceparent": header("traceparent"),
            "x-secret": header("x-secret"),
            "x-user-id": header("x-user-id"),
            "x-user-roles": header("x-user-roles"),
            "x-customer-id": header("x-customer-id"),
            "x-eventyr-anonymous": header("x-eventyr-anonymous"),
            "x-eventyr-credential": header("x-eventyr-credential"),
        });
        let body = axum::body::to_bytes(body, 1 << 20)
            .await
            .unwrap_or_default();
        let mut seen = seen;
        seen["body"] = json!(String::from_utf8_lossy(&body));
        axum::Json(seen)
    }
    let app = Router::new().fallback(any(echo)).with_state(name);
    origin(app).await
}

/// Serves `app` on a loopback port; its base URL.
pub async fn origin(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

/// Runs a gateway of `config` on a loopback port until the test ends; its base URL
/// and its proxy.
pub async fn start(config: &GatewayConfig) -> (String, Arc<Proxy>) {
    let proxy = Arc::new(Proxy::new(config).expect("the proxy starts"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let gateway = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(serve(
        listener,
        Arc::clone(&proxy),
        futures_pending(),
        Duration::from_secs(1),
    ));
    (gateway, proxy)
}

/// A port nothing listens on.
pub async fn dead() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    drop(listener);
    format!("http://{address}")
}

pub fn futures_pending() -> impl Future<Output = ()> + Send {
    std::future::pending()
}

/// Runs a reloadable gateway of `config` (read again from `file` on reloads) with its
/// background work (health checks, JWKS refreshes) on a loopback port until the test
/// ends; its base URL.
pub async fn start_gateway(
    config: &GatewayConfig,
    file: Option<std::path::PathBuf>,
) -> (String, Arc<eventyr_gateway::gateway::Gateway>) {
    let gateway = eventyr_gateway::gateway::Gateway::new(config, file).expect("the gateway starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(Arc::clone(&gateway).health(futures_pending()));
    tokio::spawn(eventyr_gateway::proxy::serve_gateway(
        listener,
        Arc::clone(&gateway),
        futures_pending(),
        Duration::from_secs(1),
    ));
    (url, gateway)
}

/// Polls `check` until it holds, for at most 20 s.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Unpadded base64url, as in JWTs.
pub fn base64_url(bytes: impl AsRef<[u8]>) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
