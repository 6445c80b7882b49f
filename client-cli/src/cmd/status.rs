//! `redisctl status`: the daemon's version, uptime, programs, counters and losses.
use std::fmt::Write as _;

use respwatch_proto::v1;
use serde_json::json;

use super::TableOutput;
use crate::{
    client::{ServerArgs, connect, status_error},
    cluster::{Answers, ClusterArgs, Failure, ask_all},
    format::{emit, rfc3339, table},
};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  redisctl status
  redisctl --server unix:/run/respwatch/api.sock status -o json
  redisctl --cluster status                           one row per node (JSON: one object each)")]
pub struct StatusArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = TableOutput::Table)]
    pub output: TableOutput,
}

async fn fetch(server: &ServerArgs) -> anyhow::Result<v1::GetStatusResponse> {
    let mut client = connect(server).await?;
    Ok(client
        .get_status(v1::GetStatusRequest {})
        .await
        .map_err(|s| status_error(&server.server, s))?
        .into_inner())
}

fn loss_source(loss: &v1::Loss) -> &'static str {
    v1::LossSource::try_from(loss.source)
        .unwrap_or_default()
        .short_name()
}

pub async fn run(server: &ServerArgs, args: StatusArgs) -> anyhow::Result<()> {
    let status = fetch(server).await?;
    match args.output {
        TableOutput::Json => {
            let value = status_json(&status);
            emit(&format!("{value}\n"))?;
        }
        TableOutput::Table => {
            let mut text = String::new();
            let _ = writeln!(text, "node:                {}", status.node);
            let _ = writeln!(text, "version:             {}", status.version);
            let _ = writeln!(
                text,
                "uptime:              {}s (since {})",
                status.uptime_seconds,
                rfc3339(status.started.as_ref())
            );
            let _ = writeln!(text, "kernel:              {}", status.kernel_release);
            let _ = writeln!(
                text,
                "programs attached:   {}",
                status.attached_programs.len()
            );
            let _ = writeln!(text, "kernel records:      {}", status.records);
            let _ = writeln!(
                text,
                "socket chunks:       {} ({} bytes)",
                status.chunks, status.bytes
            );
            let _ = writeln!(text, "commands decoded:    {}", status.events);
            let _ = writeln!(text, "tracked connections: {}", status.tracked_connections);
            let _ = writeln!(text, "watch subscribers:   {}", status.subscribers);
            let _ = writeln!(text, "stats rows:          {}", status.stats_rows);
            let _ = writeln!(text, "kubernetes:          {}", status.kubernetes_sync);
            let _ = writeln!(text, "lost bytes:          {}", status.lost_bytes);
            let _ = writeln!(text, "duplicate bytes:     {}", status.duplicate_bytes);
            let _ = writeln!(
                text,
                "replicated:          {} commands ({} bytes)",
                status.replicated_commands, status.replicated_bytes
            );
            let _ = writeln!(
                text,
                "not RESP, dropped:   {} connections",
                status.not_resp_connections
            );
            let _ = writeln!(text, "losses:");
            for loss in &status.losses {
                let _ = writeln!(
                    text,
                    "  {:<18} {:<14} {}",
                    loss_source(loss),
                    loss.reason,
                    loss.count
                );
            }
            emit(&text)?;
        }
    }
    Ok(())
}

fn status_json(status: &v1::GetStatusResponse) -> serde_json::Value {
    let losses: Vec<_> = status
        .losses
        .iter()
        .map(|l| json!({"source": loss_source(l), "reason": l.reason, "count": l.count}))
        .collect();
    json!({
        "node": status.node,
        "version": status.version,
        "uptime_seconds": status.uptime_seconds,
        "started": rfc3339(status.started.as_ref()),
        "kernel_release": status.kernel_release,
        "attached_programs": status.attached_programs,
        "records": status.records,
        "chunks": status.chunks,
        "bytes": status.bytes,
        "events": status.events,
        "lost_bytes": status.lost_bytes,
        "duplicate_bytes": status.duplicate_bytes,
        "replicated_commands": status.replicated_commands,
        "replicated_bytes": status.replicated_bytes,
        "not_resp_connections": status.not_resp_connections,
        "losses": losses,
        "tracked_connections": status.tracked_connections,
        "subscribers": status.subscribers,
        "stats_rows": status.stats_rows,
        "kubernetes_sync": status.kubernetes_sync,
    })
}

/// `redisctl --cluster status`: GetStatus on every node's daemon at once, one row (JSON: one
/// object) per node; nodes that did not answer are named on stderr and in the output.
pub async fn run_cluster(
    server: &ServerArgs,
    cluster: &ClusterArgs,
    args: StatusArgs,
) -> anyhow::Result<()> {
    let Answers {
        answered, failed, ..
    } = ask_all(cluster, server, "status", |daemon| async move {
        fetch(&daemon).await
    })
    .await?;
    match args.output {
        TableOutput::Json => {
            let mut array: Vec<serde_json::Value> = answered
                .iter()
                .map(|(daemon, status)| {
                    let mut value = status_json(status);
                    if let Some(object) = value.as_object_mut() {
                        object.insert("address".to_owned(), daemon.address.clone().into());
                        object.insert("pod".to_owned(), daemon.pod.clone().into());
                    }
                    value
                })
                .collect();
            array.extend(failed.iter().map(Failure::json));
            emit(&format!("{}\n", serde_json::Value::Array(array)))
        }
        TableOutput::Table => {
            let header = [
                "NODE",
                "ADDRESS",
                "VERSION",
                "UPTIME",
                "COMMANDS",
                "CONNECTIONS",
                "SUBSCRIBERS",
                "LOST BYTES",
                "LOSSES",
                "KUBERNETES",
            ];
            let mut cells: Vec<Vec<String>> = answered
                .iter()
                .map(|(daemon, s)| {
                    vec![
                        daemon.node_name(&s.node),
                        daemon.address.clone(),
                        s.version.clone(),
                        format!("{}s", s.uptime_seconds),
                        s.events.to_string(),
                        s.tracked_connections.to_string(),
                        s.subscribers.to_string(),
                        s.lost_bytes.to_string(),
                        s.losses.iter().map(|l| l.count).sum::<u64>().to_string(),
                        s.kubernetes_sync.clone(),
                    ]
                })
                .collect();
            cells.extend(failed.iter().map(|f| {
                let mut row = vec![f.node.clone(), f.address.clone()];
                row.extend(std::iter::repeat_n("-".to_owned(), 7));
                row.push(format!("no answer: {}", f.cause));
                row
            }));
            let numeric = [
                false, false, false, true, true, true, true, true, true, false,
            ];
            emit(&table(&header, &cells, &numeric))
        }
    }
}
