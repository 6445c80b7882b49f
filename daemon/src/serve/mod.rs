//! Serve stage: the `respwatch.v1.Observer` gRPC API (with reflection v1 and v1alpha and the
//! standard health service) and the Prometheus `/metrics` endpoint, both reading the
//! pipeline's [`Shared`] state. Nothing here can slow the pipeline: Watch subscribers read a
//! broadcast channel and drop (and report) what they cannot keep up with.
pub mod authz;
mod convert;
pub mod filter;
mod grpc;
pub mod metrics;
mod tls;
mod watch;

use std::{
    fmt,
    net::SocketAddr,
    path::PathBuf,
    str::FromStr,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use tokio::sync::watch as signal;

use crate::{enrich::process_alive, pipeline::Shared};

pub use grpc::Observer;
pub use metrics::MetricLabels;

/// Where the gRPC API listens: `host:port` or `unix:/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, e.g. unix:/run/respwatch.sock".to_owned());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        resolve(text).map(ListenAddr::Tcp)
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// `host:port` (a name such as `localhost` resolves to its first address).
pub fn resolve(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    text.to_socket_addrs()
        .map_err(|error| format!("invalid address {text:?} (expected host:port): {error}"))?
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

/// PEM files for TLS on the gRPC port.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub grpc_listen: ListenAddr,
    pub metrics_listen: SocketAddr,
    pub node_name: String,
    pub tls: Option<TlsFiles>,
    pub metric_labels: MetricLabels,
    /// Rows of exited processes that saw nothing for this long are forgotten.
    pub expire_after: Duration,
    /// Matching events buffered per Watch subscriber before it gets loss notices instead.
    pub watch_queue: usize,
    /// Watch streams open at once.
    pub max_subscribers: u64,
    /// How long a gRPC connection may live, and then how long its calls may still run.
    pub max_connection_age: Option<(Duration, Duration)>,
    /// `--authz kubernetes`: who may see what.
    pub authz: Option<Arc<authz::Authorizer>>,
    /// A plaintext listener for health checks only.
    pub health_listen: Option<SocketAddr>,
    /// gRPC server reflection on the API port.
    pub reflection: bool,
}

/// What the serving side knows beyond the pipeline's counters.
pub struct ServeState {
    pub shared: Arc<Shared>,
    pub node: String,
    pub version: &'static str,
    pub started_unix_ns: u64,
    pub started: std::time::Instant,
    pub kernel_release: String,
    pub attached: Vec<String>,
    pub watch_queue: usize,
    pub max_subscribers: u64,
    /// Open Watch streams.
    pub subscribers: AtomicU64,
    /// Matching events Watch subscribers could not take (their queues were full).
    pub subscriber_drops: AtomicU64,
    /// `/metrics`: the recorder and the series fed into it.
    pub exporter: metrics::Exporter,
    /// Open Watch streams' filters, pushed down to the pipeline.
    pub watching: watch::Watching,
    pub authz: Option<Arc<authz::Authorizer>>,
}

impl ServeState {
    pub fn new(
        shared: Arc<Shared>,
        config: &ServeConfig,
        attached: Vec<String>,
    ) -> Arc<ServeState> {
        Arc::new(ServeState {
            shared,
            node: config.node_name.clone(),
            version: env!("CARGO_PKG_VERSION"),
            started_unix_ns: now_unix_ns(),
            started: std::time::Instant::now(),
            kernel_release: kernel_release(),
            attached,
            watch_queue: config.watch_queue.max(1),
            max_subscribers: config.max_subscribers,
            subscribers: AtomicU64::new(0),
            subscriber_drops: AtomicU64::new(0),
            exporter: metrics::Exporter::new(config.metric_labels.clone()),
            watching: watch::Watching::default(),
            authz: config.authz.clone(),
        })
    }
}

/// The running servers; [`Servers::shutdown`] stops them.
pub struct Servers {
    pub grpc_addr: ListenAddr,
    pub metrics_addr: SocketAddr,
    health: tonic_health::server::HealthReporter,
    stop: signal::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Servers {
    /// Binds both listeners (so a busy port fails startup) and serves until shutdown.
    pub async fn start(
        shared: Arc<Shared>,
        config: ServeConfig,
        attached: Vec<String>,
    ) -> anyhow::Result<Servers> {
        let state = ServeState::new(shared, &config, attached);
        let (stop, stopped) = signal::channel(false);
        let grpc = grpc::start(Arc::clone(&state), &config, stopped.clone()).await?;
        // Fed once before the first scrape can come.
        state.exporter.flush(&state);
        let (metrics_addr, metrics) =
            metrics::start(Arc::clone(&state), config.metrics_listen, stopped.clone())
                .await
                .with_context(|| format!("metrics listener on {}", config.metrics_listen))?;
        let expiry = tokio::spawn(maintain(Arc::clone(&state), config.expire_after, stopped));
        Ok(Servers {
            grpc_addr: grpc.addr,
            metrics_addr,
            health: grpc.health,
            stop,
            tasks: vec![grpc.task, metrics, expiry],
        })
    }

    /// Health checks answer NOT_SERVING from now on.
    pub async fn set_not_serving(&self) {
        grpc::set_not_serving(&self.health).await;
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for task in self.tasks {
            match tokio::time::timeout(Duration::from_secs(5), task).await {
                Ok(joined) => joined??,
                Err(_) => tracing::warn!("a server did not stop within 5s"),
            }
        }
        Ok(())
    }
}

/// Feeds `/metrics` every [`metrics::FLUSH_INTERVAL`]; rows of exited processes (folded into
/// their process-less rows), and of pods deleted longer than the pod grace period ago, expire
/// once idle for `grace`.
async fn maintain(
    state: Arc<ServeState>,
    grace: Duration,
    mut stop: signal::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(metrics::FLUSH_INTERVAL);
    let expire_every = Duration::from_secs(10).min(grace.max(Duration::from_secs(1)));
    let mut last_expiry = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Flushed first: an expiring row's last counts are in its series.
                state.exporter.flush(&state);
                if last_expiry.elapsed() >= expire_every {
                    last_expiry = tokio::time::Instant::now();
                    expire_rows(&state, grace);
                }
            }
            _ = stop.changed() => return Ok(()),
        }
    }
}

