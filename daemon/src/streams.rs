//! Streams stage: per connection (socket cookie) and direction, puts the kernel's data records
//! back into stream order by their offsets, the way TCP itself does.
//!
//! In-order bytes pass straight through. Retransmitted bytes already delivered are dropped, and
//! a retransmission that only partly overlaps is trimmed to its new bytes, so no byte is ever
//! delivered twice. Segments that arrive ahead of a hole wait in a bounded window; a hole that is
//! not filled in time (or when the window is full, or the connection closes) becomes an exact
//! loss of N bytes at a known offset, reported to the decoder (which resynchronises) and to the
//! loss counters. At close, bytes past the last delivered one up to the stream's end (which the
//! kernel reports) are lost too, so delivered + lost = what crossed the socket, exactly.
use std::{borrow::Cow, collections::BTreeMap, sync::Arc};

use foldhash::HashMap;
use respwatch_common::Direction;

use crate::{
    capture::{Close, Data, Open, Opener, Record},
    enrich::{Process, ProcessCache},
    sockets::{Owners, SocketAddrs},
};

/// A connection's identity: its socket cookie, unique for the kernel's uptime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// What is known about a connection, resolved once when it is first seen.
#[derive(Debug)]
pub struct ConnMeta {
    pub id: ConnId,
    pub process: Arc<Process>,
    /// `None` only for connections whose open record never arrived.
    pub socket: Option<SocketAddrs>,
    /// Which end it is, when its handshake was seen.
    pub opener: Option<Opener>,
    /// Joined mid-stream (open before the daemon): decoding starts at a message boundary.
    pub mid_stream: bool,
}

#[derive(Clone, Debug)]
pub enum StreamEvent<'a> {
    Data(StreamChunk<'a>),
    /// The connection ended; `lost_*` bytes at the end of its streams never arrived. With
    /// `not_resp`, it turned out not to be Redis at all.
    Closed {
        conn: Arc<ConnMeta>,
        ts_ns: u64,
        lost_ingress: u64,
        lost_egress: u64,
        not_resp: bool,
    },
}

impl StreamEvent<'_> {
    /// The event with its bytes copied out of the ring, to keep past the batch.
    pub fn into_owned(self) -> StreamEvent<'static> {
        match self {
            StreamEvent::Data(chunk) => StreamEvent::Data(chunk.into_owned()),
            StreamEvent::Closed {
                conn,
                ts_ns,
                lost_ingress,
                lost_egress,
                not_resp,
            } => StreamEvent::Closed {
                conn,
                ts_ns,
                lost_ingress,
                lost_egress,
                not_resp,
            },
        }
    }
}

/// Bytes of one direction of one connection, in order. In-order bytes are borrowed from the
/// ring; bytes that waited for a hole to fill were copied.
#[derive(Clone, Debug)]
pub struct StreamChunk<'a> {
    pub conn: Arc<ConnMeta>,
    pub direction: Direction,
    pub ts_ns: u64,
    /// The copied bytes; `uncopied` more bytes of the chunk follow them on the wire.
    pub bytes: Cow<'a, [u8]>,
    pub uncopied: u64,
    /// Bytes lost just before this chunk (a hole given up, or ring overflow).
    pub gap_before: u64,
    /// The chunk starts a packet: a message may start here (the decoder resynchronises only
    /// at such places).
    pub boundary: bool,
}

impl StreamChunk<'_> {
    pub fn total_len(&self) -> u64 {
        self.bytes.len() as u64 + self.uncopied
    }

    pub fn into_owned(self) -> StreamChunk<'static> {
        StreamChunk {
            bytes: Cow::Owned(self.bytes.into_owned()),
            ..self
        }
    }
}

/// Bytes of out-of-order segments held per connection direction before its first hole is given
/// up: TCP's own receive windows on loopback and LANs are of this order.
pub const MAX_HELD_PER_STREAM: u64 = 4 << 20;
/// Bytes of out-of-order segments held for all connections together.
pub const MAX_HELD: u64 = 64 << 20;
/// How long, in record time, a hole may wait for its retransmission: several of TCP's minimum
/// retransmission timeouts (200 ms), so one lost retransmission is still waited for.
pub const HOLE_TIMEOUT_NS: u64 = 3_000_000_000;

/// How long, in record time, a connection of an exited process must have been silent before
/// the sweep ends it (its close was lost).
const EXITED_GRACE_NS: u64 = 2_000_000_000;

