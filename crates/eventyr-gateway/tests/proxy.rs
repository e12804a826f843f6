//! The proxy in front of real upstreams on 127.0.0.1: routing and rewriting, the
//! headers it adds, request ids and traceparents kept or begun, round robin over a
//! cluster with a dead endpoint (each failed connection tried once elsewhere), header
//! routing to a canary, and the JSON error for a path no route takes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::any;
use eventyr_gateway::config::GatewayConfig;
use eventyr_gateway::proxy::{Proxy, serve};
use serde_json::{Value, json};

mod common;
use common::{base64_url, dead, futures_pending, origin, start, upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_routes_rewrites_forwards_and_tries_another_endpoint() {
    let (a, b, gone) = (upstream("a").await, upstream("b").await, dead().await);
    let config = GatewayConfig::parse(&format!(
        r#"
        [[clusters]]
        name = "shop"
        endpoints = [{{ url = "{a}" }}, {{ url = "{gone}" }}, {{ url = "{b}" }}]

        [[clusters]]
        name = "canary"
        endpoints = [{{ url = "{b}" }}]

        [[routes]]
        name = "api"
        path = {{ prefix = "/api" }}
        rewrite = {{ strip_prefix = "/api" }}
        cluster = "shop"

        [[routes]]
        name = "api-canary"
        path = {{ prefix = "/api" }}
        headers = {{ x-canary = "true" }}
        rewrite = {{ strip_prefix = "/api" }}
        cluster = "canary"
        "#
    ))
    .expect("valid config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let gateway = format!("http://{}", listener.local_addr().expect("address"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(serve(
        listener,
        Arc::new(Proxy::new(&config).expect("the proxy starts")),
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(5),
    ));
    let client = reqwest::Client::new();

    // Rewritten, with the gateway's headers; hop-by-hop ones stay behind.
    let response = client
        .get(format!("{gateway}/api/orders/1?expand=lines"))
        .header("connection", "x-secret")
        .header("x-secret", "hop")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let id = response
        .headers()
        .get("x-request-id")
        .expect("a request id")
        .to_str()
        .expect("text")
        .to_owned();
    let seen: Value = response.json().await.expect("json");
    assert_eq!(seen["path"], "/orders/1");
    assert_eq!(seen["query"], "expand=lines");
    assert_eq!(seen["x-request-id"], id.as_str());
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert!(
        seen["x-forwarded-host"]
            .as_str()
            .is_some_and(|h| h.starts_with("127.0.0.1:"))
    );
    assert!(
        seen["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with("00-"))
    );
    assert_eq!(
        seen["x-secret"],
        Value::Null,
        "named in Connection: hop-by-hop"
    );

    // The caller's request id and trace are kept; the gateway's hop is a new span.
    let seen: Value = client
        .get(format!("{gateway}/api/x"))
        .header("x-request-id", "req-42")
        .header("x-forwarded-for", "203.0.113.9")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(seen["x-request-id"], "req-42");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    let trace = seen["traceparent"].as_str().expect("traceparent");
    assert!(
        trace.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{trace}"
    );
    assert!(!trace.contains("00f067aa0ba902b7"), "{trace}");

    // Round robin over a, (dead), b: every request answered, by both live ones.
    let mut upstreams = HashSet::new();
    for i in 0..30 {
        let response = client
            .post(format!("{gateway}/api/echo"))
            .body(format!("body {i}"))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200, "request {i}");
        let seen: Value = response.json().await.expect("json");
        assert_eq!(seen["body"], format!("body {i}"));
        upstreams.insert(seen["upstream"].as_str().expect("name").to_owned());
    }
    assert_eq!(upstreams, HashSet::from(["a".to_owned(), "b".to_owned()]));

    // A header sends the request to the canary.
    for _ in 0..5 {
        let seen: Value = client
            .get(format!("{gateway}/api/x"))
            .header("x-canary", "true")
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(seen["upstream"], "b");
    }

    // No route: the JSON error body.
    let response = client
        .get(format!("{gateway}/elsewhere"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "no_route");

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("stops")
        .expect("joined");
}

/// An upstream that fails everything, its health check included.
async fn sick() -> String {
    let app = Router::new().fallback(any(|| async {
        (http::StatusCode::INTERNAL_SERVER_ERROR, "sick")
    }));
    origin(app).await
}

/// Active checks take an endpoint whose health check fails out of its cluster;
/// passive ejection takes out one whose answers fail, in a cluster without checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoints_leave_their_cluster() {
    let (well, ill) = (upstream("well").await, sick().await);
    let config = GatewayConfig::parse(&format!(
        r#"
        [[clusters]]
        name = "checked"
        endpoints = [{{ url = "{well}" }}, {{ url = "{ill}" }}]
        health = {{ interval = "50ms", timeout = "40ms", unhealthy_threshold = 2 }}
        outlier = {{ consecutive_failures = 0 }}

        [[clusters]]
        name = "watched"
        endpoints = [{{ url = "{well}" }}, {{ url = "{ill}" }}]
        outlier = {{ consecutive_failures = 3, base_ejection = "10s" }}

        [[routes]]
        name = "checked"
        path = {{ prefix = "/checked" }}
        cluster = "checked"

        [[routes]]
        name = "watched"
        path = {{ prefix = "/watched" }}
        cluster = "watched"
        "#
    ))
    .expect("valid config");
    let (gateway, proxy) = start(&config).await;
    tokio::spawn(eventyr_gateway::health::run(
        Arc::clone(&proxy),
        futures_pending(),
    ));
    let client = reqwest::Client::new();

    // Checked: two failed checks 50 ms apart take the sick one out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while proxy
        .balancer("checked")
        .is_some_and(|b| b.endpoints()[1].healthy())
    {
        assert!(tokio::time::Instant::now() < deadline, "never unhealthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..10 {
        let response = client
            .get(format!("{gateway}/checked"))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200);
    }

    // Watched: three 500s in a row eject the sick one; then every answer is good.
    let mut failures = 0;
    for _ in 0..6 {
        let response = client
            .get(format!("{gateway}/watched"))
            .send()
            .await
            .expect("send");
        if response.status() == 500 {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 3,
        "round robin sends every other request there until it is out"
    );
    assert!(
        proxy
            .balancer("watched")
            .is_some_and(|b| b.endpoints()[1].ejected_until().is_some())
    );
    for _ in 0..10 {
        let response = client
            .get(format!("{gateway}/watched"))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200);
    }
}

