//! `respwatchd`: the respwatch node daemon.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context;
use clap::Parser;
use respwatch_common::LossReason;
use respwatchd::{
    capture::{Capture, CaptureConfig},
    enrich::Attributor,
    event::{KeyPolicy, KeyPrivacy},
    kube::{self as kubernetes, KubeConfig, Mode, PodIndex},
    pipeline::{Pipeline, PipelineConfig},
    serve::{ListenAddr, MetricLabels, ServeConfig, Servers, TlsFiles, authz::Authorizer},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing_subscriber::EnvFilter;

/// Connections, rows and bursts allocate; mimalloc serves that at a fraction of glibc malloc's
/// cost (glibc's was a third of the daemon's CPU time when commands still allocated).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Watches Redis (RESP) traffic of every process on this node with eBPF.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Bytes of the kernel-to-user data rings together (a power of two, at least 4096), split
    /// evenly between them (one per CPU, up to 4); connection opens and closes get a ring of a
    /// sixteenth of this (at least a page) on top.
    #[arg(long, env = "RESPWATCH_RING_BYTES", default_value_t = 64 * 1024 * 1024)]
    ring_bytes: u32,
    /// How much of each key name events keep: full, truncate:N, hash or off. Values are never
    /// kept.
    #[arg(long, env = "RESPWATCH_KEYS", default_value_t = KeyPolicy::default())]
    keys: KeyPolicy,
    /// File holding the secret `--keys hash` is keyed with (at least 16 bytes; one trailing
    /// newline is not part of it). Give every node the same one (a Kubernetes Secret), so that
    /// hashes agree across nodes and restarts; without it nobody can hash a list of likely keys
    /// to find them.
    #[arg(long, env = "RESPWATCH_KEY_HASH_SECRET_FILE")]
    key_hash_secret_file: Option<PathBuf>,
    /// Where the gRPC API listens: `host:port` or `unix:/path`. Beyond loopback, use TLS.
    #[arg(long, env = "RESPWATCH_GRPC_LISTEN", default_value = "127.0.0.1:50051", value_parser = parse_listen)]
    grpc_listen: ListenAddr,
    /// Where Prometheus scrapes `/metrics`: `host:port`.
    #[arg(long, env = "RESPWATCH_METRICS_LISTEN", default_value = "127.0.0.1:9464", value_parser = respwatchd::serve::resolve)]
    metrics_listen: SocketAddr,
    /// Labels of per-command metrics, from namespace,pod,container,pid,comm,role,command,peer,
    /// workload.
    /// Key names are never labels.
    #[arg(long, env = "RESPWATCH_METRICS_LABELS", default_value_t = MetricLabels::default())]
    metrics_labels: MetricLabels,
    /// Seconds after which a stats row of an exited process that saw no traffic folds into its
    /// name's process-less row (pid 0), so sums never go down; rows of deleted pods go.
    #[arg(long, env = "RESPWATCH_EXPIRE_SECONDS", default_value_t = 300)]
    expire_seconds: u64,
    /// This node's name in API responses (the Kubernetes node name in a DaemonSet).
    #[arg(long, env = "NODE_NAME", default_value_t = respwatchd::serve::hostname())]
    node_name: String,
    /// Recent events kept in memory for `Watch` requests that ask for them (`redisctl watch
    /// --last N`). 0 (the default) keeps none: events are then only built while someone
    /// watches, and a command costs the stats alone.
    #[arg(long, env = "RESPWATCH_RECENT_EVENTS", default_value_t = 0)]
    recent_events: usize,
    /// Matching events buffered per Watch subscriber before it gets loss notices instead.
    #[arg(long, env = "RESPWATCH_WATCH_QUEUE", default_value_t = 4096)]
    watch_queue: usize,
    /// Watch streams open at once; more are refused with RESOURCE_EXHAUSTED (each costs a
    /// filter pass per command and a queue).
    #[arg(long, env = "RESPWATCH_MAX_SUBSCRIBERS", default_value_t = 64)]
    max_subscribers: u64,
    /// Seconds a gRPC connection may live: then the daemon asks its client to reconnect
    /// (HTTP/2 GOAWAY), so no connection keeps what it was let in with forever (redisctl
    /// watch reconnects by itself). 0: no limit.
    #[arg(
        long,
        env = "RESPWATCH_MAX_CONNECTION_AGE_SECONDS",
        default_value_t = 1800
    )]
    max_connection_age_seconds: u64,
    /// Seconds a connection past its age may still finish its calls; then it is closed.
    #[arg(
        long,
        env = "RESPWATCH_MAX_CONNECTION_AGE_GRACE_SECONDS",
        default_value_t = 30
    )]
    max_connection_age_grace_seconds: u64,
    /// PEM certificate for TLS on the gRPC port (with --tls-key).
    #[arg(long, env = "RESPWATCH_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the gRPC port (with --tls-cert).
    #[arg(long, env = "RESPWATCH_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA: when set, gRPC clients must present a certificate it signed.
    #[arg(long, env = "RESPWATCH_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve gRPC server reflection (what `grpcurl list`/`describe` use). Off unless asked for:
    /// it tells anyone who connects the whole API.
    #[arg(long, env = "RESPWATCH_REFLECTION")]
    reflection: bool,
    /// A second, plaintext listener (`host:port`) that serves only `grpc.health.v1`: for
    /// kubelet's gRPC probes, which speak no TLS, when the API port has TLS on.
    #[arg(long, env = "RESPWATCH_HEALTH_LISTEN", value_parser = respwatchd::serve::resolve)]
    health_listen: Option<SocketAddr>,
    /// Kubernetes pod metadata: `auto` (on with --kubeconfig, $KUBECONFIG or inside a
    /// cluster), `on`, `off`.
    #[arg(long, env = "RESPWATCH_KUBERNETES", default_value_t = Mode::Auto)]
    kubernetes: Mode,
    /// Kubeconfig file for the pod watcher (default: $KUBECONFIG as kubectl reads it, else
    /// inside a cluster the service account).
    #[arg(long, env = "RESPWATCH_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Only observe pods of these namespaces (comma-separated; default: everything). Host
    /// processes and pods not known yet are then left out. Cgroups found out of scope are also
    /// skipped in the kernel, so their packets cost one map lookup and no records.
    #[arg(long, env = "RESPWATCH_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Seconds a deleted pod stays resolvable (its last commands keep their names).
    #[arg(long, env = "RESPWATCH_POD_GRACE_SECONDS", default_value_t = 60)]
    pod_grace_seconds: u64,
    /// Longest pause, in seconds, between attempts to reach the Kubernetes API server.
    #[arg(
        long,
        env = "RESPWATCH_KUBERNETES_RETRY_MAX_SECONDS",
        default_value_t = 10
    )]
    kubernetes_retry_max_seconds: u64,
    /// The cgroup v2 directory the programs attach to (default: the root of the cgroup v2
    /// hierarchy, found in /proc/self/mountinfo). In a container, mount the host's hierarchy and
    /// point here; below the root only the processes under it are seen.
    #[arg(long, env = "RESPWATCH_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Who may call the gRPC API: `none`, or `kubernetes` (a bearer token on every call,
    /// checked with a TokenReview; Watch and GetStats show only the namespaces where the caller
    /// may `get pods`, host processes only to callers who may do so cluster-wide).
    #[arg(long, env = "RESPWATCH_AUTHZ", value_enum, default_value_t = Authz::None)]
    authz: Authz,
    /// Seconds a token's review and a caller's permissions are trusted before they are asked
    /// again; an open Watch of a caller that lost a permission ends within this time.
    #[arg(long, env = "RESPWATCH_AUTHZ_CACHE_SECONDS", default_value_t = 10)]
    authz_cache_seconds: u64,
    /// Serve the API beyond loopback with `--authz none` anyway: anyone who can reach the port
    /// sees the key names and commands of every namespace.
    #[arg(long, env = "RESPWATCH_INSECURE_NO_AUTHZ")]
    insecure_no_authz: bool,
    /// Log filter, e.g. `info` or `respwatchd=debug`.
    #[arg(long, env = "RESPWATCH_LOG", default_value = "info")]
    log: String,
}

