//! `redisctl`: respwatch's command line. Everything goes through the daemon's gRPC API.
mod client;
mod cmd;
mod filters;
mod format;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Watch Redis traffic on this node: live commands, per-pod/process stats, top and daemon status,
/// from respwatchd's gRPC API.
#[derive(Debug, Parser)]
#[command(
    name = "redisctl",
    version,
    about,
    after_help = "Examples:
  redisctl watch --errors-only                 failing commands, live
  redisctl stats --group-by pod,command        per-pod command stats (INFO commandstats names)
  redisctl top                                 busiest commands, refreshed every 2s
  redisctl --server unix:/run/respwatch.sock status

The daemon address comes from --server or RESPWATCH_SERVER (default 127.0.0.1:50051)."
)]
struct Cli {
    #[command(flatten)]
    server: client::ServerArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Live commands, one line each (like MONITOR, for every process and pod, with latency).
    Watch(cmd::watch::WatchArgs),
    /// Per-command stats grouped by pod/process (like INFO commandstats).
    Stats(cmd::stats::StatsArgs),
    /// Busiest, slowest or failing commands over a recent window, refreshed like top.
    Top(cmd::top::TopArgs),
    /// The daemon's version, uptime, counters and losses.
    Status(cmd::status::StatusArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("redisctl: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let server = cli.server;
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Watch(args) => cmd::watch::run(&server, args).await,
            Command::Stats(args) => cmd::stats::run(&server, args).await,
            Command::Top(args) => cmd::top::run(&server, args).await,
            Command::Status(args) => cmd::status::run(&server, args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("redisctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}
