//! `redisctl stats`: per-command stats with INFO commandstats names.
use std::time::Duration;

use respwatch_proto::v1;

use super::{Group, SortBy, TableOutput, sort_rows};
use crate::{
    client::{ServerArgs, connect, status_error},
    filters::{FilterArgs, parse_duration},
    format::{emit, error_total, latency_usec, role, row_json, table, who},
};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  redisctl stats                                   every process and command since the daemon started
  redisctl stats --group-by pod,command -n shop    per pod of namespace shop
  redisctl stats --role server --sort p99          Redis servers' slowest commands
  redisctl stats --window 60s --errors-only        what failed in the last minute
  redisctl stats -o json                           one JSON array (INFO commandstats names)")]
pub struct StatsArgs {
    #[command(flatten)]
    pub filters: FilterArgs,
    /// Group by these (comma-separated); the rest are summed. Role always stays.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "namespace,pod,container,process,role,command"
    )]
    pub group_by: Vec<Group>,
    /// Sort (descending) by.
    #[arg(long, value_enum, default_value_t = SortBy::Calls)]
    pub sort: SortBy,
    /// Only the last this-long (at most 120s) instead of since the daemon started.
    #[arg(long, value_parser = parse_duration)]
    pub window: Option<Duration>,
    /// Show at most N rows (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = TableOutput::Table)]
    pub output: TableOutput,
}

pub async fn fetch(
    server: &ServerArgs,
    filters: &FilterArgs,
    group_by: &[Group],
    window: Option<Duration>,
) -> anyhow::Result<v1::GetStatsResponse> {
    let mut client = connect(server).await?;
    let request = v1::GetStatsRequest {
        allow: vec![filters.to_proto()],
        deny: Vec::new(),
        group_by: group_by.iter().map(|g| g.proto() as i32).collect(),
        window_seconds: window
            .map(|w| w.as_secs().max(1) as u32)
            .unwrap_or_default(),
    };
    Ok(client
        .get_stats(request)
        .await
        .map_err(|s| status_error(&server.server, s))?
        .into_inner())
}

pub async fn run(server: &ServerArgs, args: StatsArgs) -> anyhow::Result<()> {
    let response = fetch(server, &args.filters, &args.group_by, args.window).await?;
    let mut rows = response.rows;
    sort_rows(&mut rows, args.sort);
    if args.limit > 0 {
        rows.truncate(args.limit);
    }
    match args.output {
        TableOutput::Json => {
            let array: Vec<serde_json::Value> = rows.iter().map(row_json).collect();
            emit(&format!("{}\n", serde_json::Value::Array(array)))
        }
        TableOutput::Table => emit(&render(&rows)),
    }
}

pub fn render(rows: &[v1::StatsRow]) -> String {
    let header = [
        "WHO",
        "ROLE",
        "COMMAND",
        "CALLS",
        "USEC",
        "USEC/CALL",
        "P50",
        "P99",
        "MAX",
        "FAILED",
        "REJECTED",
        "ERRORS",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let errors: Vec<String> = row
                .errors
                .iter()
                .map(|(prefix, count)| format!("{prefix}:{count}"))
                .collect();
            vec![
                who(&row.namespace, &row.pod, &row.comm, row.pid),
                role(row.role).to_owned(),
                if row.command.is_empty() {
                    "*".to_owned()
                } else {
                    row.command.clone()
                },
                row.calls.to_string(),
                row.usec.to_string(),
                format!("{:.2}", row.usec_per_call),
                latency_usec(row.p50_usec),
                latency_usec(row.p99_usec),
                latency_usec(row.max_usec),
                row.failed_calls.to_string(),
                row.rejected_calls.to_string(),
                if error_total(row) == 0 {
                    "-".to_owned()
                } else {
                    errors.join(",")
                },
            ]
        })
        .collect();
    let numeric = [
        false, false, false, true, true, true, true, true, true, true, true, false,
    ];
    table(&header, &cells, &numeric)
}
