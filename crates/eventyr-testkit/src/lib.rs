//! Throwaway servers on 127.0.0.1 for tests and benchmarks.
//!
//! Each server runs in a temporary directory as a child of a tiny `sh` supervisor that
//! holds the read end of a pipe from us: when our process ends, however it ends, the
//! pipe closes and the supervisor stops the server and waits for it. So a test binary
//! that exits without running destructors (statics never drop) leaves nothing behind.
//!
//! A test that needs a server must fail loudly when it cannot get one: the helpers here
//! panic with the reason and the fix, never skip.

#[cfg(feature = "contracts")]
pub mod contracts;
mod nats;
mod postgres;
mod process;
mod redis;

pub use crate::nats::{NATS_SERVER_ENV, NatsOptions, NatsServer};
pub use crate::postgres::{PostgresOptions, PostgresServer, test_postgres_url};
pub use crate::redis::RedisServer;

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("{what} is not installed: {hint}")]
    NotInstalled {
        what: &'static str,
        hint: &'static str,
    },
    #[error("{command} failed: {message}")]
    Command { command: String, message: String },
    #[error("{what} did not become ready within {seconds} s; its log:\n{log}")]
    NotReady {
        what: &'static str,
        seconds: u64,
        log: String,
    },
    #[error("i/o error while {doing}: {source}")]
    Io {
        doing: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io(doing: &'static str) -> impl FnOnce(std::io::Error) -> TestkitError {
    move |source| TestkitError::Io { doing, source }
}
