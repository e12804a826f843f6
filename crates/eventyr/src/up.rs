//! `eventyr up`: the reference system in one process — the six services, each with
//! its own SQLite store under `<data-dir>/services/` and its own HTTP listener on
//! 127.0.0.1 for the saga's steps; the saga engine in the order service; the public API
//! (PLAN.md) on `--listen`. Seeds the demo data on first start; Ctrl-C stops it; the
//! next start resumes where it stopped (the engine recovers unfinished sagas).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use eventyr_core::{SystemClock, Timestamp};
use eventyr_cqrs::{Aggregate, Command, CommandHandler, DomainEvent, HandlerOptions, Upcasters};
use eventyr_http::{Faults, ReadyCheck, conventions, probes};
use eventyr_saga::{EngineOptions, HttpParticipants, InProcess, Routed, SagaEngine};
use eventyr_store::{EventStore, Filter, ReadAll};
use futures::FutureExt;
use tokio::sync::watch;

use crate::cli::UpArgs;
use crate::config::Config;
use crate::stores;

/// The running system: its addresses, and its tasks (which end after the stop).
pub struct Addresses {
    pub public: SocketAddr,
    pub services: Vec<(&'static str, SocketAddr)>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn handler<A: Aggregate>(store: &Arc<dyn EventStore>) -> Arc<CommandHandler<A>> {
    Arc::new(CommandHandler::new(
        Arc::clone(store),
        Arc::new(Upcasters::new()),
        HandlerOptions::default(),
    ))
}

/// Serves `router` on `address` until `stop` rings.
async fn serve(
    address: SocketAddr,
    router: Router,
    mut stop: watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    let bound = listener.local_addr()?;
    tasks.push(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(error) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            eprintln!("error: a listener failed: {error}");
        }
    }));
    Ok(bound)
}

fn ready(store: &Arc<dyn EventStore>) -> ReadyCheck {
    let store = Arc::clone(store);
    Arc::new(move || {
        let store = Arc::clone(&store);
        Box::pin(async move { store.head().await.map(|_| ()).map_err(|e| e.to_string()) })
    })
}

/// Extra demo customers, `c001` … `c100`.
pub const DEMO_CUSTOMERS: u32 = 100;

