//! The Redis server several gateways share (`[redis]`): rate limits counted across
//! them and sessions any of them can check. One multiplexed connection per
//! configuration, opened at first use and re-opened by itself after a failure; every
//! command within `timeout`, so a Redis that has gone away costs a request at most
//! that long (then the rule's or the session store's failure policy applies).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Deserialize;

use crate::config::humantime_serde_lite;

/// The `[redis]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Each command's limit, and the connection's. Default 100 ms.
    #[serde(default = "hundred_milliseconds", with = "humantime_serde_lite")]
    pub timeout: Duration,
}

fn hundred_milliseconds() -> Duration {
    Duration::from_millis(100)
}

/// A handle on the shared Redis; clones share its connection.
#[derive(Clone)]
pub struct SharedRedis(Arc<Inner>);

struct Inner {
    client: redis::Client,
    timeout: Duration,
    manager: OnceLock<ConnectionManager>,
}

impl std::fmt::Debug for SharedRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRedis")
            .field("server", &self.0.client.get_connection_info().addr())
            .finish_non_exhaustive()
    }
}

impl SharedRedis {
    /// Errors: the URL is not a Redis URL.
    pub fn new(config: &RedisConfig) -> Result<Self, String> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| e.to_string())?;
        Ok(Self(Arc::new(Inner {
            client,
            timeout: config.timeout,
            manager: OnceLock::new(),
        })))
    }

    /// The connection (made on first use; needs a Tokio runtime).
    pub fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        if let Some(manager) = self.0.manager.get() {
            return Ok(manager.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.0.timeout))
            .set_response_timeout(Some(self.0.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_lazy_with_config(self.0.client.clone(), config)?;
        Ok(self.0.manager.get_or_init(|| manager).clone())
    }
}
