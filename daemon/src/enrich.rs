//! Enrich stage: who is behind a connection — process, cgroup, container and (from the cgroup
//! path) the Kubernetes pod UID. Looked up once per process and cached.
use std::{collections::HashMap, fs, path::Path, sync::Arc};

use respwatch_resp::correlate::Role;

use crate::{aggregate::RowKey, capture::comm_str, event::CommandEvent, sockets::SocketAddrs};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    /// The cgroup v2 path (`0::` line of `/proc/<pid>/cgroup`), when the process was still there.
    pub cgroup_path: Option<String>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
}

#[derive(Default)]
pub struct ProcessCache {
    by_tgid: HashMap<u32, Arc<Process>>,
}

impl ProcessCache {
    pub fn get(&mut self, tgid: u32, comm: &[u8; 16], cgroup_id: u64) -> Arc<Process> {
        if let Some(known) = self.by_tgid.get(&tgid)
            && known.cgroup_id == cgroup_id
        {
            return Arc::clone(known);
        }
        let cgroup_path = read_cgroup_path(tgid);
        let (container_id, pod_uid) = cgroup_path
            .as_deref()
            .map(parse_cgroup_path)
            .unwrap_or_default();
        let process = Arc::new(Process {
            pid: tgid,
            comm: comm_str(comm),
            cgroup_id,
            cgroup_path,
            container_id,
            pod_uid,
        });
        self.by_tgid.insert(tgid, Arc::clone(&process));
        process
    }

    pub fn retain_alive(&mut self) {
        self.by_tgid.retain(|tgid, _| process_alive(*tgid));
    }
}

pub fn process_alive(tgid: u32) -> bool {
    Path::new(&format!("/proc/{tgid}")).exists()
}

fn read_cgroup_path(tgid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{tgid}/cgroup")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Container id and pod UID from a kubelet-style cgroup path: the systemd driver writes
/// `kubepods-besteffort-pod<uid with _ for ->.slice/cri-containerd-<id>.scope`, the cgroupfs
/// driver `kubepods/besteffort/pod<uid>/<id>`; CRI-O and Docker use `crio-`/`docker-` scopes.
pub fn parse_cgroup_path(path: &str) -> (Option<String>, Option<String>) {
    let mut container = None;
    let mut pod = None;
    for part in path.split('/') {
        if let Some(uid) = pod_uid_of(part) {
            pod = Some(uid);
        } else if let Some(id) = container_id_of(part) {
            container = Some(id);
        }
    }
    (container, pod)
}

fn pod_uid_of(part: &str) -> Option<String> {
    // systemd: kubepods-burstable-pod1234_5678.slice; cgroupfs: pod1234-5678
    let rest = part.strip_suffix(".slice").unwrap_or(part);
    let start = rest.rfind("pod")?;
    if start > 0 && !rest[..start].ends_with('-') {
        return None;
    }
    let uid = &rest[start + 3..];
    let valid = uid.len() >= 32
        && uid
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_');
    valid.then(|| uid.replace('_', "-"))
}

fn container_id_of(part: &str) -> Option<String> {
    let stem = part.strip_suffix(".scope").unwrap_or(part);
    let id = ["cri-containerd-", "crio-", "docker-", "containerd-"]
        .iter()
        .find_map(|prefix| stem.strip_prefix(prefix))
        .unwrap_or(stem);
    (id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f0a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a";

    #[test]
    fn systemd_driver_containerd() {
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f4e2b1a_9c8d_4e7f_a6b5_c4d3e2f1a0b9.slice/cri-containerd-{ID}.scope"
        );
        let (container, pod) = parse_cgroup_path(&path);
        assert_eq!(container.as_deref(), Some(ID));
        assert_eq!(pod.as_deref(), Some("0f4e2b1a-9c8d-4e7f-a6b5-c4d3e2f1a0b9"));
    }

    #[test]
    fn cgroupfs_driver_and_other_runtimes() {
        let path = format!("/kubepods/burstable/pod0f4e2b1a-9c8d-4e7f-a6b5-c4d3e2f1a0b9/{ID}");
        let (container, pod) = parse_cgroup_path(&path);
        assert_eq!(container.as_deref(), Some(ID));
        assert_eq!(pod.as_deref(), Some("0f4e2b1a-9c8d-4e7f-a6b5-c4d3e2f1a0b9"));
        assert_eq!(
            parse_cgroup_path(&format!("/system.slice/crio-{ID}.scope"))
                .0
                .as_deref(),
            Some(ID)
        );
        assert_eq!(
            parse_cgroup_path(&format!("/system.slice/docker-{ID}.scope"))
                .0
                .as_deref(),
            Some(ID)
        );
    }

    #[test]
    fn host_processes_have_neither() {
        assert_eq!(
            parse_cgroup_path("/user.slice/user-0.slice/session-1.scope"),
            (None, None)
        );
        assert_eq!(parse_cgroup_path("/"), (None, None));
        assert_eq!(
            parse_cgroup_path("/system.slice/podman.service"),
            (None, None)
        );
    }
}

/// Who a process is in Kubernetes terms. Empty fields: not known (host process, or no
/// Kubernetes metadata yet).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    pub namespace: String,
    pub pod: String,
    /// Container name when the pod is known, else the short container id.
    pub container: String,
}

/// Maps processes to their attribution and events to aggregation rows.
#[derive(Clone, Debug, Default)]
pub struct Attributor {}

impl Attributor {
    pub fn attribution(&self, process: &Process) -> Attribution {
        Attribution {
            namespace: String::new(),
            pod: String::new(),
            container: process
                .container_id
                .as_deref()
                .map(short_id)
                .unwrap_or_default()
                .to_owned(),
        }
    }

    pub fn row_key(&self, event: &CommandEvent) -> RowKey {
        let process = &event.conn.process;
        let who = self.attribution(process);
        RowKey {
            role: event.role,
            namespace: who.namespace,
            pod: who.pod,
            container: who.container,
            pid: process.pid,
            comm: process.comm.clone(),
            peer: peer_label(event),
            command: event.command.clone(),
        }
    }
}

/// The first 12 characters, as container tools show ids.
fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Client role: the server's `ip:port`; server role: the client's IP (its port is ephemeral).
fn peer_label(event: &CommandEvent) -> String {
    match &event.conn.socket {
        Some(SocketAddrs::Tcp { peer, .. }) => match event.role {
            Role::Client => peer.to_string(),
            Role::Server => peer.ip().to_string(),
        },
        Some(SocketAddrs::Unix { path }) if !path.is_empty() => format!("unix:{path}"),
        Some(SocketAddrs::Unix { .. }) => "unix".to_owned(),
        None => String::new(),
    }
}
