//! Answers that stay open: WebSocket tunnels (the client's and the upstream's
//! connections joined once both switched) and event streams relayed until the
//! gateway stops or their caller's credential ends. Both are counted against
//! `limits.max_tunnels` by the proxy.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::proxy::{Body, BodyError, strip_hop_by_hop};

/// The protocol of a WebSocket handshake (`Connection: upgrade`, `Upgrade:
/// websocket`); other upgrades (h2c among them) are not passed through.
pub(crate) fn websocket_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = headers.get(header::UPGRADE)?;
    (upgrade && protocol.to_str().ok()?.eq_ignore_ascii_case("websocket")).then(|| protocol.clone())
}

/// Answers a WebSocket handshake the upstream accepted (101) and joins the two
/// connections once both sides have switched: bytes flow both ways until either side
/// closes.
pub(crate) fn tunnel(
    mut upstream: Response<Incoming>,
    client: hyper::upgrade::OnUpgrade,
    protocol: HeaderValue,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut closing: tokio::sync::watch::Receiver<bool>,
) -> Response<Body> {
    let upstream_side = hyper::upgrade::on(&mut upstream);
    tokio::spawn(async move {
        let _permit = permit;
        let (client, upstream) = match futures::future::try_join(client, upstream_side).await {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "a WebSocket upgrade did not complete");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut upstream = hyper_util::rt::TokioIo::new(upstream);
        tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(e) = copied {
                    tracing::debug!(error = %e, "a WebSocket tunnel ended with an error");
                }
            }
            // The gateway stops: its tunnels end with it.
            () = async { drop(closing.wait_for(|c| *c).await) } => {}
        }
    });
    let (mut parts, _) = upstream.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(header::UPGRADE, protocol);
    parts.version = http::Version::HTTP_11;
    Response::from_parts(
        parts,
        Full::new(Bytes::new()).map_err(|e| match e {}).boxed(),
    )
}

/// What ends an event stream the gateway passes on: the gateway stopping, the
/// caller's token expiring, the caller's session ending (looked at every few
/// seconds); its permit counts it among the long-lived streams.
pub(crate) struct StreamEnds {
    pub(crate) permit: tokio::sync::OwnedSemaphorePermit,
    pub(crate) closing: tokio::sync::watch::Receiver<bool>,
    /// Unix seconds.
    pub(crate) expires: Option<u64>,
    pub(crate) session: Option<(Arc<dyn crate::session::SessionStore>, String)>,
}

/// How often a streaming answer's session is looked at.
const STREAM_SESSION_CHECK: Duration = Duration::from_secs(5);

impl StreamEnds {
    /// `body`, relayed until it ends or one of these does.
    pub(crate) fn stream(self, mut body: Incoming) -> Body {
        let (frames, receiver) =
            tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, BodyError>>(16);
        let Self {
            permit,
            mut closing,
            expires,
            session,
        } = self;
        tokio::spawn(async move {
            let _permit = permit;
            let left = expires.map_or(Duration::from_secs(365 * 24 * 3600), |exp| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                Duration::from_secs(exp.saturating_sub(now))
            });
            let expired = tokio::time::sleep(left);
            tokio::pin!(expired);
            let mut check = tokio::time::interval(STREAM_SESSION_CHECK);
            check.tick().await;
            loop {
                tokio::select! {
                    frame = body.frame() => match frame {
                        Some(Ok(frame)) => {
                            if frames.send(Ok(frame)).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(e)) => {
                            let _ = frames.send(Err(e.into())).await;
                            return;
                        }
                        None => return,
                    },
                    () = &mut expired => return,
                    () = async { drop(closing.wait_for(|c| *c).await) } => return,
                    () = frames.closed() => return,
                    _ = check.tick(), if session.is_some() => {
                        if let Some((store, sid)) = &session
                            && !store.is_active(sid).await.unwrap_or(false)
                        {
                            return;
                        }
                    }
                }
            }
        });
        let frames = futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|frame| (frame, receiver))
        });
        http_body_util::StreamBody::new(frames).boxed()
    }
}
