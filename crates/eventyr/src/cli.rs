//! The command line, declared with clap. Every subcommand's `--help` says what it does
//! and what its options mean.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use eventyr_store::ExpectedVersion;

/// Eventyr: an event-driven microservices platform. Event store, CQRS, messaging,
/// sagas, gateway, observability — in one binary.
#[derive(Debug, Parser)]
#[command(name = "eventyr", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command understands. Each can also come from `eventyr.toml` or an
/// `EVENTYR_*` environment variable; a flag wins over the environment, which wins over
/// the file, which wins over the default.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Configuration file. Default: ./eventyr.toml when it exists (for `gateway`: the
    /// gateway's own, default ./gateway.toml).
    #[arg(long, global = true, env = "EVENTYR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where embedded data lives. Default: ./eventyr-data.
    #[arg(long, global = true, env = "EVENTYR_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Event store backend. Default: sqlite.
    #[arg(long, global = true, env = "EVENTYR_STORE", value_enum)]
    pub store: Option<StoreKind>,
    /// PostgreSQL URL, for --store postgres.
    #[arg(long, global = true, env = "EVENTYR_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// PostgreSQL schema of the store. Default: eventyr.
    #[arg(
        long,
        global = true,
        env = "EVENTYR_DATABASE_SCHEMA",
        value_name = "NAME"
    )]
    pub database_schema: Option<String>,
    /// Log level per module, as RUST_LOG directives (e.g. `info,eventyr_saga=debug`;
    /// `eventyr_gateway::access=info` adds a line per request). Default:
    /// `info,eventyr_gateway::access=off`.
    #[arg(long, global = true, env = "EVENTYR_LOG", value_name = "DIRECTIVES")]
    pub log: Option<String>,
    /// Log lines as JSON or text. Default: JSON unless standard error is a terminal.
    #[arg(long, global = true, env = "EVENTYR_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormatArg>,
    /// Export traces over OTLP/HTTP (protobuf) to this base URL (its /v1/traces), e.g.
    /// http://127.0.0.1:4318. Default: off (OTEL_EXPORTER_OTLP_ENDPOINT is honoured).
    #[arg(long, global = true, env = "EVENTYR_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatArg {
    /// JSON unless standard error is a terminal.
    Auto,
    /// One JSON object a line.
    Json,
    /// Readable text.
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// One SQLite file under the data directory (embedded, the default).
    Sqlite,
    /// A PostgreSQL database (distributed mode).
    Postgres,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum GatewayCommand {
    /// Print the argon2id hash of a password, for a user's `password_hash` in
    /// `[sessions]` (the password is read from standard input, one line).
    HashPassword,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the reference system: six services, the saga engine and the public API, in
    /// this process, with storage under the data directory.
    Up(UpArgs),
    /// Run the API gateway alone, in front of any HTTP services: routes and clusters
    /// from `--config` (default ./gateway.toml; see the eventyr-gateway crate).
    Gateway {
        /// Where to listen, instead of the file's `listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        #[command(subcommand)]
        command: Option<GatewayCommand>,
    },
    /// Drive orders through the public API of a running `eventyr up`, wait for every
    /// saga, reconcile, and print outcomes, latency and throughput.
    Demo(DemoArgs),
    /// Check the reference system's cross-service invariants (inventory conservation,
    /// one net charge and one shipment per completed order, nothing left of failed
    /// ones, balanced points); exits 1 on a mismatch.
    Reconcile {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write, read and follow events in the event store.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Inspect and rebuild projections (the read models fed by events).
    Projection {
        #[command(subcommand)]
        command: ProjectionCommand,
    },
    /// Dead letters: messages consumers gave up on. List them; replay them after a fix.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Sagas: list them, show one's timeline, retry a FAILED one, abort a running one.
    Saga {
        #[command(subcommand)]
        command: SagaCommand,
    },
    /// Measure the system (figures for BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Append one event to a stream; prints where it landed as JSON.
    Append(AppendArgs),
    /// Print events of a stream or of $all, one JSON document per line.
    Read(ReadArgs),
    /// Follow new events as they are committed, one JSON document per line, until Ctrl-C.
    Tail(TailArgs),
}

#[derive(Debug, Subcommand)]
pub enum ProjectionCommand {
    /// Each projection's read model: generation, checkpoint, and how far behind the
    /// store's head it is.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a projection's read model from the first event into a new generation,
    /// then swap it in. The current read model keeps answering queries meanwhile.
    Rebuild {
        /// The projection's name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Orders to place.
    #[arg(long, default_value_t = 100)]
    pub orders: usize,
    /// Orders in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// realistic: one order in ten fails (out of stock, declined, no points);
    /// failures: one in two.
    #[arg(long, value_enum, default_value = "realistic")]
    pub mix: DemoMix,
    /// The public API of the running system.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// How long one order may take to settle.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub wait: Duration,
    /// Skip the reconciliation (the system runs elsewhere).
    #[arg(long)]
    pub no_reconcile: bool,
    /// The seed of the order mix (random by default; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Who logs in at the gateway (`POST /auth/login`) to drive the orders.
    #[arg(long, default_value = "admin")]
    pub user: String,
    /// Their password.
    #[arg(long, default_value = "admin", env = "EVENTYR_DEMO_PASSWORD")]
    pub password: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DemoMix {
    Realistic,
    Failures,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the public API listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// How often the reconciliation checks the cross-service invariants, e.g. 5m.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub reconcile_every: Duration,
    /// How the sagas of new orders run (default: `saga.mode` in eventyr.toml, else
    /// orchestrated). Orders under way finish the way they began.
    #[arg(long, env = "EVENTYR_SAGA_MODE", value_enum)]
    pub saga_mode: Option<SagaModeArg>,
    /// The internal credential the services' listeners ask for (at least 32 visible
    /// characters); default: a random one for each start.
    #[arg(long, env = "EVENTYR_INTERNAL_CREDENTIAL", hide_env_values = true)]
    pub internal_credential: Option<String>,
    /// Start without the demo users (alice, bob, admin): nobody can log in.
    #[arg(long)]
    pub no_demo: bool,
    /// Let the demo users (whose passwords are their names) log in even though
    /// `--listen` is not a loopback address.
    #[arg(long)]
    pub demo_on_network: bool,
    /// After a SIGTERM or SIGINT, how long readiness answers 503 before the listeners
    /// stop taking connections (for load balancers to notice), e.g. 1s.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub drain_delay: Duration,
    /// How long the requests, consumers, sagas and projections under way may take
    /// to finish after that; past it the process exits with an error.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// A host name the dashboard and the admin API answer for, besides localhost and
    /// the listen address (repeatable; others get 421: no DNS rebinding).
    #[arg(long = "allowed-host")]
    pub allowed_hosts: Vec<String>,
}

/// `orchestrated` (the saga engine calls each service) or `choreographed` (each
/// service reacts to the events of the one before).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaModeArg {
    Orchestrated,
    Choreographed,
}

#[derive(Debug, Subcommand)]
pub enum SagaCommand {
    /// Sagas, newest first: id, type, status, age, and why it failed.
    List {
        /// Only sagas in this status (STARTED, IN_PROGRESS, COMPLETED, COMPENSATING,
        /// COMPENSATED, FAILED).
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One saga's timeline: each step with its attempts, times, durations and errors.
    Show {
        id: String,
        /// Print the saga's state and log as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the failed compensations of a FAILED saga again (after a fix). The running
    /// engine carries it out.
    Retry {
        id: String,
        /// How long to wait for the engine's answer.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// The deterministic simulation: the saga machine against simulated participants,
    /// network faults and engine crashes, one seed per run; checks the invariants and
    /// prints the first seed that breaks one (rerun it with --from SEED --seeds 1).
    Simulate {
        /// How many seeds.
        #[arg(long, default_value_t = 10_000)]
        seeds: u64,
        /// The first seed.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Sagas per seed.
        #[arg(long, default_value_t = 20)]
        sagas: usize,
    },
    /// Compensate a running saga now. The running engine carries it out.
    Abort {
        id: String,
        /// Recorded in the saga's log.
        #[arg(long, default_value = "aborted by an operator")]
        reason: String,
        /// How long to wait for the engine's answer.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        wait: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest failure first: consumer, id, attempts, error.
    List {
        /// Only this consumer's dead letters.
        #[arg(long)]
        consumer: Option<String>,
        /// The consumers of this service of `eventyr up` (order, inventory, payment,
        /// points, shipping, notification) instead of the configured inboxes.
        #[arg(long)]
        service: Option<String>,
        /// Also list the ones already replayed.
        #[arg(long)]
        all: bool,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Queue dead letters for replay: the running consumer handles each again (within
    /// a second), outside its stream's order. Its effect still happens once.
    #[command(group = clap::ArgGroup::new("which").required(true).args(["id", "all"]))]
    Replay {
        /// The dead letter's id, as `dlq list` shows it.
        id: Option<String>,
        /// Every dead letter (of --consumer, or of every consumer).
        #[arg(long)]
        all: bool,
        /// The consumer the dead letters belong to. Default: whichever holds the id.
        #[arg(long)]
        consumer: Option<String>,
        /// The consumers of this service of `eventyr up` instead of the configured
        /// inboxes.
        #[arg(long)]
        service: Option<String>,
        /// Wait up to this long for the consumer to replay them and report the
        /// outcome, e.g. 30s.
        #[arg(long, value_parser = parse_duration)]
        wait: Option<Duration>,
    },
}

#[derive(Debug, Args)]
pub struct AppendArgs {
    /// The stream to append to, e.g. order-42.
    #[arg(long)]
    pub stream: String,
    /// The event type, e.g. OrderPlaced.
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: String,
    /// The event data as JSON, or - to read it from standard input.
    #[arg(long)]
    pub data: String,
    /// Append only if the stream is in this state: any, no-stream, exists, or a version.
    #[arg(long, default_value = "any")]
    pub expected_version: ExpectedVersion,
    /// The event id (a UUID). Appending the same id and content again is a no-op that
    /// returns the first result. Default: a new UUIDv7.
    #[arg(long)]
    pub id: Option<String>,
    /// The version of the data's schema.
    #[arg(long, default_value_t = 1)]
    pub schema_version: u32,
    #[arg(long)]
    pub correlation_id: Option<String>,
    #[arg(long)]
    pub causation_id: Option<String>,
    #[arg(long)]
    pub user_id: Option<String>,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("what").required(true).args(["stream", "all"]))]
pub struct ReadArgs {
    /// Read this stream.
    #[arg(long)]
    pub stream: Option<String>,
    /// Read every stream, in global order ($all).
    #[arg(long)]
    pub all: bool,
    /// Start at this stream version (--stream) or global position (--all). Default: the
    /// first event, or the last one with --backwards.
    #[arg(long)]
    pub from: Option<u64>,
    /// Print at most this many events.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Read a stream from its end towards its start.
    #[arg(long, requires = "stream")]
    pub backwards: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub format: FormatArgs,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Follow only this stream.
    #[arg(long)]
    pub stream: Option<String>,
    /// Start at this global position (or stream version with --stream) instead of at
    /// the end.
    #[arg(long)]
    pub from: Option<u64>,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub format: FormatArgs,
}

#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only events whose type starts with this ($all only).
    #[arg(long, conflicts_with = "stream")]
    pub type_prefix: Option<String>,
    /// Only events of streams whose id starts with this ($all only).
    #[arg(long, conflicts_with = "stream")]
    pub stream_prefix: Option<String>,
}

#[derive(Debug, Args)]
pub struct FormatArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Envelope)]
    pub format: Format,
    /// The CloudEvents source (the producing service) for --format cloudevents.
    #[arg(long, default_value = "eventyr")]
    pub source: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Eventyr's envelope: id, stream, version, position, type, data, metadata, time.
    Envelope,
    /// CloudEvents 1.0 JSON (structured mode).
    Cloudevents,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Event store appends and reads: the eventstore-benchmarks "concurrent_writers"
    /// workload, on each backend in the same run, with the disk's fsync rate.
    Store(StoreBenchArgs),
    /// Commands (load, decide, append) and projections on the SQLite backend: command
    /// throughput against raw appends, with and without snapshots over long histories,
    /// projection throughput, and projection lag while commands run.
    Cqrs(CqrsBenchArgs),
    /// Messaging end to end: from an append in a producer's store to the effect
    /// committed in a consumer's inbox, with 2 competing consumer instances; against
    /// NATS's own publish rate (nats) or the producer's append rate (inproc).
    Bus(BusBenchArgs),
    /// Sagas: a 5-step saga against in-process participants on the SQLite backend,
    /// sagas/s and saga latency at a fixed concurrency, against raw appends at the
    /// same concurrency on the same disk.
    Saga(SagaBenchArgs),
    /// The gateway: wrk through it to a fixed upstream, against the upstream direct and
    /// nginx and HAProxy as reverse proxies, in the same run (needs nginx, wrk, haproxy).
    Gateway(GatewayBenchArgs),
}

#[derive(Debug, Args)]
pub struct GatewayBenchArgs {
    /// wrk's connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// How long each measurement runs, e.g. 8s.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Repeat everything this many times and report the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Threads (workers) of each proxy measured: nginx, HAProxy and the gateway.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Print the results as JSON too.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SagaBenchArgs {
    /// Sagas in flight at once (closed-loop clients, each starting a saga and waiting
    /// for it to finish).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long each measured phase runs, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Repeat everything this many times and report the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Print the results as JSON too.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BusBenchArgs {
    /// Bus backends to measure, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "inproc,nats")]
    pub backend: Vec<BusBenchBackend>,
    /// Events appended in the throughput phase (and published in NATS's ceiling).
    #[arg(long, default_value_t = 20_000)]
    pub events: u64,
    /// Concurrent closed-loop writers appending to the producer's store.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Streams the writers pick from at random.
    #[arg(long, default_value_t = 1000)]
    pub streams: u64,
    /// Messages each consumer instance holds unacknowledged, at most.
    #[arg(long, default_value_t = 10)]
    pub max_in_flight: usize,
    /// How long the paced latency phase runs, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Repeat everything this many times and report the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Print the results as JSON too.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BusBenchBackend {
    /// The in-process bus (embedded mode).
    Inproc,
    /// NATS JetStream (distributed mode), a throwaway server with per-message sync.
    Nats,
}

#[derive(Debug, Args)]
pub struct CqrsBenchArgs {
    /// Aggregates the clients pick from at random.
    #[arg(long, default_value_t = 1000)]
    pub aggregates: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Events of history per aggregate for the snapshot comparison.
    #[arg(long, default_value_t = 1000)]
    pub history: u64,
    /// Snapshot every this many events in the snapshot run.
    #[arg(long, default_value_t = 100)]
    pub snapshot_every: u64,
    /// How long each measured phase runs, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Repeat everything this many times and report the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Print the results as JSON too.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StoreBenchArgs {
    /// Backends to measure, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sqlite,postgres"
    )]
    pub backend: Vec<BenchBackend>,
    /// Concurrent closed-loop writers.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Streams the writers pick from at random.
    #[arg(long, default_value_t = 10_000)]
    pub streams: u64,
    /// Size of each event's data, in bytes.
    #[arg(long, default_value_t = 256)]
    pub event_size: usize,
    /// Events per append.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// How long the write phase runs, e.g. 5s or 500ms.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Repeat everything this many times and report the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Single-stream reads in the read phase.
    #[arg(long, default_value_t = 10_000)]
    pub stream_reads: usize,
    /// Concurrent readers in the read phase.
    #[arg(long, default_value_t = 4)]
    pub readers: usize,
    /// Print the results as JSON too.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchBackend {
    Sqlite,
    Postgres,
    Memory,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
