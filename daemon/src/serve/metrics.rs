//! `/metrics`: the Prometheus text exposition, rendered on each scrape from the same
//! aggregation `GetStats` reads (one model, two views: no second set of counters to drift).
//! Labels are configurable; key names never become labels.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    str::FromStr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use respwatch_common::LossReason;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch as signal,
};

use super::{ServeState, convert, stopped};
use crate::{
    aggregate::{GroupBy, RowKey, RowStats},
    enrich::Attributor,
    event::role_name,
};

/// Latency histogram bounds in seconds.
pub const BUCKETS_SECONDS: [f64; 19] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

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

impl MetricLabels {
    fn group_by(&self) -> Vec<GroupBy> {
        self.0
            .iter()
            .map(|label| match label {
                Label::Namespace => GroupBy::Namespace,
                Label::Pod => GroupBy::Pod,
                Label::Container => GroupBy::Container,
                Label::Pid | Label::Comm => GroupBy::Process,
                Label::Role => GroupBy::Role,
                Label::Command => GroupBy::Command,
                Label::Peer => GroupBy::Peer,
                Label::Workload => GroupBy::Pod,
            })
            .collect()
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `{a="x",b="y"}` from pairs (empty pairs: no braces).
fn labels(pairs: &[(&str, String)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A per-row counter: name, help, value.
type PerRow = (&'static str, &'static str, fn(&RowStats) -> u64);

/// Rows summed by the exported label values (what is not exported is summed over).
fn series_of(
    rows: Vec<(RowKey, RowStats)>,
    chosen: &MetricLabels,
    attributor: &Attributor,
) -> BTreeMap<Vec<String>, RowStats> {
    let rows = convert::current_rows(rows, attributor);
    let mut series: BTreeMap<Vec<String>, RowStats> = BTreeMap::new();
    let group_by = chosen.group_by();
    for (key, stats) in &rows {
        let key = convert::project(key, &group_by);
        series
            .entry(chosen.0.iter().map(|l| l.value(&key, attributor)).collect())
            .or_default()
            .merge(stats);
    }
    series
}

/// What expired rows had counted, by the label values of their series. Folded back into a
/// series while it has live rows, so its counters never go down when one of its processes exits
/// (`rate()` would read that as a reset); dropped with the series' last live row.
#[derive(Default)]
pub struct RetiredSeries(std::sync::Mutex<BTreeMap<Vec<String>, RowStats>>);

impl RetiredSeries {
    pub fn retire(
        &self,
        rows: Vec<(RowKey, RowStats)>,
        chosen: &MetricLabels,
        attributor: &Attributor,
    ) {
        if rows.is_empty() {
            return;
        }
        let expired = series_of(rows, chosen, attributor);
        let mut retired = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (values, stats) in expired {
            retired.entry(values).or_default().merge(&stats);
        }
    }

    /// Adds what is retired to the live `series`, forgetting what no live series carries on.
    fn fold_into(&self, series: &mut BTreeMap<Vec<String>, RowStats>) {
        let mut retired = self.0.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|values, stats| match series.get_mut(values) {
            Some(live) => {
                live.merge(stats);
                true
            }
            None => false,
        });
    }
}

/// Renders the exposition (text format 0.0.4).
pub fn render(state: &ServeState, chosen: &MetricLabels) -> String {
    let (rows, row_count) = {
        let Ok(aggregator) = state.shared.aggregator.lock() else {
            return String::new();
        };
        (
            aggregator.query(|_| true, &convert::ALL_GROUP_BY, None),
            aggregator.rows(),
        )
    };
    let attributor = &state.shared.attributor;
    let mut series = series_of(rows, chosen, attributor);
    state.retired.fold_into(&mut series);
    let names: Vec<&str> = chosen.0.iter().map(|l| l.name()).collect();
    let pairs = |values: &[String]| -> Vec<(&str, String)> {
        names.iter().copied().zip(values.iter().cloned()).collect()
    };
    let mut out = String::with_capacity(4096 + series.len() * 1024);
    let per_row: [PerRow; 5] = [
        (
            "respwatch_commands_total",
            "Commands executed (Redis' calls: failed ones included, rejected ones not).",
            |s| s.calls,
        ),
        (
            "respwatch_command_rejected_total",
            "Commands rejected before execution (Redis' rejected_calls).",
            |s| s.rejected_calls,
        ),
        (
            "respwatch_command_failed_total",
            "Commands that failed during execution (Redis' failed_calls).",
            |s| s.failed_calls,
        ),
        (
            "respwatch_command_in_bytes_total",
            "Bytes the traced process read for commands (requests for servers, replies for clients).",
            |s| s.bytes_in,
        ),
        (
            "respwatch_command_out_bytes_total",
            "Bytes the traced process wrote for commands (replies for servers, requests for clients).",
            |s| s.bytes_out,
        ),
    ];
    for (name, help, value) in per_row {
        header(&mut out, name, "counter", help);
        for (values, stats) in &series {
            let _ = writeln!(out, "{name}{} {}", labels(&pairs(values)), value(stats));
        }
    }
    header(
        &mut out,
        "respwatch_errors_total",
        "counter",
        "Error replies by prefix, like INFO errorstats.",
    );
    for (values, stats) in &series {
        for (prefix, count) in &stats.errors {
            let mut with_prefix = pairs(values);
            with_prefix.push(("prefix", prefix.clone()));
            let _ = writeln!(
                out,
                "respwatch_errors_total{} {count}",
                labels(&with_prefix)
            );
        }
    }
    let name = "respwatch_command_duration_seconds";
    header(
        &mut out,
        name,
        "histogram",
        "Command latency: request read to reply written (server), request written to reply read (client).",
    );
    // The last bound stands for +Inf (about 146 years: every bucket that can hold a latency).
    let bounds_ns: Vec<u64> = BUCKETS_SECONDS
        .iter()
        .map(|s| (s * 1e9) as u64)
        .chain([u64::MAX >> 2])
        .collect();
    for (values, stats) in &series {
        let cumulative = stats.histogram.cumulative(&bounds_ns);
        let count = cumulative.last().copied().unwrap_or_default();
        for (bound, in_bucket) in BUCKETS_SECONDS.iter().zip(&cumulative) {
            let mut with_le = pairs(values);
            with_le.push(("le", bound.to_string()));
            let _ = writeln!(out, "{name}_bucket{} {in_bucket}", labels(&with_le));
        }
        let mut with_le = pairs(values);
        with_le.push(("le", "+Inf".to_owned()));
        let _ = writeln!(out, "{name}_bucket{} {count}", labels(&with_le));
        let _ = writeln!(
            out,
            "{name}_sum{} {}",
            labels(&pairs(values)),
            stats.latency_ns as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count{} {count}", labels(&pairs(values)));
    }
    header(
        &mut out,
        "respwatch_stats_rows",
        "gauge",
        "Rows the daemon keeps (process, peer, role, command); rows of exited processes expire.",
    );
    let _ = writeln!(out, "respwatch_stats_rows {row_count}");
    render_daemon(&mut out, state);
    out
}

/// The pod watcher: whether it is in sync, and one info series per known pod (to join pod
/// labels and workloads onto the command series in PromQL).
fn render_kubernetes(out: &mut String, state: &ServeState) {
    let Some(pods) = state.shared.attributor.pods() else {
        return;
    };
    header(
        out,
        "respwatch_kubernetes_synced",
        "gauge",
        "1 when the node's pod watcher is in sync with the API server.",
    );
    let _ = writeln!(
        out,
        "respwatch_kubernetes_synced {}",
        u8::from(pods.is_synced())
    );
    header(
        out,
        "respwatch_pod_info",
        "gauge",
        "Pods on this node the daemon knows: namespace, pod, workload and its kind.",
    );
    let mut known = pods.pods();
    known.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for pod in known {
        let pairs = [
            ("namespace", pod.namespace.clone()),
            ("pod", pod.name.clone()),
            ("workload", pod.workload.clone()),
            ("workload_kind", pod.workload_kind.clone()),
        ];
        let _ = writeln!(out, "respwatch_pod_info{} 1", labels(&pairs));
    }
}

/// The daemon's own counters: losses by source, connections, events, subscribers.
fn render_daemon(out: &mut String, state: &ServeState) {
    render_kubernetes(out, state);
    let counters = &state.shared.counters;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    header(
        out,
        "respwatch_lost_total",
        "counter",
        "Data that went missing, by source and reason (ring buffer: kernel records; decoder: resynchronisations; subscriber queue: events).",
    );
    for reason in LossReason::ALL {
        let pairs = [
            ("source", "ring_buffer".to_owned()),
            ("reason", reason.name().to_owned()),
        ];
        let _ = writeln!(
            out,
            "respwatch_lost_total{} {}",
            labels(&pairs),
            load(&counters.kernel_losses[reason as usize])
        );
    }
    let desync = [
        ("source", "decoder_desync".to_owned()),
        ("reason", "desync".to_owned()),
    ];
    let _ = writeln!(
        out,
        "respwatch_lost_total{} {}",
        labels(&desync),
        load(&counters.desyncs)
    );
    // Requests given up unpaired so that memory stays bounded.
    for (reason, count) in [
        ("queue_overflow", &counters.overflowed),
        ("memory_budget", &counters.over_budget),
    ] {
        let pending = [
            ("source", "pending_requests".to_owned()),
            ("reason", reason.to_owned()),
        ];
        let _ = writeln!(
            out,
            "respwatch_lost_total{} {}",
            labels(&pending),
            load(count)
        );
    }
    let queue = [
        ("source", "subscriber_queue".to_owned()),
        ("reason", "dropped".to_owned()),
    ];
    let _ = writeln!(
        out,
        "respwatch_lost_total{} {}",
        labels(&queue),
        load(&state.subscriber_drops)
    );
    let simple: [(&str, &str, &str, u64); 18] = [
        (
            "respwatch_mid_stream_skipped_bytes_total",
            "counter",
            "Bytes of connections open before the daemon, skipped until their first message start.",
            load(&counters.mid_stream_skipped_bytes),
        ),
        (
            "respwatch_replicated_commands_total",
            "counter",
            "Commands masters propagated to replicas on this node's replication links (not requests of either end).",
            load(&counters.replicated_commands),
        ),
        (
            "respwatch_replicated_bytes_total",
            "counter",
            "Bytes of replication streams: snapshots and propagated commands.",
            load(&counters.replicated_bytes),
        ),
        (
            "respwatch_lost_bytes_total",
            "counter",
            "Stream bytes lost: holes never filled (ring buffer full, segments never seen) and stream ends never delivered.",
            load(&counters.lost_bytes),
        ),
        (
            "respwatch_kernel_lost_bytes_total",
            "counter",
            "Payload bytes the kernel could not put in a ring (ring buffer full).",
            load(&counters.kernel_lost_bytes),
        ),
        (
            "respwatch_duplicate_bytes_total",
            "counter",
            "Retransmitted (or twice-seen) bytes dropped because they had been delivered once.",
            load(&counters.duplicate_bytes),
        ),
        (
            "respwatch_reorder_held_bytes",
            "gauge",
            "Bytes of out-of-order segments waiting for a hole before them to fill.",
            load(&counters.held_bytes),
        ),
        (
            "respwatch_late_records_total",
            "counter",
            "Kernel records that arrived after newer ones had been handed on.",
            load(&counters.late_records),
        ),
        (
            "respwatch_closes_deferred_total",
            "counter",
            "Connection ends that did not fit in a ring and waited in the kernel's overflow map.",
            load(&counters.closes_deferred),
        ),
        (
            "respwatch_not_resp_connections_total",
            "counter",
            "Connections whose first bytes looked like RESP but whose replies were not (memcached, POP3 ...): dropped.",
            load(&counters.not_resp),
        ),
        (
            "respwatch_desync_bytes_total",
            "counter",
            "Bytes skipped while the decoder resynchronised.",
            load(&counters.desync_bytes),
        ),
        (
            "respwatch_records_total",
            "counter",
            "Records received from the kernel.",
            load(&counters.records),
        ),
        (
            "respwatch_socket_bytes_total",
            "counter",
            "RESP socket bytes seen.",
            load(&counters.bytes),
        ),
        (
            "respwatch_events_total",
            "counter",
            "Command events decoded.",
            load(&counters.events),
        ),
        (
            "respwatch_tracked_connections",
            "gauge",
            "Connections currently tracked.",
            load(&counters.tracked_connections),
        ),
        (
            "respwatch_kernel_excluded_cgroups",
            "gauge",
            "Cgroups outside --namespaces that the kernel programs no longer look at.",
            load(&counters.excluded_cgroups),
        ),
        (
            "respwatch_watch_subscribers",
            "gauge",
            "Open Watch streams.",
            load(&state.subscribers),
        ),
        (
            "respwatch_uptime_seconds",
            "gauge",
            "Seconds since the daemon started.",
            state.started.elapsed().as_secs(),
        ),
    ];
    for (name, kind, help, value) in simple {
        header(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    header(
        out,
        "respwatch_build_info",
        "gauge",
        "Always 1; labels carry the version and node.",
    );
    let info = [
        ("version", state.version.to_owned()),
        ("node", state.node.clone()),
    ];
    let _ = writeln!(out, "respwatch_build_info{} 1", labels(&info));
}

/// Binds `addr` and serves `GET /metrics` (HTTP/1.1, one request per connection).
pub async fn start(
    state: Arc<ServeState>,
    addr: SocketAddr,
    chosen: MetricLabels,
    stop: signal::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, labels = %chosen, "metrics listening on /metrics");
    let chosen = Arc::new(chosen);
    let renders = Arc::new(tokio::sync::Mutex::new(()));
    let task = tokio::spawn(async move {
        let shutdown = stopped(stop);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let (state, chosen) = (Arc::clone(&state), Arc::clone(&chosen));
                        let renders = Arc::clone(&renders);
                        tokio::spawn(async move {
                            let handled = handle(stream, &state, &chosen, &renders, WRITE_TIMEOUT);
                            if let Err(error) = handled.await {
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

/// How long a scraper has to take a response: one that stops reading is dropped, so it holds
/// no rendered text (and no connection) beyond this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// `renders`: one render at a time, however many scrapers come at once (each render holds the
/// aggregation a moment and builds the whole text).
async fn handle(
    mut stream: TcpStream,
    state: &ServeState,
    chosen: &MetricLabels,
    renders: &tokio::sync::Mutex<()>,
    write_timeout: Duration,
) -> anyhow::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || request.len() > 16 * 1024 {
                anyhow::bail!("incomplete request");
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), read_head).await??;
    let line = String::from_utf8_lossy(request.split(|b| *b == b'\n').next().unwrap_or_default())
        .into_owned();
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split('?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", {
            let _one_at_a_time = renders.lock().await;
            render(state, chosen)
        }),
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "respwatchd: metrics at /metrics\n".to_owned(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let respond = async {
        stream.write_all(head.as_bytes()).await?;
        if method != "HEAD" {
            stream.write_all(body.as_bytes()).await?;
        }
        stream.shutdown().await
    };
    match tokio::time::timeout(write_timeout, respond).await {
        Ok(written) => Ok(written?),
        Err(_) => anyhow::bail!("the scraper did not take the response within {write_timeout:?}"),
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

    /// A scraper that asks and then takes nothing is dropped after the write timeout, and
    /// holds up no other scraper meanwhile (the render is not held while writing). Both sockets
    /// get small buffers, so the response really cannot be written.
    #[tokio::test]
    async fn a_scraper_that_stops_reading_is_dropped_and_holds_up_no_other() {
        let shared = Arc::new(Shared::new(
            PipelineConfig::default(),
            Attributor::default(),
        ));
        let now = crate::serve::now_unix_ns() / 1_000_000_000;
        let events: Vec<_> = (0..2000u32)
            .map(|pid| event(&conn(u64::from(pid), pid), "get", now, 1_000))
            .collect();
        shared
            .aggregator
            .lock()
            .expect("lock")
            .record_batch(&events, 0, |e| shared.row_key(e));
        let config = crate::serve::ServeConfig {
            grpc_listen: crate::serve::ListenAddr::Unix("/unused".into()),
            metrics_listen: "127.0.0.1:0".parse().expect("addr"),
            node_name: "test".into(),
            tls: None,
            metric_labels: "pid,command".parse().expect("labels"),
            expire_after: Duration::from_secs(300),
            watch_queue: 1,
            max_subscribers: 1,
            authz: None,
            health_listen: None,
            reflection: false,
        };
        let state = ServeState::new(shared, &config, Vec::new());
        let chosen = config.metric_labels.clone();
        let renders = tokio::sync::Mutex::new(());
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
            .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .expect("ask");
        let started = std::time::Instant::now();
        let write_timeout = Duration::from_secs(2);
        let stalled_side = async {
            let result = handle(stalled_server, &state, &chosen, &renders, write_timeout).await;
            (result, started.elapsed())
        };
        let other_side = async {
            let (handled, response) = tokio::join!(
                handle(other_server, &state, &chosen, &renders, write_timeout),
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
        assert!(response.len() > 200_000, "{} bytes", response.len());
        assert!(response.trim_end().ends_with("} 1"), "whole response");
        assert!(answered_after < write_timeout, "{answered_after:?}");
        let error = stalled_result.expect_err("the stalled scraper is dropped");
        assert!(
            error.to_string().contains("did not take the response"),
            "{error}"
        );
        assert!(
            dropped_after >= write_timeout && dropped_after < 4 * write_timeout,
            "{dropped_after:?}"
        );
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
        assert_eq!(
            labels(&[("a", "x\"y\\\n".to_owned())]),
            "{a=\"x\\\"y\\\\\\n\"}"
        );
    }
}
