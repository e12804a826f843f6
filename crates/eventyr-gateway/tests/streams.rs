//! Long-lived answers through the gateway: an event stream ends when its caller's
//! token expires or its session is revoked, whatever the upstream does, and the
//! streams open at once are bounded. Against a real upstream that streams forever.

use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use eventyr_gateway::config::GatewayConfig;
use eventyr_gateway::session::hash_password;
use reqwest::Client;
use serde_json::{Value, json};

mod common;
use common::{origin, start};

const SECRET: &str = "a token secret of at least 32 bytes!!";

/// An upstream whose `/events` sends an event every 100 ms, forever.
async fn forever() -> String {
    async fn events() -> axum::response::Response {
        let ticks = futures::stream::unfold(0u64, |n| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let frame = bytes::Bytes::from(format!("data: {n}\n\n"));
            Some((Ok::<_, std::convert::Infallible>(frame), n + 1))
        });
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from_stream(ticks))
            .expect("a response")
    }
    origin(Router::new().route("/events", get(events))).await
}

fn config(upstream: &str, max_tunnels: usize) -> GatewayConfig {
    let alice = hash_password("alice").expect("hash");
    GatewayConfig::parse(&format!(
        r#"
        [limits]
        max_tunnels = {max_tunnels}

        [auth]
        keys = [{{ algorithm = "HS256", secret = "{SECRET}" }}]
        roles = {{ reader = ["events:read"] }}

        [sessions]
        store = {{ sqlite = "{sessions}" }}
        access_secret = "an access secret of at least 32 bytes"
        refresh_secret = "a refresh secret of at least 32 bytes"
        users = [{{ name = "alice", password_hash = "{alice}", roles = ["reader"] }}]

        [[clusters]]
        name = "events"
        endpoints = [{{ url = "{upstream}" }}]

        [[routes]]
        name = "events"
        path = {{ exact = "/events" }}
        permissions = ["events:read"]
        cluster = "events"
        timeout = "1h"

        [[routes]]
        name = "login"
        path = {{ exact = "/auth/login" }}
        builtin = "login"

        [[routes]]
        name = "logout"
        path = {{ exact = "/auth/logout" }}
        builtin = "logout"
        "#,
        sessions = tempfile::tempdir()
            .expect("dir")
            .keep()
            .join("sessions.db")
            .display(),
    ))
    .expect("config")
}

/// Reads the stream until it ends (at most `limit`); how long it flowed.
async fn flow(response: reqwest::Response, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut response = response;
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + limit),
            response.chunk(),
        )
        .await
        {
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None) | Err(_)) | Err(_) => return started.elapsed(),
        }
    }
}

/// Alice's access token.
async fn login(client: &Client, gateway: &str) -> String {
    let pair: Value = client
        .post(format!("{gateway}/auth/login"))
        .json(&json!({ "username": "alice", "password": "alice" }))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    pair["access_token"].as_str().expect("a token").to_owned()
}

async fn open(client: &Client, gateway: &str, token: &str) -> reqwest::Response {
    let response = client
        .get(format!("{gateway}/events"))
        .bearer_auth(token)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_ends_with_its_token_and_its_session() {
    let upstream = forever().await;
    let (gateway, _) = start(&config(&upstream, 2)).await;
    let client = Client::new();

    // A token that expires in 2 s: the stream ends then, not an hour later.
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs()
        + 2;
    let short = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "sub": "bob", "roles": ["reader"], "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign");
    let flowed = flow(
        open(&client, &gateway, &short).await,
        Duration::from_secs(20),
    )
    .await;
    assert!(
        flowed >= Duration::from_secs(1) && flowed < Duration::from_secs(4),
        "{flowed:?}"
    );

    // A session's stream ends within seconds of a logout.
    let token = login(&client, &gateway).await;
    let stream = open(&client, &gateway, &token).await;
    let flowing = tokio::spawn(flow(stream, Duration::from_secs(30)));
    let logout = client
        .post(format!("{gateway}/auth/logout"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("logout");
    assert_eq!(logout.status(), 204);
    let flowed = flowing.await.expect("joined");
    assert!(flowed < Duration::from_secs(12), "{flowed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_streams_are_bounded() {
    let upstream = forever().await;
    let (gateway, _) = start(&config(&upstream, 2)).await;
    let client = Client::new();
    let token = login(&client, &gateway).await;
    let first = open(&client, &gateway, &token).await;
    let second = open(&client, &gateway, &token).await;
    let third = client
        .get(format!("{gateway}/events"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("send");
    assert_eq!(third.status(), 503);
    let body: Value = third.json().await.expect("json");
    assert_eq!(body["error"], "overloaded");
    // One ends: its place is free again.
    drop(first);
    common::eventually("a stream's place freed", async || {
        client
            .get(format!("{gateway}/events"))
            .bearer_auth(&token)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_end_when_the_gateway_stops() {
    let upstream = forever().await;
    let config = config(&upstream, 2);
    let gateway = eventyr_gateway::gateway::Gateway::new(&config, None).expect("gateway");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // A long grace: a stream that ends soon after the stop was ended, not cut off.
    let serving = tokio::spawn(eventyr_gateway::proxy::serve_gateway(
        listener,
        gateway,
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(60),
    ));
    let client = Client::new();
    let token = login(&client, &url).await;
    let flowing = tokio::spawn(flow(
        open(&client, &url, &token).await,
        Duration::from_secs(30),
    ));
    let _ = stop.send(());
    let flowed = flowing.await.expect("joined");
    assert!(flowed < Duration::from_secs(5), "{flowed:?}");
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the gateway stops without waiting out the grace")
        .expect("joined");
}
