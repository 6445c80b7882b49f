//! `/metrics`: the Prometheus text exposition, from the same rows `GetStats` reads (one model,
//! two views). Counters and gauges live in `metrics-exporter-prometheus`' recorder and are fed
//! once per [`FLUSH_INTERVAL`] with what the rows counted since the last flush, through
//! handles cached per series: nothing per command, and a scrape never takes the lock the
//! pipeline needs. Series sum rows by the exported labels and keep what expired rows counted,
//! so a counter never goes down while its series lives. Labels are configurable; key names
//! never become labels.
//!
//! The latency histogram is the one piece written here, with the exporter's own formatting: its
//! recorder keeps every recorded sample until the next scrape (`record_many` records a value
//! `count` times: 29 ms and 16 MiB per million samples measured here), where the rows already
//! hold bucket counts.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    str::FromStr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use metrics::{Counter, Key, Label as MetricLabel, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    LabelSet, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
    formatting::{write_help_line, write_metric_line, write_type_line},
};
use metrics_util::MetricKindMask;
use respwatch_common::LossReason;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch as signal,
};

use super::{ServeState, convert, stopped};
use crate::{
    aggregate::{LATENCY_BOUNDS_NS, RowKey, Totals},
    enrich::Attributor,
    event::role_name,
};

/// How often the recorder is fed from the rows: how stale a scrape can be.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Series not fed for this long leave the exposition (the recorder's idle timeout): series of
/// expired rows, pods that are gone.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Flushes between re-registering every cached handle, so a handle the recorder dropped while
/// the flush stalled past [`IDLE_TIMEOUT`] is replaced (totals are set, so nothing is lost).
const REREGISTER_EVERY: u32 = 3;

/// A label per-command series may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Label {
    Namespace,
    Pod,
    Container,
    Pid,
    Comm,
    Role,
    Command,
    Peer,
    /// The pod's owning workload (Deployment, StatefulSet...): one value per pod, so no more
    /// series than `pod`.
    Workload,
}

impl Label {
    const ALL: [(Label, &'static str); 9] = [
        (Label::Namespace, "namespace"),
        (Label::Pod, "pod"),
        (Label::Container, "container"),
        (Label::Pid, "pid"),
        (Label::Comm, "comm"),
        (Label::Role, "role"),
        (Label::Command, "command"),
        (Label::Peer, "peer"),
        (Label::Workload, "workload"),
    ];

    fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(label, _)| *label == self)
            .map(|(_, name)| *name)
            .unwrap_or_default()
    }

    fn value(self, key: &RowKey, attributor: &Attributor) -> String {
        match self {
            Label::Workload => convert::workload(key, attributor).0,
            Label::Namespace => key.namespace.clone(),
            Label::Pod => key.pod.clone(),
            Label::Container => key.container.clone(),
            Label::Pid => key.pid.to_string(),
            Label::Comm => key.comm.clone(),
            Label::Role => role_name(key.role).to_owned(),
            Label::Command => key.command.clone(),
            Label::Peer => key.peer.clone(),
        }
    }
}

/// The labels per-command series carry (`--metrics-labels namespace,pod,container,role,command`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricLabels(Vec<Label>);

impl Default for MetricLabels {
    fn default() -> Self {
        MetricLabels(vec![
            Label::Namespace,
            Label::Pod,
            Label::Container,
            Label::Role,
            Label::Command,
            Label::Workload,
        ])
    }
}

impl FromStr for MetricLabels {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut labels = Vec::new();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let label = Label::ALL
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(l, _)| *l)
                .ok_or_else(|| {
                    let names: Vec<&str> = Label::ALL.iter().map(|(_, n)| *n).collect();
                    format!(
                        "unknown metrics label {name:?}; choose from {} (keys are never labels)",
                        names.join(",")
                    )
                })?;
            if !labels.contains(&label) {
                labels.push(label);
            }
        }
        labels.sort();
        Ok(MetricLabels(labels))
    }
}

impl std::fmt::Display for MetricLabels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|l| l.name()).collect();
        write!(f, "{}", names.join(","))
    }
}

