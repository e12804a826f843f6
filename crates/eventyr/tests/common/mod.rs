//! Running the `eventyr` binary from tests that also run components in-process.
//! (Each test crate uses some of these.)
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// `eventyr --data-dir <dir> <args>`, with no configuration from the environment.
pub fn eventyr(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_eventyr"));
    command
        .current_dir(dir)
        .env_remove("EVENTYR_DATA_DIR")
        .env_remove("EVENTYR_STORE")
        .env_remove("EVENTYR_DATABASE_URL")
        .env_remove("EVENTYR_CONFIG")
        .env_remove("EVENTYR_LOG")
        .env_remove("EVENTYR_LOG_FORMAT")
        .env_remove("EVENTYR_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
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

/// `eventyr up` as a child process, killed when dropped (a failed test leaves no
/// process behind).
pub struct Running(pub Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `eventyr up --listen 127.0.0.1:0 <extra>`; returns the process, the URL of
/// the services' API behind the gateway (no login), and each participant service's
/// (the gateway's, the public API, under `gateway`).
pub fn up_with(
    dir: &Path,
    extra: &[&str],
    stderr: Stdio,
) -> (Running, String, HashMap<String, String>) {
    let mut args = vec!["up", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut child = Running(
        eventyr(dir, &args)
            // The services' API asks for it: the tests' calls present the same.
            .env(
                "EVENTYR_INTERNAL_CREDENTIAL",
                eventyr_http::testing::CREDENTIAL,
            )
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("eventyr up starts"),
    );
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut base = None;
    let mut services = HashMap::new();
    while services.len() < 6 {
        let line = lines
            .next()
            .expect("eventyr up printed its addresses")
            .expect("a line");
        if let Some(url) = line.strip_prefix("public API on ") {
            services.insert("gateway".to_owned(), url.to_owned());
        }
        if let Some((url, _)) = line
            .strip_prefix("services' API on ")
            .and_then(|rest| rest.split_once(' '))
        {
            base = Some(url.to_owned());
        }
        if let Some((service, url)) = line.trim().split_once(" steps on ") {
            services.insert(service.trim().to_owned(), url.trim().to_owned());
        }
    }
    let base = base.expect("the services' API's address comes first");
    // Keep reading so that the process never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, base, services)
}

/// A client of the services' API behind the gateway: with the internal credential
/// that [`up_with`] gives the system, and no user (another component's rights).
pub fn internal() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        eventyr_http::caller::X_EVENTYR_CREDENTIAL,
        reqwest::header::HeaderValue::from_static(eventyr_http::testing::CREDENTIAL),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("a client")
}

/// Logs in at the gateway; the access token.
pub async fn login(gateway: &str, user: &str) -> String {
    let response = reqwest::Client::new()
        .post(format!("{gateway}/auth/login"))
        .json(&json!({ "username": user, "password": user }))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200, "{user} logs in");
    let pair: Value = response.json().await.expect("json");
    pair["access_token"].as_str().expect("a token").to_owned()
}

/// `GET url` with a bearer token: the JSON answer.
pub async fn get_json(url: &str, token: &str) -> Value {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("a JSON answer")
}
