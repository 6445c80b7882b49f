//! The `respwatch.v1.Observer` service, and the gRPC server that carries it beside reflection
//! (v1 and v1alpha) and `grpc.health.v1`.
use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context;
use respwatch_common::LossReason;
use respwatch_proto::{
    timestamp,
    v1::{self, observer_server::ObserverServer},
};
use tokio::sync::watch as signal;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{
    Request, Response, Status,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::{ServingStatus, server::HealthReporter};

use super::{
    ListenAddr, ServeConfig, ServeState, authz::Authorizer, convert, filter::FilterSet,
    now_unix_ns, stopped, tls::ReloadingTls, watch,
};
use crate::{
    aggregate::{self, RowKey, RowStats, WINDOW_SECONDS},
    pipeline::Shared,
};

/// HTTP/2 streams per client connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// Rows GetStats copies per hold of the aggregator's lock: the pipeline waits for one piece at
/// most (≤ 3 ms measured here), not for all rows (80-90 ms for 20,000).
const ROWS_PER_LOCK: usize = 256;
/// Copies started again because rows expired meanwhile, before the rest is copied in one hold.
const COPY_RETRIES: usize = 3;

/// The service implementation.
#[derive(Clone)]
pub struct Observer {
    state: Arc<ServeState>,
}

impl Observer {
    pub fn new(state: Arc<ServeState>) -> Self {
        Self { state }
    }

    fn shared(&self) -> &Shared {
        &self.state.shared
    }
}

#[tonic::async_trait]
impl v1::observer_server::Observer for Observer {
    type WatchStream = ReceiverStream<Result<v1::WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (metadata, _, request) = request.into_parts();
        let mut filters = FilterSet::parse(&request.allow, &request.deny)?;
        let authorized = self.state.authorize(&metadata, &mut filters).await?;
        let kept = self.state.shared.config.history;
        if request.last > 0 && kept == 0 {
            return Err(Status::failed_precondition(
                "this daemon keeps no recent events: start it with --recent-events N to use last",
            ));
        }
        // A place is taken here and given back when the subscriber ends.
        let max = self.state.max_subscribers;
        if self
            .state
            .subscribers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                (open < max).then_some(open + 1)
            })
            .is_err()
        {
            return Err(Status::resource_exhausted(format!(
                "{max} Watch streams are open already (--max-subscribers)"
            )));
        }
        Ok(Response::new(watch::subscribe(
            Arc::clone(&self.state),
            filters,
            authorized,
            request.last as usize,
        )))
    }

    async fn get_stats(
        &self,
        request: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::GetStatsResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let mut filters = FilterSet::parse(&request.allow, &request.deny)?;
        self.state.authorize(&metadata, &mut filters).await?;
        if filters.event_only() {
            return Err(Status::invalid_argument(
                "key_prefix and min_latency_usec apply to Watch only",
            ));
        }
        let group_by = convert::group_by(&request.group_by)?;
        if request.window_seconds as usize > WINDOW_SECONDS {
            return Err(Status::invalid_argument(format!(
                "window_seconds is at most {WINDOW_SECONDS}"
            )));
        }
        let now = now_unix_ns();
        let window = (request.window_seconds > 0)
            .then(|| (now / 1_000_000_000, u64::from(request.window_seconds)));
        let full = copy_rows(self.shared(), window)?;
        let attributor = &self.shared().attributor;
        let full = convert::current_rows(full, attributor);
        let grouped = aggregate::group(
            full.iter()
                .filter(|(key, stats)| filters.allows_row(key, stats, attributor)),
            &group_by,
        );
        let mut rows: Vec<v1::StatsRow> = grouped
            .iter()
            .map(|(key, stats)| convert::row(key, stats, attributor))
            .collect();
        rows.sort_by(|a, b| {
            b.calls.cmp(&a.calls).then_with(|| {
                (
                    &a.namespace,
                    &a.pod,
                    &a.container,
                    a.pid,
                    &a.comm,
                    a.role,
                    &a.peer,
                    &a.command,
                )
                    .cmp(&(
                        &b.namespace,
                        &b.pod,
                        &b.container,
                        b.pid,
                        &b.comm,
                        b.role,
                        &b.peer,
                        &b.command,
                    ))
            })
        });
        Ok(Response::new(v1::GetStatsResponse {
            node: self.state.node.clone(),
            time: Some(timestamp(now)),
            window_seconds: request.window_seconds,
            rows,
        }))
    }

    async fn get_status(
        &self,
        request: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::GetStatusResponse>, Status> {
        // Node-wide counters only, no keys or commands: any authenticated caller.
        if let Some(authorizer) = &self.state.authz {
            authorizer
                .authenticate(&Authorizer::token(request.metadata())?)
                .await?;
        }
        Ok(Response::new(status(&self.state)))
    }
}

