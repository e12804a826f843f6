//! A throwaway Redis server: no persistence, listening on 127.0.0.1 only. It can be
//! stopped and started again on the same port, to test what happens while it is away.

use std::path::PathBuf;
use std::time::Duration;

use crate::process::{Supervised, free_port};
use crate::{TestkitError, io};

const READY_WITHIN: Duration = Duration::from_secs(30);

/// A running (or stopped, restartable) server. Dropping it stops the server and
/// removes its files.
#[derive(Debug)]
pub struct RedisServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    runs: u32,
    process: Option<Supervised>,
}

impl RedisServer {
    pub fn start() -> Result<Self, TestkitError> {
        let binary = std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join("redis-server"))
            .find(|path| path.is_file())
            .ok_or(TestkitError::NotInstalled {
                what: "redis-server",
                hint: "run scripts/test (it installs it), or apt-get install -y redis-server",
            })?;
        let dir = tempfile::Builder::new()
            .prefix("eventyr-redis-")
            .tempdir()
            .map_err(io("creating the Redis directory"))?;
        let mut server = Self {
            binary,
            dir,
            port: free_port()?,
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
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn log(&self, run: u32) -> PathBuf {
        self.dir.path().join(format!("redis-{run}.log"))
    }

    /// Starts the server again (after [`stop`](Self::stop)) on the same port, empty,
    /// and waits until it is ready.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        if self.process.is_some() {
            return Ok(());
        }
        self.runs += 1;
        let log = self.log(self.runs);
        let program = [
            self.binary.display().to_string(),
            "--port".into(),
            self.port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            self.dir.path().display().to_string(),
        ];
        let mut process = Supervised::start_with(&program, &log, None, None)?;
        process.wait_for_line(
            &log,
            "Ready to accept connections",
            "redis-server",
            READY_WITHIN,
        )?;
        self.process = Some(process);
        Ok(())
    }

    /// Stops the server (SIGINT) and waits for it; what it held is gone.
    pub fn stop(&mut self) {
        drop(self.process.take());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
