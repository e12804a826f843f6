//! `eventyr bench store`: the eventstore-benchmarks "concurrent_writers" workload.
//!
//! Per run and backend, on a fresh store: `writers` closed-loop tasks append `batch`
//! events of `event_size` bytes to random streams out of `streams` for `duration`
//! (durable: an append returns once committed and fsynced), then one reader reads
//! `$all` from the start, then `readers` tasks make `stream_reads` single-stream reads.
//! The disk's fsync rate is measured first in the same run: it bounds closed-loop
//! writers that each wait for their own flush.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use eventyr_core::{EventType, Json, NewEvent, Position, StreamId, StreamVersion};
use eventyr_store::{
    EventStore, ExpectedVersion, MemoryStore, READ_LIMIT_MAX, ReadAll, ReadStream, StreamAppend,
};
use eventyr_store_postgres::{PostgresOptions, PostgresStore};
use eventyr_testkit::{PostgresOptions as ServerOptions, PostgresServer};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::fsync::{self, FsyncRate};
use super::stats::{latency_histogram, median, millis, record};
use crate::cli::{BenchBackend, StoreBenchArgs};
use crate::config::Config;
use crate::stores;

/// One backend's figures from one run.
#[derive(Debug, Clone, Serialize)]
struct Measurement {
    backend: BenchBackend,
    run: usize,
    events_per_second: f64,
    appends_per_second: f64,
    append_p50_ms: f64,
    append_p99_ms: f64,
    append_p999_ms: f64,
    all_events: u64,
    all_events_per_second: f64,
    stream_reads_per_second: f64,
    stream_read_p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    machine_cores: usize,
    fsync: FsyncRate,
    writers: usize,
    streams: u64,
    event_size: usize,
    batch: usize,
    duration_ms: u128,
    runs: &'a [Measurement],
    medians: &'a [Measurement],
}

/// Where the PostgreSQL runs go: the configured database, or a throwaway durable
/// cluster started for this benchmark.
struct PostgresTarget {
    url: String,
    _server: Option<PostgresServer>,
}

