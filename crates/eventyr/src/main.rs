//! `eventyr`: the command-line entry point. Parses arguments, loads the layered
//! configuration, picks the adapters, and runs the command. The only place that uses
//! `anyhow`, and the only crate that chooses between storage backends.

/// mimalloc: the gateway and the services allocate small, short-lived objects per
/// request; glibc's malloc spent a tenth of the gateway's time on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod builtin;
mod cli;
mod config;
mod dashboard;
mod demo;
mod dlq;
mod events;
mod front;
mod gateway;
mod output;
mod projection;
mod reconcile;
mod saga;
mod signals;
mod stores;
mod up;

use std::process::ExitCode;

use clap::Parser;
use eventyr_saga::Action;

use crate::cli::{Cli, Command, DlqCommand, EventsCommand, ProjectionCommand, SagaCommand};

fn main() -> ExitCode {
    // Everything this process creates — stores, inboxes, sessions, token keys — is
    // its owner's alone: other users of the host read none of it.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    let (config, telemetry) = match load(&cli) {
        Ok(loaded) => loaded,
        Err(error) => {
            output::report(&error);
            return ExitCode::FAILURE;
        }
    };
    // Logs and traces first, outside the runtime (the span exporter has a thread and a
    // blocking client of its own). Held until the end: dropping it flushes the spans
    // not yet exported.
    let _telemetry = match telemetry.as_ref().map(eventyr_telemetry::init).transpose() {
        Ok(telemetry) => telemetry,
        Err(error) => {
            output::report(&error.into());
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            output::report(&error);
            ExitCode::FAILURE
        }
    }
}

/// The configuration (none for the gateway: its --config is its own file, read by
/// the command) and how the command logs and traces (`hash-password` does neither).
fn load(
    cli: &Cli,
) -> anyhow::Result<(Option<config::Config>, Option<eventyr_telemetry::Settings>)> {
    if let Command::Gateway { command, .. } = &cli.command {
        let mut settings = config::telemetry(&cli.global, config::FileTelemetry::default());
        settings.service_name = "eventyr-gateway".into();
        return Ok((None, command.is_none().then_some(settings)));
    }
    let config = config::Config::load(&cli.global)?;
    let settings = config.telemetry.clone();
    Ok((Some(config), Some(settings)))
}

async fn run(cli: Cli, config: Option<config::Config>) -> anyhow::Result<()> {
    let Some(config) = config else {
        let Command::Gateway { listen, command } = cli.command else {
            anyhow::bail!("no configuration was loaded");
        };
        return gateway::command(&cli.global, listen, command).await;
    };
    match cli.command {
        Command::Up(args) => up::up(&config, args).await,
        Command::Demo(args) => demo::run(&config, args).await,
        Command::Gateway { listen, command } => {
            gateway::command(&cli.global, listen, command).await
        }
        Command::Reconcile { json } => reconcile::run(&config, json).await,
        Command::Events { command } => match command {
            EventsCommand::Append(args) => events::append(&config, args).await,
            EventsCommand::Read(args) => events::read(&config, args).await,
            EventsCommand::Tail(args) => events::tail(&config, args).await,
        },
        Command::Projection { command } => match command {
            ProjectionCommand::Status { json } => projection::status(&config, json).await,
            ProjectionCommand::Rebuild { name } => projection::rebuild(&config, &name).await,
        },
        Command::Saga { command } => match command {
            SagaCommand::List {
                status,
                limit,
                json,
            } => saga::list(&config, status.as_deref(), limit, json).await,
            SagaCommand::Show { id, json } => saga::show(&config, &id, json).await,
            SagaCommand::Simulate { seeds, from, sagas } => saga::simulate(seeds, from, sagas),
            SagaCommand::Retry { id, wait } => {
                saga::request(&config, &id, Action::Retry, None, wait).await
            }
            SagaCommand::Abort { id, reason, wait } => {
                saga::request(&config, &id, Action::Abort, Some(reason), wait).await
            }
        },
        Command::Dlq { command } => match command {
            DlqCommand::List {
                consumer,
                service,
                all,
                json,
            } => {
                let models = dlq::models(&config, service.as_deref()).await?;
                dlq::list(&models, consumer.as_deref(), all, json).await
            }
            DlqCommand::Replay {
                id,
                all: _,
                consumer,
                service,
                wait,
            } => {
                let models = dlq::models(&config, service.as_deref()).await?;
                dlq::replay(&models, id.as_deref(), consumer.as_deref(), wait).await
            }
        },
        Command::Bench { command } => bench::run(&config, command).await,
    }
}
