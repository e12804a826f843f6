//! Checks against the contracts in `contracts/` (the source of truth of every
//! service's API and public events): a service's tests use these so that its code
//! cannot drift from what it promises.

use std::path::PathBuf;

use serde_json::Value;

/// The repository's `contracts/` directory.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../contracts")
}

/// The public event types of `service`, as its `contracts/events/<service>/` declares.
pub fn event_types(service: &str) -> Vec<String> {
    let folder = dir().join("events").join(service);
    let mut types: Vec<String> = std::fs::read_dir(&folder)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", folder.display()))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?.strip_suffix(".json")?;
            Some(name.to_owned())
        })
        .collect();
    types.sort();
    types
}

/// What `service` publishes (`published`, its public events) is what its contract
/// lists under `contracts/events/<service>/`.
#[track_caller]
pub fn check_public_events(service: &str, published: &[&str]) {
    let mut published: Vec<String> = published.iter().map(|e| (*e).to_owned()).collect();
    published.sort();
    assert_eq!(published, event_types(service), "{service}'s public events");
}

/// Checks `data` of an event of `event_type` against its JSON Schema; panics with every
/// violation.
#[track_caller]
pub fn check_event(service: &str, event_type: &str, data: &Value) {
    let path = dir()
        .join("events")
        .join(service)
        .join(format!("{event_type}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{service} publishes {event_type}, which has no schema at {}: {e}",
            path.display()
        )
    });
    let schema: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let validator = jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("{} is not a valid JSON Schema: {e}", path.display()));
    let errors: Vec<String> = validator
        .iter_errors(data)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{service} {event_type} breaks its contract: {errors:?}\ndata: {data}"
    );
}

/// Checks one sample of each public event of `service` against the contracts (in
/// its stored form), and that the samples cover exactly the contract's types.
#[track_caller]
pub fn check_events<E: eventyr_cqrs::DomainEvent>(
    service: &str,
    samples: impl IntoIterator<Item = E>,
) {
    let mut seen = Vec::new();
    for sample in samples {
        let (event_type, data) = sample.to_stored().expect("the event encodes");
        let data: Value = data.to_value().expect("stored data is JSON");
        check_event(service, event_type.as_str(), &data);
        seen.push(event_type.to_string());
    }
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        event_types(service),
        "the samples of {service} and its contracts/events/{service}/ name other event types"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "breaks its contract")]
    fn data_that_breaks_a_schema_is_caught() {
        check_event(
            "order",
            "OrderCompleted",
            &serde_json::json!({ "order_id": 5 }),
        );
    }
}

/// A service's OpenAPI document, with every `$ref` (local or into `common.yaml`)
/// inlined, so that its schemas validate on their own.
#[derive(Debug, Clone)]
pub struct Contract {
    pub service: String,
    doc: Value,
    /// Sent with every call (the internal credential, a caller's identity).
    headers: reqwest::header::HeaderMap,
}

fn load_yaml(name: &str) -> Value {
    let path = dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

fn pointer<'a>(doc: &'a Value, pointer: &str) -> &'a Value {
    doc.pointer(pointer)
        .unwrap_or_else(|| panic!("a $ref to {pointer} that does not exist"))
}

/// Inlines `$ref`s; `file` is the document `value` comes from.
fn inline(
    value: &Value,
    file: &str,
    docs: &std::collections::HashMap<String, Value>,
    depth: u32,
) -> Value {
    assert!(depth < 64, "$refs nest too deep (a cycle?)");
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref") {
                let (target, path) = reference.split_once('#').unwrap_or((reference, ""));
                let target = if target.is_empty() { file } else { target };
                let doc = docs
                    .get(target)
                    .unwrap_or_else(|| panic!("a $ref into an unknown document {target}"));
                return inline(pointer(doc, path), target, docs, depth + 1);
            }
            Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), inline(v, file, docs, depth + 1)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| inline(v, file, docs, depth + 1))
                .collect(),
        ),
        other => other.clone(),
    }
}

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

impl Contract {
    /// `contracts/<service>.yaml`, inlined.
    pub fn load(service: &str) -> Self {
        let name = format!("{service}.yaml");
        let mut docs = std::collections::HashMap::new();
        docs.insert("common.yaml".to_owned(), load_yaml("common.yaml"));
        docs.insert(name.clone(), load_yaml(&name));
        let doc = inline(&docs[&name], &name, &docs, 0);
        assert_eq!(doc["openapi"], "3.1.0", "{name} is an OpenAPI 3.1 document");
        Self {
            service: service.to_owned(),
            doc,
            headers: reqwest::header::HeaderMap::new(),
        }
    }

    /// Calling with `headers` (the internal credential, a caller's identity).
    pub fn with_headers(mut self, headers: reqwest::header::HeaderMap) -> Self {
        self.headers = headers;
        self
    }

