//! `--cluster`: find every node's respwatchd through the Kubernetes API and fan requests out to
//! all of them, merging the answers here.
//!
//! Like Hubble Relay does for flows, but without another server to deploy: the daemons already
//! serve everything a merged view needs (each answer names its node), so the CLI lists the
//! DaemonSet's pods, talks to each pod IP directly and merges. That needs pod IPs to be
//! reachable from where `redisctl` runs: inside the cluster (a pod) or on a node.
use std::{
    ffi::OsString,
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use respwatch_proto::v1;
use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    client::{ServerArgs, Unreachable},
    watch_stream::{WatchItem, WatchStream},
};

/// The daemon's gRPC port when its pod names none (`grpc`): the DaemonSet's default.
const DEFAULT_PORT: u16 = 50051;
/// The whole pod listing, so that an API server that accepts but never answers cannot hang us.
const LIST_TIMEOUT: Duration = Duration::from_secs(15);
/// One unary call to one daemon (connecting included): a stuck daemon must not hold up the
/// answers of all the others.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// How to find the daemons (global flags).
#[derive(Clone, Debug, clap::Args)]
pub struct ClusterArgs {
    /// Ask every node's respwatchd (found through the Kubernetes API) instead of --server, and
    /// merge the answers; every line and row names its node. watch, stats and status fan out;
    /// top stays single-node. Pod IPs must be reachable from here: run redisctl inside the
    /// cluster (a pod) or on a node.
    #[arg(long, global = true)]
    pub cluster: bool,
    /// Kubeconfig for --cluster (a `:`-separated list is merged, as kubectl does). Default:
    /// ~/.kube/config, else the in-cluster service account.
    #[arg(long, global = true, env = "KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<OsString>,
    /// Namespace of the respwatchd DaemonSet, for --cluster.
    #[arg(long, global = true, default_value = "respwatch", value_name = "NS")]
    pub daemon_namespace: String,
    /// Label selector of the respwatchd pods, for --cluster.
    #[arg(
        long,
        global = true,
        default_value = "app.kubernetes.io/name=respwatch",
        value_name = "SELECTOR"
    )]
    pub daemon_selector: String,
    /// The daemons' gRPC port, for --cluster. Default: the pod's container port named `grpc`,
    /// else 50051.
    #[arg(long, global = true, value_name = "PORT")]
    pub daemon_port: Option<u16>,
}

/// Why the daemons could not be found. Each is one line saying what was tried.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("--cluster: cannot use kubeconfig {path}: {cause}")]
    Kubeconfig { path: String, cause: String },
    #[error(
        "--cluster: no Kubernetes configuration (tried $KUBECONFIG, ~/.kube/config and the in-cluster service account: {cause}); pass --kubeconfig PATH"
    )]
    NoConfig { cause: String },
    #[error(
        "--cluster: cannot list respwatchd pods (namespace {namespace}, selector {selector}) at the Kubernetes API server {server} ({source_of_config}): {cause}"
    )]
    List {
        namespace: String,
        selector: String,
        server: String,
        source_of_config: String,
        cause: String,
    },
    #[error(
        "--cluster: no respwatchd pods in namespace {namespace:?} match {selector:?} ({server}); is the DaemonSet deployed there? See --daemon-namespace and --daemon-selector"
    )]
    NoDaemons {
        namespace: String,
        selector: String,
        server: String,
    },
}

/// One node's daemon, reachable at its pod IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Daemon {
    /// `spec.nodeName` of its pod.
    pub node: String,
    /// `namespace/name` of its pod.
    pub pod: String,
    /// `podIP:port` (`[ip]:port` for IPv6).
    pub address: String,
}

impl Daemon {
    /// The node an answer came from: as the daemon names itself, else its pod's node.
    pub fn node_name(&self, reported: &str) -> String {
        if reported.is_empty() {
            self.node.clone()
        } else {
            reported.to_owned()
        }
    }
}

/// A node whose daemon gave no answer (or could not be asked).
#[derive(Clone, Debug)]
pub struct Failure {
    pub node: String,
    pub pod: String,
    /// Empty when the pod has no address to try.
    pub address: String,
    pub cause: String,
}

impl Failure {
    pub fn of(daemon: &Daemon, error: &anyhow::Error) -> Failure {
        Failure {
            node: daemon.node.clone(),
            pod: daemon.pod.clone(),
            address: daemon.address.clone(),
            cause: describe(error),
        }
    }

    /// The stderr line: names node and address (or pod) so it can be looked at directly.
    pub fn report(&self) {
        eprintln!("redisctl: {self}");
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "node": self.node,
            "pod": self.pod,
            "address": self.address,
            "error": self.cause,
        })
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.address.is_empty() {
            write!(f, "node {} (pod {}): {}", self.node, self.pod, self.cause)
        } else {
            write!(
                f,
                "node {} ({}, pod {}): {}",
                self.node, self.address, self.pod, self.cause
            )
        }
    }
}

