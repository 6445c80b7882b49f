//! Ring records as the kernel writes them for a made-up node: for the pipeline bench and the
//! allocation test (each includes this file with `#[path]`). Every connection is seen from
//! both ends (client and server sockets on this node), as `redis-benchmark` against a local
//! server is: per exchange the client's request packets (egress), the server's (ingress), the
//! server's reply packets and the client's, each packet one record of at most [`MSS`] bytes.
use std::collections::HashMap;

use respwatch_common::{
    DataHeader, Direction, FAMILY_IPV4, OpenRecord, data_flags, open_flags, record_kind,
};
use respwatchd::{
    enrich::{Attributor, Process},
    pipeline::WatchInterest,
};

/// A Watch subscriber whose filters name a process by its comm (these records' processes are
/// all `redis-benchmark`).
pub struct WatchesComm(pub &'static str);

impl WatchInterest for WatchesComm {
    fn may_want(&self, process: &Process, _: &Attributor) -> bool {
        *process.comm == *self.0
    }
}

/// Payload bytes per packet.
pub const MSS: usize = 1448;

/// The bytes of a `repr(C)` record without padding (checked by [`check_layouts`]).
fn bytes_of<T>(record: &T) -> &[u8] {
    // SAFETY: the record types are plain integers and arrays without padding, so all of their
    // bytes are initialised.
    unsafe { std::slice::from_raw_parts((record as *const T).cast::<u8>(), size_of::<T>()) }
}

/// Panics if a record type has padding, which [`bytes_of`] would read uninitialised.
pub fn check_layouts() {
    assert_eq!(size_of::<DataHeader>(), 4 + 4 + 8 + 8 + 4 + 4);
    assert_eq!(
        size_of::<OpenRecord>(),
        4 + 4 + 8 + 8 + 8 + 2 + 2 + 4 + 16 + 16 + 16
    );
}

/// The client and server sockets of one connection.
#[derive(Clone, Copy)]
pub struct Conn {
    client: u64,
    server: u64,
}

/// Writes records in capture order, [`Recorder::step_ns`] apart (1 µs by default).
pub struct Recorder {
    records: Vec<Vec<u8>>,
    ts_ns: u64,
    step_ns: u64,
    next_port: u16,
    offsets: HashMap<(u64, u8), u32>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            records: Vec::new(),
            ts_ns: 1_000_000,
            step_ns: 1_000,
            next_port: 40000,
            offsets: HashMap::new(),
        }
    }
}

impl Recorder {
    /// A new connection to port 6379: the open records of both of its sockets.
    pub fn connect(&mut self) -> Conn {
        let port = self.next_port;
        self.next_port += 1;
        let conn = Conn {
            client: 1_000_000 + u64::from(port),
            server: 2_000_000 + u64::from(port),
        };
        for (cookie, flags, local_port, remote_port) in [
            (conn.client, open_flags::CLIENT, port, 6379),
            (conn.server, open_flags::SERVER, 6379, port),
        ] {
            self.ts_ns += self.step_ns;
            let open = OpenRecord {
                kind: record_kind::OPEN,
                flags,
                family: FAMILY_IPV4,
                _pad: 0,
                tgid: std::process::id(),
                cookie,
                ts_ns: self.ts_ns,
                cgroup_id: 1,
                local_port,
                remote_port,
                _pad2: 0,
                local_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                remote_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                comm: *b"redis-benchmark\0",
            };
            self.records.push(bytes_of(&open).to_vec());
        }
        conn
    }

    /// Bytes the client sends: its egress, then the server's ingress.
    pub fn request(&mut self, conn: Conn, bytes: &[u8]) {
        self.packets(conn.client, Direction::Egress, bytes);
        self.packets(conn.server, Direction::Ingress, bytes);
    }

    /// Bytes the server sends (replies, pushes): its egress, then the client's ingress.
    pub fn reply(&mut self, conn: Conn, bytes: &[u8]) {
        self.packets(conn.server, Direction::Egress, bytes);
        self.packets(conn.client, Direction::Ingress, bytes);
    }

    pub fn exchange(&mut self, conn: Conn, request: &[u8], reply: &[u8]) {
        self.request(conn, request);
        self.reply(conn, reply);
    }

    fn packets(&mut self, cookie: u64, direction: Direction, bytes: &[u8]) {
        for packet in bytes.chunks(MSS) {
            self.ts_ns += self.step_ns;
            let offset = self.offsets.entry((cookie, direction as u8)).or_default();
            let header = DataHeader {
                kind: record_kind::DATA,
                direction: direction as u8,
                flags: data_flags::PACKET_START,
                _pad: 0,
                len: packet.len() as u32,
                cookie,
                ts_ns: self.ts_ns,
                seq: *offset,
                copied: packet.len() as u32,
            };
            *offset = offset.wrapping_add(packet.len() as u32);
            // A record's room is a power of two of at least 64 bytes: padding follows.
            let mut record = [bytes_of(&header), packet].concat();
            record.resize(
                size_of::<DataHeader>() + packet.len().next_power_of_two().max(64),
                0,
            );
            self.records.push(record);
        }
    }
}

const SET: &[u8] = b"*3\r\n$3\r\nSET\r\n$16\r\nkey:000000012345\r\n$3\r\nxxx\r\n";
const GET: &[u8] = b"*2\r\n$3\r\nGET\r\n$16\r\nkey:000000012345\r\n";

