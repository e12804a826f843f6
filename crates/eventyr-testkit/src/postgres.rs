//! A throwaway PostgreSQL cluster: `initdb` into a temporary directory, `postgres`
//! listening on 127.0.0.1 only, trust authentication for the `postgres` user.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::process::{Supervised, free_port, is_root, run};
use crate::{TestkitError, io};

/// The environment variable through which `scripts/test` hands one cluster to every
/// test process of a run.
pub const TEST_URL_ENV: &str = "EVENTYR_TEST_POSTGRES_URL";

const READY_WITHIN: Duration = Duration::from_secs(30);

/// How to run the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Durable commits. Off for tests (faster), on for benchmarks (honest).
    pub fsync: bool,
    pub max_connections: u32,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            fsync: false,
            max_connections: 300,
        }
    }
}

/// A running cluster. Dropping it stops the server and removes its files; so does the
/// end of this process.
#[derive(Debug)]
pub struct PostgresServer {
    port: u16,
    _process: Supervised,
}

impl PostgresServer {
    pub fn start(options: &PostgresOptions) -> Result<Self, TestkitError> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("eventyr-pg-")
            .tempdir()
            .map_err(io("creating the cluster directory"))?
            .keep();
        // PostgreSQL refuses to run as root: run it as the `postgres` user, which must
        // be able to traverse the (0700) temporary directory and own its data.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
            .map_err(io("opening the cluster directory"))?;
        let data = dir.join("data");
        std::fs::create_dir(&data).map_err(io("creating the data directory"))?;
        let as_postgres = if is_root() {
            give_to_postgres(&data)?;
            [
                "setpriv",
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
            ]
            .map(String::from)
            .to_vec()
        } else {
            Vec::new()
        };
        let exe = |name: &str| bin.join(name).display().to_string();
        let data_arg = data.display().to_string();
        let mut initdb = as_postgres.clone();
        initdb.extend([exe("initdb"), "-D".into(), data_arg.clone()]);
        initdb.extend(
            [
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
            .map(String::from),
        );
        run(&initdb)?;

        let port = free_port()?;
        let on_off = |on: bool| if on { "on" } else { "off" };
        let mut postgres = as_postgres;
        postgres.extend([
            exe("postgres"),
            "-D".into(),
            data_arg,
            "-h".into(),
            "127.0.0.1".into(),
        ]);
        postgres.extend(["-p".into(), port.to_string(), "-k".into(), String::new()]);
        for setting in [
            format!("fsync={}", on_off(options.fsync)),
            format!("synchronous_commit={}", on_off(options.fsync)),
            format!("full_page_writes={}", on_off(options.fsync)),
            format!("max_connections={}", options.max_connections),
        ] {
            postgres.extend(["-c".into(), setting]);
        }
        let log = dir.join("postgres.log");
        let mut process = Supervised::start(&postgres, &log, &dir)?;
        let started = Instant::now();
        let ready = [
            exe("pg_isready"),
            "-h".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        while run(&ready).is_err() {
            if process.has_exited() || started.elapsed() > READY_WITHIN {
                return Err(TestkitError::NotReady {
                    what: "postgres",
                    seconds: READY_WITHIN.as_secs(),
                    log: std::fs::read_to_string(&log).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            port,
            _process: process,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database` as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

/// The PostgreSQL URL for tests: the run's shared cluster when `scripts/test` started
/// one, otherwise a cluster started once for this process. Panics with the reason if
/// there is none: a test that needs PostgreSQL must not pass without it.
pub fn test_postgres_url() -> String {
    if let Ok(url) = std::env::var(TEST_URL_ENV) {
        return url;
    }
    static SERVER: OnceLock<Result<PostgresServer, String>> = OnceLock::new();
    let server = SERVER.get_or_init(|| {
        PostgresServer::start(&PostgresOptions::default()).map_err(|e| e.to_string())
    });
    match server {
        Ok(server) => server.url("postgres"),
        Err(error) => panic!("this test needs PostgreSQL, and it could not be started: {error}"),
    }
}

/// The directory with `initdb`, `postgres` and `pg_isready`: `$EVENTYR_PG_BIN`, else
/// the newest `/usr/lib/postgresql/<version>/bin`, else the `PATH`.
fn bin_dir() -> Result<PathBuf, TestkitError> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("EVENTYR_PG_BIN").map(PathBuf::from) {
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(TestkitError::NotInstalled {
                what: "PostgreSQL (EVENTYR_PG_BIN)",
                hint: "point EVENTYR_PG_BIN at the directory holding initdb and postgres",
            })
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_server(bin))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| has_server(dir))
        .ok_or(TestkitError::NotInstalled {
            what: "PostgreSQL",
            hint: "run scripts/test, or apt-get install -y postgresql",
        })
}

/// Makes `dir` owned by the `postgres` user.
fn give_to_postgres(dir: &Path) -> Result<(), TestkitError> {
    let id = |flag: &str| -> Result<u32, TestkitError> {
        let text = run(&["id".into(), flag.into(), "postgres".into()])?;
        text.trim().parse().map_err(|_| TestkitError::NotInstalled {
            what: "the postgres user",
            hint: "apt-get install -y postgresql creates it",
        })
    };
    std::os::unix::fs::chown(dir, Some(id("-u")?), Some(id("-g")?))
        .map_err(io("handing the data directory to postgres"))
}