/// The daemons found, by node name, and the daemon pods that cannot be asked (not running, no
/// pod IP yet): their nodes are not covered, which the output must say.
#[derive(Debug, Default)]
pub struct Discovery {
    pub daemons: Vec<Daemon>,
    pub not_running: Vec<Failure>,
}

impl Discovery {
    /// Every node with a daemon pod, asked or not.
    pub fn nodes(&self) -> usize {
        self.daemons.len() + self.not_running.len()
    }

    /// Width of the NODE column.
    pub fn node_width(&self) -> usize {
        self.daemons
            .iter()
            .map(|d| d.node.chars().count())
            .max()
            .unwrap_or(0)
    }
}

/// One line for a per-daemon error: the cause without the single-node `--server` hint.
pub fn describe(error: &anyhow::Error) -> String {
    match error.downcast_ref::<Unreachable>() {
        Some(unreachable) => format!("cannot reach respwatchd: {}", unreachable.cause),
        None => format!("{error:#}"),
    }
}

/// The error when no daemon answered at all: most often pod IPs are not routable from here.
pub fn none_answered(what: &str, nodes: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "--cluster: {what} failed on all {nodes} node(s) (see above); pod IPs are reachable only from inside the cluster or from a node: run redisctl there, or use --server with one daemon's address"
    )
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

/// `outer: innermost` unless they say the same thing.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let (outer, inner) = (error.to_string(), root_cause(error));
    if outer == inner || outer.contains(&inner) {
        outer
    } else {
        format!("{outer}: {inner}")
    }
}

/// An API client, and what errors should say about it.
struct Connection {
    client: Client,
    /// Where the configuration came from: `kubeconfig PATH` or `inferred configuration`.
    source: String,
    /// The API server's URL.
    server: String,
}

async fn kube_client(args: &ClusterArgs) -> Result<Connection, DiscoveryError> {
    // An empty $KUBECONFIG means unset, as for kubectl.
    let paths = args.kubeconfig.as_ref().filter(|p| !p.is_empty());
    let (config, source) = match paths {
        Some(paths) => {
            let shown = Path::new(paths).display().to_string();
            let fail = |cause: String| DiscoveryError::Kubeconfig {
                path: shown.clone(),
                cause,
            };
            let listed: Vec<PathBuf> = std::env::split_paths(paths)
                .filter(|p| !p.as_os_str().is_empty())
                .collect();
            // kubectl skips the missing files of a list (not a lone missing file).
            let present: Vec<&PathBuf> = listed.iter().filter(|p| p.exists()).collect();
            let files = if present.is_empty() || listed.len() == 1 {
                listed.iter().collect()
            } else {
                present
            };
            // Merged as kubectl does, the first file winning.
            let mut merged: Option<Kubeconfig> = None;
            for path in files {
                let file = Kubeconfig::read_from(path)
                    .map_err(|e| fail(format!("reading {}: {}", path.display(), root_cause(&e))))?;
                merged = Some(match merged {
                    None => file,
                    Some(first) => first.merge(file).map_err(|e| fail(chain(&e)))?,
                });
            }
            let file = merged.ok_or_else(|| fail("no file named".to_owned()))?;
            let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| fail(chain(&e)))?;
            (config, format!("kubeconfig {shown}"))
        }
        None => {
            let config = kube::Config::infer()
                .await
                .map_err(|e| DiscoveryError::NoConfig { cause: chain(&e) })?;
            (config, "inferred configuration".to_owned())
        }
    };
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| DiscoveryError::List {
        namespace: args.daemon_namespace.clone(),
        selector: args.daemon_selector.clone(),
        server: server.clone(),
        source_of_config: source.clone(),
        cause: format!("building the client: {}", chain(&e)),
    })?;
    Ok(Connection {
        client,
        source,
        server,
    })
}

