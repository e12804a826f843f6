//! `eventyr bench gateway`: wrk through the gateway to a fixed upstream (nginx
//! answering `200 ok` from memory, a process of its own), against the same upstream
//! direct and behind nginx and HAProxy as reverse proxies (keep-alive to the
//! upstream), each proxy with the same `--threads`; then the gateway again with a JWT
//! checked and a rate limit counted on every request; and, as the floor of any proxy
//! on hyper, hyper's server and client with nothing between them. In the same run,
//! interleaved, median of `--runs`. Needs `nginx`, `wrk` and (for that peer)
//! `haproxy` on the PATH: `apt-get install -y nginx-light wrk haproxy`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use eventyr_gateway::config::GatewayConfig;
use eventyr_gateway::proxy::{Proxy, serve};
use serde::Serialize;

use super::stats::median;
use crate::cli::GatewayBenchArgs;
use crate::config::Config;

#[derive(Debug, Clone, Default, Serialize)]
struct Figures {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// A free port on 127.0.0.1 (for the peers, which bind it themselves).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn require(program: &str) -> anyhow::Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        bail!("{program} is not installed: apt-get install -y nginx-light wrk haproxy");
    }
    Ok(())
}

/// Kills a peer when the bench ends, however it ends.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx as the upstream (`return 200 "ok"` from memory, one worker) or as a reverse
/// proxy to it (`workers` workers, keep-alive to the upstream).
fn start_nginx(dir: &Path, name: &str, server: &str, workers: usize) -> anyhow::Result<Peer> {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes {workers};\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  {server}\n}}\n",
            dir = dir.display()
        ),
    )?;
    let child = Command::new("nginx")
        .args([
            "-c",
            &conf.display().to_string(),
            "-p",
            &dir.display().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start nginx")?;
    Ok(Peer(child))
}

fn start_haproxy(dir: &Path, upstream: u16, port: u16, threads: usize) -> anyhow::Result<Peer> {
    let conf = dir.join("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "global\n  nbthread {threads}\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n\
             frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n\
             backend b\n  server u 127.0.0.1:{upstream}\n"
        ),
    )?;
    let child = Command::new("haproxy")
        .args(["-f", &conf.display().to_string(), "-db"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start haproxy")?;
    Ok(Peer(child))
}

async fn wait_for(port: u16) -> anyhow::Result<()> {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on port {port}")
}

/// A wrk latency figure (`412.00us`, `1.75ms`, `1.02s`) in milliseconds.
fn wrk_millis(text: &str) -> Option<f64> {
    // Divided rather than multiplied by 0.001: 412 µs is exactly the f64 of 0.412 ms.
    let (number, per_ms) = if let Some(n) = text.strip_suffix("us") {
        (n, 1000.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 0.001)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n / per_ms)
}

async fn wrk(url: &str, header: Option<&str>, args: &GatewayBenchArgs) -> anyhow::Result<Figures> {
    let mut command = tokio::process::Command::new("wrk");
    if let Some(header) = header {
        command.args(["-H", header]);
    }
    let output = command
        .args([
            "-t1",
            &format!("-c{}", args.connections),
            &format!("-d{}s", args.duration.as_secs().max(1)),
            "--latency",
            url,
        ])
        .output()
        .await
        .context("cannot run wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut figures = Figures::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", n] => figures.requests_per_second = n.parse().unwrap_or(0.0),
            ["50%", v] => figures.p50_ms = wrk_millis(v).unwrap_or(0.0),
            ["99%", v] => figures.p99_ms = wrk_millis(v).unwrap_or(0.0),
            _ => {}
        }
    }
    anyhow::ensure!(
        figures.requests_per_second > 0.0,
        "wrk measured nothing at {url}: {text}"
    );
    Ok(figures)
}

