//! Who is calling, and may they: JWT bearer tokens and API keys (authentication),
//! then roles → `resource:action` permissions per route (authorization).
//!
//! Tokens: HS256, RS256 or ES256, each key with its own algorithm — a token is only
//! ever checked with a key's configured algorithm, so `alg: none` and algorithm
//! confusion (an RS256 public key used as an HS256 secret) fail; issuer, audience,
//! expiry and not-before are checked with a small leeway. API keys are stored as
//! SHA-256 digests and compared in constant time. A presented credential that does
//! not verify is 401 `invalid_token` on any route; a route with permissions needs a
//! credential (401 `unauthenticated`, with `WWW-Authenticate: Bearer`) that grants
//! them all (403 `forbidden`). The client's own `X-User-ID` is always dropped; the
//! gateway sets it for an authenticated request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::humantime_serde_lite;

/// The `[auth]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Tokens must have this `iss`, when set.
    pub issuer: Option<String>,
    /// Tokens must have this `aud`, when set.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`. Default 30 s.
    #[serde(default = "thirty_seconds", with = "humantime_serde_lite")]
    pub leeway: Duration,
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// Key sets (JWKS) of identity providers, fetched again in the background.
    #[serde(default)]
    pub jwks: Vec<JwksConfig>,
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    /// Role → permissions (`orders:read`, `orders:*`, `*`).
    #[serde(default)]
    pub roles: BTreeMap<String, Vec<String>>,
}

fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}

/// A token-verification key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Matched against the token's `kid`, when both have one.
    pub kid: Option<String>,
    /// `HS256`, `RS256` or `ES256`.
    pub algorithm: String,
    /// HS256: the shared secret.
    pub secret: Option<String>,
    /// RS256 / ES256: the public key, PEM.
    pub public_key: Option<String>,
}

/// A JWKS: `url` (http://, fetched with the gateway's client) or `file`, read again
/// every `refresh` (default 5 min) and at once (at most once a second) when a token
/// names a key id no set has — a provider's new key is taken up without a restart.
/// Only RSA (RS256) and P-256 (ES256) keys are taken; a key's `alg`, when given, must
/// agree with its type; symmetric keys are never taken from a key set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksConfig {
    pub url: Option<String>,
    pub file: Option<std::path::PathBuf>,
    #[serde(default = "five_minutes", with = "humantime_serde_lite")]
    pub refresh: Duration,
}

fn five_minutes() -> Duration {
    Duration::from_secs(300)
}

/// An API key, stored as the hex SHA-256 of the key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub consumer: String,
    /// free, premium or enterprise. Default free.
    #[serde(default = "free")]
    pub tier: String,
    pub sha256: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// The customer id the key's consumer owns, if any.
    #[serde(default)]
    pub customer_id: Option<String>,
}

