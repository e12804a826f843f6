//! Running the `eventyr` binary from tests that also run components in-process.
//! (Each test crate uses some of these.)
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// `eventyr --data-dir <dir> <args>`, with no configuration from the environment.
pub fn eventyr(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_eventyr"));
    command
        .current_dir(dir)
        .env_remove("EVENTYR_DATA_DIR")
        .env_remove("EVENTYR_STORE")
        .env_remove("EVENTYR_DATABASE_URL")
        .env_remove("EVENTYR_CONFIG")
        .arg("--data-dir")
        .arg(dir)
        .args(args);
    command
}

/// Runs it off the async runtime, so that in-process components keep running.
pub async fn run(dir: &Path, args: &[&str]) -> Output {
    let mut command = eventyr(dir, args);
    tokio::task::spawn_blocking(move || command.output().expect("run eventyr"))
        .await
        .expect("join")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits up to 30 s for `check` to hold.
pub async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
