//! Enrich stage: who is behind a connection — process, cgroup, container and (from the cgroup
//! path) the Kubernetes pod UID. Looked up once per process and cached.
use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use respwatch_resp::correlate::Role;

use crate::{
    aggregate::RowKey,
    event::CommandEvent,
    kube::{Labels, PodIndex, PodMeta},
    sockets::SocketAddrs,
};

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

/// Processes by (pid, cgroup): a pid is looked up once, and again if it shows up in another
/// cgroup (it moved, or the pid was reused).
pub struct ProcessCache {
    /// Where the cgroup v2 hierarchy is mounted (in a container: the host's, mounted there).
    cgroup_root: PathBuf,
    by_pid: HashMap<(u32, u64), Arc<Process>>,
    /// Cgroup paths found by id: containers outlive their processes, so a short-lived client
    /// gone before its first record is read still gets its container and pod.
    cgroup_paths: HashMap<u64, Option<String>>,
}

impl ProcessCache {
    pub fn new(cgroup_root: PathBuf) -> Self {
        Self {
            cgroup_root,
            by_pid: HashMap::new(),
            cgroup_paths: HashMap::new(),
        }
    }

    /// The process `pid` (0: unknown) named `comm`, whose sockets belong to cgroup `cgroup_id`.
    pub fn get(&mut self, pid: u32, comm: String, cgroup_id: u64) -> Arc<Process> {
        if let Some(known) = self.by_pid.get(&(pid, cgroup_id)) {
            return Arc::clone(known);
        }
        let cgroup_path = self.cgroup_path(cgroup_id);
        let (container_id, pod_uid) = cgroup_path
            .as_deref()
            .map(parse_cgroup_path)
            .unwrap_or_default();
        let process = Arc::new(Process {
            pid,
            comm,
            cgroup_id,
            cgroup_path,
            container_id,
            pod_uid,
        });
        self.by_pid.insert((pid, cgroup_id), Arc::clone(&process));
        process
    }

    /// The path of cgroup `cgroup_id` below the root, found once by the id (the directory's
    /// inode number on cgroup v2).
    pub fn cgroup_path(&mut self, cgroup_id: u64) -> Option<String> {
        self.cgroup_paths
            .entry(cgroup_id)
            .or_insert_with(|| find_cgroup(&self.cgroup_root, cgroup_id))
            .clone()
    }

    pub fn retain_alive(&mut self) {
        self.by_pid
            .retain(|(pid, _), _| *pid == 0 || process_alive(*pid));
    }
}

pub fn process_alive(tgid: u32) -> bool {
    Path::new(&format!("/proc/{tgid}")).exists()
}

/// Directories looked at at most when searching a cgroup by id, so a huge hierarchy costs
/// bounded time.
const MAX_CGROUP_SCAN: usize = 100_000;

