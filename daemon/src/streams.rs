//! Streams stage: turns kernel records into per-connection, per-direction byte streams.
//!
//! A connection is a (tgid, fd) pair *and* the time the kernel started tracking it, so a reused
//! fd number never continues an old stream. Each connection is described once (socket
//! addresses, process) when first seen; the decoder stage gets the chunks in ring order.
use std::sync::Arc;

use foldhash::HashMap;

use bytes::Bytes;
use respwatch_common::{Direction, Syscall};

use crate::{
    capture::{Chunk, ConnRef, Record},
    enrich::{Process, ProcessCache},
    sockets::{SocketAddrs, SocketTables},
};

/// A connection's identity for the daemon's lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// What is known about a connection, resolved once when it is first seen.
#[derive(Debug)]
pub struct ConnMeta {
    pub id: ConnId,
    pub kernel: ConnRef,
    pub process: Arc<Process>,
    /// `None` when the process was gone before its socket could be looked up.
    pub socket: Option<SocketAddrs>,
}

#[derive(Clone, Debug)]
pub enum StreamEvent {
    Data(StreamChunk),
    /// The connection ended; `lost_*` bytes at the end of its streams never arrived.
    Closed {
        conn: Arc<ConnMeta>,
        ts_ns: u64,
        lost_ingress: u64,
        lost_egress: u64,
    },
}

/// Bytes of one direction of one connection, in order.
#[derive(Clone, Debug)]
pub struct StreamChunk {
    pub conn: Arc<ConnMeta>,
    pub direction: Direction,
    pub syscall: Syscall,
    pub ts_ns: u64,
    pub tid: u32,
    /// The copied bytes; `uncopied` more bytes of the chunk follow them on the wire.
    pub bytes: Bytes,
    pub uncopied: u64,
    /// Bytes lost (ring buffer full) just before this chunk.
    pub gap_before: u64,
}

impl StreamChunk {
    pub fn total_len(&self) -> u64 {
        self.bytes.len() as u64 + self.uncopied
    }
}

/// How long, in record time, a connection of an exited process must have been silent before
/// the sweep ends it. Record time, not wall time: when the pipeline lags behind the kernel, the
/// ring still holds records of processes that have already exited.
const EXITED_GRACE_NS: u64 = 2_000_000_000;

#[derive(Default)]
pub struct Streams {
    /// Each connection with the kernel timestamp of its latest record.
    conns: HashMap<(u32, i32), (Arc<ConnMeta>, u64)>,
    processes: ProcessCache,
    sockets: SocketTables,
    next_id: u64,
    /// The newest record timestamp seen: how far the pipeline has read.
    frontier_ns: u64,
}

impl Streams {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn tracked(&self) -> usize {
        self.conns.len()
    }

    /// Turns one batch of records, in ring order, into stream events.
    pub fn accept_batch(
        &mut self,
        records: impl IntoIterator<Item = Record>,
        out: &mut Vec<StreamEvent>,
    ) {
        self.sockets.clear();
        for record in records {
            self.accept(record, out);
        }
    }

    fn accept(&mut self, record: Record, out: &mut Vec<StreamEvent>) {
        match record {
            Record::Data(chunk) => self.accept_chunk(chunk, out),
            Record::Closed {
                conn,
                ts_ns,
                lost_ingress,
                lost_egress,
            } => {
                let key = (conn.tgid, conn.fd);
                if self
                    .conns
                    .get(&key)
                    .is_some_and(|(meta, _)| meta.kernel.start_ns == conn.start_ns)
                    && let Some((meta, _)) = self.conns.remove(&key)
                {
                    out.push(StreamEvent::Closed {
                        conn: meta,
                        ts_ns,
                        lost_ingress,
                        lost_egress,
                    });
                }
            }
        }
    }

