//! Request/reply correlation for one connection: one [`Correlator`] per connection, fed both
//! directions in capture order.
//!
//! Replies are paired with requests in FIFO order (Redis executes a connection's commands in
//! order), with the protocol states that break naive pairing handled explicitly: pipelining,
//! MULTI/EXEC/DISCARD (results of queued commands arrive inside EXEC's array), pub/sub
//! (N confirmations per SUBSCRIBE, pushed messages that answer nothing), RESP3 push frames and
//! attributes, `CLIENT REPLY OFF|SKIP` (commands without replies), MONITOR output, RESET.
//!
//! State that depends on the server's answer (whether MULTI started, whether HELLO 3 switched
//! protocol) is updated when the reply is paired, not when the request is seen, so pipelined
//! streams are handled in the order Redis executes them. State that suppresses replies
//! (`CLIENT REPLY`) must be known before the replies (that never come), so it is tracked at
//! request time.
//!
//! Loss is never silent: decoder desyncs are forwarded, requests that can no longer be paired
//! are reported as [`Unanswered`], replies without a request as [`Output::UnmatchedReply`].

use std::borrow::Cow;
use std::collections::VecDeque;

use crate::command::{self, ErrorClass};
use crate::decode::{Decoded, Decoder, DesyncReason, Frame, Kind, MAX_KEPT_ELEMENTS, Text};
use crate::error_text::ErrorTemplate;

/// Outstanding requests kept per connection; more are reported and the queue reset.
pub const MAX_OUTSTANDING: usize = 64 * 1024;
/// Room for decoded frames a connection keeps between chunks.
const KEPT_DECODED: usize = 64;
/// Room for outstanding requests a connection keeps once they are all answered.
const KEPT_QUEUE: usize = 256;
/// Room for queued commands a finished transaction's queue may keep for the next one.
const MAX_SPARE_QUEUED: usize = 64;
/// Frames held while the role of the connection is not yet known.
pub const MAX_UNDECIDED: usize = 64;

/// Direction of captured bytes, from the point of view of the traced process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Bytes this process read.
    Ingress,
    /// Bytes this process wrote.
    Egress,
}

/// Which end of the Redis conversation the traced process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Reads requests, writes replies.
    Server,
    /// Writes requests, reads replies.
    Client,
}

impl Role {
    fn request_dir(self) -> Direction {
        match self {
            Role::Server => Direction::Ingress,
            Role::Client => Direction::Egress,
        }
    }
}

/// Redis' view of how a command ended, as counted in `INFO commandstats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Ran without an error reply (`calls`).
    Ok,
    /// Refused before running (`rejected_calls`); with `counted == false` Redis found no
    /// command (unknown command/subcommand) and only errorstats changed.
    Rejected,
    /// Ran and replied an error (`calls` and `failed_calls`).
    Failed,
    /// Ran, but no reply was observed (`CLIENT REPLY OFF|SKIP`, or an EXEC result beyond the
    /// summarised elements): counted in `calls`, error status unknown.
    Unknown,
    /// Queued in a transaction that was discarded (DISCARD, EXECABORT, WATCH abort, RESET):
    /// never executed, not counted.
    Discarded,
}

/// Shape of the reply an exchange got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// One reply frame of this type.
    Frame(Kind),
    /// No reply by design (`CLIENT REPLY OFF|SKIP`) or a discarded queued command.
    NoReply,
    /// An element of EXEC's result array.
    TransactionElement(Kind),
    /// This many pub/sub confirmations.
    Confirmations(u64),
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// `INFO errorstats` name (`WRONGTYPE`, `ERR`...); borrowed when Redis itself uses it.
    pub prefix: Cow<'static, str>,
    /// Which of Redis' fixed messages the text is; the text itself is not kept, since Redis
    /// echoes its callers' bytes (arguments, script text) in errors.
    pub template: Option<ErrorTemplate>,
}

/// One command and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// Role of the traced process.
    pub role: Role,
    /// Stats name (`get`, `client|setname`).
    pub command: Cow<'static, str>,
    /// First key, raw and bounded; the daemon applies the privacy policy.
    pub first_key: Option<Text>,
    /// Argument count including the command name.
    pub argc: u32,
    /// Request bytes on the wire.
    pub request_bytes: u64,
    /// Reply bytes on the wire (0 for EXEC elements: they are inside EXEC's reply).
    pub reply_bytes: u64,
    /// Shape of the reply.
    pub reply_kind: ReplyKind,
    /// Error reply, if any.
    pub error: Option<ErrorReply>,
    /// How Redis counts it.
    pub outcome: Outcome,
    /// Whether Redis has a commandstats row for it (false for unknown commands/subcommands
    /// and discarded transaction commands).
    pub counted: bool,
    /// Server role: request fully read; client role: request fully written. For commands run
    /// by EXEC: EXEC's request.
    pub request_ts_ns: u64,
    /// Server role: reply fully written; client role: reply fully read.
    pub reply_ts_ns: u64,
    /// Requests outstanding when this one was sent, itself included (1 = not pipelined).
    pub pipeline_depth: u32,
    /// Queued inside MULTI (executed by EXEC, or refused at queue time).
    pub in_transaction: bool,
}

