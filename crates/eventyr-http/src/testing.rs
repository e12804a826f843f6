//! Helpers for tests of services (feature `testing`): a router served on 127.0.0.1
//! and JSON requests to it.

use axum::Router;
use serde_json::Value;

/// Serves `router` on a free port of 127.0.0.1 until the test's runtime ends; returns
/// its base URL.
pub async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port on 127.0.0.1");
    let base = format!("http://{}", listener.local_addr().expect("its address"));
    tokio::spawn(async move { axum::serve(listener, router).await });
    base
}

/// The internal credential of the services [`app`] serves.
pub const CREDENTIAL: &str = "the-internal-credential-of-service-tests";

/// [`CREDENTIAL`] as a credential.
pub fn credential() -> crate::Credential {
    crate::Credential::new(CREDENTIAL).expect("a long enough credential")
}

/// The headers of a request from another component of the system: the credential
/// and no user.
pub fn internal() -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        crate::caller::X_EVENTYR_CREDENTIAL,
        reqwest::header::HeaderValue::from_static(CREDENTIAL),
    );
    headers
}

/// The headers of a request for `customer` (role customer, owning that customer id),
/// with the credential, as the gateway sends them.
pub fn customer(customer: &str) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    let mut put = |name: &'static str, value: &str| {
        if let Ok(value) = reqwest::header::HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    };
    put(crate::caller::X_EVENTYR_CREDENTIAL, CREDENTIAL);
    put(crate::caller::X_USER_ID, customer);
    put(crate::caller::X_USER_ROLES, "customer");
    put(crate::caller::X_CUSTOMER_ID, customer);
    headers
}

/// `method url` with a JSON body (if any), as another component of the system (with
/// the credential and no user); the status and the JSON answer (null when it is not
/// JSON).
pub async fn request(method: reqwest::Method, url: &str, body: Option<&Value>) -> (u16, Value) {
    request_with(method, url, body, internal()).await
}

/// [`request`] with exactly `headers` (a customer's, none at all).
pub async fn request_with(
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
    headers: reqwest::header::HeaderMap,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url).headers(headers);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("the request is sent");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub async fn post(url: &str, body: &Value) -> (u16, Value) {
    request(reqwest::Method::POST, url, Some(body)).await
}

pub async fn get(url: &str) -> (u16, Value) {
    request(reqwest::Method::GET, url, None).await
}

/// The `field`s of an error body, in order.
pub fn fields(body: &Value) -> Vec<String> {
    body["fields"]
        .as_array()
        .map(|fields| {
            fields
                .iter()
                .filter_map(|f| f["field"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A service's router as it runs: with probes (always ready), the conventions, and
/// behind [`CREDENTIAL`].
pub fn app(router: Router) -> Router {
    let ready: crate::ReadyCheck = std::sync::Arc::new(|| Box::pin(async { Ok(()) }));
    crate::guarded(
        crate::conventions(router.merge(crate::probes(ready, None))),
        credential(),
    )
}
