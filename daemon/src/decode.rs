//! Decode stage: one correlator per connection turns its two byte streams into command events.
//! The protocol logic itself lives in the pure `respwatch-resp` crate.
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

use respwatch_common::Direction;
use respwatch_resp::{
    correlate::{self, Correlator, Output, Role, UnansweredReason},
    decode::DesyncReason,
};

use crate::{
    capture::Opener,
    enrich::Process,
    event::{CommandEvent, EventError, KeyPrivacy, reply_name, shown_prefix},
    streams::{ConnId, ConnMeta, StreamEvent},
};

/// Which connections' events are built for watchers (key text, shared with subscribers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    /// Nobody watches: a command costs no heap allocation between the ring and the stats.
    Off,
    /// Every connection's.
    All,
    /// Connections whose process a watcher may want, as [`DecodeStage::accept`]'s `wanted`
    /// says; asked once per connection while `generation` stays the same.
    Filtered { generation: u64 },
}

/// What the decode stage saw that did not become an event, for status and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeCounters {
    pub desyncs: u64,
    pub desync_bytes: u64,
    pub pushes: u64,
    pub unanswered: u64,
    pub unmatched_replies: u64,
    /// Connections dropped because their replies turned out not to be RESP.
    pub not_resp: u64,
    /// Bytes of connections joined mid-stream skipped before their first message start.
    pub mid_stream_skipped_bytes: u64,
    /// Commands of replication streams (master to replica), and their bytes with snapshots.
    pub replicated_commands: u64,
    pub replicated_bytes: u64,
    /// Requests given up unpaired to bound memory: past a connection's limit of outstanding
    /// (or transaction-queued) requests, and when all connections' together passed
    /// [`MAX_PENDING`].
    pub overflowed: u64,
    pub over_budget: u64,
}

/// Room for correlator outputs kept between chunks.
const KEPT_OUTPUTS: usize = 4096;

/// Requests and frames all connections may hold pending at once (a few hundred bytes each):
/// past it, the connection that grew gives its pending requests up, counted as lost.
pub const MAX_PENDING: usize = 64 * 1024;

/// Desynchronisations after which a connection joined mid-stream that has not produced one
/// command is judged not to be RESP: chance bytes of another protocol looked like a message.
const MID_STREAM_DESYNCS: u32 = 4;

pub struct DecodeStage {
    correlators: HashMap<ConnId, Decoding>,
    /// What all correlators hold pending ([`Correlator::pending`]), against [`MAX_PENDING`].
    pending: usize,
    /// Connections judged not to be RESP since the caller last took them.
    not_resp: Vec<ConnId>,
    /// A field of its own so that a connection's `Arc` can be lent from `correlators` while
    /// events are built, not cloned per chunk (that clone and drop were 7% of the daemon).
    sink: Sink,
    detail: Detail,
}

impl DecodeStage {
    pub fn new(keys: KeyPrivacy, realtime_offset_ns: i128) -> Self {
        Self {
            correlators: HashMap::new(),
            pending: 0,
            not_resp: Vec::new(),
            detail: Detail::All,
            sink: Sink {
                detail: true,
                keys,
                realtime_offset_ns,
                outputs: Vec::new(),
                counters: DecodeCounters::default(),
                #[cfg(feature = "fault-injection")]
                panic_key: std::env::var_os("RESPWATCH_FAULT_PANIC_KEY")
                    .map(std::ffi::OsString::into_encoded_bytes),
            },
        }
    }

    /// Which connections' events get what only a watcher reads.
    pub fn set_detail(&mut self, detail: Detail) {
        self.detail = detail;
    }

    /// Whether the events of `decoding` are built for watchers now.
    fn detailed(
        detail: Detail,
        decoding: &mut Decoding,
        wanted: &impl Fn(&Process) -> bool,
    ) -> bool {
        match detail {
            Detail::Off => false,
            Detail::All => true,
            Detail::Filtered { generation } => match decoding.wanted {
                Some((asked, wants)) if asked == generation => wants,
                _ => {
                    let wants = wanted(&decoding.meta.process);
                    decoding.wanted = Some((generation, wants));
                    wants
                }
            },
        }
    }

