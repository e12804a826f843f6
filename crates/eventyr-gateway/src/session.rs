//! Sessions: `POST /auth/login`, `/auth/refresh` and `/auth/logout`, served by the
//! gateway itself (routes with `builtin = "login" | "refresh" | "logout"`).
//!
//! - Login checks a configured user's password (argon2 PHC hashes; an unknown user
//!   costs the same hash as a known one) and opens a session: an access token (HS256,
//!   15 min by default, `sid` naming the session) and a refresh token (HS256 with a
//!   key of its own, 7 days by default, naming the session and its current refresh
//!   id).
//! - Refresh rotates: the presented refresh id must be the session's current one; it
//!   is replaced atomically (compare and set) and a new pair issued. An old refresh
//!   token presented again means it was stolen (or the client is confused): every
//!   session of that user is revoked, and the event is logged and counted.
//! - Logout revokes the session (`{"all": true}`: all of the user's sessions).
//! - Every request with a session's access token is let through only while its session
//!   lives (server-side revocation), see [`Sessions::is_active`].
//!
//! A session's refresh ids form its token family (Auth0's rotation); the family lives
//! as long as the session, renewed by each refresh. Sessions are kept in SQLite (one
//! gateway: embedded mode) or Redis (several gateways: distributed mode).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use eventyr_telemetry::names;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use http::{HeaderValue, Response, StatusCode};

use crate::auth::Identity;
use crate::config::{Builtin, humantime_serde_lite};
use crate::proxy::{Body, error};
use crate::session_store::{RedisSessions, SqliteSessions};
use crate::shared::SharedRedis;

/// The `[sessions]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsConfig {
    /// Where sessions are kept: `{ sqlite = "sessions.db" }` (one gateway) or
    /// `"redis"` (the `[redis]` server, shared by several gateways).
    pub store: StoreConfig,
    /// Signs access tokens (HS256, at least 32 bytes). Verified like any `[auth]` key.
    pub access_secret: String,
    /// Signs refresh tokens (HS256, at least 32 bytes, not the access secret).
    pub refresh_secret: String,
    /// Default 15 min.
    #[serde(default = "fifteen_minutes", with = "humantime_serde_lite")]
    pub access_ttl: Duration,
    /// How long a session lives after its last login or refresh. Default 7 days.
    #[serde(default = "seven_days", with = "humantime_serde_lite")]
    pub refresh_ttl: Duration,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// How long after a rotation the refresh token it replaced still gets the same
    /// new pair (two tabs, a retried request after a lost answer) instead of counting
    /// as stolen. Default 10 s; at most 1 min.
    #[serde(default = "ten_seconds", with = "humantime_serde_lite")]
    pub refresh_grace: Duration,
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}

fn fifteen_minutes() -> Duration {
    Duration::from_secs(15 * 60)
}
fn seven_days() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

/// Where sessions are kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreConfig {
    /// A SQLite file (relative paths: from the gateway's working directory).
    Sqlite(PathBuf),
    /// The `[redis]` server.
    #[serde(untagged)]
    Named(StoreName),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreName {
    Redis,
}

/// A user who may log in.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// An argon2 PHC string (`eventyr gateway hash-password` makes one).
    pub password_hash: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// free, premium or enterprise. Default free.
    #[serde(default = "free")]
    pub tier: String,
    /// The customer id the user owns (their orders, points, payments...), forwarded
    /// to the services as `X-Customer-ID`. None: the user owns no customer's data.
    #[serde(default)]
    pub customer_id: Option<String>,
}

fn free() -> String {
    "free".to_owned()
}

/// A new token pair, as `/auth/login` and `/auth/refresh` answer it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
}

/// Why a session operation failed; each has its HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("unknown user or wrong password")]
    InvalidCredentials,
    #[error("{0}")]
    InvalidToken(String),
    #[error("this refresh token was already used: every session of its user is revoked")]
    Reused,
    #[error("the session store cannot be reached: {0}")]
    Unavailable(String),
    /// Too many failed logins of this account lately: refused, whatever the password.
    #[error("too many failed logins for this account; try again in {} s", .0.as_secs().max(1))]
    LockedOut(Duration),
}