/// The demo data of PLAN.md, idempotent (command ids), so it runs on every start.
async fn seed(
    items: &CommandHandler<inventory::domain::Item>,
    credit: &CommandHandler<payment::domain::CreditAccount>,
    points: &CommandHandler<points::domain::PointsAccount>,
) -> anyhow::Result<()> {
    use inventory::domain::ItemCommand;
    let mut catalog: Vec<(String, i64, u64)> = (1..=20)
        .map(|i| (format!("SKU-{i}"), 500 + (i - 1) * 1_000, 1_000))
        .collect();
    catalog.push(("SKU-RARE".into(), 4_900, 1));
    for (sku, price_cents, quantity) in catalog {
        let id = eventyr_cqrs::CommandId::new(format!("seed:{sku}"))?;
        let stock = ItemCommand::Stock {
            sku: sku.clone(),
            price_cents,
            quantity,
        };
        match items.execute(Command::new(sku, stock).with_id(id)).await {
            Ok(_) | Err(eventyr_cqrs::CommandError::Rejected(_)) => {}
            Err(error) => return Err(error.into()),
        }
    }
    // PLAN.md's alice and bob, and 100 more customers for `eventyr demo`'s load (one
    // customer's aggregates would serialise every order on them).
    let mut customers: Vec<(String, i64, u64)> =
        vec![("alice".into(), 10_000_000, 500), ("bob".into(), 5_000, 0)];
    customers.extend((1..=DEMO_CUSTOMERS).map(|i| (format!("c{i:03}"), 100_000_000, 1_000_000)));
    for (customer, limit_cents, balance) in customers {
        let customer = customer.as_str();
        let id = eventyr_cqrs::CommandId::new(format!("seed:credit:{customer}"))?;
        let open = payment::domain::CreditCommand::Open {
            customer_id: customer.into(),
            limit_cents,
        };
        match credit
            .execute(Command::new(customer, open).with_id(id))
            .await
        {
            Ok(_) | Err(eventyr_cqrs::CommandError::Rejected(_)) => {}
            Err(error) => return Err(error.into()),
        }
        let id = eventyr_cqrs::CommandId::new(format!("seed:points:{customer}"))?;
        let open = points::domain::PointsCommand::Open {
            customer_id: customer.into(),
            balance,
        };
        match points
            .execute(Command::new(customer, open).with_id(id))
            .await
        {
            Ok(_) | Err(eventyr_cqrs::CommandError::Rejected(_)) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// An order's payments, from the payment store's events (a scan; a read model
/// indexed by order comes with the rest of the read side).
fn payments_of_order(store: &Arc<dyn EventStore>) -> payment::api::PaymentsOfOrder {
    let store = Arc::clone(store);
    Arc::new(move |order_id: String| {
        let store = Arc::clone(&store);
        async move {
            use payment::domain::CreditEvent;
            let mut read = ReadAll::from(eventyr_core::Position::FIRST)
                .limit(1000)
                .filter(Filter::event_type_prefix("Payment"));
            let mut found: Vec<payment::api::PaymentView> = Vec::new();
            loop {
                let slice = store
                    .read_all(&read)
                    .await
                    .map_err(|e| eventyr_http::ApiError::unavailable(e.to_string()))?;
                for event in &slice.events {
                    let Ok(decoded) = CreditEvent::from_stored(&event.event_type, &event.data)
                    else {
                        continue;
                    };
                    let customer = event
                        .stream_id
                        .as_str()
                        .strip_prefix("credit-")
                        .unwrap_or_default()
                        .to_owned();
                    let (id, status, amount) = match decoded {
                        CreditEvent::PaymentProcessed {
                            payment_id,
                            order_id: of,
                            amount_cents,
                            ..
                        } if of == order_id => (payment_id, "CHARGED", amount_cents),
                        CreditEvent::PaymentFailed {
                            payment_id,
                            order_id: of,
                            amount_cents,
                            ..
                        } if of == order_id => (payment_id, "DECLINED", amount_cents),
                        CreditEvent::PaymentRefunded { payment_id, .. } => {
                            if let Some(p) = found.iter_mut().find(|p| p.payment_id == payment_id) {
                                p.status = "REFUNDED".into();
                            }
                            continue;
                        }
                        _ => continue,
                    };
                    found.push(payment::api::PaymentView {
                        payment_id: id,
                        order_id: order_id.clone(),
                        customer_id: customer,
                        status: status.into(),
                        amount_cents: amount,
                    });
                }
                if slice.is_end() {
                    return Ok(found);
                }
                read.from = slice.next;
            }
        }
        .boxed()
    })
}

/// A SKU's price, asked of the inventory over HTTP (services share no tables).
fn prices(inventory: SocketAddr) -> order::api::PriceOf {
    let client = reqwest::Client::new();
    Arc::new(move |sku: String| {
        let client = client.clone();
        async move {
            if !inventory::api::valid_sku(&sku) {
                return None;
            }
            let url = format!("http://{inventory}/api/inventory/{sku}");
            let response = client
                .get(url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?;
            let stock: serde_json::Value = response.json().await.ok()?;
            stock["price_cents"].as_i64()
        }
        .boxed()
    })
}

/// Starts the system; it runs until `stop` rings. Returns its addresses.
pub async fn start(
    data_dir: &Path,
    listen: SocketAddr,
    config: &Config,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Addresses> {
    let dir = data_dir.join("services");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tasks = Vec::new();
    let open = |name: &str| stores::open_sqlite(&dir.join(format!("{name}.db")), config);
    let (inventory_store, payment_store, points_store) =
        (open("inventory")?, open("payment")?, open("points")?);
    let (shipping_store, notification_store, order_store) =
        (open("shipping")?, open("notification")?, open("order")?);
    let items = handler(&inventory_store);
    let credit = handler(&payment_store);
    let point_accounts = handler(&points_store);
    seed(&items, &credit, &point_accounts).await?;

    // One recorder for the process; every listener serves it on /metrics. (A second
    // start in the same process keeps the first recorder.)
    let metrics = eventyr_telemetry::install_prometheus().ok();
    let with_probes = |router: Router, store: &Arc<dyn EventStore>| {
        conventions(router.merge(probes(ready(store), metrics.clone())))
    };
    let inventory_state = inventory::api::Inventory {
        items,
        faults: Faults::default(),
    };
    let payment_state = payment::api::Payments {
        accounts: credit,
        of_order: payments_of_order(&payment_store),
        faults: Faults::default(),
    };
    let points_state = points::api::Points {
        accounts: point_accounts,
        faults: Faults::default(),
    };
    let shipping_state = shipping::api::Shipping {
        shipments: handler(&shipping_store),
        faults: Faults::default(),
    };
    let notification_state = notification::api::Notifications {
        mailboxes: handler(&notification_store),
        store: Arc::clone(&notification_store),
        faults: Faults::default(),
    };
    let inv = serve_service(
        with_probes(
            inventory::api::router(inventory_state.clone()),
            &inventory_store,
        ),
        &inventory_state.faults,
        stop.clone(),
        &mut tasks,
    )
    .await?;
    let pay = serve_service(
        with_probes(payment::api::router(payment_state.clone()), &payment_store),
        &payment_state.faults,
        stop.clone(),
        &mut tasks,
    )
    .await?;
    let pts = serve_service(
        with_probes(points::api::router(points_state.clone()), &points_store),
        &points_state.faults,
        stop.clone(),
        &mut tasks,
    )
    .await?;
    let ship = serve_service(
        with_probes(
            shipping::api::router(shipping_state.clone()),
            &shipping_store,
        ),
        &shipping_state.faults,
        stop.clone(),
        &mut tasks,
    )
    .await?;
    let note = serve_service(
        with_probes(
            notification::api::router(notification_state.clone()),
            &notification_store,
        ),
        &notification_state.faults,
        stop.clone(),
        &mut tasks,
    )
    .await?;
    let knobs: Arc<HashMap<&'static str, Faults>> = Arc::new(HashMap::from([
        ("inventory", inventory_state.faults.clone()),
        ("payment", payment_state.faults.clone()),
        ("points", points_state.faults.clone()),
        ("shipping", shipping_state.faults.clone()),
        ("notification", notification_state.faults.clone()),
    ]));

    let remote = HttpParticipants::new(Arc::new(SystemClock))?
        .step(
            "inventory",
            format!("http://{inv}/internal/reservations"),
            Some(format!(
                "http://{inv}/internal/reservations/{{saga_id}}/release"
            )),
        )
        .step(
            "confirm",
            format!("http://{inv}/internal/reservations/{{saga_id}}/confirm"),
            None,
        )
        .step(
            "payment",
            format!("http://{pay}/internal/payments"),
            Some(format!("http://{pay}/internal/payments/{{saga_id}}/refund")),
        )
        .step(
            "points",
            format!("http://{pts}/internal/points/deductions"),
            Some(format!(
                "http://{pts}/internal/points/deductions/{{saga_id}}/restore"
            )),
        )
        .step(
            "shipping",
            format!("http://{ship}/internal/shipments"),
            Some(format!(
                "http://{ship}/internal/shipments/{{saga_id}}/cancel"
            )),
        )
        .step(
            "notification",
            format!("http://{note}/internal/notifications"),
            None,
        );
    let orders = handler::<order::domain::Order>(&order_store);
    let local = Arc::new(
        order::api::steps(Arc::clone(&orders))
            .into_iter()
            .fold(InProcess::new(), |p, (name, step)| p.step(name, step)),
    );
    let participants = Routed::new(Arc::new(remote))
        .route("order", Arc::clone(&local) as _)
        .route("complete", local as _);
    let engine = SagaEngine::new(
        Arc::clone(&order_store),
        Arc::new(participants),
        Arc::new(SystemClock),
        EngineOptions::default(),
    )
    .register(order::saga::definition(order::saga::Timeouts::default()));
    let sagas = engine.handle();
    let mut engine_stop = stop.clone();
    tasks.push(tokio::spawn(async move {
        let stopped = async move {
            let _ = engine_stop.wait_for(|s| *s).await;
        };
        if let Err(error) = engine.run(stopped).await {
            eprintln!("error: the saga engine stopped: {error}");
        }
    }));

    // Orders placed whose saga never started (the process died in between).
    order::api::restart_sagas(&orders, &order_store, &sagas)
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot restart the sagas of pending orders: {}", e.message)
        })?;
    // The order list: a projection of the order store into its own read model.
    let read_models: Arc<dyn eventyr_store::readmodel::ReadModels> = Arc::new(
        eventyr_store_sqlite::SqliteReadModels::open(dir.join("order-read"))?,
    );
    let (runner, _projections) = eventyr_cqrs::projections(
        Arc::clone(&order_store),
        Arc::clone(&read_models),
        Arc::new(Upcasters::new()),
        vec![Arc::new(order::read::OrdersView) as Arc<dyn eventyr_cqrs::Projection>],
        eventyr_cqrs::RunnerOptions::default(),
    );
    let mut runner_stop = stop.clone();
    tasks.push(tokio::spawn(runner.run(async move {
        let _ = runner_stop.wait_for(|s| *s).await;
    })));
    let public = order::api::router(order::api::Orders {
        orders,
        sagas: sagas.clone(),
        prices: prices(inv),
        read_models,
    })
    .merge(inventory::api::public(inventory_state))
    .merge(payment::api::public(payment_state))
    .merge(points::api::public(points_state))
    .merge(shipping::api::public(shipping_state))
    .merge(notification::api::public(notification_state))
    .merge(eventyr_saga::admin_router(sagas))
    .merge(faults_router(knobs));
    let public = serve(listen, with_probes(public, &order_store), stop, &mut tasks).await?;
    Ok(Addresses {
        public,
        services: vec![
            ("inventory", inv),
            ("payment", pay),
            ("points", pts),
            ("shipping", ship),
            ("notification", note),
        ],
        tasks,
    })
}

