//! Who is calling a service, and what they may touch (defence in depth behind the
//! gateway).
//!
//! Every request to a service's listener must carry the internal credential
//! (`X-Eventyr-Credential`): the gateway, the saga engine and the service's own
//! consumers send it; anything else is 401 `unauthenticated` (the probes and
//! `/metrics` excepted). With the credential, the identity headers the gateway sets —
//! `X-User-ID`, `X-User-Roles`, `X-Customer-ID` — say which user the request is for;
//! `X-Eventyr-Anonymous` that it is for nobody (a public route); without any the
//! caller is another component of the system ([`Caller::Service`]).
//! The gateway always drops these headers from a client's request before it sets its
//! own, so a client cannot name itself.
//!
//! The rules (`contracts/common.yaml`, "Who may do what"): a service or an `admin`
//! may do everything (and only they reach `/admin/*` and `/internal/*`); a customer acts only for their own customer id (403
//! `forbidden`), reads only their own resources (someone else's single resource is
//! 404 `not_found`, so ids cannot be probed), and lists only their own (a list naming
//! another customer is 403 `forbidden`; a list without a customer filter is the
//! caller's own).

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::ApiError;

pub use eventyr_telemetry::identity::{
    X_CUSTOMER_ID, X_EVENTYR_ANONYMOUS, X_EVENTYR_CREDENTIAL, X_USER_ID, X_USER_ROLES,
};

/// The role that may do everything.
pub const ADMIN_ROLE: &str = "admin";

/// The internal credential: a secret shared by the components of one system.
#[derive(Clone)]
pub struct Credential(Arc<str>);

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(..)")
    }
}

impl Credential {
    /// The shortest credential taken (bytes).
    pub const LEN_MIN: usize = 32;

    /// Errors: shorter than [`Self::LEN_MIN`], or not a visible ASCII header value.
    pub fn new(secret: impl Into<String>) -> Result<Self, String> {
        let secret = secret.into();
        if secret.len() < Self::LEN_MIN {
            return Err(format!(
                "the internal credential needs at least {} characters",
                Self::LEN_MIN
            ));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the internal credential must be visible ASCII".to_owned());
        }
        Ok(Self(Arc::from(secret)))
    }

    /// The secret, to send.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this credential, in time independent of where they
    /// differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let ours = self.0.as_bytes();
        if ours.len() != presented.len() {
            return false;
        }
        ours.iter()
            .zip(presented)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }

    /// The header map a component sends with each call.
    pub fn headers(&self) -> axum::http::HeaderMap {
        let mut headers = axum::http::HeaderMap::new();
        if let Ok(value) = axum::http::HeaderValue::from_str(&self.0) {
            headers.insert(X_EVENTYR_CREDENTIAL, value);
        }
        headers
    }
}

/// Who a request to a service is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Another component of the system (the saga engine, a consumer, an operator's
    /// tool): every right.
    Service,
    /// Nobody in particular: a request the gateway passed on from an unauthenticated
    /// client (a public route). Owns nothing.
    Anonymous,
    /// A user, as the gateway authenticated them.
    User {
        subject: String,
        roles: Vec<String>,
        /// The customer id the user owns, if any.
        customer_id: Option<String>,
    },
}

impl Caller {
    /// The system itself or an `admin`.
    pub fn is_admin(&self) -> bool {
        match self {
            Self::Service => true,
            Self::Anonymous => false,
            Self::User { roles, .. } => roles.iter().any(|r| r == ADMIN_ROLE),
        }
    }

    /// Whether the caller may read and act on `customer_id`'s resources.
    pub fn owns(&self, customer_id: &str) -> bool {
        self.is_admin() || self.customer_id() == Some(customer_id)
    }

    /// The customer id the user owns.
    pub fn customer_id(&self) -> Option<&str> {
        match self {
            Self::Service | Self::Anonymous => None,
            Self::User { customer_id, .. } => customer_id.as_deref(),
        }
    }

    /// Who, for logs and for scoping idempotency keys: the user's subject, or
    /// `service`.
    pub fn subject(&self) -> &str {
        match self {
            Self::Service => "service",
            Self::Anonymous => "anonymous",
            Self::User { subject, .. } => subject,
        }
    }

    /// Acting for `customer_id`: 403 `forbidden` unless the caller owns it.
    pub fn act_for(&self, customer_id: &str) -> Result<(), ApiError> {
        if self.owns(customer_id) {
            Ok(())
        } else {
            Err(self.forbidden(&format!("act for customer {customer_id}")))
        }
    }

    /// Reading one resource of `customer_id`: 404 `not_found` (with `missing` as the
    /// message, the same as for a resource that does not exist) unless the caller
    /// owns it.
    pub fn read_of(&self, customer_id: &str, missing: impl Into<String>) -> Result<(), ApiError> {
        if self.owns(customer_id) {
            Ok(())
        } else {
            security_event("not_owner", self.subject());
            Err(ApiError::not_found(missing))
        }
    }

    /// The customer a list is for: the one `requested` if the caller owns it (403
    /// `forbidden` otherwise), else the caller's own; `None` for an admin's list of
    /// everyone.
    pub fn list_scope(&self, requested: Option<String>) -> Result<Option<String>, ApiError> {
        match requested {
            Some(customer) if self.owns(&customer) => Ok(Some(customer)),
            Some(customer) => Err(self.forbidden(&format!("list customer {customer}'s"))),
            None if self.is_admin() => Ok(None),
            None => match self.customer_id() {
                Some(own) => Ok(Some(own.to_owned())),
                None => Err(self.forbidden("list the resources of a customer")),
            },
        }
    }