/// A route's timeout bounds the upstream's answer: 504 with the JSON error body, and
/// the request id still on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_meets_its_routes_timeout() {
    let app = Router::new().fallback(any(|| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        "late"
    }));
    let slow = origin(app).await;
    let config = GatewayConfig::parse(&format!(
        r#"
        [[clusters]]
        name = "slow"
        endpoints = [{{ url = "{slow}" }}]
        circuit_breaker = {{ error_rate = 0.5, min_requests = 3, window = "10s", open_for = "1m" }}

        [[routes]]
        name = "slow"
        path = {{ prefix = "/" }}
        timeout = "100ms"
        cluster = "slow"
        "#
    ))
    .expect("valid config");
    let (gateway, proxy) = start(&config).await;
    let started = std::time::Instant::now();
    let response = reqwest::Client::new()
        .get(format!("{gateway}/x"))
        .header("x-request-id", "slow-1")
        .send()
        .await
        .expect("send");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(response.status(), 504);
    assert_eq!(response.headers()["x-request-id"], "slow-1");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "upstream_timeout");

    // Timeouts are the cluster's failures: three of them open its breaker.
    for _ in 0..2 {
        let response = reqwest::get(format!("{gateway}/x")).await.expect("send");
        assert_eq!(response.status(), 504);
    }
    assert_eq!(
        proxy.breaker_state("slow"),
        Some(eventyr_gateway::resilience::BreakerState::Open)
    );
    let response = reqwest::get(format!("{gateway}/x")).await.expect("send");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "circuit_open");
}