#[derive(Clone, Debug)]
struct Segment<'a> {
    ts_ns: u64,
    bytes: Cow<'a, [u8]>,
    /// Stream bytes covered (copied or not).
    len: u64,
    boundary: bool,
}

/// One direction of a connection being reassembled.
#[derive(Default)]
struct Reassembly {
    /// Stream offset of the next byte to deliver.
    next: u64,
    /// Segments past a hole, by offset (copied out of the ring).
    held: BTreeMap<u64, Segment<'static>>,
    held_bytes: u64,
    /// Record time since which the first hole has been open.
    hole_since_ns: u64,
    /// Time of the last chunk handed on: bytes after it could not be read earlier.
    delivered_ns: u64,
}

/// Where delivered chunks and losses go.
struct Emit<'e, 'a> {
    conn: &'e Arc<ConnMeta>,
    direction: Direction,
    out: &'e mut Vec<StreamEvent<'a>>,
    stats: &'e mut StreamStats,
}

impl<'a> Emit<'_, 'a> {
    fn chunk(&mut self, segment: Segment<'a>, gap_before: u64) {
        let copied = segment.bytes.len() as u64;
        self.stats.lost_bytes += gap_before;
        self.out.push(StreamEvent::Data(StreamChunk {
            conn: Arc::clone(self.conn),
            direction: self.direction,
            ts_ns: segment.ts_ns,
            uncopied: segment.len - copied.min(segment.len),
            bytes: segment.bytes,
            gap_before,
            boundary: segment.boundary,
        }));
    }
}

impl Reassembly {
    /// Hands a segment on, no earlier than what it follows.
    fn deliver<'a>(&mut self, mut segment: Segment<'a>, gap_before: u64, emit: &mut Emit<'_, 'a>) {
        segment.ts_ns = segment.ts_ns.max(self.delivered_ns);
        self.delivered_ns = segment.ts_ns;
        emit.chunk(segment, gap_before);
    }

    /// The absolute offset of a 32-bit one: the nearest to `next` (TCP keeps a stream's bytes in
    /// flight within 2^31 of each other). Negative: before the stream's start.
    fn extend(&self, offset: u32) -> i128 {
        let delta = offset.wrapping_sub(self.next as u32) as i32;
        i128::from(self.next) + i128::from(delta)
    }

    fn accept<'a>(&mut self, data: Data<'a>, emit: &mut Emit<'_, 'a>, held_total: &mut u64) {
        let Ok(mut offset) = u64::try_from(self.extend(data.seq)) else {
            emit.stats.duplicate_bytes += u64::from(data.len);
            return;
        };
        let mut segment = Segment {
            ts_ns: data.ts_ns,
            bytes: Cow::Borrowed(data.bytes),
            len: u64::from(data.len),
            boundary: data.packet_start,
        };
        if offset + segment.len <= self.next {
            emit.stats.duplicate_bytes += segment.len;
            return;
        }
        if offset < self.next {
            let overlap = self.next - offset;
            emit.stats.duplicate_bytes += overlap;
            trim_front(&mut segment, overlap);
            offset = self.next;
        }
        if offset == self.next {
            self.next += segment.len;
            let ts_ns = segment.ts_ns;
            self.deliver(segment, 0, emit);
            self.deliver_contiguous(ts_ns, emit, held_total);
            return;
        }
        if self.held.is_empty() {
            self.hole_since_ns = segment.ts_ns;
        }
        let copied = segment.bytes.len() as u64;
        match self.held.get(&offset) {
            Some(held) if held.len >= segment.len => {
                emit.stats.duplicate_bytes += segment.len;
                return;
            }
            Some(held) => {
                let replaced = held.bytes.len() as u64;
                self.held_bytes -= replaced;
                *held_total -= replaced;
            }
            None => {}
        }
        self.held.insert(
            offset,
            Segment {
                bytes: Cow::Owned(segment.bytes.into_owned()),
                ..segment
            },
        );
        self.held_bytes += copied;
        *held_total += copied;
        if self.held_bytes > MAX_HELD_PER_STREAM || *held_total > MAX_HELD {
            self.give_up_hole(emit, held_total);
        }
    }

    /// Delivers held segments that the stream has reached. `fill_ts_ns`: when the bytes before
    /// them arrived; they could not be read before that.
    fn deliver_contiguous(
        &mut self,
        fill_ts_ns: u64,
        emit: &mut Emit<'_, '_>,
        held_total: &mut u64,
    ) {
        while let Some(entry) = self.held.first_entry() {
            let offset = *entry.key();
            if offset > self.next {
                break;
            }
            let mut segment = entry.remove();
            let copied = segment.bytes.len() as u64;
            self.held_bytes -= copied;
            *held_total -= copied;
            let end = offset + segment.len;
            if end <= self.next {
                emit.stats.duplicate_bytes += segment.len;
                continue;
            }
            let overlap = self.next - offset;
            emit.stats.duplicate_bytes += overlap;
            trim_front(&mut segment, overlap);
            segment.ts_ns = segment.ts_ns.max(fill_ts_ns);
            self.next = end;
            self.deliver(segment, 0, emit);
        }
        if !self.held.is_empty() {
            self.hole_since_ns = self.hole_since_ns.max(fill_ts_ns);
        }
    }

    /// The first hole is lost for good: its bytes are reported, and what follows it delivered.
    fn give_up_hole(&mut self, emit: &mut Emit<'_, '_>, held_total: &mut u64) {
        let Some(entry) = self.held.first_entry() else {
            return;
        };
        let offset = *entry.key();
        let segment = entry.remove();
        let copied = segment.bytes.len() as u64;
        self.held_bytes -= copied;
        *held_total -= copied;
        let gap = offset - self.next;
        emit.stats.holes += 1;
        self.next = offset + segment.len;
        let ts_ns = segment.ts_ns;
        self.deliver(segment, gap, emit);
        self.deliver_contiguous(ts_ns, emit, held_total);
    }

    /// Gives up a hole that has waited longer than [`HOLE_TIMEOUT_NS`] by `now_ns`.
    fn expire(&mut self, now_ns: u64, emit: &mut Emit<'_, '_>, held_total: &mut u64) {
        while !self.held.is_empty() && now_ns.saturating_sub(self.hole_since_ns) > HOLE_TIMEOUT_NS {
            self.give_up_hole(emit, held_total);
        }
    }

    /// The stream ended at `end` (if known): every hole is lost, and so are bytes past the last
    /// delivered one. Returns those trailing lost bytes.
    fn finish(&mut self, end: Option<u32>, emit: &mut Emit<'_, '_>, held_total: &mut u64) -> u64 {
        while !self.held.is_empty() {
            self.give_up_hole(emit, held_total);
        }
        let Some(end) = end.and_then(|end| u64::try_from(self.extend(end)).ok()) else {
            return 0;
        };
        let lost = end.saturating_sub(self.next);
        emit.stats.lost_bytes += lost;
        lost
    }
}

