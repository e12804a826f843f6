//! The attack suite: `eventyr up` as a process, attacked the way its users' enemies
//! would — another customer's resources, forged and stolen tokens, the internal
//! listeners without the credential, identity headers and path tricks, password
//! guessing, refresh races, huge bodies of undeclared length, silent and slow
//! sockets. Each case asserts the exact status and error code, and that nothing
//! changed (no order created, no balance moved).

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

mod common;
use common::{Running, login, up_with};

/// A running system: the gateway (public API), the services' API behind it, each
/// participant's own listener.
struct System {
    _process: Running,
    gateway: String,
    internal: String,
    services: HashMap<String, String>,
    pid: u32,
}

fn up(dir: &Path) -> System {
    let (process, internal, services) = up_with(dir, &[], Stdio::null());
    System {
        pid: process.id(),
        _process: process,
        gateway: services["gateway"].clone(),
        internal,
        services,
    }
}

/// `method url` with a bearer token (or none), more headers and a JSON body: the
/// status and the JSON answer (null when there is none).
async fn call(
    method: &str,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
    let mut request = client.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The answer's status and error code.
fn refusal(answer: (u16, Value)) -> (u16, String) {
    let code = answer.1["error"].as_str().unwrap_or_default().to_owned();
    (answer.0, code)
}

/// `POST /api/orders` at the gateway `g` as `token`, with more headers.
async fn place(g: &str, token: &str, headers: &[(&str, &str)], body: Value) -> (u16, Value) {
    call(
        "POST",
        &format!("{g}/api/orders"),
        Some(token),
        headers,
        Some(body),
    )
    .await
}

fn order(customer: &str, sku: &str) -> Value {
    json!({ "customer_id": customer, "items": [{ "sku": sku, "quantity": 1 }], "points_to_use": 0 })
}

/// Waits until `check` holds of `GET url` (as `token`); its answer.
async fn until(url: &str, token: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, answer) = call("GET", url, Some(token), &[], None).await;
        if status == 200 && check(&answer) {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never: {url} -> {status} {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ids(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i["order_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_serves_only_its_owner() {
    let dir = tempfile::tempdir().expect("dir");
    let s = up(dir.path());
    let g = &s.gateway;
    let (alice, bob, admin) = (
        login(g, "alice").await,
        login(g, "bob").await,
        login(g, "admin").await,
    );
    let points_url = format!("{g}/api/customers/alice/points");
    let (_, before) = call("GET", &points_url, Some(&alice), &[], None).await;

    // Alice's order, with an idempotency key.
    let key = [("Idempotency-Key", "same-key")];
    let (status, placed) = place(g, &alice, &key, order("alice", "SKU-1")).await;
    assert_eq!(status, 202, "{placed}");
    let mine = placed["order_id"].as_str().expect("an id").to_owned();
    let order_url = format!("{g}/api/orders/{mine}");
    until(&order_url, &alice, |o| o["status"] == "COMPLETED").await;

    // Bob acting for alice: refused, and no order is made.
    assert_eq!(
        refusal(place(g, &bob, &[], order("alice", "SKU-2")).await),
        (403, "forbidden".into())
    );
    // The same key from bob (for bob) is another order; from alice again, hers.
    let (status, bobs) = place(g, &bob, &key, order("bob", "SKU-1")).await;
    assert_eq!(status, 202, "{bobs}");
    let bobs = bobs["order_id"].as_str().expect("an id").to_owned();
    assert_ne!(bobs, mine, "idempotency keys are scoped to the caller");
    let (status, again) = place(g, &alice, &key, order("alice", "SKU-1")).await;
    assert_eq!((status, again["order_id"].as_str()), (202, Some(&*mine)));

    // Someone else's single resource: 404, as if it did not exist.
    for url in [
        order_url.clone(),
        format!("{g}/api/orders/{mine}/details"),
        points_url.clone(),
    ] {
        assert_eq!(
            refusal(call("GET", &url, Some(&bob), &[], None).await),
            (404, "not_found".into()),
            "{url}"
        );
        assert_eq!(
            call("GET", &url, Some(&alice), &[], None).await.0,
            200,
            "{url}"
        );
        assert_eq!(
            call("GET", &url, Some(&admin), &[], None).await.0,
            200,
            "{url}"
        );
    }
    let details = call(
        "GET",
        &format!("{order_url}/details"),
        Some(&alice),
        &[],
        None,
    )
    .await;
    assert_eq!(details.1["order"]["order_id"], mine.as_str());

    // Lists: another customer's is 403; one's own without a filter.
    for url in [
        format!("{g}/api/orders?customer_id=alice"),
        format!("{g}/api/notifications?customer_id=alice"),
    ] {
        assert_eq!(
            refusal(call("GET", &url, Some(&bob), &[], None).await),
            (403, "forbidden".into()),
            "{url}"
        );
        assert_eq!(
            call("GET", &url, Some(&alice), &[], None).await.0,
            200,
            "{url}"
        );
    }
    let bob_list = until(&format!("{g}/api/orders"), &bob, |l| !ids(l).is_empty()).await;
    assert_eq!(
        ids(&bob_list),
        std::slice::from_ref(&bobs),
        "bob sees his own only"
    );
    let alice_list = until(&format!("{g}/api/orders"), &alice, |l| !ids(l).is_empty()).await;
    assert_eq!(ids(&alice_list), std::slice::from_ref(&mine));
    let everyone = until(&format!("{g}/api/orders"), &admin, |l| ids(l).len() >= 2).await;
    assert!(ids(&everyone).contains(&mine) && ids(&everyone).contains(&bobs));
    let (status, mail) = call(
        "GET",
        &format!("{g}/api/notifications"),
        Some(&bob),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200, "{mail}");
    assert!(
        mail["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|n| n["customer_id"] == "bob"),
        "{mail}"
    );
    // An order's payments and shipments: the owner's only.
    for kind in ["payments", "shipments"] {
        let url = format!("{g}/api/{kind}?order_id={mine}");
        let (status, seen) = call("GET", &url, Some(&bob), &[], None).await;
        assert_eq!(
            (status, seen["items"].as_array().map(Vec::len)),
            (200, Some(0)),
            "{url}"
        );
        let seen = until(&url, &alice, |v| {
            !v["items"].as_array().is_none_or(Vec::is_empty)
        })
        .await;
        assert_eq!(seen["items"][0]["customer_id"], "alice", "{url}");
    }

    // Admin-only operations.
    for (method, url, body) in [
        (
            "PUT",
            format!("{g}/api/inventory/SKU-1"),
            Some(json!({ "available": 5 })),
        ),
        ("GET", format!("{g}/admin/sagas"), None),
        ("GET", format!("{g}/admin/dashboard"), None),
        (
            "PUT",
            format!("{g}/admin/faults/payment"),
            Some(json!({ "down": true })),
        ),
        (
            "POST",
            format!("{g}/admin/projections/orders/rebuild"),
            None,
        ),
    ] {
        assert_eq!(
            refusal(call(method, &url, Some(&bob), &[], body.clone()).await),
            (403, "forbidden".into()),
            "{method} {url}"
        );
        assert_eq!(
            refusal(call(method, &url, None, &[], body).await),
            (401, "unauthenticated".into()),
            "{method} {url}"
        );
    }
    let (_, stock) = call(
        "GET",
        &format!("{g}/api/inventory/SKU-1"),
        Some(&bob),
        &[],
        None,
    )
    .await;
    assert_ne!(stock["available"], 5, "the refused restock changed nothing");

    // Nothing moved: alice's points, and her orders are the one she placed.
    let (_, after) = call("GET", &points_url, Some(&alice), &[], None).await;
    assert_eq!(before["balance"], after["balance"]);
    let (_, alice_list) = call("GET", &format!("{g}/api/orders"), Some(&alice), &[], None).await;
    assert_eq!(ids(&alice_list), [mine]);
}

/// The token keys of the running system (`<data-dir>/gateway/secrets.json`).
fn access_secret(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("gateway/secrets.json")).expect("secrets");
    let secrets: Value = serde_json::from_str(&text).expect("json");
    secrets["access_secret"]
        .as_str()
        .expect("a secret")
        .to_owned()
}

/// A session token's claims, changed by `change`, signed with `secret`.
fn forge(token: &str, secret: &str, change: impl FnOnce(&mut Value)) -> String {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64");
    let mut claims: Value = serde_json::from_slice(&bytes).expect("claims");
    change(&mut claims);
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("eventyr-session".into());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_are_not_right_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let s = up(dir.path());
    let url = format!("{}/api/orders", s.gateway);
    let alice = login(&s.gateway, "alice").await;
    assert_eq!(call("GET", &url, Some(&alice), &[], None).await.0, 200);
    let secret = access_secret(dir.path());
    // The same token re-signed as it is verifies: the forgeries below differ only in
    // what they name.
    assert_eq!(
        call(
            "GET",
            &url,
            Some(&forge(&alice, &secret, |_| {})),
            &[],
            None
        )
        .await
        .0,
        200
    );
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    let mut tampered = alice.clone().into_bytes();
    let middle = alice.find('.').expect("a JWT") + 5;
    tampered[middle] = if tampered[middle] == b'A' { b'B' } else { b'A' };
    let none = {
        use base64::Engine as _;
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let claims = alice.split('.').nth(1).expect("a JWT").to_owned();
        format!(
            "{}.{claims}.",
            b64(&json!({ "alg": "none", "kid": "eventyr-session" }))
        )
    };
    let cases = [
        ("tampered", String::from_utf8(tampered).expect("ascii")),
        ("alg none", none),
        (
            "another key",
            forge(&alice, "another secret of at least 32 bytes!!", |_| {}),
        ),
        (
            "expired",
            forge(&alice, &secret, |c| {
                c["iat"] = json!(unix - 3_600);
                c["exp"] = json!(unix - 1_800);
            }),
        ),
        (
            "another issuer",
            forge(&alice, &secret, |c| c["iss"] = json!("mallory")),
        ),
        (
            "no issuer",
            forge(&alice, &secret, |c| {
                drop(c.as_object_mut().map(|o| o.remove("iss")))
            }),
        ),
        (
            "another audience",
            forge(&alice, &secret, |c| c["aud"] = json!("elsewhere")),
        ),
        (
            "no audience",
            forge(&alice, &secret, |c| {
                drop(c.as_object_mut().map(|o| o.remove("aud")))
            }),
        ),
        (
            "a session that does not exist",
            forge(&alice, &secret, |c| c["sid"] = json!("no-such-session")),
        ),
        ("garbage", "not.a.token".to_owned()),
    ];
    for (case, token) in &cases {
        assert_eq!(
            refusal(call("GET", &url, Some(token), &[], None).await),
            (401, "invalid_token".into()),
            "{case}"
        );
    }
    assert_eq!(
        refusal(call("GET", &url, None, &[], None).await),
        (401, "unauthenticated".into())
    );
    assert_eq!(
        refusal(call("GET", &url, None, &[("X-API-Key", "guessed")], None).await),
        (401, "invalid_token".into())
    );
    // An address that keeps presenting bad credentials is refused for a while —
    // even with a good one.
    let mut limited = None;
    for _ in 0..40 {
        let answer = call("GET", &url, Some("not.a.token"), &[], None).await;
        if answer.0 == 429 {
            limited = Some(answer);
            break;
        }
    }
    let (status, body) = limited.expect("refused credentials are limited per address");
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    assert_eq!(
        refusal(call("GET", &url, Some(&alice), &[], None).await),
        (429, "rate_limited".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_listeners_need_the_credential() {
    let dir = tempfile::tempdir().expect("dir");
    let s = up(dir.path());
    let wrong = [("X-Eventyr-Credential", "x".repeat(40))];
    let wrong: Vec<(&str, &str)> = wrong.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let as_alice = [
        ("X-User-ID", "alice"),
        ("X-User-Roles", "customer"),
        ("X-Customer-ID", "alice"),
    ];
    let mut targets = vec![
        ("GET", format!("{}/api/orders", s.internal)),
        ("POST", format!("{}/api/orders", s.internal)),
        ("GET", format!("{}/admin/sagas", s.internal)),
        ("PUT", format!("{}/admin/faults/payment", s.internal)),
        ("GET", format!("{}/no/such/path", s.internal)),
    ];
    for (service, base) in &s.services {
        if service != "gateway" {
            targets.push(("PUT", format!("{base}/admin/faults")));
            targets.push(("GET", format!("{base}/admin/faults")));
        }
    }
    targets.push((
        "POST",
        format!("{}/internal/payments", s.services["payment"]),
    ));
    targets.push((
        "POST",
        format!("{}/internal/reservations", s.services["inventory"]),
    ));
    let body = json!({ "down": true });
    for (method, url) in &targets {
        for headers in [&[][..], &wrong[..], &as_alice[..]] {
            assert_eq!(
                refusal(call(method, url, None, headers, Some(body.clone())).await),
                (401, "unauthenticated".into()),
                "{method} {url} {headers:?}"
            );
        }
    }
    // With the credential but for a customer: no system route.
    let mut customer = vec![("X-Eventyr-Credential", eventyr_http::testing::CREDENTIAL)];
    customer.extend_from_slice(&as_alice);
    for (method, url) in targets
        .iter()
        .filter(|(_, u)| u.contains("/admin/") || u.contains("/internal/"))
    {
        assert_eq!(
            refusal(call(method, url, None, &customer, Some(body.clone())).await),
            (403, "forbidden".into()),
            "{method} {url}"
        );
    }
    // Nothing was set: every participant is up, with no faults.
    for (service, base) in s.services.iter().filter(|(n, _)| *n != "gateway") {
        let (status, knobs) = call(
            "GET",
            &format!("{base}/admin/faults"),
            None,
            &[("X-Eventyr-Credential", eventyr_http::testing::CREDENTIAL)],
            None,
        )
        .await;
        assert_eq!((status, &knobs["down"]), (200, &json!(false)), "{service}");
    }
    // The probes are open to anyone (orchestrators ask them without secrets).
    for base in std::iter::once(&s.internal).chain(s.services.values()) {
        assert_eq!(
            call("GET", &format!("{base}/health/live"), None, &[], None)
                .await
                .0,
            200
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_name_itself_or_walk_around_the_routes() {
    let dir = tempfile::tempdir().expect("dir");
    let s = up(dir.path());
    let g = &s.gateway;
    let (alice, bob) = (login(g, "alice").await, login(g, "bob").await);
    let (status, placed) = place(g, &alice, &[], order("alice", "SKU-3")).await;
    assert_eq!(status, 202);
    let mine = placed["order_id"].as_str().expect("an id").to_owned();
    let order_url = format!("{g}/api/orders/{mine}");

    // Bob names himself alice, an admin, the system: he stays bob.
    let claims = [
        ("X-User-ID", "alice"),
        ("X-User-Roles", "admin"),
        ("X-Customer-ID", "alice"),
        (
            "X-Eventyr-Credential",
            "x-credential-guessed-by-a-client-of-40",
        ),
    ];
    assert_eq!(
        refusal(call("GET", &order_url, Some(&bob), &claims, None).await),
        (404, "not_found".into())
    );
    assert_eq!(
        refusal(call("GET", &order_url, None, &claims, None).await),
        (401, "unauthenticated".into())
    );
    assert_eq!(
        refusal(
            call(
                "GET",
                &format!("{g}/admin/sagas"),
                Some(&bob),
                &claims,
                None
            )
            .await
        ),
        (403, "forbidden".into())
    );
    // Listing the identity headers as hop-by-hop does not strip the gateway's own.
    let hop = [(
        "Connection",
        "X-User-ID, X-Customer-ID, X-User-Roles, X-Eventyr-Credential",
    )];
    let (status, seen) = call("GET", &order_url, Some(&alice), &hop, None).await;
    assert_eq!((status, seen["order_id"].as_str()), (200, Some(&*mine)));
    assert_eq!(
        refusal(call("GET", &order_url, Some(&bob), &hop, None).await),
        (404, "not_found".into())
    );

    // A page of another site whose name was rebound to this address (DNS rebinding)
    // names its own host: the dashboard and the admin API do not answer it.
    let admin = login(g, "admin").await;
    for path in ["/dashboard", "/admin/sagas", "/admin/routes"] {
        let url = format!("{g}{path}");
        let rebound = [("Host", "evil.example:8080")];
        assert_eq!(
            refusal(call("GET", &url, Some(&admin), &rebound, None).await),
            (421, "misdirected_request".into()),
            "{path}"
        );
        let local = [("Host", "localhost")];
        assert_eq!(
            call("GET", &url, Some(&admin), &local, None).await.0,
            200,
            "{path}"
        );
    }

    // Path tricks: nothing reaches what its route does not name.
    for path in [
        "/api/orders/../admin/sagas",
        "/api/orders/%2e%2e/%2e%2e/admin/sagas",
        "/api/orders/..%2F..%2Fadmin%2Fsagas",
        "/api/orders%2F..%2F..%2Fadmin%2Fsagas",
        "//admin/sagas",
        "/api//admin/sagas",
        "/api/orders/%2e%2e%2fadmin",
    ] {
        // Sent as written: reqwest would resolve the dots itself.
        let response = raw_get(g, path, &bob).await;
        assert!(
            matches!(response.0, 400 | 404),
            "{path}: {} {}",
            response.0,
            response.1
        );
        assert!(
            !response.1.contains("\"sagas\"") && !response.1.contains("\"items\""),
            "{path}: {}",
            response.1
        );
    }
}

/// `GET path` exactly as written, over a fresh connection: the status and the body.
async fn raw_get(base: &str, path: &str, token: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guessing_locks_out_one_account_and_refresh_races_are_safe() {
    let dir = tempfile::tempdir().expect("dir");
    let s = up(dir.path());
    let url = format!("{}/auth/login", s.gateway);
    let guess = |user: &str, password: &str| {
        let url = url.clone();
        let body = json!({ "username": user, "password": password });
        async move { call("POST", &url, None, &[], Some(body)).await }
    };
    for _ in 0..5 {
        assert_eq!(
            refusal(guess("bob", "letmein").await),
            (401, "invalid_credentials".into())
        );
    }
    // The sixth attempt, even with the right password: refused, with the headers a
    // client needs to wait.
    let response = reqwest::Client::new()
        .post(&url)
        .json(&json!({ "username": "bob", "password": "bob" }))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=300).contains(&retry_after), "{retry_after}");
    assert!(response.headers().contains_key("ratelimit-policy"));
    assert!(response.headers().contains_key("ratelimit"));
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "rate_limited");
    // Another user behind the same address is not locked out, and her success
    // clears nothing of bob's.
    let alice = login(&s.gateway, "alice").await;
    assert_eq!(
        refusal(guess("bob", "bob").await),
        (429, "rate_limited".into())
    );

    // Two refreshes with the same token at once (two tabs): the same new pair.
    let (_, pair) = guess("alice", "alice").await;
    let refresh = || {
        let url = format!("{}/auth/refresh", s.gateway);
        let body = json!({ "refresh_token": pair["refresh_token"] });
        async move { call("POST", &url, None, &[], Some(body)).await }
    };
    let (a, b) = futures::join!(refresh(), refresh());
    assert_eq!((a.0, b.0), (200, 200), "{} {}", a.1, b.1);
    assert_eq!(a.1, b.1, "the same pair");
    let orders = format!("{}/api/orders", s.gateway);
    let fresh = a.1["access_token"].as_str().expect("a token").to_owned();
    assert_eq!(call("GET", &orders, Some(&fresh), &[], None).await.0, 200);
    assert_eq!(call("GET", &orders, Some(&alice), &[], None).await.0, 200);
}

/// The resident memory of a process, in KiB.
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A body of `total` bytes in 64 KiB frames, of undeclared length.
struct Endless {
    left: u64,
    chunk: bytes::Bytes,
}

impl hyper::body::Body for Endless {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64);
        self.left -= n;
        let frame = self.chunk.slice(..usize::try_from(n).expect("small"));
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(frame))))
    }
}

/// `method path` over h2c (prior knowledge) with a 1.5 GB body of undeclared length:
/// the status.
async fn upload(gateway: &str, method: &str, path: &str, token: &str) -> u16 {
    let address = gateway.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2c");
    tokio::spawn(connection);
    let body = Endless {
        left: 1_500_000_000,
        chunk: bytes::Bytes::from(vec![b'x'; 64 * 1024]),
    };
    let request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{address}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(body)
        .expect("request");
    let response = tokio::time::timeout(Duration::from_secs(60), sender.send_request(request))
        .await
        .expect("an answer in time")
        .expect("an answer");
    response.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_and_connections_are_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("dir");
    let s = up(dir.path());
    let alice = login(&s.gateway, "alice").await;
    let before = resident_kib(s.pid);

    // 1.5 GB of undeclared length, over h2c: cut at the limit, never buffered whole.
    assert_eq!(upload(&s.gateway, "POST", "/api/orders", &alice).await, 413);
    // A route whose service does not read bodies answers before the limit or at it;
    // either way nothing is kept.
    let probe = upload(&s.gateway, "GET", "/health/live", &alice).await;
    assert!(matches!(probe, 200 | 413), "{probe}");
    let after = resident_kib(s.pid);
    eprintln!(
        "resident memory: {before} KiB before the uploads, {after} KiB after; /health/live answered {probe}"
    );
    assert!(
        after < before + 16 * 1024,
        "resident memory grew from {before} KiB to {after} KiB"
    );

    // Thousands of silent sockets, and a slowloris: closed after the header-read
    // deadline (10 s), while a normal client is served throughout.
    let address = s.gateway.trim_start_matches("http://").to_owned();
    let mut silent = Vec::new();
    for _ in 0..3_000 {
        silent.push(
            tokio::net::TcpStream::connect(&address)
                .await
                .expect("connect"),
        );
    }
    let mut slow = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    slow.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let opened = tokio::time::Instant::now();
    let orders = format!("{}/api/orders", s.gateway);
    let mut dribble = 0u32;
    while opened.elapsed() < Duration::from_secs(12) {
        assert_eq!(call("GET", &orders, Some(&alice), &[], None).await.0, 200);
        // A header byte every half second never finishes the request in time.
        if slow.write_all(b"X").await.is_ok() {
            dribble += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(dribble > 0);
    let mut closed = 0;
    for mut socket in silent.into_iter().chain(std::iter::once(slow)) {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(5), socket.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => closed += 1,
            Ok(Ok(_)) => {
                // An error answer (408/400) before the close counts as closed too.
                closed += 1;
            }
            Err(_) => {}
        }
    }
    assert_eq!(closed, 3_001, "every silent and slow socket is closed");
    assert_eq!(call("GET", &orders, Some(&alice), &[], None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_users_exist_only_with_the_demo_and_never_on_a_network_by_accident() {
    let dir = tempfile::tempdir().expect("dir");
    // On an address others can reach, with the demo passwords: refused at start.
    let output = common::run(dir.path(), &["up", "--listen", "0.0.0.0:0"]).await;
    assert!(!output.status.success());
    assert!(
        common::text(&output.stderr).contains("--no-demo"),
        "{}",
        common::text(&output.stderr)
    );
    // Not silently on another store than the one it runs on.
    let output = common::run(
        dir.path(),
        &["--store", "postgres", "up", "--listen", "127.0.0.1:0"],
    )
    .await;
    assert!(!output.status.success());
    assert!(
        common::text(&output.stderr).contains("embedded mode"),
        "{}",
        common::text(&output.stderr)
    );
    // Without the demo: nobody logs in with the demo passwords.
    let (process, _, services) = up_with(dir.path(), &["--no-demo"], Stdio::null());
    for user in ["alice", "bob", "admin"] {
        let body = json!({ "username": user, "password": user });
        let url = format!("{}/auth/login", services["gateway"]);
        assert_eq!(
            refusal(call("POST", &url, None, &[], Some(body)).await),
            (401, "invalid_credentials".into()),
            "{user}"
        );
    }
    // What the system wrote is its owner's alone.
    use std::os::unix::fs::PermissionsExt;
    for entry in [
        "",
        "services",
        "services/order.db",
        "gateway",
        "gateway/secrets.json",
    ] {
        let mode = std::fs::metadata(dir.path().join(entry))
            .expect("written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{entry}: {mode:o}");
    }
    drop(process);

    // A configured user list replaces the demo users.
    let configured = tempfile::tempdir().expect("dir");
    let hash = eventyr_gateway::session::hash_password("a long passphrase").expect("hash");
    std::fs::write(
        configured.path().join("eventyr.toml"),
        format!(
            "[[users]]\nname = \"carol\"\npassword_hash = \"{hash}\"\nroles = [\"customer\"]\ncustomer_id = \"carol\"\n"
        ),
    )
    .expect("write");
    let (process, _, services) = up_with(configured.path(), &[], Stdio::null());
    let url = format!("{}/auth/login", services["gateway"]);
    let alice = json!({ "username": "alice", "password": "alice" });
    assert_eq!(
        refusal(call("POST", &url, None, &[], Some(alice)).await),
        (401, "invalid_credentials".into())
    );
    let carol = json!({ "username": "carol", "password": "a long passphrase" });
    let (status, pair) = call("POST", &url, None, &[], Some(carol)).await;
    assert_eq!(status, 200, "{pair}");
    let token = pair["access_token"].as_str().expect("a token");
    let theirs = format!("{}/api/customers/alice/points", services["gateway"]);
    assert_eq!(call("GET", &theirs, Some(token), &[], None).await.0, 404);
    let (status, mine) = call(
        "GET",
        &format!("{}/api/orders", services["gateway"]),
        Some(token),
        &[],
        None,
    )
    .await;
    assert_eq!((status, ids(&mine).len()), (200, 0), "her own list: {mine}");
    drop(process);
}