/// A cluster whose answers keep failing trips its circuit breaker (503
/// `circuit_open`, no upstream call); a full bulkhead sheds with 503 `overloaded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_breaker_and_the_bulkhead_shed_load() {
    let ill = sick().await;
    let app = Router::new().fallback(any(|| async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        "late"
    }));
    let slow = origin(app).await;
    let config = GatewayConfig::parse(&format!(
        r#"
        [[clusters]]
        name = "ill"
        endpoints = [{{ url = "{ill}" }}]
        outlier = {{ consecutive_failures = 0 }}
        circuit_breaker = {{ min_requests = 4, error_rate = 0.5, open_for = "10s" }}

        [[clusters]]
        name = "narrow"
        endpoints = [{{ url = "{slow}" }}]
        max_concurrent = 1

        [[routes]]
        name = "ill"
        path = {{ prefix = "/ill" }}
        cluster = "ill"

        [[routes]]
        name = "narrow"
        path = {{ prefix = "/narrow" }}
        cluster = "narrow"
        "#
    ))
    .expect("valid config");
    let (gateway, proxy) = start(&config).await;
    let client = reqwest::Client::new();
    let status = |path: &'static str| {
        let (client, gateway) = (client.clone(), gateway.clone());
        async move {
            let response = client
                .get(format!("{gateway}{path}"))
                .send()
                .await
                .expect("send");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body["error"].as_str().map(str::to_owned))
        }
    };
    for _ in 0..4 {
        assert_eq!(status("/ill").await.0, 500);
    }
    assert_eq!(status("/ill").await, (503, Some("circuit_open".to_owned())));

    // The second request goes once the first is under way at the only endpoint.
    let (first, second) = tokio::join!(status("/narrow"), async {
        let narrow = proxy.balancer("narrow").expect("cluster");
        while narrow.endpoints()[0].outstanding() == 0 {
            tokio::task::yield_now().await;
        }
        status("/narrow").await
    });
    assert_eq!(first.0, 200);
    assert_eq!(second, (503, Some("overloaded".to_owned())));
}

/// An upstream that answers 503 to every other request.
async fn flaky() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    let app = Router::new().fallback(any(move || {
        let counter = Arc::clone(&counter);
        async move {
            if counter.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                (http::StatusCode::SERVICE_UNAVAILABLE, "busy")
            } else {
                (http::StatusCode::OK, "fine")
            }
        }
    }));
    (origin(app).await, seen)
}

/// Idempotent requests are retried on a gateway error within the route's attempts and
/// the cluster's budget; a POST is not; an empty budget stops retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_retried_within_the_budget() {
    use std::sync::atomic::Ordering;
    let ((generous, seen), (stingy, _)) = (flaky().await, flaky().await);
    let config = GatewayConfig::parse(&format!(
        r#"
        [[clusters]]
        name = "generous"
        endpoints = [{{ url = "{generous}" }}]
        outlier = {{ consecutive_failures = 0 }}

        [[clusters]]
        name = "stingy"
        endpoints = [{{ url = "{stingy}" }}]
        outlier = {{ consecutive_failures = 0 }}
        retry_budget = {{ ratio = 0.0, min_per_second = 0 }}

        [[routes]]
        name = "generous"
        path = {{ prefix = "/generous" }}
        retries = {{ attempts = 3 }}
        cluster = "generous"

        [[routes]]
        name = "stingy"
        path = {{ prefix = "/stingy" }}
        retries = {{ attempts = 3 }}
        cluster = "stingy"
        "#
    ))
    .expect("valid config");
    let (gateway, _) = start(&config).await;
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let response = client
            .get(format!("{gateway}/generous"))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200, "the retry gets the good answer");
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        10,
        "each GET took two attempts"
    );
    let post = client
        .post(format!("{gateway}/generous"))
        .body("x")
        .send()
        .await
        .expect("send");
    assert_eq!(post.status(), 503, "a POST is not retried");
    let stingy = client
        .get(format!("{gateway}/stingy"))
        .send()
        .await
        .expect("send");
    assert_eq!(stingy.status(), 503, "no budget, no retry");
}

/// Bodies and headers above the limits are refused before any upstream sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused() {
    let a = upstream("a").await;
    let config = GatewayConfig::parse(&format!(
        r#"
        limits = {{ max_body_bytes = 1000, max_header_bytes = 8192 }}

        [[clusters]]
        name = "a"
        endpoints = [{{ url = "{a}" }}]

        [[routes]]
        name = "a"
        path = {{ prefix = "/" }}
        cluster = "a"
        "#
    ))
    .expect("valid config");
    let (gateway, _) = start(&config).await;
    let client = reqwest::Client::new();
    let fits = client
        .post(format!("{gateway}/x"))
        .body("x".repeat(1000))
        .send()
        .await
        .expect("send");
    assert_eq!(fits.status(), 200);
    let big = client
        .post(format!("{gateway}/x"))
        .body("x".repeat(1001))
        .send()
        .await
        .expect("send");
    assert_eq!(big.status(), 413);
    let body: Value = big.json().await.expect("json");
    assert_eq!(body["error"], "payload_too_large");
    let huge_header = client
        .get(format!("{gateway}/x"))
        .header("x-big", "y".repeat(10_000))
        .send()
        .await
        .expect("send");
    assert_eq!(huge_header.status(), 431);
}

