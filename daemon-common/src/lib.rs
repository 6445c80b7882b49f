//! `#[repr(C)]` records that cross the kernel/user boundary. Both sides compile this crate, so a
//! layout change is a change of both at once.
#![no_std]

/// Bytes copied into one record. A per-CPU scratch record (header + piece) must stay under the
/// kernel's 32 KiB per-CPU value limit.
pub const DATA_WINDOW: usize = 8192;

/// Records one buffer (or iovec) may be copied into. 3 × 8 KiB = 24 KiB covers Redis' own I/O
/// granularity (a 16 KiB read buffer; reply blocks of 16 KiB that the allocator rounds up to
/// 20 KiB), so everything but the body of a huge argument or value is copied whole, and the
/// decoder never has to guess at a header. Bytes past this are counted exactly, not copied.
pub const COPY_PIECES: usize = 3;

/// Bytes the kernel looks at to decide whether a connection speaks RESP.
pub const CLASSIFY_PEEK: usize = 16;

/// Record rings the programs can write to (`RECORDS_0` …). The daemon uses as many as there are
/// CPUs, up to this many; processes are handed them in rotation.
pub const RING_MAPS: u32 = 4;

/// How many first chunks of an unclassified socket may fail to look like RESP before it is
/// ignored for good. More than one, so a connection that was already running when the daemon
/// started (its first seen chunk may be the middle of a large value) is still picked up.
pub const CLASSIFY_MISS_LIMIT: u8 = 8;

/// Iovecs copied one by one for `readv`/`writev`/`recvmsg`/`sendmsg`; the bytes of any further
/// iovecs are reported as one uncopied chunk.
pub const MAX_IOVECS: u32 = 16;

/// Which end of the socket the bytes went.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Bytes this process read.
    Ingress = 0,
    /// Bytes this process wrote.
    Egress = 1,
}

/// The syscall that moved the bytes (reported so a user can see which path a client uses).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Syscall {
    Read = 0,
    Readv = 1,
    Recvfrom = 2,
    Recvmsg = 3,
    Write = 4,
    Writev = 5,
    Sendto = 6,
    Sendmsg = 7,
    /// `accept`/`accept4`: not I/O; its exit learns the new socket's peer.
    Accept = 8,
}

impl Syscall {
    pub const fn direction(self) -> Direction {
        match self {
            Syscall::Read | Syscall::Readv | Syscall::Recvfrom | Syscall::Recvmsg => {
                Direction::Ingress
            }
            Syscall::Write
            | Syscall::Writev
            | Syscall::Sendto
            | Syscall::Sendmsg
            | Syscall::Accept => Direction::Egress,
        }
    }

    /// Calls that only work on sockets: the fd needs no other proof of being one.
    pub const fn socket_only(self) -> bool {
        matches!(
            self,
            Syscall::Recvfrom | Syscall::Recvmsg | Syscall::Sendto | Syscall::Sendmsg
        )
    }

    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => Syscall::Read,
            1 => Syscall::Readv,
            2 => Syscall::Recvfrom,
            3 => Syscall::Recvmsg,
            4 => Syscall::Write,
            5 => Syscall::Writev,
            6 => Syscall::Sendto,
            7 => Syscall::Sendmsg,
            8 => Syscall::Accept,
            _ => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            Syscall::Read => "read",
            Syscall::Readv => "readv",
            Syscall::Recvfrom => "recvfrom",
            Syscall::Recvmsg => "recvmsg",
            Syscall::Write => "write",
            Syscall::Writev => "writev",
            Syscall::Sendto => "sendto",
            Syscall::Sendmsg => "sendmsg",
            Syscall::Accept => "accept",
        }
    }
}

/// `RecordHeader::kind`.
pub mod record_kind {
    /// Bytes that crossed a tracked socket; `copied_len` bytes of them follow the header.
    pub const DATA: u8 = 1;
    /// A tracked connection ended (close, or its fd number was reused by a new socket). Its
    /// `gap_before` is the ingress bytes lost at the end of the stream and `total_len` the
    /// egress bytes, so no loss goes unreported even when nothing follows it.
    pub const CLOSE: u8 = 2;
}

/// `RecordHeader::flags`.
pub mod record_flags {
    /// The first chunk of a connection the kernel has just started tracking.
    pub const FIRST: u8 = 1;
    /// Reading the user buffer failed: the length is exact but no bytes were copied.
    pub const COPY_FAILED: u8 = 2;
}

