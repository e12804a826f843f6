//! Configuration in layers, validated once: defaults → `eventyr.toml` → `EVENTYR_*`
//! environment → flags. clap merges the last two (a flag wins over its environment
//! variable); this module puts the file underneath and the defaults under that.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use eventyr_core::Limits;
use eventyr_http::{FaultSettings, Validate};
use serde::Deserialize;

use crate::cli::{GlobalArgs, LogFormatArg, SagaModeArg, StoreKind};

/// The file read when `--config` is not given, if it exists.
const DEFAULT_FILE: &str = "eventyr.toml";

/// The settings every command runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub store: StoreConfig,
    /// `saga.mode`: how `eventyr up` runs the sagas of new orders, unless its flag says.
    pub saga_mode: Option<SagaModeArg>,
    /// `[faults.<service>]`: the demonstration knobs `eventyr up` starts with.
    pub faults: BTreeMap<String, FaultSettings>,
    /// `[telemetry]`: logs and traces.
    pub telemetry: eventyr_telemetry::Settings,
    /// `[[users]]`: who may log in to `eventyr up` (name, password_hash, roles,
    /// customer_id); when given, they replace the demo users.
    pub users: Vec<eventyr_gateway::session::UserConfig>,
}

/// The services whose knobs `[faults.<service>]` may set.
pub const FAULT_SERVICES: [&str; 5] =
    ["inventory", "payment", "points", "shipping", "notification"];

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: StoreKind,
    pub database_url: Option<String>,
    pub schema: String,
    /// PostgreSQL schema of the read models' catalog. Default `eventyr_read`.
    pub read_catalog: String,
    /// PostgreSQL schema of the consumer inboxes' catalog. Default `eventyr_inbox`.
    pub inbox_catalog: String,
    pub limits: Limits,
}

/// `eventyr.toml` as written; every field optional, unknown fields refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    data_dir: Option<PathBuf>,
    #[serde(default)]
    store: FileStore,
    #[serde(default)]
    saga: FileSaga,
    #[serde(default)]
    faults: BTreeMap<String, FaultSettings>,
    #[serde(default)]
    telemetry: FileTelemetry,
    #[serde(default)]
    users: Vec<eventyr_gateway::session::UserConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTelemetry {
    log: Option<String>,
    log_format: Option<LogFormatArg>,
    otlp_endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSaga {
    mode: Option<SagaModeArg>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStore {
    backend: Option<StoreKind>,
    database_url: Option<String>,
    schema: Option<String>,
    read_catalog: Option<String>,
    inbox_catalog: Option<String>,
    event_size_max_bytes: Option<usize>,
}

impl Config {
    pub fn load(args: &GlobalArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => read(path)?,
            None if Path::new(DEFAULT_FILE).exists() => read(Path::new(DEFAULT_FILE))?,
            None => File::default(),
        };
        let mut limits = Limits::default();
        if let Some(max) = file.store.event_size_max_bytes {
            if max == 0 {
                bail!("store.event_size_max_bytes must be at least 1");
            }
            limits.event_size_max_bytes = max;
        }
        for (service, settings) in &file.faults {
            if !FAULT_SERVICES.contains(&service.as_str()) {
                bail!(
                    "faults.{service}: no such service (one of {})",
                    FAULT_SERVICES.join(", ")
                );
            }
            if let Some(field) = settings.validate().first() {
                bail!(
                    "faults.{service}{}: {}",
                    field.field.replace('/', "."),
                    field.message
                );
            }
        }
        Ok(Self {
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("eventyr-data")),
            store: StoreConfig {
                backend: args
                    .store
                    .or(file.store.backend)
                    .unwrap_or(StoreKind::Sqlite),
                database_url: args.database_url.clone().or(file.store.database_url),
                schema: args
                    .database_schema
                    .clone()
                    .or(file.store.schema)
                    .unwrap_or_else(|| "eventyr".into()),
                read_catalog: file
                    .store
                    .read_catalog
                    .unwrap_or_else(|| "eventyr_read".into()),
                inbox_catalog: file
                    .store
                    .inbox_catalog
                    .unwrap_or_else(|| "eventyr_inbox".into()),
                limits,
            },
            saga_mode: file.saga.mode,
            faults: file.faults,
            telemetry: telemetry(args, file.telemetry),
            users: file.users,
        })
    }
}

/// Logs and traces from the flags (or their environment variables) over the file's
/// `[telemetry]`.
pub fn telemetry(args: &GlobalArgs, file: FileTelemetry) -> eventyr_telemetry::Settings {
    use eventyr_telemetry::LogFormat;
    let format = match args.log_format.or(file.log_format) {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Text) => LogFormat::Text,
        Some(LogFormatArg::Auto) | None => LogFormat::Auto,
    };
    eventyr_telemetry::Settings {
        log: args.log.clone().or(file.log),
        log_format: format,
        otlp_endpoint: args.otlp_endpoint.clone().or(file.otlp_endpoint),
        service_name: "eventyr".into(),
    }
}

fn read(path: &Path) -> anyhow::Result<File> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}