/// Failed logins an account may have within [`LOGIN_FAILURE_WINDOW`] (the sources'
/// policy); then its logins are refused until the window ends.
pub const LOGIN_FAILURES_MAX: u32 = 5;
/// The window of [`LOGIN_FAILURES_MAX`].
pub const LOGIN_FAILURE_WINDOW: Duration = Duration::from_secs(5 * 60);

/// The kid of tokens the gateway issues itself.
pub const SESSION_KID: &str = "eventyr-session";

/// Checks `[sessions]`; errors name the key.
pub fn check(config: &SessionsConfig, has_redis: bool) -> Result<(), (String, String)> {
    let err = |key: &str, message: &str| Err((format!("sessions.{key}"), message.to_owned()));
    if config.access_secret.len() < 32 {
        return err("access_secret", "at least 32 bytes");
    }
    if config.refresh_secret.len() < 32 {
        return err("refresh_secret", "at least 32 bytes");
    }
    if config.refresh_secret == config.access_secret {
        return err("refresh_secret", "a key of its own, not the access secret");
    }
    if config.access_ttl < Duration::from_secs(1) || config.refresh_ttl <= config.access_ttl {
        return err(
            "refresh_ttl",
            "access_ttl is at least 1s and refresh_ttl longer",
        );
    }
    if config.refresh_grace > Duration::from_secs(60) {
        return err("refresh_grace", "at most 1m");
    }
    if matches!(config.store, StoreConfig::Named(StoreName::Redis)) && !has_redis {
        return err("store", "\"redis\" needs a [redis] section");
    }
    let mut names = std::collections::HashSet::new();
    for (i, user) in config.users.iter().enumerate() {
        if user.name.is_empty() || !names.insert(user.name.as_str()) {
            return err(&format!("users[{i}].name"), "non-empty and unique");
        }
        if PasswordHash::new(&user.password_hash).is_err() {
            return err(
                &format!("users[{i}].password_hash"),
                "an argon2 PHC string ($argon2id$v=19$...)",
            );
        }
    }
    Ok(())
}

/// An argon2id PHC string of `password` (OWASP's parameters: 19 MiB, 2 passes).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::PasswordHasher;
    use argon2::password_hash::{SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[derive(Debug, Serialize, Deserialize)]
struct AccessClaims {
    sub: String,
    roles: Vec<String>,
    tier: String,
    sid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    customer_id: Option<String>,
    iss: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    iat: u64,
    exp: u64,
    jti: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct RefreshClaims {
    sub: String,
    sid: String,
    /// The refresh id: the session's current one, or a stolen old one.
    rid: String,
    typ: String,
    iss: String,
    iat: u64,
    exp: u64,
}

/// One session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub id: String,
    pub user: String,
    pub refresh_id: String,
    pub expires: SystemTime,
}

/// What a rotation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    Rotated,
    /// The presented refresh id is the one the session's last rotation replaced
    /// (two tabs, a retry after a lost answer): its current id and when (Unix
    /// seconds) it was issued.
    Replayed {
        current: String,
        rotated_at: u64,
    },
    /// The session lives but its current refresh id is another: reuse.
    Mismatch,
    /// No such session (expired, logged out or revoked).
    Gone,
}

/// Where sessions live.
#[async_trait::async_trait]
pub trait SessionStore: Send + Sync {
    async fn create(&self, session: &StoredSession) -> Result<(), SessionError>;
    /// Whether the session lives.
    async fn is_active(&self, id: &str) -> Result<bool, SessionError>;
    /// Replaces the refresh id `expected` by `next` (issued at `now`, Unix seconds)
    /// and extends the session to `expires`, atomically; keeps the replaced id and
    /// `now` to recognize a replay of it.
    async fn rotate(
        &self,
        id: &str,
        expected: &str,
        next: &str,
        expires: SystemTime,
        now: u64,
    ) -> Result<Rotation, SessionError>;
    async fn revoke(&self, id: &str) -> Result<(), SessionError>;
    /// Revokes every session of `user`; how many there were.
    async fn revoke_user(&self, user: &str) -> Result<u64, SessionError>;
}