/// Label values of the series a row counts in, as its pod is known now (a row recorded before
/// its pod's metadata arrived counts under the names learnt since).
fn series_values(key: &RowKey, chosen: &MetricLabels, attributor: &Attributor) -> Vec<String> {
    let resolved = attributor.pods().and_then(|_| attributor.resolve_row(key));
    let key = resolved.as_ref().unwrap_or(key);
    chosen.0.iter().map(|l| l.value(key, attributor)).collect()
}

/// Where the recorder's handles come from (the exporter does not use it).
static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

const COMMANDS: &str = "respwatch_commands_total";
const REJECTED: &str = "respwatch_command_rejected_total";
const FAILED: &str = "respwatch_command_failed_total";
const IN_BYTES: &str = "respwatch_command_in_bytes_total";
const OUT_BYTES: &str = "respwatch_command_out_bytes_total";
const ERRORS: &str = "respwatch_errors_total";
const DURATION: &str = "respwatch_command_duration_seconds";
const DURATION_HELP: &str = "Command latency: request read to reply written (server), request written to reply read (client).";

/// Per-series metrics: name, help, kind.
const DESCRIBED: [(&str, &str, Kind); 32] = [
    (
        COMMANDS,
        "Commands executed (Redis' calls: failed ones included, rejected ones not).",
        Kind::Counter,
    ),
    (
        REJECTED,
        "Commands rejected before execution (Redis' rejected_calls).",
        Kind::Counter,
    ),
    (
        FAILED,
        "Commands that failed during execution (Redis' failed_calls).",
        Kind::Counter,
    ),
    (
        IN_BYTES,
        "Bytes the traced process read for commands (requests for servers, replies for clients).",
        Kind::Counter,
    ),
    (
        OUT_BYTES,
        "Bytes the traced process wrote for commands (replies for servers, requests for clients).",
        Kind::Counter,
    ),
    (
        ERRORS,
        "Error replies by prefix, like INFO errorstats.",
        Kind::Counter,
    ),
    (
        "respwatch_stats_rows",
        "Rows the daemon keeps (process, peer, role, command); rows of exited processes expire.",
        Kind::Gauge,
    ),
    (
        "respwatch_kubernetes_synced",
        "1 when the node's pod watcher is in sync with the API server.",
        Kind::Gauge,
    ),
    (
        "respwatch_pod_info",
        "Pods on this node the daemon knows: namespace, pod, workload and its kind.",
        Kind::Gauge,
    ),
    (
        "respwatch_lost_total",
        "Data that went missing, by source and reason (ring buffer: kernel records; decoder: resynchronisations; pending requests: given up so memory stays bounded; subscriber queue: events).",
        Kind::Counter,
    ),
    (
        "respwatch_mid_stream_skipped_bytes_total",
        "Bytes of connections open before the daemon, skipped until their first message start.",
        Kind::Counter,
    ),
    (
        "respwatch_replicated_commands_total",
        "Commands masters propagated to replicas on this node's replication links (not requests of either end).",
        Kind::Counter,
    ),
    (
        "respwatch_replicated_bytes_total",
        "Bytes of replication streams: snapshots and propagated commands.",
        Kind::Counter,
    ),
    (
        "respwatch_lost_bytes_total",
        "Stream bytes lost: holes never filled (ring buffer full, segments never seen) and stream ends never delivered.",
        Kind::Counter,
    ),
    (
        "respwatch_kernel_lost_bytes_total",
        "Payload bytes the kernel could not put in a ring (ring buffer full).",
        Kind::Counter,
    ),
    (
        "respwatch_duplicate_bytes_total",
        "Retransmitted (or twice-seen) bytes dropped because they had been delivered once.",
        Kind::Counter,
    ),
    (
        "respwatch_reorder_held_bytes",
        "Bytes of out-of-order segments waiting for a hole before them to fill.",
        Kind::Gauge,
    ),
    (
        "respwatch_late_records_total",
        "Kernel records that arrived after newer ones had been handed on.",
        Kind::Counter,
    ),
    (
        "respwatch_closes_deferred_total",
        "Connection ends that did not fit in a ring and waited in the kernel's overflow map.",
        Kind::Counter,
    ),
    (
        "respwatch_not_resp_connections_total",
        "Connections whose first bytes looked like RESP but whose replies were not (memcached, POP3 ...): dropped.",
        Kind::Counter,
    ),
    (
        "respwatch_desync_bytes_total",
        "Bytes skipped while the decoder resynchronised.",
        Kind::Counter,
    ),
    (
        "respwatch_records_total",
        "Records received from the kernel.",
        Kind::Counter,
    ),
    (
        "respwatch_socket_bytes_total",
        "RESP socket bytes seen.",
        Kind::Counter,
    ),
    (
        "respwatch_events_total",
        "Command events decoded.",
        Kind::Counter,
    ),
    (
        "respwatch_tracked_connections",
        "Connections currently tracked.",
        Kind::Gauge,
    ),
    (
        "respwatch_kernel_excluded_cgroups",
        "Cgroups outside --namespaces that the kernel programs no longer look at.",
        Kind::Gauge,
    ),
    (
        "respwatch_watch_subscribers",
        "Open Watch streams.",
        Kind::Gauge,
    ),
    (
        "respwatch_uptime_seconds",
        "Seconds since the daemon started.",
        Kind::Gauge,
    ),
    (
        "respwatch_build_info",
        "Always 1; labels carry the version and node.",
        Kind::Gauge,
    ),
    (
        "respwatch_pipeline_lag_seconds",
        "Age of the oldest record of a batch when the pipeline had handled it, at most, over the last second (records wait up to 10 ms in the ring by design).",
        Kind::Gauge,
    ),
    (
        "respwatch_metrics_flush_seconds",
        "Time the last feed of these metrics from the rows took.",
        Kind::Gauge,
    ),
    (
        "respwatch_metrics_series",
        "Per-command series exported (label sets of respwatch_commands_total).",
        Kind::Gauge,
    ),
];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// A series of the per-command metrics: what its rows counted (expired ones included) and its
/// handles in the recorder.
struct Series {
    totals: Totals,
    handles: Option<SeriesHandles>,
}

