//! The HTTP server every Eventyr listener runs on (the gateway's and the services'):
//! HTTP/1.1 with keep-alive and upgrades, or h2c with prior knowledge, by the
//! connection's first bytes — with every connection bounded:
//!
//! - at most `max_connections` open at once; past it a new connection is closed at
//!   once while the established ones go on;
//! - a connection that has not brought a whole request within `header_read_timeout`
//!   of its accept is closed (silent sockets, slowloris); so is one idle (nothing
//!   under way) for `idle_timeout` between requests; HTTP/2 peers are pinged and
//!   dropped when they stop answering;
//! - headers at most `max_header_bytes` (431);
//! - an accept error (out of file descriptors) backs off instead of spinning;
//! - at shutdown every connection is asked to finish (HTTP/1.1 after the request
//!   under way, HTTP/2 with GOAWAY) and whatever is left after the grace is dropped.
//!
//! A listener can also be taken *down* and up again without giving its port away:
//! while down it accepts and closes every connection (the port is never free for
//! another process to take), and the connections it had are asked to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::sync::watch;

use crate::config::humantime_serde_lite;

/// What a listener's clients may take of it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerLimits {
    /// Connections open at once. Default 10 000.
    #[serde(default = "ten_thousand")]
    pub max_connections: usize,
    /// The request line and headers, at most. Default 64 KiB (at least 8 KiB).
    #[serde(default = "sixty_four_kibibytes")]
    pub max_header_bytes: usize,
    /// From accept (or the end of the previous request) to a request's whole
    /// headers. Default 10 s.
    #[serde(default = "ten_seconds", with = "humantime_serde_lite")]
    pub header_read_timeout: Duration,
    /// A keep-alive connection with nothing under way is closed after this. Default
    /// 60 s.
    #[serde(default = "sixty_seconds", with = "humantime_serde_lite")]
    pub idle_timeout: Duration,
    /// HTTP/2: a ping this often; a peer that does not answer one within as long is
    /// dropped. Default 20 s.
    #[serde(default = "twenty_seconds", with = "humantime_serde_lite")]
    pub http2_keep_alive: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: ten_thousand(),
            max_header_bytes: sixty_four_kibibytes(),
            header_read_timeout: ten_seconds(),
            idle_timeout: sixty_seconds(),
            http2_keep_alive: twenty_seconds(),
        }
    }
}