pub async fn up(config: &Config, args: UpArgs) -> anyhow::Result<()> {
    let (stop, stopped) = watch::channel(false);
    let addresses = start(&config.data_dir, args.listen, config, stopped).await?;
    println!("eventyr is up ({}).", config.data_dir.display());
    println!("public API on http://{}", addresses.public);
    for (service, address) in &addresses.services {
        println!("  {service:<13} steps on http://{address}");
    }
    println!(
        "try: curl -s -X POST http://{}/api/orders -H 'content-type: application/json' \\\n       -d '{{\"customer_id\":\"alice\",\"items\":[{{\"sku\":\"SKU-1\",\"quantity\":2}}],\"points_to_use\":10}}'",
        addresses.public
    );
    println!(
        "demo customers: alice (credit 100 000.00, 500 points), bob (credit 50.00, no points)"
    );
    println!(
        "started at {}; reconciliation every {:?}; Ctrl-C stops it",
        Timestamp::from_system_time(std::time::SystemTime::now()),
        args.reconcile_every
    );
    tokio::spawn(reconcile_every(
        config.clone(),
        args.reconcile_every,
        stop.subscribe(),
    ));
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    println!("stopping");
    let _ = stop.send(true);
    // The listeners finish the requests under way; the engine and projection stop.
    let finished = futures::future::join_all(addresses.tasks);
    if tokio::time::timeout(Duration::from_secs(30), finished)
        .await
        .is_err()
    {
        eprintln!("error: some components did not stop within 30 s");
    }
    Ok(())
}

