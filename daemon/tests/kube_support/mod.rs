//! What the Kubernetes tests build for real, short of a cluster: kubelet-named cgroup v2 pod
//! hierarchies with real processes in them, and an API server test double that speaks the
//! Kubernetes wire format (PodList, newline-delimited watch events with resourceVersions,
//! bookmarks, 410 Gone, TokenReview and SubjectAccessReview), reached by the daemon through a
//! kubeconfig file.
#![allow(dead_code, reason = "each test uses a different part")]

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// Upper bound for any wait.
pub const WAIT: Duration = Duration::from_secs(20);

static UNIQUE: AtomicU64 = AtomicU64::new(1);

/// A value unique in this test run (and across concurrent runs: the pid is in it).
pub fn unique() -> u64 {
    (u64::from(std::process::id()) << 16) | UNIQUE.fetch_add(1, Ordering::Relaxed)
}

/// A pod UID (RFC 4122 form) unique to this run.
pub fn pod_uid() -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", 0x5eed_0000u32, unique())
}

/// A 64-hex container id unique to this run.
pub fn container_id() -> String {
    // Mixed, so that the 12-character short ids differ too.
    let u = unique();
    let mixed = u.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) ^ u;
    format!("{mixed:016x}{u:016x}{mixed:016x}{u:016x}")
}

pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// cgroups

/// The cgroup v2 mount point, from /proc/self/mountinfo (`/sys/fs/cgroup` on current nodes,
/// `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_root() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            left.split_whitespace().nth(4).map(PathBuf::from)
        })
        .expect("a cgroup v2 mount")
}

