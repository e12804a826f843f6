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
use eventyr_bus::{
    Consumer, ConsumerName, ConsumerOptions, Handler, HandlerError, InProcBus, Message,
    PublicEvents, ServiceName,
};
use eventyr_core::{SystemClock, Timestamp};
use eventyr_cqrs::{Aggregate, Command, CommandHandler, HandlerOptions, Upcasters};
use eventyr_http::{Credential, Faults, ReadyCheck, StepRoute, conventions, guarded, probes};
use eventyr_saga::choreography::{FlowStatus, Tracker, TrackerHandler};
use eventyr_saga::{
    BusParticipants, CommandHandler as BusCommands, EngineOptions, HttpParticipants, InProcess,
    Participants, ReplyHandler, Routed, SagaEngine, StepHandler,
};
use eventyr_store::EventStore;
use eventyr_store::readmodel::ReadModels;
use order::domain::SagaMode;
use tokio::sync::watch;

use crate::cli::{SagaModeArg, UpArgs};
use crate::config::Config;
use crate::dashboard::Dashboard;
use crate::stores;

/// The running system: its addresses, and its tasks (which end after the stop).
pub struct Addresses {
    /// The gateway: the public API.
    pub public: SocketAddr,
    /// The services' own API behind it (loopback, no authentication).
    pub internal: SocketAddr,
    pub services: Vec<(&'static str, SocketAddr)>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Set at the first stop signal: every service's readiness answers 503.
    pub draining: crate::signals::Draining,
}

/// A service's command handler. With snapshots: an item or a customer account
/// gathers an event per order, and every read of it (a price, a balance) or command
/// on it that misses the cache would otherwise replay them all.
fn handler<A: Aggregate>(store: &Arc<dyn EventStore>) -> Arc<CommandHandler<A>> {
    let options = HandlerOptions {
        snapshot_every: Some(SNAPSHOT_EVERY),
        ..HandlerOptions::default()
    };
    Arc::new(CommandHandler::new(
        Arc::clone(store),
        Arc::new(Upcasters::new()),
        options,
    ))
}

/// How often `up` looks for orders whose saga never started, and how old such an
/// order must be (younger ones are still starting their saga themselves).
const ORPHANS_EVERY: Duration = Duration::from_secs(2);
const ORPHANS_GRACE: Duration = Duration::from_secs(5);

/// Events between two snapshots of an aggregate.
const SNAPSHOT_EVERY: u64 = 50;

/// How long a stop waits for the requests under way.
const GRACE: Duration = Duration::from_secs(10);

/// Serves `router` on a loopback port until `stop` rings — on the server every
/// listener runs on (connections, idle time and headers bounded); while `down` says
/// so, every connection is closed at once (the port stays ours).
async fn serve(
    name: &'static str,
    router: Router,
    mut stop: watch::Receiver<bool>,
    down: Option<watch::Receiver<bool>>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("cannot listen on 127.0.0.1")?;
    let bound = listener.local_addr()?;
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let service = move |_peer| router.clone();
    tasks.push(tokio::spawn(eventyr_gateway::server::serve(
        name,
        listener,
        eventyr_gateway::server::ServerLimits::default(),
        service,
        shutdown,
        GRACE,
        down,
    )));
    Ok(bound)
}

/// What else a service needs running to be ready (the order service: its saga
/// engine and its projections); `Err` says what stopped.
type Running = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Ready when the service's store answers and still takes writes, its end of the bus
/// (its inbox database) answers, and what else it needs runs.
fn ready(store: &Arc<dyn EventStore>, inbox: &Arc<dyn ReadModels>, running: Running) -> ReadyCheck {
    let (store, inbox) = (Arc::clone(store), Arc::clone(inbox));
    Arc::new(move || {
        let (store, inbox, running) =
            (Arc::clone(&store), Arc::clone(&inbox), Arc::clone(&running));
        Box::pin(async move {
            store.writable().map_err(|e| format!("store writer: {e}"))?;
            store.head().await.map_err(|e| format!("store: {e}"))?;
            inbox.list().await.map_err(|e| format!("bus inbox: {e}"))?;
            running()
        })
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

/// How `up` starts, from its flags.
pub struct StartOptions {
    pub listen: SocketAddr,
    pub mode: SagaMode,
    /// The internal credential; None: a random one.
    pub credential: Option<String>,
    /// Whether the demo users may log in.
    pub demo_users: bool,
    /// `--allowed-host`.
    pub allowed_hosts: Vec<String>,
}

impl StartOptions {
    /// Whether the demo users (passwords = names) may log in: asked for, and no
    /// `[[users]]` configured in their place.
    fn demo_in_force(&self, config: &Config) -> bool {
        self.demo_users && config.users.is_empty()
    }
}

/// Starts the system; it runs until `stop` rings. Returns its addresses.
pub async fn start(
    data_dir: &Path,
    options: StartOptions,
    config: &Config,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Addresses> {
    let StartOptions {
        listen,
        mode,
        credential,
        demo_users,
        allowed_hosts,
    } = options;
    // The stop comes in two steps: the listeners first (they finish the requests under
    // way, which may still start sagas and write), then, once they are done, the
    // components behind them (consumers, the engine, projections).
    let listeners_stop = stop;
    let (components, stop) = watch::channel(false);
    let mut listeners: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let dir = data_dir.join("services");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // A data directory of an earlier version may be open to others: no longer.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} its owner's", data_dir.display()))?;
    }
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
    // The internal credential of this start: every listener asks for it; the
    // gateway, the saga engine and the services' consumers send it.
    let credential =
        Credential::new(credential.unwrap_or_else(eventyr_gateway::session::random_secret))
            .map_err(|e| anyhow::anyhow!("--internal-credential: {e}"))?;
    let draining = crate::signals::Draining::default();
    let with_probes = |name: &'static str,
                       router: Router,
                       store: &Arc<dyn EventStore>,
                       inbox: &Arc<dyn ReadModels>,
                       running: Running| {
        let router = router.merge(probes(ready(store, inbox, running), metrics.clone()));
        guarded(
            conventions(eventyr_http::traced(name, router)),
            credential.clone(),
        )
    };
    let inventory_state = inventory::api::Inventory {
        items,
        faults: Faults::default(),
    };
    let payment_state = payment::api::Payments {
        accounts: credit,
        of_order: payment::read::payments_of_order(&payment_store),
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
    let participants = [
        (
            "inventory",
            &inventory_store,
            inventory::api::router(inventory_state.clone()),
            &inventory_state.faults,
            &inventory::api::STEPS[..],
            &inventory::domain::PUBLIC_EVENTS[..],
        ),
        (
            "payment",
            &payment_store,
            payment::api::router(payment_state.clone()),
            &payment_state.faults,
            &payment::api::STEPS[..],
            &payment::domain::PUBLIC_EVENTS[..],
        ),
        (
            "points",
            &points_store,
            points::api::router(points_state.clone()),
            &points_state.faults,
            &points::api::STEPS[..],
            &points::domain::PUBLIC_EVENTS[..],
        ),
        (
            "shipping",
            &shipping_store,
            shipping::api::router(shipping_state.clone()),
            &shipping_state.faults,
            &shipping::api::STEPS[..],
            &shipping::domain::PUBLIC_EVENTS[..],
        ),
        (
            "notification",
            &notification_store,
            notification::api::router(notification_state.clone()),
            &notification_state.faults,
            &notification::api::STEPS[..],
            &notification::domain::PUBLIC_EVENTS[..],
        ),
    ];
    let mut services = Vec::new();
    for (name, store, router, faults, steps, events) in participants {
        let inbox = inbox(&dir, name)?;
        let stopping = draining.clone();
        let router = with_probes(
            name,
            router,
            store,
            &inbox,
            Arc::new(move || stopping.check()),
        );
        let (address, forwarder) = serve_service(
            name,
            router.clone(),
            faults,
            listeners_stop.clone(),
            &mut listeners,
        )
        .await?;
        tasks.push(forwarder);
        services.push(Service {
            name,
            steps,
            events,
            credential: credential.clone(),
            store: Arc::clone(store),
            router,
            faults: faults.clone(),
            address,
            inbox,
        });
    }
    let service = |name: &str| {
        services
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no service {name} is served"))
    };
    let knobs: Arc<HashMap<&'static str, Faults>> = Arc::new(
        services
            .iter()
            .map(|s| (s.name, s.faults.clone()))
            .collect(),
    );
    // The knobs set in eventyr.toml (`[faults.<service>]`; names checked on load).
    for (service, settings) in &config.faults {
        if let Some(faults) = knobs.get(service.as_str()) {
            faults.set(*settings);
        }
    }

    // The bus: each service's store is its outbox.
    let bus = InProcBus::new();
    bus.register(
        bus_name("order")?,
        Arc::clone(&order_store),
        public_events(&order::domain::PUBLIC_EVENTS, true),
    );
    for s in &services {
        bus.register(
            bus_name(s.name)?,
            Arc::clone(&s.store),
            public_events(s.events, false),
        );
    }
    let order_inbox = inbox(&dir, "order")?;
    let mut consumers: Vec<Consumer> = Vec::new();

    // Orchestrated: inventory and payment over HTTP (synchronous, with timeouts,
    // retries, a circuit breaker and a bulkhead each); points, shipping and
    // notification over the bus; the order service's own steps in process.
    let mut remote = HttpParticipants::with_headers(Arc::new(SystemClock), credential.headers())?;
    let mut over_bus: Vec<&'static str> = Vec::new();
    check_step_owners(&services)?;
    for s in &services {
        let base = format!("http://{}", s.address);
        for route in s.steps {
            if OVER_HTTP.contains(&route.step) {
                remote = remote.step(
                    route.step,
                    format!("{base}{}", route.action),
                    route.compensation.map(|c| format!("{base}{c}")),
                );
            } else {
                over_bus.push(route.step);
            }
        }
    }
    let orders = handler::<order::domain::Order>(&order_store);
    let local = Arc::new(
        order::api::steps(Arc::clone(&orders))
            .into_iter()
            .fold(InProcess::new(), |p, (name, step)| p.step(name, step)),
    );
    let commands: Arc<dyn Participants> = Arc::new(BusParticipants::new(Arc::clone(&order_store)));
    let participants = over_bus
        .iter()
        .fold(Routed::new(Arc::new(remote)), |routed, step| {
            routed.route(*step, Arc::clone(&commands))
        })
        .route("order", Arc::clone(&local) as _)
        .route("complete", local as _);
    let timeouts = order::saga::Timeouts::default();
    let engine = SagaEngine::new(
        Arc::clone(&order_store),
        Arc::new(participants),
        Arc::new(SystemClock),
        EngineOptions::default(),
    )
    .register(order::saga::definition(timeouts));
    let sagas = engine.handle();
    for s in services
        .iter()
        .filter(|s| s.steps.iter().any(|r| over_bus.contains(&r.step)))
    {
        let steps = step_handlers(s)
            .into_iter()
            .filter(|(step, _)| over_bus.contains(&step.as_str()))
            .fold(
                BusCommands::new(Arc::clone(&s.store)),
                |h, (step, handler)| h.step(step, handler),
            );
        consumers.push(consumer(
            &format!("{}_saga_commands", s.name),
            "order",
            &bus,
            &s.inbox,
            WhileUp::new(steps, &s.faults),
        )?);
        consumers.push(consumer(
            &format!("order_saga_replies_{}", s.name),
            s.name,
            &bus,
            &order_inbox,
            ReplyHandler::new(sagas.clone()),
        )?);
    }

    // Choreographed: the same saga definition, each service reacting to its
    // neighbours' events; a tracker consumer per service follows the flows.
    let chain = order::saga::chain(timeouts);
    let order_steps: HashMap<String, StepHandler> = order::api::steps(Arc::clone(&orders))
        .into_iter()
        .map(|(name, step)| (name.to_owned(), step))
        .collect();
    for source in chain.sources("order") {
        let participant = chain.participant(
            "order",
            &source,
            Arc::clone(&order_store),
            order_steps.clone(),
        );
        consumers.push(consumer(
            &format!("order_chain_{source}"),
            &source,
            &bus,
            &order_inbox,
            participant,
        )?);
    }
    for s in &services {
        let steps: HashMap<String, StepHandler> = step_handlers(s).into_iter().collect();
        for source in chain.sources(s.name) {
            let participant =
                chain.participant(s.name, &source, Arc::clone(&s.store), steps.clone());
            consumers.push(consumer(
                &format!("{}_chain_{source}", s.name),
                &source,
                &bus,
                &s.inbox,
                WhileUp::new(participant, &s.faults),
            )?);
        }
    }
    let flow = Arc::new(chain.flow(FLOW_DEADLINE));
    let mut trackers = Vec::new();
    for name in std::iter::once("order").chain(services.iter().map(|s| s.name)) {
        let tracker = format!("order_flows_{name}");
        consumers.push(consumer(
            &tracker,
            name,
            &bus,
            &order_inbox,
            TrackerHandler::new(Arc::clone(&flow)),
        )?);
        trackers.push(ConsumerName::new(&tracker)?);
    }
    for consumer in consumers {
        let mut consumer_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let stopped = async move {
                let _ = consumer_stop.wait_for(|s| *s).await;
            };
            if let Err(error) = consumer.run(stopped).await {
                tracing::error!(%error, "a consumer stopped");
            }
        }));
    }

    // The engine ending before the stop (an error it cannot get past) makes the
    // order service unready.
    let engine_ended: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let mut engine_stop = stop.clone();
    let ended = Arc::clone(&engine_ended);
    tasks.push(tokio::spawn(async move {
        let stopping = engine_stop.clone();
        let stopped = async move {
            let _ = engine_stop.wait_for(|s| *s).await;
        };
        let outcome = engine.run(stopped).await;
        if let Err(error) = &outcome {
            tracing::error!(%error, "the saga engine stopped");
        }
        if !*stopping.borrow() {
            let why = outcome
                .err()
                .map_or_else(|| "it ended".to_owned(), |e| e.to_string());
            *ended
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
        }
    }));

    // Orders placed whose saga never started (the process died in between).
    order::api::restart_sagas(&orders, &order_store, &sagas)
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot restart the sagas of pending orders: {}", e.message)
        })?;
    // And while it runs: an order whose request was cut off between placing it and
    // starting its saga gets its saga within seconds.
    let mut orphans_stop = stop.clone();
    tasks.push(tokio::spawn(order::api::start_orphaned_sagas(
        Arc::clone(&orders),
        Arc::clone(&order_store),
        sagas.clone(),
        ORPHANS_EVERY,
        ORPHANS_GRACE,
        async move {
            let _ = orphans_stop.wait_for(|s| *s).await;
        },
    )));
    // The order list: a projection of the order store into its own read model.
    let read_models: Arc<dyn ReadModels> = Arc::new(eventyr_store_sqlite::SqliteReadModels::open(
        dir.join("order-read"),
    )?);
    let (runner, projections) = eventyr_cqrs::projections(
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
    let flows = Flows {
        flow,
        models: Arc::clone(&order_inbox),
        consumers: trackers,
    };
    let inventory_address = service("inventory")?.address;
    let addresses = services.iter().map(|s| (s.name, s.address)).collect();
    let public = order::api::router(order::api::Orders {
        orders,
        sagas: sagas.clone(),
        prices: order::api::price_client(
            format!("http://{inventory_address}"),
            credential.headers(),
        ),
        read_models,
        mode,
    })
    .merge(inventory::api::public(inventory_state))
    .merge(payment::api::public(payment_state))
    .merge(points::api::public(points_state))
    .merge(shipping::api::public(shipping_state))
    .merge(notification::api::public(notification_state))
    .merge(eventyr_saga::admin_router(sagas))
    .merge(flows_router(Arc::new(flows)))
    .merge(faults_router(knobs));
    // The dashboard, and the saga monitor it shows.
    let monitor = eventyr_saga::SagaMonitor::new([&order::saga::definition(timeouts)]);
    let mut monitor_stop = stop.clone();
    tasks.push(tokio::spawn(Arc::clone(&monitor).run(
        Arc::clone(&order_store),
        async move {
            let _ = monitor_stop.wait_for(|s| *s).await;
        },
    )));
    let stores = std::iter::once(("order", Arc::clone(&order_store)))
        .chain(services.iter().map(|s| (s.name, Arc::clone(&s.store))))
        .collect();
    let dashboard = Dashboard::new(monitor, projections.clone(), metrics.clone(), stores);
    tasks.push(tokio::spawn(Arc::clone(&dashboard).run(stop.clone())));
    let public = public.merge(crate::dashboard::router(Arc::clone(&dashboard)));
    let running: Running = {
        let projections = projections.clone();
        let stopping = draining.clone();
        Arc::new(move || {
            stopping.check()?;
            if let Some(why) = &*engine_ended
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
            {
                return Err(format!("the saga engine stopped: {why}"));
            }
            for status in projections.status() {
                if let eventyr_cqrs::ProjectionState::Failed { error } = &status.state {
                    return Err(format!("projection {} stopped: {error}", status.name));
                }
            }
            Ok(())
        })
    };
    let internal = with_probes("api", public, &order_store, &order_inbox, running);
    let internal = serve(
        "api",
        internal,
        listeners_stop.clone(),
        None,
        &mut listeners,
    )
    .await?;
    let (public, gateway) = crate::front::serve(
        data_dir,
        crate::front::Front {
            listen,
            internal,
            credential: &credential,
            demo_users,
            allowed_hosts: &allowed_hosts,
            users: &config.users,
        },
        listeners_stop.clone(),
        &mut listeners,
    )
    .await?;
    // Once every listener has finished, the components stop.
    let mut asked = listeners_stop;
    tasks.push(tokio::spawn(async move {
        let _ = asked.wait_for(|s| *s).await;
        futures::future::join_all(listeners).await;
        let _ = components.send(true);
    }));
    let _ = dashboard.gateway.set(gateway);
    let _ = dashboard.services.set(
        std::iter::once(("order", internal))
            .chain(services.iter().map(|s| (s.name, s.address)))
            .collect(),
    );
    Ok(Addresses {
        public,
        internal,
        services: addresses,
        tasks,
        draining,
    })
}