/// The session service of one configuration.
pub struct Sessions {
    store: Arc<dyn SessionStore>,
    users: HashMap<String, UserConfig>,
    access_key: EncodingKey,
    refresh_encoding: EncodingKey,
    refresh_decoding: DecodingKey,
    access_ttl: Duration,
    refresh_ttl: Duration,
    refresh_grace: Duration,
    issuer: String,
    audience: Option<String>,
    /// Checked when the user is unknown, so that both cost the same.
    decoy_hash: String,
    /// Failed logins per account (shared in Redis with the sessions).
    login_failures: crate::lockout::FailureLimit,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

/// The issuer sessions' tokens carry when `[auth]` names none.
pub const DEFAULT_ISSUER: &str = "eventyr-gateway";

impl Sessions {
    /// Errors: the store cannot be opened.
    pub fn new(
        config: &SessionsConfig,
        issuer: Option<&str>,
        audience: Option<&str>,
        redis: Option<&SharedRedis>,
    ) -> Result<Self, String> {
        use crate::lockout::FailureLimit;
        let (window, max) = (LOGIN_FAILURE_WINDOW, LOGIN_FAILURES_MAX);
        let (store, login_failures): (Arc<dyn SessionStore>, _) = match (&config.store, redis) {
            (StoreConfig::Sqlite(path), _) => (
                Arc::new(SqliteSessions::open(path)?),
                FailureLimit::local("login", max, window),
            ),
            (StoreConfig::Named(StoreName::Redis), Some(redis)) => (
                Arc::new(RedisSessions::new(redis.clone())),
                FailureLimit::shared("login", max, window, redis.clone()),
            ),
            (StoreConfig::Named(StoreName::Redis), None) => {
                return Err("sessions.store: \"redis\" needs a [redis] section".to_owned());
            }
        };
        Ok(Self {
            store,
            users: config
                .users
                .iter()
                .map(|u| (u.name.clone(), u.clone()))
                .collect(),
            access_key: EncodingKey::from_secret(config.access_secret.as_bytes()),
            refresh_encoding: EncodingKey::from_secret(config.refresh_secret.as_bytes()),
            refresh_decoding: DecodingKey::from_secret(config.refresh_secret.as_bytes()),
            access_ttl: config.access_ttl,
            refresh_ttl: config.refresh_ttl,
            refresh_grace: config.refresh_grace,
            issuer: issuer.unwrap_or(DEFAULT_ISSUER).to_owned(),
            audience: audience.map(str::to_owned),
            decoy_hash: config
                .users
                .first()
                .map(|u| u.password_hash.clone())
                .unwrap_or_else(|| hash_password("decoy").unwrap_or_default()),
            login_failures,
        })
    }

    /// Checks the password and opens a session. An account with
    /// [`LOGIN_FAILURES_MAX`] failures in the window is refused at once (429), for
    /// that account only.
    pub async fn login(&self, username: &str, password: &str) -> Result<TokenPair, SessionError> {
        self.login_from(username, password, None).await
    }

    /// [`Self::login`] by a client at `client` (named in the security events).
    pub async fn login_from(
        &self,
        username: &str,
        password: &str,
        client: Option<std::net::IpAddr>,
    ) -> Result<TokenPair, SessionError> {
        let who = match client {
            Some(client) => format!("{username} from {client}"),
            None => username.to_owned(),
        };
        if let Some(left) = self.login_failures.blocked(username).await {
            security_event("login_locked_out", &who);
            return Err(SessionError::LockedOut(left));
        }
        let user = self.users.get(username).cloned();
        let hash = user
            .as_ref()
            .map_or_else(|| self.decoy_hash.clone(), |u| u.password_hash.clone());
        let password = password.to_owned();
        // About 30 ms of CPU: off the request threads.
        let verified = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash).is_ok_and(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false);
        let user = match user {
            Some(user) if verified => user,
            _ => {
                security_event("failed_login", &who);
                if self.login_failures.fail(username).await {
                    security_event("lockout", &who);
                }
                return Err(SessionError::InvalidCredentials);
            }
        };
        let session = StoredSession {
            id: random_id(),
            user: user.name.clone(),
            refresh_id: random_id(),
            expires: SystemTime::now() + self.refresh_ttl,
        };
        self.store.create(&session).await?;
        self.issue(
            &user,
            &session.id,
            &session.refresh_id,
            unix(SystemTime::now()),
        )
    }

