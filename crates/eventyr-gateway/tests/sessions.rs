//! Sessions end to end through real gateways on 127.0.0.1: login, rotation of refresh
//! tokens, reuse detection revoking every session of the user, logout, server-side
//! revocation of access tokens; kept in SQLite (surviving a restart of the gateway)
//! and in a real `redis-server` shared by two gateways, including Redis going away in
//! the middle (the session store fails closed: 503, never a token let through
//! unchecked). Also the shared rate limits in Redis: one limit over two gateways for
//! each algorithm, and each failure policy while Redis is away.

use std::path::Path;

use eventyr_gateway::config::GatewayConfig;
use eventyr_gateway::session::hash_password;
use eventyr_testkit::RedisServer;
use reqwest::Client;
use serde_json::{Value, json};

mod common;
use common::{eventually, start, upstream};

/// A gateway configuration with the session endpoints, a customer route and an admin
/// route in front of `origin`; `store` is the `[sessions]` store, `extra` more TOML.
fn config(origin: &str, store: &str, extra: &str) -> GatewayConfig {
    let alice = hash_password("alice").expect("hash");
    let admin = hash_password("admin").expect("hash");
    GatewayConfig::parse(&format!(
        r#"
        {extra}

        [auth]
        issuer = "eventyr"
        roles = {{ customer = ["orders:read"], admin = ["*"] }}

        [sessions]
        store = {store}
        access_secret = "an access secret of at least 32 bytes"
        refresh_secret = "a refresh secret of at least 32 bytes"
        users = [
            {{ name = "alice", password_hash = "{alice}", roles = ["customer"], customer_id = "c-alice" }},
            {{ name = "admin", password_hash = "{admin}", roles = ["admin"] }},
        ]

        [[clusters]]
        name = "shop"
        endpoints = [{{ url = "{origin}" }}]

        [[routes]]
        name = "login"
        path = {{ exact = "/auth/login" }}
        methods = ["POST"]
        builtin = "login"

        [[routes]]
        name = "refresh"
        path = {{ exact = "/auth/refresh" }}
        methods = ["POST"]
        builtin = "refresh"

        [[routes]]
        name = "logout"
        path = {{ exact = "/auth/logout" }}
        methods = ["POST"]
        builtin = "logout"

        [[routes]]
        name = "orders"
        path = {{ prefix = "/orders" }}
        permissions = ["orders:read"]
        cluster = "shop"

        [[routes]]
        name = "admin"
        path = {{ prefix = "/admin" }}
        permissions = ["admin:read"]
        cluster = "shop"

        [[routes]]
        name = "public"
        path = {{ prefix = "/public" }}
        cluster = "shop"
        "#
    ))
    .expect("valid config")
}

fn sqlite(dir: &Path) -> String {
    format!("{{ sqlite = \"{}\" }}", dir.join("sessions.db").display())
}