pub async fn run(config: &Config, args: GatewayBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.runs > 0 && args.connections > 0,
        "--runs and --connections must be at least 1"
    );
    for program in ["nginx", "wrk", "haproxy"] {
        require(program)?;
    }
    let dir = config.data_dir.join("bench-gateway");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // nginx reads its paths from its prefix: absolute ones only.
    let dir = std::fs::canonicalize(&dir)?;
    let threads = args.threads.max(1);
    let (upstream, nginx_port, haproxy_port) = (free_port()?, free_port()?, free_port()?);
    let _upstream = start_nginx(
        &dir,
        "upstream",
        &format!(
            "server {{ listen 127.0.0.1:{upstream}; location / {{ return 200 \"ok\\n\"; }} }}"
        ),
        1,
    )?;
    let _nginx = start_nginx(
        &dir,
        "proxy",
        &format!(
            "upstream up {{ server 127.0.0.1:{upstream}; keepalive 128; }}\n  \
             server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://up; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        ),
        threads,
    )?;
    let _haproxy = start_haproxy(&dir, upstream, haproxy_port, threads)?;
    for port in [upstream, nginx_port, haproxy_port] {
        wait_for(port).await?;
    }
    let cluster = format!(
        "[[clusters]]\nname = \"up\"\nendpoints = [{{ url = \"http://127.0.0.1:{upstream}\" }}]\n\
         [[routes]]\nname = \"all\"\npath = {{ prefix = \"/\" }}\ncluster = \"up\"\n"
    );
    // The same route behind a JWT and a rate limit (per caller, high enough never to
    // refuse: every request is checked and counted, none is turned away).
    let guarded = format!(
        "{cluster}permissions = [\"bench:read\"]\n\
         [auth]\nroles = {{ bench = [\"bench:read\"] }}\n\
         keys = [{{ algorithm = \"HS256\", secret = \"{BENCH_SECRET}\" }}]\n\
         [[rate_limits]]\nname = \"per-caller\"\nalgorithm = \"gcra\"\nlimit = 1000000\n\
         period = \"1s\"\nkey = \"consumer\"\n"
    );
    // As in production: a metrics recorder takes every measurement.
    let _metrics = eventyr_telemetry::install_prometheus().ok();
    let plain = Gateway::start(&GatewayConfig::parse(&cluster)?, threads).await?;
    let secured = Gateway::start(&GatewayConfig::parse(&guarded)?, threads).await?;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "sub": "bench", "roles": ["bench"], "exp": u64::MAX / 2 }),
        &jsonwebtoken::EncodingKey::from_secret(BENCH_SECRET.as_bytes()),
    )?;
    let bearer = format!("Authorization: Bearer {token}");
    println!(
        "eventyr bench gateway: wrk -t1 -c{} for {:?}, {} runs; upstream: nginx `return 200` \
         (1 worker) on 127.0.0.1:{upstream}; each proxy {threads} thread(s)",
        args.connections, args.duration, args.runs
    );
    let targets = [
        ("direct", upstream, None),
        ("nginx", nginx_port, None),
        ("haproxy", haproxy_port, None),
        ("eventyr", plain.port, None),
        ("eventyr+jwt+rl", secured.port, Some(bearer.as_str())),
        ("hyper-minimal", minimal_hyper_proxy(upstream)?, None),
    ];
    let mut results: Vec<Vec<Figures>> = vec![Vec::new(); targets.len()];
    for run in 1..=args.runs {
        for (i, (name, port, header)) in targets.iter().enumerate() {
            let figures = wrk(&format!("http://127.0.0.1:{port}/"), *header, &args).await?;
            println!(
                "  run {run} {name:<15} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
                figures.requests_per_second, figures.p50_ms, figures.p99_ms
            );
            results[i].push(figures);
        }
    }
    plain.stop();
    secured.stop();
    let medians: Vec<Figures> = results
        .iter()
        .map(|runs| Figures {
            requests_per_second: median(
                &mut runs
                    .iter()
                    .map(|f| f.requests_per_second)
                    .collect::<Vec<_>>(),
            ),
            p50_ms: median(&mut runs.iter().map(|f| f.p50_ms).collect::<Vec<_>>()),
            p99_ms: median(&mut runs.iter().map(|f| f.p99_ms).collect::<Vec<_>>()),
        })
        .collect();
    let nginx = medians[1].requests_per_second;
    println!("median of {} runs:", args.runs);
    println!("TARGET            REQ/S   P50 MS   P99 MS  VS NGINX");
    for ((name, _, _), figures) in targets.iter().zip(&medians) {
        println!(
            "{name:<15} {:>9.0}  {:>7.2}  {:>7.2}  {:>7.2}x",
            figures.requests_per_second,
            figures.p50_ms,
            figures.p99_ms,
            figures.requests_per_second / nginx
        );
    }
    if args.json {
        let json: serde_json::Value = targets
            .iter()
            .zip(&medians)
            .map(|((name, _, _), f)| {
                (
                    (*name).to_owned(),
                    serde_json::to_value(f).unwrap_or_default(),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
        println!("{json}");
    }
    Ok(())
}

const BENCH_SECRET: &str = "the benchmark's secret, at least 32 bytes";

/// A gateway on its own runtime and threads (one: a current-thread runtime, like one
/// nginx worker; more: a multi-thread runtime with that many workers), so that each
/// proxy measured gets the same cores.
struct Gateway {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    async fn start(config: &GatewayConfig, threads: usize) -> anyhow::Result<Self> {
        let proxy = Arc::new(Proxy::new(config).map_err(anyhow::Error::msg)?);
        let listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let runtime = if threads == 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()?
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                serve(
                    listener,
                    proxy,
                    async move {
                        let _ = stopped.await;
                    },
                    Duration::from_secs(1),
                )
                .await;
            });
        });
        wait_for(port).await?;
        Ok(Self {
            port,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The floor of a proxy built on hyper: hyper's server and pooled client with nothing
/// between them (no route, no headers added, no metrics), on one current-thread
/// runtime. What separates the gateway from it is the gateway's own work.
fn minimal_hyper_proxy(upstream: u16) -> anyhow::Result<u16> {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Runs until the bench process ends.
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
            connector.set_nodelay(true);
            let client: Client<_, hyper::body::Incoming> =
                Client::builder(TokioExecutor::new()).build(connector);
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let client = client.clone();
                let service = hyper::service::service_fn(
                    move |mut request: hyper::Request<hyper::body::Incoming>| {
                        let client = client.clone();
                        async move {
                            let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
                            match format!("http://127.0.0.1:{upstream}{path}").parse() {
                                Ok(uri) => *request.uri_mut() = uri,
                                Err(_) => return Err(anyhow::anyhow!("a bad path")),
                            }
                            client.request(request).await.map_err(anyhow::Error::from)
                        }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
    });
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_latencies_read_in_milliseconds() {
        assert_eq!(wrk_millis("412.00us"), Some(0.412));
        assert_eq!(wrk_millis("1.75ms"), Some(1.75));
        assert_eq!(wrk_millis("1.02s"), Some(1020.0));
        assert_eq!(wrk_millis("fast"), None);
    }
}