fn free() -> String {
    "free".to_owned()
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`, or the API key's consumer.
    pub user_id: String,
    pub roles: Vec<String>,
    pub tier: String,
    /// `jwt` or `api_key`.
    pub method: &'static str,
    /// The gateway's own session the token belongs to (`/auth/login`), which must
    /// still live.
    pub session: Option<String>,
    /// The customer id the caller owns (a session user's `customer_id`, a token's
    /// `customer_id` claim, an API key's), forwarded to the services.
    pub customer_id: Option<String>,
    /// When the credential ends (a token's `exp`, Unix seconds); an answer that
    /// streams on (server-sent events) ends with it.
    pub expires: Option<u64>,
    /// The identity headers for the upstream, made once (a verified token's identity
    /// is kept: no request builds them again).
    pub forwarded: Vec<(&'static str, http::HeaderValue)>,
}

impl Identity {
    /// The identity with its upstream headers made.
    fn forwarding(mut self) -> Self {
        use eventyr_telemetry::identity as names;
        let mut forwarded = Vec::with_capacity(3);
        let mut put = |name: &'static str, value: &str| {
            if let Ok(value) = http::HeaderValue::from_str(value) {
                forwarded.push((name, value));
            }
        };
        put(names::X_USER_ID, &self.user_id);
        put(names::X_USER_ROLES, &self.roles.join(","));
        if let Some(customer) = &self.customer_id {
            put(names::X_CUSTOMER_ID, customer);
        }
        self.forwarded = forwarded;
        self
    }
}

/// Why a credential was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    tier: Option<String>,
    #[serde(default)]
    sid: Option<String>,
    #[serde(default)]
    customer_id: Option<String>,
    exp: u64,
}

struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
    /// The key of the gateway's own sessions: its tokens name a session.
    session: bool,
}

/// The keys of one JWKS, as last fetched.
pub struct JwksKeys {
    pub config: JwksConfig,
    keys: std::sync::RwLock<Arc<Vec<Key>>>,
    /// Bumped by each install (tokens verified with older keys are checked again).
    version: std::sync::atomic::AtomicU64,
}

impl JwksKeys {
    /// Puts a fetched key set in force; the kids it holds.
    pub fn install(&self, set: &jsonwebtoken::jwk::JwkSet) -> Vec<String> {
        let keys = keys_of(set);
        let kids = keys.iter().filter_map(|k| k.kid.clone()).collect();
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        kids
    }

    fn current(&self) -> Arc<Vec<Key>> {
        Arc::clone(
            &self
                .keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// The usable keys of a set: RSA as RS256, P-256 as ES256, each only if its `alg` (if
/// any) agrees.
fn keys_of(set: &jsonwebtoken::jwk::JwkSet) -> Vec<Key> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, KeyAlgorithm};
    set.keys
        .iter()
        .filter_map(|jwk| {
            let algorithm = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                _ => return None,
            };
            let stated = jwk.common.key_algorithm;
            let agrees = match stated {
                None => true,
                Some(KeyAlgorithm::RS256) => algorithm == Algorithm::RS256,
                Some(KeyAlgorithm::ES256) => algorithm == Algorithm::ES256,
                Some(_) => false,
            };
            let key = DecodingKey::from_jwk(jwk).ok()?;
            agrees.then(|| Key {
                kid: jwk.common.key_id.clone(),
                algorithm,
                key,
                session: false,
            })
        })
        .collect()
}

/// The verifier of one configuration.
pub struct Authenticator {
    keys: Vec<Key>,
    jwks: Vec<JwksKeys>,
    /// Rings when a token names a key id no key has (the JWKS may have rotated).
    unknown_kid: tokio::sync::Notify,
    /// Tokens verified lately: the same token again costs a lookup, not a signature
    /// check and a JSON parse. An entry holds until the token expires or the key sets
    /// change.
    verified: std::sync::Mutex<lru::LruCache<String, Verified>>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
    api_keys: Vec<([u8; 32], ApiKeyConfig)>,
    roles: BTreeMap<String, Vec<String>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("keys", &self.keys.len())
            .field("api_keys", &self.api_keys.len())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Errors: a key that cannot be used, with its place (`auth.keys[0]: ...`). With
    /// `sessions`, the tokens of its logins verify too.
    pub fn new(
        config: &AuthConfig,
        sessions: Option<&crate::session::SessionsConfig>,
    ) -> Result<Self, String> {
        let mut keys = Vec::new();
        if let Some(sessions) = sessions {
            keys.push(Key {
                kid: Some(crate::session::SESSION_KID.to_owned()),
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(sessions.access_secret.as_bytes()),
                session: true,
            });
        }
        for (i, key) in config.keys.iter().enumerate() {
            let at = format!("auth.keys[{i}]");
            let (algorithm, decoding) = match (key.algorithm.as_str(), &key.secret, &key.public_key)
            {
                ("HS256", Some(secret), None) if secret.len() >= 32 => (
                    Algorithm::HS256,
                    DecodingKey::from_secret(secret.as_bytes()),
                ),
                ("HS256", Some(_), None) => {
                    return Err(format!("{at}.secret: at least 32 bytes"));
                }
                ("RS256", None, Some(pem)) => (
                    Algorithm::RS256,
                    DecodingKey::from_rsa_pem(pem.as_bytes())
                        .map_err(|e| format!("{at}.public_key: {e}"))?,
                ),
                ("ES256", None, Some(pem)) => (
                    Algorithm::ES256,
                    DecodingKey::from_ec_pem(pem.as_bytes())
                        .map_err(|e| format!("{at}.public_key: {e}"))?,
                ),
                ("HS256" | "RS256" | "ES256", _, _) => {
                    return Err(format!(
                        "{at}: HS256 takes a secret, RS256 and ES256 a public_key"
                    ));
                }
                (other, _, _) => {
                    return Err(format!(
                        "{at}.algorithm: HS256, RS256 or ES256, not {other}"
                    ));
                }
            };
            keys.push(Key {
                kid: key.kid.clone(),
                algorithm,
                key: decoding,
                session: false,
            });
        }
        let mut jwks = Vec::new();
        for (i, source) in config.jwks.iter().enumerate() {
            let at = format!("auth.jwks[{i}]");
            match (&source.url, &source.file) {
                (Some(url), None) if crate::config::parse_url(url).is_none() => {
                    return Err(format!("{at}.url: http://host:port/path"));
                }
                (Some(_), None) | (None, Some(_)) => {}
                _ => return Err(format!("{at}: a url or a file, one of them")),
            }
            if source.refresh < Duration::from_secs(1) {
                return Err(format!("{at}.refresh: at least 1s"));
            }
            let keys = JwksKeys {
                config: source.clone(),
                keys: std::sync::RwLock::new(Arc::new(Vec::new())),
                version: std::sync::atomic::AtomicU64::new(0),
            };
            // A file is read now: a missing or broken one is a configuration error.
            if let Some(file) = &source.file {
                let set = read_jwks(file).map_err(|e| format!("{at}.file: {e}"))?;
                keys.install(&set);
            }
            jwks.push(keys);
        }
        let mut api_keys = Vec::new();
        for (i, api_key) in config.api_keys.iter().enumerate() {
            let digest = hex32(&api_key.sha256)
                .ok_or_else(|| format!("auth.api_keys[{i}].sha256: 64 hex digits"))?;
            api_keys.push((digest, api_key.clone()));
        }
        Ok(Self {
            keys,
            jwks,
            unknown_kid: tokio::sync::Notify::new(),
            verified: std::sync::Mutex::new(lru::LruCache::new(VERIFIED_TOKENS)),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway: config.leeway,
            api_keys,
            roles: config.roles.clone(),
        })
    }

    /// The identity of a bearer token.
    pub fn verify_token(&self, token: &str) -> Result<Arc<Identity>, Refused> {
        let now = unix_now();
        let keys_version = self.keys_version();
        {
            let mut verified = self
                .verified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(hit) = verified.get(token) {
                if hit.keys_version == keys_version && now < hit.expires {
                    return Ok(Arc::clone(&hit.identity));
                }
                verified.pop(token);
            }
        }
        let (identity, exp) = self.verify_signed(token)?;
        let identity = Arc::new(identity);
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .put(
                token.to_owned(),
                Verified {
                    identity: Arc::clone(&identity),
                    expires: exp.saturating_add(self.leeway.as_secs()),
                    keys_version,
                },
            );
        Ok(identity)
    }

    fn keys_version(&self) -> u64 {
        self.jwks
            .iter()
            .map(|k| k.version.load(std::sync::atomic::Ordering::Acquire))
            .sum()
    }

    /// Checks a token's signature and claims; its identity and `exp`.
    fn verify_signed(&self, token: &str) -> Result<(Identity, u64), Refused> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Refused(format!("malformed token: {e}")))?;
        let fetched: Vec<Arc<Vec<Key>>> = self.jwks.iter().map(JwksKeys::current).collect();
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .chain(fetched.iter().flat_map(|keys| keys.iter()))
            .filter(|k| match (&k.kid, &header.kid) {
                (Some(ours), Some(theirs)) => ours == theirs,
                // The session key only takes the tokens it issued (they name it).
                _ => !k.session,
            })
            .collect();
        if !self.jwks.is_empty()
            && header.kid.is_some()
            && !candidates.iter().any(|k| k.kid == header.kid)
        {
            self.unknown_kid.notify_one();
        }
        let mut last = Refused("no key verifies this token".to_owned());
        for key in candidates {
            // The key's own algorithm, whatever the token says.
            let mut validation = Validation::new(key.algorithm);
            validation.leeway = self.leeway.as_secs();
            validation.validate_nbf = true;
            // A configured issuer or audience is required: a token without the claim
            // is refused like one with another value.
            let mut required = vec!["exp", "sub"];
            match &self.issuer {
                Some(issuer) => {
                    validation.set_issuer(&[issuer]);
                    required.push("iss");
                }
                None => validation.iss = None,
            }
            match &self.audience {
                Some(audience) => {
                    validation.set_audience(&[audience]);
                    required.push("aud");
                }
                None => validation.validate_aud = false,
            }
            validation.set_required_spec_claims(&required);
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    let claims = data.claims;
                    if key.session && claims.sid.is_none() {
                        return Err(Refused("a session token without its session".to_owned()));
                    }
                    return Ok((
                        Identity {
                            user_id: claims.sub,
                            roles: claims.roles,
                            tier: claims.tier.unwrap_or_else(free),
                            method: "jwt",
                            session: claims.sid.filter(|_| key.session),
                            customer_id: claims.customer_id,
                            expires: Some(claims.exp),
                            forwarded: Vec::new(),
                        }
                        .forwarding(),
                        claims.exp,
                    ));
                }
                Err(e) => last = Refused(e.to_string()),
            }
        }
        Err(last)
    }

    /// The JWKS sources, for the refresher.
    pub fn jwks(&self) -> &[JwksKeys] {
        &self.jwks
    }

    /// Completes when a token named a key id none of the keys has.
    pub async fn unknown_kid(&self) {
        self.unknown_kid.notified().await;
    }

    /// The identity of an API key.
    pub fn verify_api_key(&self, key: &str) -> Result<Arc<Identity>, Refused> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // Every stored key is compared, in constant time: no early exit to time.
        let mut found = None;
        for (stored, config) in &self.api_keys {
            if constant_time_eq(stored, &digest) {
                found = Some(config);
            }
        }
        let config = found.ok_or_else(|| Refused("unknown API key".to_owned()))?;
        Ok(Arc::new(
            Identity {
                user_id: config.consumer.clone(),
                roles: config.roles.clone(),
                tier: config.tier.clone(),
                method: "api_key",
                session: None,
                customer_id: config.customer_id.clone(),
                expires: None,
                forwarded: Vec::new(),
            }
            .forwarding(),
        ))
    }

    /// Whether `identity`'s roles grant `permission` (`orders:read`; a role may hold
    /// `orders:*` or `*`).
    pub fn grants(&self, identity: &Identity, permission: &str) -> bool {
        let resource = permission.split(':').next().unwrap_or_default();
        identity
            .roles
            .iter()
            .filter_map(|role| self.roles.get(role))
            .flatten()
            .any(|held| {
                held == "*"
                    || held == permission
                    || held.strip_suffix(":*").is_some_and(|r| r == resource)
            })
    }
}

pub use crate::session::security_event;

/// Verified tokens kept at most.
const VERIFIED_TOKENS: std::num::NonZeroUsize = std::num::NonZeroUsize::MIN.saturating_add(9_999);

struct Verified {
    identity: Arc<Identity>,
    /// Unix seconds after which the token is checked again (and refused).
    expires: u64,
    keys_version: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads a JWKS file.
pub fn read_jwks(file: &std::path::Path) -> Result<jsonwebtoken::jwk::JwkSet, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not a JWKS: {e}", file.display()))
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The identity the authentication layer found, for the layers after it.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Arc<Identity>);

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a test secret of at least 32 bytes!!";

    fn token(exp: u64) -> String {
        let claims = serde_json::json!({ "sub": "carol", "roles": ["reader"], "exp": exp });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("sign")
    }

    /// A verified token is answered from the cache until it expires, then refused
    /// like any expired token; a forged one never enters the cache.
    #[test]
    fn verified_tokens_are_kept_only_until_they_expire() {
        let config: AuthConfig = toml::from_str(&format!(
            "leeway = \"0s\"\nkeys = [{{ algorithm = \"HS256\", secret = \"{SECRET}\" }}]"
        ))
        .expect("config");
        let auth = Authenticator::new(&config, None).expect("authenticator");
        let soon = token(unix_now() + 1);
        let first = auth.verify_token(&soon).expect("valid");
        let again = auth.verify_token(&soon).expect("valid, from the cache");
        assert!(Arc::ptr_eq(&first, &again), "the cached identity");
        let mut forged = soon.clone().into_bytes();
        let i = forged.len() - 10;
        forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).expect("ascii");
        assert!(auth.verify_token(&forged).is_err());
        assert!(auth.verify_token(&forged).is_err(), "not cached either");
        // Waiting for the clock: the token's own expiry is what is tested.
        std::thread::sleep(Duration::from_millis(2_100));
        assert!(auth.verify_token(&soon).is_err(), "expired");
    }
}
