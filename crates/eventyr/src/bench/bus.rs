//! `eventyr bench bus`: end to end, from an append in one service's store to the
//! effect committed in a consumer's inbox, with 1 producer and 2 competing instances
//! of one consumer (SQLite store and inboxes, every commit durable).
//!
//! Per backend and run, on fresh stores in the scratch directory:
//! - the ceiling: for `nats`, NATS's own publish rate on the same server (256
//!   publishes in flight, acknowledged, with message ids); for `inproc`, which has no
//!   broker, the producer store's own append rate with the same writers;
//! - throughput: `writers` closed-loop writers append `events` events to random
//!   streams while the consumer runs; events per second from the first append to the
//!   last effect committed;
//! - latency: appends paced at half that rate for `duration`; the time from each
//!   event's commit to its effect's commit, p50 and p99.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use eventyr_bus::{
    Consumer, ConsumerName, ConsumerOptions, EffectObserver, Handler, HandlerError, InProcBus,
    Message, PublicEvents, Publisher, Relay, ServiceName, Transport,
};
use eventyr_bus_nats::{NatsBus, NatsOptions};
use eventyr_core::{Clock as _, NewEvent, StreamId, SystemClock};
use eventyr_store::readmodel::ReadModels;
use eventyr_store::sql::SqlStatement;
use eventyr_store::{EventStore, ExpectedVersion, StreamAppend};
use eventyr_store_sqlite::SqliteReadModels;
use eventyr_testkit::NatsServer;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;

use super::stats::{latency_histogram, median, millis, record};
use crate::cli::{BusBenchArgs, BusBenchBackend};
use crate::config::Config;
use crate::stores;

/// The consumer's effect: one row per event.
struct Effects;

#[async_trait]
impl Handler for Effects {
    fn schema(&self) -> Vec<String> {
        vec!["CREATE TABLE effects (event_id TEXT PRIMARY KEY, stream TEXT NOT NULL)".into()]
    }

    async fn handle(&self, message: &Message) -> Result<Vec<SqlStatement>, HandlerError> {
        Ok(vec![
            SqlStatement::new("INSERT INTO effects (event_id, stream) VALUES ($1, $2)")
                .bind(message.event.id.to_string())
                .bind(message.event.stream_id.as_str()),
        ])
    }
}

#[derive(Debug, Default, Clone, Serialize)]
struct Figures {
    ceiling_per_second: f64,
    /// NATS only: pulling and acknowledging, without an inbox.
    consume_ceiling_per_second: f64,
    end_to_end_per_second: f64,
    ratio: f64,
    paced_per_second: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
}

/// What the consumer has done: effects counted, latencies recorded.
#[derive(Default)]
struct Observed {
    effects: AtomicU64,
    latency: Mutex<Option<Histogram<u64>>>,
}

impl Observed {
    fn observer(self: &Arc<Self>) -> EffectObserver {
        let observed = Arc::clone(self);
        Arc::new(move |message: &Message| {
            observed.effects.fetch_add(1, Ordering::Relaxed);
            let mut latency = observed
                .latency
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(histogram) = latency.as_mut() {
                let age = SystemClock.now().unix_micros() - message.event.recorded_at.unix_micros();
                record(histogram, Duration::from_micros(age.max(0).unsigned_abs()));
            }
        })
    }
}

pub async fn run(config: &Config, args: BusBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.events > 0 && args.writers > 0 && args.runs > 0 && args.streams > 0,
        "--events, --writers, --streams and --runs must be at least 1"
    );
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    println!(
        "eventyr bench bus: 1 producer, 2 consumer instances (in flight {} each), {} writers, {} events, {} streams, paced {:?}, {} runs; SQLite store and inboxes, durable",
        args.max_in_flight, args.writers, args.events, args.streams, args.duration, args.runs
    );
    let mut report = serde_json::Map::new();
    for backend in &args.backend {
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            let scratch = tempfile::Builder::new()
                .prefix("bench-bus-")
                .tempdir_in(&config.data_dir)
                .context("cannot create a scratch directory")?;
            let figures = measure(config, &args, *backend, scratch.path()).await?;
            print(&format!("{backend:?} run {run}"), *backend, &figures);
            runs.push(figures);
        }
        let of = |get: fn(&Figures) -> f64| median(&mut runs.iter().map(get).collect::<Vec<_>>());
        let medians = Figures {
            ceiling_per_second: of(|f| f.ceiling_per_second),
            consume_ceiling_per_second: of(|f| f.consume_ceiling_per_second),
            end_to_end_per_second: of(|f| f.end_to_end_per_second),
            ratio: of(|f| f.ratio),
            paced_per_second: of(|f| f.paced_per_second),
            latency_p50_ms: of(|f| f.latency_p50_ms),
            latency_p99_ms: of(|f| f.latency_p99_ms),
        };
        print(&format!("{backend:?} median"), *backend, &medians);
        report.insert(
            format!("{backend:?}").to_lowercase(),
            serde_json::json!({ "runs": runs, "medians": medians }),
        );
    }
    if args.json {
        println!("{}", serde_json::Value::Object(report));
    }
    Ok(())
}