    /// Rotates a refresh token into a new pair.
    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, SessionError> {
        let claims = self.verify_refresh(refresh_token)?;
        let Some(user) = self.users.get(&claims.sub) else {
            // The user was removed from the configuration: its sessions end.
            self.store.revoke_user(&claims.sub).await?;
            return Err(SessionError::InvalidToken("no such user".to_owned()));
        };
        let next = random_id();
        let expires = SystemTime::now() + self.refresh_ttl;
        let now = unix(SystemTime::now());
        match self
            .store
            .rotate(&claims.sid, &claims.rid, &next, expires, now)
            .await?
        {
            Rotation::Rotated => self.issue(user, &claims.sid, &next, now),
            // The same rotation asked again within the grace: the same pair (tokens
            // are a function of the refresh id and the time they were issued).
            Rotation::Replayed {
                current,
                rotated_at,
            } if now.saturating_sub(rotated_at) <= self.refresh_grace.as_secs() => {
                self.issue(user, &claims.sid, &current, rotated_at)
            }
            Rotation::Gone => Err(SessionError::InvalidToken(
                "the session has ended (logged out, revoked or expired)".to_owned(),
            )),
            Rotation::Mismatch | Rotation::Replayed { .. } => {
                let revoked = self.store.revoke_user(&claims.sub).await?;
                security_event(
                    "token_reuse",
                    &format!(
                        "user {} session {}: {revoked} sessions revoked",
                        claims.sub, claims.sid
                    ),
                );
                Err(SessionError::Reused)
            }
        }
    }

    /// Ends the session `sid` (of `user`), or every session of `user`.
    pub async fn logout(&self, user: &str, sid: &str, all: bool) -> Result<(), SessionError> {
        if all {
            self.store.revoke_user(user).await.map(drop)
        } else {
            self.store.revoke(sid).await
        }
    }

    /// The session a refresh token names (for a logout by refresh token).
    pub fn refresh_session(&self, refresh_token: &str) -> Result<(String, String), SessionError> {
        self.verify_refresh(refresh_token).map(|c| (c.sub, c.sid))
    }

    /// Where sessions live (to watch one that an answer streams for).
    pub fn store(&self) -> Arc<dyn SessionStore> {
        Arc::clone(&self.store)
    }

    /// Whether the session lives (checked on every request with one of its tokens).
    pub async fn is_active(&self, sid: &str) -> Result<bool, SessionError> {
        self.store.is_active(sid).await
    }

    fn verify_refresh(&self, token: &str) -> Result<RefreshClaims, SessionError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        validation.set_issuer(&[&self.issuer]);
        validation.validate_aud = false;
        let claims =
            jsonwebtoken::decode::<RefreshClaims>(token, &self.refresh_decoding, &validation)
                .map_err(|e| SessionError::InvalidToken(format!("refresh token: {e}")))?
                .claims;
        if claims.typ != "refresh" {
            return Err(SessionError::InvalidToken("not a refresh token".to_owned()));
        }
        Ok(claims)
    }

    /// The pair of refresh id `rid`, issued at `now` (Unix seconds): the same
    /// arguments give the same tokens.
    fn issue(
        &self,
        user: &UserConfig,
        sid: &str,
        rid: &str,
        now: u64,
    ) -> Result<TokenPair, SessionError> {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(SESSION_KID.to_owned());
        let access = AccessClaims {
            sub: user.name.clone(),
            roles: user.roles.clone(),
            tier: user.tier.clone(),
            sid: sid.to_owned(),
            customer_id: user.customer_id.clone(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            exp: now + self.access_ttl.as_secs(),
            jti: token_id(rid),
        };
        let refresh = RefreshClaims {
            sub: user.name.clone(),
            sid: sid.to_owned(),
            rid: rid.to_owned(),
            typ: "refresh".to_owned(),
            iss: self.issuer.clone(),
            iat: now,
            exp: now + self.refresh_ttl.as_secs(),
        };
        let failed = |e: jsonwebtoken::errors::Error| SessionError::Unavailable(e.to_string());
        Ok(TokenPair {
            access_token: jsonwebtoken::encode(&header, &access, &self.access_key)
                .map_err(failed)?,
            refresh_token: jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &refresh,
                &self.refresh_encoding,
            )
            .map_err(failed)?,
            token_type: "Bearer",
            expires_in: self.access_ttl.as_secs(),
        })
    }
}