/// The direction replies travel in, seen from a socket that connected or was accepted.
fn reply_direction(opener: Opener) -> Direction {
    match opener {
        Opener::Active => Direction::Ingress,
        Opener::Passive => Direction::Egress,
    }
}

fn trim_front(segment: &mut Segment<'_>, bytes: u64) {
    let copied = segment.bytes.len() as u64;
    let skip = bytes.min(copied) as usize;
    segment.bytes = match std::mem::take(&mut segment.bytes) {
        Cow::Borrowed(slice) => Cow::Borrowed(&slice[skip..]),
        Cow::Owned(mut vec) => {
            vec.drain(..skip);
            Cow::Owned(vec)
        }
    };
    segment.len -= bytes;
    segment.boundary = false;
}

struct Conn {
    meta: Arc<ConnMeta>,
    dirs: [Reassembly; 2],
    last_ts_ns: u64,
    /// Request bytes held until the first reply bytes show the connection is RESP (see
    /// [`MAX_UNCONFIRMED`]); `None` once it is.
    unconfirmed: Option<Unconfirmed>,
}

/// Chunks of a connection not yet confirmed as RESP, copied out of the ring.
#[derive(Default)]
struct Unconfirmed {
    chunks: Vec<StreamEvent<'static>>,
    bytes: u64,
}

/// Request bytes held per connection until its first reply: a text protocol whose requests
/// look like inline commands (`get k` to memcached, `hello …` to an echo server) is given away
/// by its reply, which the kernel checks, so nothing of it is ever decoded. A client that keeps
/// sending without a reply has its bytes handed on past this bound.
pub const MAX_UNCONFIRMED: u64 = 64 << 10;