fn print(label: &str, backend: BusBenchBackend, f: &Figures) {
    let (ceiling, consume) = match backend {
        BusBenchBackend::Inproc => ("producer appends", String::new()),
        BusBenchBackend::Nats => (
            "NATS publishes",
            format!(
                " (NATS pull+ack alone {:.0}/s)",
                f.consume_ceiling_per_second
            ),
        ),
    };
    println!(
        "{label}: end to end {:.0} events/s = {:.0}% of {ceiling} {:.0}/s{consume} | at {:.0}/s latency p50 {:.2} ms, p99 {:.2} ms",
        f.end_to_end_per_second,
        100.0 * f.ratio,
        f.ceiling_per_second,
        f.paced_per_second,
        f.latency_p50_ms,
        f.latency_p99_ms
    );
}

/// One producer hooked to a bus, its consumer instances running.
struct Setup {
    store: Arc<dyn EventStore>,
    observed: Arc<Observed>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), eventyr_bus::BusError>>>,
    _server: Option<NatsServer>,
}

async fn measure(
    config: &Config,
    args: &BusBenchArgs,
    backend: BusBenchBackend,
    scratch: &Path,
) -> anyhow::Result<Figures> {
    let mut figures = Figures::default();
    let server = match backend {
        BusBenchBackend::Nats => Some(
            NatsServer::start(&eventyr_testkit::NatsOptions::default()).context(
                "cannot start nats-server (scripts/test installs one; or set EVENTYR_NATS_SERVER)",
            )?,
        ),
        BusBenchBackend::Inproc => None,
    };
    figures.ceiling_per_second = match &server {
        Some(server) => {
            let (publish, consume) = nats_ceiling(&server.url(), args).await?;
            figures.consume_ceiling_per_second = consume;
            publish
        }
        None => {
            let store = stores::open_sqlite(&scratch.join("ceiling.db"), config)?;
            appends(&store, args, args.events, None).await? as f64
        }
    };

    let setup = start(config, args, scratch, server).await?;
    let started = Instant::now();
    appends(&setup.store, args, args.events, None).await?;
    wait_effects(&setup.observed, args.events).await?;
    figures.end_to_end_per_second = args.events as f64 / started.elapsed().as_secs_f64();
    figures.ratio = figures.end_to_end_per_second / figures.ceiling_per_second;

    // Latency at half the throughput.
    *setup
        .observed
        .latency
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(latency_histogram());
    let rate = figures.end_to_end_per_second / 2.0;
    let count = ((rate * args.duration.as_secs_f64()) as u64).max(1);
    let before = setup.observed.effects.load(Ordering::Relaxed);
    let paced_started = Instant::now();
    appends(&setup.store, args, count, Some(rate)).await?;
    wait_effects(&setup.observed, before + count).await?;
    figures.paced_per_second = count as f64 / paced_started.elapsed().as_secs_f64();
    let latency = setup
        .observed
        .latency
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
        .unwrap_or_else(latency_histogram);
    figures.latency_p50_ms = millis(&latency, 0.5);
    figures.latency_p99_ms = millis(&latency, 0.99);
    let _ = setup.stop.send(true);
    for task in setup.tasks {
        task.await??;
    }
    Ok(figures)
}

