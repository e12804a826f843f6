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

/// `method url` with a JSON body (if any); the status and the JSON answer (null when
/// it is not JSON).
pub async fn request(method: reqwest::Method, url: &str, body: Option<&Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url);
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

/// A service's router as it runs: with probes (always ready) and the conventions.
pub fn app(router: Router) -> Router {
    let ready: crate::ReadyCheck = std::sync::Arc::new(|| Box::pin(async { Ok(()) }));
    crate::conventions(router.merge(crate::probes(ready, None)))
}