/// The periodic reconciliation: every `period`, checks the invariants; a mismatch is
/// an error line ("Data inconsistency detected") and the
/// `eventyr_reconciliation_mismatches` gauge.
async fn reconcile_every(config: Config, period: Duration, mut stop: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(period.max(Duration::from_secs(1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = interval.tick() => {}
        }
        match crate::reconcile::check(&config.data_dir, &config).await {
            Ok(report) => {
                metrics::gauge!(eventyr_telemetry::names::RECONCILIATION_MISMATCHES)
                    .set(report.mismatches.len() as f64);
                for mismatch in &report.mismatches {
                    eprintln!(
                        "error: Data inconsistency detected: {} {}: {}",
                        mismatch.check, mismatch.id, mismatch.detail
                    );
                }
            }
            Err(error) => eprintln!("error: the reconciliation failed: {error:#}"),
        }
    }
}

/// Serves a service on a loopback port of its own. While its `down` knob is set, the
/// listener is closed (connections are refused), then opened again on the same port.
async fn serve_service(
    router: Router,
    faults: &Faults,
    stop: watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("cannot listen on 127.0.0.1")?;
    let address = listener.local_addr()?;
    let mut knobs = faults.watch();
    tasks.push(tokio::spawn(async move {
        let mut stop = stop;
        let mut listener = Some(listener);
        loop {
            let current = match listener.take() {
                Some(listener) => listener,
                None => match tokio::net::TcpListener::bind(address).await {
                    Ok(listener) => listener,
                    Err(error) => {
                        eprintln!("error: cannot listen on {address} again: {error}");
                        return;
                    }
                },
            };
            let (mut stopping, mut going_down) = (stop.clone(), knobs.clone());
            let closing = async move {
                tokio::select! {
                    _ = stopping.wait_for(|s| *s) => {}
                    _ = going_down.wait_for(|f| f.down) => {}
                }
            };
            if let Err(error) = axum::serve(current, router.clone())
                .with_graceful_shutdown(closing)
                .await
            {
                eprintln!("error: a listener failed: {error}");
            }
            // Down (or stopping): wait until it is up again.
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = knobs.wait_for(|f| !f.down) => {}
            }
        }
    }));
    Ok(address)
}

