//! `redisctl watch`: live commands, one line (or JSON object) each.
use std::{io::Write, time::Duration};

use respwatch_proto::v1::{self, watch_response::Kind};
use serde_json::json;

use super::WatchOutput;
use crate::{
    client::ServerArgs,
    cluster::{ClusterArgs, Delivery, Failure, discover, none_answered, watch_all},
    filters::{EventFilterArgs, FilterArgs, parse_duration},
    format::{clock, colour_enabled, latency_ns, paint, rfc3339, role, visible, who},
    watch_stream::{WatchItem, WatchStream},
};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  redisctl watch                                  every command on this node
  redisctl watch -n shop --pod web --errors-only  failing commands of shop/web-* pods
  redisctl watch --pid 4242 --command get         GETs of one process
  redisctl watch --role server --min-latency 5ms  slow commands, as Redis servers see them
  redisctl watch --last 100 -o json --count 100   the last 100 commands, as JSON lines
                                                  (daemon started with --recent-events)
  redisctl --cluster watch -n shop                every node's, merged (NODE column; --last N per node)")]
pub struct WatchArgs {
    #[command(flatten)]
    pub filters: FilterArgs,
    #[command(flatten)]
    pub events: EventFilterArgs,
    /// Start with up to N recent matching commands the daemon keeps in memory (it keeps them
    /// only when started with --recent-events; otherwise the Watch is refused).
    #[arg(long, default_value_t = 0)]
    pub last: u32,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = WatchOutput::Compact)]
    pub output: WatchOutput,
    /// Exit after N commands.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit after this long, e.g. 30s.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
}

pub async fn run(server: &ServerArgs, args: WatchArgs) -> anyhow::Result<()> {
    let mut stream = WatchStream::open(server, watch_request(&args)).await?;
    let colour = colour_enabled();
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut shown = 0u64;
    let stdout = std::io::stdout();
    loop {
        if args.count.is_some_and(|count| shown >= count) {
            return Ok(());
        }
        let next = stream.next();
        let item = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, next).await {
                Ok(item) => item,
                Err(_) => return Ok(()),
            },
            None => next.await,
        };
        let (line, is_event) = match item? {
            None => return Ok(()),
            Some(WatchItem::Message(message)) => {
                match render(&message, args.output, colour, None) {
                    Some(rendered) => rendered,
                    None => continue,
                }
            }
            Some(WatchItem::Reconnected { cause, gap }) => (
                reconnected(&server.server, None, &cause, gap, args.output, colour),
                false,
            ),
        };
        shown += u64::from(is_event);
        let mut out = stdout.lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // The reader went away (e.g. `| head`): done.
            return Ok(());
        }
    }
}

/// The Watch request of the filters and `--last`.
fn watch_request(args: &WatchArgs) -> v1::WatchRequest {
    let mut filter = args.filters.to_proto();
    args.events.apply(&mut filter);
    v1::WatchRequest {
        allow: vec![filter],
        deny: Vec::new(),
        last: args.last,
    }
}

/// One output line for a message, and whether it is a command event (what --count counts).
/// `node` is the padded NODE column of `--cluster` compact output.
fn render(
    message: &v1::WatchResponse,
    output: WatchOutput,
    colour: bool,
    node: Option<&str>,
) -> Option<(String, bool)> {
    let rendered = match (&message.kind, output) {
        (Some(Kind::Event(event)), WatchOutput::Compact) => (compact(node, event, colour), true),
        (Some(Kind::Event(event)), WatchOutput::Json) => {
            (event_json(message, event).to_string(), true)
        }
        (Some(Kind::LostEvents(lost)), WatchOutput::Compact) => {
            let source = v1::LossSource::try_from(lost.source).unwrap_or_default().short_name();
            let on = node.map(|n| format!("{}: ", n.trim_end())).unwrap_or_default();
            let text = format!("!! {on}lost {} events ({source})", lost.count);
            (paint(colour, "1;33", &text), false)
        }
        (Some(Kind::LostEvents(lost)), WatchOutput::Json) => (
            json!({
                "node": message.node,
                "sequence": message.sequence,
                "lost_events": {
                    "source": v1::LossSource::try_from(lost.source).unwrap_or_default().short_name(),
                    "count": lost.count,
                    "first": lost.first.as_ref().map(|t| rfc3339(Some(t))),
                    "last": lost.last.as_ref().map(|t| rfc3339(Some(t))),
                },
            })
            .to_string(),
            false,
        ),
        (None, _) => return None,
    };
    Some(rendered)
}

/// The line that marks a gap: the stream broke (`cause`) and was opened again after `gap`;
/// commands in between were not seen.
fn reconnected(
    server: &str,
    node: Option<&str>,
    cause: &str,
    gap: Duration,
    output: WatchOutput,
    colour: bool,
) -> String {
    match output {
        WatchOutput::Compact => {
            let on = node
                .map(|n| format!("{}: ", n.trim_end()))
                .unwrap_or_default();
            let text = format!(
                "!! {on}reconnected to {server} after {} ms ({}): commands in between not shown",
                gap.as_millis(),
                visible(cause)
            );
            paint(colour, "1;33", &text)
        }
        WatchOutput::Json => json!({
            "node": node.map(str::trim_end).unwrap_or_default(),
            "reconnected": {
                "server": server,
                "cause": cause,
                "gap_ms": gap.as_millis() as u64,
            },
        })
        .to_string(),
    }
}

