//! `#[repr(C)]` records that cross the kernel/user boundary, and the classification rules the
//! kernel applies to the first bytes of a connection. Both sides compile this crate, so a layout
//! change is a change of both at once, and the rules are unit-tested on the host.
#![no_std]

/// Bytes of the head of a connection's request stream the kernel looks at to decide whether it
/// speaks RESP. Heads that arrive in smaller pieces are collected until this many bytes (or a
/// line end) are there, so a peer cannot hide its traffic behind tiny writes.
pub const CLASSIFY_PEEK: usize = 16;

/// Payload bytes a connection of unknown start (open before the daemon) may carry without any
/// packet that starts like RESP before it is ignored for good. Bytes, not packets: a peer that
/// writes a byte at a time runs out of budget as fast as one that writes large blocks.
pub const MID_STREAM_PROBE_BYTES: u32 = 1 << 20;

/// Payload capacities of data records, smallest first: a packet's payload goes into the
/// smallest that holds it, so a ring record wastes at most half its room.
pub const DATA_CLASSES: [u32; 9] = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384];

/// The largest data record's payload: bigger packets (GSO and GRO packets carry up to ~64 KiB)
/// are copied as consecutive pieces of this size.
pub const DATA_PIECE: u32 = 16384;

/// Pieces copied per packet: 8 × 16 KiB covers every packet up to 128 KiB (loopback and GRO
/// packets stop at 64 KiB unless BIG TCP raised the device's GSO size). Bytes past them are
/// reported in the last record's length, uncopied.
pub const MAX_PIECES: u32 = 8;

/// Record rings the programs can write to (`RECORDS_0` …): each CPU writes to ring
/// `cpu % rings`, so with up to this many CPUs no two CPUs share one.
pub const RING_MAPS: u32 = 4;

/// Which way bytes went, seen from the socket's owner.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Bytes the socket received.
    Ingress = 0,
    /// Bytes the socket sent.
    Egress = 1,
}

impl Direction {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Direction::Ingress),
            1 => Some(Direction::Egress),
            _ => None,
        }
    }
}

/// The first byte of every record.
pub mod record_kind {
    /// [`super::OpenRecord`]: a connection started being tracked. Always before its data.
    pub const OPEN: u8 = 1;
    /// [`super::DataHeader`] and the copied payload.
    pub const DATA: u8 = 2;
    /// [`super::CloseRecord`]: the connection ended, or turned out not to be RESP.
    pub const CLOSE: u8 = 3;
}

/// `OpenRecord::flags`.
pub mod open_flags {
    /// The socket connected (active open): it is the client end.
    pub const CLIENT: u8 = 1;
    /// The socket was accepted (passive open): it is the server end.
    pub const SERVER: u8 = 2;
    /// The connection was open before the daemon: its start was never seen, offset 0 of each
    /// direction is the first byte the daemon saw, and decoding must find a message start.
    pub const MID_STREAM: u8 = 4;
}

/// `CloseRecord::flags`.
pub mod close_flags {
    /// `end[Ingress]` is the exact length of the ingress stream.
    pub const INGRESS_END: u8 = 1;
    /// `end[Egress]` is the exact length of the egress stream.
    pub const EGRESS_END: u8 = 2;
    /// Not a close: the connection's replies turned out not to be RESP (memcached, POP3 …), and
    /// nothing more is recorded for it. What was recorded is not Redis traffic.
    pub const NOT_RESP: u8 = 4;
}

