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