/// A route's CORS policy: preflights answered by the gateway (allowed or 403), actual
/// requests from allowed origins get the headers, others none; routes without a
/// policy add nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_follows_each_routes_policy() {
    let a = upstream("a").await;
    let config = GatewayConfig::parse(&format!(
        r#"
        [[clusters]]
        name = "a"
        endpoints = [{{ url = "{a}" }}]

        [[routes]]
        name = "shop"
        path = {{ prefix = "/api" }}
        methods = ["GET", "POST"]
        cors = {{ allow_origins = ["https://shop.example.com"], allow_credentials = true }}
        cluster = "a"

        [[routes]]
        name = "plain"
        path = {{ prefix = "/plain" }}
        cluster = "a"
        "#
    ))
    .expect("valid config");
    let (gateway, _) = start(&config).await;
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str, method: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, format!("{gateway}/api/orders"))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .send()
    };
    let allowed = preflight("https://shop.example.com", "POST")
        .await
        .expect("send");
    assert_eq!(allowed.status(), 204);
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(
        header(&allowed, "access-control-allow-origin").as_deref(),
        Some("https://shop.example.com")
    );
    assert_eq!(
        header(&allowed, "access-control-allow-credentials").as_deref(),
        Some("true")
    );
    assert!(header(&allowed, "access-control-allow-methods").is_some_and(|m| m.contains("POST")));
    assert_eq!(header(&allowed, "vary").as_deref(), Some("Origin"));
    let refused = preflight("https://evil.example", "POST")
        .await
        .expect("send");
    assert_eq!(refused.status(), 403);

    let actual = client
        .get(format!("{gateway}/api/orders"))
        .header("origin", "https://shop.example.com")
        .send()
        .await
        .expect("send");
    assert_eq!(actual.status(), 200);
    assert_eq!(
        header(&actual, "access-control-allow-origin").as_deref(),
        Some("https://shop.example.com")
    );
    assert_eq!(
        header(&actual, "access-control-expose-headers").as_deref(),
        Some("x-request-id")
    );
    let stranger = client
        .get(format!("{gateway}/api/orders"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("send");
    assert_eq!(header(&stranger, "access-control-allow-origin"), None);
    let plain = client
        .get(format!("{gateway}/plain"))
        .header("origin", "https://shop.example.com")
        .send()
        .await
        .expect("send");
    assert_eq!(header(&plain, "access-control-allow-origin"), None);
}

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

fn token(
    algorithm: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    claims: Value,
) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), &claims, key).expect("sign")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// JWTs (HS256, RS256, ES256) and API keys authenticate; routes require permissions
/// from roles; forged, expired, foreign and `alg: none` tokens and algorithm confusion
/// are refused; a client's own X-User-ID never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_authenticated_and_authorized() {
    use jsonwebtoken::{Algorithm, EncodingKey};
    let a = upstream("a").await;
    let rs_public = include_str!("keys/rs256-public.pem");
    let es_public = include_str!("keys/es256-public.pem");
    let api_key_digest = {
        use sha2::Digest;
        sha2::Sha256::digest(b"partner-key-1")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let config = GatewayConfig::parse(&format!(
        r#"
        [auth]
        issuer = "eventyr"
        audience = "eventyr-api"
        api_keys = [{{ consumer = "partner-a", tier = "premium", sha256 = "{api_key_digest}", roles = ["reader"] }}]
        roles = {{ admin = ["*"], customer = ["orders:*"], reader = ["orders:read"] }}

        [[auth.keys]]
        algorithm = "HS256"
        secret = "{SECRET}"

        [[auth.keys]]
        kid = "rsa-1"
        algorithm = "RS256"
        public_key = """{rs_public}"""

        [[auth.keys]]
        kid = "ec-1"
        algorithm = "ES256"
        public_key = """{es_public}"""

        [[clusters]]
        name = "a"
        endpoints = [{{ url = "{a}" }}]

        [[routes]]
        name = "read"
        path = {{ prefix = "/orders" }}
        methods = ["GET"]
        permissions = ["orders:read"]
        cluster = "a"

        [[routes]]
        name = "admin"
        path = {{ prefix = "/admin" }}
        permissions = ["admin:write"]
        cluster = "a"

        [[routes]]
        name = "public"
        path = {{ prefix = "/public" }}
        cluster = "a"
        "#
    ))
    .expect("valid config");
    let (gateway, _) = start(&config).await;
    let client = reqwest::Client::new();
    let call = |path: &'static str, auth: Option<(&'static str, String)>| {
        let (client, gateway) = (client.clone(), gateway.clone());
        async move {
            let mut request = client
                .get(format!("{gateway}{path}"))
                .header("x-user-id", "spoofed");
            if let Some((name, value)) = auth {
                request = request.header(name, value);
            }
            let response = request.send().await.expect("send");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body)
        }
    };
    let claims = |sub: &str, roles: &[&str], exp: u64| json!({ "sub": sub, "roles": roles, "iss": "eventyr", "aud": "eventyr-api", "exp": exp });
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    let bearer = |t: String| Some(("authorization", format!("Bearer {t}")));
    let later = now() + 600;

    // HS256: a customer reads orders; the upstream sees the gateway's X-User-ID.
    let customer = token(Algorithm::HS256, &hs, claims("alice", &["customer"], later));
    let (status, seen) = call("/orders/1", bearer(customer.clone())).await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(
        seen["x-user-id"], "alice",
        "the gateway's, not the client's"
    );
    let (status, body) = call("/admin/x", bearer(customer)).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));

    // RS256 and ES256 with their kids; an admin may do anything.
    let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".to_owned());
    let rs = EncodingKey::from_rsa_pem(include_bytes!("keys/rs256-private.pem")).expect("key");
    let admin =
        jsonwebtoken::encode(&header, &claims("root", &["admin"], later), &rs).expect("sign");
    assert_eq!(call("/admin/x", bearer(admin)).await.0, 200);
    let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
    header.kid = Some("ec-1".to_owned());
    let es = EncodingKey::from_ec_pem(include_bytes!("keys/es256-private.pem")).expect("key");
    let reader =
        jsonwebtoken::encode(&header, &claims("bob", &["reader"], later), &es).expect("sign");
    assert_eq!(call("/orders/2", bearer(reader)).await.0, 200);

    // API keys.
    assert_eq!(
        call("/orders/3", Some(("x-api-key", "partner-key-1".to_owned())))
            .await
            .0,
        200
    );
    let (status, body) = call("/orders/3", Some(("x-api-key", "guess".to_owned()))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );

    // No credential on a protected route; a bad one anywhere.
    let (status, body) = call("/orders/4", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthenticated"))
    );
    let refusals = [
        (
            "expired",
            token(
                Algorithm::HS256,
                &hs,
                claims("alice", &["customer"], now() - 600),
            ),
        ),
        (
            "foreign audience",
            token(
                Algorithm::HS256,
                &hs,
                json!({ "sub": "alice", "roles": ["customer"], "iss": "eventyr", "aud": "elsewhere", "exp": later }),
            ),
        ),
        (
            "other secret",
            token(
                Algorithm::HS256,
                &EncodingKey::from_secret(b"another-secret-of-32-bytes-or-more!!"),
                claims("alice", &["customer"], later),
            ),
        ),
        // Algorithm confusion: the RS256 public key as an HS256 secret.
        (
            "confusion",
            token(
                Algorithm::HS256,
                &EncodingKey::from_secret(rs_public.as_bytes()),
                claims("alice", &["admin"], later),
            ),
        ),
        (
            "alg none",
            format!(
                "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
                base64_url(claims("alice", &["admin"], later).to_string())
            ),
        ),
    ];
    for (what, bad) in refusals {
        let (status, body) = call("/public/x", bearer(bad)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_token")),
            "{what}: {body}"
        );
    }
    // A public route without a credential: no X-User-ID at all.
    let (status, seen) = call("/public/x", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        seen["x-user-id"],
        Value::Null,
        "a spoofed X-User-ID is dropped"
    );
}