/// What reassembly did, for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes retransmitted (or seen twice) that were dropped because they were delivered once.
    pub duplicate_bytes: u64,
    /// Holes given up.
    pub holes: u64,
    /// Bytes lost: holes given up and stream ends never delivered.
    pub lost_bytes: u64,
    /// Data for a connection whose open record never came (lost): attributed to no process.
    pub unopened: u64,
    /// Connections dropped unseen because their replies were not RESP.
    pub not_resp: u64,
}

pub struct Streams {
    conns: HashMap<u64, Conn>,
    processes: ProcessCache,
    owners: Owners,
    held_total: u64,
    stats: StreamStats,
    /// The newest record timestamp seen: how far the pipeline has read.
    frontier_ns: u64,
}

impl Streams {
    pub fn new(cgroup_root: std::path::PathBuf) -> Self {
        Self {
            conns: HashMap::default(),
            processes: ProcessCache::new(cgroup_root.clone()),
            owners: Owners::new(cgroup_root),
            held_total: 0,
            stats: StreamStats::default(),
            frontier_ns: 0,
        }
    }

    pub fn tracked(&self) -> usize {
        self.conns.len()
    }

    pub fn stats(&self) -> StreamStats {
        self.stats
    }

    /// Bytes held in out-of-order windows.
    pub fn held_bytes(&self) -> u64 {
        self.held_total
    }