/// Which kubelet cgroup driver to name the hierarchy after.
#[derive(Clone, Copy, Debug)]
pub enum Driver {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope`
    Systemd,
    /// `kubepods/besteffort/pod<uid>/<id>`
    Cgroupfs,
}

/// A container's cgroup, created leaf-last and removed leaf-first (its processes killed and
/// moved out) on drop.
pub struct ContainerCgroup {
    root: PathBuf,
    /// Directories this guard created, outermost first.
    created: Vec<PathBuf>,
    pub leaf: PathBuf,
    children: Vec<Child>,
}

impl ContainerCgroup {
    pub fn create(driver: Driver, uid: &str, id: &str) -> ContainerCgroup {
        let root = cgroup2_root();
        let parts: Vec<String> = match driver {
            Driver::Systemd => vec![
                "kubepods.slice".into(),
                "kubepods-besteffort.slice".into(),
                format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_")),
                format!("cri-containerd-{id}.scope"),
            ],
            Driver::Cgroupfs => vec![
                "kubepods".into(),
                "besteffort".into(),
                format!("pod{uid}"),
                id.to_owned(),
            ],
        };
        let mut created = Vec::new();
        let mut path = root.clone();
        for part in parts {
            path.push(part);
            if !path.exists() {
                match std::fs::create_dir(&path) {
                    Ok(()) => created.push(path.clone()),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => panic!("creating cgroup {}: {e}", path.display()),
                }
            }
        }
        ContainerCgroup {
            root,
            created,
            leaf: path,
            children: Vec::new(),
        }
    }

    /// The cgroup path as `/proc/<pid>/cgroup` shows it.
    pub fn relative(&self) -> String {
        format!(
            "/{}",
            self.leaf
                .strip_prefix(&self.root)
                .expect("under root")
                .display()
        )
    }

    /// Runs `program args` inside this cgroup: the shell moves itself in before it execs, so
    /// every byte of Redis I/O happens in the container's cgroup.
    pub fn spawn(&mut self, program: &str, args: &[&str]) -> u32 {
        let procs = self.leaf.join("cgroup.procs");
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("echo $$ > '{}' && exec \"$@\"", procs.display()))
            .arg("sh")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut command);
        let child = command.spawn().expect("spawn in cgroup");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Runs to completion inside the cgroup; returns stdout.
    pub fn run(&mut self, program: &str, args: &[&str]) -> String {
        let procs = self.leaf.join("cgroup.procs");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > '{}' && exec \"$@\"", procs.display()))
            .arg("sh")
            .arg(program)
            .args(args)
            .output()
            .expect("run in cgroup");
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn wait_all(&mut self) {
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Anything else still inside goes back to the root cgroup.
        if let Ok(text) = std::fs::read_to_string(self.leaf.join("cgroup.procs")) {
            for pid in text.lines() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        // Leaf first; shared parents go only when empty (rmdir fails otherwise).
        let _ = std::fs::remove_dir(&self.leaf);
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

pub fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl in the child before exec; async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Pod objects

/// A pod as the API server returns it.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// (kind, name) of the controller.
    pub owner: Option<(String, String)>,
    pub node: String,
    pub ip: String,
    /// (container name, 64-hex runtime id).
    pub containers: Vec<(String, String)>,
}

impl PodSpec {
    pub fn to_json(&self) -> Value {
        let owners: Vec<Value> = self
            .owner
            .iter()
            .map(|(kind, name)| {
                json!({
                    "apiVersion": if kind == "Job" { "batch/v1" } else { "apps/v1" },
                    "kind": kind, "name": name, "uid": format!("owner-{name}"),
                    "controller": true, "blockOwnerDeletion": true
                })
            })
            .collect();
        let statuses: Vec<Value> = self
            .containers
            .iter()
            .map(|(name, id)| {
                json!({
                    "name": name, "containerID": format!("containerd://{id}"),
                    "image": "docker.io/library/redis:7", "imageID": "sha256:0",
                    "ready": true, "restartCount": 0, "started": true,
                    "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
                })
            })
            .collect();
        let specs: Vec<Value> = self
            .containers
            .iter()
            .map(|(name, _)| json!({"name": name, "image": "docker.io/library/redis:7"}))
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name, "namespace": self.namespace, "uid": self.uid,
                "labels": self.labels, "ownerReferences": owners,
                "creationTimestamp": "2026-01-01T00:00:00Z"
            },
            "spec": {"nodeName": self.node, "containers": specs},
            "status": {
                "phase": "Running", "podIP": self.ip, "podIPs": [{"ip": self.ip}],
                "hostIP": "10.0.0.1", "containerStatuses": statuses
            }
        })
    }
}

/// A pod of one container whose processes run in a cgroup named as kubelet names it.
pub struct Pod {
    pub spec: PodSpec,
    pub cgroup: ContainerCgroup,
}

impl Pod {
    /// Gives `spec` a fresh pod UID and one container, `container`, whose cgroup it creates.
    pub fn create(mut spec: PodSpec, container: &str, driver: Driver) -> Pod {
        spec.uid = pod_uid();
        let id = container_id();
        let cgroup = ContainerCgroup::create(driver, &spec.uid, &id);
        spec.containers = vec![(container.to_owned(), id)];
        Pod { spec, cgroup }
    }
}

/// A respwatchd DaemonSet pod as the API server returns it (labels as in
/// deploy/daemonset.yaml, container ports `grpc` and `metrics`), for `redisctl --cluster`'s
/// discovery.
pub fn daemon_pod_json(namespace: &str, name: &str, node: &str, ip: &str, grpc_port: u16) -> Value {
    let spec = PodSpec {
        uid: pod_uid(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        labels: [
            ("app.kubernetes.io/name", "respwatch"),
            ("app.kubernetes.io/component", "node-daemon"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        owner: Some(("DaemonSet".to_owned(), "respwatch".to_owned())),
        node: node.to_owned(),
        ip: ip.to_owned(),
        containers: vec![("respwatchd".to_owned(), container_id())],
    };
    let mut pod = spec.to_json();
    pod["spec"]["containers"][0]["ports"] = json!([
        {"name": "metrics", "containerPort": 9464, "protocol": "TCP"},
        {"name": "grpc", "containerPort": grpc_port, "protocol": "TCP"},
    ]);
    pod
}

/// Whether `pod` matches a label selector of `k=v`, `k==v` and `k!=v` terms (comma-separated;
/// what the double understands of the real syntax).
pub fn labels_match(pod: &Value, selector: &str) -> bool {
    let labels = &pod["metadata"]["labels"];
    selector
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .all(|term| {
            if let Some((key, value)) = term.split_once("!=") {
                labels[key.trim()].as_str() != Some(value.trim())
            } else if let Some((key, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                labels[key.trim()].as_str() == Some(value.trim())
            } else {
                labels.get(term).is_some()
            }
        })
}

// ---------------------------------------------------------------------------------------------
// The API server double

#[derive(Default)]
struct State {
    rv: u64,
    /// Watch history from this resourceVersion on; older resumes get 410 Gone.
    oldest_rv: u64,
    pods: BTreeMap<String, Value>,
    /// (resourceVersion, type, object).
    log: Vec<(u64, &'static str, Value)>,
    /// Bumped to end every open watch stream (outage, 410).
    generation: u64,
    /// Open watch streams are told 410 Gone (an ERROR event) instead of just ending.
    gone_generation: u64,
    up: bool,
    lists: u64,
    watches: u64,
    requests: Vec<String>,
    /// Other collections (Services, EndpointSlices) by path: listed as set, watched quietly.
    collections: BTreeMap<&'static str, Vec<Value>>,
    /// Bumped when a collection changes: its open watches end.
    collection_changes: u64,
    /// Bearer tokens the TokenReview accepts: token → (user name, groups).
    tokens: BTreeMap<String, (String, Vec<String>)>,
    /// Who may `get pods` where: (user or `group:NAME`, namespace; "" for cluster-wide).
    grants: Vec<(String, String)>,
    /// Every TokenReview and SubjectAccessReview posted, as received.
    reviews: Vec<Value>,
}

/// Paths of the cluster-wide collections the double can serve besides pods, with their list
/// kind and apiVersion.
const COLLECTIONS: &[(&str, &str, &str)] = &[
    ("/api/v1/services", "ServiceList", "v1"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSliceList",
        "discovery.k8s.io/v1",
    ),
];

/// A Kubernetes API server double serving `GET /api/v1/pods` (list and watch, with the field
/// selector applied) in the real wire format.
pub struct ApiServer {
    pub port: u16,
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
    acceptor: Mutex<Option<std::thread::JoinHandle<()>>>,
    dir: PathBuf,
}

impl ApiServer {
    pub fn start() -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let dir = std::env::temp_dir().join(format!("respwatch-kube-{}", unique()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let server = ApiServer {
            port,
            state: Arc::new((
                Mutex::new(State {
                    rv: 1000,
                    oldest_rv: 1000,
                    up: true,
                    ..State::default()
                }),
                Condvar::new(),
            )),
            stop: Arc::new(AtomicBool::new(false)),
            acceptor: Mutex::new(None),
            dir,
        };
        server.accept_on(listener);
        server
    }

    fn accept_on(&self, listener: TcpListener) {
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::clone(&self.state);
        let stop = Arc::clone(&self.stop);
        let handle = std::thread::spawn(move || {
            loop {
                if stop.load(Ordering::Relaxed) || !state.0.lock().expect("state").up {
                    return; // drops the listener: connections are refused from now on
                }
                match listener.accept() {
                    Ok((stream, _)) => {
                        let state = Arc::clone(&state);
                        std::thread::spawn(move || {
                            let _ = serve(stream, &state);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        *self.acceptor.lock().expect("acceptor") = Some(handle);
    }

    /// Writes a kubeconfig pointing at this server (plain http, no auth) and returns its path.
    pub fn kubeconfig(&self) -> PathBuf {
        let path = self.dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: test\ncurrent-context: double\n",
            self.port
        );
        std::fs::write(&path, text).expect("kubeconfig");
        path
    }

    fn change(&self, kind: &'static str, pod: Value, logged: bool) {
        let (lock, cvar) = &*self.state;
        let mut state = lock.lock().expect("state");
        state.rv += 1;
        let rv = state.rv;
        let mut pod = pod;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        let uid = pod["metadata"]["uid"].as_str().expect("uid").to_owned();
        if kind == "DELETED" {
            state.pods.remove(&uid);
        } else {
            state.pods.insert(uid, pod.clone());
        }
        if logged {
            state.log.push((rv, kind, pod));
        } else {
            // As if compaction had eaten the event: only a re-list shows it.
            state.oldest_rv = rv;
        }
        cvar.notify_all();
    }

    pub fn add(&self, pod: &PodSpec) {
        self.change("ADDED", pod.to_json(), true);
    }

    pub fn modify(&self, pod: &PodSpec) {
        self.change("MODIFIED", pod.to_json(), true);
    }

    pub fn delete(&self, pod: &PodSpec) {
        self.change("DELETED", pod.to_json(), true);
    }

    /// Adds a pod given as its JSON object (e.g. [`daemon_pod_json`]).
    pub fn add_json(&self, pod: Value) {
        self.change("ADDED", pod, true);
    }

    /// Deletes a pod given as its JSON object.
    pub fn delete_json(&self, pod: Value) {
        self.change("DELETED", pod, true);
    }

    /// Adds a pod whose ADDED event is lost to history (only a list sees it).
    pub fn add_unlogged(&self, pod: &PodSpec) {
        self.change("ADDED", pod.to_json(), false);
    }

    /// The API server compacts its history: open watches get an ERROR event with a 410 Status,
    /// and resuming from any older resourceVersion is answered 410 Gone.
    pub fn expire_history(&self) {
        let (lock, cvar) = &*self.state;
        let mut state = lock.lock().expect("state");
        state.oldest_rv = state.rv;
        state.gone_generation = state.generation + 1;
        state.generation += 1;
        cvar.notify_all();
    }

    /// Goes away: stops accepting (the port refuses connections) and ends every open stream.
    pub fn go_away(&self) {
        let (lock, cvar) = &*self.state;
        {
            let mut state = lock.lock().expect("state");
            state.up = false;
            state.generation += 1;
            cvar.notify_all();
        }
        if let Some(handle) = self.acceptor.lock().expect("acceptor").take() {
            let _ = handle.join();
        }
    }

    /// Comes back on the same port, with everything that happened meanwhile.
    pub fn come_back(&self) {
        self.state.0.lock().expect("state").up = true;
        let deadline = Instant::now() + WAIT;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(listener) => break listener,
                Err(e) => {
                    assert!(Instant::now() < deadline, "rebinding {}: {e}", self.port);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        self.accept_on(listener);
    }

    /// (lists, watches) served so far.
    pub fn requests(&self) -> (u64, u64) {
        let state = self.state.0.lock().expect("state");
        (state.lists, state.watches)
    }

    pub fn request_log(&self) -> Vec<String> {
        self.state.0.lock().expect("state").requests.clone()
    }

    /// A bearer token the TokenReview accepts as `user` in `groups`.
    pub fn add_token(&self, token: &str, user: &str, groups: &[&str]) {
        let mut state = self.state.0.lock().expect("state");
        let groups = groups.iter().map(|g| (*g).to_owned()).collect();
        state
            .tokens
            .insert(token.to_owned(), (user.to_owned(), groups));
    }

    /// The token stops passing its TokenReview, as when it expires.
    pub fn expire_token(&self, token: &str) {
        self.state.0.lock().expect("state").tokens.remove(token);
    }

    /// Lets `subject` (a user name, or `group:NAME`) `get pods` in `namespace` ("" for every
    /// namespace, as a ClusterRoleBinding would).
    pub fn grant(&self, subject: &str, namespace: &str) {
        let mut state = self.state.0.lock().expect("state");
        state
            .grants
            .push((subject.to_owned(), namespace.to_owned()));
    }

    pub fn revoke(&self, subject: &str, namespace: &str) {
        let mut state = self.state.0.lock().expect("state");
        state
            .grants
            .retain(|(s, ns)| !(s == subject && ns == namespace));
    }

    /// The TokenReviews and SubjectAccessReviews the daemon posted.
    pub fn reviews(&self) -> Vec<Value> {
        self.state.0.lock().expect("state").reviews.clone()
    }

    /// Sets the objects of a collection in [`COLLECTIONS`] (Service or EndpointSlice JSON, as the
    /// real server sends them); open watches of it end so the client re-lists.
    pub fn set_collection(&self, path: &'static str, items: Vec<Value>) {
        let (lock, cvar) = &*self.state;
        let mut state = lock.lock().expect("state");
        state.rv += 1;
        state.collections.insert(path, items);
        state.collection_changes += 1;
        cvar.notify_all();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        {
            let (lock, cvar) = &*self.state;
            if let Ok(mut state) = lock.lock() {
                state.generation += 1;
            }
            cvar.notify_all();
        }
        if let Ok(mut acceptor) = self.acceptor.lock()
            && let Some(handle) = acceptor.take()
        {
            let _ = handle.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn query(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), percent_decode(v))
        })
        .collect();
    (path.to_owned(), params)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `POST` of a TokenReview or SubjectAccessReview: answered like the real API server (201, the
/// object back with its status), from the tokens and grants the test set.
fn review(
    stream: &mut TcpStream,
    shared: &Arc<(Mutex<State>, Condvar)>,
    path: &str,
    mut body: Value,
) -> std::io::Result<()> {
    let mut state = shared.0.lock().expect("state");
    state.reviews.push(body.clone());
    match path {
        "/apis/authentication.k8s.io/v1/tokenreviews" => {
            let token = body["spec"]["token"].as_str().unwrap_or_default();
            body["status"] = match state.tokens.get(token) {
                Some((user, groups)) => {
                    let mut groups = groups.clone();
                    groups.push("system:authenticated".to_owned());
                    json!({
                        "authenticated": true,
                        "user": {"username": user, "uid": format!("uid-{user}"), "groups": groups}
                    })
                }
                None => json!({"user": {}, "error": "[invalid bearer token]"}),
            };
        }
        "/apis/authorization.k8s.io/v1/subjectaccessreviews" => {
            let spec = &body["spec"];
            let attributes = &spec["resourceAttributes"];
            let is_get_pods = attributes["verb"] == "get" && attributes["resource"] == "pods";
            let namespace = attributes["namespace"].as_str().unwrap_or_default();
            let user = spec["user"].as_str().unwrap_or_default();
            let groups: Vec<&str> = spec["groups"]
                .as_array()
                .map(|g| g.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let allowed = is_get_pods
                && state.grants.iter().any(|(subject, granted)| {
                    let who = match subject.strip_prefix("group:") {
                        Some(group) => groups.contains(&group),
                        None => subject == user,
                    };
                    who && (granted.is_empty() || granted == namespace)
                });
            body["status"] = json!({"allowed": allowed});
        }
        _ => {
            drop(state);
            return respond(
                stream,
                404,
                &status_json(
                    404,
                    "NotFound",
                    &format!("POST {path}: not served by the double"),
                ),
            );
        }
    }
    drop(state);
    respond(stream, 201, &body)
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        404 => "Not Found",
        410 => "Gone",
        _ => "Bad Request",
    };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    stream.flush()
}

fn chunk(stream: &mut TcpStream, line: &str) -> std::io::Result<()> {
    let data = format!("{line}\n");
    write!(stream, "{:x}\r\n{data}\r\n", data.len())?;
    stream.flush()
}

fn node_of(pod: &Value) -> &str {
    pod["spec"]["nodeName"].as_str().unwrap_or_default()
}

/// One HTTP/1.1 request per connection (answers say `Connection: close`).
fn serve(stream: TcpStream, shared: &Arc<(Mutex<State>, Condvar)>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut content_length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut stream = stream;
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, params) = query(target);
    let (lock, cvar) = &**shared;
    lock.lock().expect("state").requests.push(target.to_owned());
    if method == "POST" {
        let mut body = vec![0; content_length];
        reader.read_exact(&mut body)?;
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        return review(&mut stream, shared, &path, body);
    }
    if method == "GET"
        && let Some((path, list_kind, api_version)) =
            COLLECTIONS.iter().find(|(known, ..)| *known == path)
    {
        return serve_collection(stream, shared, path, list_kind, api_version, &params);
    }
    // `/api/v1/namespaces/{ns}/pods` too: the same pods, of one namespace.
    let namespace = path
        .strip_prefix("/api/v1/namespaces/")
        .and_then(|rest| rest.strip_suffix("/pods"))
        .filter(|ns| !ns.is_empty() && !ns.contains('/'))
        .map(str::to_owned);
    if method != "GET" || (path != "/api/v1/pods" && namespace.is_none()) {
        return respond(
            &mut stream,
            404,
            &status_json(
                404,
                "NotFound",
                &format!("{method} {path}: not served by the double"),
            ),
        );
    }
    let node = params
        .get("fieldSelector")
        .and_then(|s| s.strip_prefix("spec.nodeName="))
        .map(str::to_owned);
    let label_selector = params.get("labelSelector").cloned();
    let selected = |pod: &Value| {
        node.as_deref().is_none_or(|n| node_of(pod) == n)
            && namespace
                .as_deref()
                .is_none_or(|ns| pod["metadata"]["namespace"].as_str() == Some(ns))
            && label_selector
                .as_deref()
                .is_none_or(|selector| labels_match(pod, selector))
    };
    let watching = params.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watching {
        let mut state = lock.lock().expect("state");
        state.lists += 1;
        let items: Vec<Value> = state
            .pods
            .values()
            .filter(|p| selected(p))
            .map(|p| {
                // Items of a list carry no apiVersion/kind, as the real server sends them.
                let mut item = p.clone();
                if let Some(map) = item.as_object_mut() {
                    map.remove("apiVersion");
                    map.remove("kind");
                }
                item
            })
            .collect();
        let body = json!({
            "apiVersion": "v1", "kind": "PodList",
            "metadata": {"resourceVersion": state.rv.to_string()},
            "items": items
        });
        drop(state);
        return respond(&mut stream, 200, &body);
    }
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let (generation, too_old) = {
        let mut state = lock.lock().expect("state");
        state.watches += 1;
        (state.generation, from < state.oldest_rv)
    };
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    if too_old {
        let event = json!({"type": "ERROR", "object": status_json(410, "Expired",
            &format!("too old resource version: {from}"))});
        chunk(&mut stream, &event.to_string())?;
        return write!(stream, "0\r\n\r\n");
    }
    let mut sent = from;
    let mut last_bookmark = Instant::now();
    loop {
        let (events, bookmark_rv, ended, gone) = {
            let mut state = lock.lock().expect("state");
            loop {
                let pending = state.log.iter().any(|(rv, _, p)| *rv > sent && selected(p));
                if pending || state.generation != generation || !state.up {
                    break;
                }
                let (next, timeout) = cvar
                    .wait_timeout(state, Duration::from_millis(500))
                    .expect("wait");
                state = next;
                if timeout.timed_out() {
                    break;
                }
            }
            let events: Vec<(u64, &'static str, Value)> = state
                .log
                .iter()
                .filter(|(rv, _, p)| *rv > sent && selected(p))
                .cloned()
                .collect();
            let ended = state.generation != generation || !state.up;
            let gone = state.gone_generation == generation + 1 && state.generation > generation;
            (events, state.rv, ended, gone)
        };
        if gone {
            let event = json!({"type": "ERROR", "object": status_json(410, "Expired",
                "The resourceVersion for the provided watch is too old.")});
            chunk(&mut stream, &event.to_string())?;
            return write!(stream, "0\r\n\r\n");
        }
        if ended {
            // Outage: the connection just drops (no terminating chunk).
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        for (rv, kind, object) in events {
            chunk(
                &mut stream,
                &json!({"type": kind, "object": object}).to_string(),
            )?;
            sent = rv;
        }
        if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
            let event = json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                "metadata": {"resourceVersion": bookmark_rv.max(sent).to_string()}}});
            chunk(&mut stream, &event.to_string())?;
            sent = sent.max(bookmark_rv);
            last_bookmark = Instant::now();
        }
    }
}

/// A collection other than pods: the list as set; a watch that sends nothing and ends when the
/// collection changes (or after a while), so the client re-lists and sees the change.
fn serve_collection(
    mut stream: TcpStream,
    shared: &Arc<(Mutex<State>, Condvar)>,
    path: &'static str,
    list_kind: &str,
    api_version: &str,
    params: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let (lock, cvar) = &**shared;
    if !params.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let state = lock.lock().expect("state");
        let body = json!({
            "apiVersion": api_version, "kind": list_kind,
            "metadata": {"resourceVersion": state.rv.to_string()},
            "items": state.collections.get(path).cloned().unwrap_or_default()
        });
        drop(state);
        return respond(&mut stream, 200, &body);
    }
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut state = lock.lock().expect("state");
    let changes = state.collection_changes;
    while state.collection_changes == changes && state.up && Instant::now() < deadline {
        state = cvar
            .wait_timeout(state, Duration::from_millis(200))
            .expect("wait")
            .0;
    }
    drop(state);
    write!(stream, "0\r\n\r\n")
}

// ---------------------------------------------------------------------------------------------
// The daemon under test

pub struct Daemon {
    pub grpc: String,
    pub metrics: String,
    pub log: PathBuf,
    child: Child,
    /// The bearer token its `redisctl` sends (with `--authz kubernetes`).
    token: Option<String>,
}

impl Daemon {
    pub fn start(args: &[&str], node: &str) -> Daemon {
        Daemon::start_at(args, node, &format!("127.0.0.1:{}", free_port()))
    }

    /// [`Daemon::start`] with the gRPC API on `grpc` (`ip:port`), e.g. a loopback "pod IP".
    pub fn start_at(args: &[&str], node: &str, grpc: &str) -> Daemon {
        Daemon::start_with_env(args, node, grpc, &[])
    }

    /// [`Daemon::start`] for a daemon that checks tokens: its `redisctl` sends `token`.
    pub fn start_authorized(args: &[&str], node: &str, token: &str) -> Daemon {
        Daemon::start_full(
            args,
            node,
            &format!("127.0.0.1:{}", free_port()),
            &[],
            Some(token),
        )
    }

    /// [`Daemon::start_at`] with these environment variables set (and no other kubeconfig or
    /// in-cluster variable inherited from the test's environment).
    pub fn start_with_env(
        args: &[&str],
        node: &str,
        grpc: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Daemon {
        Daemon::start_full(args, node, grpc, env, None)
    }

    fn start_full(
        args: &[&str],
        node: &str,
        grpc: &str,
        env: &[(&str, &std::ffi::OsStr)],
        token: Option<&str>,
    ) -> Daemon {
        let grpc = grpc.to_owned();
        let metrics = format!("127.0.0.1:{}", free_port());
        let log = std::env::temp_dir().join(format!("respwatchd-kube-{}.log", unique()));
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_respwatchd"));
        command
            .args(["--grpc-listen", &grpc, "--metrics-listen", &metrics])
            .args(["--log", "info"])
            .args(args)
            .env("NODE_NAME", node)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBECONFIG")
            .env_remove("RESPWATCH_KUBECONFIG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file);
        die_with_parent(&mut command);
        let child = command.spawn().expect("respwatchd starts");
        let daemon = Daemon {
            grpc,
            metrics,
            log,
            child,
            token: token.map(str::to_owned),
        };
        let deadline = Instant::now() + WAIT;
        while daemon.try_status().is_none() {
            assert!(
                Instant::now() < deadline,
                "respwatchd did not become ready; log:\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn try_status(&self) -> Option<Value> {
        let out = self
            .redisctl()
            .args(["status", "-o", "json"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    pub fn sync_state(&self) -> String {
        self.try_status()
            .and_then(|s| s["kubernetes_sync"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    pub fn wait_synced(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let state = self.sync_state();
            if state == "synced" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pod watcher not synced (last state {state:?}); log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redisctl` for this daemon, with its token if it has one, and no kubeconfig of the
    /// test's environment to take one from.
    pub fn redisctl(&self) -> Command {
        let mut command = Command::new(redisctl_path());
        command
            .env("RESPWATCH_SERVER", &self.grpc)
            .env("NO_COLOR", "1")
            .env("KUBECONFIG", "/nonexistent")
            .env_remove("RESPWATCH_TOKEN");
        if let Some(token) = &self.token {
            command.env("RESPWATCH_TOKEN", token);
        }
        command
    }

