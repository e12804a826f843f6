//! `eventyr bench ...`: the benchmarks whose figures go into BENCHMARKS.md. Each one
//! measures its peer or physical limit in the same run and reports medians of several
//! runs, because the machines here are shared and noisy.

mod bus;
mod cqrs;
mod fsync;
mod gateway;
mod saga;
pub mod stats;
mod store;

use crate::cli::BenchCommand;
use crate::config::Config;

pub async fn run(config: &Config, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Store(args) => store::run(config, args).await,
        BenchCommand::Cqrs(args) => cqrs::run(config, args).await,
        BenchCommand::Bus(args) => bus::run(config, args).await,
        BenchCommand::Saga(args) => saga::run(config, args).await,
        BenchCommand::Gateway(args) => gateway::run(config, args).await,
    }
}