    /// Turns one batch of records, oldest first, into stream events.
    pub fn accept_batch<'a>(
        &mut self,
        records: impl IntoIterator<Item = Record<'a>>,
        out: &mut Vec<StreamEvent<'a>>,
    ) {
        for record in records {
            self.frontier_ns = self.frontier_ns.max(record.ts_ns());
            match record {
                Record::Open(open) => self.open(open),
                Record::Data(data) => self.data(data, out),
                Record::Close(close) => self.close(close, out),
            }
        }
    }

    /// Ends connections whose close records waited in the kernel's overflow map.
    pub fn accept_closes(
        &mut self,
        closes: impl IntoIterator<Item = Close>,
        out: &mut Vec<StreamEvent<'_>>,
    ) {
        for close in closes {
            self.frontier_ns = self.frontier_ns.max(close.ts_ns);
            self.close(close, out);
        }
    }

    fn open(&mut self, open: Open) {
        let (pid, comm) = if open.tgid != 0 {
            (open.tgid, crate::capture::comm_str(&open.comm))
        } else {
            let cgroup_path = self.processes.cgroup_path(open.cgroup_id);
            self.owners
                .find(
                    open.cgroup_id,
                    cgroup_path.as_deref(),
                    open.local,
                    open.remote,
                    open.opener,
                )
                .unwrap_or((0, String::new()))
        };
        let meta = ConnMeta {
            id: ConnId(open.cookie),
            process: self.processes.get(pid, comm, open.cgroup_id),
            socket: Some(SocketAddrs {
                local: open.local,
                peer: open.remote,
            }),
            opener: open.opener,
            mid_stream: open.mid_stream,
        };
        // Connections whose start was seen get their reply checked by the kernel.
        let unconfirmed = open.opener.is_some().then(Unconfirmed::default);
        self.conns.insert(
            open.cookie,
            Conn {
                meta: Arc::new(meta),
                dirs: Default::default(),
                last_ts_ns: open.ts_ns,
                unconfirmed,
            },
        );
    }

    fn data<'a>(&mut self, data: Data<'a>, out: &mut Vec<StreamEvent<'a>>) {
        let conn = match self.conns.get_mut(&data.cookie) {
            Some(conn) => conn,
            None => {
                // Its open record was lost: the kernel sends none of a connection's data before
                // its open record is in a ring, so this cannot happen unless records arrive out
                // of order past the reorder window.
                self.stats.unopened += 1;
                return;
            }
        };
        conn.last_ts_ns = data.ts_ns;
        let direction = data.direction;
        let ts_ns = data.ts_ns;
        let reply = conn
            .meta
            .opener
            .is_some_and(|opener| reply_direction(opener) == direction);
        if reply && let Some(held) = conn.unconfirmed.take() {
            out.extend(held.chunks);
        }
        let start = out.len();
        let mut emit = Emit {
            conn: &conn.meta,
            direction,
            out,
            stats: &mut self.stats,
        };
        let stream = &mut conn.dirs[direction as usize];
        stream.accept(data, &mut emit, &mut self.held_total);
        stream.expire(ts_ns, &mut emit, &mut self.held_total);
        if let Some(held) = &mut conn.unconfirmed {
            for event in out.drain(start..) {
                if let StreamEvent::Data(chunk) = &event {
                    held.bytes += chunk.total_len() + chunk.gap_before;
                }
                held.chunks.push(event.into_owned());
            }
            if held.bytes > MAX_UNCONFIRMED
                && let Some(held) = conn.unconfirmed.take()
            {
                out.extend(held.chunks);
            }
        }
    }

    fn close(&mut self, close: Close, out: &mut Vec<StreamEvent<'_>>) {
        let Some(mut conn) = self.conns.remove(&close.cookie) else {
            return;
        };
        if close.not_resp && conn.unconfirmed.is_some() {
            // Nothing of it was handed on: it never existed for the later stages.
            self.stats.not_resp += 1;
            for stream in conn.dirs {
                self.held_total -= stream.held_bytes;
            }
            return;
        }
        if let Some(held) = conn.unconfirmed.take() {
            out.extend(held.chunks);
        }
        let mut lost = [0u64; 2];
        for direction in [Direction::Ingress, Direction::Egress] {
            let mut emit = Emit {
                conn: &conn.meta,
                direction,
                out,
                stats: &mut self.stats,
            };
            lost[direction as usize] = conn.dirs[direction as usize].finish(
                if close.not_resp {
                    None
                } else {
                    close.ends[direction as usize]
                },
                &mut emit,
                &mut self.held_total,
            );
        }
        out.push(StreamEvent::Closed {
            conn: conn.meta,
            ts_ns: close.ts_ns,
            lost_ingress: lost[Direction::Ingress as usize],
            lost_egress: lost[Direction::Egress as usize],
            not_resp: close.not_resp,
        });
    }

    /// Drops a connection the decoder found not to be RESP; the kernel stops sending it.
    pub fn forget(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.remove(&id.0) {
            for stream in conn.dirs {
                self.held_total -= stream.held_bytes;
            }
        }
    }

    /// Gives up holes that waited too long (by the newest record time), and ends connections of
    /// exited processes that have been silent (their close was lost, or never armed).
    pub fn sweep(&mut self, out: &mut Vec<StreamEvent<'_>>) {
        let frontier = self.frontier_ns;
        for conn in self.conns.values_mut() {
            let start = out.len();
            for direction in [Direction::Ingress, Direction::Egress] {
                let mut emit = Emit {
                    conn: &conn.meta,
                    direction,
                    out,
                    stats: &mut self.stats,
                };
                conn.dirs[direction as usize].expire(frontier, &mut emit, &mut self.held_total);
            }
            if let Some(held) = &mut conn.unconfirmed {
                held.chunks
                    .extend(out.drain(start..).map(StreamEvent::into_owned));
            }
        }
        let gone: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, conn)| {
                let pid = conn.meta.process.pid;
                pid != 0
                    && frontier.saturating_sub(conn.last_ts_ns) > EXITED_GRACE_NS
                    && !crate::enrich::process_alive(pid)
            })
            .map(|(cookie, _)| *cookie)
            .collect();
        for cookie in gone {
            self.close(
                Close {
                    cookie,
                    ts_ns: frontier,
                    ends: [None, None],
                    not_resp: false,
                },
                out,
            );
        }
        self.processes.retain_alive();
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    const COOKIE: u64 = 77;

    /// A connection whose handshake was not seen, so that its bytes are handed on at once.
    fn streams() -> Streams {
        streams_with(None)
    }

    fn streams_with(opener: Option<Opener>) -> Streams {
        let mut streams = Streams::new(std::env::temp_dir());
        streams.open(Open {
            cookie: COOKIE,
            ts_ns: 1,
            tgid: std::process::id(),
            comm: [0; 16],
            cgroup_id: 0,
            local: SocketAddr::from(([127, 0, 0, 1], 6379)),
            remote: SocketAddr::from(([127, 0, 0, 1], 40000)),
            opener,
            mid_stream: opener.is_none(),
        });
        streams
    }

    fn data(seq: u32, bytes: &'static [u8], ts_ns: u64) -> Record<'static> {
        data_in(Direction::Ingress, seq, bytes, ts_ns)
    }

    fn data_in(
        direction: Direction,
        seq: u32,
        bytes: &'static [u8],
        ts_ns: u64,
    ) -> Record<'static> {
        Record::Data(Data {
            cookie: COOKIE,
            ts_ns,
            direction,
            seq,
            len: bytes.len() as u32,
            bytes,
            packet_start: true,
        })
    }

    fn close(end: u32) -> Record<'static> {
        Record::Close(Close {
            cookie: COOKIE,
            ts_ns: 1_000,
            ends: [Some(end), Some(0)],
            not_resp: false,
        })
    }

    /// The delivered stream: bytes, with `[gap N]` for every loss, and the chunk times.
    fn delivered(events: &[StreamEvent]) -> (String, Vec<u64>) {
        let mut text = String::new();
        let mut times = Vec::new();
        for event in events {
            match event {
                StreamEvent::Data(chunk) => {
                    if chunk.gap_before > 0 {
                        text.push_str(&format!("[gap {}]", chunk.gap_before));
                    }
                    text.push_str(&String::from_utf8_lossy(&chunk.bytes));
                    if chunk.uncopied > 0 {
                        text.push_str(&format!("[uncopied {}]", chunk.uncopied));
                    }
                    times.push(chunk.ts_ns);
                }
                StreamEvent::Closed {
                    lost_ingress,
                    lost_egress,
                    ..
                } => text.push_str(&format!("[closed {lost_ingress}/{lost_egress}]")),
            }
        }
        (text, times)
    }

    fn run(records: Vec<Record<'static>>) -> (String, Vec<u64>, StreamStats) {
        let mut streams = streams();
        let mut events = Vec::new();
        streams.accept_batch(records, &mut events);
        let (text, times) = delivered(&events);
        (text, times, streams.stats())
    }

    #[test]
    fn in_order_bytes_pass_through() {
        let (text, _, stats) = run(vec![data(0, b"*1\r\n", 10), data(4, b"$4\r\nPING\r\n", 11)]);
        assert_eq!(text, "*1\r\n$4\r\nPING\r\n");
        assert_eq!(stats, StreamStats::default());
    }

    #[test]
    fn reordered_segments_wait_for_the_hole_and_take_its_time() {
        let (text, times, stats) = run(vec![
            data(0, b"aaaa", 10),
            data(8, b"cccc", 20),
            data(4, b"bbbb", 30),
        ]);
        assert_eq!(text, "aaaabbbbcccc");
        assert_eq!(
            times,
            [10, 30, 30],
            "held bytes could not be read before the hole filled"
        );
        assert_eq!(stats.lost_bytes, 0);
    }

    #[test]
    fn retransmissions_are_delivered_once_even_when_they_overlap_partly() {
        let (text, _, stats) = run(vec![
            data(0, b"aaaa", 10),
            data(0, b"aaaa", 11),     // whole duplicate
            data(2, b"aabb", 12),     // half old, half new
            data(8, b"cccc", 13),     // ahead of a hole
            data(8, b"cc", 14),       // shorter duplicate of a held segment
            data(4, b"bbbbcccc", 15), // fills the hole and overlaps what is held
        ]);
        assert_eq!(text, "aaaabbbbcccc");
        assert_eq!(stats.duplicate_bytes, 4 + 2 + 2 + 2 + 4);
        assert_eq!(stats.lost_bytes, 0);
    }

    #[test]
    fn offsets_wrap_around_2_pow_32() {
        let start = u32::MAX - 3;
        let mut streams = streams();
        let mut events = Vec::new();
        // Start the stream near the wrap (a connection joined at that offset).
        streams.conns.get_mut(&COOKIE).unwrap().dirs[0].next = u64::from(start);
        streams.accept_batch(
            vec![
                data(start, b"abcd", 1),
                data(0, b"efgh", 2),
                data(start.wrapping_add(2), b"cdef", 3),
            ],
            &mut events,
        );
        assert_eq!(delivered(&events).0, "abcdefgh");
        assert_eq!(streams.conns[&COOKIE].dirs[0].next, u64::from(start) + 8);
    }

    #[test]
    fn a_hole_never_filled_is_an_exact_loss_at_close_and_the_tail_too() {
        let (text, _, stats) = run(vec![data(0, b"aaaa", 10), data(8, b"cccc", 20), close(20)]);
        assert_eq!(text, "aaaa[gap 4]cccc[closed 8/0]");
        assert_eq!(stats.lost_bytes, 4 + 8);
        assert_eq!(stats.holes, 1);
    }

    #[test]
    fn a_hole_is_given_up_after_the_timeout_in_record_time() {
        let (text, _, _) = run(vec![
            data(0, b"aaaa", 10),
            data(8, b"cccc", 20),
            data(12, b"dddd", 20 + HOLE_TIMEOUT_NS + 1),
        ]);
        assert_eq!(text, "aaaa[gap 4]ccccdddd");
    }

    #[test]
    fn a_full_window_gives_up_its_first_hole() {
        static BIG: [u8; 1 << 20] = [b'x'; 1 << 20];
        let mut records = vec![data(0, b"aaaa", 1)];
        for i in 0..5u32 {
            records.push(Record::Data(Data {
                cookie: COOKIE,
                ts_ns: 2,
                direction: Direction::Ingress,
                seq: 100 + i * (1 << 20),
                len: 1 << 20,
                bytes: &BIG,
                packet_start: true,
            }));
        }
        let mut streams = streams();
        let mut events = Vec::new();
        streams.accept_batch(records, &mut events);
        let gaps: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Data(chunk) => Some(chunk.gap_before),
                _ => None,
            })
            .collect();
        assert_eq!(gaps, [0, 96, 0, 0, 0, 0]);
        assert!(streams.held_bytes() <= MAX_HELD_PER_STREAM);
    }

    #[test]
    fn trimmed_chunks_do_not_claim_a_packet_start() {
        let mut streams = streams();
        let mut events = Vec::new();
        streams.accept_batch(vec![data(0, b"aaaa", 1), data(2, b"aabb", 2)], &mut events);
        let boundaries: Vec<bool> = events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Data(chunk) => Some(chunk.boundary),
                _ => None,
            })
            .collect();
        assert_eq!(boundaries, [true, false]);
    }

    /// The kernel sends bytes that passed the socket ahead of a lost head: held until the head
    /// arrives, or withdrawn without a trace (and without counting a loss) when it is not RESP.
    #[test]
    fn bytes_sent_ahead_of_the_head_join_it_or_vanish_with_it() {
        let mut streams = streams_with(Some(Opener::Passive));
        let mut events = Vec::new();
        streams.accept_batch(vec![data(6, b"K\r\n", 1)], &mut events);
        assert!(events.is_empty());
        assert_eq!(streams.held_bytes(), 3);
        streams.accept_batch(
            vec![
                data(0, b"*1\r\n$1", 2),
                data_in(Direction::Egress, 0, b"+OK\r\n", 3),
            ],
            &mut events,
        );
        let (text, _) = delivered(&events);
        assert_eq!(text, "*1\r\n$1K\r\n+OK\r\n");
        assert_eq!(streams.held_bytes(), 0);

        let mut streams = streams_with(Some(Opener::Passive));
        let mut events = Vec::new();
        streams.accept_batch(vec![data(9, b"xyz", 1)], &mut events);
        streams.accept_batch(
            vec![Record::Close(Close {
                cookie: COOKIE,
                ts_ns: 2,
                ends: [Some(12), None],
                not_resp: true,
            })],
            &mut events,
        );
        assert!(events.is_empty(), "withdrawn: {events:?}");
        assert_eq!(streams.held_bytes(), 0, "held bytes are released");
        assert_eq!(streams.stats().lost_bytes, 0, "not a loss");
        assert_eq!(streams.stats().not_resp, 1);
    }

    #[test]
    fn requests_wait_for_the_first_reply_and_vanish_if_it_is_not_resp() {
        let mut streams = streams_with(Some(Opener::Passive));
        let mut events = Vec::new();
        streams.accept_batch(vec![data(0, b"get k\r\n", 1)], &mut events);
        assert!(events.is_empty(), "held until a reply shows it is RESP");
        streams.accept_batch(
            vec![Record::Close(Close {
                cookie: COOKIE,
                ts_ns: 2,
                ends: [None, None],
                not_resp: true,
            })],
            &mut events,
        );
        assert!(events.is_empty(), "a memcached connection leaves no trace");
        assert_eq!(streams.stats().not_resp, 1);
        assert_eq!(streams.tracked(), 0);

        let mut streams = streams_with(Some(Opener::Passive));
        streams.accept_batch(
            vec![
                data(0, b"PING\r\n", 1),
                data_in(Direction::Egress, 0, b"+PONG\r\n", 2),
            ],
            &mut events,
        );
        assert_eq!(delivered(&events).0, "PING\r\n+PONG\r\n");
    }

    #[test]
    fn a_client_that_never_gets_a_reply_is_handed_on_past_the_bound() {
        static BLOCK: [u8; 16 << 10] = [b'x'; 16 << 10];
        let mut streams = streams_with(Some(Opener::Passive));
        let mut events = Vec::new();
        for i in 0..5u32 {
            streams.accept_batch(
                vec![Record::Data(Data {
                    cookie: COOKIE,
                    ts_ns: 1,
                    direction: Direction::Ingress,
                    seq: i * (16 << 10),
                    len: 16 << 10,
                    bytes: &BLOCK,
                    packet_start: true,
                })],
                &mut events,
            );
        }
        assert_eq!(
            events.len(),
            5,
            "more than {MAX_UNCONFIRMED} bytes are not held"
        );
    }

    #[test]
    fn data_of_an_unknown_connection_is_counted_not_delivered() {
        let mut streams = Streams::new(std::env::temp_dir());
        let mut events = Vec::new();
        streams.accept_batch(vec![data(0, b"aaaa", 1)], &mut events);
        assert!(events.is_empty());
        assert_eq!(streams.stats().unopened, 1);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// A segment of the stream as a sender may (re)transmit it: any start and length, so
        /// retransmissions overlap earlier ones partly, wholly, or not at all.
        fn segments(len: usize) -> impl Strategy<Value = Vec<(usize, usize, u64)>> {
            prop::collection::vec((0..len, 1..64usize, 0..1_000u64), 1..120)
        }

        proptest! {
            /// Whatever the order, duplication and overlap of the segments, once every byte has
            /// arrived the delivered stream is the sent one, each byte exactly once; a stream
            /// that ends with bytes missing reports exactly those as lost.
            #[test]
            fn delivers_each_byte_once_in_order(
                stream in prop::collection::vec(any::<u8>(), 1..600),
                picks in segments(600),
                complete in any::<bool>(),
                start in any::<u32>(),
            ) {
                let stream: &'static [u8] = Box::leak(stream.into_boxed_slice());
                let mut records: Vec<Record<'static>> = picks
                    .iter()
                    .filter(|(at, _, _)| *at < stream.len())
                    .map(|(at, len, ts)| {
                        let end = (at + len).min(stream.len());
                        data(start.wrapping_add(*at as u32), &stream[*at..end], *ts)
                    })
                    .collect();
                // A final retransmission of everything, in segments, makes the stream whole.
                if complete {
                    for at in (0..stream.len()).step_by(50) {
                        let end = (at + 50).min(stream.len());
                        records.push(data(start.wrapping_add(at as u32), &stream[at..end], 2_000));
                    }
                }
                // The capture stage hands records on oldest first.
                records.sort_by_key(Record::ts_ns);
                let mut streams = streams();
                streams.conns.get_mut(&COOKIE).unwrap().dirs[0].next = u64::from(start);
                let mut events = Vec::new();
                streams.accept_batch(records, &mut events);
                streams.accept_batch(
                    vec![Record::Close(Close {
                        cookie: COOKIE,
                        ts_ns: 3_000,
                        ends: [Some(start.wrapping_add(stream.len() as u32)), None],
                        not_resp: false,
                    })],
                    &mut events,
                );
                let mut delivered = Vec::new();
                let mut lost_at_end = 0;
                let mut last_ts = 0;
                for event in &events {
                    match event {
                        StreamEvent::Data(chunk) => {
                            delivered.extend(std::iter::repeat_n(b'?', chunk.gap_before as usize));
                            delivered.extend_from_slice(&chunk.bytes);
                            prop_assert!(chunk.ts_ns >= last_ts, "time went backwards");
                            last_ts = chunk.ts_ns;
                        }
                        StreamEvent::Closed { lost_ingress, .. } => lost_at_end = *lost_ingress,
                    }
                }
                prop_assert_eq!(delivered.len() as u64 + lost_at_end, stream.len() as u64);
                for (i, byte) in delivered.iter().enumerate() {
                    prop_assert!(*byte == b'?' || *byte == stream[i], "byte {} differs", i);
                }
                if complete {
                    prop_assert_eq!(&delivered[..], stream);
                    prop_assert_eq!(lost_at_end, 0);
                }
            }
        }
    }
}