pub async fn run(config: &Config, args: StoreBenchArgs) -> anyhow::Result<()> {
    check(&args, config)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix("bench-")
        .tempdir_in(&config.data_dir)
        .context("cannot create a scratch directory for the benchmark")?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "eventyr bench store: {} writers, {} streams, {}-byte events, batch {}, {:?} per run, {} runs, {cores} cores",
        args.writers, args.streams, args.event_size, args.batch, args.duration, args.runs
    );
    let probe_dir = scratch.path().to_owned();
    let fsync =
        tokio::task::spawn_blocking(move || fsync::measure(&probe_dir, Duration::from_secs(1)))
            .await?
            .context("cannot measure the fsync rate")?;
    println!(
        "fsync: {:.0} fdatasync/s ({:.0} µs each) in {}; closed-loop ceiling for {} writers: {:.0} appends/s",
        fsync.per_second,
        fsync.mean_micros,
        scratch.path().display(),
        args.writers,
        fsync.per_second * args.writers as f64
    );
    let postgres = match args.backend.contains(&BenchBackend::Postgres) {
        true => Some(postgres_target(config).await?),
        false => None,
    };
    println!("{}", header());
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        for &backend in &args.backend {
            let measurement = measure_backend(
                backend,
                run,
                &args,
                config,
                scratch.path(),
                postgres.as_ref(),
            )
            .await?;
            println!("{}", row(&measurement, &run.to_string()));
            runs.push(measurement);
        }
    }
    let medians: Vec<Measurement> = args.backend.iter().map(|b| medians(*b, &runs)).collect();
    println!("median of {} runs:", args.runs);
    for measurement in &medians {
        println!("{}", row(measurement, "med"));
    }
    print_ratios(&medians, &fsync, &args);
    if args.json {
        let report = Report {
            machine_cores: cores,
            fsync,
            writers: args.writers,
            streams: args.streams,
            event_size: args.event_size,
            batch: args.batch,
            duration_ms: args.duration.as_millis(),
            runs: &runs,
            medians: &medians,
        };
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn check(args: &StoreBenchArgs, config: &Config) -> anyhow::Result<()> {
    let max = config.store.limits.event_size_max_bytes;
    if !(8..=max).contains(&args.event_size) {
        bail!("--event-size must be between 8 and {max} bytes");
    }
    if args.writers == 0
        || args.streams == 0
        || args.batch == 0
        || args.runs == 0
        || args.readers == 0
    {
        bail!("--writers, --streams, --batch, --runs and --readers must be at least 1");
    }
    if args.batch > config.store.limits.append_events_max {
        bail!(
            "--batch must be at most {}",
            config.store.limits.append_events_max
        );
    }
    Ok(())
}

async fn postgres_target(config: &Config) -> anyhow::Result<PostgresTarget> {
    if let Some(url) = &config.store.database_url {
        println!("postgres: {url}");
        return Ok(PostgresTarget {
            url: url.clone(),
            _server: None,
        });
    }
    let options = ServerOptions {
        fsync: true,
        max_connections: 300,
    };
    let server = tokio::task::spawn_blocking(move || PostgresServer::start(&options))
        .await?
        .context(
            "cannot start a throwaway PostgreSQL cluster (pass --database-url to use your own)",
        )?;
    println!(
        "postgres: throwaway cluster on 127.0.0.1:{} (fsync, synchronous_commit and full_page_writes on)",
        server.port()
    );
    Ok(PostgresTarget {
        url: server.url("postgres"),
        _server: Some(server),
    })
}

async fn measure_backend(
    backend: BenchBackend,
    run: usize,
    args: &StoreBenchArgs,
    config: &Config,
    scratch: &Path,
    postgres: Option<&PostgresTarget>,
) -> anyhow::Result<Measurement> {
    match backend {
        BenchBackend::Memory => measure(Arc::new(MemoryStore::default()), backend, run, args).await,
        BenchBackend::Sqlite => {
            let path: PathBuf = scratch.join(format!("sqlite-{run}.db"));
            let store = stores::open_sqlite(&path, config)?;
            measure(store, backend, run, args).await
        }
        BenchBackend::Postgres => {
            let target = postgres.context("no postgres target")?;
            let mut options = PostgresOptions::new(&target.url);
            options.schema = format!("bench_{}_{run}", std::process::id());
            let schema = options.schema.clone();
            let store = PostgresStore::connect(options).await?;
            let measurement = measure(Arc::new(store), backend, run, args).await;
            eventyr_store_postgres::drop_schema(&target.url, &schema).await?;
            measurement
        }
    }
}

async fn measure(
    store: Arc<dyn EventStore>,
    backend: BenchBackend,
    run: usize,
    args: &StoreBenchArgs,
) -> anyhow::Result<Measurement> {
    let (events, appends, appended) = write_phase(&store, run, args).await?;
    let started = Instant::now();
    let mut all_events = 0u64;
    let mut read = ReadAll::from(Position::ZERO).limit(READ_LIMIT_MAX);
    loop {
        let slice = store.read_all(&read).await?;
        all_events += slice.events.len() as u64;
        read.from = slice.next;
        if slice.is_end() {
            break;
        }
    }
    let all_elapsed = started.elapsed().as_secs_f64();
    let (reads_per_second, read_latency) = stream_read_phase(&store, args).await?;
    Ok(Measurement {
        backend,
        run,
        events_per_second: events as f64 / appended.as_secs_f64(),
        appends_per_second: appends.len() as f64 / appended.as_secs_f64(),
        append_p50_ms: millis(&appends, 0.5),
        append_p99_ms: millis(&appends, 0.99),
        append_p999_ms: millis(&appends, 0.999),
        all_events,
        all_events_per_second: all_events as f64 / all_elapsed,
        stream_reads_per_second: reads_per_second,
        stream_read_p99_ms: millis(&read_latency, 0.99),
    })
}

/// Closed-loop writers until the deadline. Returns the events written, the append
/// latencies, and how long the phase took.
async fn write_phase(
    store: &Arc<dyn EventStore>,
    run: usize,
    args: &StoreBenchArgs,
) -> anyhow::Result<(u64, Histogram<u64>, Duration)> {
    let started = Instant::now();
    let deadline = started + args.duration;
    let writers: Vec<_> = (0..args.writers)
        .map(|w| {
            let store = Arc::clone(store);
            let (streams, batch, size) = (args.streams, args.batch, args.event_size);
            let seed = (run as u64) << 32 | w as u64;
            tokio::spawn(async move { writer(store, seed, streams, batch, size, deadline).await })
        })
        .collect();
    let mut events = 0;
    let mut latencies = latency_histogram();
    for writer in writers {
        let (written, histogram) = writer.await??;
        events += written;
        latencies
            .add(&histogram)
            .context("merging latency histograms")?;
    }
    Ok((events, latencies, started.elapsed()))
}

async fn writer(
    store: Arc<dyn EventStore>,
    seed: u64,
    streams: u64,
    batch: usize,
    event_size: usize,
    deadline: Instant,
) -> anyhow::Result<(u64, Histogram<u64>)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let padding: String = (0..event_size - 8).map(|_| rng.alphanumeric()).collect();
    let data = Json::from_slice(format!("{{\"p\":\"{padding}\"}}"))?;
    let event_type = EventType::new("BenchEvent")?;
    let mut latencies = latency_histogram();
    let mut written = 0u64;
    while Instant::now() < deadline {
        let stream = StreamId::new(format!("bench-{}", rng.u64(..streams)))?;
        let events = (0..batch)
            .map(|_| NewEvent::new(event_type.clone(), data.clone()))
            .collect();
        let started = Instant::now();
        store
            .append(StreamAppend::new(stream, ExpectedVersion::Any, events))
            .await?;
        record(&mut latencies, started.elapsed());
        written += batch as u64;
    }
    Ok((written, latencies))
}