/// The path (as `/proc/<pid>/cgroup` shows it) of the cgroup v2 directory whose inode number is
/// `cgroup_id`: on cgroup v2 the id the kernel reports is the directory's inode number.
fn find_cgroup(root: &Path, cgroup_id: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mut pending = vec![root.to_path_buf()];
    let mut scanned = 0;
    while let Some(dir) = pending.pop() {
        scanned += 1;
        if scanned > MAX_CGROUP_SCAN {
            return None;
        }
        if fs::metadata(&dir).is_ok_and(|meta| meta.ino() == cgroup_id) {
            let relative = dir.strip_prefix(root).ok()?.to_str()?;
            return Some(format!("/{relative}"));
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        pending.extend(
            entries
                .filter_map(Result::ok)
                .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                .map(|entry| entry.path()),
        );
    }
    None
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
    fn finds_a_cgroup_by_its_inode() {
        use std::os::unix::fs::MetadataExt;
        let root = std::env::temp_dir().join(format!("respwatch-cgroups-{}", std::process::id()));
        let leaf = root.join("kubepods/besteffort/podabc").join(ID);
        fs::create_dir_all(&leaf).unwrap();
        fs::create_dir_all(root.join("system.slice/sshd.service")).unwrap();
        let id = fs::metadata(&leaf).unwrap().ino();
        assert_eq!(
            find_cgroup(&root, id),
            Some(format!("/kubepods/besteffort/podabc/{ID}"))
        );
        assert_eq!(
            find_cgroup(&root, fs::metadata(&root).unwrap().ino()),
            Some("/".into())
        );
        assert_eq!(find_cgroup(&root, u64::MAX), None);
        fs::remove_dir_all(&root).unwrap();
    }

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

/// Maps processes to their attribution and events to aggregation rows. Without a pod index
/// (Kubernetes off) it attributes processes to containers only; with one, it resolves pod UID
/// and container id to names on every lookup (misses are never cached, so an event whose pod
/// is not known yet is attributed fully once the watcher has it).
#[derive(Clone, Debug, Default)]
pub struct Attributor {
    pods: Option<Arc<PodIndex>>,
    /// `--namespaces`: when not empty, only these namespaces' pods are observed.
    namespaces: Arc<Vec<String>>,
}

impl Attributor {
    pub fn new(pods: Option<Arc<PodIndex>>, namespaces: Vec<String>) -> Self {
        Self {
            pods,
            namespaces: Arc::new(namespaces),
        }
    }

    pub fn pods(&self) -> Option<&Arc<PodIndex>> {
        self.pods.as_ref()
    }

    /// Changes whenever processes may resolve to other pods or names than before.
    pub fn generation(&self) -> u64 {
        self.pods.as_ref().map_or(0, |pods| pods.generation())
    }

    /// `GetStatus.kubernetes_sync`: `disabled` without Kubernetes, else the watcher's state.
    pub fn sync_state(&self) -> String {
        self.pods
            .as_ref()
            .map_or_else(|| "disabled".to_owned(), |pods| pods.sync_state())
    }

    /// The pod a process runs in, by pod UID (from its cgroup) or else by container id.
    pub fn pod_of(&self, process: &Process) -> Option<Arc<PodMeta>> {
        let pods = self.pods.as_ref()?;
        process
            .pod_uid
            .as_deref()
            .and_then(|uid| pods.by_uid(uid))
            .or_else(|| {
                process
                    .container_id
                    .as_deref()
                    .and_then(|id| pods.by_container(id))
            })
    }

    pub fn attribution(&self, process: &Process) -> Attribution {
        let short = process
            .container_id
            .as_deref()
            .map(short_id)
            .unwrap_or_default()
            .to_owned();
        match self.pod_of(process) {
            Some(pod) => Attribution {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                container: process
                    .container_id
                    .as_deref()
                    .and_then(|id| pod.containers.get(id))
                    .cloned()
                    .unwrap_or(short),
            },
            None => Attribution {
                namespace: String::new(),
                pod: String::new(),
                container: short,
            },
        }
    }

    /// What a row key holds of `process` (role, peer and command left empty/default): for
    /// judging what can be judged before there is an event.
    pub fn process_key(&self, process: &Process) -> RowKey {
        let who = self.attribution(process);
        RowKey {
            role: respwatch_resp::correlate::Role::Client,
            namespace: who.namespace,
            pod: who.pod,
            container: who.container,
            pid: process.pid,
            comm: process.comm.clone(),
            peer: String::new(),
            command: String::new(),
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
            command: event.command.to_string(),
        }
    }

    /// Whether `--namespaces` lets this event through (always, without a scope). With a
    /// scope, events of host processes and of pods not known (yet) are left out.
    pub fn in_scope(&self, event: &CommandEvent) -> bool {
        if self.namespaces.is_empty() {
            return true;
        }
        self.pod_of(&event.conn.process)
            .is_some_and(|pod| self.namespaces.contains(&pod.namespace))
    }

    /// Whether a process can never be in `--namespaces`' scope: a host process (no pod, no
    /// container in its cgroup path) or a known pod of another namespace. A pod not known yet
    /// is undecided: its cgroup is never excluded in the kernel on a guess.
    pub fn never_in_scope(&self, process: &Process) -> bool {
        if self.namespaces.is_empty() {
            return false;
        }
        if process.pod_uid.is_none() && process.container_id.is_none() {
            return true;
        }
        self.pod_of(process)
            .is_some_and(|pod| !self.namespaces.contains(&pod.namespace))
    }

    /// A row recorded before its pod (or container name) was known, with the names known now:
    /// stats and metrics catch up once the watcher does. `None`: nothing to change.
    pub fn resolve_row(&self, key: &RowKey) -> Option<RowKey> {
        let pods = self.pods.as_ref()?;
        let unresolved =
            key.container.len() == 12 && key.container.chars().all(|c| c.is_ascii_hexdigit());
        if !unresolved {
            return None;
        }
        let pod = pods.by_container(&key.container)?;
        if !key.pod.is_empty() && (key.pod != pod.name || key.namespace != pod.namespace) {
            return None;
        }
        let container = pod
            .containers
            .iter()
            .find(|(id, _)| id.starts_with(&key.container))
            .map(|(_, name)| name.clone())?;
        Some(RowKey {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            container,
            ..key.clone()
        })
    }

    /// A pod by namespace and name (deleted ones during their grace period included).
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<PodMeta>> {
        if name.is_empty() {
            return None;
        }
        self.pods.as_ref()?.by_name(namespace, name)
    }

    /// The pod's labels (none when unknown).
    pub fn labels(&self, namespace: &str, name: &str) -> Arc<Labels> {
        self.pod(namespace, name)
            .map(|pod| Arc::clone(&pod.labels))
            .unwrap_or_default()
    }

    /// `namespace/name` of the pod with the IP of a peer (`ip` or `ip:port`), if any.
    /// `namespace/pod` of a peer (`ip:port` or `ip`): a pod of this node by its IP, else a pod
    /// anywhere in the cluster by an EndpointSlice endpoint.
    pub fn peer_pod(&self, peer: &str) -> String {
        let (Some(pods), Some(ip)) = (self.pods.as_ref(), peer_ip(peer)) else {
            return String::new();
        };
        if let Some(pod) = pods.by_ip(&ip) {
            return format!("{}/{}", pod.namespace, pod.name);
        }
        pods.peers
            .lookup(&ip)
            .and_then(|name| name.pod)
            .unwrap_or_default()
    }

    /// `namespace/service` of a peer: a Service's cluster IP (what clients connect to behind
    /// kube-proxy), or the Service of the endpoint it is.
    pub fn peer_service(&self, peer: &str) -> String {
        let (Some(pods), Some(ip)) = (self.pods.as_ref(), peer_ip(peer)) else {
            return String::new();
        };
        pods.peers
            .lookup(&ip)
            .and_then(|name| name.service)
            .unwrap_or_default()
    }

    /// Whether a row belongs to a pod that is gone for good: attributed to a pod the (synced)
    /// watcher no longer knows, its deletion grace period over. Such rows expire like rows of
    /// exited processes.
    pub fn pod_gone(&self, key: &RowKey) -> bool {
        let Some(pods) = self.pods.as_ref() else {
            return false;
        };
        !key.pod.is_empty() && pods.is_synced() && pods.by_name(&key.namespace, &key.pod).is_none()
    }
}

/// The first 12 characters, as container tools show ids.
fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Client role: the server's `ip:port`; server role: the client's IP (its port is ephemeral).
fn peer_ip(peer: &str) -> Option<std::net::IpAddr> {
    peer.parse::<std::net::SocketAddr>()
        .map(|addr| addr.ip())
        .or_else(|_| peer.parse())
        .ok()
}

fn peer_label(event: &CommandEvent) -> String {
    match RowPeer::of(event) {
        RowPeer::Server(addr) => addr.to_string(),
        RowPeer::Client(ip) => ip.to_string(),
        RowPeer::Unknown => String::new(),
    }
}

/// The part of a connection's peer that its stats row names: a client's rows name the server
/// (`ip:port`), a server's rows only the client's IP (client ports are ephemeral). Cheap to
/// hash, unlike the row's label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RowPeer {
    Server(SocketAddr),
    Client(IpAddr),
    Unknown,
}

impl RowPeer {
    pub fn of(event: &CommandEvent) -> RowPeer {
        match &event.conn.socket {
            Some(SocketAddrs { peer, .. }) => match event.role {
                Role::Client => RowPeer::Server(*peer),
                Role::Server => RowPeer::Client(peer.ip()),
            },
            None => RowPeer::Unknown,
        }
    }
}

#[cfg(test)]
mod attributor_tests {
    use std::time::Duration;

    use super::*;
    use crate::kube::PodMeta;

    const ID: &str = "4f0a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a";
    const UID: &str = "0f4e2b1a-9c8d-4e7f-a6b5-c4d3e2f1a0b9";

    fn process() -> Process {
        Process {
            pid: 42,
            comm: "app".into(),
            cgroup_id: 7,
            cgroup_path: None,
            container_id: Some(ID.into()),
            pod_uid: Some(UID.into()),
        }
    }

    fn web() -> PodMeta {
        PodMeta {
            uid: UID.into(),
            namespace: "prod".into(),
            name: "web-1".into(),
            containers: [(ID.to_owned(), "app".to_owned())].into(),
            ..PodMeta::default()
        }
    }

    fn key(namespace: &str, pod: &str, container: &str) -> RowKey {
        RowKey {
            role: Role::Client,
            namespace: namespace.into(),
            pod: pod.into(),
            container: container.into(),
            pid: 42,
            comm: "app".into(),
            peer: String::new(),
            command: "get".into(),
        }
    }

    #[test]
    fn without_kubernetes_containers_only() {
        let attributor = Attributor::default();
        assert_eq!(attributor.sync_state(), "disabled");
        let who = attributor.attribution(&process());
        assert_eq!((who.namespace.as_str(), who.pod.as_str()), ("", ""));
        assert_eq!(who.container, &ID[..12]);
        assert!(!attributor.pod_gone(&key("prod", "web-1", "app")));
    }

    #[test]
    fn misses_are_retried_and_rows_catch_up() {
        let index = Arc::new(PodIndex::new(Duration::from_millis(30)));
        let attributor = Attributor::new(Some(Arc::clone(&index)), Vec::new());
        // Not known yet: container-level attribution, and no cached miss.
        assert_eq!(attributor.attribution(&process()).pod, "");
        let early = key("", "", &ID[..12]);
        assert_eq!(attributor.resolve_row(&early), None);
        index.apply(web());
        let who = attributor.attribution(&process());
        assert_eq!(
            (
                who.namespace.as_str(),
                who.pod.as_str(),
                who.container.as_str()
            ),
            ("prod", "web-1", "app")
        );
        assert_eq!(
            attributor.resolve_row(&early),
            Some(key("prod", "web-1", "app"))
        );
        assert_eq!(attributor.resolve_row(&key("prod", "web-1", "app")), None);
        // Deleted: still named during the grace period; gone (for expiry) after it, once synced.
        index.set_sync_state("synced");
        index.delete(UID);
        assert_eq!(attributor.attribution(&process()).pod, "web-1");
        assert!(!attributor.pod_gone(&key("prod", "web-1", "app")));
        std::thread::sleep(Duration::from_millis(40));
        assert!(attributor.pod_gone(&key("prod", "web-1", "app")));
        assert!(!attributor.pod_gone(&key("", "", "app")));
        index.set_sync_state("unreachable: test");
        assert!(!attributor.pod_gone(&key("prod", "web-1", "app")));
    }
}