    /// Every (path template, method) the contract declares.
    pub fn operations(&self) -> Vec<(String, String)> {
        let mut operations = Vec::new();
        for (path, item) in self.doc["paths"].as_object().into_iter().flatten() {
            for method in METHODS {
                if item.get(method).is_some() {
                    operations.push((path.clone(), method.to_owned()));
                }
            }
        }
        operations
    }

    /// Checks an answer against the contract: its status is declared for the
    /// operation, and its JSON body (when the contract gives a JSON schema) validates.
    #[track_caller]
    pub fn check_response(&self, path: &str, method: &str, status: u16, body: &Value) {
        let operation = &self.doc["paths"][path][method];
        assert!(
            operation.is_object(),
            "{} declares no {method} {path}",
            self.service
        );
        let response = operation["responses"]
            .get(status.to_string())
            .or_else(|| operation["responses"].get("default"))
            .unwrap_or_else(|| {
                panic!(
                    "{} {method} {path} answered {status}, which its contract does not declare: {body}",
                    self.service
                )
            });
        let Some(schema) = response.pointer("/content/application~1json/schema") else {
            return;
        };
        let validator = jsonschema::validator_for(schema)
            .unwrap_or_else(|e| panic!("the schema of {method} {path} {status} is invalid: {e}"));
        let errors: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{} {method} {path} {status} breaks its contract: {errors:?}\nbody: {body}",
            self.service
        );
    }

    /// Calls `method path` (a template filled by `fill`) on `base` and checks the
    /// answer against the contract; returns the status and body.
    pub async fn call(
        &self,
        base: &str,
        method: &str,
        path: &str,
        fill: &[(&str, &str)],
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut url = format!("{base}{path}");
        for (name, value) in fill {
            url = url.replace(&format!("{{{name}}}"), value);
        }
        let method_upper = method.to_uppercase();
        let mut request = reqwest::Client::new().request(
            reqwest::Method::from_bytes(method_upper.as_bytes()).expect("a method"),
            &url,
        );
        request = request.headers(self.headers.clone());
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.expect("the request is sent");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let template = path.split('?').next().unwrap_or(path);
        self.check_response(template, method, status, &value);
        (status, value)
    }

    /// Every operation of the contract is served: calling each (with `fill`, and an
    /// empty JSON body where one is required) gets an answer its contract declares,
    /// never the router's "no such path" or "method not allowed".
    pub async fn check_served(&self, base: &str, fill: &[(&str, &str)]) {
        for (path, method) in self.operations() {
            let needs_body = self.doc["paths"][&path][&method]["requestBody"]["required"] == true;
            let empty = serde_json::json!({});
            let (status, body) = self
                .call(base, &method, &path, fill, needs_body.then_some(&empty))
                .await;
            let fallback = (status == 404 && body["message"] == "no such path") || status == 405;
            assert!(
                !fallback,
                "{} does not serve {method} {path}: {status} {body}",
                self.service
            );
        }
    }
}

impl Contract {
    /// Who may call: without the headers this contract was given (the internal
    /// credential), every operation but the probes and `/metrics` is 401; as
    /// `customer` (a customer's identity with the credential), every `/internal/*`
    /// and `/admin/*` operation is 403. Each answer is checked against the contract.
    pub async fn check_access(
        &self,
        base: &str,
        fill: &[(&str, &str)],
        customer: reqwest::header::HeaderMap,
    ) {
        let open = ["/health/live", "/health/ready", "/metrics"];
        let anonymous = self.clone().with_headers(reqwest::header::HeaderMap::new());
        let as_customer = self.clone().with_headers(customer);
        for (path, method) in self.operations() {
            let needs_body = self.doc["paths"][&path][&method]["requestBody"]["required"] == true;
            let empty = serde_json::json!({});
            let body = needs_body.then_some(&empty);
            if !open.contains(&path.as_str()) {
                let (status, answer) = anonymous.call(base, &method, &path, fill, body).await;
                assert_eq!(
                    status, 401,
                    "{} {method} {path} without the credential: {answer}",
                    self.service
                );
            }
            if path.starts_with("/internal/") || path.starts_with("/admin/") {
                let (status, answer) = as_customer.call(base, &method, &path, fill, body).await;
                assert_eq!(
                    status, 403,
                    "{} {method} {path} as a customer: {answer}",
                    self.service
                );
            }
        }
    }
}

/// A request and the status its answer must have: (method, path template, body,
/// status).
pub type Case<'a> = (&'a str, &'a str, Option<Value>, u16);

impl Contract {
    /// Runs `cases` in order against `base`, checking each answer's status and its
    /// body against the contract.
    pub async fn check_cases(&self, base: &str, fill: &[(&str, &str)], cases: &[Case<'_>]) {
        for (method, path, body, expected) in cases {
            let (status, answer) = self.call(base, method, path, fill, body.as_ref()).await;
            assert_eq!(
                status, *expected,
                "{} {method} {path}: {answer}",
                self.service
            );
        }
    }
}
