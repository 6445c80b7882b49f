//! Typed view of the kernel's ring buffer records.
use bytes::{Bytes, BytesMut};
use respwatch_common::{Direction, PeerAddr, RecordHeader, Syscall, record_flags, record_kind};

use super::CaptureError;

/// One connection as the kernel tracks it. `start_ns` tells apart the connections that reuse
/// one fd number over time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnRef {
    pub tgid: u32,
    pub fd: i32,
    pub start_ns: u64,
}

/// Bytes that crossed a tracked socket in one syscall (one iovec for the vector calls).
#[derive(Clone, Debug)]
pub struct Chunk {
    pub conn: ConnRef,
    pub tid: u32,
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub syscall: Syscall,
    pub direction: Direction,
    /// Bytes of this chunk that crossed the socket; `bytes` holds the first of them.
    pub total_len: u64,
    /// The copied window (shorter than `total_len` for large chunks or failed copies).
    pub bytes: Bytes,
    /// Bytes of this connection and direction lost just before this chunk.
    pub gap_before: u64,
    pub first: bool,
    pub comm: [u8; 16],
    /// The remote end from connect/accept; `family == 0` when the socket predates the daemon.
    pub peer: PeerAddr,
}

impl Chunk {
    /// Bytes of the chunk that exist on the wire but were not copied.
    pub fn uncopied(&self) -> u64 {
        self.total_len.saturating_sub(self.bytes.len() as u64)
    }
}

#[derive(Clone, Debug)]
pub enum Record {
    Data(Chunk),
    /// The connection ended; bytes lost at the end of each stream are reported here.
    Closed {
        conn: ConnRef,
        ts_ns: u64,
        lost_ingress: u64,
        lost_egress: u64,
    },
}

impl Record {
    /// `batch` is where the copied bytes go: records of one batch share its allocation rather
    /// than each allocating its own.
    pub fn parse(raw: &[u8], batch: &mut BytesMut) -> Result<Self, CaptureError> {
        let header_len = size_of::<RecordHeader>();
        if raw.len() < header_len {
            return Err(CaptureError::BadRecord {
                len: raw.len(),
                why: "shorter than its header",
            });
        }
        // SAFETY: `RecordHeader` is plain `repr(C)` integers; the length was checked and the
        // read is unaligned-safe.
        let header: RecordHeader = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
        let conn = ConnRef {
            tgid: header.tgid,
            fd: header.fd,
            start_ns: header.conn_start_ns,
        };
        match header.kind {
            record_kind::CLOSE => Ok(Record::Closed {
                conn,
                ts_ns: header.ts_ns,
                lost_ingress: header.gap_before,
                lost_egress: header.total_len,
            }),
            record_kind::DATA => {
                let copied = header.copied_len as usize;
                let data = raw.get(header_len..header_len + copied).ok_or_else(|| {
                    CaptureError::BadRecord {
                        len: raw.len(),
                        why: "data past its end",
                    }
                })?;
                let syscall =
                    Syscall::from_u8(header.syscall).ok_or_else(|| CaptureError::BadRecord {
                        len: raw.len(),
                        why: "unknown syscall",
                    })?;
                Ok(Record::Data(Chunk {
                    conn,
                    tid: header.tid,
                    ts_ns: header.ts_ns,
                    cgroup_id: header.cgroup_id,
                    syscall,
                    direction: syscall.direction(),
                    total_len: header.total_len,
                    bytes: {
                        batch.extend_from_slice(data);
                        batch.split().freeze()
                    },
                    gap_before: header.gap_before,
                    first: header.flags & record_flags::FIRST != 0,
                    comm: header.comm,
                    peer: header.peer,
                }))
            }
            _ => Err(CaptureError::BadRecord {
                len: raw.len(),
                why: "unknown kind",
            }),
        }
    }
}

/// The text of a kernel `comm` field.
pub fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}