pub fn status(state: &ServeState) -> v1::GetStatusResponse {
    let counters = &state.shared.counters;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let mut losses: Vec<v1::Loss> = LossReason::ALL
        .iter()
        .map(|reason| v1::Loss {
            source: v1::LossSource::RingBuffer as i32,
            reason: reason.name().to_owned(),
            count: load(&counters.kernel_losses[*reason as usize]),
        })
        .collect();
    losses.push(v1::Loss {
        source: v1::LossSource::DecoderDesync as i32,
        reason: "desync".to_owned(),
        count: load(&counters.desyncs),
    });
    losses.push(v1::Loss {
        source: v1::LossSource::SubscriberQueue as i32,
        reason: "dropped".to_owned(),
        count: load(&state.subscriber_drops),
    });
    let stats_rows = state
        .shared
        .aggregator
        .lock()
        .map(|a| a.rows() as u64)
        .unwrap_or_default();
    v1::GetStatusResponse {
        node: state.node.clone(),
        version: state.version.to_owned(),
        uptime_seconds: state.started.elapsed().as_secs(),
        kernel_release: state.kernel_release.clone(),
        attached_programs: state.attached.clone(),
        records: load(&counters.records),
        chunks: load(&counters.chunks),
        bytes: load(&counters.bytes),
        events: load(&counters.events),
        losses,
        tracked_connections: load(&counters.tracked_connections),
        subscribers: load(&state.subscribers) as u32,
        kubernetes_sync: state.shared.attributor.sync_state(),
        started: Some(timestamp(state.started_unix_ns)),
        stats_rows,
        lost_bytes: load(&counters.lost_bytes),
        duplicate_bytes: load(&counters.duplicate_bytes),
        replicated_commands: load(&counters.replicated_commands),
        replicated_bytes: load(&counters.replicated_bytes),
        not_resp_connections: load(&counters.not_resp),
    }
}

/// The gRPC server: where it listens, its task, and what its health service answers.
pub struct Grpc {
    pub addr: ListenAddr,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub health: HealthReporter,
}

/// Both the server as a whole (`""`, what probes ask by default) and the Observer service stop
/// serving: nothing is captured any more.
pub async fn set_not_serving(health: &HealthReporter) {
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health.set_not_serving::<ObserverServer<Observer>>().await;
}