struct SeriesHandles {
    labels: Vec<MetricLabel>,
    /// The labels as the exporter writes them, for the histogram lines written here.
    label_set: LabelSet,
    calls: Counter,
    rejected: Counter,
    failed: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
    errors: HashMap<String, Counter>,
}

impl SeriesHandles {
    fn register(recorder: &PrometheusRecorder, chosen: &MetricLabels, values: &[String]) -> Self {
        let labels: Vec<MetricLabel> = chosen
            .0
            .iter()
            .zip(values)
            .map(|(label, value)| MetricLabel::new(label.name(), value.clone()))
            .collect();
        let counter = |name: &'static str| {
            recorder.register_counter(&Key::from_parts(name, labels.clone()), &METADATA)
        };
        let label_set = LabelSet::from_key_and_global(
            &Key::from_parts(DURATION, labels.clone()),
            &indexmap::IndexMap::new(),
        );
        SeriesHandles {
            calls: counter(COMMANDS),
            rejected: counter(REJECTED),
            failed: counter(FAILED),
            bytes_in: counter(IN_BYTES),
            bytes_out: counter(OUT_BYTES),
            errors: HashMap::new(),
            label_set,
            labels,
        }
    }

    /// Sets every counter to the series' totals (this also tells the recorder the series lives).
    fn set(&mut self, recorder: &PrometheusRecorder, totals: &Totals) {
        self.calls.absolute(totals.calls);
        self.rejected.absolute(totals.rejected_calls);
        self.failed.absolute(totals.failed_calls);
        self.bytes_in.absolute(totals.bytes_in);
        self.bytes_out.absolute(totals.bytes_out);
        for (prefix, count) in &totals.errors {
            let counter = self.errors.entry(prefix.clone()).or_insert_with(|| {
                let mut labels = self.labels.clone();
                labels.push(MetricLabel::new("prefix", prefix.clone()));
                recorder.register_counter(&Key::from_parts(ERRORS, labels), &METADATA)
            });
            counter.absolute(*count);
        }
    }
}

#[derive(Default)]
struct Tables {
    series: HashMap<Vec<String>, Series>,
    flushes: u32,
}

/// The recorder, the series fed into it, and the exposition.
pub struct Exporter {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    chosen: MetricLabels,
    tables: Mutex<Tables>,
}