/// Every ring buffer record starts with this header.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecordHeader {
    /// `bpf_ktime_get_ns` at syscall exit (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// When the kernel started tracking this (tgid, fd): with fd reuse it tells connections apart.
    pub conn_start_ns: u64,
    pub cgroup_id: u64,
    /// Exact bytes of this chunk that crossed the socket.
    pub total_len: u64,
    /// Bytes of this connection and direction lost before this chunk (ring buffer full).
    pub gap_before: u64,
    pub tgid: u32,
    pub tid: u32,
    pub fd: i32,
    /// Bytes of the chunk that follow this header (at most `DATA_WINDOW`).
    pub copied_len: u32,
    pub kind: u8,
    pub syscall: u8,
    pub direction: u8,
    pub flags: u8,
    pub comm: [u8; 16],
    /// The remote end as the kernel saw it at connect/accept (see [`PeerAddr`]).
    pub peer: PeerAddr,
}

/// A remote address from the `sockaddr` given to `connect` or filled by `accept`: known even
/// after the socket is gone, and never confused with a later socket on the same fd number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerAddr {
    /// `AF_INET` (2), `AF_INET6` (10), or 0 when unknown (socket older than the daemon).
    pub family: u16,
    /// Host byte order.
    pub port: u16,
    /// IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
}

impl PeerAddr {
    pub const UNKNOWN: Self = Self {
        family: 0,
        port: 0,
        addr: [0; 16],
    };

    pub const AF_INET: u16 = 2;
    pub const AF_INET6: u16 = 10;

    /// Parses the first bytes of a `sockaddr_in`/`sockaddr_in6`.
    #[inline(always)]
    pub fn from_sockaddr(raw: &[u8; 24]) -> Self {
        let family = u16::from_ne_bytes([raw[0], raw[1]]);
        let port = u16::from_be_bytes([raw[2], raw[3]]);
        let mut addr = [0u8; 16];
        match family {
            Self::AF_INET => addr[..4].copy_from_slice(&raw[4..8]),
            Self::AF_INET6 => addr.copy_from_slice(&raw[8..24]),
            _ => return Self::UNKNOWN,
        }
        Self { family, port, addr }
    }
}

/// `ConnState::status`. An fd with no entry is not known to be a socket.
pub mod conn_status {
    /// A socket, not yet shown to speak RESP.
    pub const PROBING: u8 = 0;
    pub const TRACKED: u8 = 1;
    /// Not RESP: I/O on it is dropped at syscall entry.
    pub const IGNORED: u8 = 2;
}

/// Key of the kernel's per-connection map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: i32,
}

/// Value of the kernel's per-connection map. User space seeds it with `PROBING` for the sockets
/// that existed before the programs were attached.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnState {
    pub start_ns: u64,
    /// Bytes lost per direction since the last delivered chunk, reported in the next one.
    pub gap: [u64; 2],
    pub peer: PeerAddr,
    pub status: u8,
    pub misses: u8,
    /// Which record ring carries this connection's records: its process's, so that the
    /// connection's records, and those of every later connection on the same fd, stay in
    /// one ring and in order.
    pub ring: u8,
    pub _pad: u8,
}

impl ConnState {
    pub const fn probing(misses: u8, peer: PeerAddr) -> Self {
        Self {
            start_ns: 0,
            gap: [0; 2],
            peer,
            status: conn_status::PROBING,
            misses,
            ring: 0,
            _pad: 0,
        }
    }
}

/// Why a record could not be delivered; index into the per-CPU loss counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// The ring buffer was full: the chunk's bytes are reported as a gap on the next chunk.
    RingFull = 0,
    /// `bpf_probe_read_user` failed: the chunk went out with its length but no bytes.
    CopyFailed = 1,
    /// The per-thread in-flight syscall map was full: a syscall on a socket went unseen.
    InflightFull = 2,
    /// A close record could not be delivered: user space learns of the end by fd reuse.
    CloseLost = 3,
}

pub const LOSS_REASONS: u32 = 4;

impl LossReason {
    pub const ALL: [LossReason; LOSS_REASONS as usize] = [
        LossReason::RingFull,
        LossReason::CopyFailed,
        LossReason::InflightFull,
        LossReason::CloseLost,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            LossReason::RingFull => "ring_full",
            LossReason::CopyFailed => "copy_failed",
            LossReason::InflightFull => "inflight_full",
            LossReason::CloseLost => "close_lost",
        }
    }
}

/// Arguments saved at syscall entry for the exit program, per thread.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PendingIo {
    /// Buffer, iovec array, or msghdr, depending on `syscall`.
    pub ptr: u64,
    /// Buffer length or iovec count.
    pub len: u64,
    pub fd: i32,
    pub syscall: u8,
    pub _pad: [u8; 3],
}

impl PendingIo {
    /// `syscall` of a slot whose syscall has exited: nothing is pending on that thread.
    pub const DONE: u8 = u8::MAX;
}

