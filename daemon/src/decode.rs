//! Decode stage: one correlator per connection turns its two byte streams into command events.
//! The protocol logic itself lives in the pure `respwatch-resp` crate.
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

use respwatch_common::Direction;
use respwatch_resp::correlate::{self, Correlator, Output};

use crate::{
    event::{CommandEvent, EventError, KeyPolicy, reply_name},
    streams::{ConnId, ConnMeta, StreamEvent},
};

/// What the decode stage saw that did not become an event, for status and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeCounters {
    pub desyncs: u64,
    pub desync_bytes: u64,
    pub pushes: u64,
    pub unanswered: u64,
    pub unmatched_replies: u64,
}

pub struct DecodeStage {
    correlators: HashMap<ConnId, (Arc<ConnMeta>, Correlator)>,
    /// A field of its own so that a connection's `Arc` can be lent from `correlators` while
    /// events are built, not cloned per chunk (that clone and drop were 7% of the daemon).
    sink: Sink,
}

impl DecodeStage {
    pub fn new(keys: KeyPolicy, realtime_offset_ns: i128) -> Self {
        Self {
            correlators: HashMap::new(),
            sink: Sink {
                keys,
                realtime_offset_ns,
                outputs: Vec::new(),
                counters: DecodeCounters::default(),
            },
        }
    }

    pub fn counters(&self) -> &DecodeCounters {
        &self.sink.counters
    }

    pub fn accept(&mut self, event: &StreamEvent, out: &mut Vec<Arc<CommandEvent>>) {
        match event {
            StreamEvent::Data(chunk) => {
                let (meta, correlator) = self
                    .correlators
                    .entry(chunk.conn.id)
                    .or_insert_with(|| (Arc::clone(&chunk.conn), Correlator::new()));
                let dir = match chunk.direction {
                    Direction::Ingress => correlate::Direction::Ingress,
                    Direction::Egress => correlate::Direction::Egress,
                };
                if chunk.gap_before > 0 {
                    correlator.lose(dir, chunk.ts_ns, chunk.gap_before, &mut self.sink.outputs);
                }
                correlator.feed(
                    dir,
                    chunk.ts_ns,
                    &chunk.bytes,
                    chunk.uncopied,
                    &mut self.sink.outputs,
                );
                self.sink.emit(meta, out);
            }
            StreamEvent::Closed { conn, ts_ns, .. } => {
                if let Some((meta, mut correlator)) = self.correlators.remove(&conn.id) {
                    correlator.close(*ts_ns, &mut self.sink.outputs);
                    self.sink.emit(&meta, out);
                }
            }
        }
    }
}

/// Where a connection's correlator outputs go: events, or counters for what is not one.
struct Sink {
    keys: KeyPolicy,
    /// Added to monotonic kernel timestamps to get wall-clock time.
    realtime_offset_ns: i128,
    outputs: Vec<Output>,
    counters: DecodeCounters,
}

impl Sink {
    /// Events are shared from here on (aggregator, history, subscribers): built in their `Arc`
    /// at once, they are not moved again.
    fn emit(&mut self, meta: &Arc<ConnMeta>, out: &mut Vec<Arc<CommandEvent>>) {
        for output in self.outputs.drain(..) {
            match output {
                Output::Exchange(exchange) => {
                    let time = exchange.reply_ts_ns as i128 + self.realtime_offset_ns;
                    let counted = exchange.counted;
                    out.push(Arc::new(CommandEvent {
                        time_unix_ns: time.max(0) as u64,
                        role: exchange.role,
                        conn: Arc::clone(meta),
                        command: exchange.command,
                        key: exchange.first_key.and_then(|key| self.keys.apply(&key)),
                        argc: exchange.argc,
                        request_bytes: exchange.request_bytes,
                        reply_bytes: exchange.reply_bytes,
                        reply: reply_name(exchange.reply_kind),
                        error: exchange.error.map(|error| EventError {
                            prefix: error.prefix,
                            message: String::from_utf8_lossy(&error.message).into_owned(),
                        }),
                        outcome: exchange.outcome,
                        counted,
                        latency_ns: exchange.reply_ts_ns.saturating_sub(exchange.request_ts_ns),
                        pipeline_depth: exchange.pipeline_depth,
                        in_transaction: exchange.in_transaction,
                    }));
                }
                Output::Push(_) => self.counters.pushes += 1,
                Output::Desync { skipped_bytes, .. } => {
                    self.counters.desyncs += 1;
                    self.counters.desync_bytes += skipped_bytes;
                }
                Output::Unanswered(_) => self.counters.unanswered += 1,
                Output::UnmatchedReply { .. } | Output::RoleUnknown { .. } => {
                    self.counters.unmatched_replies += 1
                }
            }
        }
    }
}
