//! What the kernel says is loaded and attached, from `bpftool` (JSON output): the tests compare
//! the daemon's claims with the kernel's own view.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the support code"
)]

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use serde_json::Value;

/// Program names as the kernel keeps them, with their types.
pub const OUR_PROGRAMS: [(&str, &str); 3] = [
    ("ingress", "cgroup_skb"),
    ("egress", "cgroup_skb"),
    ("sock_events", "sock_ops"),
];

/// Program types that hang off syscalls or kernel functions: none of ours may be one.
const TRACING_TYPES: [&str; 6] = [
    "tracepoint",
    "raw_tracepoint",
    "raw_tracepoint_writable",
    "kprobe",
    "tracing",
    "perf_event",
];

fn bpftool(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool (installed by scripts/bootstrap.sh)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(Vec::new()))
}

/// Every loaded program as (id, type, name).
pub fn programs() -> Vec<(u64, String, String)> {
    bpftool(&["prog", "show"])
        .as_array()
        .map(|programs| {
            programs
                .iter()
                .map(|p| {
                    (
                        p["id"].as_u64().unwrap_or_default(),
                        p["type"].as_str().unwrap_or_default().to_owned(),
                        p["name"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Ids of loaded programs named and typed like ours (other daemons, e.g. another test, may
/// load and unload theirs meanwhile: tests compare sets of ids, not counts).
pub fn our_program_ids() -> BTreeSet<u64> {
    programs()
        .into_iter()
        .filter(|(_, kind, name)| OUR_PROGRAMS.iter().any(|(n, k)| n == name && k == kind))
        .map(|(id, _, _)| id)
        .collect()
}

/// Ids of loaded programs of a syscall- or function-tracing type.
pub fn tracing_program_ids() -> BTreeSet<u64> {
    programs()
        .into_iter()
        .filter(|(_, kind, _)| TRACING_TYPES.contains(&kind.as_str()))
        .map(|(id, _, _)| id)
        .collect()
}

/// The cgroup v2 root, from this process's mount table (`/sys/fs/cgroup` on current systems,
/// `/sys/fs/cgroup/unified` in the hybrid layout).
pub fn cgroup2_root() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mountinfo
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            if after.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            before.split_whitespace().nth(4).map(PathBuf::from)
        })
        .expect("a cgroup v2 mount")
}

/// (program id, attach type) of everything attached to the cgroup v2 root.
pub fn root_attachments() -> Vec<(u64, String)> {
    let root = cgroup2_root();
    bpftool(&["cgroup", "show", &root.to_string_lossy()])
        .as_array()
        .map(|attached| {
            attached
                .iter()
                .map(|a| {
                    (
                        a["id"].as_u64().unwrap_or_default(),
                        a["attach_type"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Program ids attached through a bpf_link of type cgroup.
pub fn cgroup_link_program_ids() -> BTreeSet<u64> {
    cgroup_links()
        .into_iter()
        .map(|(_, program)| program)
        .collect()
}

/// (link id, program id) of every bpf_link of type cgroup.
pub fn cgroup_links() -> Vec<(u64, u64)> {
    bpftool(&["link", "show"])
        .as_array()
        .map(|links| {
            links
                .iter()
                .filter(|l| l["type"] == "cgroup")
                .filter_map(|l| Some((l["id"].as_u64()?, l["prog_id"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// `RetransSegs` of a /proc/net/snmp text: TCP segments retransmitted in that network namespace.
pub fn retransmitted_segments(snmp: &str) -> u64 {
    let mut tcp = snmp.lines().filter(|line| line.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap_or(""), tcp.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RetransSegs")
        .and_then(|(_, value)| value.parse().ok())
        .expect("RetransSegs")
}