/// `IPPROTO_*`/address families as the records carry them.
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// Sent once per tracked connection, before any of its data: who owns it and its addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OpenRecord {
    pub kind: u8,
    pub flags: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`] (IPv4-mapped sockets send IPv4 packets).
    pub family: u8,
    pub _pad: u8,
    /// The owning process (the one that connected, or listened for an accepted socket); 0 when
    /// unknown (the socket predates the daemon).
    pub tgid: u32,
    pub cookie: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// The socket's cgroup v2 id (the creating process's cgroup).
    pub cgroup_id: u64,
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad2: u32,
    /// IPv4 in the first 4 bytes, or IPv6.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// The owner's `comm` (zeros when unknown).
    pub comm: [u8; 16],
}

/// The header of a data record; `copied` payload bytes follow it in the same record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DataHeader {
    pub kind: u8,
    /// [`Direction`].
    pub direction: u8,
    /// [`data_flags`].
    pub flags: u8,
    pub _pad: u8,
    /// Stream bytes this record covers, starting at `seq`: exact, whether copied or not.
    pub len: u32,
    pub cookie: u64,
    /// When the packet passed the socket's cgroup hook (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Stream offset of the first byte, modulo 2^32 (its TCP sequence number minus the
    /// direction's initial one).
    pub seq: u32,
    /// Bytes of the record's room that hold payload; the rest of the record is padding.
    pub copied: u32,
}

/// `DataHeader::flags`.
pub mod data_flags {
    /// The record starts a packet (pieces after the first of a large packet do not): where a
    /// decoder that lost its place may look for a message start.
    pub const PACKET_START: u8 = 1;
}

/// The end of a tracked connection (or the verdict that it is not RESP after all).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CloseRecord {
    pub kind: u8,
    /// [`close_flags`].
    pub flags: u8,
    pub _pad: [u8; 6],
    pub cookie: u64,
    pub ts_ns: u64,
    /// Stream length modulo 2^32 per [`Direction`], where the flags say it is known: bytes
    /// past the last delivered ones up to here were lost.
    pub end: [u32; 2],
}

/// Why something could not be delivered; index into the kernel's per-CPU counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// A data record did not fit in the ring: its bytes are a hole in the stream (the daemon
    /// finds it, exactly, from sequence numbers).
    RingFull = 0,
    /// An open record did not fit: the connection's data waits until one does.
    OpenLost = 1,
    /// A close record fit neither in the ring nor in the overflow map: the daemon ends that
    /// connection when its process is gone.
    CloseLost = 2,
    /// Per-socket state could not be allocated: the socket is not looked at.
    StorageFailed = 3,
    /// A tracked connection's packet whose headers could not be read (IPv6 extension headers);
    /// its bytes are a hole in the stream.
    Unparsed = 4,
}

pub const LOSS_REASONS: u32 = 5;

impl LossReason {
    pub const ALL: [LossReason; LOSS_REASONS as usize] = [
        LossReason::RingFull,
        LossReason::OpenLost,
        LossReason::CloseLost,
        LossReason::StorageFailed,
        LossReason::Unparsed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            LossReason::RingFull => "ring_full",
            LossReason::OpenLost => "open_lost",
            LossReason::CloseLost => "close_lost",
            LossReason::StorageFailed => "storage_failed",
            LossReason::Unparsed => "unparsed",
        }
    }
}

/// Per-CPU counters kept after the loss reasons, in the same array.
pub mod kernel_counter {
    /// Payload bytes of the data records lost to a full ring.
    pub const RING_FULL_BYTES: u32 = super::LOSS_REASONS;
    /// Close records that went to the overflow map (not lost: the daemon polls it).
    pub const CLOSE_DEFERRED: u32 = super::LOSS_REASONS + 1;
    /// Entries of the counter array.
    pub const COUNT: u32 = super::LOSS_REASONS + 2;
}

/// What the head of a request stream says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Resp,
    NotResp,
    /// Too few bytes to tell; more of the head is needed.
    NeedMore,
}

/// Whether the first `len` bytes of a client's request stream are a RESP command: a multibulk
/// header (`*<n>\r\n$`) or an inline command (a word of letters followed by a space or CRLF,
/// whose next word does not start with `/` or `*`, so HTTP request lines and the HTTP/2
/// preface `PRI * HTTP/2.0` are refused).
#[inline(always)]
pub fn request_head(peek: &[u8; CLASSIFY_PEEK], len: usize) -> Verdict {
    if len == 0 {
        return Verdict::NeedMore;
    }
    match peek[0] {
        b'*' => multibulk_head(peek, len),
        b'A'..=b'Z' | b'a'..=b'z' => inline_head(peek, len),
        _ => Verdict::NotResp,
    }
}

#[inline(always)]
fn multibulk_head(peek: &[u8; CLASSIFY_PEEK], len: usize) -> Verdict {
    let mut i = 1;
    while i < len && i < CLASSIFY_PEEK && peek[i].is_ascii_digit() {
        i += 1;
    }
    if i == 1 {
        return if len == 1 {
            Verdict::NeedMore
        } else {
            Verdict::NotResp
        };
    }
    // `*<digits>\r\n$` (an empty array `*0\r\n` is no command either way).
    let expect = [b'\r', b'\n', b'$'];
    let mut k = 0;
    while k < expect.len() {
        let at = i + k;
        if at >= len || at >= CLASSIFY_PEEK {
            return if at >= CLASSIFY_PEEK {
                Verdict::NotResp
            } else {
                Verdict::NeedMore
            };
        }
        if peek[at] != expect[k] {
            return Verdict::NotResp;
        }
        k += 1;
    }
    Verdict::Resp
}

#[inline(always)]
fn inline_head(peek: &[u8; CLASSIFY_PEEK], len: usize) -> Verdict {
    let mut i = 1;
    while i < len && i < CLASSIFY_PEEK && peek[i].is_ascii_alphabetic() {
        i += 1;
    }
    if i >= CLASSIFY_PEEK {
        // No Redis command name is this long.
        return Verdict::NotResp;
    }
    if i >= len {
        return Verdict::NeedMore;
    }
    match peek[i] {
        b'\r' => {
            if i + 1 >= len {
                Verdict::NeedMore
            } else if peek[i + 1] == b'\n' {
                Verdict::Resp
            } else {
                Verdict::NotResp
            }
        }
        b' ' => {
            if i + 1 >= len {
                Verdict::NeedMore
            } else if peek[i + 1] == b'/' || peek[i + 1] == b'*' {
                Verdict::NotResp
            } else {
                Verdict::Resp
            }
        }
        _ => Verdict::NotResp,
    }
}

/// Whether `len` bytes (at least one) that start a server's reply stream, or any packet of a
/// connection joined mid-stream, start like a RESP value: a type byte followed by what that type
/// must look like.
#[inline(always)]
pub fn reply_head(peek: &[u8; CLASSIFY_PEEK], len: usize) -> bool {
    if len == 0 {
        return false;
    }
    match peek[0] {
        // Aggregates and lengths: one or more digits (or -1), then CRLF.
        b'*' | b'$' | b'%' | b'~' | b'>' | b'|' | b'=' | b'!' | b':' | b'(' => {
            digits_then_crlf(peek, len)
        }
        b'_' => len < 2 || peek[1] == b'\r',
        b'#' => len < 2 || peek[1] == b't' || peek[1] == b'f',
        // Simple strings and errors: any text up to CRLF. Redis echoes its callers' bytes in
        // them (`redis.status_reply`, `redis.error_reply('lower case')`, unknown command names),
        // so a stricter check would let a client hide its connection with its first command.
        b'+' | b'-' => text_line(peek, len),
        b',' => printable_line(peek, len),
        _ => false,
    }
}

/// Whether a packet of a connection joined mid-stream starts like a whole RESP message: its
/// first line complete within the peek (`*3\r\n$3`, `$5\r\n`, `:12\r\n`, `+OK\r\n`,
/// `-ERR …`, `_\r\n` …). Stricter than the head checks, because the packet may start anywhere
/// in a value and bulk streams of other protocols carry every byte pattern: chance data passes
/// with a probability below 1e-9 per packet.
#[inline(always)]
pub fn mid_stream_head(peek: &[u8; CLASSIFY_PEEK], len: usize) -> bool {
    if len < 3 {
        return false;
    }
    match peek[0] {
        b'*' | b'%' | b'~' | b'>' | b'|' => match number_line_end(peek, len) {
            // An aggregate's first element must start right after its header.
            Some(end) => end < len && is_type_start(peek[end]),
            None => false,
        },
        b'$' | b':' | b'=' | b'!' | b'(' => number_line_end(peek, len).is_some(),
        b'_' => peek[1] == b'\r' && peek[2] == b'\n',
        b'#' => {
            len >= 4 && (peek[1] == b't' || peek[1] == b'f') && peek[2] == b'\r' && peek[3] == b'\n'
        }
        b'+' | b',' => text_line_complete(peek, len),
        b'-' => peek[1].is_ascii_uppercase() && text_line_complete(peek, len),
        _ => false,
    }
}

#[inline(always)]
fn is_type_start(byte: u8) -> bool {
    matches!(
        byte,
        b'$' | b'*' | b':' | b'+' | b'-' | b'_' | b'#' | b',' | b'(' | b'=' | b'!' | b'%' | b'~'
    )
}

/// After a type byte, `-?digits\r\n` within the peek: the offset just past the LF.
#[inline(always)]
fn number_line_end(peek: &[u8; CLASSIFY_PEEK], len: usize) -> Option<usize> {
    let mut i = 1;
    if peek[i] == b'-' {
        i += 1;
    }
    let first_digit = i;
    while i < len && i < CLASSIFY_PEEK && peek[i].is_ascii_digit() {
        i += 1;
    }
    if i == first_digit || i + 1 >= len || i + 1 >= CLASSIFY_PEEK {
        return None;
    }
    (peek[i] == b'\r' && peek[i + 1] == b'\n').then_some(i + 2)
}

/// Printable text to a CRLF within the peek.
#[inline(always)]
fn text_line_complete(peek: &[u8; CLASSIFY_PEEK], len: usize) -> bool {
    let mut i = 1;
    while i + 1 < len && i + 1 < CLASSIFY_PEEK {
        let byte = peek[i];
        if byte == b'\r' {
            return i > 1 && peek[i + 1] == b'\n';
        }
        if !(0x20..0x7f).contains(&byte) {
            return false;
        }
        i += 1;
    }
    false
}

/// Up to the first CR: no line feed and no NUL (Redis builds these lines as C strings).
#[inline(always)]
fn text_line(peek: &[u8; CLASSIFY_PEEK], len: usize) -> bool {
    let mut i = 1;
    while i < len && i < CLASSIFY_PEEK {
        match peek[i] {
            b'\r' => return i + 1 >= len || i + 1 >= CLASSIFY_PEEK || peek[i + 1] == b'\n',
            b'\n' | 0 => return false,
            _ => {}
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn digits_then_crlf(peek: &[u8; CLASSIFY_PEEK], len: usize) -> bool {
    let mut i = 1;
    if i < len && peek[i] == b'-' {
        i += 1;
    }
    let first_digit = i;
    while i < len && i < CLASSIFY_PEEK && peek[i].is_ascii_digit() {
        i += 1;
    }
    if i == first_digit {
        // Nothing after the type byte yet is plausible; anything else is not.
        return i >= len;
    }
    // A length that runs past what was seen is plausible; otherwise CR must follow the digits.
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
    // SAFETY: plain `#[repr(C)]` integers and byte arrays, valid for any bits.
    unsafe impl aya::Pod for super::CloseRecord {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peek(bytes: &[u8]) -> ([u8; CLASSIFY_PEEK], usize) {
        let mut buf = [0u8; CLASSIFY_PEEK];
        let n = bytes.len().min(CLASSIFY_PEEK);
        buf[..n].copy_from_slice(&bytes[..n]);
        (buf, n)
    }

    fn request(bytes: &[u8]) -> Verdict {
        let (buf, n) = peek(bytes);
        request_head(&buf, n)
    }

    fn reply(bytes: &[u8]) -> bool {
        let (buf, n) = peek(bytes);
        reply_head(&buf, n)
    }

    fn mid(bytes: &[u8]) -> bool {
        let (buf, n) = peek(bytes);
        mid_stream_head(&buf, n)
    }

    #[test]
    fn requests_redis_clients_send() {
        assert_eq!(request(b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n"), Verdict::Resp);
        assert_eq!(request(b"*1\r\n$4\r\nPING\r\n"), Verdict::Resp);
        assert_eq!(request(b"*12345\r\n$3\r\nDEL"), Verdict::Resp);
        assert_eq!(request(b"PING\r\n"), Verdict::Resp);
        assert_eq!(request(b"SET user:1000 hello\r\n"), Verdict::Resp);
        assert_eq!(
            request(b"get k\r\n"),
            Verdict::Resp,
            "memcached looks the same"
        );
    }

    #[test]
    fn tiny_pieces_ask_for_more_instead_of_deciding() {
        for head in [
            &b""[..],
            b"*",
            b"*3",
            b"*3\r",
            b"*3\r\n",
            b"PIN",
            b"PING",
            b"PING\r",
            b"GET",
        ] {
            assert_eq!(request(head), Verdict::NeedMore, "{head:?}");
        }
    }

    #[test]
    fn requests_of_other_protocols_are_refused() {
        assert_eq!(request(b"GET / HTTP/1.1\r\nHost: x\r\n"), Verdict::NotResp);
        assert_eq!(request(b"POST /api HTTP/1.1\r\n"), Verdict::NotResp);
        assert_eq!(
            request(b"PRI * HTTP/2.0\r\n\r\nSM"),
            Verdict::NotResp,
            "gRPC"
        );
        assert_eq!(
            request(b"\x16\x03\x01\x02\x00\x01\x00"),
            Verdict::NotResp,
            "TLS"
        );
        assert_eq!(request(b"*\r\n"), Verdict::NotResp);
        assert_eq!(request(b"*3\r\n:1\r\n"), Verdict::NotResp);
        assert_eq!(
            request(b"+OK\r\n"),
            Verdict::NotResp,
            "a reply is no request"
        );
        assert_eq!(request(b"hello\n"), Verdict::NotResp);
        assert_eq!(request(b"abcdefghijklmnopq"), Verdict::NotResp);
        assert_eq!(request(b"\x00\x00\x00\x10"), Verdict::NotResp);
    }

    #[test]
    fn replies_redis_servers_send() {
        for head in [
            &b"+OK\r\n"[..],
            b"-WRONGTYPE Operation against a key",
            b"-ERR unknown command",
            b"$-1\r\n",
            b"$100000\r\nxxxxxxx",
            b":1\r\n",
            b"*2\r\n$3\r\nfoo",
            b"%7\r\n$6\r\nserver",
            b">3\r\n$7\r\nmessage",
            b"_\r\n",
            b"#t\r\n",
            b",3.14\r\n",
            b"(12345678901234567890\r\n",
            b"+",
            b"$",
            // What Redis echoes of its callers: scripts' replies, unknown command names.
            b"-err lower",
            b"-lower case\r\n",
            b"+\x1b[2J\r\n",
            b"-ERR \x1b[31mred",
            b"+\r\n",
            b"-\x01\x02",
        ] {
            assert!(reply(head), "{head:?}");
        }
    }

    #[test]
    fn replies_of_other_protocols_are_refused() {
        for head in [
            &b"VALUE k 0 1\r\n"[..],
            b"END\r\n",
            b"STORED\r\n",
            b"HTTP/1.1 200 OK\r\n",
            b"220 mail.example.com ESMTP",
            b"INFO {\"server_id\"",
            b"+\x00\x01\x02",
            b"-ERR\nmore",
            b"+OK\rX",
            b"*abc\r\n",
        ] {
            assert!(!reply(head), "{head:?}");
        }
    }

    #[test]
    fn mid_stream_needs_a_whole_looking_message_start() {
        for head in [
            &b"*3\r\n$3\r\nSET\r\n"[..],
            b"+OK\r\n",
            b"$5\r\nhello\r\n",
            b"$-1\r\n",
            b":1\r\n",
            b"-ERR no\r\n",
            b"_\r\n",
            b"#t\r\n",
            b"%2\r\n$6\r\nserver",
        ] {
            assert!(mid(head), "{head:?}");
        }
        for head in [
            &b"xxxxxxxxxxxx"[..],
            b"PING\r\n",
            b"+OK",
            b"+OK\r",
            b"hello world\r\n",
            b"*3\r\nabc",
            b"$12",
            b"_\r",
            b"#x\r\n",
            b"-err lower case",
            b"+\x00\x01",
            b"+ a line of a diff that goes on",
        ] {
            assert!(!mid(head), "{head:?}");
        }
    }

    /// Random bytes (a bulk stream of another protocol) almost never pass the mid-stream check:
    /// out of 2^22 random packet heads, none should.
    #[test]
    fn random_bytes_do_not_pass_for_a_message_start() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut passed = 0;
        for _ in 0..(1 << 22) {
            let mut head = [0u8; CLASSIFY_PEEK];
            for byte in &mut head {
                // xorshift64*
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                *byte = (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8;
            }
            passed += usize::from(mid_stream_head(&head, CLASSIFY_PEEK));
        }
        assert_eq!(passed, 0);
    }
}
