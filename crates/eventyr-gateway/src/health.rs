//! Active health checks: every `interval`, `GET <path>` on each endpoint of a cluster
//! that configures them, bounded by `timeout`. A 2xx is a success; anything else (or
//! no answer) a failure. `unhealthy_threshold` failures in a row take a healthy
//! endpoint out of its balancer; `healthy_threshold` successes in a row bring an
//! unhealthy one back. Endpoints start healthy (as Envoy's do), so a gateway that
//! starts serves at once.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::proxy::{HealthTarget, Proxy};

/// Runs the checks of every configured endpoint until `shutdown` completes.
pub async fn run(proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    let mut checks = tokio::task::JoinSet::new();
    for target in proxy.health_targets() {
        checks.spawn(watch(Arc::clone(&proxy), target));
    }
    shutdown.await;
    checks.shutdown().await;
}

/// One endpoint's checks, forever.
async fn watch(proxy: Arc<Proxy>, target: HealthTarget) {
    let mut interval = tokio::time::interval(target.config.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut healthy, mut streak) = (true, 0u32);
    loop {
        interval.tick().await;
        let ok = probe(&proxy, &target).await;
        // A streak counts answers that disagree with the current verdict.
        streak = if ok == healthy { 0 } else { streak + 1 };
        let threshold = if healthy {
            target.config.unhealthy_threshold
        } else {
            target.config.healthy_threshold
        };
        if streak >= threshold {
            healthy = ok;
            streak = 0;
            proxy.set_healthy(&target.cluster, target.endpoint, healthy);
            if healthy {
                tracing::info!(cluster = %target.cluster, url = %target.url, "endpoint healthy again");
            } else {
                tracing::warn!(cluster = %target.cluster, url = %target.url, "endpoint unhealthy: its health checks fail");
            }
        }
    }
}

async fn probe(proxy: &Proxy, target: &HealthTarget) -> bool {
    let version = if target.http2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    let Ok(request) = Request::get(&target.url)
        .version(version)
        .header("user-agent", "eventyr-gateway-health")
        .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
    else {
        return false;
    };
    match tokio::time::timeout(
        target.config.timeout,
        proxy.client_for(target.http2).request(request),
    )
    .await
    {
        Ok(Ok(response)) => {
            let status: StatusCode = response.status();
            // Read the body so that the connection goes back to the pool.
            let _ = response.into_body().collect().await;
            status.is_success()
        }
        _ => false,
    }
}