/// Rate limits through the gateway: per tier for callers with API keys, per client
/// address for the rest (X-Forwarded-For believed only from trusted proxies), a rule
/// in shadow mode that never denies; 429 with Retry-After and both header families.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_deny_with_their_headers() {
    let a = upstream("a").await;
    let digest = |key: &[u8]| {
        use sha2::Digest;
        sha2::Sha256::digest(key)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let (free, premium) = (digest(b"free-key"), digest(b"premium-key"));
    let config = GatewayConfig::parse(&format!(
        r#"
        trusted_proxies = ["10.0.0.0/8"]

        [auth]
        api_keys = [
            {{ consumer = "f", tier = "free", sha256 = "{free}" }},
            {{ consumer = "p", tier = "premium", sha256 = "{premium}" }},
        ]

        [[rate_limits]]
        name = "free"
        tier = "free"
        algorithm = "sliding_window"
        limit = 3
        period = "1h"
        key = "consumer"

        [[rate_limits]]
        name = "premium"
        tier = "premium"
        algorithm = "sliding_window"
        limit = 6
        period = "1h"
        key = "consumer"

        [[rate_limits]]
        name = "per-ip"
        tier = "anonymous"
        algorithm = "gcra"
        limit = 2
        period = "1h"
        key = "client_ip"

        [[rate_limits]]
        name = "trial"
        routes = ["api"]
        algorithm = "fixed_window"
        limit = 1
        period = "1h"
        key = "global"
        shadow = true

        [[clusters]]
        name = "a"
        endpoints = [{{ url = "{a}" }}]

        [[routes]]
        name = "api"
        path = {{ prefix = "/" }}
        cluster = "a"
        "#
    ))
    .expect("valid config");
    let (gateway, _) = start(&config).await;
    let client = reqwest::Client::new();
    let send = |header: Option<(&'static str, &'static str)>| {
        let (client, gateway) = (client.clone(), gateway.clone());
        async move {
            let mut request = client.get(format!("{gateway}/x"));
            if let Some((name, value)) = header {
                request = request.header(name, value);
            }
            request.send().await.expect("send")
        }
    };
    let passed =
        |responses: &[reqwest::Response]| responses.iter().filter(|r| r.status() == 200).count();
    let mut free_answers = Vec::new();
    for _ in 0..5 {
        free_answers.push(send(Some(("x-api-key", "free-key"))).await);
    }
    assert_eq!(passed(&free_answers), 3, "free: 3 an hour");
    let first = &free_answers[0];
    assert_eq!(first.headers()["x-ratelimit-limit"], "3");
    assert_eq!(first.headers()["x-ratelimit-remaining"], "2");
    assert_eq!(first.headers()["ratelimit-policy"], "\"free\";q=3;w=3600");
    let denied = &free_answers[4];
    assert_eq!(denied.status(), 429);
    assert!(denied.headers().contains_key("retry-after"));
    assert_eq!(
        denied.headers()["ratelimit"]
            .to_str()
            .expect("text")
            .split(';')
            .nth(1),
        Some("r=0")
    );

    let mut premium_answers = Vec::new();
    for _ in 0..8 {
        premium_answers.push(send(Some(("x-api-key", "premium-key"))).await);
    }
    assert_eq!(
        passed(&premium_answers),
        6,
        "premium: 6 an hour, its own count"
    );

    // Anonymous callers are counted by address; the loopback peer is not a trusted
    // proxy, so a forged X-Forwarded-For changes nothing.
    let mut anonymous = Vec::new();
    for i in 0..4 {
        let forged = if i % 2 == 0 {
            "203.0.113.1"
        } else {
            "203.0.113.2"
        };
        anonymous.push(send(Some(("x-forwarded-for", forged))).await);
    }
    assert_eq!(passed(&anonymous), 2, "one address, whatever it claims");
    // The shadow rule (1 an hour, global) would have denied most of these: it only counted.
}

