//! Protocols through the gateway, with real connections on 127.0.0.1: a WebSocket
//! handshake and its frames pass through (byte for byte, both ways) while other
//! upgrades do not; h2c with prior knowledge from clients, and to upstreams that
//! speak only HTTP/2.

use std::convert::Infallible;

use bytes::Bytes;
use eventyr_gateway::config::GatewayConfig;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::{start, upstream};

/// A WebSocket server on raw TCP: answers the handshake with 101 (echoing the
/// request's path in a header), then sends back every chunk it reads, prefixed.
async fn websocket_echo() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let path = head.split_whitespace().nth(1).unwrap_or("?").to_owned();
                let upgrade = head.to_ascii_lowercase().contains("upgrade: websocket");
                let answer = if upgrade {
                    format!(
                        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
                         connection: upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
                         x-path: {path}\r\n\r\n"
                    )
                } else {
                    "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n".to_owned()
                };
                if stream.write_all(answer.as_bytes()).await.is_err() || !upgrade {
                    return;
                }
                let mut buffer = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buffer).await {
                    if n == 0 {
                        return;
                    }
                    let mut echoed = b"echo:".to_vec();
                    echoed.extend_from_slice(&buffer[..n]);
                    if stream.write_all(&echoed).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{address}")
}

/// Reads up to the end of an HTTP head.
/// A WebSocket handshake to the gateway's `/live` route.
const HANDSHAKE: &[u8] =
    b"GET /live/feed HTTP/1.1\r\nhost: shop\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
    sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_handshakes_and_frames_pass_through() {
    let ws = websocket_echo().await;
    let config = GatewayConfig::parse(&format!(
        r#"
        [limits]
        max_tunnels = 1

        [[clusters]]
        name = "ws"
        endpoints = [{{ url = "{ws}" }}]

        [[routes]]
        name = "ws"
        path = {{ prefix = "/live" }}
        rewrite = {{ strip_prefix = "/live" }}
        cluster = "ws"
        timeout = "1s"
        "#
    ))
    .expect("valid config");
    let (gateway, _) = start(&config).await;
    let address = gateway.trim_start_matches("http://").to_owned();

    let mut stream = TcpStream::connect(&address).await.expect("connect");
    stream.write_all(HANDSHAKE).await.expect("handshake");
    let head = read_head(&mut stream).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("x-path: /feed"), "rewritten: {head}");
    assert!(head.contains("sec-websocket-accept:"), "{head}");
    // Frames both ways, long after the route's 1 s timeout would have cut a request.
    for round in 0..3 {
        let frame = format!("frame {round}");
        stream.write_all(frame.as_bytes()).await.expect("send");
        let mut got = vec![0u8; 5 + frame.len()];
        stream.read_exact(&mut got).await.expect("echo");
        assert_eq!(String::from_utf8_lossy(&got), format!("echo:{frame}"));
        if round == 1 {
            tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
        }
    }

    // The tunnels open at once are bounded: a second handshake while this one is
    // open is refused.
    let mut second = TcpStream::connect(&address).await.expect("connect");
    second.write_all(HANDSHAKE).await.expect("handshake");
    let head = read_head(&mut second).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");

    // Any other upgrade is an ordinary request to the upstream (which refuses it).
    let mut other = TcpStream::connect(&address).await.expect("connect");
    other
        .write_all(
            b"GET /live/feed HTTP/1.1\r\nhost: shop\r\nconnection: Upgrade\r\nupgrade: h2c\r\n\r\n",
        )
        .await
        .expect("send");
    let head = read_head(&mut other).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}

/// An upstream that speaks only HTTP/2 (h2c): answers with the version it saw.
async fn h2_only() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|request: hyper::Request<_>| async move {
                let body = format!("{:?} {}", request.version(), request.uri().path());
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_from_clients_and_to_upstreams() {
    let (h2, h1) = (h2_only().await, upstream("h1").await);
    let config = GatewayConfig::parse(&format!(
        r#"
        [[clusters]]
        name = "h2"
        protocol = "http2"
        endpoints = [{{ url = "{h2}" }}]
        health = {{ path = "/health", interval = "1s", timeout = "500ms" }}

        [[clusters]]
        name = "h1"
        endpoints = [{{ url = "{h1}" }}]

        [[routes]]
        name = "h2"
        path = {{ prefix = "/h2" }}
        cluster = "h2"

        [[routes]]
        name = "h1"
        path = {{ prefix = "/h1" }}
        cluster = "h1"
        "#
    ))
    .expect("valid config");
    let (gateway, _) = start(&config).await;

    // An HTTP/1.1 client, an HTTP/2 upstream.
    let text = reqwest::get(format!("{gateway}/h2/x"))
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert_eq!(text, "HTTP/2.0 /h2/x");

    // An h2c client (prior knowledge): many requests over one connection, to both.
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    for _ in 0..3 {
        let response = client
            .get(format!("{gateway}/h1/y").parse().expect("uri"))
            .await
            .expect("h2c to the gateway");
        assert_eq!(response.version(), http::Version::HTTP_2);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let seen: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            (seen["upstream"].as_str(), seen["path"].as_str()),
            (Some("h1"), Some("/h1/y"))
        );
        assert!(seen["x-request-id"].is_string(), "{seen}");
        let response = client
            .get(format!("{gateway}/h2/z").parse().expect("uri"))
            .await
            .expect("h2c to the gateway");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body, "HTTP/2.0 /h2/z");
    }
}

/// An upstream that closes every connection after one answer (`Connection: close`),
/// or without a word while it is idle: kept connections that went away are never
/// used, and no request fails for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_upstream_closed_are_not_reused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let mut served = 0u32;
        while let Ok((mut stream, _)) = listener.accept().await {
            served += 1;
            let closing = served.is_multiple_of(2);
            tokio::spawn(async move {
                let _ = read_head(&mut stream).await;
                let answer = if closing {
                    "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                } else {
                    "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                };
                let _ = stream.write_all(answer.as_bytes()).await;
                // Either way the connection ends here: announced, or silently.
            });
        }
    });
    let config = GatewayConfig::parse(&format!(
        "[[clusters]]\nname = \"c\"\nendpoints = [{{ url = \"http://{address}\" }}]\n\
         [[routes]]\nname = \"r\"\npath = {{ prefix = \"/\" }}\ncluster = \"c\"\n"
    ))
    .expect("valid config");
    let (gateway, _) = start(&config).await;
    let client = reqwest::Client::new();
    for i in 0..20 {
        let response = client
            .post(format!("{gateway}/x"))
            .body("not idempotent")
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200, "request {i}");
        assert_eq!(response.text().await.expect("body"), "ok");
    }
}
