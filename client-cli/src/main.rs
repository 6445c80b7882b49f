//! `redisctl`: respwatch's command line. Everything goes through the daemon's gRPC API.
mod client;
mod cluster;
mod cmd;
mod filters;
mod format;
mod watch_stream;

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
  redisctl --cluster watch -n shop             every node's commands, merged, node on each line
  redisctl --cluster stats --group-by pod      one table for the whole cluster, NODE column
  redisctl --cluster status                    one row per node

The daemon address comes from --server or RESPWATCH_SERVER (default 127.0.0.1:50051).
With --cluster, redisctl lists the respwatchd pods through the Kubernetes API (--kubeconfig,
$KUBECONFIG, ~/.kube/config or the in-cluster service account) and connects to each pod IP
directly: run it inside the cluster (a pod) or on a node, where pod IPs are reachable.
`top` shows one daemon; use --server for it."
)]
struct Cli {
    #[command(flatten)]
    server: client::ServerArgs,
    #[command(flatten)]
    cluster: cluster::ClusterArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Live commands, one line each (like MONITOR, for every process and pod, with latency).
    Watch(cmd::watch::WatchArgs),
    /// Per-command stats grouped by pod/process (like INFO commandstats).
    Stats(cmd::stats::StatsArgs),
    /// Busiest, slowest or failing commands over a recent window, refreshed like top (one node;
    /// not with --cluster).
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
    let (server, cluster) = (cli.server, cli.cluster);
    let result = runtime.block_on(async move {
        match (cli.command, cluster.cluster) {
            (Command::Watch(args), false) => cmd::watch::run(&server, args).await,
            (Command::Watch(args), true) => cmd::watch::run_cluster(&server, &cluster, args).await,
            (Command::Stats(args), false) => cmd::stats::run(&server, args).await,
            (Command::Stats(args), true) => cmd::stats::run_cluster(&server, &cluster, args).await,
            (Command::Top(args), false) => cmd::top::run(&server, args).await,
            (Command::Top(_), true) => Err(anyhow::anyhow!(
                "top shows one daemon: drop --cluster and point --server at a node's daemon (for a cluster-wide view: stats --cluster --window 60s)"
            )),
            (Command::Status(args), false) => cmd::status::run(&server, args).await,
            (Command::Status(args), true) => {
                cmd::status::run_cluster(&server, &cluster, args).await
            }
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
