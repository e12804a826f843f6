//! Load balancing and hot reload against real upstreams on 127.0.0.1: smooth weighted
//! round robin splits exactly by weight, consistent hashing keeps a key on one
//! endpoint, peak EWMA sends less to a slow endpoint; and reloads under load (new
//! endpoints, new routes) fail no request.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use eventyr_gateway::config::GatewayConfig;
use serde_json::Value;

mod common;
use common::{origin, start, upstream};

async fn served_by(client: &reqwest::Client, url: String, header: Option<(&str, &str)>) -> String {
    let mut request = client.get(url);
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("send");
    assert_eq!(response.status(), 200);
    let seen: Value = response.json().await.expect("json");
    seen["upstream"].as_str().expect("upstream").to_owned()
}

fn cluster_config(balance: &str, extra: &str, endpoints: &[(String, u32)]) -> GatewayConfig {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|(url, weight)| format!("{{ url = \"{url}\", weight = {weight} }}"))
        .collect();
    GatewayConfig::parse(&format!(
        "[[clusters]]\nname = \"c\"\nbalance = \"{balance}\"\n{extra}\nendpoints = [{}]\n\n\
         [[routes]]\nname = \"r\"\npath = {{ prefix = \"/\" }}\ncluster = \"c\"\n",
        endpoints.join(", ")
    ))
    .expect("valid config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancers_spread_requests_over_real_upstreams() {
    let (a, b, c) = (
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    );
    let client = reqwest::Client::new();

    // Smooth weighted round robin: exactly by weight, and interleaved (nginx's
    // sequence for 3, 1, 1 is a b a c a).
    let config = cluster_config(
        "weighted_round_robin",
        "",
        &[(a.clone(), 3), (b.clone(), 1), (c.clone(), 1)],
    );
    let (gateway, _) = start(&config).await;
    let mut order = Vec::new();
    for _ in 0..50 {
        order.push(served_by(&client, format!("{gateway}/x"), None).await);
    }
    let count = |name: &str| order.iter().filter(|n| *n == name).count();
    assert_eq!((count("a"), count("b"), count("c")), (30, 10, 10));
    assert_eq!(order[..5].join(""), "abaca", "{order:?}");

    // Consistent hashing on a header: a key stays on its endpoint; keys spread.
    let config = cluster_config(
        "hash_header",
        "hash_header = \"x-user\"",
        &[(a.clone(), 1), (b.clone(), 1), (c.clone(), 1)],
    );
    let (gateway, _) = start(&config).await;
    let mut homes = HashMap::new();
    for user in 0..60 {
        let user = format!("user-{user}");
        let first = served_by(&client, format!("{gateway}/x"), Some(("x-user", &user))).await;
        for _ in 0..3 {
            let again = served_by(&client, format!("{gateway}/x"), Some(("x-user", &user))).await;
            assert_eq!(again, first, "{user} moved");
        }
        *homes.entry(first).or_insert(0) += 1;
    }
    assert_eq!(homes.len(), 3, "keys spread over every endpoint: {homes:?}");
    assert!(homes.values().all(|n| *n >= 8), "{homes:?}");

    // Peak EWMA: an endpoint that answers slowly gets little of the traffic.
    let slow = origin(Router::new().fallback(get(|| async {
        tokio::time::sleep(Duration::from_millis(40)).await;
        axum::Json(serde_json::json!({ "upstream": "slow" }))
    })))
    .await;
    let config = cluster_config("peak_ewma", "", &[(a.clone(), 1), (slow, 1)]);
    let (gateway, _) = start(&config).await;
    let mut tally = HashMap::new();
    for _ in 0..100 {
        *tally
            .entry(served_by(&client, format!("{gateway}/x"), None).await)
            .or_insert(0) += 1;
    }
    let slow_share = tally.get("slow").copied().unwrap_or(0);
    assert!(
        slow_share <= 20,
        "the slow endpoint took {slow_share} of 100: {tally:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("gateway.toml");
    let text = |endpoint: &str, extra_route: bool| {
        let mut text = format!(
            "[[clusters]]\nname = \"c\"\nendpoints = [{{ url = \"{endpoint}\" }}]\n\n\
             [[routes]]\nname = \"r\"\npath = {{ prefix = \"/api\" }}\ncluster = \"c\"\n"
        );
        if extra_route {
            text.push_str(
                "\n[[routes]]\nname = \"extra\"\npath = { prefix = \"/extra\" }\ncluster = \"c\"\n",
            );
        }
        text
    };
    std::fs::write(&file, text(&a, false)).expect("write");
    let config = GatewayConfig::parse(&text(&a, false)).expect("valid");
    let (url, gateway) = common::start_gateway(&config, Some(file.clone())).await;

    // Four clients on keep-alive connections, until the reloads are done (at most
    // 20 s), counting who answered and any failure.
    let done = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (url, done) = (url.clone(), Arc::clone(&done));
        load.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut seen, mut failures) = (HashMap::new(), Vec::new());
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while !done.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                match client.get(format!("{url}/api/x")).send().await {
                    Ok(response) if response.status() == 200 => {
                        let body: Value = response.json().await.expect("json");
                        *seen
                            .entry(body["upstream"].as_str().unwrap_or("?").to_owned())
                            .or_insert(0u32) += 1;
                    }
                    Ok(response) => failures.push(response.status().to_string()),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (seen, failures)
        }));
    }
    for round in 0..20 {
        let (endpoint, extra) = if round % 2 == 0 {
            (&b, true)
        } else {
            (&a, false)
        };
        std::fs::write(&file, text(endpoint, extra)).expect("write");
        gateway.reload().expect("a valid configuration");
        // Pacing, not waiting: requests keep flowing between two reloads.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.store(true, Ordering::Relaxed);
    let mut seen = HashMap::new();
    for task in load {
        let (by, failures) = task.await.expect("load");
        assert!(failures.is_empty(), "failed requests: {failures:?}");
        for (name, n) in by {
            *seen.entry(name).or_insert(0) += n;
        }
    }
    assert!(seen.contains_key("a") && seen.contains_key("b"), "{seen:?}");
}