/// Lists the daemon pods and turns them into addresses.
pub async fn discover(args: &ClusterArgs) -> Result<Discovery, DiscoveryError> {
    let Connection {
        client,
        source,
        server,
    } = kube_client(args).await?;
    let list_error = |cause: String| DiscoveryError::List {
        namespace: args.daemon_namespace.clone(),
        selector: args.daemon_selector.clone(),
        server: server.clone(),
        source_of_config: source.clone(),
        cause,
    };
    let api: Api<Pod> = Api::namespaced(client, &args.daemon_namespace);
    let params = ListParams::default().labels(&args.daemon_selector);
    let pods = match tokio::time::timeout(LIST_TIMEOUT, api.list(&params)).await {
        Ok(Ok(pods)) => pods.items,
        Ok(Err(error)) => return Err(list_error(kube_cause(&error))),
        Err(_) => {
            return Err(list_error(format!(
                "no answer within {}s",
                LIST_TIMEOUT.as_secs()
            )));
        }
    };
    if pods.is_empty() {
        return Err(DiscoveryError::NoDaemons {
            namespace: args.daemon_namespace.clone(),
            selector: args.daemon_selector.clone(),
            server,
        });
    }
    let mut found = Discovery::default();
    for pod in &pods {
        match target(pod, args.daemon_port) {
            Ok(daemon) => found.daemons.push(daemon),
            Err(failure) => found.not_running.push(failure),
        }
    }
    found
        .daemons
        .sort_by(|a, b| (&a.node, &a.pod).cmp(&(&b.node, &b.pod)));
    found
        .not_running
        .sort_by(|a, b| (&a.node, &a.pod).cmp(&(&b.node, &b.pod)));
    Ok(found)
}

/// An API error's message as the API server says it (e.g. Forbidden), else the transport's
/// innermost cause (e.g. connection refused).
fn kube_cause(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => chain(other),
    }
}

/// A running daemon pod with an IP → where to reach it; anything else → why not.
fn target(pod: &Pod, port_flag: Option<u16>) -> Result<Daemon, Failure> {
    let name = format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    );
    let spec = pod.spec.as_ref();
    let node = spec
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty());
    let status = pod.status.as_ref();
    let phase = status
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".to_owned());
    let ip = status
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty());
    let not_asked = |cause: String| Failure {
        node: node.clone().unwrap_or_else(|| "(unscheduled)".to_owned()),
        pod: name.clone(),
        address: String::new(),
        cause,
    };
    if phase != "Running" {
        return Err(not_asked(format!("daemon pod is {phase}, not asked")));
    }
    let Some(ip) = ip else {
        return Err(not_asked(
            "daemon pod has no pod IP yet, not asked".to_owned(),
        ));
    };
    let port = port_flag.unwrap_or_else(|| {
        spec.into_iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some("grpc"))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .unwrap_or(DEFAULT_PORT)
    });
    let address = if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    };
    Ok(Daemon {
        node: node.unwrap_or_else(|| name.clone()),
        pod: name,
        address,
    })
}

/// The global flags with `--server` pointing at one daemon (TLS flags kept: with a shared CA,
/// pass --tls-domain, since pod IPs are rarely in the certificates).
pub fn server_for(server: &ServerArgs, daemon: &Daemon) -> ServerArgs {
    ServerArgs {
        server: daemon.address.clone(),
        ..server.clone()
    }
}

/// The answers of a unary call fanned out to every node, and the nodes that gave none.
pub struct Answers<T> {
    /// Every node with a daemon pod, asked or not.
    pub nodes: usize,
    pub answered: Vec<(Daemon, T)>,
    pub failed: Vec<Failure>,
}

/// Finds the daemons and runs `call` against all of them at once. Nodes that gave no answer are
/// reported on stderr (and returned, for the output to name them too); it is an error only when
/// no node answered.
pub async fn ask_all<T, F, Fut>(
    cluster: &ClusterArgs,
    server: &ServerArgs,
    what: &str,
    call: F,
) -> anyhow::Result<Answers<T>>
where
    T: Send + 'static,
    F: Fn(ServerArgs) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let found = discover(cluster).await?;
    let answers = call_all(&found.daemons, server, call).await;
    let (answered, failed) = partition(&found, answers);
    for failure in &failed {
        failure.report();
    }
    if answered.is_empty() {
        return Err(none_answered(what, found.nodes()));
    }
    Ok(Answers {
        nodes: found.nodes(),
        answered,
        failed,
    })
}

/// Runs `call` against every daemon concurrently; answers come back in `daemons` order.
async fn call_all<T, F, Fut>(
    daemons: &[Daemon],
    server: &ServerArgs,
    call: F,
) -> Vec<anyhow::Result<T>>
where
    T: Send + 'static,
    F: Fn(ServerArgs) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    for (index, daemon) in daemons.iter().enumerate() {
        let future = call(server_for(server, daemon));
        tasks.spawn(async move {
            let answer = match tokio::time::timeout(CALL_TIMEOUT, future).await {
                Ok(answer) => answer,
                Err(_) => Err(anyhow::anyhow!(
                    "no answer within {}s",
                    CALL_TIMEOUT.as_secs()
                )),
            };
            (index, answer)
        });
    }
    let mut answers: Vec<Option<anyhow::Result<T>>> = daemons.iter().map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        // A panicked task leaves its slot empty; that is reported below.
        if let Ok((index, answer)) = joined
            && let Some(slot) = answers.get_mut(index)
        {
            *slot = Some(answer);
        }
    }
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(anyhow::anyhow!("the request task failed"))))
        .collect()
}