fn expire_rows(state: &ServeState, grace: Duration) {
    let attributor = &state.shared.attributor;
    let live: Vec<_> = match state.shared.aggregator.lock() {
        Ok(mut aggregator) => {
            aggregator.expire(
                now_unix_ns(),
                grace.as_nanos() as u64,
                process_alive,
                |key| attributor.pod_gone(key),
            );
            aggregator.keys().cloned().collect()
        }
        Err(_) => return,
    };
    state.exporter.forget_series_without_rows(&live, attributor);
}

impl ServeState {
    /// Namespaces of this node's pods: what an authorized caller's scope is judged over.
    pub fn known_namespaces(&self) -> std::collections::BTreeSet<String> {
        self.shared
            .attributor
            .pods()
            .map(|index| {
                index
                    .pods()
                    .iter()
                    .map(|pod| pod.namespace.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// With `--authz kubernetes`: the caller is authenticated and `filters` limited to what it
    /// may see; what a Watch needs to check it again is returned.
    pub async fn authorize(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        filters: &mut filter::FilterSet,
    ) -> Result<Option<authz::Authorized>, tonic::Status> {
        let Some(authorizer) = &self.authz else {
            return Ok(None);
        };
        let (authorized, scope) = authz::Authorized::check(
            authorizer,
            metadata,
            &self.known_namespaces(),
            filters.requested_namespaces(),
        )
        .await?;
        filters.set_scope(scope);
        Ok(Some(authorized))
    }
}

/// Resolves when `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(mut stop: signal::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

pub fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// This machine's host name, the default node name outside Kubernetes.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
