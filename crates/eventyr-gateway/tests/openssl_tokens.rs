//! Tokens signed by an independent tool — the `openssl` command, not the library the
//! gateway verifies with — pass for HS256, RS256 and ES256, and the same tokens with
//! one byte of their payload changed do not.

use std::io::Write;
use std::process::{Command, Stdio};

use eventyr_gateway::config::GatewayConfig;
use serde_json::json;

mod common;
use common::{base64_url, start, upstream};

const SECRET: &str = "an independent secret, 32 bytes+";

/// `openssl dgst -sha256 <args> -binary` over `input`; fails loudly without openssl.
fn openssl_sha256(args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256"])
        .args(args)
        .arg("-binary")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl runs (scripts/test installs it: apt-get install -y openssl)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write");
    let output = child.wait_with_output().expect("openssl ends");
    assert!(
        output.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// An ECDSA signature as DER (`SEQUENCE { INTEGER r, INTEGER s }`) → JWS's r ‖ s.
fn der_to_raw(der: &[u8]) -> Vec<u8> {
    let mut at = 2; // SEQUENCE, length (short form for P-256)
    let mut out = Vec::new();
    for _ in 0..2 {
        assert_eq!(der[at], 0x02, "an INTEGER");
        let length = der[at + 1] as usize;
        let value = &der[at + 2..at + 2 + length];
        let value = &value[value.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0u8, 32 - value.len()));
        out.extend_from_slice(value);
        at += 2 + length;
    }
    out
}

fn signed(algorithm: &str, kid: &str, sign: impl Fn(&[u8]) -> Vec<u8>) -> (String, String) {
    let header = json!({ "alg": algorithm, "typ": "JWT", "kid": kid });
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let payload = json!({ "sub": "dana", "roles": ["reader"], "exp": exp });
    let forged_payload = json!({ "sub": "dana", "roles": ["admin"], "exp": exp });
    let head = base64_url(header.to_string());
    let input = format!("{head}.{}", base64_url(payload.to_string()));
    let signature = base64_url(sign(input.as_bytes()));
    let forged = format!(
        "{head}.{}.{signature}",
        base64_url(forged_payload.to_string())
    );
    (format!("{input}.{signature}"), forged)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_signed_by_openssl_verify_and_tampered_ones_do_not() {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
    let a = upstream("a").await;
    let config = GatewayConfig::parse(&format!(
        r#"
        [auth]
        roles = {{ reader = ["orders:read"] }}
        keys = [
            {{ kid = "hs", algorithm = "HS256", secret = "{SECRET}" }},
            {{ kid = "rs", algorithm = "RS256", public_key = """{rs}""" }},
            {{ kid = "es", algorithm = "ES256", public_key = """{es}""" }},
        ]

        [[clusters]]
        name = "a"
        endpoints = [{{ url = "{a}" }}]

        [[routes]]
        name = "orders"
        path = {{ prefix = "/orders" }}
        permissions = ["orders:read"]
        cluster = "a"
        "#,
        rs = include_str!("keys/rs256-public.pem"),
        es = include_str!("keys/es256-public.pem"),
    ))
    .expect("valid config");
    let (gateway, _) = start(&config).await;
    let status = async |token: &str| {
        reqwest::Client::new()
            .get(format!("{gateway}/orders/1"))
            .bearer_auth(token)
            .send()
            .await
            .expect("send")
            .status()
            .as_u16()
    };
    let rs_key = format!("{keys}/rs256-private.pem");
    let es_key = format!("{keys}/es256-private.pem");
    let tokens = [
        signed("HS256", "hs", |input| {
            openssl_sha256(&["-hmac", SECRET], input)
        }),
        signed("RS256", "rs", |input| {
            openssl_sha256(&["-sign", &rs_key], input)
        }),
        signed("ES256", "es", |input| {
            der_to_raw(&openssl_sha256(&["-sign", &es_key], input))
        }),
    ];
    for (token, forged) in &tokens {
        assert_eq!(status(token).await, 200, "{token}");
        assert_eq!(status(forged).await, 401, "{forged}");
    }
}
