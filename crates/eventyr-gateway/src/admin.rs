//! The admin API: `GET /admin/routes` (in the order they are tried),
//! `GET /admin/clusters` (endpoints with health, ejection, requests under way and
//! latency estimate; the breaker's state), `GET /admin/ratelimits` (rules, keys held,
//! the most recently used keys), `POST /admin/reload`. With `[auth]` every call needs
//! a credential with the `admin` role; without, only loopback clients are answered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::gateway::Gateway;

/// The admin API of `gateway` (serve it with `into_make_service_with_connect_info`).
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/admin/routes", get(routes))
        .route("/admin/clusters", get(clusters))
        .route("/admin/ratelimits", get(ratelimits))
        .route("/admin/reload", post(reload))
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&gateway),
            guard,
        ))
        .with_state(gateway)
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

async fn guard(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let proxy = gateway.proxy();
    let Some(authenticator) = proxy.authenticator() else {
        if peer.ip().is_loopback() {
            return next.run(request).await;
        }
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the admin API answers loopback clients only",
        );
    };
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let identity = match (bearer, api_key) {
        (Some(token), _) => authenticator.verify_token(token.trim()),
        (None, Some(key)) => authenticator.verify_api_key(key),
        (None, None) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "the admin API needs a credential",
            );
        }
    };
    match identity {
        Ok(identity) if identity.roles.iter().any(|r| r == "admin") => next.run(request).await,
        Ok(identity) => {
            crate::auth::security_event("forbidden", &identity.user_id);
            refuse(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the admin API needs the admin role",
            )
        }
        Err(refused) => {
            crate::auth::security_event("invalid_token", &refused.0);
            refuse(StatusCode::UNAUTHORIZED, "invalid_token", &refused.0)
        }
    }
}

async fn routes(State(gateway): State<Arc<Gateway>>) -> Json<Value> {
    Json(json!(gateway.proxy().routes().order()))
}

async fn clusters(State(gateway): State<Arc<Gateway>>) -> Json<Value> {
    let proxy = gateway.proxy();
    let now = Instant::now();
    let mut out = serde_json::Map::new();
    for name in proxy.cluster_names() {
        let endpoints: Vec<Value> = proxy
            .balancer(name)
            .map(|b| {
                b.endpoints()
                    .iter()
                    .map(|e| {
                        json!({
                            "address": e.address,
                            "weight": e.weight,
                            "healthy": e.healthy(),
                            "ejected_for_ms": e.ejected_until().map(|u| u.duration_since(now).as_millis()),
                            "in_flight": e.outstanding(),
                            "latency_estimate_ms": e.latency_estimate().as_secs_f64() * 1000.0,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let breaker = proxy.breaker_state(name).map(|s| s.as_str());
        out.insert(
            name.to_owned(),
            json!({ "breaker": breaker, "endpoints": endpoints }),
        );
    }
    Json(Value::Object(out))
}

async fn ratelimits(State(gateway): State<Arc<Gateway>>) -> Json<Value> {
    let proxy = gateway.proxy();
    let rules: Vec<Value> = proxy
        .rules()
        .iter()
        .map(|rule| {
            let c = &rule.config;
            json!({
                "name": c.name,
                "routes": c.routes,
                "priority": c.priority,
                "algorithm": format!("{:?}", c.algorithm),
                "limit": c.limit,
                "period_s": c.period.as_secs_f64(),
                "key": format!("{:?}", c.key),
                "tier": c.tier,
                "shadow": c.shadow,
                "keys": rule.keys(),
                "hottest": rule.hottest(10),
                "most_limited": rule.most_limited(10),
            })
        })
        .collect();
    Json(json!(rules))
}

async fn reload(State(gateway): State<Arc<Gateway>>) -> Response {
    match gateway.reload() {
        Ok(()) => Json(json!({ "reloaded": true })).into_response(),
        Err(message) => refuse(StatusCode::BAD_REQUEST, "invalid_config", &message),
    }
}