async fn post(client: &Client, url: String, body: Value) -> (u16, Value) {
    let response = client.post(url).json(&body).send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn login(client: &Client, gateway: &str, user: &str) -> Value {
    let (status, pair) = post(
        client,
        format!("{gateway}/auth/login"),
        json!({ "username": user, "password": user }),
    )
    .await;
    assert_eq!(status, 200, "{pair}");
    pair
}

async fn refresh(client: &Client, gateway: &str, pair: &Value) -> (u16, Value) {
    post(
        client,
        format!("{gateway}/auth/refresh"),
        json!({ "refresh_token": pair["refresh_token"] }),
    )
    .await
}

/// GET `path` with the pair's access token: the status and the answer.
async fn get(client: &Client, gateway: &str, path: &str, pair: &Value) -> (u16, Value) {
    let token = pair["access_token"].as_str().unwrap_or_default();
    let response = client
        .get(format!("{gateway}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_log_in_rotate_detect_reuse_and_revoke() {
    let dir = tempfile::tempdir().expect("dir");
    let origin = upstream("shop").await;
    let config = config(&origin, &sqlite(dir.path()), "");
    let (gateway, _) = start(&config).await;
    let client = Client::new();

    // Wrong password, unknown user, bad bodies.
    for body in [
        json!({ "username": "alice", "password": "wrong" }),
        json!({ "username": "mallory", "password": "alice" }),
    ] {
        let (status, answer) = post(&client, format!("{gateway}/auth/login"), body).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (401, Some("invalid_credentials"))
        );
    }
    let (status, answer) = post(&client, format!("{gateway}/auth/login"), json!({})).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let huge = client
        .post(format!("{gateway}/auth/login"))
        .body("x".repeat(20_000))
        .send()
        .await
        .expect("send");
    assert_eq!(huge.status(), 413);

    // A login: the pair, never cached.
    let response = client
        .post(format!("{gateway}/auth/login"))
        .json(&json!({ "username": "alice", "password": "alice" }))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let first: Value = response.json().await.expect("json");
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["expires_in"], 900);
    let (status, seen) = get(&client, &gateway, "/orders/1", &first).await;
    assert_eq!((status, seen["x-user-id"].as_str()), (200, Some("alice")));
    // The services learn who it is, the customer id alice owns, and nothing else.
    assert_eq!(seen["x-user-roles"], "customer");
    assert_eq!(seen["x-customer-id"], "c-alice");
    assert_eq!(seen["x-eventyr-anonymous"], Value::Null);
    // A public route's request is nobody's (never the system's), whatever the client
    // claims.
    let claims: Value = client
        .get(format!("{gateway}/public/x"))
        .header("x-user-id", "admin")
        .header("x-user-roles", "admin")
        .header("x-customer-id", "c-bob")
        .header(
            "x-eventyr-credential",
            "a guessed credential of forty characters",
        )
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(claims["x-eventyr-anonymous"], "1", "{claims}");
    for name in [
        "x-user-id",
        "x-user-roles",
        "x-customer-id",
        "x-eventyr-credential",
    ] {
        assert_eq!(claims[name], Value::Null, "{name}: {claims}");
    }
    let (status, answer) = get(&client, &gateway, "/admin/sagas", &first).await;
    assert_eq!((status, answer["error"].as_str()), (403, Some("forbidden")));
    // A refresh token is no access token.
    let swapped = json!({ "access_token": first["refresh_token"] });
    assert_eq!(get(&client, &gateway, "/orders/1", &swapped).await.0, 401);

    // Rotation: each refresh spends its token.
    let (status, second) = refresh(&client, &gateway, &first).await;
    assert_eq!(status, 200, "{second}");
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    let (status, third) = refresh(&client, &gateway, &second).await;
    assert_eq!(status, 200, "{third}");
    let other = login(&client, &gateway, "alice").await;
    let admin = login(&client, &gateway, "admin").await;
    assert_eq!(get(&client, &gateway, "/orders/1", &third).await.0, 200);

    // The second token again at once (two tabs, a retry after a lost answer): within
    // the grace, the same new pair — no revocation.
    let (status, again) = refresh(&client, &gateway, &second).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, third, "the same pair");
    assert_eq!(get(&client, &gateway, "/orders/1", &third).await.0, 200);

    // The first token, spent two rotations ago: reuse. Every session of alice ends
    // at once, even the access tokens still within their 15 minutes; the admin's
    // does not.
    let (status, answer) = refresh(&client, &gateway, &first).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("token_reused"))
    );
    for pair in [&third, &other] {
        let (status, answer) = get(&client, &gateway, "/orders/1", pair).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (401, Some("invalid_token"))
        );
        assert_eq!(refresh(&client, &gateway, pair).await.0, 401);
    }
    assert_eq!(get(&client, &gateway, "/admin/sagas", &admin).await.0, 200);

    // Logout with the access token ends that session only; with a refresh token too.
    let one = login(&client, &gateway, "alice").await;
    let two = login(&client, &gateway, "alice").await;
    let response = client
        .post(format!("{gateway}/auth/logout"))
        .bearer_auth(one["access_token"].as_str().expect("token"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 204);
    assert_eq!(get(&client, &gateway, "/orders/1", &one).await.0, 401);
    assert_eq!(refresh(&client, &gateway, &one).await.0, 401);
    assert_eq!(get(&client, &gateway, "/orders/1", &two).await.0, 200);
    let (status, _) = post(
        &client,
        format!("{gateway}/auth/logout"),
        json!({ "refresh_token": two["refresh_token"], "all": true }),
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(get(&client, &gateway, "/orders/1", &two).await.0, 401);
    let (status, answer) = post(&client, format!("{gateway}/auth/logout"), json!({})).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("unauthenticated"))
    );

    // Sessions are in the store, not the process: another gateway on the same file
    // (a restart) knows the admin's session.
    let (restarted, _) = start(&config).await;
    assert_eq!(
        get(&client, &restarted, "/admin/sagas", &admin).await.0,
        200
    );
    let (status, renewed) = refresh(&client, &restarted, &admin).await;
    assert_eq!(status, 200, "{renewed}");
}

