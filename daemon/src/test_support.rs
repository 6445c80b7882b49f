//! Test support shared by the unit tests of several modules: events as the pipeline makes them.
use std::sync::Arc;

use respwatch_resp::correlate::{Outcome, Role};

use crate::{
    enrich::Process,
    event::CommandEvent,
    streams::{ConnId, ConnMeta},
};

/// A connection of process `pid` (comm `app`).
pub fn conn(id: u64, pid: u32) -> Arc<ConnMeta> {
    Arc::new(ConnMeta {
        id: ConnId(id),
        process: Arc::new(Process {
            pid,
            comm: "app".into(),
            cgroup_id: 1,
            cgroup_path: None,
            container_id: None,
            pod_uid: None,
        }),
        socket: None,
        opener: None,
        mid_stream: false,
    })
}

/// A `command` of `conn` served at `second` (Unix time), taking `latency_ns`.
pub fn event(
    conn: &Arc<ConnMeta>,
    command: &str,
    second: u64,
    latency_ns: u64,
) -> Arc<CommandEvent> {
    Arc::new(CommandEvent {
        time_unix_ns: second * 1_000_000_000 + 5,
        role: Role::Server,
        conn: Arc::clone(conn),
        command: command.to_owned().into(),
        key: None,
        argc: 2,
        request_bytes: 10,
        reply_bytes: 5,
        reply: "bulk",
        error: None,
        outcome: Outcome::Ok,
        counted: command != "nosuch",
        latency_ns,
        pipeline_depth: 1,
        in_transaction: false,
    })
}
