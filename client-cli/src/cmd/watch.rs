//! `redisctl watch`: live commands, one line (or JSON object) each.
use std::{io::Write, time::Duration};

use respwatch_proto::v1::{self, watch_response::Kind};
use serde_json::json;

use super::WatchOutput;
use crate::{
    client::{ServerArgs, connect, status_error},
    filters::{EventFilterArgs, FilterArgs, parse_duration},
    format::{clock, colour_enabled, latency_ns, paint, rfc3339, role, who},
};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  redisctl watch                                  every command on this node
  redisctl watch -n shop --pod web --errors-only  failing commands of shop/web-* pods
  redisctl watch --pid 4242 --command get         GETs of one process
  redisctl watch --role server --min-latency 5ms  slow commands, as Redis servers see them
  redisctl watch --last 100 -o json --count 100   the last 100 commands, as JSON lines")]
pub struct WatchArgs {
    #[command(flatten)]
    pub filters: FilterArgs,
    #[command(flatten)]
    pub events: EventFilterArgs,
    /// Start with up to N recent matching commands the daemon keeps in memory.
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
    let mut client = connect(server).await?;
    let mut filter = args.filters.to_proto();
    args.events.apply(&mut filter);
    let request = v1::WatchRequest {
        allow: vec![filter],
        deny: Vec::new(),
        last: args.last,
    };
    let mut stream = client
        .watch(request)
        .await
        .map_err(|s| status_error(&server.server, s))?
        .into_inner();
    let colour = colour_enabled();
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut shown = 0u64;
    let stdout = std::io::stdout();
    loop {
        if args.count.is_some_and(|count| shown >= count) {
            return Ok(());
        }
        let next = async { stream.message().await };
        let message = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, next).await {
                Ok(message) => message,
                Err(_) => return Ok(()),
            },
            None => next.await,
        };
        let Some(message) = message.map_err(|s| status_error(&server.server, s))? else {
            return Ok(());
        };
        let line = match (&message.kind, args.output) {
            (Some(Kind::Event(event)), WatchOutput::Compact) => {
                shown += 1;
                compact(event, colour)
            }
            (Some(Kind::Event(event)), WatchOutput::Json) => {
                shown += 1;
                event_json(&message, event).to_string()
            }
            (Some(Kind::LostEvents(lost)), WatchOutput::Compact) => {
                let source = v1::LossSource::try_from(lost.source).unwrap_or_default().short_name();
                paint(colour, "1;33", &format!("!! lost {} events ({source})", lost.count))
            }
            (Some(Kind::LostEvents(lost)), WatchOutput::Json) => json!({
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
            (None, _) => continue,
        };
        let mut out = stdout.lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // The reader went away (e.g. `| head`): done.
            return Ok(());
        }
    }
}

/// `time  who  role  command  key  latency  reply-or-error`.
pub fn compact(event: &v1::CommandEvent, colour: bool) -> String {
    let who = who(&event.namespace, &event.pod, &event.comm, event.pid);
    let key = if event.key.is_empty() {
        "-"
    } else {
        &event.key
    };
    let outcome = if event.error_prefix.is_empty() {
        event.reply.clone()
    } else {
        let text = if event.error_message.starts_with(&event.error_prefix) {
            event.error_message.clone()
        } else {
            format!("{} {}", event.error_prefix, event.error_message)
        };
        paint(colour, "31", &text)
    };
    let latency = latency_ns(event.latency_ns);
    let latency = if event.latency_ns >= 10_000_000 {
        paint(colour, "33", &latency)
    } else {
        latency
    };
    format!(
        "{}  {who}  {}  {}  {key}  {latency}  {outcome}",
        paint(colour, "2", &clock(event.time.as_ref())),
        role(event.role),
        paint(colour, "1", &event.command),
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
        "connection": event.connection,
        "in_transaction": event.in_transaction,
    })
}