pub(crate) fn ten_thousand() -> usize {
    10_000
}
fn sixty_four_kibibytes() -> usize {
    64 * 1024
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
pub(crate) fn twenty_seconds() -> Duration {
    Duration::from_secs(20)
}
pub(crate) fn sixty_seconds() -> Duration {
    Duration::from_secs(60)
}

impl ServerLimits {
    /// The mistakes of these limits, each with its key under `at`.
    pub fn check(&self, at: &str) -> Vec<String> {
        let mut errors = Vec::new();
        if self.max_connections == 0 {
            errors.push(format!("{at}.max_connections: at least 1"));
        }
        if self.max_header_bytes < 8 * 1024 {
            errors.push(format!("{at}.max_header_bytes: at least 8192"));
        }
        for (key, value) in [
            ("header_read_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
            ("http2_keep_alive", self.http2_keep_alive),
        ] {
            if value < Duration::from_millis(100) {
                errors.push(format!("{at}.{key}: at least 100ms"));
            }
        }
        errors
    }
}

/// What a connection is doing, for its watchdog.
#[derive(Default)]
struct Activity {
    /// Requests whose answer has not been sent whole.
    in_flight: AtomicUsize,
    /// Whether a request has come at all.
    served: AtomicBool,
    /// When the last answer finished, in milliseconds since the connection began.
    last_ms: AtomicU64,
}

/// A request under way on a connection, until dropped.
struct InFlight {
    activity: Arc<Activity>,
    started: tokio::time::Instant,
}

impl InFlight {
    fn new(activity: &Arc<Activity>, started: tokio::time::Instant) -> Self {
        activity.served.store(true, Ordering::Release);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self {
            activity: Arc::clone(activity),
            started,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity.last_ms.store(elapsed, Ordering::Release);
        self.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The body of an answer, its request counted in flight until it ends or is dropped.
pub struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A listener's connections going down and coming up (see the module documentation).
pub type Down = watch::Receiver<bool>;

/// Serves `service` — made per connection from the client's address — on `listener`
/// within `limits` until `shutdown` completes; then lets the connections finish for
/// at most `grace`. `name` labels the listener's metrics. With `down`, the listener
/// refuses connections while it says so.
pub async fn serve<S, B, F>(
    name: &'static str,
    listener: tokio::net::TcpListener,
    limits: ServerLimits,
    service: F,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    down: Option<Down>,
) where
    F: Fn(SocketAddr) -> S,
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    // Rings when the connections should finish: at shutdown, or going down.
    let (finish, finishing) = watch::channel(0u64);
    let mut down = down;
    let mut backoff = ACCEPT_BACKOFF_MIN;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            going_down = next_change(&mut down) => {
                if going_down {
                    finish.send_modify(|n| *n += 1);
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(error) => {
                // Out of file descriptors and the like: wait for some to be freed.
                tracing::warn!(listener = name, %error, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        if down.as_ref().is_some_and(|d| *d.borrow()) {
            rejected(name, "down");
            continue;
        }
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            rejected(name, "max_connections");
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Only what is asked from now on concerns this connection (not a going down
        // that came before it).
        let mut finish_from_now = finishing.clone();
        finish_from_now.mark_unchanged();
        let connection = serve_connection(stream, service(peer), &limits, finish_from_now);
        tokio::spawn(async move {
            let _permit = permit;
            connection.await;
        });
    }
    // No new connections (refused, not left waiting in the backlog); the ones open
    // are asked to finish.
    drop(listener);
    finish.send_modify(|n| *n += 1);
    drop(finishing);
    // Every connection task holds a permit: all back means all done.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(grace, connections.acquire_many(all)).await;
}

/// `router` for each connection, knowing its client (axum's `ConnectInfo`).
pub fn with_client(router: axum::Router) -> impl Fn(SocketAddr) -> axum::Router {
    move |peer| {
        router
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)))
    }
}

/// The next change of `down`: whether it went down. Never, once nobody can change it.
async fn next_change(down: &mut Option<Down>) -> bool {
    let Some(receiver) = down.as_mut() else {
        return std::future::pending().await;
    };
    if receiver.changed().await.is_ok() {
        return *receiver.borrow_and_update();
    }
    // Nobody can take it down any more: it stays as it is.
    if !*receiver.borrow() {
        *down = None;
    }
    std::future::pending().await
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

fn rejected(name: &'static str, reason: &'static str) {
    metrics::counter!(
        eventyr_telemetry::names::HTTP_CONNECTIONS_REJECTED_TOTAL,
        eventyr_telemetry::names::LABEL_LISTENER => name,
        eventyr_telemetry::names::LABEL_REASON => reason
    )
    .increment(1);
}

/// One connection, watched: closed when it brings no request in time, idles too long,
/// or is asked to finish.
fn serve_connection<S, B>(
    stream: tokio::net::TcpStream,
    service: S,
    limits: &ServerLimits,
    mut finishing: watch::Receiver<u64>,
) -> impl Future<Output = ()> + Send + 'static
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = tokio::time::Instant::now();
    let activity = Arc::new(Activity::default());
    let counted = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        // Counted until the answer's body is done (or the call failed).
        let in_flight = InFlight::new(&counted, started);
        let call = tower::ServiceExt::oneshot(service.clone(), request);
        async move {
            let response = call.await?;
            Ok::<_, S::Error>(response.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.http2_keep_alive)
        .keep_alive_timeout(limits.http2_keep_alive)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let (first_request, idle) = (limits.header_read_timeout, limits.idle_timeout);
    async move {
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        tokio::pin!(connection);
        let mut asked = false;
        loop {
            let now = tokio::time::Instant::now();
            let check = if activity.in_flight.load(Ordering::Acquire) > 0 {
                now + idle
            } else if !activity.served.load(Ordering::Acquire) {
                if now >= started + first_request {
                    // Not one whole request since the accept: a silent or slow socket.
                    return;
                }
                started + first_request
            } else {
                let last =
                    started + Duration::from_millis(activity.last_ms.load(Ordering::Acquire));
                if now >= last + idle && !asked {
                    asked = true;
                    connection.as_mut().graceful_shutdown();
                }
                (last + idle).max(now + Duration::from_millis(100))
            };
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "a client connection ended with an error");
                    }
                    return;
                }
                () = tokio::time::sleep_until(check) => {}
                changed = finishing.changed(), if !asked => {
                    if changed.is_ok() {
                        asked = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked_with_their_keys() {
        assert!(ServerLimits::default().check("server").is_empty());
        let limits = ServerLimits {
            max_connections: 0,
            idle_timeout: Duration::ZERO,
            ..ServerLimits::default()
        };
        assert_eq!(
            limits.check("server"),
            [
                "server.max_connections: at least 1",
                "server.idle_timeout: at least 100ms"
            ]
        );
    }
}