impl Exporter {
    pub fn new(chosen: MetricLabels) -> Self {
        let recorder = PrometheusBuilder::new()
            .idle_timeout(MetricKindMask::ALL, Some(IDLE_TIMEOUT))
            .build_recorder();
        for (name, help, kind) in DESCRIBED {
            let name = metrics::KeyName::from_const_str(name);
            let help = metrics::SharedString::const_str(help);
            match kind {
                Kind::Counter => recorder.describe_counter(name, None, help),
                Kind::Gauge => recorder.describe_gauge(name, None, help),
            }
        }
        Exporter {
            handle: recorder.handle(),
            recorder,
            chosen,
            tables: Mutex::new(Tables::default()),
        }
    }

    pub fn labels(&self) -> &MetricLabels {
        &self.chosen
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Feeds the recorder: what rows counted since the last flush (the aggregation's lock is
    /// held only to take that), then the daemon's own counters.
    pub fn flush(&self, state: &ServeState) {
        let started = std::time::Instant::now();
        let attributor = &state.shared.attributor;
        let mut changed = Vec::new();
        let rows = {
            let Ok(mut aggregator) = state.shared.aggregator.lock() else {
                return;
            };
            aggregator.drain_changes(|key, delta| {
                changed.push((series_values(key, &self.chosen, attributor), delta.clone()));
            });
            aggregator.rows()
        };
        let mut tables = self.tables();
        tables.flushes = tables.flushes.wrapping_add(1);
        let reregister = tables.flushes.is_multiple_of(REREGISTER_EVERY);
        for (values, delta) in changed {
            tables
                .series
                .entry(values)
                .or_insert_with(|| Series {
                    totals: Totals::default(),
                    handles: None,
                })
                .totals
                .add(&delta);
        }
        for (values, series) in &mut tables.series {
            if reregister {
                series.handles = None;
            }
            series
                .handles
                .get_or_insert_with(|| {
                    SeriesHandles::register(&self.recorder, &self.chosen, values)
                })
                .set(&self.recorder, &series.totals);
        }
        let series = tables.series.len();
        drop(tables);
        self.gauge("respwatch_stats_rows", vec![], rows as f64);
        self.gauge("respwatch_metrics_series", vec![], series as f64);
        self.flush_kubernetes(state);
        self.flush_daemon(state);
        self.gauge(
            "respwatch_metrics_flush_seconds",
            vec![],
            started.elapsed().as_secs_f64(),
        );
    }

    /// Forgets series that no row counts in any more (their rows expired, or moved to another
    /// series when their pod became known); they leave the exposition after [`IDLE_TIMEOUT`].
    pub fn forget_series_without_rows(&self, live_rows: &[RowKey], attributor: &Attributor) {
        let live: HashSet<Vec<String>> = live_rows
            .iter()
            .map(|key| series_values(key, &self.chosen, attributor))
            .collect();
        self.tables()
            .series
            .retain(|values, _| live.contains(values));
    }

    fn counter(&self, name: &'static str, labels: Vec<MetricLabel>, value: u64) {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
            .absolute(value);
    }

    fn gauge(&self, name: &'static str, labels: Vec<MetricLabel>, value: f64) {
        self.recorder
            .register_gauge(&Key::from_parts(name, labels), &METADATA)
            .set(value);
    }

    /// The pod watcher: whether it is in sync, and one info series per known pod (to join pod
    /// labels and workloads onto the command series in PromQL).
    fn flush_kubernetes(&self, state: &ServeState) {
        let Some(pods) = state.shared.attributor.pods() else {
            return;
        };
        self.gauge(
            "respwatch_kubernetes_synced",
            vec![],
            f64::from(u8::from(pods.is_synced())),
        );
        for pod in pods.pods() {
            let labels = vec![
                MetricLabel::new("namespace", pod.namespace.clone()),
                MetricLabel::new("pod", pod.name.clone()),
                MetricLabel::new("workload", pod.workload.clone()),
                MetricLabel::new("workload_kind", pod.workload_kind.clone()),
            ];
            self.gauge("respwatch_pod_info", labels, 1.0);
        }
    }

    /// The daemon's own counters: losses by source, connections, events, subscribers.
    fn flush_daemon(&self, state: &ServeState) {
        let counters = &state.shared.counters;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let lost = |source: &'static str, reason: &'static str| {
            vec![
                MetricLabel::new("source", source),
                MetricLabel::new("reason", reason),
            ]
        };
        for reason in LossReason::ALL {
            self.counter(
                "respwatch_lost_total",
                lost("ring_buffer", reason.name()),
                load(&counters.kernel_losses[reason as usize]),
            );
        }
        self.counter(
            "respwatch_lost_total",
            lost("decoder_desync", "desync"),
            load(&counters.desyncs),
        );
        // Requests given up unpaired so that memory stays bounded.
        self.counter(
            "respwatch_lost_total",
            lost("pending_requests", "queue_overflow"),
            load(&counters.overflowed),
        );
        self.counter(
            "respwatch_lost_total",
            lost("pending_requests", "memory_budget"),
            load(&counters.over_budget),
        );
        self.counter(
            "respwatch_lost_total",
            lost("subscriber_queue", "dropped"),
            load(&state.subscriber_drops),
        );
        let counted = [
            (
                "respwatch_mid_stream_skipped_bytes_total",
                &counters.mid_stream_skipped_bytes,
            ),
            (
                "respwatch_replicated_commands_total",
                &counters.replicated_commands,
            ),
            (
                "respwatch_replicated_bytes_total",
                &counters.replicated_bytes,
            ),
            ("respwatch_lost_bytes_total", &counters.lost_bytes),
            (
                "respwatch_kernel_lost_bytes_total",
                &counters.kernel_lost_bytes,
            ),
            ("respwatch_duplicate_bytes_total", &counters.duplicate_bytes),
            ("respwatch_late_records_total", &counters.late_records),
            ("respwatch_closes_deferred_total", &counters.closes_deferred),
            ("respwatch_not_resp_connections_total", &counters.not_resp),
            ("respwatch_desync_bytes_total", &counters.desync_bytes),
            ("respwatch_records_total", &counters.records),
            ("respwatch_socket_bytes_total", &counters.bytes),
            ("respwatch_events_total", &counters.events),
        ];
        for (name, value) in counted {
            self.counter(name, vec![], load(value));
        }
        let gauges = [
            ("respwatch_reorder_held_bytes", load(&counters.held_bytes)),
            (
                "respwatch_tracked_connections",
                load(&counters.tracked_connections),
            ),
            (
                "respwatch_kernel_excluded_cgroups",
                load(&counters.excluded_cgroups),
            ),
            ("respwatch_watch_subscribers", load(&state.subscribers)),
            (
                "respwatch_uptime_seconds",
                state.started.elapsed().as_secs(),
            ),
        ];
        for (name, value) in gauges {
            self.gauge(name, vec![], value as f64);
        }
        let lag_ns = counters.lag_max_ns.swap(0, Ordering::Relaxed);
        self.gauge(
            "respwatch_pipeline_lag_seconds",
            vec![],
            lag_ns as f64 / 1e9,
        );
        self.gauge(
            "respwatch_build_info",
            vec![
                MetricLabel::new("version", state.version),
                MetricLabel::new("node", state.node.clone()),
            ],
            1.0,
        );
    }

    /// The exposition (text format 0.0.4): the recorder's, then the latency histograms.
    pub fn render(&self) -> String {
        let mut out = self.handle.render();
        let tables = self.tables();
        write_help_line(&mut out, DURATION, None, None, DURATION_HELP);
        write_type_line(&mut out, DURATION, None, None, "histogram");
        for series in tables.series.values() {
            let Some(handles) = &series.handles else {
                continue;
            };
            let (labels, totals) = (&handles.label_set, &series.totals);
            for (bound, below) in LATENCY_BOUNDS_NS.iter().zip(totals.below) {
                let le = (*bound as f64 / 1e9).to_string();
                write_metric_line(
                    &mut out,
                    DURATION,
                    Some("bucket"),
                    labels,
                    Some(("le", le)),
                    below,
                    None,
                );
            }
            write_metric_line(
                &mut out,
                DURATION,
                Some("bucket"),
                labels,
                Some(("le", "+Inf")),
                totals.latencies,
                None,
            );
            write_metric_line::<&str, f64>(
                &mut out,
                DURATION,
                Some("sum"),
                labels,
                None,
                totals.latency_ns as f64 / 1e9,
                None,
            );
            write_metric_line::<&str, u64>(
                &mut out,
                DURATION,
                Some("count"),
                labels,
                None,
                totals.latencies,
                None,
            );
        }
        out
    }
}

/// Binds `addr` and serves `GET /metrics` until `stop`.
pub async fn start(
    state: Arc<ServeState>,
    addr: SocketAddr,
    stop: signal::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, labels = %state.exporter.labels(), "metrics listening on /metrics");
    let router = router(state);
    let task = tokio::spawn(async move {
        let shutdown = stopped(stop);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let router = router.clone();
                        tokio::spawn(async move {
                            if let Err(error) = serve_connection(stream, router, CONNECTION_TIMEOUT).await {
                                tracing::debug!(%error, "metrics request");
                            }
                        });
                    }
                    Err(error) => {
                        tracing::warn!(%error, "metrics accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = &mut shutdown => return Ok(()),
            }
        }
    });
    Ok((bound, task))
}