/// A participant service as `up` wires it.
struct Service {
    name: &'static str,
    /// The saga steps it serves, and its public events (its own lists).
    steps: &'static [StepRoute],
    events: &'static [&'static str],
    /// What its consumers present to its routes.
    credential: Credential,
    store: Arc<dyn EventStore>,
    /// Its routes, served on `address` and called in process by its bus consumers.
    router: Router,
    faults: Faults,
    address: SocketAddr,
    /// Its consumers' inboxes.
    inbox: Arc<dyn ReadModels>,
}

/// Every participant step of the order saga is served by the service the saga says
/// runs it (`order::saga::SERVICES`), and by no other: the two lists come from their
/// owners, and a start refuses to wire them if they disagree.
fn check_step_owners(services: &[Service]) -> anyhow::Result<()> {
    for (step, owner) in order::saga::SERVICES {
        if owner == "order" {
            continue;
        }
        let servers: Vec<&str> = services
            .iter()
            .filter(|s| s.steps.iter().any(|r| r.step == step))
            .map(|s| s.name)
            .collect();
        if servers != [owner] {
            anyhow::bail!(
                "step {step} of the order saga runs at {owner}, but is served by {servers:?}"
            );
        }
    }
    Ok(())
}

/// The steps the orchestrator calls over synchronous HTTP (PLAN.md); the other
/// participants' steps travel over the bus.
const OVER_HTTP: [&str; 3] = ["inventory", "confirm", "payment"];