/// A cheap, conservative test of whether `peek` (the first bytes of a chunk) start a RESP
/// message: a type byte followed by what that type must look like, or a short inline command
/// (`PING\r\n`: one line of letters, digits and spaces that ends inside the peek; HTTP
/// request lines are longer and carry `/`).
#[inline(always)]
pub fn looks_like_resp(peek: &[u8; CLASSIFY_PEEK], len: usize) -> bool {
    if len < 3 {
        return false;
    }
    match peek[0] {
        // Aggregates and lengths: one or more digits (or -1), then CRLF.
        b'*' | b'$' | b'%' | b'~' | b'>' | b'|' | b'=' | b'!' => digits_then_crlf(peek, len, 1),
        // Integers and big numbers.
        b':' | b'(' => digits_then_crlf(peek, len, 1),
        b'_' => peek[1] == b'\r' && peek[2] == b'\n',
        b'#' => (peek[1] == b't' || peek[1] == b'f') && peek[2] == b'\r',
        // Simple strings and errors: printable text up to CRLF (or the peek's end); an error
        // starts with an upper-case code (ERR, WRONGTYPE, ...).
        b'+' => printable_line(peek, len),
        b'-' => peek[1].is_ascii_uppercase() && printable_line(peek, len),
        b',' => printable_line(peek, len),
        b'A'..=b'Z' | b'a'..=b'z' => short_inline_command(peek, len),
        _ => false,
    }
}

#[inline(always)]
fn short_inline_command(peek: &[u8; CLASSIFY_PEEK], len: usize) -> bool {
    let mut i = 1;
    while i + 1 < len && i + 1 < CLASSIFY_PEEK {
        let byte = peek[i];
        if byte == b'\r' {
            return peek[i + 1] == b'\n';
        }
        if !(byte.is_ascii_alphanumeric() || byte == b' ' || byte == b'_' || byte == b'-') {
            return false;
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn digits_then_crlf(peek: &[u8; CLASSIFY_PEEK], len: usize, start: usize) -> bool {
    let mut i = start;
    if i < len && peek[i] == b'-' {
        i += 1;
    }
    let first_digit = i;
    while i < len && i < CLASSIFY_PEEK && peek[i].is_ascii_digit() {
        i += 1;
    }
    if i == first_digit {
        return false;
    }
    // A length that runs past the peek is plausible; otherwise CR must follow the digits.
    i >= len || i >= CLASSIFY_PEEK || peek[i] == b'\r'
}

#[inline(always)]
fn printable_line(peek: &[u8; CLASSIFY_PEEK], len: usize) -> bool {
    let mut i = 1;
    while i < len && i < CLASSIFY_PEEK {
        let byte = peek[i];
        if byte == b'\r' {
            return i > 1;
        }
        if !(0x20..0x7f).contains(&byte) {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are plain `#[repr(C)]` integers and byte arrays, valid for any bits.
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::ConnState {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peek(bytes: &[u8]) -> bool {
        let mut buf = [0u8; CLASSIFY_PEEK];
        let n = bytes.len().min(CLASSIFY_PEEK);
        buf[..n].copy_from_slice(&bytes[..n]);
        looks_like_resp(&buf, n)
    }

    #[test]
    fn accepts_what_redis_peers_send() {
        assert!(peek(b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n"));
        assert!(peek(b"+OK\r\n"));
        assert!(peek(b"-WRONGTYPE Operation against a key"));
        assert!(peek(b"$-1\r\n"));
        assert!(peek(b"$100000\r\nxxxxxxx"));
        assert!(peek(b":1\r\n"));
        assert!(peek(b"%7\r\n$6\r\nserver"));
        assert!(peek(b">3\r\n$7\r\nmessage"));
        assert!(peek(b"_\r\n"));
        assert!(peek(b"#t\r\n"));
        assert!(peek(b"PING\r\n"));
        assert!(
            !peek(b"get key:1\r\n"),
            "':' is not accepted in inline commands"
        );
        assert!(peek(b"GET key1\r\n"));
    }

    #[test]
    fn rejects_other_protocols_and_text() {
        assert!(!peek(b"GET / HTTP/1.1\r\nHost: x\r\n"));
        assert!(!peek(b"HTTP/1.1 200 OK\r\n"));
        assert!(!peek(b"hello world\n"));
        assert!(!peek(b"*\r\n"));
        assert!(!peek(b"*abc\r\n"));
        assert!(!peek(b"-\x01\x02"));
        assert!(!peek(b"+\x00\x01\x02"));
        assert!(!peek(b"\x16\x03\x01\x02\x00"));
        assert!(!peek(b"*3"));
        assert!(!peek(b"GET /index.html HTTP/1.1\r\n"));
        assert!(!peek(b"EHLO mail.example.com\r\n"));
        assert!(!peek(b"hello\n"));
        assert!(!peek(b"PING"));
    }
}