/// Kind of out-of-band data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushKind {
    /// Pub/sub `message`.
    Message,
    /// Pub/sub `pmessage`.
    PMessage,
    /// Sharded pub/sub `smessage`.
    SMessage,
    /// Client-side caching `invalidate`.
    Invalidate,
    /// A MONITOR line.
    Monitor,
    /// Anything else pushed (unsolicited unsubscribe, module pushes...).
    Other,
}

/// Data the server sent that answers no request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// Role of the traced process.
    pub role: Role,
    /// What was pushed.
    pub kind: PushKind,
    /// Channel (messages), bounded.
    pub channel: Option<Text>,
    /// Bytes on the wire.
    pub bytes: u64,
    /// When it was written (server) or read (client).
    pub ts_ns: u64,
}

/// Why a request got no paired reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnansweredReason {
    /// The connection closed first.
    Closed,
    /// A desync in either direction made pairing impossible.
    Desync,
    /// More than [`MAX_OUTSTANDING`] requests were outstanding (or queued in a transaction).
    QueueOverflow,
}

/// A request that will never be paired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unanswered {
    /// Role of the traced process.
    pub role: Role,
    /// Stats name.
    pub command: Cow<'static, str>,
    /// First key, raw and bounded.
    pub first_key: Option<Text>,
    /// Argument count.
    pub argc: u32,
    /// Request bytes.
    pub request_bytes: u64,
    /// When it was sent/read.
    pub request_ts_ns: u64,
    /// Queued inside MULTI when it was abandoned.
    pub in_transaction: bool,
    /// Why.
    pub reason: UnansweredReason,
}