/// How long health answers NOT_SERVING before the daemon exits after its pipeline stopped.
const NOT_SERVING_GRACE: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Authz {
    None,
    Kubernetes,
}

fn parse_listen(text: &str) -> Result<ListenAddr, String> {
    text.parse()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match EnvFilter::try_new(&args.log) {
        Ok(filter) => filter,
        Err(error) => {
            eprintln!("respwatchd: invalid --log filter {:?}: {error}", args.log);
            return ExitCode::from(2);
        }
    };
    // Colours only on a terminal: a container's log (kubectl logs) would show the escapes.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("respwatchd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("respwatchd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let secret = match &args.key_hash_secret_file {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("reading the key-hash secret {}", path.display()))?,
        ),
        None => None,
    };
    let keys = KeyPrivacy::new(args.keys, secret.as_deref())?;
    let namespaces: Vec<String> = args
        .namespaces
        .iter()
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect();
    let kube_config = KubeConfig {
        mode: args.kubernetes,
        kubeconfig: args.kubeconfig.clone(),
        node_name: args.node_name.clone(),
        pod_grace: Duration::from_secs(args.pod_grace_seconds),
        retry_max: Duration::from_secs(args.kubernetes_retry_max_seconds.max(1)),
    };
    if args.authz == Authz::None
        && !args.insecure_no_authz
        && let ListenAddr::Tcp(addr) = &args.grpc_listen
        && !addr.ip().is_loopback()
    {
        anyhow::bail!(
            "--grpc-listen {addr} is beyond loopback and --authz is none: anyone who can reach \
             it would see every namespace's commands and keys. Use --authz kubernetes (or \
             --insecure-no-authz to serve it anyway)"
        );
    }
    let kube_client = kubernetes::client(&kube_config).await?;
    let authz = match (args.authz, &kube_client) {
        (Authz::None, _) => None,
        (Authz::Kubernetes, Some(client)) => Some(Arc::new(Authorizer::new(
            client.clone(),
            Duration::from_secs(args.authz_cache_seconds.max(1)),
        ))),
        (Authz::Kubernetes, None) => anyhow::bail!(
            "--authz kubernetes needs the Kubernetes API: pass --kubeconfig or set $KUBECONFIG, \
             or run in a cluster"
        ),
    };
    if kube_client.is_none() && !namespaces.is_empty() {
        anyhow::bail!(
            "--namespaces needs Kubernetes pod metadata: pass --kubeconfig or set $KUBECONFIG, run in a cluster or use --kubernetes on"
        );
    }
    let pods = kube_client
        .as_ref()
        .map(|_| Arc::new(PodIndex::new(kube_config.pod_grace)));
    // The pipeline runs on a thread of its own, so the API's workers (GetStats, scrapes,
    // Watch streams) never hold up capture; its rings are registered with that thread's runtime.
    let pipeline_runtime = PipelineRuntime(Some(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("the pipeline's runtime")?,
    ));
    let capture = {
        let _on_pipeline_runtime = pipeline_runtime.0.as_ref().map(|runtime| runtime.enter());
        Capture::start(&CaptureConfig {
            ring_bytes: args.ring_bytes,
            scoped: !namespaces.is_empty(),
            cgroup_root: args.cgroup_root.clone(),
        })?
    };
    tracing::info!(
        programs = capture.attached().len(),
        "eBPF programs attached"
    );
    // The broadcast each Watch subscriber task reads: deep enough for bursts on a busy node
    // (each subscriber then filters into its own --watch-queue).
    let config = PipelineConfig {
        keys,
        subscriber_queue: 65_536,
        history: args.recent_events,
    };
    let pipeline = Pipeline::new(capture, config, Attributor::new(pods.clone(), namespaces));
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert,
            key,
            client_ca: args.tls_client_ca,
        }),
        _ => None,
    };
    let serve = ServeConfig {
        grpc_listen: args.grpc_listen,
        metrics_listen: args.metrics_listen,
        node_name: args.node_name,
        tls,
        metric_labels: args.metrics_labels,
        expire_after: Duration::from_secs(args.expire_seconds),
        watch_queue: args.watch_queue,
        max_subscribers: args.max_subscribers,
        max_connection_age: (args.max_connection_age_seconds > 0).then(|| {
            (
                Duration::from_secs(args.max_connection_age_seconds),
                Duration::from_secs(args.max_connection_age_grace_seconds),
            )
        }),
        authz,
        health_listen: args.health_listen,
        reflection: args.reflection,
    };
    let servers = Servers::start(pipeline.shared(), serve, pipeline.attached()).await?;
    let (stop, stopped) = watch::channel(false);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let shared = pipeline.shared();
    let counters = &shared.counters;
    let watcher = match (kube_client, pods) {
        (Some(client), Some(pods)) => {
            tracing::info!(node = %kube_config.node_name, "watching this node's pods");
            Some(kubernetes::start(
                client,
                &kube_config,
                pods,
                stopped.clone(),
            ))
        }
        _ => None,
    };
    // The result comes back on a channel; a panic drops the sender without a result.
    let (ended_tx, mut ended) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("pipeline".into())
        .spawn(move || {
            let mut pipeline_runtime = pipeline_runtime;
            if let Some(runtime) = pipeline_runtime.0.take() {
                let _ = ended_tx.send(runtime.block_on(pipeline.run(stopped, |_| {})));
            }
        })
        .context("starting the pipeline thread")?;
    tracing::info!("respwatchd ready");
    let pipeline_ended = tokio::select! {
        _ = terminate.recv() => { tracing::info!("SIGTERM: shutting down"); None }
        _ = interrupt.recv() => { tracing::info!("SIGINT: shutting down"); None }
        result = &mut ended => Some(result),
    };
    if let Some(result) = pipeline_ended {
        // Serving on with nothing captured would pass for a quiet node: health turns
        // NOT_SERVING for probes and clients to see, then the daemon exits non-zero so that
        // its supervisor restarts it.
        let why = match result {
            Ok(Ok(())) => "it ended".to_owned(),
            Ok(Err(error)) => error.to_string(),
            Err(_) => "it panicked (the panic message is above)".to_owned(),
        };
        tracing::error!(reason = %why, "the capture pipeline stopped; health is NOT_SERVING, exiting");
        servers.set_not_serving().await;
        tokio::time::sleep(NOT_SERVING_GRACE).await;
        let _ = stop.send(true);
        servers.shutdown().await?;
        anyhow::bail!("the capture pipeline stopped: {why}");
    }
    let _ = stop.send(true);
    servers.shutdown().await?;
    // The pipeline owns the capture: when it returns, the programs are detached.
    match ended.await {
        Ok(result) => result?,
        Err(_) => anyhow::bail!("the capture pipeline panicked while stopping"),
    }
    if thread.join().is_err() {
        anyhow::bail!("the capture pipeline panicked while stopping");
    }
    if let Some(watcher) = watcher {
        let _ = watcher.await;
    }
    tracing::info!(
        records = counters.records.load(Ordering::Relaxed),
        chunks = counters.chunks.load(Ordering::Relaxed),
        bytes = counters.bytes.load(Ordering::Relaxed),
        lost_bytes = counters.lost_bytes.load(Ordering::Relaxed),
        duplicate_bytes = counters.duplicate_bytes.load(Ordering::Relaxed),
        ring_full = counters.kernel_losses[LossReason::RingFull as usize].load(Ordering::Relaxed),
        "eBPF programs detached; bye"
    );
    Ok(())
}

/// The pipeline thread's runtime, until the thread takes it. Let go without waiting when
/// startup fails before that: a runtime cannot be dropped (blocking) inside the main one.
struct PipelineRuntime(Option<tokio::runtime::Runtime>);

impl Drop for PipelineRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
