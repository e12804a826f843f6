//! `servers postgres`: starts throwaway servers for a whole test run, prints one
//! `NAME=VALUE` line per server for the environment, then `ready`, and keeps them
//! running until its standard input closes. `scripts/test` builds it with
//! `cargo build -p eventyr-testkit --example servers` and runs it as a coprocess. (An
//! example, not a binary, so that `cargo run` in the workspace runs `eventyr`.)

use std::io::{Read, Write};
use std::process::ExitCode;

use eventyr_testkit::{PostgresOptions, PostgresServer};

fn main() -> ExitCode {
    let kinds: Vec<String> = std::env::args().skip(1).collect();
    if kinds.is_empty() {
        eprintln!("usage: servers postgres");
        return ExitCode::from(2);
    }
    let mut servers = Vec::new();
    let mut stdout = std::io::stdout();
    for kind in &kinds {
        match kind.as_str() {
            "postgres" => match PostgresServer::start(&PostgresOptions::default()) {
                Ok(server) => {
                    let _ = writeln!(
                        stdout,
                        "EVENTYR_TEST_POSTGRES_URL={}",
                        server.url("postgres")
                    );
                    servers.push(server);
                }
                Err(error) => {
                    eprintln!("servers: cannot start postgres: {error}");
                    return ExitCode::FAILURE;
                }
            },
            other => {
                eprintln!("servers: unknown server {other:?} (known: postgres)");
                return ExitCode::from(2);
            }
        }
    }
    let _ = writeln!(stdout, "ready").and_then(|()| stdout.flush());
    // Serve until our owner closes our standard input (or dies).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(servers);
    ExitCode::SUCCESS
}
