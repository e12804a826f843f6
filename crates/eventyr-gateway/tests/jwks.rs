//! JWKS: key sets fetched from a real HTTP server on 127.0.0.1 (and read from a
//! file), refreshed in the background and at once when a token names an unknown key
//! id; symmetric keys and keys whose `alg` disagrees with their type are never taken
//! from a set. Tokens are signed by `jsonwebtoken` with the test keys in `keys/`.

use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use eventyr_gateway::config::GatewayConfig;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

mod common;
use common::{base64_url, eventually, origin, start_gateway, upstream};

fn jwk(algorithm: Algorithm, key: &EncodingKey, kid: &str) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(key, algorithm).expect("a JWK");
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

fn signed(algorithm: Algorithm, key: &EncodingKey, kid: &str) -> String {
    let mut header = Header::new(algorithm);
    header.kid = Some(kid.to_owned());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let claims = json!({ "sub": "carol", "roles": ["reader"], "exp": exp });
    jsonwebtoken::encode(&header, &claims, key).expect("sign")
}

fn config(upstream: &str, jwks: &str) -> GatewayConfig {
    GatewayConfig::parse(&format!(
        r#"
        # The test polls with tokens the gateway cannot verify yet, far faster than
        # any client: the limit on refused credentials per address would stop it.
        [limits]
        refused_credentials_max = 100000

        [auth]
        roles = {{ reader = ["orders:read"] }}
        jwks = [{jwks}]

        [[clusters]]
        name = "a"
        endpoints = [{{ url = "{upstream}" }}]

        [[routes]]
        name = "orders"
        path = {{ prefix = "/orders" }}
        permissions = ["orders:read"]
        cluster = "a"
        "#
    ))
    .expect("valid config")
}

async fn status(gateway: &str, token: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{gateway}/orders/1"))
        .bearer_auth(token)
        .send()
        .await
        .expect("send")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_sets_are_fetched_refreshed_and_taken_up_when_a_key_is_new() {
    let rs = EncodingKey::from_rsa_pem(include_bytes!("keys/rs256-private.pem")).expect("key");
    let es = EncodingKey::from_ec_pem(include_bytes!("keys/es256-private.pem")).expect("key");
    let published = Arc::new(RwLock::new(JwkSet {
        keys: vec![jwk(Algorithm::RS256, &rs, "rsa-1")],
    }));
    async fn serve_set(State(set): State<Arc<RwLock<JwkSet>>>) -> axum::Json<Value> {
        let set = set.read().expect("lock").clone();
        axum::Json(serde_json::to_value(set).expect("json"))
    }
    let provider = origin(
        Router::new()
            .route("/jwks.json", get(serve_set))
            .with_state(Arc::clone(&published)),
    )
    .await;
    let a = upstream("a").await;
    let (gateway, _) = start_gateway(
        &config(
            &a,
            &format!("{{ url = \"{provider}/jwks.json\", refresh = \"1h\" }}"),
        ),
        None,
    )
    .await;

    // Fetched at start.
    let rsa_token = signed(Algorithm::RS256, &rs, "rsa-1");
    eventually("the first fetch", async || {
        status(&gateway, &rsa_token).await == 200
    })
    .await;

    // The provider rotates in a new key: a token naming it makes the gateway fetch the
    // set again at once, long before the hour is up.
    let es_token = signed(Algorithm::ES256, &es, "ec-2");
    assert_eq!(status(&gateway, &es_token).await, 401, "not published yet");
    published
        .write()
        .expect("lock")
        .keys
        .push(jwk(Algorithm::ES256, &es, "ec-2"));
    eventually("the new key taken up", async || {
        status(&gateway, &es_token).await == 200
    })
    .await;

    // A symmetric key in a set is never taken (else anyone who reads the set could
    // sign), nor a key whose alg disagrees with its type.
    let secret = "a symmetric secret of at least 32 bytes";
    let mut set = published.read().expect("lock").clone();
    let mut oct: Jwk = serde_json::from_value(json!({
        "kty": "oct",
        "k": base64_url(secret),
        "alg": "HS256",
    }))
    .expect("an oct JWK");
    oct.common.key_id = Some("sym".to_owned());
    let mut lying = jwk(Algorithm::RS256, &rs, "lying");
    lying.common.key_algorithm = Some(jsonwebtoken::jwk::KeyAlgorithm::ES256);
    // With them, a good new key: once it verifies, the whole set is in force.
    set.keys
        .extend([oct, lying, jwk(Algorithm::RS256, &rs, "rsa-3")]);
    *published.write().expect("lock") = set;
    let marker = signed(Algorithm::RS256, &rs, "rsa-3");
    eventually("the third set taken up", async || {
        status(&gateway, &marker).await == 200
    })
    .await;
    let hs_token = signed(
        Algorithm::HS256,
        &EncodingKey::from_secret(secret.as_bytes()),
        "sym",
    );
    assert_eq!(status(&gateway, &hs_token).await, 401, "no symmetric key");
    let lying_token = signed(Algorithm::RS256, &rs, "lying");
    assert_eq!(
        status(&gateway, &lying_token).await,
        401,
        "no disagreeing key"
    );
    assert_eq!(
        status(&gateway, &rsa_token).await,
        200,
        "the good keys stay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_set_file_is_read_at_start_and_a_broken_one_refused() {
    let rs = EncodingKey::from_rsa_pem(include_bytes!("keys/rs256-private.pem")).expect("key");
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("jwks.json");
    let set = JwkSet {
        keys: vec![jwk(Algorithm::RS256, &rs, "file-1")],
    };
    std::fs::write(&file, serde_json::to_vec(&set).expect("json")).expect("write");
    let a = upstream("a").await;
    let (gateway, _) = start_gateway(
        &config(&a, &format!("{{ file = \"{}\" }}", file.display())),
        None,
    )
    .await;
    assert_eq!(
        status(&gateway, &signed(Algorithm::RS256, &rs, "file-1")).await,
        200
    );

    std::fs::write(&file, "{ not json").expect("write");
    let refused = GatewayConfig::parse(&format!(
        "[auth]\njwks = [{{ file = \"{}\" }}]",
        file.display()
    ))
    .expect_err("a broken key set");
    assert_eq!(refused.key, "auth.jwks[0].file", "{refused}");
}