/// A reload keeps the state of what it leaves unchanged: a rate-limit rule's counters
/// hold across it; a rule whose configuration changed starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_keep_the_state_of_what_they_leave_unchanged() {
    let a = upstream("a").await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("gateway.toml");
    let text = |limit: u32, extra: bool| {
        let mut text = format!(
            "[[clusters]]\nname = \"c\"\nendpoints = [{{ url = \"{a}\" }}]\n\n\
             [[routes]]\nname = \"r\"\npath = {{ prefix = \"/api\" }}\ncluster = \"c\"\n\n\
             [[rate_limits]]\nname = \"hourly\"\nalgorithm = \"fixed_window\"\nlimit = {limit}\n\
             period = \"1h\"\nkey = \"global\"\n"
        );
        if extra {
            text.push_str(
                "\n[[routes]]\nname = \"extra\"\npath = { prefix = \"/extra\" }\ncluster = \"c\"\n",
            );
        }
        text
    };
    std::fs::write(&file, text(2, false)).expect("write");
    let config = GatewayConfig::parse(&text(2, false)).expect("valid");
    let (url, gateway) = common::start_gateway(&config, Some(file.clone())).await;
    let status = async || {
        reqwest::get(format!("{url}/api/x"))
            .await
            .expect("send")
            .status()
            .as_u16()
    };
    assert_eq!((status().await, status().await), (200, 200));

    // Another route, the same rule: its count holds.
    std::fs::write(&file, text(2, true)).expect("write");
    gateway.reload().expect("valid");
    assert_eq!(status().await, 429, "the rule's count survived the reload");

    // The rule changed: it counts afresh.
    std::fs::write(&file, text(3, true)).expect("write");
    gateway.reload().expect("valid");
    assert_eq!(status().await, 200);
}