/// The producer's store, its relay (NATS), and the consumer instances, started.
async fn start(
    config: &Config,
    args: &BusBenchArgs,
    scratch: &Path,
    server: Option<NatsServer>,
) -> anyhow::Result<Setup> {
    let service = ServiceName::new("order")?;
    let store = stores::open_sqlite(&scratch.join("order.db"), config)?;
    let inboxes: Arc<dyn ReadModels> =
        Arc::new(SqliteReadModels::open_durable(scratch.join("inbox"))?);
    let (stop, stopped) = watch::channel(false);
    let shutdown = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let mut tasks = Vec::new();
    let mut transports: Vec<Arc<dyn Transport>> = Vec::new();
    match &server {
        None => {
            let bus = InProcBus::new();
            bus.register(service.clone(), Arc::clone(&store), PublicEvents::All);
            transports.push(Arc::new(bus.clone()));
            transports.push(Arc::new(bus));
        }
        Some(server) => {
            let options = NatsOptions::new(server.url());
            let publisher: Arc<dyn Publisher> = Arc::new(NatsBus::connect(options.clone()).await?);
            let relay_state: Arc<dyn ReadModels> =
                Arc::new(SqliteReadModels::open(scratch.join("relay"))?);
            let relay = Relay::new(
                service.clone(),
                Arc::clone(&store),
                relay_state,
                PublicEvents::All,
                publisher,
            );
            tasks.push(tokio::spawn(relay.run(shutdown())));
            for _ in 0..2 {
                transports.push(Arc::new(NatsBus::connect(options.clone()).await?));
            }
        }
    }
    let observed = Arc::new(Observed::default());
    let options = ConsumerOptions {
        max_in_flight: args.max_in_flight,
        ..ConsumerOptions::default()
    };
    for transport in transports {
        let consumer = Consumer::new(
            ConsumerName::new("bench")?,
            service.clone(),
            transport,
            Arc::clone(&inboxes),
            Arc::new(Effects),
        )
        .options(options.clone())
        .observe(observed.observer());
        tasks.push(tokio::spawn(consumer.run(shutdown())));
    }
    Ok(Setup {
        store,
        observed,
        stop,
        tasks,
        _server: server,
    })
}

/// `writers` writers append `count` events in all, closed loop or paced to `rate` per
/// second in all. Returns the rate achieved.
async fn appends(
    store: &Arc<dyn EventStore>,
    args: &BusBenchArgs,
    count: u64,
    rate: Option<f64>,
) -> anyhow::Result<u64> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let writers: Vec<_> = (0..args.writers)
        .map(|w| {
            let (store, next) = (Arc::clone(store), Arc::clone(&next));
            let streams = args.streams;
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(w as u64 + 7);
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        return anyhow::Ok(());
                    }
                    if let Some(rate) = rate {
                        let due = started + Duration::from_secs_f64(n as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let stream = StreamId::new(format!("order-{}", rng.u64(..streams)))?;
                    let event = NewEvent::json(
                        "OrderPlaced",
                        &serde_json::json!({ "n": n, "items": [{ "sku": "SKU-1", "quantity": 2 }] }),
                    )?;
                    store
                        .append(StreamAppend::new(stream, ExpectedVersion::Any, vec![event]))
                        .await?;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await??;
    }
    Ok((count as f64 / started.elapsed().as_secs_f64()) as u64)
}

async fn wait_effects(observed: &Observed, count: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while observed.effects.load(Ordering::Relaxed) < count {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the consumer stalled at {} of {count} effects",
            observed.effects.load(Ordering::Relaxed)
        );
        // Sampling a counter: there is nothing to wait on.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// NATS's own acknowledged publish rate with 256 publishes in flight, on a scratch
/// stream of the same server, with messages of the bench's size and ids; then its rate
/// of pulling and acknowledging them.
async fn nats_ceiling(url: &str, args: &BusBenchArgs) -> anyhow::Result<(f64, f64)> {
    let bus = NatsBus::connect(NatsOptions::new(url)).await?;
    let jetstream = bus.jetstream();
    jetstream
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "CEILING".into(),
            subjects: vec!["ceiling.>".into()],
            ..Default::default()
        })
        .await
        .context("cannot create the ceiling stream")?;
    let payload = bytes::Bytes::from(vec![b'x'; 420]);
    let started = Instant::now();
    let mut in_flight = std::collections::VecDeque::new();
    for n in 0..args.events {
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .message_id(format!("m-{n}"));
        in_flight.push_back(jetstream.send_publish("ceiling.x", publish).await?);
        if in_flight.len() >= 256
            && let Some(ack) = in_flight.pop_front()
        {
            ack.await?;
        }
    }
    for ack in in_flight {
        ack.await?;
    }
    let publish_rate = args.events as f64 / started.elapsed().as_secs_f64();

    // The same messages pulled and acknowledged one by one (20 in flight, as two
    // instances of 10): the broker's cost of a delivery, without any inbox.
    let stream = jetstream.get_stream("CEILING").await?;
    let consumer = stream
        .get_or_create_consumer(
            "ceiling",
            async_nats::jetstream::consumer::pull::Config {
                durable_name: Some("ceiling".into()),
                ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(20)
        .messages()
        .await?;
    let started = Instant::now();
    let mut consumed = 0;
    while consumed < args.events {
        let message = futures::StreamExt::next(&mut messages)
            .await
            .context("the ceiling consumer ended")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        consumed += 1;
    }
    Ok((
        publish_rate,
        args.events as f64 / started.elapsed().as_secs_f64(),
    ))
}