/// `/metrics`, and a line at `/` saying where they are.
fn router(state: Arc<ServeState>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/", get(|| async { "respwatchd: metrics at /metrics\n" }))
        .with_state(state)
}

async fn scrape(State(state): State<Arc<ServeState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.exporter.render(),
    )
}

/// How long a scraper has from connecting to taking the whole response: one that sends
/// nothing, or stops reading, is dropped, so it holds no rendered text (and no connection)
/// beyond this.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// One request per connection (as Prometheus' scrapes need no more), within `timeout`.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    timeout: Duration,
) -> anyhow::Result<()> {
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    match tokio::time::timeout(timeout, connection).await {
        Ok(served) => Ok(served?),
        Err(_) => anyhow::bail!("the scraper did not take the response within {timeout:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        enrich::Attributor,
        pipeline::{PipelineConfig, Shared},
        test_support::{conn, event},
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn state_with(labels: &str) -> Arc<ServeState> {
        let shared = Arc::new(Shared::new(
            PipelineConfig::default(),
            Attributor::default(),
        ));
        let config = crate::serve::ServeConfig {
            grpc_listen: crate::serve::ListenAddr::Unix("/unused".into()),
            metrics_listen: "127.0.0.1:0".parse().expect("addr"),
            node_name: "test".into(),
            tls: None,
            metric_labels: labels.parse().expect("labels"),
            expire_after: Duration::from_secs(300),
            watch_queue: 1,
            max_subscribers: 1,
            max_connection_age: None,
            authz: None,
            health_listen: None,
            reflection: false,
        };
        ServeState::new(shared, &config, Vec::new())
    }

    fn record(state: &ServeState, events: &[crate::event::CommandEvent]) {
        state
            .shared
            .aggregator
            .lock()
            .expect("lock")
            .record_batch(events, 0, |e| state.shared.row_key(e));
    }

    /// The sum of a metric's samples whose line starts with `series`.
    fn total(exposition: &str, series: &str) -> f64 {
        exposition
            .lines()
            .filter(|line| line.starts_with(series))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// After each flush, `/metrics` holds what `GetStats` reads from the rows: calls, failures,
    /// bytes and latency per series and in all, across flushes that add to existing series and
    /// create new ones; and nothing that happened after the flush.
    #[test]
    fn each_flush_brings_the_rows_totals_to_the_exposition() {
        let state = state_with("pid,command");
        let now = crate::serve::now_unix_ns() / 1_000_000_000;
        let (one, two) = (conn(1, 101), conn(2, 202));
        let mut failed = event(&one, "hset", now, 40_000);
        failed.outcome = respwatch_resp::correlate::Outcome::Failed;
        let batches = [
            vec![
                event(&one, "get", now, 2_000),
                event(&one, "get", now, 30_000),
                failed,
            ],
            vec![
                event(&one, "get", now, 700_000),
                event(&two, "set", now, 3_000_000_000),
                event(&two, "nosuch", now, 1_000),
            ],
        ];
        for batch in batches {
            record(&state, &batch);
            state.exporter.flush(&state);
            // Counted after the flush: not in this scrape.
            record(&state, &[event(&two, "del", now, 1_000)]);
            let text = state.exporter.render();
            state.exporter.flush(&state);
            let mut rows = Vec::new();
            state
                .shared
                .aggregator
                .lock()
                .expect("lock")
                .copy_rows(0, usize::MAX, None, &mut rows);
            let sum = |value: fn(&crate::aggregate::RowStats) -> u64| -> f64 {
                rows.iter().map(|(_, s)| value(s)).sum::<u64>() as f64
            };
            assert_eq!(total(&text, COMMANDS), sum(|s| s.calls) - 1.0);
            assert_eq!(total(&text, FAILED), sum(|s| s.failed_calls));
            assert_eq!(total(&text, IN_BYTES), sum(|s| s.bytes_in) - 10.0);
            let text = state.exporter.render();
            assert_eq!(total(&text, COMMANDS), sum(|s| s.calls));
            assert_eq!(total(&text, OUT_BYTES), sum(|s| s.bytes_out));
            for (key, stats) in &rows {
                let labels = format!(r#"{{pid="{}",command="{}"}}"#, key.pid, key.command);
                assert_eq!(
                    total(&text, &format!("{COMMANDS}{labels} ")),
                    stats.calls as f64,
                    "{labels}"
                );
                assert_eq!(
                    total(&text, &format!("{DURATION}_count{labels} ")),
                    stats.histogram.count() as f64,
                    "{labels}"
                );
                let sum_seconds = total(&text, &format!("{DURATION}_sum{labels} "));
                assert!(
                    (sum_seconds - stats.latency_ns as f64 / 1e9).abs() < 1e-9,
                    "{labels}: {sum_seconds}"
                );
            }
        }
        let text = state.exporter.render();
        assert_eq!(
            total(
                &text,
                r#"respwatch_command_duration_seconds_bucket{pid="101",command="get",le="0.00001"}"#
            ),
            1.0,
            "2 µs"
        );
        assert_eq!(
            total(
                &text,
                r#"respwatch_command_duration_seconds_bucket{pid="101",command="get",le="0.001"}"#
            ),
            3.0,
            "2 µs, 30 µs and 700 µs"
        );
        assert_eq!(
            total(
                &text,
                r#"respwatch_command_duration_seconds_bucket{pid="202",command="set",le="2.5"}"#
            ),
            0.0
        );
        assert_eq!(
            total(
                &text,
                r#"respwatch_command_duration_seconds_bucket{pid="202",command="set",le="5"}"#
            ),
            1.0
        );
        assert_eq!(
            total(
                &text,
                r#"respwatch_errors_total{pid="101",command="hset",prefix="ERR"}"#
            ),
            0.0,
            "a failure without an error reply counts no prefix"
        );
    }

    /// A series keeps what exited processes counted after their rows expired (they fold into
    /// the process-less row), and goes with its pod.
    #[test]
    fn a_series_keeps_what_exited_processes_counted_until_its_pod_goes() {
        let state = state_with("command");
        let now = crate::serve::now_unix_ns() / 1_000_000_000;
        let (gone, staying) = (conn(1, 101), conn(2, 202));
        record(
            &state,
            &[
                event(&gone, "get", now - 5, 1_000),
                event(&gone, "get", now - 5, 1_000),
            ],
        );
        record(&state, &[event(&staying, "get", now, 1_000)]);
        state.exporter.flush(&state);
        let expire = |alive: u32, pod_gone: bool, at: u64| {
            let attributor = &state.shared.attributor;
            let live: Vec<RowKey> = {
                let mut aggregator = state.shared.aggregator.lock().expect("lock");
                aggregator.expire(
                    at * 1_000_000_000,
                    1_000_000_000,
                    |pid| pid == alive,
                    |_| pod_gone,
                );
                aggregator.keys().cloned().collect()
            };
            state.exporter.forget_series_without_rows(&live, attributor);
            state.exporter.flush(&state);
        };
        let series = r#"respwatch_commands_total{command="get"} "#;
        expire(202, false, now);
        let pids = || -> Vec<u32> {
            let aggregator = state.shared.aggregator.lock().expect("lock");
            let mut pids: Vec<u32> = aggregator.keys().map(|key| key.pid).collect();
            pids.sort_unstable();
            pids
        };
        assert_eq!(
            pids(),
            [0, 202],
            "101's row folded into the process-less row"
        );
        record(&state, &[event(&staying, "get", now, 1_000)]);
        state.exporter.flush(&state);
        assert_eq!(total(&state.exporter.render(), series), 4.0);
        expire(0, false, now + 2);
        assert_eq!(pids(), [0]);
        assert_eq!(total(&state.exporter.render(), series), 4.0, "all exited");
        expire(0, true, now + 2);
        assert!(pids().is_empty());
        assert!(state.exporter.tables().series.is_empty());
    }

    /// A scraper that asks and then takes nothing is dropped after the timeout, and holds up no
    /// other scraper meanwhile. Both sockets get small buffers, so the response really cannot
    /// be written.
    #[tokio::test]
    async fn a_scraper_that_stops_reading_is_dropped_and_holds_up_no_other() {
        let state = state_with("pid,command");
        let now = crate::serve::now_unix_ns() / 1_000_000_000;
        let events: Vec<_> = (0..2000u32)
            .map(|pid| event(&conn(u64::from(pid), pid), "get", now, 1_000))
            .collect();
        record(&state, &events);
        state.exporter.flush(&state);
        let router = router(Arc::clone(&state));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let small = tokio::net::TcpSocket::new_v4().expect("socket");
        small.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut stalled = small.connect(addr).await.expect("connect");
        let (stalled_server, _) = listener.accept().await.expect("accept");
        let sndbuf: libc::c_int = 4096;
        // SAFETY: setsockopt on a socket this test owns, with a c_int option value.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&stalled_server),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                std::ptr::addr_of!(sndbuf).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0);
        stalled
            .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .expect("ask");
        let mut other = TcpStream::connect(addr).await.expect("connect");
        let (other_server, _) = listener.accept().await.expect("accept");
        other
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("ask");
        let started = std::time::Instant::now();
        let timeout = Duration::from_secs(2);
        let stalled_side = async {
            let result = serve_connection(stalled_server, router.clone(), timeout).await;
            (result, started.elapsed())
        };
        let other_side = async {
            let (handled, response) = tokio::join!(
                serve_connection(other_server, router.clone(), timeout),
                async {
                    let mut response = Vec::new();
                    other.read_to_end(&mut response).await.map(|_| response)
                }
            );
            (handled, response, started.elapsed())
        };
        let ((stalled_result, dropped_after), (handled, response, answered_after)) =
            tokio::join!(stalled_side, other_side);
        let response = String::from_utf8(response.expect("read")).expect("utf-8");
        handled.expect("the other scrape is answered");
        assert!(
            response.starts_with("HTTP/1.1 200 OK"),
            "{}",
            &response[..100]
        );
        assert!(response.len() > 200_000, "{} bytes", response.len());
        assert!(
            response.contains(r#"respwatch_commands_total{pid="1999",command="get"} 1"#),
            "whole response"
        );
        assert!(answered_after < timeout, "{answered_after:?}");
        let error = stalled_result.expect_err("the stalled scraper is dropped");
        assert!(
            error.to_string().contains("did not take the response"),
            "{error}"
        );
        assert!(
            dropped_after >= timeout && dropped_after < 4 * timeout,
            "{dropped_after:?}"
        );
    }

    /// Only GET (and HEAD) of the two paths; anything else is refused as HTTP says.
    #[tokio::test]
    async fn other_paths_and_methods_are_refused() {
        let state = state_with("command");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        for (request, status) in [
            ("GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n", "404"),
            (
                "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
                "405",
            ),
            ("HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "200"),
            ("garbage\r\n\r\n", "400"),
        ] {
            let mut client = TcpStream::connect(addr).await.expect("connect");
            let (server, _) = listener.accept().await.expect("accept");
            client.write_all(request.as_bytes()).await.expect("ask");
            let (_, response) = tokio::join!(
                serve_connection(server, router(Arc::clone(&state)), Duration::from_secs(2)),
                async {
                    let mut response = Vec::new();
                    let _ = client.read_to_end(&mut response).await;
                    String::from_utf8_lossy(&response).into_owned()
                }
            );
            assert!(
                response.starts_with(&format!("HTTP/1.1 {status}")),
                "{request:?}: {response}"
            );
        }
    }

    #[test]
    fn labels_parse() {
        assert_eq!("".parse::<MetricLabels>().unwrap().0, Vec::<Label>::new());
        assert_eq!(
            "command, role".parse::<MetricLabels>().unwrap().0,
            vec![Label::Role, Label::Command]
        );
        assert_eq!(
            "namespace,pod,container,role,command,workload"
                .parse::<MetricLabels>()
                .unwrap(),
            MetricLabels::default()
        );
        assert!("key".parse::<MetricLabels>().is_err());
    }
}
