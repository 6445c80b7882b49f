//! Pipeline types → `respwatch.v1` messages.
use respwatch_proto::{timestamp, v1};
use respwatch_resp::correlate::Role;

use crate::{
    aggregate::{GroupBy, RowKey, RowStats},
    enrich::Attributor,
    event::{CommandEvent, outcome_name},
    sockets::SocketAddrs,
};

pub fn role(role: Role) -> v1::Role {
    match role {
        Role::Client => v1::Role::Client,
        Role::Server => v1::Role::Server,
    }
}

pub fn event(key: &RowKey, event: &CommandEvent, attributor: &Attributor) -> v1::CommandEvent {
    let process = &event.conn.process;
    let (workload, workload_kind) = workload(key, attributor);
    let (local_addr, peer_addr) = match &event.conn.socket {
        Some(SocketAddrs { local, peer }) => (local.to_string(), peer.to_string()),
        None => (String::new(), String::new()),
    };
    let (error_prefix, error_message) = event
        .error
        .as_ref()
        .map(|e| (e.prefix.to_string(), e.message()))
        .unwrap_or_default();
    v1::CommandEvent {
        time: Some(timestamp(event.time_unix_ns)),
        role: role(event.role) as i32,
        namespace: key.namespace.clone(),
        pod: key.pod.clone(),
        container: key.container.clone(),
        pid: process.pid,
        comm: process.comm.clone(),
        container_id: process.container_id.clone().unwrap_or_default(),
        local_addr,
        peer_addr: peer_addr.clone(),
        command: event.command.to_string(),
        key: event.key.clone().unwrap_or_default(),
        argc: event.argc,
        request_bytes: event.request_bytes,
        reply_bytes: event.reply_bytes,
        reply: event.reply.to_owned(),
        error_prefix,
        error_message,
        outcome: outcome_name(event.outcome).to_owned(),
        counted: event.counted,
        latency_ns: event.latency_ns,
        pipeline_depth: event.pipeline_depth,
        in_transaction: event.in_transaction,
        connection: event.conn.id.0,
        workload,
        workload_kind,
        peer_pod: attributor.peer_pod(&peer_addr),
        peer_service: attributor.peer_service(&peer_addr),
    }
}

pub fn row(key: &RowKey, stats: &RowStats, attributor: &Attributor) -> v1::StatsRow {
    let (workload, workload_kind) = workload(key, attributor);
    let usec = |ns: u64| ns as f64 / 1000.0;
    v1::StatsRow {
        command: key.command.clone(),
        calls: stats.calls,
        usec: stats.usec(),
        usec_per_call: stats.usec_per_call(),
        rejected_calls: stats.rejected_calls,
        failed_calls: stats.failed_calls,
        namespace: key.namespace.clone(),
        pod: key.pod.clone(),
        container: key.container.clone(),
        pid: key.pid,
        comm: key.comm.clone(),
        role: role(key.role) as i32,
        peer: key.peer.clone(),
        // Bucket bounds are about 10% wide: never report a quantile above the maximum.
        p50_usec: usec(stats.histogram.quantile(0.50).min(stats.max_ns)),
        p99_usec: usec(stats.histogram.quantile(0.99).min(stats.max_ns)),
        max_usec: usec(stats.max_ns),
        bytes_in: stats.bytes_in,
        bytes_out: stats.bytes_out,
        errors: stats.errors.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        workload,
        workload_kind,
        peer_pod: attributor.peer_pod(&key.peer),
        peer_service: attributor.peer_service(&key.peer),
    }
}

/// The owning workload's name and kind of the row's pod (empty when not known).
pub fn workload(key: &RowKey, attributor: &Attributor) -> (String, String) {
    attributor
        .pod(&key.namespace, &key.pod)
        .map(|pod| (pod.workload.clone(), pod.workload_kind.clone()))
        .unwrap_or_default()
}

/// Rows as they are known now: a row recorded before its pod's metadata arrived gets the
/// names the watcher has since learnt (rows that resolve to one key are merged).
pub fn current_rows(
    rows: Vec<(RowKey, RowStats)>,
    attributor: &Attributor,
) -> Vec<(RowKey, RowStats)> {
    if attributor.pods().is_none() {
        return rows;
    }
    let mut merged: std::collections::HashMap<RowKey, RowStats> =
        std::collections::HashMap::with_capacity(rows.len());
    for (key, stats) in rows {
        let key = attributor.resolve_row(&key).unwrap_or(key);
        merged.entry(key).or_default().merge(&stats);
    }
    merged.into_iter().collect()
}

/// The default grouping: everything but the peer.
pub const DEFAULT_GROUP_BY: [GroupBy; 6] = [
    GroupBy::Namespace,
    GroupBy::Pod,
    GroupBy::Container,
    GroupBy::Process,
    GroupBy::Role,
    GroupBy::Command,
];

pub fn group_by(values: &[i32]) -> Result<Vec<GroupBy>, tonic::Status> {
    if values.is_empty() {
        return Ok(DEFAULT_GROUP_BY.to_vec());
    }
    values
        .iter()
        .map(|value| match v1::GroupBy::try_from(*value) {
            Ok(v1::GroupBy::Namespace) => Ok(GroupBy::Namespace),
            Ok(v1::GroupBy::Pod) => Ok(GroupBy::Pod),
            Ok(v1::GroupBy::Container) => Ok(GroupBy::Container),
            Ok(v1::GroupBy::Process) => Ok(GroupBy::Process),
            Ok(v1::GroupBy::Role) => Ok(GroupBy::Role),
            Ok(v1::GroupBy::Command) => Ok(GroupBy::Command),
            Ok(v1::GroupBy::Peer) => Ok(GroupBy::Peer),
            Ok(v1::GroupBy::Unspecified) | Err(_) => Err(tonic::Status::invalid_argument(format!(
                "unknown group_by value {value}"
            ))),
        })
        .collect()
}
