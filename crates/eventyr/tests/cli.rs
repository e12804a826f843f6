//! The `eventyr` command as a user runs it: help, append/read/tail on SQLite and
//! PostgreSQL, typed errors with stable codes and no panics, the configuration layers,
//! and the store benchmark's command line.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

fn eventyr(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_eventyr"));
    command
        .current_dir(dir)
        .env_remove("EVENTYR_DATA_DIR")
        .env_remove("EVENTYR_STORE");
    command
        .env_remove("EVENTYR_DATABASE_URL")
        .env_remove("EVENTYR_CONFIG");
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("run eventyr")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs and expects success; returns the JSON lines printed.
fn ok(command: &mut Command) -> Vec<Value> {
    let output = run(command);
    assert!(output.status.success(), "failed: {}", stderr(&output));
    stdout(&output)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Runs and expects a clean failure (exit code 1, no panic) naming `code`.
fn fails_with(command: &mut Command, code: &str) -> String {
    let output = run(command);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "exit code for {code}: {err}");
    assert!(
        err.contains(&format!("error[{code}]")),
        "{err:?} should name {code}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn append(dir: &Path, stream: &str, event_type: &str, data: &str) -> Command {
    let mut command = eventyr(dir);
    command.args([
        "events", "append", "--stream", stream, "--type", event_type, "--data", data,
    ]);
    command
}

#[test]
fn every_command_has_help() {
    let dir = tempfile::tempdir().expect("temp dir");
    for args in [
        vec!["--help"],
        vec!["events", "--help"],
        vec!["events", "append", "--help"],
        vec!["events", "read", "--help"],
        vec!["events", "tail", "--help"],
        vec!["bench", "--help"],
        vec!["bench", "store", "--help"],
    ] {
        let output = run(eventyr(dir.path()).args(&args));
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        assert!(stdout(&output).contains("Usage: eventyr"), "{args:?}");
    }
    let output = run(eventyr(dir.path()).args(["events", "read"]));
    assert_eq!(output.status.code(), Some(2), "a usage error exits with 2");
}

#[test]
fn append_and_read_on_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let first = ok(append(d, "order-1", "OrderPlaced", r#"{"total":12}"#)
        .args(["--expected-version", "no-stream"]));
    assert_eq!(first[0]["first_position"], 1);
    let id = "01932c6e-8a4b-7cc3-9d1e-6f7a8b9c0d1e";
    let paid =
        ok(append(d, "order-1", "OrderPaid", "true").args(["--expected-version", "0", "--id", id]));
    assert_eq!(paid[0]["last_version"], 1);
    let again = ok(append(d, "order-1", "OrderPaid", "true").args(["--id", id]));
    assert_eq!(
        again, paid,
        "the same id and content is an idempotent no-op"
    );
    assert!(
        d.join("eventyr-data/eventyr.db").exists(),
        "the default data directory"
    );

    let all = ok(eventyr(d).args(["events", "read", "--all"]));
    assert_eq!(all.len(), 2);
    assert_eq!(all[0]["type"], "OrderPlaced");
    assert_eq!(all[0]["data"]["total"], 12);
    let backwards = ok(eventyr(d).args([
        "events",
        "read",
        "--stream",
        "order-1",
        "--backwards",
        "--limit",
        "1",
    ]));
    assert_eq!(backwards.len(), 1);
    assert_eq!(backwards[0]["version"], 1);
    let cloud = ok(eventyr(d).args([
        "events",
        "read",
        "--all",
        "--format",
        "cloudevents",
        "--source",
        "order",
    ]));
    assert_eq!(cloud[1]["type"], "eventyr.order.OrderPaid.v1");
    assert_eq!(cloud[1]["id"], id);
    let filtered = ok(eventyr(d).args(["events", "read", "--all", "--type-prefix", "OrderPa"]));
    assert_eq!(filtered.len(), 1);
}

#[test]
fn bad_input_is_a_typed_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    ok(&mut append(d, "s", "T", "1"));
    fails_with(
        append(d, "s", "T", "1").args(["--expected-version", "no-stream"]),
        "wrong_expected_version",
    );
    fails_with(&mut append(d, "", "T", "1"), "invalid_input");
    fails_with(&mut append(d, "$all", "T", "1"), "invalid_input");
    fails_with(&mut append(d, "s", "bad\ttype", "1"), "invalid_input");
    fails_with(&mut append(d, "s", "T", "{not json"), "invalid_input");
    fails_with(
        append(d, "s", "T", "1").args(["--id", "nope"]),
        "invalid_input",
    );
    fails_with(
        append(d, "s", "T", "1").args(["--schema-version", "0"]),
        "invalid_input",
    );
    // Through standard input: an argument this large exceeds the OS limit.
    let mut big = append(d, "s", "T", "-");
    let mut child = big
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let data = format!("\"{}\"", "x".repeat(1024 * 1024));
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), data.as_bytes())
        .expect("write data");
    let output = child.wait_with_output().expect("wait");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("error[payload_too_large]"),
        "{}",
        stderr(&output)
    );
    let output = run(append(d, "s", "T", "1").arg("--expected-version=-3"));
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("not any, no-stream, exists or a version number"));
}