/// Counts and logs a security event (failed login, token reuse, forbidden, ...).
pub fn security_event(reason: &'static str, detail: &str) {
    metrics::counter!(names::GATEWAY_AUTH_FAILURES_TOTAL, names::LABEL_REASON => reason)
        .increment(1);
    tracing::warn!(target: "eventyr_gateway::security", reason, detail, "security event");
}

/// An access token's id, from its refresh id (unguessable, and the same for a replay).
fn token_id(rid: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(format!("jti:{rid}").as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// 128 random bits from the operating system, as hex: session and refresh ids must
/// not be guessable.
fn random_id() -> String {
    random_hex::<16>()
}

/// 256 random bits from the operating system, as hex: a token key.
pub fn random_secret() -> String {
    random_hex::<32>()
}

fn random_hex<const N: usize>() -> String {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    let mut bytes = [0u8; N];
    OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Serves a built-in session endpoint (a route with `builtin`): bodies are small JSON
/// documents (at most 16 KiB); answers carry `Cache-Control: no-store`.
pub async fn endpoint(
    sessions: &Sessions,
    builtin: Builtin,
    identity: Option<&Identity>,
    body: hyper::body::Incoming,
    client: std::net::IpAddr,
) -> Response<Body> {
    use http_body_util::BodyExt;
    let bytes = match http_body_util::Limited::new(body, 16 * 1024)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "a session request is at most 16 KiB of JSON",
            );
        }
    };
    let outcome = match builtin {
        Builtin::Login => match parse::<LoginRequest>(&bytes) {
            Ok(login) => {
                sessions
                    .login_from(&login.username, &login.password, Some(client))
                    .await
            }
            Err(message) => return invalid_request(message),
        },
        Builtin::Refresh => match parse::<RefreshRequest>(&bytes) {
            Ok(refresh) => sessions.refresh(&refresh.refresh_token).await,
            Err(message) => return invalid_request(message),
        },
        Builtin::Logout => {
            let request = if bytes.is_empty() {
                LogoutRequest::default()
            } else {
                match parse::<LogoutRequest>(&bytes) {
                    Ok(request) => request,
                    Err(message) => return invalid_request(message),
                }
            };
            let session = match (identity, &request.refresh_token) {
                (
                    Some(Identity {
                        user_id,
                        session: Some(sid),
                        ..
                    }),
                    _,
                ) => Ok((user_id.clone(), sid.clone())),
                (_, Some(token)) => sessions.refresh_session(token),
                _ => {
                    return error(
                        StatusCode::UNAUTHORIZED,
                        "unauthenticated",
                        "log out with the session's access token or its refresh token",
                    );
                }
            };
            let ended = match session {
                Ok((user, sid)) => sessions.logout(&user, &sid, request.all).await,
                Err(e) => Err(e),
            };
            return match ended {
                Ok(()) => {
                    let mut response = Response::new(empty());
                    *response.status_mut() = StatusCode::NO_CONTENT;
                    response
                }
                Err(e) => refused(sessions, &e),
            };
        }
    };
    match outcome {
        Ok(pair) => {
            let body = serde_json::to_vec(&pair).unwrap_or_default();
            let mut response = Response::new(
                http_body_util::Full::new(bytes::Bytes::from(body))
                    .map_err(|e| match e {})
                    .boxed(),
            );
            let headers = response.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("no-store"),
            );
            response
        }
        Err(e) => refused(sessions, &e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    username: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshRequest {
    refresh_token: String,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogoutRequest {
    refresh_token: Option<String>,
    #[serde(default)]
    all: bool,
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("the body is not the expected JSON: {e}"))
}

fn invalid_request(message: String) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, "invalid_request", message)
}

fn refused(sessions: &Sessions, e: &SessionError) -> Response<Body> {
    if let SessionError::LockedOut(left) = e {
        return sessions.login_failures.refusal(*left, e.to_string());
    }
    let (status, code) = match e {
        SessionError::InvalidCredentials => (StatusCode::UNAUTHORIZED, "invalid_credentials"),
        SessionError::InvalidToken(_) => (StatusCode::UNAUTHORIZED, "invalid_token"),
        SessionError::Reused => (StatusCode::UNAUTHORIZED, "token_reused"),
        SessionError::Unavailable(_) | SessionError::LockedOut(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, "session_store_unavailable")
        }
    };
    error(status, code, e.to_string())
}