/// A choreographed order not finished this long after it began is flagged stuck.
const FLOW_DEADLINE: Duration = Duration::from_secs(300);

/// A service's steps as handlers that call its routes in process.
fn step_handlers(service: &Service) -> Vec<(String, StepHandler)> {
    service
        .steps
        .iter()
        .map(|route| {
            let handler = eventyr_saga::local_step(
                service.router.clone(),
                route.action,
                route.compensation,
                service.credential.headers(),
            );
            (route.step.to_owned(), handler)
        })
        .collect()
}

/// What a service's outbox publishes: its own public events (`contracts/events/`),
/// the saga's commands (the order service) or replies (the others), and the
/// choreography's events.
fn public_events(own: &[&'static str], orchestrator: bool) -> PublicEvents {
    let saga = if orchestrator {
        eventyr_saga::bus::COMMAND_TYPE
    } else {
        eventyr_saga::bus::REPLY_TYPE
    };
    PublicEvents::only(
        own.iter()
            .copied()
            .chain(std::iter::once(saga))
            .chain(eventyr_saga::chain::EVENT_TYPES),
    )
}

fn bus_name(service: &str) -> anyhow::Result<ServiceName> {
    Ok(ServiceName::new(service)?)
}

/// A service's consumer inboxes: read models of its own, not flushed on every commit
/// (`synchronous = NORMAL`). That is safe on the in-process bus, and only there: the
/// group's checkpoint lives in the same database as the inbox records and the
/// handlers' statements, so a power cut takes them back together and the messages are
/// delivered again, to handlers whose other effects are idempotent (derived event ids,
/// steps idempotent by key). A `kill -9` loses nothing either way. With a broker
/// (NATS), which forgets a message once it is acknowledged, inboxes must be durable.
/// Measured: 121 → 177 orders/s orchestrated, 93 → 161 choreographed (BENCHMARKS.md).
fn inbox(dir: &Path, service: &str) -> anyhow::Result<Arc<dyn ReadModels>> {
    let path = dir.join(format!("{service}-inbox"));
    let models = eventyr_store_sqlite::SqliteReadModels::open(&path)
        .with_context(|| format!("cannot open the inboxes in {}", path.display()))?;
    Ok(Arc::new(models))
}

/// The inboxes of a service of `up` on `data_dir` (`eventyr dlq --service`).
pub fn service_inboxes(data_dir: &Path, service: &str) -> anyhow::Result<Arc<dyn ReadModels>> {
    let known = std::iter::once("order").chain(crate::config::FAULT_SERVICES);
    anyhow::ensure!(
        known.clone().any(|s| s == service),
        "no service {service} (one of {})",
        known.collect::<Vec<_>>().join(", ")
    );
    let dir = data_dir.join("services");
    anyhow::ensure!(
        dir.join(format!("{service}-inbox")).is_dir(),
        "no inboxes of {service} in {}: has `eventyr up` run with this data directory?",
        dir.display()
    );
    inbox(&dir, service)
}

/// Consumer `name` of `source`'s events on the bus.
fn consumer(
    name: &str,
    source: &str,
    bus: &InProcBus,
    inbox: &Arc<dyn ReadModels>,
    handler: impl Handler,
) -> anyhow::Result<Consumer> {
    let options = ConsumerOptions {
        // Steps wait on their service and on retries: room for a demo's concurrency.
        max_in_flight: 64,
        ..ConsumerOptions::default()
    };
    Ok(Consumer::new(
        ConsumerName::new(name)?,
        bus_name(source)?,
        Arc::new(bus.clone()),
        Arc::clone(inbox),
        Arc::new(handler),
    )
    .options(options))
}

/// A service's consumer that takes nothing while the service is "down": its messages
/// wait on the bus (as they would for a stopped service), and are handled once it is
/// up again.
struct WhileUp<H> {
    inner: H,
    faults: Faults,
}

impl<H> WhileUp<H> {
    fn new(inner: H, faults: &Faults) -> Self {
        Self {
            inner,
            faults: faults.clone(),
        }
    }
}

#[async_trait::async_trait]
impl<H: Handler> Handler for WhileUp<H> {
    fn schema(&self) -> Vec<String> {
        self.inner.schema()
    }

    fn event_types(&self) -> Option<std::collections::BTreeSet<String>> {
        self.inner.event_types()
    }

    async fn handle(
        &self,
        message: &Message,
    ) -> Result<Vec<eventyr_store::sql::SqlStatement>, HandlerError> {
        let mut knobs = self.faults.watch();
        // A closed channel (never: the service holds it) lets the message through.
        let _ = knobs.wait_for(|f| !f.down).await;
        self.inner.handle(message).await
    }
}

/// The tracker of choreographed orders: its consumers' inboxes, read together.
struct Flows {
    flow: Arc<eventyr_saga::choreography::Flow>,
    models: Arc<dyn ReadModels>,
    consumers: Vec<ConsumerName>,
}

impl Flows {
    /// Every flow, newest first (a consumer not started yet: 503).
    async fn all(&self) -> Result<Vec<FlowStatus>, eventyr_http::ApiError> {
        let unavailable =
            |e: eventyr_bus::BusError| eventyr_http::ApiError::unavailable(e.to_string());
        let tracker = Tracker::open(
            Arc::clone(&self.flow),
            Arc::clone(&self.models),
            &self.consumers,
            Arc::new(SystemClock),
        )
        .await
        .map_err(unavailable)?;
        tracker.flows().await.map_err(unavailable)
    }
}

/// `GET /admin/flows?limit=` (choreographed orders, newest first, with where each
/// stands) and `GET /admin/flows/{id}`, from the tracker.
fn flows_router(flows: Arc<Flows>) -> Router {
    use axum::extract::{Path as UrlPath, Query, State};
    use eventyr_http::ApiError;
    #[derive(serde::Deserialize)]
    struct ListQuery {
        limit: Option<usize>,
    }
    async fn list(
        State(flows): State<Arc<Flows>>,
        Query(query): Query<ListQuery>,
    ) -> Result<axum::Json<Vec<FlowStatus>>, ApiError> {
        let mut flows = flows.all().await?;
        flows.truncate(query.limit.unwrap_or(100).clamp(1, 1000));
        Ok(axum::Json(flows))
    }
    async fn show(
        State(flows): State<Arc<Flows>>,
        UrlPath(id): UrlPath<String>,
    ) -> Result<axum::Json<FlowStatus>, ApiError> {
        flows
            .all()
            .await?
            .into_iter()
            .find(|f| f.correlation_id == id)
            .map(axum::Json)
            .ok_or_else(|| ApiError::not_found(format!("no choreographed order {id}")))
    }
    Router::new()
        .route("/admin/flows", axum::routing::get(list))
        .route("/admin/flows/{id}", axum::routing::get(show))
        .with_state(flows)
}

pub async fn up(config: &Config, args: UpArgs) -> anyhow::Result<()> {
    // The embedded mode keeps every service's data in SQLite under the data
    // directory; running it on another store is not a silent choice.
    if config.store.backend != crate::cli::StoreKind::Sqlite {
        anyhow::bail!(
            "eventyr up is the embedded mode: every service keeps its data in SQLite under \
             --data-dir; the store setting (--store, EVENTYR_STORE, store.backend) is for \
             the event-store commands"
        );
    }
    let (stop, stopped) = watch::channel(false);
    let mode = match args.saga_mode.or(config.saga_mode) {
        Some(SagaModeArg::Choreographed) => SagaMode::Choreographed,
        Some(SagaModeArg::Orchestrated) | None => SagaMode::Orchestrated,
    };
    let options = StartOptions {
        listen: args.listen,
        mode,
        credential: args.internal_credential.clone(),
        demo_users: !args.no_demo,
        allowed_hosts: args.allowed_hosts.clone(),
    };
    if options.demo_in_force(config) && !args.listen.ip().is_loopback() && !args.demo_on_network {
        anyhow::bail!(
            "--listen {} is not a loopback address and the demo users' passwords are their \
             names: start with --no-demo (or [[users]] in eventyr.toml), or say \
             --demo-on-network if you mean it",
            args.listen
        );
    }
    let addresses = start(&config.data_dir, options, config, stopped).await?;
    println!("eventyr is up ({}).", config.data_dir.display());
    println!("public API on http://{}", addresses.public);
    println!(
        "services' API on http://{} (loopback, behind the gateway, internal credential only)",
        addresses.internal
    );
    let mode_name = match mode {
        SagaMode::Orchestrated => "orchestrated",
        SagaMode::Choreographed => "choreographed",
    };
    println!(
        "sagas of new orders: {mode_name} (see http://{0}/admin/sagas and http://{0}/admin/flows)",
        addresses.public
    );
    for (service, address) in &addresses.services {
        println!("  {service:<13} steps on http://{address}");
    }
    println!(
        "try: TOKEN=$(curl -s -X POST http://{0}/auth/login -H 'content-type: application/json' \\\n         -d '{{\"username\":\"alice\",\"password\":\"alice\"}}' | jq -r .access_token)\n     \
         curl -s -X POST http://{0}/api/orders -H \"authorization: Bearer $TOKEN\" -H 'content-type: application/json' \\\n         -d '{{\"customer_id\":\"alice\",\"items\":[{{\"sku\":\"SKU-1\",\"quantity\":2}}],\"points_to_use\":10}}'",
        addresses.public
    );
    println!(
        "demo users: alice/alice and bob/bob (customers), admin/admin (admin); \
         customers alice (credit 100 000.00, 500 points), bob (credit 50.00, no points)"
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
    // A graceful stop: readiness 503 first, then the listeners stop taking
    // connections and finish the requests under way, the consumers, the engine and
    // the projections stop; a second signal stops at once.
    let signal = crate::signals::stop_requested().await?;
    println!("stopping ({signal}): draining for {:?}", args.drain_delay);
    addresses.draining.start();
    tokio::time::sleep(args.drain_delay).await;
    let _ = stop.send(true);
    let finished = futures::future::join_all(addresses.tasks);
    if tokio::time::timeout(args.shutdown_grace, finished)
        .await
        .is_err()
    {
        anyhow::bail!(
            "some components did not stop within {:?} (--shutdown-grace)",
            args.shutdown_grace
        );
    }
    println!("stopped");
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
                    tracing::error!(
                        check = %mismatch.check,
                        id = %mismatch.id,
                        detail = %mismatch.detail,
                        "Data inconsistency detected"
                    );
                }
            }
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "the reconciliation failed")
            }
        }
    }
}

