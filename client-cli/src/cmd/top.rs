//! `redisctl top`: the busiest (or slowest, or failing) commands per pod/process over a recent
//! window, refreshed like `top`.
use std::{io::Write, time::Duration};

use respwatch_proto::v1;

use super::{Group, SortBy, sort_rows};
use crate::{
    client::{ServerArgs, connect, status_error},
    filters::{FilterArgs, parse_duration},
    format::{clock, colour_enabled, error_total, latency_usec, paint, role, table, visible, who},
};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  redisctl top                          busiest commands per pod/process, last 10s, refreshed every 2s
  redisctl top --sort p99 --role server slowest commands as Redis servers see them
  redisctl top -n shop --window 60s     namespace shop over the last minute
  redisctl top --once                   print one frame and exit (scripts, tests)")]
pub struct TopArgs {
    #[command(flatten)]
    pub filters: FilterArgs,
    /// The recent window each frame covers (at most 120s).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub window: Duration,
    /// Time between frames.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub interval: Duration,
    /// Sort (descending) by.
    #[arg(long, value_enum, default_value_t = SortBy::Calls)]
    pub sort: SortBy,
    /// Group by these (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "namespace,pod,process,role,command"
    )]
    pub group_by: Vec<Group>,
    /// Rows per frame.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print one frame and exit.
    #[arg(long)]
    pub once: bool,
}

pub async fn run(server: &ServerArgs, args: TopArgs) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    let colour = colour_enabled();
    let window = args.window.as_secs().clamp(1, 120) as u32;
    let request = v1::GetStatsRequest {
        allow: vec![args.filters.to_proto()],
        deny: Vec::new(),
        group_by: args.group_by.iter().map(|g| g.proto() as i32).collect(),
        window_seconds: window,
    };
    let mut tick = tokio::time::interval(args.interval.max(Duration::from_millis(200)));
    loop {
        tick.tick().await;
        let stats = client
            .get_stats(request.clone())
            .await
            .map_err(|s| status_error(&server.server, s))?
            .into_inner();
        let status = client
            .get_status(v1::GetStatusRequest {})
            .await
            .map_err(|s| status_error(&server.server, s))?
            .into_inner();
        let text = frame(stats, &status, window, &args, colour);
        let mut out = std::io::stdout().lock();
        let written = if args.once {
            write!(out, "{text}")
        } else {
            // Home, clear, frame: like top.
            write!(out, "\x1b[H\x1b[2J{text}")
        };
        if written.and_then(|()| out.flush()).is_err() || args.once {
            return Ok(());
        }
        drop(out);
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(Duration::ZERO) => {}
        }
    }
}

fn frame(
    stats: v1::GetStatsResponse,
    status: &v1::GetStatusResponse,
    window: u32,
    args: &TopArgs,
    colour: bool,
) -> String {
    let mut rows = stats.rows;
    let total_calls: u64 = rows.iter().map(|r| r.calls).sum();
    let total_errors: u64 = rows.iter().map(error_total).sum();
    let lost: u64 = status.losses.iter().map(|l| l.count).sum();
    sort_rows(&mut rows, args.sort);
    let shown = rows.len().min(args.limit);
    let mut out = format!(
        "respwatch top - node {} - {} UTC - last {window}s - {:.1} cmd/s - {} errors - {} losses - {} connections\n",
        stats.node,
        clock(stats.time.as_ref()),
        total_calls as f64 / f64::from(window),
        total_errors,
        lost,
        status.tracked_connections,
    );
    out.push_str(
        &format!(
            "{} rows, sorted by {:?}, showing {shown}\n\n",
            rows.len(),
            args.sort
        )
        .to_lowercase(),
    );
    let header = [
        "WHO",
        "ROLE",
        "COMMAND",
        "CALLS/S",
        "CALLS",
        "USEC/CALL",
        "P99",
        "MAX",
        "ERRORS",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .take(shown)
        .map(|row| {
            let errors = error_total(row);
            vec![
                who(&row.namespace, &row.pod, &row.comm, row.pid),
                role(row.role).to_owned(),
                if row.command.is_empty() {
                    "*".to_owned()
                } else {
                    visible(&row.command).into_owned()
                },
                format!("{:.1}", row.calls as f64 / f64::from(window)),
                row.calls.to_string(),
                format!("{:.2}", row.usec_per_call),
                latency_usec(row.p99_usec),
                latency_usec(row.max_usec),
                if errors == 0 {
                    "-".to_owned()
                } else {
                    paint(colour, "31", &errors.to_string())
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &header,
        &cells,
        &[false, false, false, true, true, true, true, true, false],
    ));
    out
}