fn empty() -> Body {
    use http_body_util::BodyExt;
    http_body_util::Empty::<bytes::Bytes>::new()
        .map_err(|e| match e {})
        .boxed()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(dir: &Path) -> SessionsConfig {
        SessionsConfig {
            store: StoreConfig::Sqlite(dir.join("sessions.db")),
            access_secret: "a".repeat(32),
            refresh_secret: "r".repeat(32),
            access_ttl: fifteen_minutes(),
            refresh_ttl: seven_days(),
            refresh_grace: Duration::from_secs(1),
            users: vec![UserConfig {
                name: "alice".into(),
                password_hash: hash_password("alice").expect("hash"),
                roles: vec!["customer".into()],
                tier: free(),
                customer_id: Some("alice".into()),
            }],
        }
    }

    #[tokio::test]
    async fn refresh_tokens_rotate_and_a_reused_one_ends_every_session() {
        let dir = tempfile::tempdir().expect("dir");
        let sessions = Sessions::new(&config(dir.path()), None, None, None).expect("sessions");
        assert_eq!(
            sessions.login("alice", "wrong").await.err(),
            Some(SessionError::InvalidCredentials)
        );
        assert_eq!(
            sessions.login("nobody", "alice").await.err(),
            Some(SessionError::InvalidCredentials)
        );
        let first = sessions.login("alice", "alice").await.expect("login");
        let other = sessions.login("alice", "alice").await.expect("login");
        let second = sessions
            .refresh(&first.refresh_token)
            .await
            .expect("rotated");
        let third = sessions
            .refresh(&second.refresh_token)
            .await
            .expect("rotated");
        // The first token again: stolen. Both of alice's sessions end.
        assert_eq!(
            sessions.refresh(&first.refresh_token).await.err(),
            Some(SessionError::Reused)
        );
        assert!(matches!(
            sessions.refresh(&third.refresh_token).await,
            Err(SessionError::InvalidToken(_))
        ));
        assert!(matches!(
            sessions.refresh(&other.refresh_token).await,
            Err(SessionError::InvalidToken(_))
        ));
        // An access token is no refresh token (another key).
        assert!(matches!(
            sessions.refresh(&third.access_token).await,
            Err(SessionError::InvalidToken(_))
        ));
    }

    /// Two refreshes with the same token at once get the same pair; the replaced
    /// token presented after the grace (here 1 s) is a reuse.
    #[tokio::test]
    async fn a_replay_within_the_grace_gets_the_same_pair_and_after_it_revokes() {
        let dir = tempfile::tempdir().expect("dir");
        let sessions = Sessions::new(&config(dir.path()), None, None, None).expect("sessions");
        let first = sessions.login("alice", "alice").await.expect("login");
        let (a, b) = futures::join!(
            sessions.refresh(&first.refresh_token),
            sessions.refresh(&first.refresh_token)
        );
        let (a, b) = (a.expect("one refresh"), b.expect("the other"));
        assert_eq!(a.access_token, b.access_token);
        assert_eq!(a.refresh_token, b.refresh_token);
        // Waiting for the grace itself to pass.
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        assert_eq!(
            sessions.refresh(&first.refresh_token).await.err(),
            Some(SessionError::Reused)
        );
        assert!(sessions.refresh(&a.refresh_token).await.is_err(), "revoked");
    }

    /// The sixth login of an account within the window is refused, even with the
    /// right password; another account goes on.
    #[tokio::test]
    async fn failed_logins_lock_out_their_account_only() {
        let dir = tempfile::tempdir().expect("dir");
        let mut config = config(dir.path());
        config.users.push(UserConfig {
            name: "bob".into(),
            password_hash: hash_password("bob").expect("hash"),
            roles: vec!["customer".into()],
            tier: free(),
            customer_id: Some("bob".into()),
        });
        let sessions = Sessions::new(&config, None, None, None).expect("sessions");
        for _ in 0..LOGIN_FAILURES_MAX {
            assert_eq!(
                sessions.login("alice", "guess").await.err(),
                Some(SessionError::InvalidCredentials)
            );
        }
        assert!(matches!(
            sessions.login("alice", "alice").await,
            Err(SessionError::LockedOut(_))
        ));
        sessions
            .login("bob", "bob")
            .await
            .expect("bob is not locked out");
    }
}