#[test]
fn tail_follows_live_events_until_interrupted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    ok(&mut append(d, "s", "Before", "0"));
    let mut tail = eventyr(d)
        .args(["events", "tail", "--from", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start tail");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let out = tail.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let _ = lines_tx.send(line.expect("line"));
        }
    });
    let next = || -> Value {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("tail printed an event");
        serde_json::from_str(&line).expect("json")
    };
    assert_eq!(next()["type"], "Before");
    ok(&mut append(d, "s", "Live", "1"));
    assert_eq!(next()["type"], "Live");
    let pid = tail.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let status = tail.wait().expect("tail exits");
    assert!(status.success(), "Ctrl-C stops tail cleanly: {status:?}");
}

#[test]
fn configuration_layers_flag_over_env_over_file_over_default() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    std::fs::write(
        d.join("eventyr.toml"),
        "data_dir = \"from-file\"\n[store]\nbackend = \"sqlite\"\n",
    )
    .expect("config");
    ok(&mut append(d, "s", "T", "1"));
    assert!(d.join("from-file/eventyr.db").exists());
    ok(append(d, "s", "T", "1").env("EVENTYR_DATA_DIR", "from-env"));
    assert!(d.join("from-env/eventyr.db").exists());
    ok(append(d, "s", "T", "1")
        .env("EVENTYR_DATA_DIR", "from-env")
        .args(["--data-dir", "from-flag"]));
    assert!(d.join("from-flag/eventyr.db").exists());

    std::fs::write(d.join("eventyr.toml"), "[store]\nbakend = \"sqlite\"\n").expect("config");
    let output = run(&mut append(d, "s", "T", "1"));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("bakend"),
        "the unknown key is named: {}",
        stderr(&output)
    );
    std::fs::remove_file(d.join("eventyr.toml")).expect("remove config");
    let output = run(append(d, "s", "T", "1").args(["--store", "postgres"]));
    assert!(
        stderr(&output).contains("needs a database URL"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn append_and_read_on_postgres() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let url = eventyr_testkit::test_postgres_url();
    let schema = format!("cli_{}", std::process::id());
    let pg = |command: &mut Command| {
        command.args([
            "--store",
            "postgres",
            "--database-url",
            &url,
            "--database-schema",
            &schema,
        ]);
    };
    let mut first = append(d, "order-1", "OrderPlaced", r#"{"n":1}"#);
    pg(&mut first);
    ok(&mut first);
    let mut conflict = append(d, "order-1", "OrderPlaced", "2");
    pg(conflict.args(["--expected-version", "no-stream"]));
    fails_with(&mut conflict, "wrong_expected_version");
    let mut read = eventyr(d);
    pg(read.args(["events", "read", "--stream", "order-1"]));
    let events = ok(&mut read);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["data"]["n"], 1);
}

#[test]
fn projections_are_listed_and_rebuilt() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let status = ok(eventyr(d).args(["projection", "status", "--json"]));
    assert_eq!(status[0][0]["name"], "event_types");
    assert_eq!(status[0][0]["generation"], Value::Null, "not built yet");
    for (stream, event_type) in [("a-1", "Opened"), ("a-1", "Closed"), ("b-1", "Opened")] {
        ok(&mut append(d, stream, event_type, "{}"));
    }
    let output = run(eventyr(d).args(["projection", "rebuild", "event_types"]));
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("rebuilt event_types: generation 2, 3 events"),
        "{}",
        stdout(&output)
    );
    let status = ok(eventyr(d).args(["projection", "status", "--json"]));
    let row = &status[0][0];
    assert_eq!(
        (
            row["generation"].as_u64(),
            row["checkpoint"].as_u64(),
            row["lag_events"].as_u64()
        ),
        (Some(2), Some(3), Some(0))
    );
    let table = run(eventyr(d).args(["projection", "status"]));
    assert!(stdout(&table).contains("event_types"), "{}", stdout(&table));
    let unknown = run(eventyr(d).args(["projection", "rebuild", "nope"]));
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("no projection is named \"nope\""),
        "{}",
        stderr(&unknown)
    );
}

