//! Test support shared by the unit tests of several modules: events as the pipeline makes them.
use std::{
    borrow::Cow,
    sync::{Arc, Mutex, PoisonError},
};

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

/// A `command` of `conn` served at `second` (Unix time), taking `latency_ns`. The name is
/// borrowed as the command table's are.
pub fn event(conn: &Arc<ConnMeta>, command: &str, second: u64, latency_ns: u64) -> CommandEvent {
    CommandEvent {
        time_unix_ns: second * 1_000_000_000 + 5,
        role: Role::Server,
        conn: Arc::clone(conn),
        command: Cow::Borrowed(static_name(command)),
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
        detailed: true,
    }
}

/// `name` with a static lifetime, one copy per name however often asked for.
fn static_name(name: &str) -> &'static str {
    static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(PoisonError::into_inner);
    match names.iter().find(|known| **known == name) {
        Some(known) => known,
        None => {
            let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
            names.push(leaked);
            leaked
        }
    }
}