/// GET answers of a caching route are kept for their ttl (by path and query, and by
/// caller when there is one); `no-store` answers and `no-cache` requests go around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_routes_answer_from_the_cache() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let served = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&served);
    let app = Router::new()
        .route(
            "/fresh",
            any(|| async { ([(http::header::CACHE_CONTROL, "no-store")], "never kept") }),
        )
        .fallback(any(move || {
            let counter = Arc::clone(&counter);
            async move { format!("answer {}", counter.fetch_add(1, Ordering::SeqCst)) }
        }));
    let origin = origin(app).await;
    let config = GatewayConfig::parse(&format!(
        r#"
        [[clusters]]
        name = "origin"
        endpoints = [{{ url = "{origin}" }}]

        [[routes]]
        name = "catalog"
        path = {{ prefix = "/" }}
        cache = {{ ttl = "200ms" }}
        cluster = "origin"
        "#
    ))
    .expect("valid config");
    let (gateway, _) = start(&config).await;
    let client = reqwest::Client::new();
    let get = |path: &'static str, no_cache: bool| {
        let (client, gateway) = (client.clone(), gateway.clone());
        async move {
            let mut request = client.get(format!("{gateway}{path}"));
            if no_cache {
                request = request.header("cache-control", "no-cache");
            }
            let response = request.send().await.expect("send");
            let state = response.headers()["x-cache"]
                .to_str()
                .expect("text")
                .to_owned();
            (state, response.text().await.expect("text"))
        }
    };
    assert_eq!(
        get("/items?page=1", false).await,
        ("MISS".into(), "answer 0".into())
    );
    assert_eq!(
        get("/items?page=1", false).await,
        ("HIT".into(), "answer 0".into())
    );
    assert_eq!(
        get("/items?page=2", false).await,
        ("MISS".into(), "answer 1".into()),
        "the query is in the key"
    );
    assert_eq!(
        get("/items?page=1", true).await,
        ("BYPASS".into(), "answer 2".into())
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        get("/items?page=1", false).await,
        ("MISS".into(), "answer 3".into()),
        "expired"
    );
    assert_eq!(get("/fresh", false).await.0, "MISS");
    assert_eq!(
        get("/fresh", false).await.0,
        "MISS",
        "no-store is never kept"
    );
    assert_eq!(served.load(Ordering::SeqCst), 4);
}