/// Splits answers into successes (with their daemon) and failures (not-running pods first).
fn partition<T>(
    found: &Discovery,
    answers: Vec<anyhow::Result<T>>,
) -> (Vec<(Daemon, T)>, Vec<Failure>) {
    let mut ok = Vec::new();
    let mut failed = found.not_running.clone();
    for (daemon, answer) in found.daemons.iter().zip(answers) {
        match answer {
            Ok(value) => ok.push((daemon.clone(), value)),
            Err(error) => failed.push(Failure::of(daemon, &error)),
        }
    }
    (ok, failed)
}

/// What the merged Watch streams deliver, tagged with the daemon's index in the discovery.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "messages are nearly all of the traffic; boxing would allocate for each"
)]
pub enum Delivery {
    Message(usize, v1::WatchResponse),
    /// The connection under the stream broke and a new stream is open (commands in between
    /// were not seen): the cause and how long it took.
    Reconnected(usize, String, std::time::Duration),
    /// The daemon could not be reached, refused the Watch, or its stream broke for good. Last
    /// for it.
    Failed(usize, anyhow::Error),
    /// The daemon ended its stream (it is shutting down). Last for it.
    Ended(usize),
}

/// Opens Watch on every daemon concurrently and merges the streams into one channel, in arrival
/// order. The channel is bounded: a slow reader slows every forwarder, and each daemon then
/// reports what its subscriber queue dropped (`lost_events`), exactly as for one node. Dropping
/// the returned tasks closes every stream.
pub fn watch_all(
    daemons: &[Daemon],
    server: &ServerArgs,
    request: &v1::WatchRequest,
) -> (JoinSet<()>, mpsc::Receiver<Delivery>) {
    let (sender, receiver) = mpsc::channel(1024);
    let mut tasks = JoinSet::new();
    for (index, daemon) in daemons.iter().enumerate() {
        let (server, request, sender) =
            (server_for(server, daemon), request.clone(), sender.clone());
        tasks.spawn(async move {
            let last = match forward(index, &server, request, &sender).await {
                Ok(()) => Delivery::Ended(index),
                Err(error) => Delivery::Failed(index, error),
            };
            let _ = sender.send(last).await;
        });
    }
    (tasks, receiver)
}

async fn forward(
    index: usize,
    server: &ServerArgs,
    request: v1::WatchRequest,
    sender: &mpsc::Sender<Delivery>,
) -> anyhow::Result<()> {
    let mut stream = WatchStream::open(server, request).await?;
    while let Some(item) = stream.next().await? {
        let delivery = match item {
            WatchItem::Message(message) => Delivery::Message(index, message),
            WatchItem::Reconnected { cause, gap } => Delivery::Reconnected(index, cause, gap),
        };
        if sender.send(delivery).await.is_err() {
            return Ok(()); // the reader is done
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    fn pod(phase: &str, ip: Option<&str>, ports: Vec<(&str, i32)>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("respwatch-x".into()),
                namespace: Some("respwatch".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".into()),
                containers: vec![Container {
                    name: "respwatchd".into(),
                    ports: Some(
                        ports
                            .into_iter()
                            .map(|(name, port)| ContainerPort {
                                name: Some(name.into()),
                                container_port: port,
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: ip.map(Into::into),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn addresses_come_from_the_grpc_port_or_the_flag() {
        let p = pod(
            "Running",
            Some("10.0.0.7"),
            vec![("metrics", 9464), ("grpc", 6000)],
        );
        let d = target(&p, None).unwrap();
        assert_eq!(d.address, "10.0.0.7:6000");
        assert_eq!(d.node, "node-a");
        assert_eq!(d.pod, "respwatch/respwatch-x");
        assert_eq!(target(&p, Some(7)).unwrap().address, "10.0.0.7:7");
        let unnamed = pod("Running", Some("fd00::5"), vec![("metrics", 9464)]);
        assert_eq!(target(&unnamed, None).unwrap().address, "[fd00::5]:50051");
    }

    #[test]
    fn pods_that_cannot_be_asked_say_why() {
        let pending = target(&pod("Pending", None, vec![]), None).unwrap_err();
        assert!(pending.cause.contains("Pending"), "{}", pending.cause);
        let no_ip = target(&pod("Running", None, vec![]), None).unwrap_err();
        assert!(no_ip.cause.contains("no pod IP"), "{}", no_ip.cause);
        assert_eq!(no_ip.node, "node-a");
    }
}
