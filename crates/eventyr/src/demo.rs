//! `eventyr demo`: drives orders through the public API of a running `eventyr up`,
//! waits for every saga to finish, runs the reconciliation on the same data directory,
//! and prints a summary: outcomes by status and reason, latency from acceptance to the
//! final status, throughput. Exits 1 if an invariant is broken or an order never
//! settles.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::bench::stats::{latency_histogram, millis, record};
use crate::cli::{DemoArgs, DemoMix};
use crate::config::Config;
use crate::reconcile;

/// One order to place, and the outcome it should have.
struct Planned {
    body: Value,
}

/// The orders of a run: mostly alice's orders that complete, and the failures of
/// PLAN.md's demo (SKU-RARE out of stock, bob declined, bob without points).
fn plan(args: &DemoArgs, seed: u64) -> Vec<Planned> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let failure_share = match args.mix {
        DemoMix::Realistic => 0.1,
        DemoMix::Failures => 0.5,
    };
    (0..args.orders)
        .map(|_| {
            let body = if rng.f64() >= failure_share {
                let sku = format!("SKU-{}", rng.u32(1..=20));
                let points = if rng.f64() < 0.3 { 10 } else { 0 };
                let customer = match rng.u32(0..10) {
                    0 => "alice".to_owned(),
                    _ => format!("c{:03}", rng.u32(1..=crate::up::DEMO_CUSTOMERS)),
                };
                json!({ "customer_id": customer, "items": [{ "sku": sku, "quantity": rng.u32(1..=3) }], "points_to_use": points })
            } else {
                match rng.u32(0..3) {
                    0 => json!({ "customer_id": "alice", "items": [{ "sku": "SKU-RARE", "quantity": 5 }] }),
                    1 => json!({ "customer_id": "bob", "items": [{ "sku": "SKU-20", "quantity": 1 }] }),
                    _ => json!({ "customer_id": "bob", "items": [{ "sku": "SKU-1", "quantity": 1 }], "points_to_use": 10 }),
                }
            };
            Planned { body }
        })
        .collect()
}

/// A short name of why an order failed (the order's failure code).
fn reason_class(reason: &str) -> &'static str {
    match reason {
        "insufficient_points" => "insufficient points",
        "out_of_stock" => "out of stock",
        "payment_declined" => "payment declined",
        "cancelled_by_operator" => "cancelled",
        _ => "other",
    }
}

struct Outcome {
    status: String,
    reason: Option<String>,
    latency: Duration,
}

async fn drive(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
    wait: Duration,
) -> anyhow::Result<Outcome> {
    let response = client
        .post(format!("{url}/api/orders"))
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}: is `eventyr up` running?"))?;
    let accepted = Instant::now();
    let status = response.status();
    let placed: Value = response.json().await.unwrap_or(Value::Null);
    anyhow::ensure!(
        status.as_u16() == 202,
        "placing an order answered {status}: {placed}"
    );
    let order_id = placed["order_id"]
        .as_str()
        .context("no order id")?
        .to_owned();
    loop {
        let order: Value = client
            .get(format!("{url}/api/orders/{order_id}"))
            .send()
            .await?
            .json()
            .await?;
        let status = order["status"].as_str().unwrap_or("PENDING");
        if status != "PENDING" {
            return Ok(Outcome {
                status: status.to_owned(),
                reason: order["failure_reason"].as_str().map(str::to_owned),
                latency: accepted.elapsed(),
            });
        }
        anyhow::ensure!(
            accepted.elapsed() < wait,
            "order {order_id} did not settle within {wait:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client logged in at the gateway as `user` (its access token on every request;
/// it lasts 15 minutes). A URL without `/auth/login` (the services' own API) gets a
/// client without a token.
async fn login(url: &str, user: &str, password: &str) -> anyhow::Result<reqwest::Client> {
    let response = reqwest::Client::new()
        .post(format!("{url}/auth/login"))
        .json(&serde_json::json!({ "username": user, "password": password }))
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Ok(reqwest::Client::new());
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    anyhow::ensure!(
        status.is_success(),
        "cannot log in at {url} as {user}: {status} {}",
        body["message"].as_str().unwrap_or_default()
    );
    let token = body["access_token"]
        .as_str()
        .context("the login answer has no access_token")?;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .build()?)
}

pub async fn run(config: &Config, args: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.orders > 0 && args.concurrency > 0,
        "--orders and --concurrency must be at least 1"
    );
    let url = args.url.trim_end_matches('/').to_owned();
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    println!(
        "eventyr demo: {} orders, {} at once, mix {:?}, seed {seed}",
        args.orders, args.concurrency, args.mix
    );
    let planned = Arc::new(plan(&args, seed));
    let progress = indicatif::ProgressBar::new(planned.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} orders {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let client = login(&url, &args.user, &args.password).await?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.min(planned.len()) {
        let (planned, next, client, url, run_id, progress) = (
            Arc::clone(&planned),
            Arc::clone(&next),
            client.clone(),
            url.clone(),
            run_id.clone(),
            progress.clone(),
        );
        let wait = args.wait;
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(order) = planned.get(i) else {
                    return anyhow::Ok(outcomes);
                };
                let key = format!("demo-{run_id}-{i}");
                outcomes.push(drive(&client, &url, &key, &order.body, wait).await?);
                progress.inc(1);
            }
        }));
    }
    let mut outcomes = Vec::new();
    for worker in workers {
        outcomes.extend(worker.await??);
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();

    let mut by: BTreeMap<(String, &'static str), usize> = BTreeMap::new();
    let mut latency = latency_histogram();
    for outcome in &outcomes {
        let class = outcome.reason.as_deref().map_or("", reason_class);
        *by.entry((outcome.status.clone(), class)).or_default() += 1;
        record(&mut latency, outcome.latency);
    }
    println!(
        "{} orders in {:.1} s: {:.0} orders/s end to end",
        outcomes.len(),
        elapsed.as_secs_f64(),
        outcomes.len() as f64 / elapsed.as_secs_f64()
    );
    println!("{:<12} {:<22} {:>7}", "STATUS", "REASON", "ORDERS");
    for ((status, class), count) in &by {
        println!("{status:<12} {class:<22} {count:>7}");
    }
    println!(
        "latency, accepted to final status: p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms",
        millis(&latency, 0.5),
        millis(&latency, 0.95),
        millis(&latency, 0.99)
    );
    if args.no_reconcile {
        return Ok(());
    }
    let report = reconcile::check(&config.data_dir, config)
        .await
        .context("reconciliation needs the data directory of the running `eventyr up` (--data-dir), or pass --no-reconcile")?;
    reconcile::print(&report);
    anyhow::ensure!(
        report.mismatches.is_empty(),
        "{} invariant(s) broken",
        report.mismatches.len()
    );
    Ok(())
}