/// `redis-benchmark -c <clients> -P <pipeline> -t set,get` with 16-byte keys and 3-byte values:
/// the records of `commands` of them, rounded down to a multiple of `clients * pipeline`, and
/// how many that is.
pub fn benchmark(clients: usize, pipeline: usize, commands: usize) -> (Vec<Vec<u8>>, usize) {
    let mut recorder = Recorder::default();
    let conns: Vec<Conn> = (0..clients).map(|_| recorder.connect()).collect();
    let rounds = commands / (clients * pipeline);
    for round in 0..rounds {
        let (request, reply): (&[u8], &[u8]) = if round % 2 == 0 {
            (SET, b"+OK\r\n")
        } else {
            (GET, b"$3\r\nxxx\r\n")
        };
        for conn in &conns {
            recorder.exchange(*conn, &request.repeat(pipeline), &reply.repeat(pipeline));
        }
    }
    (recorder.records, rounds * clients * pipeline)
}

/// A mix of what a node's Redis traffic holds, on connections of three kinds, made round by
/// round (a long run does not fit in memory at once):
/// - RESP2: SET/GET, WRONGTYPE and ERR errors, an unknown command, MULTI/SET/INCR/EXEC (each
///   queued command counts) and MULTI/SET/DISCARD; every eighth round a 100 KB SET and GET
///   (70 packets each way);
/// - RESP3 (after `HELLO 3`): HGETALL with a map reply, GET with a null, PING;
/// - pub/sub: a subscriber gets a pushed message per round, which the RESP2 connection's
///   PUBLISH sent.
pub struct Mixed {
    recorder: Recorder,
    plain: Conn,
    resp3: Conn,
    subscriber: Conn,
    large_set: Vec<u8>,
    large_reply: Vec<u8>,
    rounds: usize,
}

const MIXED: [(&[u8], &[u8]); 12] = [
    (SET, b"+OK\r\n"),
    (GET, b"$3\r\nxxx\r\n"),
    (
        b"*3\r\n$5\r\nLPUSH\r\n$16\r\nkey:000000012345\r\n$1\r\nx\r\n",
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
    ),
    (
        b"*2\r\n$4\r\nINCR\r\n$16\r\nkey:000000012345\r\n",
        b"-ERR value is not an integer or out of range\r\n",
    ),
    (
        b"*2\r\n$6\r\nNOSUCH\r\n$1\r\nx\r\n",
        b"-ERR unknown command 'NOSUCH', with args beginning with: 'x' \r\n",
    ),
    (b"*1\r\n$5\r\nMULTI\r\n", b"+OK\r\n"),
    (SET, b"+QUEUED\r\n"),
    (b"*2\r\n$4\r\nINCR\r\n$7\r\ncounter\r\n", b"+QUEUED\r\n"),
    (b"*1\r\n$4\r\nEXEC\r\n", b"*2\r\n+OK\r\n:7\r\n"),
    (b"*1\r\n$5\r\nMULTI\r\n", b"+OK\r\n"),
    (SET, b"+QUEUED\r\n"),
    (b"*1\r\n$7\r\nDISCARD\r\n", b"+OK\r\n"),
];

const MIXED_RESP3: [(&[u8], &[u8]); 3] = [
    (
        b"*2\r\n$7\r\nHGETALL\r\n$4\r\nuser\r\n",
        b"%2\r\n$4\r\nname\r\n$3\r\nann\r\n$3\r\nage\r\n:42\r\n",
    ),
    (b"*2\r\n$3\r\nGET\r\n$7\r\nmissing\r\n", b"_\r\n"),
    (b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n"),
];

impl Mixed {
    /// The connections, and the records that set them up (opens, `HELLO 3`, `SUBSCRIBE`);
    /// records `step_ns` apart.
    pub fn new(step_ns: u64) -> (Mixed, Vec<Vec<u8>>) {
        let mut recorder = Recorder {
            step_ns,
            ..Recorder::default()
        };
        let (plain, resp3, subscriber) =
            (recorder.connect(), recorder.connect(), recorder.connect());
        recorder.exchange(
            resp3,
            b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n",
            b"%2\r\n+server\r\n+redis\r\n+proto\r\n:3\r\n",
        );
        recorder.exchange(
            subscriber,
            b"*2\r\n$9\r\nSUBSCRIBE\r\n$4\r\nnews\r\n",
            b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n",
        );
        let setup = std::mem::take(&mut recorder.records);
        let large = vec![b'v'; 100_000];
        let mixed = Mixed {
            recorder,
            plain,
            resp3,
            subscriber,
            large_set: [
                b"*3\r\n$3\r\nSET\r\n$5\r\nlarge\r\n$100000\r\n".as_slice(),
                &large,
                b"\r\n",
            ]
            .concat(),
            large_reply: [b"$100000\r\n".as_slice(), &large, b"\r\n"].concat(),
            rounds: 0,
        };
        (mixed, setup)
    }

    /// The next round's records, and how many commands it holds.
    pub fn round(&mut self) -> (Vec<Vec<u8>>, usize) {
        let recorder = &mut self.recorder;
        let mut commands = 0;
        for (request, reply) in MIXED {
            recorder.exchange(self.plain, request, reply);
        }
        for (request, reply) in MIXED_RESP3 {
            recorder.exchange(self.resp3, request, reply);
        }
        commands += MIXED.len() + MIXED_RESP3.len();
        if self.rounds.is_multiple_of(8) {
            recorder.exchange(self.plain, &self.large_set, b"+OK\r\n");
            recorder.exchange(
                self.plain,
                b"*2\r\n$3\r\nGET\r\n$5\r\nlarge\r\n",
                &self.large_reply,
            );
            commands += 2;
        }
        recorder.exchange(
            self.plain,
            b"*3\r\n$7\r\nPUBLISH\r\n$4\r\nnews\r\n$5\r\nhello\r\n",
            b":1\r\n",
        );
        recorder.reply(
            self.subscriber,
            b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n",
        );
        commands += 1;
        self.rounds += 1;
        (std::mem::take(&mut recorder.records), commands)
    }
}
