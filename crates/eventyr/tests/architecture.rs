//! The dependency rules of ARCHITECTURE.md, checked against `cargo metadata`:
//! - eventyr-core knows no async runtime, database, HTTP or broker crate;
//! - trait crates never depend on their adapters, and only the `eventyr` binary picks
//!   adapters (normal dependencies; tests may use any);
//! - crates/* never depend on services/* (but the binary, the composition root that runs
//!   them all), and services never depend on each other;
//! - services' domain modules use no IO crate.

use std::collections::HashMap;
use std::process::Command;

use serde_json::Value;

/// Crates that are adapters: only the binary may depend on them.
const ADAPTERS: &[&str] = &[
    "eventyr-store-sqlite",
    "eventyr-store-postgres",
    "eventyr-bus-nats",
];

/// What eventyr-core (and, later, services' domain modules) must not use.
const IO_CRATES: &[&str] = &[
    "tokio",
    "async-std",
    "rusqlite",
    "tokio-postgres",
    "deadpool-postgres",
    "sqlx",
    "hyper",
    "axum",
    "reqwest",
    "async-nats",
    "redis",
    "tower",
];

struct Package {
    path: String,
    /// Normal (non-dev, non-build) dependencies by name.
    deps: Vec<String>,
}

fn workspace() -> HashMap<String, Package> {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("metadata json");
    let packages = metadata["packages"].as_array().expect("packages");
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().expect("name").to_owned())
                .collect();
            let path = p["manifest_path"]
                .as_str()
                .expect("manifest path")
                .to_owned();
            (
                p["name"].as_str().expect("name").to_owned(),
                Package { path, deps },
            )
        })
        .collect()
}

#[test]
fn core_does_no_io() {
    let packages = workspace();
    let core = &packages["eventyr-core"];
    for dep in &core.deps {
        assert!(
            !IO_CRATES.contains(&dep.as_str()),
            "eventyr-core must not depend on {dep}"
        );
        assert!(
            !dep.starts_with("eventyr"),
            "eventyr-core depends on no other eventyr crate ({dep})"
        );
    }
}

#[test]
fn only_the_binary_picks_adapters() {
    for (name, package) in workspace() {
        for dep in &package.deps {
            if ADAPTERS.contains(&dep.as_str()) {
                assert_eq!(
                    name, "eventyr",
                    "{name} depends on the adapter {dep}; only the binary may"
                );
            }
        }
    }
}

#[test]
fn crates_do_not_depend_on_services_nor_services_on_each_other() {
    let packages = workspace();
    let is_service = |name: &str| {
        packages
            .get(name)
            .is_some_and(|p| p.path.contains("/services/"))
    };
    for (name, package) in &packages {
        for dep in &package.deps {
            if is_service(dep) {
                assert!(
                    !package.path.contains("/crates/") || name == "eventyr",
                    "crate {name} depends on service {dep}"
                );
                assert!(!is_service(name), "service {name} depends on service {dep}");
            }
        }
    }
}

#[test]
fn service_domains_do_no_io() {
    let services = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../services");
    let mut checked = 0;
    for service in std::fs::read_dir(&services).expect("services/") {
        let domain = service.expect("entry").path().join("src/domain.rs");
        let Ok(source) = std::fs::read_to_string(&domain) else {
            continue;
        };
        for line in source.lines().map(str::trim) {
            for io in IO_CRATES {
                let crate_name = io.replace('-', "_");
                let uses = line.starts_with(&format!("use {crate_name}"))
                    || line.contains(&format!(" {crate_name}::"))
                    || line.contains(&format!("({crate_name}::"));
                assert!(!uses, "{} uses {io}: {line}", domain.display());
            }
        }
        checked += 1;
    }
    assert!(
        checked >= 6,
        "the six services' domains were checked ({checked})"
    );
}