    /// The system's own calls and admins only: 403 `forbidden` otherwise.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(self.forbidden("use this operation"))
        }
    }

    fn forbidden(&self, what: &str) -> ApiError {
        if *self == Self::Anonymous {
            security_event("unauthenticated", self.subject());
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                format!("log in to {what}"),
            );
        }
        security_event("forbidden", self.subject());
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} may not {what}", self.subject()),
        )
    }

    /// The caller of a request that carries the credential: its identity headers.
    /// Errors: identity headers that are not well-formed (400).
    fn from_headers(headers: &axum::http::HeaderMap) -> Result<Self, ApiError> {
        let text = |name: &str| -> Result<Option<&str>, ApiError> {
            match headers.get(name) {
                None => Ok(None),
                Some(value) => value.to_str().map(Some).map_err(|_| {
                    ApiError::invalid(vec![crate::FieldError::new(name, "visible ASCII")])
                }),
            }
        };
        let Some(subject) = text(X_USER_ID)? else {
            return Ok(if headers.contains_key(X_EVENTYR_ANONYMOUS) {
                Self::Anonymous
            } else {
                Self::Service
            });
        };
        let roles = text(X_USER_ROLES)?
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect();
        let customer_id = match text(X_CUSTOMER_ID)? {
            None => None,
            Some(id) if crate::valid_customer_id(id) => Some(id.to_owned()),
            Some(_) => {
                return Err(ApiError::invalid(vec![crate::FieldError::new(
                    X_CUSTOMER_ID,
                    crate::CUSTOMER_ID_RULE,
                )]));
            }
        };
        Ok(Self::User {
            subject: subject.to_owned(),
            roles,
            customer_id,
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    /// The caller [`guard`] found. A route served without the guard has no caller
    /// and trusts nobody (401).
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Self>()
            .cloned()
            .ok_or_else(unauthenticated)
    }
}

fn unauthenticated() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "this listener takes only calls with the internal credential",
    )
}

/// Paths any caller may ask without the credential: the probes and the scrape.
fn open_path(path: &str) -> bool {
    matches!(path, "/health/live" | "/health/ready" | "/metrics")
}

/// `router` behind the internal credential: each request needs it (401
/// `unauthenticated` otherwise, except the probes and `/metrics`) and gets its
/// [`Caller`].
pub fn guarded(router: axum::Router, credential: Credential) -> axum::Router {
    router.layer(axum::middleware::from_fn(move |request, next| {
        guard(credential.clone(), request, next)
    }))
}

async fn guard(credential: Credential, mut request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(X_EVENTYR_CREDENTIAL)
        .map(axum::http::HeaderValue::as_bytes);
    if !presented.is_some_and(|p| credential.matches(p)) {
        if open_path(request.uri().path()) {
            return next.run(request).await;
        }
        security_event("no_internal_credential", request.uri().path());
        return unauthenticated().into_response();
    }
    match Caller::from_headers(request.headers()) {
        Ok(caller) => {
            // The saga's steps, the operators' routes and the fault knobs: the system
            // and admins only, whatever the route's own handler checks.
            if system_path(request.uri().path())
                && let Err(refused) = caller.require_admin()
            {
                return refused.into_response();
            }
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(error) => error.into_response(),
    }
}

/// Paths for the system and admins only.
fn system_path(path: &str) -> bool {
    ["/admin", "/internal"]
        .iter()
        .any(|prefix| path == *prefix || path.starts_with(&format!("{prefix}/")))
}

/// A refusal worth an operator's eye: counted and logged with who asked.
pub fn security_event(kind: &'static str, who: &str) {
    metrics::counter!(
        eventyr_telemetry::names::SERVICE_SECURITY_EVENTS_TOTAL,
        eventyr_telemetry::names::LABEL_REASON => kind
    )
    .increment(1);
    tracing::warn!(target: "eventyr_http::security", kind, who, "refused");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(id: &str) -> Caller {
        Caller::User {
            subject: id.to_owned(),
            roles: vec!["customer".to_owned()],
            customer_id: Some(id.to_owned()),
        }
    }

    #[test]
    fn customers_own_only_their_own() {
        let alice = customer("alice");
        assert!(alice.owns("alice"));
        assert!(!alice.owns("bob"));
        assert_eq!(
            alice.act_for("bob").unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            alice.read_of("bob", "no").unwrap_err().status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(alice.list_scope(None).unwrap(), Some("alice".to_owned()));
        assert_eq!(
            alice.list_scope(Some("bob".into())).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        assert!(alice.require_admin().is_err());
        let admin = Caller::User {
            subject: "root".into(),
            roles: vec!["admin".into()],
            customer_id: None,
        };
        assert!(admin.owns("bob"));
        assert_eq!(admin.list_scope(None).unwrap(), None);
        assert!(Caller::Service.require_admin().is_ok());
        let nobody = Caller::User {
            subject: "eve".into(),
            roles: vec![],
            customer_id: None,
        };
        assert!(nobody.list_scope(None).is_err());
        // Through the gateway for nobody: no rights at all, and asked to log in.
        let anonymous = Caller::Anonymous;
        assert!(!anonymous.owns("alice") && !anonymous.is_admin());
        assert_eq!(
            anonymous.list_scope(None).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            anonymous.read_of("alice", "no").unwrap_err().status,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn credentials_compare_whole() {
        let credential = Credential::new("x".repeat(40)).unwrap();
        assert!(credential.matches("x".repeat(40).as_bytes()));
        assert!(!credential.matches("x".repeat(39).as_bytes()));
        assert!(!credential.matches(format!("{}y", "x".repeat(39)).as_bytes()));
        assert!(Credential::new("short").is_err());
    }
}