    fn accept_chunk(&mut self, chunk: Chunk, out: &mut Vec<StreamEvent>) {
        let key = (chunk.conn.tgid, chunk.conn.fd);
        self.frontier_ns = self.frontier_ns.max(chunk.ts_ns);
        let meta = match self.conns.get_mut(&key) {
            Some((meta, last_ns)) if meta.kernel.start_ns == chunk.conn.start_ns => {
                *last_ns = chunk.ts_ns;
                Arc::clone(meta)
            }
            // A straggler of an older connection on this fd, read after its successor had
            // started: that connection has ended already, so its bytes can only be dropped.
            // One ring per process keeps this from happening while the process lives.
            Some((meta, _)) if meta.kernel.start_ns > chunk.conn.start_ns => {
                tracing::warn!(
                    tgid = chunk.conn.tgid,
                    fd = chunk.conn.fd,
                    bytes = chunk.total_len,
                    "dropped a late chunk of an earlier connection on a reused fd"
                );
                return;
            }
            stale => {
                // A new connection on this fd; an old one whose close was lost ends here.
                if stale.is_some()
                    && let Some((old, _)) = self.conns.remove(&key)
                {
                    out.push(StreamEvent::Closed {
                        conn: old,
                        ts_ns: chunk.ts_ns,
                        lost_ingress: 0,
                        lost_egress: 0,
                    });
                }
                let meta = Arc::new(self.describe(&chunk));
                self.conns.insert(key, (Arc::clone(&meta), chunk.ts_ns));
                meta
            }
        };
        let uncopied = chunk.uncopied();
        out.push(StreamEvent::Data(StreamChunk {
            conn: meta,
            direction: chunk.direction,
            syscall: chunk.syscall,
            ts_ns: chunk.ts_ns,
            tid: chunk.tid,
            bytes: chunk.bytes,
            uncopied,
            gap_before: chunk.gap_before,
        }));
    }

    fn describe(&mut self, chunk: &Chunk) -> ConnMeta {
        self.next_id += 1;
        ConnMeta {
            id: ConnId(self.next_id),
            kernel: chunk.conn,
            process: self
                .processes
                .get(chunk.conn.tgid, &chunk.comm, chunk.cgroup_id),
            socket: self
                .sockets
                .resolve(chunk.conn.tgid, chunk.conn.fd, &chunk.peer),
        }
    }

    /// Ends the connections of processes that exited without closing them (exit closes fds
    /// without a `close` syscall).
    pub fn sweep_exited(&mut self, ts_ns: u64, out: &mut Vec<StreamEvent>) {
        let frontier = self.frontier_ns;
        let gone: Vec<(u32, i32)> = self
            .conns
            .iter()
            .filter(|((tgid, _), (_, last_ns))| {
                frontier.saturating_sub(*last_ns) > EXITED_GRACE_NS
                    && !crate::enrich::process_alive(*tgid)
            })
            .map(|(key, _)| *key)
            .collect();
        for key in gone {
            if let Some((meta, _)) = self.conns.remove(&key) {
                out.push(StreamEvent::Closed {
                    conn: meta,
                    ts_ns,
                    lost_ingress: 0,
                    lost_egress: 0,
                });
            }
        }
        self.processes.retain_alive();
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use respwatch_common::{Direction, PeerAddr, Syscall};

    use super::*;
    use crate::capture::{Chunk, ConnRef, Record};

    fn chunk(start_ns: u64, ts_ns: u64, bytes: &'static [u8]) -> Record {
        Record::Data(Chunk {
            conn: ConnRef {
                tgid: std::process::id(),
                fd: 7,
                start_ns,
            },
            tid: std::process::id(),
            ts_ns,
            cgroup_id: 0,
            syscall: Syscall::Write,
            direction: Direction::Egress,
            total_len: bytes.len() as u64,
            bytes: Bytes::from_static(bytes),
            gap_before: 0,
            first: false,
            comm: [0; 16],
            peer: PeerAddr::UNKNOWN,
        })
    }

    fn conn_ids(events: &[StreamEvent]) -> Vec<(&'static str, u64)> {
        events
            .iter()
            .map(|event| match event {
                StreamEvent::Data(data) => ("data", data.conn.kernel.start_ns),
                StreamEvent::Closed { conn, .. } => ("closed", conn.kernel.start_ns),
            })
            .collect()
    }

    #[test]
    fn a_reused_fd_starts_a_new_connection_and_ends_the_old_one() {
        let mut streams = Streams::new();
        let mut events = Vec::new();
        streams.accept_batch(
            [chunk(100, 110, b"*1\r\n"), chunk(200, 210, b"*2\r\n")],
            &mut events,
        );
        assert_eq!(
            conn_ids(&events),
            [("data", 100), ("closed", 100), ("data", 200)]
        );
    }

    #[test]
    fn a_late_chunk_of_an_earlier_connection_does_not_end_its_successor() {
        let mut streams = Streams::new();
        let mut events = Vec::new();
        streams.accept_batch(
            [
                chunk(200, 210, b"*1\r\n"),
                chunk(100, 120, b"+OK\r\n"),
                chunk(200, 220, b"$3\r\n"),
            ],
            &mut events,
        );
        assert_eq!(conn_ids(&events), [("data", 200), ("data", 200)]);
        assert_eq!(streams.tracked(), 1);
    }
}
