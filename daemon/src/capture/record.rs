//! Typed view of the kernel's ring records.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use respwatch_common::{
    CloseRecord, DataHeader, Direction, FAMILY_IPV4, FAMILY_IPV6, OpenRecord, close_flags,
    data_flags, open_flags, record_kind,
};

use super::CaptureError;

/// Which end of a connection a socket is, when its handshake was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opener {
    /// It connected: the client end.
    Active,
    /// It was accepted: the server end.
    Passive,
}

/// A connection the kernel started tracking. Comes before any of its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    pub cookie: u64,
    pub ts_ns: u64,
    /// The owning process; 0 when the kernel does not know it (connected or listening before
    /// the daemon started).
    pub tgid: u32,
    pub comm: [u8; 16],
    pub cgroup_id: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `None` for connections open before the daemon.
    pub opener: Option<Opener>,
    /// The connection's start was not seen: offset 0 is wherever the kernel joined.
    pub mid_stream: bool,
}

/// Stream bytes `[seq, seq + len)` of one direction, of which the first `bytes.len()` were
/// copied; borrowed from the ring.
#[derive(Clone, Copy, Debug)]
pub struct Data<'a> {
    pub cookie: u64,
    pub ts_ns: u64,
    pub direction: Direction,
    /// Stream offset modulo 2^32.
    pub seq: u32,
    pub len: u32,
    pub bytes: &'a [u8],
    /// The bytes start a packet: a place where a message may start.
    pub packet_start: bool,
}

/// A connection ended (or is no Redis after all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    pub cookie: u64,
    pub ts_ns: u64,
    /// Stream length modulo 2^32 per direction (index [`Direction`]), where known.
    pub ends: [Option<u32>; 2],
    /// Its replies turned out not to be RESP: drop it without reporting anything.
    pub not_resp: bool,
}

#[derive(Clone, Debug)]
pub enum Record<'a> {
    Open(Open),
    Data(Data<'a>),
    Close(Close),
}

/// Every record kind keeps its timestamp here.
const TS_OFFSET: usize = 16;

impl<'a> Record<'a> {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Record::Open(open) => open.ts_ns,
            Record::Data(data) => data.ts_ns,
            Record::Close(close) => close.ts_ns,
        }
    }

    /// The timestamp of a raw record, read without parsing the rest.
    pub fn timestamp(raw: &[u8]) -> Option<u64> {
        let bytes = raw.get(TS_OFFSET..TS_OFFSET + 8)?;
        Some(u64::from_ne_bytes(bytes.try_into().ok()?))
    }

    /// Parses one ring record, borrowing its payload.
    pub fn parse(raw: &'a [u8]) -> Result<Self, CaptureError> {
        let bad = |why| CaptureError::BadRecord {
            len: raw.len(),
            why,
        };
        match raw.first().copied() {
            Some(record_kind::OPEN) => {
                let open: OpenRecord = read(raw).ok_or_else(|| bad("short open record"))?;
                Ok(Record::Open(Open {
                    cookie: open.cookie,
                    ts_ns: open.ts_ns,
                    tgid: open.tgid,
                    comm: open.comm,
                    cgroup_id: open.cgroup_id,
                    local: socket_addr(open.family, open.local_addr, open.local_port)
                        .ok_or_else(|| bad("unknown address family"))?,
                    remote: socket_addr(open.family, open.remote_addr, open.remote_port)
                        .ok_or_else(|| bad("unknown address family"))?,
                    opener: if open.flags & open_flags::CLIENT != 0 {
                        Some(Opener::Active)
                    } else if open.flags & open_flags::SERVER != 0 {
                        Some(Opener::Passive)
                    } else {
                        None
                    },
                    mid_stream: open.flags & open_flags::MID_STREAM != 0,
                }))
            }
            Some(record_kind::DATA) => {
                let header: DataHeader = read(raw).ok_or_else(|| bad("short data record"))?;
                let start = size_of::<DataHeader>();
                let copied = header.copied.min(header.len) as usize;
                let payload = raw
                    .get(start..start + copied)
                    .ok_or_else(|| bad("data past its end"))?;
                let direction =
                    Direction::from_u8(header.direction).ok_or_else(|| bad("unknown direction"))?;
                Ok(Record::Data(Data {
                    cookie: header.cookie,
                    ts_ns: header.ts_ns,
                    direction,
                    seq: header.seq,
                    len: header.len,
                    bytes: payload,
                    packet_start: header.flags & data_flags::PACKET_START != 0,
                }))
            }
            Some(record_kind::CLOSE) => {
                let close: CloseRecord = read(raw).ok_or_else(|| bad("short close record"))?;
                Ok(Record::Close(Close::from_kernel(&close)))
            }
            _ => Err(bad("unknown kind")),
        }
    }
}