/// Binds the gRPC listener and spawns the server.
pub async fn start(
    state: Arc<ServeState>,
    config: &ServeConfig,
    stop: signal::Receiver<bool>,
) -> anyhow::Result<Grpc> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ObserverServer<Observer>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) = if config.reflection {
        (
            Some(reflection().build_v1().context("reflection v1")?),
            Some(reflection().build_v1alpha().context("reflection v1alpha")?),
        )
    } else {
        (None, None)
    };
    // Dead peers and half-open connections are found and closed instead of holding a
    // subscriber's place forever.
    let mut builder = Server::builder()
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Streams one connection may have open at once (Watch streams are capped node-wide by
        // --max-subscribers on top): a client cannot make the daemon hold unbounded calls.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION));
    if let Some((age, grace)) = config.max_connection_age {
        builder = builder
            .max_connection_age(age)
            .max_connection_age_grace(grace);
    }
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(ReloadingTls::new(files.clone())?)),
        None => None,
    };
    if tls.is_none()
        && let ListenAddr::Tcp(addr) = &config.grpc_listen
        && !addr.ip().is_loopback()
    {
        tracing::warn!(%addr, "gRPC listens beyond loopback without TLS: anyone who can reach it sees Redis traffic metadata; pass --tls-cert/--tls-key");
    }
    if let Some(addr) = config.health_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("health listener on {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, "gRPC health checks listening (plaintext, health only)");
        let health_only = Server::builder().add_service(health_service.clone());
        let shutdown = stopped(stop.clone());
        tokio::spawn(async move {
            let incoming = TcpIncoming::from(listener);
            if let Err(error) = health_only
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
            {
                tracing::warn!(%error, "health listener");
            }
        });
    }
    let router = builder
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(ObserverServer::new(Observer::new(state)));
    let shutdown = stopped(stop);
    match &config.grpc_listen {
        ListenAddr::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("gRPC listener on {addr}"))?;
            let bound: SocketAddr = listener.local_addr()?;
            tracing::info!(addr = %bound, tls = tls.is_some(), "gRPC API listening");
            let task = tokio::spawn(async move {
                match tls {
                    Some(tls) => {
                        router
                            .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                            .await
                    }
                    None => {
                        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                        router
                            .serve_with_incoming_shutdown(incoming, shutdown)
                            .await
                    }
                }
                .context("gRPC server")
            });
            Ok(Grpc {
                addr: ListenAddr::Tcp(bound),
                task,
                health,
            })
        }
        ListenAddr::Unix(path) => {
            anyhow::ensure!(
                tls.is_none(),
                "TLS (--tls-cert) is for a TCP --grpc-listen; a unix socket is guarded by its \
                 file permissions"
            );
            if path.exists() {
                // A stale socket of an earlier run; binding fails while a live one holds it.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    anyhow::bail!(
                        "gRPC listener on unix:{}: another process is serving there",
                        path.display()
                    );
                }
                std::fs::remove_file(path)
                    .with_context(|| format!("removing stale {}", path.display()))?;
            }
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("gRPC listener on unix:{}", path.display()))?;
            tracing::info!(path = %path.display(), "gRPC API listening");
            let owned = path.clone();
            let task = tokio::spawn(async move {
                let served = router
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
                    .await
                    .context("gRPC server");
                let _ = std::fs::remove_file(&owned);
                served
            });
            Ok(Grpc {
                addr: config.grpc_listen.clone(),
                task,
                health,
            })
        }
    }
}

/// Every row, copied in pieces of [`ROWS_PER_LOCK`] (see `Aggregator::copy_rows`): started
/// again when rows expired meanwhile, since an expired row folds into another row.
fn copy_rows(
    shared: &Shared,
    window: Option<(u64, u64)>,
) -> Result<Vec<(RowKey, RowStats)>, Status> {
    let mut rows = Vec::new();
    for attempt in 0..=COPY_RETRIES {
        let piece = if attempt == COPY_RETRIES {
            usize::MAX
        } else {
            ROWS_PER_LOCK
        };
        rows.clear();
        let (mut from, mut expirations) = (Some(0), None);
        while let Some(at) = from {
            let aggregator = shared
                .aggregator
                .lock()
                .map_err(|_| Status::internal("aggregator poisoned"))?;
            if *expirations.get_or_insert(aggregator.expirations()) != aggregator.expirations() {
                break;
            }
            if at == 0 {
                // Grown once, not while the lock is held for later pieces.
                rows.reserve(aggregator.rows());
            }
            from = aggregator.copy_rows(at, piece, window, &mut rows);
        }
        if from.is_none() {
            break;
        }
    }
    Ok(rows)
}
