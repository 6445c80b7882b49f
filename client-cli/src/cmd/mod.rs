//! One module per sub-command.
pub mod stats;
pub mod status;
pub mod top;
pub mod watch;

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WatchOutput {
    /// One readable line per command.
    Compact,
    /// One JSON object per line.
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TableOutput {
    /// An aligned table.
    Table,
    /// One JSON array.
    Json,
}

/// What stats and top sort by (descending).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    /// Most calls first.
    Calls,
    /// Most total time (usec) first.
    Latency,
    /// Slowest p99 first.
    P99,
    /// Most errors first.
    Errors,
}

/// Dimensions for --group-by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Group {
    Namespace,
    Pod,
    Container,
    Process,
    Role,
    Command,
    Peer,
}

impl Group {
    pub fn proto(self) -> respwatch_proto::v1::GroupBy {
        use respwatch_proto::v1::GroupBy;
        match self {
            Group::Namespace => GroupBy::Namespace,
            Group::Pod => GroupBy::Pod,
            Group::Container => GroupBy::Container,
            Group::Process => GroupBy::Process,
            Group::Role => GroupBy::Role,
            Group::Command => GroupBy::Command,
            Group::Peer => GroupBy::Peer,
        }
    }
}

pub fn sort_rows(rows: &mut [respwatch_proto::v1::StatsRow], by: SortBy) {
    rows.sort_by(|a, b| compare_rows(a, b, by));
}

/// The order of `stats` and `top` rows: by the sort key (descending), then calls, then who.
/// Shared so that `--cluster` merges rows from many nodes in the same order.
pub fn compare_rows(
    a: &respwatch_proto::v1::StatsRow,
    b: &respwatch_proto::v1::StatsRow,
    by: SortBy,
) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let key = |row: &respwatch_proto::v1::StatsRow| -> f64 {
        match by {
            SortBy::Calls => row.calls as f64,
            SortBy::Latency => row.usec as f64,
            SortBy::P99 => row.p99_usec,
            SortBy::Errors => {
                (crate::format::error_total(row) + row.failed_calls + row.rejected_calls) as f64
            }
        }
    };
    key(b)
        .partial_cmp(&key(a))
        .unwrap_or(Ordering::Equal)
        .then_with(|| b.calls.cmp(&a.calls))
        .then_with(|| {
            (&a.namespace, &a.pod, a.pid, &a.command, a.role).cmp(&(
                &b.namespace,
                &b.pod,
                b.pid,
                &b.command,
                b.role,
            ))
        })
}