/// Correlator output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A command and its outcome.
    Exchange(Exchange),
    /// Out-of-band data.
    Push(Push),
    /// The decoder of `dir` lost sync and skipped bytes.
    Desync {
        /// Direction that lost sync.
        dir: Direction,
        /// Why.
        reason: DesyncReason,
        /// Bytes skipped.
        skipped_bytes: u64,
    },
    /// A request that will never be paired.
    Unanswered(Unanswered),
    /// Requests and frames given up at once by [`Correlator::drop_pending`]: counted, not
    /// listed (there may be tens of thousands).
    Dropped {
        /// How many.
        requests: u64,
    },
    /// A reply with no request to pair it with (attached mid-stream, after a desync, or
    /// protocol garbage in the reply direction).
    UnmatchedReply {
        /// Direction it arrived on.
        dir: Direction,
        /// When.
        ts_ns: u64,
        /// Bytes on the wire.
        bytes: u64,
    },
    /// Replication traffic from a master to a replica after `PSYNC`: the snapshot, and the
    /// commands it propagates (`command` names them). Neither is a request of this connection:
    /// the master runs none of them, and a replica's own stats count them as replicated.
    Replication {
        /// Role of the traced process (server: the master; client: the replica).
        role: Role,
        /// The propagated command's stats name; `None` for the snapshot.
        command: Option<Cow<'static, str>>,
        /// Bytes on the wire.
        bytes: u64,
        /// When it was written (master) or read (replica).
        ts_ns: u64,
    },
    /// Frames dropped because the connection's role could not be determined in time.
    RoleUnknown {
        /// Direction they arrived on.
        dir: Direction,
        /// Bytes on the wire.
        bytes: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubKind {
    Subscribe,
    PSubscribe,
    SSubscribe,
    Unsubscribe,
    PUnsubscribe,
    SUnsubscribe,
}

impl SubKind {
    fn from_name(s: &[u8]) -> Option<Self> {
        let lower = s.to_ascii_lowercase();
        Some(match lower.as_slice() {
            b"subscribe" => SubKind::Subscribe,
            b"psubscribe" => SubKind::PSubscribe,
            b"ssubscribe" => SubKind::SSubscribe,
            b"unsubscribe" => SubKind::Unsubscribe,
            b"punsubscribe" => SubKind::PUnsubscribe,
            b"sunsubscribe" => SubKind::SUnsubscribe,
            _ => return None,
        })
    }

    fn is_unsubscribe(self) -> bool {
        matches!(
            self,
            SubKind::Unsubscribe | SubKind::PUnsubscribe | SubKind::SUnsubscribe
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Reply,
    NoReply,
    /// Pub/sub confirmations; `remaining: None` = one per current subscription (unknown).
    Confirm {
        kind: SubKind,
        remaining: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyMode {
    On,
    Off,
    SkipNext,
}

/// `HELLO`'s protocol version argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HelloVersion {
    Resp2,
    Resp3,
    Other,
}

#[derive(Debug, Clone)]
struct Request {
    command: Cow<'static, str>,
    first_key: Option<Text>,
    argc: u32,
    /// `HELLO`'s protocol version argument: RESP3 starts once the reply is not an error.
    hello_protover: Option<HelloVersion>,
    request_bytes: u64,
    request_ts: u64,
    pipeline_depth: u32,
    expect: Expect,
    confirmations: u64,
    reply_bytes: u64,
    last_reply_ts: u64,
}

/// Pairs requests and replies of one connection.
#[derive(Debug)]
pub struct Correlator {
    ingress: Decoder,
    egress: Decoder,
    role: Option<Role>,
    undecided: VecDeque<(Direction, u64, Frame)>,
    queue: VecDeque<Request>,
    /// Commands queued since MULTI was acknowledged; `None` outside a transaction.
    multi: Option<Vec<Request>>,
    /// The last transaction's emptied queue, reused by the next MULTI.
    spare_multi: Vec<Request>,
    /// Commands of the open transaction given up by [`Correlator::drop_pending`]: EXEC's
    /// results of the kept ones come after theirs.
    multi_dropped: usize,
    /// Replies still to come for requests given up by [`Correlator::drop_pending`]: skipped,
    /// so that later replies pair with their own requests (Redis answers in order).
    skip_replies: u64,
    reply_mode: ReplyMode,
    resp3: bool,
    subscribed: bool,
    monitor: bool,
    /// Pairing was lost: replies completed before the head request was sent are orphans.
    unsynced: bool,
    /// A replica's link to its master after `PSYNC` was accepted: the master's side carries the
    /// replication stream, and the replica's commands (`REPLCONF ACK`) get no reply.
    replication: bool,
    decoded: Vec<Decoded>,
}

impl Default for Correlator {
    fn default() -> Self {
        Self::new()
    }
}

fn is_error(frame: &Frame) -> bool {
    frame.kind.is_error()
}

fn error_of(text: &[u8]) -> ErrorReply {
    ErrorReply {
        prefix: command::error_prefix(text),
        template: ErrorTemplate::of(text),
    }
}

/// RESP2 pub/sub message arrays: `message` (3 elements), `pmessage` (4), `smessage` (3).
fn message_kind(frame: &Frame) -> Option<PushKind> {
    let first = frame.items.first()?.text.as_deref()?;
    let is = |name: &[u8]| first.eq_ignore_ascii_case(name);
    match frame.len {
        3 if is(b"message") => Some(PushKind::Message),
        4 if is(b"pmessage") => Some(PushKind::PMessage),
        3 if is(b"smessage") => Some(PushKind::SMessage),
        2 if is(b"invalidate") && frame.kind == Kind::Push => Some(PushKind::Invalidate),
        _ => None,
    }
}

/// `[kind, channel, count]` confirmations of (un)subscribe commands.
fn confirmation_kind(frame: &Frame) -> Option<SubKind> {
    if frame.len != 3 || frame.items.get(2).and_then(|i| i.integer).is_none() {
        return None;
    }
    SubKind::from_name(frame.items.first()?.text.as_deref()?)
}

/// MONITOR lines: `<secs>.<usecs> [<db> <addr>] "cmd" ...`.
fn looks_like_monitor(text: &[u8]) -> bool {
    let digits = text.iter().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && text.get(digits) == Some(&b'.') && text.windows(2).any(|w| w == b" [")
}

impl Correlator {
    /// A correlator for a new connection (role not yet known).
    pub fn new() -> Self {
        Correlator {
            ingress: Decoder::new(),
            egress: Decoder::new(),
            role: None,
            undecided: VecDeque::new(),
            queue: VecDeque::new(),
            multi: None,
            spare_multi: Vec::new(),
            multi_dropped: 0,
            skip_replies: 0,
            reply_mode: ReplyMode::On,
            resp3: false,
            subscribed: false,
            monitor: false,
            unsynced: false,
            replication: false,
            decoded: Vec::new(),
        }
    }

    /// A correlator for a new connection whose end is known (from its TCP handshake: the end
    /// that connected is the client). Its requests are paired from the first one on, however
    /// many a client pipelines before the first reply.
    pub fn with_role(role: Role) -> Self {
        Correlator {
            role: Some(role),
            ..Self::new()
        }
    }

    /// A correlator for a connection joined mid-stream: both decoders discard until a chunk
    /// starts with a plausible message, and replies are not paired until a request was seen.
    pub fn mid_stream() -> Self {
        Correlator {
            ingress: Decoder::mid_stream(),
            egress: Decoder::mid_stream(),
            unsynced: true,
            ..Self::new()
        }
    }

    /// The role, once determined from the traffic.
    pub fn role(&self) -> Option<Role> {
        self.role
    }

    /// Requests awaiting a reply.
    pub fn outstanding(&self) -> usize {
        self.queue.len()
    }

    /// Requests and frames held: awaiting a reply, queued in a transaction, or waiting for the
    /// connection's role to be known. What a connection costs, for a caller's memory budget.
    pub fn pending(&self) -> usize {
        self.queue.len() + self.multi.as_ref().map_or(0, Vec::len) + self.undecided.len()
    }

    /// Gives up what is pending (reported as one [`Output::Dropped`]) and lets go of the room
    /// it took; pairing resumes with the next request that gets a reply.
    pub fn drop_pending(&mut self, out: &mut Vec<Output>) {
        let requests = self.pending() as u64;
        // The transaction state the dropped requests leave behind (assuming their replies are
        // not errors): inside one, later QUEUED replies are still queued commands (not calls),
        // and EXEC's results pair by position after the dropped ones.
        let mut in_multi = self
            .multi
            .as_ref()
            .map(|queued| self.multi_dropped + queued.len());
        for req in &self.queue {
            match &*req.command {
                "multi" if in_multi.is_none() => in_multi = Some(0),
                "exec" | "discard" | "reset" => in_multi = None,
                _ => {
                    if let Some(queued) = in_multi.as_mut() {
                        *queued += 1;
                    }
                }
            }
        }
        self.undecided.clear();
        self.skip_replies += self
            .queue
            .iter()
            .filter(|req| req.expect == Expect::Reply)
            .count() as u64;
        self.queue.clear();
        self.multi = None;
        if let Some(dropped) = in_multi {
            self.multi = Some(std::mem::take(&mut self.spare_multi));
            self.multi_dropped = dropped;
        } else {
            self.multi_dropped = 0;
        }
        self.shrink();
        out.push(Output::Dropped { requests });
    }

    /// Room kept after a spike of outstanding requests is given back once they are answered.
    fn shrink(&mut self) {
        if self.queue.is_empty() && self.queue.capacity() > KEPT_QUEUE {
            self.queue = VecDeque::new();
        }
        if self.undecided.is_empty() && self.undecided.capacity() > MAX_UNDECIDED {
            self.undecided = VecDeque::new();
        }
    }

    /// Bytes of `dir` captured (`copied`) and not captured (`uncopied`) at `ts_ns`.
    pub fn feed(
        &mut self,
        dir: Direction,
        ts_ns: u64,
        copied: &[u8],
        uncopied: u64,
        out: &mut Vec<Output>,
    ) {
        self.feed_bytes(dir, ts_ns, out, |decoder, decoded| {
            decoder.feed(copied, uncopied, decoded)
        });
    }

    /// Like [`Correlator::feed`], for bytes that continue a chunk rather than start one (see
    /// [`Decoder::feed_continuation`]).
    pub fn feed_continuation(
        &mut self,
        dir: Direction,
        ts_ns: u64,
        copied: &[u8],
        uncopied: u64,
        out: &mut Vec<Output>,
    ) {
        self.feed_bytes(dir, ts_ns, out, |decoder, decoded| {
            decoder.feed_continuation(copied, uncopied, decoded)
        });
    }

    /// Runs `feed` on the decoder of `dir` into the reused frame buffer, then pairs its frames.
    fn feed_bytes(
        &mut self,
        dir: Direction,
        ts_ns: u64,
        out: &mut Vec<Output>,
        feed: impl FnOnce(&mut Decoder, &mut Vec<Decoded>),
    ) {
        let mut decoded = std::mem::take(&mut self.decoded);
        feed(self.decoder(dir), &mut decoded);
        self.handle(dir, ts_ns, &mut decoded, out);
        // A chunk of many small messages once does not keep its room on an idle connection.
        if decoded.capacity() <= KEPT_DECODED {
            self.decoded = decoded;
        }
    }

    /// `len` bytes of `dir` were lost before `ts_ns`.
    pub fn lose(&mut self, dir: Direction, ts_ns: u64, len: u64, out: &mut Vec<Output>) {
        self.feed_bytes(dir, ts_ns, out, |decoder, decoded| {
            decoder.lose(len, decoded)
        });
    }

    /// The connection closed: complete what can be completed, report the rest unanswered.
    /// (`_ts_ns` is when it closed; unanswered requests keep their own request time.)
    pub fn close(&mut self, _ts_ns: u64, out: &mut Vec<Output>) {
        for (dir, _, frame) in self.undecided.drain(..) {
            out.push(Output::RoleUnknown {
                dir,
                bytes: frame.wire_len,
            });
        }
        let Some(role) = self.role else { return };
        while let Some(req) = self.queue.pop_front() {
            match req.expect {
                Expect::NoReply => self.emit_no_reply(role, req, out),
                Expect::Confirm { .. } if req.confirmations > 0 => {
                    self.emit_confirmed(role, req, out)
                }
                _ => out.push(unanswered(role, req, false, UnansweredReason::Closed)),
            }
        }
        for req in self.multi.take().unwrap_or_default() {
            out.push(unanswered(role, req, true, UnansweredReason::Closed));
        }
    }

    fn decoder(&mut self, dir: Direction) -> &mut Decoder {
        match dir {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }

    fn handle(
        &mut self,
        dir: Direction,
        ts: u64,
        decoded: &mut Vec<Decoded>,
        out: &mut Vec<Output>,
    ) {
        if self.queue.is_empty() {
            self.shrink();
        }
        for d in decoded.drain(..) {
            match d {
                Decoded::Frame(frame) => self.on_frame(dir, ts, frame, out),
                Decoded::Desync(ds) => {
                    out.push(Output::Desync {
                        dir,
                        reason: ds.reason,
                        skipped_bytes: ds.skipped_bytes,
                    });
                    self.lost_pairing(UnansweredReason::Desync, out);
                }
            }
        }
    }

    fn lost_pairing(&mut self, reason: UnansweredReason, out: &mut Vec<Output>) {
        let Some(role) = self.role else { return };
        for req in self.queue.drain(..) {
            out.push(unanswered(role, req, false, reason));
        }
        for req in self.multi.take().unwrap_or_default() {
            out.push(unanswered(role, req, true, reason));
        }
        self.multi_dropped = 0;
        self.skip_replies = 0;
        self.unsynced = true;
    }

    fn on_frame(&mut self, dir: Direction, ts: u64, mut frame: Frame, out: &mut Vec<Output>) {
        let role = match self.role {
            Some(r) => r,
            None => {
                let requests_dir = if frame.kind == Kind::Inline {
                    (frame.len > 0).then_some(dir)
                } else if frame.is_command() {
                    // Both sides send arrays of bulk strings (LRANGE, CONFIG GET replies): the
                    // side that spoke first asked. A conversation starts with a request.
                    self.undecided
                        .front()
                        .map(|(first, _, _)| *first)
                        .filter(|first| *first != dir)
                } else {
                    Some(match dir {
                        Direction::Ingress => Direction::Egress,
                        Direction::Egress => Direction::Ingress,
                    })
                };
                match requests_dir {
                    Some(Direction::Ingress) => self.role = Some(Role::Server),
                    Some(Direction::Egress) => self.role = Some(Role::Client),
                    None => {
                        if self.undecided.len() >= MAX_UNDECIDED
                            && let Some((d, _, f)) = self.undecided.pop_front()
                        {
                            out.push(Output::RoleUnknown {
                                dir: d,
                                bytes: f.wire_len,
                            });
                        }
                        self.undecided.push_back((dir, ts, frame));
                        return;
                    }
                }
                let held: Vec<_> = self.undecided.drain(..).collect();
                for (d, t, f) in held {
                    self.on_frame(d, t, f, out);
                }
                self.on_frame(dir, ts, frame, out);
                return;
            }
        };
        if dir == role.request_dir() {
            self.on_request(role, ts, &mut frame, out);
        } else {
            self.on_reply(role, dir, ts, &frame, out);
        }
        crate::decode::recycle_items(frame.items);
    }

    fn on_request(&mut self, role: Role, ts: u64, frame: &mut Frame, out: &mut Vec<Output>) {
        // Redis ignores empty inline lines and never answers non-command frames with a
        // paired reply (it closes the connection with a protocol error).
        if !frame.is_command() {
            return;
        }
        // Only the first elements keep their text; every key position the command table
        // knows lies among them. On the stack: this runs for every command on the node.
        let mut kept: [&[u8]; MAX_KEPT_ELEMENTS] = [&[]; MAX_KEPT_ELEMENTS];
        for (arg, item) in kept.iter_mut().zip(&frame.items) {
            *arg = item.text.as_deref().unwrap_or_default();
        }
        let args = &kept[..frame.items.len().min(MAX_KEPT_ELEMENTS)];
        let command::Identified {
            name: command,
            spec,
            ..
        } = command::identify(args, frame.len);
        let key_index = spec.and_then(|spec| command::first_key_index(spec, args));
        let argc = u32::try_from(frame.len).unwrap_or(u32::MAX);
        let hello_protover =
            args.get(1)
                .filter(|_| command == "hello")
                .map(|version| match *version {
                    b"2" => HelloVersion::Resp2,
                    b"3" => HelloVersion::Resp3,
                    _ => HelloVersion::Other,
                });
        // The subscribe family has no subcommands: its stats name is its name.
        let mut expect = match &*command {
            "subscribe" | "psubscribe" | "ssubscribe" if argc >= 2 => Expect::Confirm {
                kind: SubKind::from_name(args[0]).unwrap_or(SubKind::Subscribe),
                remaining: Some(u64::from(argc - 1)),
            },
            "unsubscribe" | "punsubscribe" | "sunsubscribe" => Expect::Confirm {
                kind: SubKind::from_name(args[0]).unwrap_or(SubKind::Unsubscribe),
                remaining: (argc >= 2).then(|| u64::from(argc - 1)),
            },
            _ => Expect::Reply,
        };
        if self.replication {
            expect = Expect::NoReply;
        }
        match self.reply_mode {
            ReplyMode::On => {}
            ReplyMode::Off => expect = Expect::NoReply,
            ReplyMode::SkipNext => {
                expect = Expect::NoReply;
                self.reply_mode = ReplyMode::On;
            }
        }
        if command == "client|reply" && argc == 3 {
            match args.get(2).map(|a| a.to_ascii_lowercase()).as_deref() {
                Some(b"on") => {
                    self.reply_mode = ReplyMode::On;
                    expect = Expect::Reply;
                }
                Some(b"off") => {
                    self.reply_mode = ReplyMode::Off;
                    expect = Expect::NoReply;
                }
                Some(b"skip") => {
                    if self.reply_mode == ReplyMode::On {
                        self.reply_mode = ReplyMode::SkipNext;
                    }
                    expect = Expect::NoReply;
                }
                _ => {}
            }
        } else if command == "reset" {
            // RESET turns replies back on and always answers.
            self.reply_mode = ReplyMode::On;
            expect = Expect::Reply;
        }
        if self.queue.len() >= MAX_OUTSTANDING {
            self.lost_pairing(UnansweredReason::QueueOverflow, out);
        }
        let pipeline_depth = u32::try_from(self.queue.len() + 1).unwrap_or(u32::MAX);
        // The frame is done with: its key text moves into the request, uncopied.
        let first_key = key_index
            .and_then(|index| frame.items.get_mut(index))
            .and_then(|item| item.text.take());
        self.queue.push_back(Request {
            command,
            first_key,
            argc,
            hello_protover,
            request_bytes: frame.wire_len,
            request_ts: ts,
            pipeline_depth,
            expect,
            confirmations: 0,
            reply_bytes: 0,
            last_reply_ts: ts,
        });
        self.flush_no_reply(role, out);
    }

    /// Requests at the head that get no reply are complete as soon as they are reached.
    fn flush_no_reply(&mut self, role: Role, out: &mut Vec<Output>) {
        while self
            .queue
            .front()
            .is_some_and(|r| r.expect == Expect::NoReply)
        {
            if let Some(req) = self.queue.pop_front() {
                self.emit_no_reply(role, req, out);
            }
        }
    }

    fn emit_no_reply(&mut self, role: Role, req: Request, out: &mut Vec<Output>) {
        let ts = req.request_ts;
        out.push(Output::Exchange(exchange(
            role,
            req,
            ReplyKind::NoReply,
            None,
            Outcome::Unknown,
            true,
            (0, ts),
            false,
        )));
    }

    fn emit_confirmed(&mut self, role: Role, req: Request, out: &mut Vec<Output>) {
        let kind = ReplyKind::Confirmations(req.confirmations);
        let (bytes, ts) = (req.reply_bytes, req.last_reply_ts);
        out.push(Output::Exchange(exchange(
            role,
            req,
            kind,
            None,
            Outcome::Ok,
            true,
            (bytes, ts),
            false,
        )));
    }

    /// A frame of the replication stream: the snapshot, a propagated command, or the keepalive
    /// newlines (decoded as empty inline lines, which are no frames).
    fn replicated(&self, role: Role, ts: u64, frame: &Frame, out: &mut Vec<Output>) {
        let command = frame.is_command().then(|| {
            let mut kept: [&[u8]; MAX_KEPT_ELEMENTS] = [&[]; MAX_KEPT_ELEMENTS];
            for (arg, item) in kept.iter_mut().zip(&frame.items) {
                *arg = item.text.as_deref().unwrap_or_default();
            }
            let args = &kept[..frame.items.len().min(MAX_KEPT_ELEMENTS)];
            command::identify(args, frame.len).name
        });
        out.push(Output::Replication {
            role,
            command,
            bytes: frame.wire_len,
            ts_ns: ts,
        });
    }

    fn push(&self, role: Role, kind: PushKind, frame: &Frame, ts: u64, out: &mut Vec<Output>) {
        let channel = match kind {
            PushKind::Message | PushKind::SMessage => frame.arg(1).map(Text::from_slice),
            PushKind::PMessage => frame.arg(2).map(Text::from_slice),
            _ => None,
        };
        out.push(Output::Push(Push {
            role,
            kind,
            channel,
            bytes: frame.wire_len,
            ts_ns: ts,
        }));
    }

    fn on_reply(
        &mut self,
        role: Role,
        dir: Direction,
        ts: u64,
        frame: &Frame,
        out: &mut Vec<Output>,
    ) {
        if frame.kind == Kind::Inline {
            out.push(Output::UnmatchedReply {
                dir,
                ts_ns: ts,
                bytes: frame.wire_len,
            });
            return;
        }
        self.flush_no_reply(role, out);
        if self.replication {
            self.replicated(role, ts, frame, out);
            return;
        }
        let confirmation = if frame.kind == Kind::Push || (frame.kind == Kind::Array && !self.resp3)
        {
            confirmation_kind(frame)
        } else {
            None
        };
        // A head waiting for "one confirmation per subscription" ends at the first frame that
        // is not one of its confirmations.
        if let Some(head) = self.queue.front()
            && let Expect::Confirm { kind, .. } = head.expect
            && head.confirmations > 0
            && confirmation != Some(kind)
            && let Some(req) = self.queue.pop_front()
        {
            self.emit_confirmed(role, req, out);
            self.flush_no_reply(role, out);
        }
        if let Some(kind) = confirmation
            && let Some(head) = self.queue.front_mut()
            && head.expect_confirm_kind() == Some(kind)
            && self.multi.is_none()
        {
            let count = frame.items.get(2).and_then(|i| i.integer).unwrap_or(0);
            let null_channel = frame.items.get(1).is_some_and(|i| i.null);
            head.confirmations += 1;
            head.reply_bytes += frame.wire_len;
            head.last_reply_ts = ts;
            self.unsynced = false;
            self.subscribed = count > 0 || !kind.is_unsubscribe();
            let done = match &mut head.expect {
                Expect::Confirm {
                    remaining: Some(n), ..
                } => {
                    *n = n.saturating_sub(1);
                    *n == 0
                }
                _ => null_channel || count == 0,
            };
            if done && let Some(req) = self.queue.pop_front() {
                self.emit_confirmed(role, req, out);
                self.flush_no_reply(role, out);
            }
            return;
        }
        if frame.kind == Kind::Push {
            let kind = message_kind(frame).unwrap_or(PushKind::Other);
            self.push(role, kind, frame, ts, out);
            return;
        }
        if self.monitor
            && frame.kind == Kind::SimpleString
            && frame.text.as_deref().is_some_and(looks_like_monitor)
        {
            self.push(role, PushKind::Monitor, frame, ts, out);
            return;
        }
        if frame.kind == Kind::Array && !self.resp3 && (self.subscribed || self.queue.is_empty()) {
            if let Some(kind) = message_kind(frame) {
                self.push(role, kind, frame, ts, out);
                return;
            }
            if confirmation.is_some() {
                self.push(role, PushKind::Other, frame, ts, out);
                return;
            }
        }
        if self.skip_replies > 0 {
            self.skip_replies -= 1;
            return;
        }
        let Some(head) = self.queue.front() else {
            out.push(Output::UnmatchedReply {
                dir,
                ts_ns: ts,
                bytes: frame.wire_len,
            });
            return;
        };
        if self.unsynced && ts < head.request_ts {
            out.push(Output::UnmatchedReply {
                dir,
                ts_ns: ts,
                bytes: frame.wire_len,
            });
            return;
        }
        self.unsynced = false;
        if let Some(req) = self.queue.pop_front() {
            self.complete(role, req, ts, frame, out);
        }
    }

    fn complete(
        &mut self,
        role: Role,
        req: Request,
        ts: u64,
        frame: &Frame,
        out: &mut Vec<Output>,
    ) {
        let name = &*req.command;
        let error = frame.error_text().map(error_of);
        if let Some(queued) = self.multi.as_mut()
            && !matches!(
                name,
                "exec" | "discard" | "multi" | "watch" | "quit" | "reset"
            )
        {
            if frame.kind == Kind::SimpleString && frame.text.as_deref() == Some(b"QUEUED") {
                if queued.len() >= MAX_OUTSTANDING {
                    // Bounded, whatever a client queues: EXEC's first results still pair with
                    // the kept commands, and this one is reported.
                    out.push(unanswered(role, req, true, UnansweredReason::QueueOverflow));
                } else {
                    queued.push(Request {
                        reply_bytes: frame.wire_len,
                        ..req
                    });
                }
                return;
            }
            let (outcome, counted) = outcome_of(&req, frame);
            out.push(Output::Exchange(exchange(
                role,
                req,
                ReplyKind::Frame(frame.kind),
                error,
                outcome,
                counted,
                (frame.wire_len, ts),
                true,
            )));
            return;
        }
        let ok = !is_error(frame);
        match name {
            "multi" if ok && self.multi.is_none() => {
                self.multi = Some(std::mem::take(&mut self.spare_multi))
            }
            "exec" => {
                if let Some(mut queued) = self.multi.take() {
                    let ran = frame.kind == Kind::Array && !frame.null;
                    let first = std::mem::take(&mut self.multi_dropped);
                    for (i, q) in queued.drain(..).enumerate() {
                        let ex = if ran {
                            exec_element(role, q, frame.items.get(first + i), &req, ts)
                        } else {
                            discarded(role, q, &req, ts)
                        };
                        out.push(Output::Exchange(ex));
                    }
                    self.recycle_multi(queued);
                }
            }
            "discard" if ok => self.discard_multi(role, &req, ts, out),
            "reset" if ok => {
                self.discard_multi(role, &req, ts, out);
                self.subscribed = false;
                self.monitor = false;
                self.resp3 = false;
            }
            "hello" if ok => match req.hello_protover {
                Some(HelloVersion::Resp3) => self.resp3 = true,
                Some(HelloVersion::Resp2) => self.resp3 = false,
                _ => {}
            },
            "monitor" if ok => self.monitor = true,
            // `+FULLRESYNC …` (a snapshot follows) or `+CONTINUE …`: the link now carries the
            // replication stream. SYNC's answer is the snapshot itself.
            "psync" | "sync"
                if frame.kind == Kind::Snapshot
                    || frame.text.as_deref().is_some_and(|text| {
                        text.starts_with(b"FULLRESYNC") || text.starts_with(b"CONTINUE")
                    }) =>
            {
                self.replication = true
            }
            _ => {}
        }
        let (outcome, counted) = outcome_of(&req, frame);
        out.push(Output::Exchange(exchange(
            role,
            req,
            ReplyKind::Frame(frame.kind),
            error,
            outcome,
            counted,
            (frame.wire_len, ts),
            false,
        )));
    }
}

impl Correlator {
    /// DISCARD or RESET: the queued commands never ran.
    fn discard_multi(&mut self, role: Role, by: &Request, ts: u64, out: &mut Vec<Output>) {
        self.multi_dropped = 0;
        if let Some(mut queued) = self.multi.take() {
            for q in queued.drain(..) {
                out.push(Output::Exchange(discarded(role, q, by, ts)));
            }
            self.recycle_multi(queued);
        }
    }

    /// Keeps an emptied transaction queue for the next MULTI, unless it grew large.
    fn recycle_multi(&mut self, queued: Vec<Request>) {
        if queued.capacity() <= MAX_SPARE_QUEUED {
            self.spare_multi = queued;
        }
    }
}

impl Request {
    fn expect_confirm_kind(&self) -> Option<SubKind> {
        match self.expect {
            Expect::Confirm { kind, .. } => Some(kind),
            _ => None,
        }
    }
}

fn outcome_of(req: &Request, frame: &Frame) -> (Outcome, bool) {
    match frame.error_text() {
        None => (Outcome::Ok, true),
        Some(text) => match command::classify_error(&req.command, u64::from(req.argc), text) {
            ErrorClass::NotCounted => (Outcome::Rejected, false),
            ErrorClass::Rejected => (Outcome::Rejected, true),
            ErrorClass::Failed => (Outcome::Failed, true),
        },
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one constructor for every way an exchange ends keeps the field mapping in one place"
)]
fn exchange(
    role: Role,
    req: Request,
    reply_kind: ReplyKind,
    error: Option<ErrorReply>,
    outcome: Outcome,
    counted: bool,
    (reply_bytes, reply_ts_ns): (u64, u64),
    in_transaction: bool,
) -> Exchange {
    Exchange {
        role,
        command: req.command,
        first_key: req.first_key,
        argc: req.argc,
        request_bytes: req.request_bytes,
        reply_bytes,
        reply_kind,
        error,
        outcome,
        counted,
        request_ts_ns: req.request_ts,
        reply_ts_ns,
        pipeline_depth: req.pipeline_depth,
        in_transaction,
    }
}

/// A command run by EXEC: its result is element `item` of EXEC's array. Errors there were
/// raised while it ran, so they are failed calls.
fn exec_element(
    role: Role,
    q: Request,
    item: Option<&crate::decode::Item>,
    exec: &Request,
    ts: u64,
) -> Exchange {
    let exec_ts = exec.request_ts;
    let (kind, error, outcome) = match item {
        None => (ReplyKind::NoReply, None, Outcome::Unknown),
        Some(it) if it.kind.is_error() => (
            ReplyKind::TransactionElement(it.kind),
            Some(error_of(it.text.as_deref().unwrap_or_default())),
            Outcome::Failed,
        ),
        Some(it) => (ReplyKind::TransactionElement(it.kind), None, Outcome::Ok),
    };
    Exchange {
        request_ts_ns: exec_ts,
        ..exchange(role, q, kind, error, outcome, true, (0, ts), true)
    }
}

fn discarded(role: Role, q: Request, by: &Request, ts: u64) -> Exchange {
    Exchange {
        request_ts_ns: by.request_ts,
        ..exchange(
            role,
            q,
            ReplyKind::NoReply,
            None,
            Outcome::Discarded,
            false,
            (0, ts),
            true,
        )
    }
}

fn unanswered(role: Role, req: Request, in_transaction: bool, reason: UnansweredReason) -> Output {
    Output::Unanswered(Unanswered {
        role,
        command: req.command,
        first_key: req.first_key,
        argc: req.argc,
        request_bytes: req.request_bytes,
        request_ts_ns: req.request_ts,
        in_transaction,
        reason,
    })
}

#[cfg(test)]
mod tests;
