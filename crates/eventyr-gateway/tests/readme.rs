//! The README's sample gateway configuration is a valid one, and starts.

use eventyr_gateway::config::GatewayConfig;

#[tokio::test]
async fn the_readme_sample_configuration_is_valid_and_starts() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let section = readme
        .split("## The gateway")
        .nth(1)
        .expect("the README has a gateway section");
    let sample = section
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a TOML sample in the gateway section");
    let config = GatewayConfig::parse(sample).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.sessions.is_some() && config.redis.is_some());
    // Its SQLite session store opens (in a directory of the test's own).
    let dir = tempfile::tempdir().expect("dir");
    let here = std::env::current_dir().expect("cwd");
    std::env::set_current_dir(dir.path()).expect("cd");
    let started = eventyr_gateway::proxy::Proxy::new(&config);
    std::env::set_current_dir(here).expect("cd back");
    started.expect("the sample starts");
}