impl Close {
    pub fn from_kernel(close: &CloseRecord) -> Self {
        let end =
            |flag: u8, dir: Direction| (close.flags & flag != 0).then_some(close.end[dir as usize]);
        Close {
            cookie: close.cookie,
            ts_ns: close.ts_ns,
            ends: [
                end(close_flags::INGRESS_END, Direction::Ingress),
                end(close_flags::EGRESS_END, Direction::Egress),
            ],
            not_resp: close.flags & close_flags::NOT_RESP != 0,
        }
    }
}

/// A `repr(C)` record from the start of `raw`, if it is long enough.
fn read<T: Copy>(raw: &[u8]) -> Option<T> {
    if raw.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: the record types are plain `repr(C)` integers and byte arrays, valid for any
    // bits; the length was checked and the read is unaligned-safe.
    Some(unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) })
}

fn socket_addr(family: u8, addr: [u8; 16], port: u16) -> Option<SocketAddr> {
    let ip = match family {
        FAMILY_IPV4 => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        FAMILY_IPV6 => {
            let v6 = Ipv6Addr::from(addr);
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The text of a kernel `comm` field.
pub fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T>(value: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain repr(C) value.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    #[test]
    fn data_records_keep_exact_lengths_and_copied_bytes() {
        let header = DataHeader {
            kind: record_kind::DATA,
            direction: Direction::Egress as u8,
            flags: data_flags::PACKET_START,
            _pad: 0,
            len: 100,
            cookie: 7,
            ts_ns: 9,
            seq: u32::MAX - 1,
            copied: 4,
        };
        let mut raw = bytes_of(&header);
        raw.extend_from_slice(b"+OK\r");
        raw.extend_from_slice(&[0; 60]); // the rest of the record's room
        assert_eq!(Record::timestamp(&raw), Some(9));
        let Record::Data(data) = Record::parse(&raw).unwrap() else {
            panic!("not data");
        };
        assert_eq!(
            (data.cookie, data.seq, data.len, data.bytes),
            (7, u32::MAX - 1, 100, &b"+OK\r"[..])
        );
        assert!(data.packet_start);
        assert_eq!(data.direction, Direction::Egress);
    }

    #[test]
    fn malformed_records_are_errors() {
        for raw in [&[][..], &[record_kind::DATA, 1, 0][..], &[99; 64][..]] {
            assert!(Record::parse(raw).is_err(), "{raw:?}");
        }
        let header = DataHeader {
            kind: record_kind::DATA,
            direction: 0,
            flags: 0,
            _pad: 0,
            len: 10,
            cookie: 1,
            ts_ns: 1,
            seq: 0,
            copied: 10,
        };
        // Claims 10 copied bytes but the record ends after 3.
        let mut raw = bytes_of(&header);
        raw.extend_from_slice(b"abc");
        assert!(Record::parse(&raw).is_err());
    }

    #[test]
    fn open_records_carry_v4_v6_and_mapped_addresses() {
        let mut open = OpenRecord {
            kind: record_kind::OPEN,
            flags: open_flags::SERVER,
            family: FAMILY_IPV6,
            _pad: 0,
            tgid: 42,
            cookie: 5,
            ts_ns: 6,
            cgroup_id: 8,
            local_port: 6379,
            remote_port: 50000,
            _pad2: 0,
            local_addr: Ipv6Addr::LOCALHOST.octets(),
            remote_addr: Ipv4Addr::new(10, 0, 0, 7).to_ipv6_mapped().octets(),
            comm: *b"redis-server\0\0\0\0",
        };
        let raw = bytes_of(&open);
        let Record::Open(parsed) = Record::parse(&raw).unwrap() else {
            panic!("not open");
        };
        assert_eq!(parsed.local, "[::1]:6379".parse().unwrap());
        assert_eq!(parsed.remote, "10.0.0.7:50000".parse().unwrap());
        assert_eq!(parsed.opener, Some(Opener::Passive));
        assert_eq!(comm_str(&parsed.comm), "redis-server");
        open.family = 9;
        assert!(Record::parse(&bytes_of(&open)).is_err());
    }
}
