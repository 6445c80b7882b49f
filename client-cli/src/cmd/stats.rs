//! `redisctl stats`: per-command stats with INFO commandstats names.
use std::time::Duration;

use respwatch_proto::v1;

use super::{Group, SortBy, TableOutput, compare_rows, sort_rows};
use crate::{
    client::{ServerArgs, connect, status_error},
    cluster::{Answers, ClusterArgs, Failure, ask_all},
    filters::{FilterArgs, parse_duration},
    format::{emit, error_total, latency_usec, role, row_json, table, visible, who},
};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  redisctl stats                                   every process and command since the daemon started
  redisctl stats --group-by pod,command -n shop    per pod of namespace shop
  redisctl stats --role server --sort p99          Redis servers' slowest commands
  redisctl stats --window 60s --errors-only        what failed in the last minute
  redisctl stats -o json                           one JSON array (INFO commandstats names)
  redisctl --cluster stats -n shop                 every node's rows in one table (NODE column)

With --cluster, JSON rows carry \"node\"; a node that gave no answer is named on stderr, under
the table, and in the JSON array as {\"node\", \"pod\", \"address\", \"error\"}.")]
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

/// `redisctl --cluster stats`: GetStats on every node's daemon at once, rows merged into one
/// table (NODE column) in the usual order. Nodes that did not answer go to stderr and the
/// footer (JSON: an `error` entry), so a partial answer never looks complete; the exit status
/// is non-zero only when no node answered.
pub async fn run_cluster(
    server: &ServerArgs,
    cluster: &ClusterArgs,
    args: StatsArgs,
) -> anyhow::Result<()> {
    let (filters, group_by, window) = (args.filters.clone(), args.group_by.clone(), args.window);
    let Answers {
        nodes,
        answered,
        failed,
    } = ask_all(cluster, server, "stats", move |daemon| {
        let (filters, group_by) = (filters.clone(), group_by.clone());
        async move { fetch(&daemon, &filters, &group_by, window).await }
    })
    .await?;
    let mut rows: Vec<(String, v1::StatsRow)> = answered
        .into_iter()
        .flat_map(|(daemon, response)| {
            let node = daemon.node_name(&response.node);
            response
                .rows
                .into_iter()
                .map(move |row| (node.clone(), row))
        })
        .collect();
    rows.sort_by(|(a_node, a), (b_node, b)| {
        compare_rows(a, b, args.sort).then_with(|| a_node.cmp(b_node))
    });
    if args.limit > 0 {
        rows.truncate(args.limit);
    }
    match args.output {
        TableOutput::Json => {
            let mut array: Vec<serde_json::Value> = rows
                .iter()
                .map(|(node, row)| {
                    let mut value = row_json(row);
                    if let Some(object) = value.as_object_mut() {
                        object.insert("node".to_owned(), node.clone().into());
                    }
                    value
                })
                .collect();
            array.extend(failed.iter().map(Failure::json));
            emit(&format!("{}\n", serde_json::Value::Array(array)))
        }
        TableOutput::Table => {
            let mut text = table_of(rows.iter().map(|(node, row)| (Some(node.as_str()), row)));
            if !failed.is_empty() {
                let silent: Vec<&str> = failed.iter().map(|f| f.node.as_str()).collect();
                text.push_str(&format!(
                    "\n{} of {nodes} nodes answered; not answered: {}\n",
                    nodes - failed.len(),
                    silent.join(", ")
                ));
            }
            emit(&text)
        }
    }
}

pub fn render(rows: &[v1::StatsRow]) -> String {
    table_of(rows.iter().map(|row| (None, row)))
}

/// The stats table; a NODE column first when rows come with nodes (`--cluster`).
fn table_of<'a>(rows: impl Iterator<Item = (Option<&'a str>, &'a v1::StatsRow)>) -> String {
    let rows: Vec<_> = rows.collect();
    let with_nodes = rows.iter().any(|(node, _)| node.is_some());
    let mut header = vec![
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
    let mut numeric = vec![
        false, false, false, true, true, true, true, true, true, true, true, false,
    ];
    if with_nodes {
        header.insert(0, "NODE");
        numeric.insert(0, false);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|(node, row)| {
            let errors: Vec<String> = row
                .errors
                .iter()
                .map(|(prefix, count)| format!("{}:{count}", visible(prefix)))
                .collect();
            let mut cells = vec![
                who(&row.namespace, &row.pod, &row.comm, row.pid),
                role(row.role).to_owned(),
                if row.command.is_empty() {
                    "*".to_owned()
                } else {
                    visible(&row.command).into_owned()
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
            ];
            if with_nodes {
                cells.insert(0, node.unwrap_or_default().to_owned());
            }
            cells
        })
        .collect();
    table(&header, &cells, &numeric)
}
