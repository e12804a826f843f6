//! The server every listener runs on, against real sockets: the connection cap closes
//! new connections at once while established clients go on; idle keep-alive
//! connections and silent ones are closed after their timeouts; a listener taken
//! down keeps its port and closes every connection until it is up again.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use eventyr_gateway::server::{ServerLimits, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;

/// Serves a tiny router within `limits`; its address and the `down` switch.
async fn server(limits: ServerLimits) -> (String, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let router = Router::new().route("/", get(|| async { "ok" }));
    let (down, is_down) = tokio::sync::watch::channel(false);
    tokio::spawn(serve(
        "test",
        listener,
        limits,
        move |_| router.clone(),
        common::futures_pending(),
        Duration::from_secs(1),
        Some(is_down),
    ));
    (address, down)
}

/// One keep-alive request on `stream`: whether it was answered 200.
async fn ask(stream: &mut TcpStream) -> bool {
    if stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut answer = [0u8; 256];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer)).await,
        Ok(Ok(n)) if n > 0 && answer.starts_with(b"HTTP/1.1 200")
    )
}

/// Whether the server closes `stream` within `within`.
async fn closed(stream: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_new_connections_are_closed_and_established_ones_go_on() {
    let limits = ServerLimits {
        max_connections: 2,
        ..ServerLimits::default()
    };
    let (address, _) = server(limits).await;
    let mut first = TcpStream::connect(&address).await.expect("connect");
    let mut second = TcpStream::connect(&address).await.expect("connect");
    assert!(ask(&mut first).await && ask(&mut second).await);
    let mut third = TcpStream::connect(&address).await.expect("connect");
    assert!(
        closed(&mut third, Duration::from_secs(2)).await,
        "closed at once"
    );
    assert!(
        ask(&mut first).await && ask(&mut second).await,
        "they go on"
    );
    drop(first);
    common::eventually("a place freed", async || {
        let mut next = TcpStream::connect(&address).await.expect("connect");
        ask(&mut next).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_silent_connections_are_closed_after_their_timeouts() {
    let limits = ServerLimits {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(500),
        ..ServerLimits::default()
    };
    let (address, _) = server(limits).await;
    let mut silent = TcpStream::connect(&address).await.expect("connect");
    let mut half = TcpStream::connect(&address).await.expect("connect");
    half.write_all(b"GET / HTTP/1.1\r\nHo")
        .await
        .expect("write");
    let mut idle = TcpStream::connect(&address).await.expect("connect");
    assert!(ask(&mut idle).await);
    assert!(closed(&mut silent, Duration::from_secs(2)).await, "silent");
    assert!(closed(&mut half, Duration::from_secs(2)).await, "slowloris");
    let mut busy = TcpStream::connect(&address).await.expect("connect");
    // A connection that keeps asking stays while the idle one goes.
    let mut idle_closed = false;
    for _ in 0..10 {
        assert!(
            ask(&mut busy).await,
            "a client asking every 150 ms is served"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        if closed(&mut idle, Duration::from_millis(1)).await {
            idle_closed = true;
        }
    }
    assert!(
        idle_closed || closed(&mut idle, Duration::from_secs(1)).await,
        "idle"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_taken_down_keeps_its_port() {
    let (address, down) = server(ServerLimits::default()).await;
    let mut before = TcpStream::connect(&address).await.expect("connect");
    assert!(ask(&mut before).await);
    down.send_replace(true);
    assert!(
        closed(&mut before, Duration::from_secs(2)).await,
        "asked to finish"
    );
    // Nobody else may take the port while it is down.
    assert!(
        std::net::TcpListener::bind(&address).is_err(),
        "the port stays ours"
    );
    let mut refused = TcpStream::connect(&address).await.expect("connect");
    assert!(closed(&mut refused, Duration::from_secs(2)).await);
    down.send_replace(false);
    common::eventually("up again", async || {
        let mut again = TcpStream::connect(&address).await.expect("connect");
        ask(&mut again).await
    })
    .await;
    // And whole again: a connection made after it came back keeps alive (the going
    // down before it is no request to finish it).
    let mut after = TcpStream::connect(&address).await.expect("connect");
    for _ in 0..3 {
        assert!(ask(&mut after).await, "kept alive");
    }
}