    /// `redisctl stats -o json` rows.
    pub fn stats(&self, args: &[&str]) -> Vec<Value> {
        let out = self
            .redisctl()
            .arg("stats")
            .args(args)
            .args(["-o", "json"])
            .output()
            .expect("redisctl stats");
        assert!(
            out.status.success(),
            "redisctl stats: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        match serde_json::from_slice(&out.stdout).expect("stats json") {
            Value::Array(rows) => rows,
            other => panic!("stats: not an array: {other}"),
        }
    }

    pub fn metrics(&self) -> String {
        http_get(&self.metrics, "/metrics")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM first: the daemon detaches its programs; then make sure.
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.log);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real redis-py client that SETs `key` once and then stays connected for a while, as a
/// long-running app does: `sh -c` + exec form for [`ContainerCgroup::spawn`], or run as is.
pub fn python_app(port: &str, ip: &str, key: &str) -> (String, Vec<String>) {
    let python = repo_root().join("target/test-env/venv/bin/python");
    let script = format!(
        "import redis, time\nr = redis.Redis(host='{ip}', port={port})\nr.set('{key}', 'v')\ntime.sleep(120)\n"
    );
    (
        python.to_string_lossy().into_owned(),
        vec!["-c".to_owned(), script],
    )
}

/// Waits until `key` exists on the server.
pub fn wait_for_key(ip: &str, port: &str, key: &str) {
    wait_for(&format!("key {key}"), || {
        Command::new("redis-cli")
            .args(["-h", ip, "-p", port, "EXISTS", key])
            .output()
            .is_ok_and(|o| o.stdout == b"1\n")
    });
}

/// A real redis-server on `ip`:free port inside a container cgroup.
pub fn redis_server(cgroup: &mut ContainerCgroup, ip: &str) -> u16 {
    let port = free_port();
    cgroup.spawn(
        "redis-server",
        &[
            "--port",
            &port.to_string(),
            "--bind",
            ip,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--loglevel",
            "warning",
        ],
    );
    wait_for("redis-server", || {
        Command::new("redis-cli")
            .args(["-h", ip, "-p", &port.to_string(), "PING"])
            .output()
            .is_ok_and(|o| o.stdout == b"PONG\n")
    });
    port
}

pub use crate::http::http_get;
pub use crate::ports::free_port;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub use crate::redisctl_bin::redisctl_path;

pub fn exists(path: &Path) -> bool {
    path.exists()
}
