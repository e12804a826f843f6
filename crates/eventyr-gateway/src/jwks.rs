//! Keeps the configuration's JWKS fresh: each set is fetched (or its file read) at
//! once, then every `refresh`, and again as soon as a token names a key id that no key
//! has (at most once a second: an identity provider's rotated key is taken up without
//! a restart, and a flood of made-up key ids cannot become a flood of fetches). A
//! failed fetch keeps the keys in force.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::Instant;

use crate::auth::{JwksKeys, read_jwks};
use crate::proxy::Proxy;

/// A fetch takes at most this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Fetches forced by unknown key ids, at most one per this.
const MIN_GAP: Duration = Duration::from_secs(1);
/// A key set is at most this big.
const MAX_BYTES: usize = 1024 * 1024;

/// Refreshes the key sets of `proxy`'s configuration until `shutdown`.
pub async fn run(proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let refresh = async {
        let Some(auth) = proxy.authenticator().filter(|a| !a.jwks().is_empty()) else {
            return std::future::pending().await;
        };
        let mut due = vec![Instant::now(); auth.jwks().len()];
        let mut last_forced: Option<Instant> = None;
        loop {
            let now = Instant::now();
            for (source, at) in auth.jwks().iter().zip(due.iter_mut()) {
                if *at <= now {
                    fetch(&proxy, source).await;
                    *at = Instant::now() + source.config.refresh;
                }
            }
            let next = due.iter().min().copied().unwrap_or(now);
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = auth.unknown_kid() => {
                    if let Some(last) = last_forced {
                        tokio::time::sleep_until(last + MIN_GAP).await;
                    }
                    last_forced = Some(Instant::now());
                    due.iter_mut().for_each(|at| *at = Instant::now());
                }
            }
        }
    };
    tokio::select! {
        () = &mut shutdown => {}
        () = refresh => {}
    }
}

async fn fetch(proxy: &Proxy, source: &JwksKeys) {
    let fetched = match (&source.config.file, &source.config.url) {
        (Some(file), _) => read_jwks(file),
        (None, Some(url)) => get(proxy, url).await,
        (None, None) => return,
    };
    let place = source
        .config
        .url
        .clone()
        .or_else(|| source.config.file.as_ref().map(|f| f.display().to_string()))
        .unwrap_or_default();
    match fetched {
        Ok(set) => {
            let kids = source.install(&set);
            tracing::info!(source = %place, ?kids, "JWKS fetched");
        }
        Err(error) => {
            tracing::warn!(source = %place, %error, "cannot fetch the JWKS; its keys in force stay");
        }
    }
}

async fn get(proxy: &Proxy, url: &str) -> Result<jsonwebtoken::jwk::JwkSet, String> {
    let request = Request::get(url)
        .header("user-agent", "eventyr-gateway-jwks")
        .header("accept", "application/json")
        .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(FETCH_TIMEOUT, proxy.client().request(request))
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("answered {}", response.status()));
    }
    let body = tokio::time::timeout(
        FETCH_TIMEOUT,
        Limited::new(response.into_body(), MAX_BYTES).collect(),
    )
    .await
    .map_err(|_| format!("no whole answer within {FETCH_TIMEOUT:?}"))?
    .map_err(|e| e.to_string())?
    .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))
}