    pub fn counters(&self) -> &DecodeCounters {
        &self.sink.counters
    }

    /// Connections joined mid-stream that turned out not to be RESP: their state is gone here,
    /// and the capture should stop sending them.
    pub fn take_not_resp(&mut self, out: &mut Vec<ConnId>) {
        out.append(&mut self.not_resp);
    }

    /// Decodes one stream event into `out`. `wanted` is asked (see [`Detail::Filtered`])
    /// whether a watcher may want a connection's events.
    pub fn accept(
        &mut self,
        event: &StreamEvent,
        out: &mut Vec<CommandEvent>,
        wanted: &impl Fn(&Process) -> bool,
    ) {
        match event {
            StreamEvent::Data(chunk) => {
                let decoding = self.correlators.entry(chunk.conn.id).or_insert_with(|| {
                    let correlator = match (chunk.conn.mid_stream, chunk.conn.opener) {
                        (true, _) => Correlator::mid_stream(),
                        (false, Some(Opener::Active)) => Correlator::with_role(Role::Client),
                        (false, Some(Opener::Passive)) => Correlator::with_role(Role::Server),
                        (false, None) => Correlator::new(),
                    };
                    Decoding {
                        meta: Arc::clone(&chunk.conn),
                        correlator,
                        doubtful_desyncs: 0,
                        exchanges: 0,
                        wanted: None,
                    }
                });
                self.sink.detail = Self::detailed(self.detail, decoding, wanted);
                let correlator = &mut decoding.correlator;
                let pending_before = correlator.pending();
                let dir = match chunk.direction {
                    Direction::Ingress => correlate::Direction::Ingress,
                    Direction::Egress => correlate::Direction::Egress,
                };
                if chunk.gap_before > 0 {
                    correlator.lose(dir, chunk.ts_ns, chunk.gap_before, &mut self.sink.outputs);
                }
                if chunk.boundary {
                    correlator.feed(
                        dir,
                        chunk.ts_ns,
                        &chunk.bytes,
                        chunk.uncopied,
                        &mut self.sink.outputs,
                    );
                } else {
                    correlator.feed_continuation(
                        dir,
                        chunk.ts_ns,
                        &chunk.bytes,
                        chunk.uncopied,
                        &mut self.sink.outputs,
                    );
                }
                let pending = correlator.pending();
                self.pending = self.pending - pending_before + pending;
                if self.pending > MAX_PENDING && pending > 0 {
                    correlator.drop_pending(&mut self.sink.outputs);
                    self.pending -= pending;
                }
                let (exchanges, desyncs) = self.sink.emit(&decoding.meta, out);
                decoding.exchanges += exchanges;
                if decoding.meta.mid_stream && decoding.exchanges == 0 {
                    decoding.doubtful_desyncs += desyncs;
                    if decoding.doubtful_desyncs >= MID_STREAM_DESYNCS {
                        self.pending -= decoding.correlator.pending();
                        self.correlators.remove(&chunk.conn.id);
                        self.not_resp.push(chunk.conn.id);
                        self.sink.counters.not_resp += 1;
                    }
                }
            }
            StreamEvent::Closed {
                conn,
                ts_ns,
                not_resp,
                ..
            } => {
                if let Some(mut decoding) = self.correlators.remove(&conn.id) {
                    self.pending -= decoding.correlator.pending();
                    if *not_resp {
                        // Not Redis after all: what it seemed to say is not reported.
                        self.sink.counters.not_resp += 1;
                        return;
                    }
                    decoding.correlator.close(*ts_ns, &mut self.sink.outputs);
                    self.sink.detail = Self::detailed(self.detail, &mut decoding, wanted);
                    self.sink.emit(&decoding.meta, out);
                }
            }
        }
    }
}