#[test]
fn projections_rebuild_on_postgres() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let url = eventyr_testkit::test_postgres_url();
    let unique = std::process::id() % 100_000;
    let pg = |command: &mut Command| {
        command.args(["--store", "postgres", "--database-url", &url]);
        command.args(["--database-schema", &format!("cli_proj_{unique}")]);
        command.env("EVENTYR_CONFIG", d.join("eventyr.toml"));
    };
    std::fs::write(
        d.join("eventyr.toml"),
        format!("[store]\nread_catalog = \"cr{unique}\"\n"),
    )
    .expect("config");
    let mut first = append(d, "a-1", "Opened", "{}");
    pg(&mut first);
    ok(&mut first);
    let mut rebuild = eventyr(d);
    rebuild.args(["projection", "rebuild", "event_types"]);
    pg(&mut rebuild);
    let output = run(&mut rebuild);
    assert!(output.status.success(), "{}", stderr(&output));
    let mut status = eventyr(d);
    status.args(["projection", "status", "--json"]);
    pg(&mut status);
    let rows = ok(&mut status);
    assert_eq!(
        (
            rows[0][0]["checkpoint"].as_u64(),
            rows[0][0]["lag_events"].as_u64()
        ),
        (Some(1), Some(0))
    );
}

#[test]
fn store_benchmark_command_runs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = run(eventyr(dir.path()).args([
        "bench",
        "store",
        "--backend",
        "memory,sqlite",
        "--duration",
        "100ms",
        "--runs",
        "1",
        "--writers",
        "2",
        "--streams",
        "10",
        "--stream-reads",
        "20",
        "--json",
    ]));
    let out = stdout(&output);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        out.contains("fsync:") && out.contains("median of 1 runs"),
        "{out}"
    );
    let report: Value =
        serde_json::from_str(out.lines().last().expect("json line")).expect("json report");
    assert_eq!(report["medians"].as_array().map(Vec::len), Some(2));
    assert!(
        report["medians"][1]["all_events"].as_u64() > Some(0),
        "the sqlite run wrote and read events"
    );
}