async fn stream_read_phase(
    store: &Arc<dyn EventStore>,
    args: &StoreBenchArgs,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    let started = Instant::now();
    let per_reader = args.stream_reads.div_ceil(args.readers);
    let readers: Vec<_> = (0..args.readers)
        .map(|r| {
            let store = Arc::clone(store);
            let streams = args.streams;
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(r as u64);
                let mut latencies = latency_histogram();
                for _ in 0..per_reader {
                    let stream = StreamId::new(format!("bench-{}", rng.u64(..streams)))?;
                    let begun = Instant::now();
                    store
                        .read_stream(&stream, ReadStream::forwards(StreamVersion(0)))
                        .await?;
                    record(&mut latencies, begun.elapsed());
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = latency_histogram();
    for reader in readers {
        latencies
            .add(&reader.await??)
            .context("merging latency histograms")?;
    }
    let reads = (per_reader * args.readers) as f64;
    Ok((reads / started.elapsed().as_secs_f64(), latencies))
}

fn medians(backend: BenchBackend, runs: &[Measurement]) -> Measurement {
    let of = |get: fn(&Measurement) -> f64| {
        let mut values: Vec<f64> = runs
            .iter()
            .filter(|m| m.backend == backend)
            .map(get)
            .collect();
        median(&mut values)
    };
    Measurement {
        backend,
        run: 0,
        events_per_second: of(|m| m.events_per_second),
        appends_per_second: of(|m| m.appends_per_second),
        append_p50_ms: of(|m| m.append_p50_ms),
        append_p99_ms: of(|m| m.append_p99_ms),
        append_p999_ms: of(|m| m.append_p999_ms),
        all_events: of(|m| m.all_events as f64) as u64,
        all_events_per_second: of(|m| m.all_events_per_second),
        stream_reads_per_second: of(|m| m.stream_reads_per_second),
        stream_read_p99_ms: of(|m| m.stream_read_p99_ms),
    }
}

fn header() -> String {
    format!(
        "{:<9} {:>4} {:>11} {:>10} {:>8} {:>8} {:>8} {:>13} {:>13} {:>9}",
        "backend",
        "run",
        "events/s",
        "appends/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "$all ev/s",
        "stream rd/s",
        "rd p99"
    )
}

fn row(m: &Measurement, run: &str) -> String {
    let backend = format!("{:?}", m.backend).to_lowercase();
    format!(
        "{backend:<9} {run:>4} {:>11.0} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>13.0} {:>13.0} {:>9.2}",
        m.events_per_second,
        m.appends_per_second,
        m.append_p50_ms,
        m.append_p99_ms,
        m.append_p999_ms,
        m.all_events_per_second,
        m.stream_reads_per_second,
        m.stream_read_p99_ms
    )
}

fn print_ratios(medians: &[Measurement], fsync: &FsyncRate, args: &StoreBenchArgs) {
    let find = |b| medians.iter().find(|m| m.backend == b);
    let ceiling = fsync.per_second * args.writers as f64;
    for m in medians.iter().filter(|m| m.backend != BenchBackend::Memory) {
        println!(
            "{:?}: {:.0}% of the closed-loop fsync ceiling ({:.0} appends/s)",
            m.backend,
            100.0 * m.appends_per_second / ceiling,
            ceiling
        );
    }
    if let (Some(sqlite), Some(postgres)) =
        (find(BenchBackend::Sqlite), find(BenchBackend::Postgres))
    {
        println!(
            "sqlite / postgres: appends {:.2}x, $all reads {:.2}x, stream reads {:.2}x",
            sqlite.events_per_second / postgres.events_per_second,
            sqlite.all_events_per_second / postgres.all_events_per_second,
            sqlite.stream_reads_per_second / postgres.stream_reads_per_second
        );
    }
}