/// `GET|PUT /admin/faults/{service}` on the public API: the demonstration knobs of
/// each participant (its own listener may be down).
fn faults_router(knobs: Arc<HashMap<&'static str, Faults>>) -> Router {
    use axum::extract::{Path as UrlPath, State};
    use eventyr_http::{ApiError, FaultSettings, Input};
    async fn get(
        State(knobs): State<Arc<HashMap<&'static str, Faults>>>,
        UrlPath(service): UrlPath<String>,
    ) -> Result<axum::Json<FaultSettings>, ApiError> {
        let faults = knobs
            .get(service.as_str())
            .ok_or_else(|| ApiError::not_found(format!("no service {service}")))?;
        Ok(axum::Json(faults.get()))
    }
    async fn put(
        State(knobs): State<Arc<HashMap<&'static str, Faults>>>,
        UrlPath(service): UrlPath<String>,
        Input(settings): Input<FaultSettings>,
    ) -> Result<axum::Json<FaultSettings>, ApiError> {
        let faults = knobs
            .get(service.as_str())
            .ok_or_else(|| ApiError::not_found(format!("no service {service}")))?;
        faults.set(settings);
        Ok(axum::Json(faults.get()))
    }
    Router::new()
        .route("/admin/faults/{service}", axum::routing::get(get).put(put))
        .with_state(knobs)
}