/// One connection being decoded.
struct Decoding {
    meta: Arc<ConnMeta>,
    correlator: Correlator,
    /// Desynchronisations while it has not yet produced an exchange (mid-stream joins only).
    doubtful_desyncs: u32,
    exchanges: u64,
    /// Whether a watcher may want its events, and the [`Detail::Filtered`] generation asked.
    wanted: Option<(u64, bool)>,
}

/// Where a connection's correlator outputs go: events, or counters for what is not one.
struct Sink {
    /// Whether the connection's events are built for watchers (see [`Detail`]).
    detail: bool,
    keys: KeyPrivacy,
    /// Added to monotonic kernel timestamps to get wall-clock time.
    realtime_offset_ns: i128,
    outputs: Vec<Output>,
    counters: DecodeCounters,
    /// Test builds only: a command with this first key panics the stage
    /// (`$RESPWATCH_FAULT_PANIC_KEY`), so tests can show what a crashed pipeline does.
    #[cfg(feature = "fault-injection")]
    panic_key: Option<Vec<u8>>,
}

impl Sink {
    /// Returns the exchanges and desyncs emitted.
    fn emit(&mut self, meta: &Arc<ConnMeta>, out: &mut Vec<CommandEvent>) -> (u64, u32) {
        let (mut exchanges, mut desyncs) = (0, 0);
        for output in self.outputs.drain(..) {
            match output {
                Output::Exchange(exchange) => {
                    #[cfg(feature = "fault-injection")]
                    if self.panic_key.is_some()
                        && self.panic_key.as_deref() == exchange.first_key.as_deref()
                    {
                        panic!("fault injection: the decode stage panics on its trigger key");
                    }
                    exchanges += 1;
                    let time = exchange.reply_ts_ns as i128 + self.realtime_offset_ns;
                    let counted = exchange.counted;
                    out.push(CommandEvent {
                        time_unix_ns: time.max(0) as u64,
                        role: exchange.role,
                        conn: Arc::clone(meta),
                        command: exchange.command,
                        key: exchange
                            .first_key
                            .filter(|_| self.detail)
                            .and_then(|key| self.keys.apply(&key)),
                        argc: exchange.argc,
                        request_bytes: exchange.request_bytes,
                        reply_bytes: exchange.reply_bytes,
                        reply: reply_name(exchange.reply_kind),
                        error: exchange.error.map(|error| EventError {
                            prefix: shown_prefix(error.prefix, self.keys.policy()),
                            template: error.template,
                        }),
                        outcome: exchange.outcome,
                        counted,
                        latency_ns: exchange.reply_ts_ns.saturating_sub(exchange.request_ts_ns),
                        pipeline_depth: exchange.pipeline_depth,
                        in_transaction: exchange.in_transaction,
                        detailed: self.detail,
                    });
                }
                Output::Push(_) => self.counters.pushes += 1,
                Output::Replication { command, bytes, .. } => {
                    self.counters.replicated_commands += u64::from(command.is_some());
                    self.counters.replicated_bytes += bytes;
                }
                Output::Desync {
                    reason: DesyncReason::JoiningMidStream,
                    skipped_bytes,
                    ..
                } => self.counters.mid_stream_skipped_bytes += skipped_bytes,
                Output::Desync { skipped_bytes, .. } => {
                    desyncs += 1;
                    self.counters.desyncs += 1;
                    self.counters.desync_bytes += skipped_bytes;
                }
                Output::Unanswered(unanswered) => {
                    self.counters.unanswered += 1;
                    if unanswered.reason == UnansweredReason::QueueOverflow {
                        self.counters.overflowed += 1;
                    }
                }
                Output::Dropped { requests } => {
                    self.counters.unanswered += requests;
                    self.counters.over_budget += requests;
                }
                Output::UnmatchedReply { .. } | Output::RoleUnknown { .. } => {
                    self.counters.unmatched_replies += 1
                }
            }
        }
        // A burst (a connection's dropped requests, a long pipeline) does not keep its room.
        if self.outputs.capacity() > KEPT_OUTPUTS {
            self.outputs = Vec::new();
        }
        (exchanges, desyncs)
    }
}