/// `eventyr gateway`: serves its configuration on its own (a route to a dead upstream
/// answers 502, an unknown path 404, both as the JSON error body), with its admin API;
/// a changed file is reloaded, an invalid one refused (the old configuration stays);
/// an invalid configuration at start is refused with the key at fault.
#[test]
fn the_gateway_runs_on_its_own_reloads_and_refuses_a_bad_configuration() {
    let dir = tempfile::tempdir().expect("dir");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = dead.local_addr().expect("address").port();
    drop(dead);
    let config = dir.path().join("gateway.toml");
    let routes = |extra: &str| {
        format!(
            "admin_listen = \"127.0.0.1:0\"\n\
             [[clusters]]\nname = \"shop\"\nendpoints = [{{ url = \"http://127.0.0.1:{port}\" }}]\n\n\
             [[routes]]\nname = \"api\"\npath = {{ prefix = \"/api\" }}\ncluster = \"shop\"\n{extra}"
        )
    };
    std::fs::write(&config, routes("")).expect("write");
    let mut gateway = eventyr(dir.path())
        .args(["gateway", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut lines = BufReader::new(gateway.stdout.take().expect("stdout")).lines();
    let mut address = |prefix: &str| {
        let line = lines.next().expect("a line").expect("text");
        line.strip_prefix(prefix)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("{prefix}: {line}"))
            .to_owned()
    };
    let url = address("eventyr gateway on ");
    let admin = address("admin API on ");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let call = |method: reqwest::Method, url: String| -> (u16, Value) {
        runtime.block_on(async {
            let response = reqwest::Client::new()
                .request(method, url)
                .send()
                .await
                .expect("send");
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        })
    };
    let get = |path: &str| call(reqwest::Method::GET, format!("{url}{path}"));
    let (status, body) = get("/api/orders");
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("bad_gateway")),
        "{body}"
    );
    let (status, body) = get("/elsewhere");
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("no_route")),
        "{body}"
    );
    let (status, body) = call(reqwest::Method::GET, format!("{admin}/admin/routes"));
    assert_eq!((status, body), (200, serde_json::json!(["api"])));

    // A new route in the file is served without a restart.
    std::fs::write(
        &config,
        routes(
            "[[routes]]\nname = \"extra\"\npath = { prefix = \"/extra\" }\ncluster = \"shop\"\n",
        ),
    )
    .expect("write");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while get("/extra").0 != 502 {
        assert!(std::time::Instant::now() < deadline, "never reloaded");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A broken file is refused: the routes in force stay.
    std::fs::write(
        &config,
        routes("[[routes]]\nname = \"bad\"\npath = { prefix = \"/bad\" }\ncluster = \"nope\"\n"),
    )
    .expect("write");
    let (status, body) = call(reqwest::Method::POST, format!("{admin}/admin/reload"));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("routes[1].cluster")),
        "{body}"
    );
    // Once the file watcher has refused it too (its metric says so), the old
    // configuration is still the one in force.
    let refusals = || {
        let text = runtime.block_on(async {
            reqwest::get(format!("{admin}/metrics"))
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text")
        });
        text.lines()
            .find(|l| l.starts_with("eventyr_gateway_config_reloads_total{outcome=\"refused\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    while refusals() < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the watcher never saw the file"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get("/extra").0, 502, "the old configuration stays");
    let metrics = runtime.block_on(async {
        reqwest::get(format!("{admin}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    });
    for name in [
        "http_server_request_duration_seconds_bucket{method=\"GET\",route=\"extra\",status=\"502\"",
        "http_client_request_duration_seconds_bucket{cluster=\"shop\",status=\"error\"",
        "eventyr_gateway_config_reloads_total{outcome=\"applied\"} 1",
    ] {
        assert!(metrics.contains(name), "{name} in:\n{metrics}");
    }
    // SIGTERM: readiness answers 503 while it drains, then it exits cleanly.
    let sent = Command::new("kill")
        .args(["-TERM", &gateway.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let ready = format!("{admin}/health/ready");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while call(reqwest::Method::GET, ready.clone()).0 != 503 {
        assert!(std::time::Instant::now() < deadline, "never draining");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = gateway.wait().expect("reaped");
    assert!(status.success(), "{status:?}");

    std::fs::write(
        &config,
        "[[routes]]\nname = \"api\"\npath = { prefix = \"/api\" }\ncluster = \"nope\"\n",
    )
    .expect("write");
    let refused = run(eventyr(dir.path()).args(["gateway"]));
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("routes[0].cluster: no cluster nope"),
        "{}",
        stderr(&refused)
    );
}
