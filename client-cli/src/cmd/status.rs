//! `redisctl status`: the daemon's version, uptime, programs, counters and losses.
use std::fmt::Write as _;

use respwatch_proto::v1;
use serde_json::json;

use super::TableOutput;
use crate::{
    client::{ServerArgs, connect, status_error},
    format::{emit, rfc3339},
};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  redisctl status
  redisctl --server unix:/run/respwatch/api.sock status -o json")]
pub struct StatusArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = TableOutput::Table)]
    pub output: TableOutput,
}

pub async fn run(server: &ServerArgs, args: StatusArgs) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    let status = client
        .get_status(v1::GetStatusRequest {})
        .await
        .map_err(|s| status_error(&server.server, s))?
        .into_inner();
    let loss_source = |l: &v1::Loss| {
        v1::LossSource::try_from(l.source)
            .unwrap_or_default()
            .short_name()
    };
    match args.output {
        TableOutput::Json => {
            let losses: Vec<_> = status
                .losses
                .iter()
                .map(|l| json!({"source": loss_source(l), "reason": l.reason, "count": l.count}))
                .collect();
            let value = json!({
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
                "losses": losses,
                "tracked_connections": status.tracked_connections,
                "subscribers": status.subscribers,
                "stats_rows": status.stats_rows,
                "kubernetes_sync": status.kubernetes_sync,
            });
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
