//! A throwaway NATS server with JetStream: a temporary store directory, listening on
//! 127.0.0.1 only, every message synced before it is acknowledged
//! (`sync_interval: always`). It can be stopped, killed with SIGKILL and started
//! again on the same port and store, to test what survives.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::{Supervised, free_port, run};
use crate::{TestkitError, io};

/// The environment variable naming the `nats-server` binary (`scripts/test` installs
/// one and sets it); otherwise `nats-server` is looked up on the `PATH`.
pub const NATS_SERVER_ENV: &str = "EVENTYR_NATS_SERVER";

const READY_WITHIN: Duration = Duration::from_secs(30);

/// How to run the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatsOptions {
    /// Sync every message to disk before acknowledging it (`sync_interval: always`).
    /// On by default: the bus's durability relies on it.
    pub sync_always: bool,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self { sync_always: true }
    }
}

/// A running (or stopped, restartable) server. Dropping it stops the server and
/// removes its files.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    runs: u32,
    process: Option<Supervised>,
}

impl NatsServer {
    pub fn start(options: &NatsOptions) -> Result<Self, TestkitError> {
        let binary = binary()?;
        let dir = tempfile::Builder::new()
            .prefix("eventyr-nats-")
            .tempdir()
            .map_err(io("creating the NATS directory"))?;
        let port = free_port()?;
        let store = dir.path().join("store");
        let config = format!(
            "listen: \"127.0.0.1:{port}\"\nserver_name: \"eventyr-test\"\nmax_payload: 2MB\n\
             jetstream {{\n  store_dir: \"{}\"\n{}}}\n",
            store.display(),
            if options.sync_always {
                "  sync_interval: always\n"
            } else {
                ""
            }
        );
        std::fs::write(dir.path().join("nats.conf"), config)
            .map_err(io("writing the NATS configuration"))?;
        let mut server = Self {
            binary,
            dir,
            port,
            runs: 0,
            process: None,
        };
        server.restart()?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("nats.pid")
    }

    fn log(&self, run: u32) -> PathBuf {
        self.dir.path().join(format!("nats-{run}.log"))
    }

    /// Starts the server again (after [`stop`](Self::stop) or [`kill`](Self::kill)) on
    /// the same port and store, and waits until it is ready.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        if self.process.is_some() {
            return Ok(());
        }
        self.runs += 1;
        let log = self.log(self.runs);
        let config = self.dir.path().join("nats.conf");
        let program = [
            self.binary.display().to_string(),
            "-c".into(),
            config.display().to_string(),
        ];
        let _ = std::fs::remove_file(self.pid_file());
        let mut process = Supervised::start_with(&program, &log, None, Some(&self.pid_file()))?;
        process.wait_for_line(&log, "Server is ready", "nats-server", READY_WITHIN)?;
        self.process = Some(process);
        Ok(())
    }

    /// Stops the server cleanly (SIGINT) and waits for it.
    pub fn stop(&mut self) {
        drop(self.process.take());
    }

    /// Kills the server with SIGKILL, as a crash would, and waits for it: whatever it
    /// had not written to disk is lost.
    pub fn kill(&mut self) -> Result<(), TestkitError> {
        if self.process.is_none() {
            return Ok(());
        }
        let pid =
            std::fs::read_to_string(self.pid_file()).map_err(io("reading the nats-server pid"))?;
        run(&["kill".into(), "-KILL".into(), pid.trim().to_owned()])?;
        self.stop();
        Ok(())
    }

    /// Everything the server has logged, all runs.
    pub fn logs(&self) -> String {
        (1..=self.runs)
            .map(|run| std::fs::read_to_string(self.log(run)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `nats-server` binary: `$EVENTYR_NATS_SERVER`, else the `PATH`. Versions before
/// 2.10 are refused: they cannot sync every message.
pub fn binary() -> Result<PathBuf, TestkitError> {
    let not_installed = TestkitError::NotInstalled {
        what: "nats-server >= 2.10",
        hint: "run scripts/test (it installs one), or point EVENTYR_NATS_SERVER at a nats-server binary",
    };
    let binary = match std::env::var_os(NATS_SERVER_ENV) {
        Some(path) => PathBuf::from(path),
        None => std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join("nats-server"))
            .find(|path| path.is_file())
            .ok_or(not_installed)?,
    };
    check_version(&binary)?;
    Ok(binary)
}

fn check_version(binary: &Path) -> Result<(), TestkitError> {
    let text = run(&[binary.display().to_string(), "--version".into()])?;
    // "nats-server: v2.15.1"
    let version = text
        .trim()
        .rsplit('v')
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (2, 10) {
        return Err(TestkitError::Command {
            command: format!("{} --version", binary.display()),
            message: format!(
                "{} is too old: the tests need 2.10 or newer (sync_interval: always); \
                 scripts/test installs one",
                text.trim()
            ),
        });
    }
    Ok(())
}