/// Serves a service on a loopback port of its own. While its `down` knob is set, the
/// listener closes every connection at once (as if nothing listened) without giving
/// its port away, so no other process can take it meanwhile.
/// Returns its address and the task that follows the knob (it ends with them).
async fn serve_service(
    name: &'static str,
    router: Router,
    faults: &Faults,
    stop: watch::Receiver<bool>,
    listeners: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let mut knobs = faults.watch();
    let (down_sender, down) = watch::channel(knobs.borrow().down);
    let forwarder = tokio::spawn(async move {
        while knobs.changed().await.is_ok() {
            let is_down = knobs.borrow_and_update().down;
            down_sender.send_if_modified(|d| std::mem::replace(d, is_down) != is_down);
        }
    });
    let address = serve(name, router, stop, Some(down), listeners).await?;
    Ok((address, forwarder))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Readiness says what stopped: a store, the inbox, or a component the service
    /// needs running (the order service: its saga engine and projections).
    #[tokio::test]
    async fn readiness_names_what_stopped() {
        let dir = tempfile::tempdir().expect("dir");
        let store: Arc<dyn EventStore> = Arc::new(eventyr_store::MemoryStore::default());
        let inbox: Arc<dyn ReadModels> = Arc::new(
            eventyr_store_sqlite::SqliteReadModels::open(dir.path()).expect("read models"),
        );
        let stopped = Arc::new(std::sync::Mutex::new(None::<String>));
        let seen = Arc::clone(&stopped);
        let running: Running = Arc::new(move || match &*seen.lock().expect("lock") {
            Some(why) => Err(format!("the saga engine stopped: {why}")),
            None => Ok(()),
        });
        let check = ready(&store, &inbox, running);
        assert_eq!(check().await, Ok(()));
        *stopped.lock().expect("lock") = Some("it ended".into());
        assert_eq!(
            check().await,
            Err("the saga engine stopped: it ended".to_owned())
        );
    }
}