/// The sources' default limits: five attempts at the login endpoint per anonymous
/// address in five minutes; the sixth is 429 whatever the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_limits_stop_password_guessing() {
    let dir = tempfile::tempdir().expect("dir");
    let origin = upstream("shop").await;
    let config = config(&origin, &sqlite(dir.path()), "rate_limit_defaults = true");
    let names: Vec<String> = config
        .rate_limit_rules()
        .iter()
        .map(|r| r.name.clone())
        .collect();
    assert!(names.contains(&"default-auth".to_owned()), "{names:?}");
    let (gateway, _) = start(&config).await;
    let client = Client::new();
    let guess = json!({ "username": "alice", "password": "guess" });
    for _ in 0..5 {
        let (status, _) = post(&client, format!("{gateway}/auth/login"), guess.clone()).await;
        assert_eq!(status, 401);
    }
    let response = client
        .post(format!("{gateway}/auth/login"))
        .json(&json!({ "username": "alice", "password": "alice" }))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(response.headers()["x-ratelimit-limit"], "5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_in_redis_are_shared_by_gateways_and_fail_closed_without_it() {
    let mut redis = RedisServer::start().expect("redis-server starts");
    let origin = upstream("shop").await;
    let redis_section = format!("[redis]\nurl = \"{}\"", redis.url());
    let config = config(&origin, "\"redis\"", &redis_section);
    let (a, _) = start(&config).await;
    let (b, _) = start(&config).await;
    let client = Client::new();

    // Logged in at one gateway, served and rotated at the other.
    let first = login(&client, &a, "alice").await;
    assert_eq!(get(&client, &b, "/orders/1", &first).await.0, 200);
    let (status, second) = refresh(&client, &b, &first).await;
    assert_eq!(status, 200, "{second}");
    // The same refresh again at the other gateway, within the grace: the same pair.
    assert_eq!(refresh(&client, &a, &first).await, (200, second.clone()));
    let (status, third) = refresh(&client, &a, &second).await;
    assert_eq!(status, 200, "{third}");
    // Reuse of the first (two rotations ago) at the first gateway revokes everywhere.
    assert_eq!(
        refresh(&client, &a, &first).await.1["error"],
        "token_reused"
    );
    assert_eq!(get(&client, &b, "/orders/1", &third).await.0, 401);
    let third = login(&client, &b, "alice").await;
    assert_eq!(get(&client, &a, "/orders/1", &third).await.0, 200);

    // Failed logins count across the gateways: five guesses at one, and the account
    // is refused at the other too, even with its password; others go on.
    for _ in 0..5 {
        let guess = json!({ "username": "admin", "password": "guess" });
        let (status, _) = post(&client, format!("{a}/auth/login"), guess).await;
        assert_eq!(status, 401);
    }
    let right = json!({ "username": "admin", "password": "admin" });
    let (status, answer) = post(&client, format!("{b}/auth/login"), right).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (429, Some("rate_limited"))
    );
    login(&client, &b, "alice").await;

    // Redis goes away: nothing that needs a session passes unchecked.
    redis.stop();
    let (status, answer) = get(&client, &a, "/orders/1", &third).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (503, Some("session_store_unavailable"))
    );
    let (status, answer) = post(
        &client,
        format!("{b}/auth/login"),
        json!({ "username": "alice", "password": "alice" }),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (503, Some("session_store_unavailable"))
    );
    let public = client
        .get(format!("{a}/public/x"))
        .send()
        .await
        .expect("send");
    assert_eq!(public.status(), 200, "routes without sessions go on");

    // Back (empty: this Redis keeps nothing on disk): logins work again.
    redis.restart().expect("redis-server restarts");
    eventually("a login after Redis came back", async || {
        post(
            &client,
            format!("{a}/auth/login"),
            json!({ "username": "alice", "password": "alice" }),
        )
        .await
        .0 == 200
    })
    .await;
    let fourth = login(&client, &b, "alice").await;
    assert_eq!(get(&client, &a, "/orders/1", &fourth).await.0, 200);
    assert_eq!(
        get(&client, &a, "/orders/1", &third).await.0,
        401,
        "a lost session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_rate_limits_hold_across_gateways_and_follow_their_failure_policy() {
    let mut redis = RedisServer::start().expect("redis-server starts");
    let origin = upstream("shop").await;
    let algorithms = ["fixed_window", "sliding_window", "token_bucket", "gcra"];
    let mut toml = format!(
        "[redis]\nurl = \"{}\"\n\n[[clusters]]\nname = \"shop\"\nendpoints = [{{ url = \"{origin}\" }}]\n",
        redis.url()
    );
    for algorithm in algorithms {
        toml.push_str(&format!(
            "\n[[routes]]\nname = \"{algorithm}\"\npath = {{ prefix = \"/{algorithm}\" }}\ncluster = \"shop\"\n\
             [[rate_limits]]\nname = \"{algorithm}\"\nroutes = [\"{algorithm}\"]\nalgorithm = \"{algorithm}\"\n\
             limit = 5\nperiod = \"1h\"\nkey = \"global\"\nshared = true\n"
        ));
    }
    toml.push_str(
        "\n[[routes]]\nname = \"strict\"\npath = { prefix = \"/strict\" }\ncluster = \"shop\"\n\
         [[rate_limits]]\nname = \"strict\"\nroutes = [\"strict\"]\nalgorithm = \"gcra\"\n\
         limit = 1000\nperiod = \"1s\"\nkey = \"client_ip\"\nshared = true\non_backend_error = \"deny\"\n",
    );
    let config = GatewayConfig::parse(&toml).expect("valid config");
    let (a, _) = start(&config).await;
    let (b, _) = start(&config).await;
    let client = Client::new();
    let status = async |url: String| {
        client
            .get(url)
            .send()
            .await
            .expect("send")
            .status()
            .as_u16()
    };

    // Five per hour, whichever gateway counts: eight requests over both, five pass.
    for algorithm in algorithms {
        let mut allowed = 0;
        for i in 0..8 {
            let gateway = if i % 2 == 0 { &a } else { &b };
            match status(format!("{gateway}/{algorithm}/x")).await {
                200 => allowed += 1,
                429 => {}
                other => panic!("{algorithm}: {other}"),
            }
        }
        assert_eq!(allowed, 5, "{algorithm}");
    }

    // Redis goes away: a rule that fails open lets requests through, one that fails
    // closed refuses them.
    redis.stop();
    assert_eq!(status(format!("{a}/gcra/x")).await, 200, "fail open");
    let response = client
        .get(format!("{b}/strict/x"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 503);
    let answer: Value = response.json().await.expect("json");
    assert_eq!(answer["error"], "rate_limit_unavailable");

    // Back: counting again (afresh: this Redis keeps nothing).
    redis.restart().expect("redis-server restarts");
    eventually("the strict rule counting again", async || {
        status(format!("{b}/strict/x")).await == 200
    })
    .await;
    let mut limited = false;
    for _ in 0..8 {
        limited |= status(format!("{a}/fixed_window/x")).await == 429;
    }
    assert!(limited, "the limit holds again");
}