/// An aggregation route fans out to several upstreams at once and answers with what
/// came in time: a slow or failing call is null, with its reason under `errors`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregation_routes_return_partial_results() {
    let app = Router::new()
        .route(
            "/orders/{id}",
            axum::routing::get(
                |axum::extract::Path(id): axum::extract::Path<String>| async move {
                    axum::Json(json!({ "order_id": id, "status": "COMPLETED" }))
                },
            ),
        )
        .route(
            "/orders/{id}/shipment",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                "late"
            }),
        )
        .route(
            "/orders/{id}/payments",
            axum::routing::get(|| async { (http::StatusCode::INTERNAL_SERVER_ERROR, "down") }),
        );
    let origin = origin(app).await;
    let config = GatewayConfig::parse(&format!(
        r#"
        [[clusters]]
        name = "origin"
        endpoints = [{{ url = "{origin}" }}]
        outlier = {{ consecutive_failures = 0 }}

        [[routes]]
        name = "details"
        path = {{ template = "/api/orders/{{id}}/details" }}
        methods = ["GET"]
        timeout = "1s"
        aggregate = [
            {{ name = "order", cluster = "origin", path = "/orders/{{id}}" }},
            {{ name = "shipment", cluster = "origin", path = "/orders/{{id}}/shipment", timeout = "200ms" }},
            {{ name = "payments", cluster = "origin", path = "/orders/{{id}}/payments" }},
        ]
        "#
    ))
    .expect("valid config");
    let (gateway, _) = start(&config).await;
    let started = std::time::Instant::now();
    let response = reqwest::get(format!("{gateway}/api/orders/o-7/details"))
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "calls go in parallel"
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body["order"],
        json!({ "order_id": "o-7", "status": "COMPLETED" })
    );
    assert_eq!(body["shipment"], Value::Null);
    assert_eq!(body["payments"], Value::Null);
    assert!(
        body["errors"]["shipment"]
            .as_str()
            .is_some_and(|e| e.contains("200ms")),
        "{body}"
    );
    assert_eq!(body["errors"]["payments"], "status 500");
}