/// `redisctl --cluster watch`: Watch on every node's daemon at once, merged into one output in
/// arrival order; compact lines get a NODE column, JSON lines carry `node` as always. A daemon
/// that cannot be reached or whose stream breaks is named on stderr and the rest go on; the
/// exit status is non-zero only when every node failed.
pub async fn run_cluster(
    server: &ServerArgs,
    cluster: &ClusterArgs,
    args: WatchArgs,
) -> anyhow::Result<()> {
    let found = discover(cluster).await?;
    for failure in &found.not_running {
        failure.report();
    }
    if found.daemons.is_empty() {
        return Err(none_answered("watch", found.nodes()));
    }
    let request = watch_request(&args);
    // The tasks stay owned here: returning drops them, which closes every stream.
    let (_tasks, mut deliveries) = watch_all(&found.daemons, server, &request);
    let colour = colour_enabled();
    let width = found.node_width();
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let (mut shown, mut failed) = (0u64, found.not_running.len());
    let stdout = std::io::stdout();
    loop {
        if args.count.is_some_and(|count| shown >= count) {
            return Ok(());
        }
        let next = deliveries.recv();
        let delivery = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, next).await {
                Ok(delivery) => delivery,
                Err(_) => return Ok(()),
            },
            None => next.await,
        };
        let Some(delivery) = delivery else {
            // Every stream is over.
            return if failed >= found.nodes() {
                Err(none_answered("watch", found.nodes()))
            } else {
                Ok(())
            };
        };
        let (index, mut message) = match delivery {
            Delivery::Message(index, message) => (index, message),
            Delivery::Failed(index, error) => {
                if let Some(daemon) = found.daemons.get(index) {
                    Failure::of(daemon, &error).report();
                }
                failed += 1;
                continue;
            }
            Delivery::Reconnected(index, cause, gap) => {
                let Some(daemon) = found.daemons.get(index) else {
                    continue;
                };
                let node = format!("{:<width$}", daemon.node);
                let line = reconnected(
                    &daemon.address,
                    Some(&node),
                    &cause,
                    gap,
                    args.output,
                    colour,
                );
                let mut out = stdout.lock();
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return Ok(());
                }
                continue;
            }
            Delivery::Ended(index) => {
                if let Some(daemon) = found.daemons.get(index) {
                    eprintln!(
                        "redisctl: node {} ({}): the daemon ended the stream",
                        daemon.node, daemon.address
                    );
                }
                continue;
            }
        };
        // Not through `Daemon::node_name`: that would copy the name of every message.
        if message.node.is_empty()
            && let Some(daemon) = found.daemons.get(index)
        {
            message.node.clone_from(&daemon.node);
        }
        let node = format!("{:<width$}", message.node);
        let Some((line, is_event)) = render(&message, args.output, colour, Some(&node)) else {
            continue;
        };
        shown += u64::from(is_event);
        let mut out = stdout.lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
}

/// `time  who  role  command  key  latency  reply-or-error`, with a NODE column after the time
/// when `node` is given (`--cluster`).
pub fn compact(node: Option<&str>, event: &v1::CommandEvent, colour: bool) -> String {
    let who = who(&event.namespace, &event.pod, &event.comm, event.pid);
    let key = if event.key.is_empty() {
        "-".into()
    } else {
        visible(&event.key)
    };
    let outcome = if event.error_prefix.is_empty() {
        visible(&event.reply).into_owned()
    } else {
        let text = if event.error_message.starts_with(&event.error_prefix) {
            visible(&event.error_message).into_owned()
        } else {
            format!(
                "{} {}",
                visible(&event.error_prefix),
                visible(&event.error_message)
            )
        };
        paint(colour, "31", &text)
    };
    let latency = latency_ns(event.latency_ns);
    let latency = if event.latency_ns >= 10_000_000 {
        paint(colour, "33", &latency)
    } else {
        latency
    };
    let node = node.map(|n| format!("{n}  ")).unwrap_or_default();
    format!(
        "{}  {node}{who}  {}  {}  {key}  {latency}  {outcome}",
        paint(colour, "2", &clock(event.time.as_ref())),
        role(event.role),
        paint(colour, "1", &visible(&event.command)),
    )
}

pub fn event_json(message: &v1::WatchResponse, event: &v1::CommandEvent) -> serde_json::Value {
    json!({
        "time": rfc3339(event.time.as_ref()),
        "node": message.node,
        "sequence": message.sequence,
        "role": role(event.role),
        "namespace": event.namespace,
        "pod": event.pod,
        "container": event.container,
        "workload": event.workload,
        "workload_kind": event.workload_kind,
        "pid": event.pid,
        "comm": event.comm,
        "command": event.command,
        "key": event.key,
        "argc": event.argc,
        "latency_usec": event.latency_ns as f64 / 1000.0,
        "reply": event.reply,
        "outcome": event.outcome,
        "error_prefix": event.error_prefix,
        "error": event.error_message,
        "request_bytes": event.request_bytes,
        "reply_bytes": event.reply_bytes,
        "local_addr": event.local_addr,
        "peer_addr": event.peer_addr,
        "peer_pod": event.peer_pod,
        "peer_service": event.peer_service,
        "connection": event.connection,
        "in_transaction": event.in_transaction,
    })
}
