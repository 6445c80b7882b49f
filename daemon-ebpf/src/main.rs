//! Packet-layer capture: `cgroup_skb` programs on the cgroup v2 root see every TCP packet of
//! every process; a `sockops` program learns who owns each connection and where its streams
//! start and end. No syscall tracepoint is involved, so processes that do no TCP pay nothing.
//!
//! Per socket, state lives in socket-local storage (freed with the socket; cloned from a
//! listener to the sockets it accepts). A connection whose request stream starts like RESP is
//! tracked: its payload is copied whole to a record ring with the stream offset of its first
//! byte (TCP sequence number minus the initial one), so user space orders, de-duplicates and
//! finds holes exactly. One that is not RESP is ignored for good: its later packets cost a
//! storage lookup. Every path returns 1: a packet is never dropped or delayed, whatever fails;
//! what could not be delivered is counted in `LOSSES`.
//!
//! Needs (minimum kernel 5.10): cgroup v2, `cgroup_skb` and `sockops` programs, BPF ring
//! buffers (5.8), socket-local storage with `BPF_F_CLONE` (5.4), `bpf_sock_ops.sk` (5.10),
//! `bpf_get_current_pid_tgid` and `bpf_get_current_comm` in `sockops` (callable there on the
//! kernels this was tested on).
#![no_std]
#![no_main]

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_F_CLONE, BPF_F_NO_PREALLOC, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, bpf_map_type, bpf_sock, bpf_sock_ops,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{
            bpf_get_smp_processor_id, bpf_get_socket_cookie, bpf_sk_fullsock, bpf_sk_storage_get,
            bpf_skb_cgroup_id, bpf_skb_load_bytes,
        },
    },
    macros::{cgroup_skb, map, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
    programs::{SkBuffContext, SockOpsContext},
};
use respwatch_common::{
    CLASSIFY_PEEK, CloseRecord, DATA_PIECE, DataHeader, Direction, FAMILY_IPV4, FAMILY_IPV6,
    LossReason, MAX_PIECES, MID_STREAM_PROBE_BYTES, OpenRecord, RING_MAPS, Verdict, close_flags,
    data_flags, kernel_counter, mid_stream_head, open_flags, record_kind, reply_head, request_head,
};

// ---- configuration the loader sets ---------------------------------------------------------

/// The daemon's own process: sockets it connects or listens on are ignored from the start.
#[unsafe(no_mangle)]
static SELF_TGID: u32 = 0;

/// How many record rings are in use (one per CPU, up to [`RING_MAPS`]).
#[unsafe(no_mangle)]
static RINGS: u32 = 1;

/// Each CPU wakes the reader once it has written this many bytes since its last wakeup; below
/// that the reader drains on a short timer. A wakeup per record costs an IRQ work item and a
/// context switch per packet.
#[unsafe(no_mangle)]
static WAKEUP_BYTES_PER_CPU: u64 = 0;

/// Non-zero when the daemon observes only some namespaces (`--namespaces`): sockets in the
/// cgroups of [`OUT_OF_SCOPE`] are then ignored.
#[unsafe(no_mangle)]
static SCOPED: u8 = 0;

fn config<T: Copy>(value: &T) -> T {
    // SAFETY: a global the loader sets before the programs run; volatile so that it is not
    // folded to its compile-time value.
    unsafe { ptr::read_volatile(value) }
}

// ---- maps ----------------------------------------------------------------------------------

/// Records to user space. Each CPU writes to its own ring (`cpu % RINGS`): a ring shared by
/// two CPUs costs every record a contended lock. Order across rings is restored by user space
/// from timestamps, and within a stream from sequence numbers.
#[map]
static RECORDS_0: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
static RECORDS_1: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
static RECORDS_2: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
static RECORDS_3: RingBuf = RingBuf::with_byte_size(4096, 0);

/// Open and close records ride a ring of their own, shared by all CPUs (a few records per
/// connection): a burst of data that fills the data rings can never cost a connection its owner
/// or its end, so per-connection loss accounting stays exact however much data is lost.
#[map]
static CONTROL: RingBuf = RingBuf::with_byte_size(4096, 0);

/// Per-CPU counters: [`LossReason`]s, then [`kernel_counter`]s.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(kernel_counter::COUNT, 0);

/// Bytes each CPU wrote to its ring since it last woke the reader.
#[map]
static UNWOKEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Cgroups (v2 ids) user space found outside `--namespaces` (host processes, pods of other
/// namespaces): their sockets are ignored.
#[map]
static OUT_OF_SCOPE: HashMap<u64, u8> = HashMap::with_max_entries(16384, 0);

/// Connections joined mid-stream that the daemon's decoder found not to be RESP after all
/// (chance bytes of another protocol looked like a message start): ignored from their next
/// packet on. Only connections of unknown start are looked up here.
#[map]
static UNTRACK: LruHashMap<u64, u8> = LruHashMap::with_max_entries(4096, 0);

/// Close records that did not fit in a ring, by socket cookie; user space polls and empties it.
#[map]
static LATE_CLOSES: HashMap<u64, CloseRecord> = HashMap::with_max_entries(16384, 0);

/// A socket-local storage map whose values are copied to the sockets a listener accepts
/// (`BPF_F_CLONE`), which aya-ebpf's `SkStorage` cannot ask for. The layout is libbpf's BTF map
/// definition: each field's pointee array length carries one attribute.
#[repr(C)]
struct SockStorage {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SockState,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}

// SAFETY: the fields are placeholders the loader reads from BTF; never dereferenced.
unsafe impl Sync for SockStorage {}

#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "SOCKS")]
static SOCKS: SockStorage = SockStorage {
    r#type: ptr::null(),
    key: ptr::null(),
    value: ptr::null(),
    max_entries: ptr::null(),
    map_flags: ptr::null(),
};

// ---- per-socket state ------------------------------------------------------------------------

/// `SockState::status`.
const UNCLASSIFIED: u8 = 0;
const TRACKED: u8 = 1;
const IGNORED: u8 = 2;

/// `SockState::flags`.
const KNOWN_START: u8 = 1;
const CLIENT: u8 = 2;
const SERVER: u8 = 4;
const BASE_INGRESS: u8 = 8;
const BASE_EGRESS: u8 = 16;
const OPEN_SENT: u8 = 32;
const REPLY_CHECKED: u8 = 64;
const CLOSED: u8 = 128;

/// `SockState::fins`: FIN seen per direction. A connection ends when both ends sent theirs, or
/// at a reset. (A socket-state callback would also see sockets torn down without a packet, but
/// it runs for every state change of every TCP socket on the node; the daemon ends those
/// connections when their process is gone.)
const FIN_INGRESS: u8 = 1;
const FIN_EGRESS: u8 = 2;

#[repr(C)]
struct SockState {
    /// Sequence number of stream offset 0 per [`Direction`] (valid with the BASE_* flags).
    base: [u32; 2],
    /// End offset of the furthest byte seen per direction: the stream length at close.
    high: [u32; 2],
    /// Payload bytes seen while undecided (connections of unknown start).
    probed: u32,
    /// The owner: the process that connected, or that listened (copied to accepted sockets).
    tgid: u32,
    comm: [u8; 16],
    /// The first bytes of the request stream, collected until they decide; twice the peek so
    /// that a variable write position stays provably inside.
    head: [u8; 2 * CLASSIFY_PEEK],
    status: u8,
    flags: u8,
    fins: u8,
    head_len: u8,
}

fn base_flag(dir: Direction) -> u8 {
    match dir {
        Direction::Ingress => BASE_INGRESS,
        Direction::Egress => BASE_EGRESS,
    }
}

/// The socket's state, created zeroed (unclassified, owner and start unknown) if asked.
fn storage(sk: *mut bpf_sock, create: bool) -> Option<&'static mut SockState> {
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: `sk` is a socket pointer the verifier knows to be non-null; the map is the
    // socket-storage map above.
    let state = unsafe {
        bpf_sk_storage_get(
            ptr::addr_of!(SOCKS).cast_mut().cast(),
            sk.cast(),
            ptr::null_mut(),
            flags,
        )
    }
    .cast::<SockState>();
    // SAFETY: storage memory lives as long as the socket, beyond this program run.
    unsafe { state.as_mut() }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects programs that could reach a panic; none is reachable.
    unsafe { core::hint::unreachable_unchecked() }
}

fn count(index: u32, amount: u64) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *counter += amount };
    }
}

fn count_loss(reason: LossReason) {
    count(reason as u32, 1);
}

fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

// ---- ring output -----------------------------------------------------------------------------

fn ring() -> u32 {
    // SAFETY: plain helper call.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    cpu % config(&RINGS).clamp(1, RING_MAPS)
}

/// Ring flags for a record of `size` bytes: wake the reader once this CPU has written
/// `WAKEUP_BYTES_PER_CPU` bytes since it last did.
fn wakeup(size: u64) -> u64 {
    let Some(unwoken) = UNWOKEN.get_ptr_mut(0) else {
        return u64::from(BPF_RB_FORCE_WAKEUP);
    };
    // SAFETY: per-CPU slot, only this CPU writes it.
    unsafe {
        *unwoken += size;
        if *unwoken >= config(&WAKEUP_BYTES_PER_CPU) {
            *unwoken = 0;
            u64::from(BPF_RB_FORCE_WAKEUP)
        } else {
            u64::from(BPF_RB_NO_WAKEUP)
        }
    }
}

#[inline(always)]
fn reserve<T: 'static>(ring: u32) -> Option<RingBufEntry<T>> {
    match ring {
        0 => RECORDS_0.reserve::<T>(0),
        1 => RECORDS_1.reserve::<T>(0),
        2 => RECORDS_2.reserve::<T>(0),
        _ => RECORDS_3.reserve::<T>(0),
    }
}

/// Writes an open or close record to the control ring.
#[inline(always)]
fn output_control<T: Copy + 'static>(record: &T) -> bool {
    let Some(mut entry) = CONTROL.reserve::<T>(0) else {
        return false;
    };
    entry.write(*record);
    entry.submit(wakeup(size_of::<T>() as u64));
    true
}

#[repr(C)]
struct DataRecord<const N: usize> {
    header: DataHeader,
    payload: [u8; N],
}

/// Copies `copy` payload bytes (1 ≤ copy ≤ N) at `offset` of the packet into a record with
/// room for N. Room is reserved in fixed sizes because the ring only reserves constant sizes.
#[inline(always)]
fn data_record<const N: usize>(skb: *mut __sk_buff, header: &DataHeader, offset: u32) -> bool {
    let Some(mut entry) = reserve::<DataRecord<N>>(ring()) else {
        return false;
    };
    let record = entry.as_mut_ptr();
    // Provably 1..=N for the verifier; equal to `copy` for the callers' 1 ≤ copy ≤ N.
    let len = ((header.copied.wrapping_sub(1)) & (N as u32 - 1)) + 1;
    // SAFETY: `record` is the reserved entry, N bytes of payload room after the header.
    unsafe {
        (*record).header = *header;
        let loaded = bpf_skb_load_bytes(
            skb.cast(),
            offset,
            ptr::addr_of_mut!((*record).payload).cast(),
            len,
        );
        if loaded != 0 {
            (*record).header.copied = 0;
        }
    }
    entry.submit(wakeup((size_of::<DataHeader>() + N) as u64));
    true
}

/// Sends `header` with `header.copied` bytes of payload from `offset`, in the smallest room
/// class that holds them.
#[inline(always)]
fn send_data(skb: *mut __sk_buff, header: &DataHeader, offset: u32) -> bool {
    match header.copied {
        0..=64 => data_record::<64>(skb, header, offset),
        65..=128 => data_record::<128>(skb, header, offset),
        129..=256 => data_record::<256>(skb, header, offset),
        257..=512 => data_record::<512>(skb, header, offset),
        513..=1024 => data_record::<1024>(skb, header, offset),
        1025..=2048 => data_record::<2048>(skb, header, offset),
        2049..=4096 => data_record::<4096>(skb, header, offset),
        4097..=8192 => data_record::<8192>(skb, header, offset),
        _ => data_record::<16384>(skb, header, offset),
    }
}

/// The head bytes collected in socket storage, sent as the stream's first record.
fn send_head(state: &SockState, cookie: u64, dir: Direction, ts_ns: u64) -> bool {
    let Some(mut entry) = reserve::<DataRecord<CLASSIFY_PEEK>>(ring()) else {
        return false;
    };
    let record = entry.as_mut_ptr();
    let len = u32::from(state.head_len);
    // SAFETY: `record` is the reserved entry.
    unsafe {
        (*record).header = DataHeader {
            kind: record_kind::DATA,
            direction: dir as u8,
            flags: data_flags::PACKET_START,
            _pad: 0,
            len,
            cookie,
            ts_ns,
            seq: 0,
            copied: len,
        };
        let mut i = 0;
        while i < CLASSIFY_PEEK {
            (*record).payload[i] = state.head[i];
            i += 1;
        }
    }
    entry.submit(wakeup((size_of::<DataHeader>() + CLASSIFY_PEEK) as u64));
    true
}

// ---- packets ---------------------------------------------------------------------------------

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len: u16,
    id: u16,
    frag: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    version_class_flow: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHeader {
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    offset_reserved: u8,
    flags: u8,
    window: u16,
    check: u16,
    urgent: u16,
}

/// What the cgroup hook needs of a TCP packet.
struct Packet {
    seq: u32,
    payload_offset: u32,
    payload_len: u32,
    tcp_flags: u8,
    family: u8,
    src_port: u16,
    dst_port: u16,
    src: [u8; 16],
    dst: [u8; 16],
}

fn load<T: Copy>(skb: *mut __sk_buff, offset: u32) -> Option<T> {
    let mut value = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: the helper writes exactly size_of::<T>() bytes or fails.
    let ret = unsafe {
        bpf_skb_load_bytes(
            skb.cast(),
            offset,
            value.as_mut_ptr().cast(),
            size_of::<T>() as u32,
        )
    };
    // SAFETY: initialised by the successful helper call.
    (ret == 0).then(|| unsafe { value.assume_init() })
}

/// Parses the IP and TCP headers (the packet starts at the network header in cgroup hooks).
/// `None` for anything but TCP over IPv4 or IPv6 without extension headers.
fn parse(skb: *mut __sk_buff) -> Option<Packet> {
    // SAFETY: context fields the verifier allows cgroup_skb programs to read.
    let (protocol, len) = unsafe { (u16::from_be((*skb).protocol as u16), (*skb).len) };
    let (ip_len, family, src, dst) = match protocol {
        ETH_P_IP => {
            let ip: Ipv4Header = load(skb, 0)?;
            if ip.protocol != IPPROTO_TCP {
                return None;
            }
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src[..4].copy_from_slice(&ip.src);
            dst[..4].copy_from_slice(&ip.dst);
            (u32::from(ip.version_ihl & 0x0f) * 4, FAMILY_IPV4, src, dst)
        }
        ETH_P_IPV6 => {
            let ip: Ipv6Header = load(skb, 0)?;
            if ip.next_header != IPPROTO_TCP {
                return None;
            }
            (40, FAMILY_IPV6, ip.src, ip.dst)
        }
        _ => return None,
    };
    let tcp: TcpHeader = load(skb, ip_len)?;
    let payload_offset = ip_len + u32::from(tcp.offset_reserved >> 4) * 4;
    Some(Packet {
        seq: u32::from_be(tcp.seq),
        payload_offset,
        payload_len: len.saturating_sub(payload_offset),
        tcp_flags: tcp.flags,
        family,
        src_port: u16::from_be(tcp.src_port),
        dst_port: u16::from_be(tcp.dst_port),
        src,
        dst,
    })
}

#[cgroup_skb(ingress)]
pub fn ingress(ctx: SkBuffContext) -> i32 {
    on_packet(ctx.skb.skb, Direction::Ingress);
    1
}

#[cgroup_skb(egress)]
pub fn egress(ctx: SkBuffContext) -> i32 {
    on_packet(ctx.skb.skb, Direction::Egress);
    1
}

fn on_packet(skb: *mut __sk_buff, dir: Direction) {
    // SAFETY: `sk` of a cgroup_skb context: a socket pointer or null.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: non-null socket pointer from the context.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return;
    }
    // SAFETY: a full socket the verifier checked.
    if unsafe { (*sk).protocol } != u32::from(IPPROTO_TCP) {
        return;
    }
    let known = storage(sk, false);
    if let Some(state) = &known
        && state.status == IGNORED
    {
        return;
    }
    let Some(packet) = parse(skb) else {
        if let Some(state) = &known
            && state.status == TRACKED
        {
            count_loss(LossReason::Unparsed);
        }
        return;
    };
    if packet.payload_len == 0 && packet.tcp_flags & (TCP_FIN | TCP_RST) == 0 {
        return;
    }
    let state = match known {
        Some(state) => state,
        None if packet.payload_len == 0 => return,
        // A socket that connected or listened before the daemon: start and owner unknown.
        None => match storage(sk, true) {
            Some(state) => state,
            None => {
                count_loss(LossReason::StorageFailed);
                return;
            }
        },
    };
    if config(&SCOPED) != 0 {
        // SAFETY: plain helper call on the context, then a read-only map lookup.
        let cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
        // SAFETY: read-only map lookup.
        if unsafe { OUT_OF_SCOPE.get(&cgroup_id) }.is_some() {
            if state.status == TRACKED {
                close(skb.cast(), state, 0);
            }
            state.status = IGNORED;
            return;
        }
    }
    if packet.payload_len > 0 {
        match state.status {
            TRACKED => track(skb, state, dir, &packet),
            UNCLASSIFIED if state.flags & KNOWN_START != 0 => {
                classify_head(skb, state, dir, &packet)
            }
            UNCLASSIFIED => classify_mid_stream(skb, state, dir, &packet),
            _ => {}
        }
    }
    // Tracked, or sent ahead of its head while still unclassified.
    if state.status == TRACKED || state.status == UNCLASSIFIED && state.flags & OPEN_SENT != 0 {
        if packet.tcp_flags & TCP_FIN != 0 {
            state.fins |= match dir {
                Direction::Ingress => FIN_INGRESS,
                Direction::Egress => FIN_EGRESS,
            };
        }
        if packet.tcp_flags & TCP_RST != 0 || state.fins == FIN_INGRESS | FIN_EGRESS {
            // Never classified: what was sent ahead is withdrawn, not counted as lost.
            let extra = if state.status == TRACKED {
                0
            } else {
                close_flags::NOT_RESP
            };
            close(skb.cast(), state, extra);
        }
    }
}

/// Stream offset (mod 2^32) of the packet's first payload byte, noting the furthest byte seen;
/// a direction of a mid-stream connection starts at its first packet seen.
fn offset_of(state: &mut SockState, dir: Direction, packet: &Packet) -> u32 {
    let d = dir as usize;
    if state.flags & base_flag(dir) == 0 {
        state.base[d] = packet.seq;
        state.flags |= base_flag(dir);
    }
    let offset = packet.seq.wrapping_sub(state.base[d]);
    let end = offset.wrapping_add(packet.payload_len);
    if (end.wrapping_sub(state.high[d]) as i32) > 0 {
        state.high[d] = end;
    }
    offset
}

/// The first bytes of a connection whose start was seen: the client speaks first, and its
/// first bytes must be a command.
fn classify_head(skb: *mut __sk_buff, state: &mut SockState, dir: Direction, packet: &Packet) {
    let request_dir = if state.flags & CLIENT != 0 {
        Direction::Egress
    } else {
        Direction::Ingress
    };
    if dir != request_dir {
        // The server spoke before the client's command was complete (SMTP, POP3, NATS …).
        ignore(skb, state);
        return;
    }
    let offset = offset_of(state, dir, packet);
    let have = u32::from(state.head_len);
    if offset > have {
        // Out of order ahead of the head: the head was lost on the way and comes again, but
        // these bytes pass the socket only now. Sent ahead, held by user space until the head
        // decides; withdrawn (a not-RESP close) if it says no.
        if open(skb, state, packet, dir) {
            deliver(skb, dir, packet, offset, cookie_of(skb.cast()));
        }
        return;
    }
    if offset.wrapping_add(packet.payload_len) <= have {
        // A retransmission of head bytes already collected.
        return;
    }
    let skip = have - offset;
    let mut take = packet.payload_len - skip;
    if take > CLASSIFY_PEEK as u32 - have {
        take = CLASSIFY_PEEK as u32 - have;
    }
    if take == 0 {
        return;
    }
    let at = (have as usize) & (CLASSIFY_PEEK - 1);
    let n = ((take - 1) & (CLASSIFY_PEEK as u32 - 1)) + 1;
    // SAFETY: `at + n` ≤ 2 × CLASSIFY_PEEK, the size of `head`.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            skb.cast(),
            packet.payload_offset + skip,
            state.head.as_mut_ptr().add(at).cast(),
            n,
        )
    };
    if loaded != 0 {
        return;
    }
    state.head_len = (have + n) as u8;
    let mut peek = [0u8; CLASSIFY_PEEK];
    peek.copy_from_slice(&state.head[..CLASSIFY_PEEK]);
    match request_head(&peek, usize::from(state.head_len)) {
        Verdict::NeedMore => {}
        Verdict::NotResp => ignore(skb, state),
        Verdict::Resp => {
            state.status = TRACKED;
            if !open(skb, state, packet, dir) {
                return;
            }
            let cookie = cookie_of(skb.cast());
            // The head came in earlier packets too: send what this one does not hold.
            if have > 0 && !send_head(state, cookie, dir, now()) {
                lost_data(u64::from(have));
            }
            deliver(skb, dir, packet, offset, cookie);
        }
    }
}

/// Not RESP: later packets cost one lookup. Bytes already sent ahead of its head are
/// withdrawn by a not-RESP close.
fn ignore(skb: *mut __sk_buff, state: &mut SockState) {
    state.status = IGNORED;
    if state.flags & OPEN_SENT != 0 {
        close(skb.cast(), state, close_flags::NOT_RESP);
    }
}

/// A connection joined mid-stream: tracked once a packet starts like a RESP message.
fn classify_mid_stream(
    skb: *mut __sk_buff,
    state: &mut SockState,
    dir: Direction,
    packet: &Packet,
) {
    let mut peek = [0u8; CLASSIFY_PEEK];
    let n = if packet.payload_len < CLASSIFY_PEEK as u32 {
        packet.payload_len
    } else {
        CLASSIFY_PEEK as u32
    };
    let len = ((n.wrapping_sub(1)) & (CLASSIFY_PEEK as u32 - 1)) + 1;
    // SAFETY: `len` ≤ CLASSIFY_PEEK, the size of `peek`.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            skb.cast(),
            packet.payload_offset,
            peek.as_mut_ptr().cast(),
            len,
        )
    };
    if loaded == 0 && mid_stream_head(&peek, len as usize) {
        state.status = TRACKED;
        if open(skb, state, packet, dir) {
            track(skb, state, dir, packet);
        }
        return;
    }
    state.probed = state.probed.saturating_add(packet.payload_len);
    if state.probed > MID_STREAM_PROBE_BYTES {
        state.status = IGNORED;
    }
}

/// A packet of a tracked connection: its payload to the ring, and for a connection whose start
/// was seen, a check of the first reply bytes.
fn track(skb: *mut __sk_buff, state: &mut SockState, dir: Direction, packet: &Packet) {
    let cookie = cookie_of(skb.cast());
    // SAFETY: read-only map lookup.
    if state.flags & KNOWN_START == 0 && unsafe { UNTRACK.get(&cookie) }.is_some() {
        state.status = IGNORED;
        let _ = UNTRACK.remove(&cookie);
        return;
    }
    if state.flags & OPEN_SENT == 0 && !open(skb, state, packet, dir) {
        let _ = offset_of(state, dir, packet);
        return;
    }
    let offset = offset_of(state, dir, packet);
    let reply_dir = if state.flags & CLIENT != 0 {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    if state.flags & (KNOWN_START | REPLY_CHECKED) == KNOWN_START && dir == reply_dir && offset == 0
    {
        state.flags |= REPLY_CHECKED;
        let mut peek = [0u8; CLASSIFY_PEEK];
        let n = if packet.payload_len < CLASSIFY_PEEK as u32 {
            packet.payload_len
        } else {
            CLASSIFY_PEEK as u32
        };
        let len = ((n.wrapping_sub(1)) & (CLASSIFY_PEEK as u32 - 1)) + 1;
        // SAFETY: `len` ≤ CLASSIFY_PEEK, the size of `peek`.
        let loaded = unsafe {
            bpf_skb_load_bytes(
                skb.cast(),
                packet.payload_offset,
                peek.as_mut_ptr().cast(),
                len,
            )
        };
        if loaded == 0 && !reply_head(&peek, len as usize) {
            // A text protocol whose requests look like inline commands (memcached `get k`):
            // its replies give it away.
            close(skb.cast(), state, close_flags::NOT_RESP);
            state.status = IGNORED;
            return;
        }
    }
    deliver(skb, dir, packet, offset, cookie);
}

fn cookie_of(ctx: *mut c_void) -> u64 {
    // SAFETY: a program context the helper accepts (skb or sock_ops).
    unsafe { bpf_get_socket_cookie(ctx) }
}

fn lost_data(bytes: u64) {
    count_loss(LossReason::RingFull);
    count(kernel_counter::RING_FULL_BYTES, bytes);
}

/// The packet's payload at stream `offset`: its first [`DATA_PIECE`] bytes in a record of the
/// smallest room that holds them, the rest (large GSO/GRO packets only) in full-size pieces.
/// Not inlined: three callers would triple the code the verifier walks.
#[inline(never)]
fn deliver(skb: *mut __sk_buff, dir: Direction, packet: &Packet, offset: u32, cookie: u64) {
    let ts_ns = now();
    let first = if packet.payload_len < DATA_PIECE {
        packet.payload_len
    } else {
        DATA_PIECE
    };
    let mut header = DataHeader {
        kind: record_kind::DATA,
        direction: dir as u8,
        flags: data_flags::PACKET_START,
        _pad: 0,
        len: first,
        cookie,
        ts_ns,
        seq: offset,
        copied: first,
    };
    if !send_data(skb, &header, packet.payload_offset) {
        lost_data(u64::from(header.len));
    }
    let mut done = first;
    let mut piece = 1;
    header.flags = 0;
    while piece < MAX_PIECES {
        let rest = packet.payload_len - done;
        if rest == 0 {
            return;
        }
        // The last piece also covers whatever is left, uncopied.
        header.len = if piece + 1 == MAX_PIECES || rest <= DATA_PIECE {
            rest
        } else {
            DATA_PIECE
        };
        header.copied = if rest < DATA_PIECE { rest } else { DATA_PIECE };
        header.seq = offset.wrapping_add(done);
        if !data_record::<{ DATA_PIECE as usize }>(skb, &header, packet.payload_offset + done) {
            lost_data(u64::from(header.len));
        }
        done += header.len;
        piece += 1;
    }
}

/// Sends the connection's open record, once: who owns it and its addresses.
fn open(skb: *mut __sk_buff, state: &mut SockState, packet: &Packet, dir: Direction) -> bool {
    if state.flags & OPEN_SENT != 0 {
        return true;
    }
    let (local, remote, local_port, remote_port) = match dir {
        Direction::Ingress => (packet.dst, packet.src, packet.dst_port, packet.src_port),
        Direction::Egress => (packet.src, packet.dst, packet.src_port, packet.dst_port),
    };
    let mut flags = 0;
    if state.flags & CLIENT != 0 {
        flags |= open_flags::CLIENT;
    }
    if state.flags & SERVER != 0 {
        flags |= open_flags::SERVER;
    }
    if state.flags & KNOWN_START == 0 {
        flags |= open_flags::MID_STREAM;
    }
    let record = OpenRecord {
        kind: record_kind::OPEN,
        flags,
        family: packet.family,
        _pad: 0,
        tgid: state.tgid,
        cookie: cookie_of(skb.cast()),
        ts_ns: now(),
        // SAFETY: plain helper call on the context.
        cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
        local_port,
        remote_port,
        _pad2: 0,
        local_addr: local,
        remote_addr: remote,
        comm: state.comm,
    };
    if output_control(&record) {
        state.flags |= OPEN_SENT;
        true
    } else {
        count_loss(LossReason::OpenLost);
        false
    }
}

/// Tells user space a tracked connection ended (or, with `NOT_RESP`, is no Redis), with each
/// stream's length where its start is known. A record that does not fit in the ring goes to
/// `LATE_CLOSES` instead.
fn close(ctx: *mut c_void, state: &mut SockState, extra: u8) {
    if state.flags & CLOSED != 0 {
        return;
    }
    state.flags |= CLOSED;
    if state.flags & OPEN_SENT == 0 {
        return;
    }
    let mut flags = extra;
    if state.flags & BASE_INGRESS != 0 {
        flags |= close_flags::INGRESS_END;
    }
    if state.flags & BASE_EGRESS != 0 {
        flags |= close_flags::EGRESS_END;
    }
    let record = CloseRecord {
        kind: record_kind::CLOSE,
        flags,
        _pad: [0; 6],
        cookie: cookie_of(ctx),
        ts_ns: now(),
        end: state.high,
    };
    if output_control(&record) {
        return;
    }
    if LATE_CLOSES.insert(&record.cookie, &record, 0).is_ok() {
        count(kernel_counter::CLOSE_DEFERRED, 1);
    } else {
        count_loss(LossReason::CloseLost);
    }
}

// ---- socket events ---------------------------------------------------------------------------

#[sock_ops]
pub fn sock_events(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    // SAFETY: a field of the sock_ops context.
    let op = unsafe { (*ops).op };
    // The kernel calls this for every TCP socket at several more points (RTO and window
    // setup…): they cost one comparison.
    if !matches!(
        op,
        BPF_SOCK_OPS_TCP_CONNECT_CB
            | BPF_SOCK_OPS_TCP_LISTEN_CB
            | BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
            | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
    ) {
        return 1;
    }
    // SAFETY: a field of the sock_ops context; null when the callback has no full socket.
    let sk = unsafe { (*ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return 1;
    }
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB | BPF_SOCK_OPS_TCP_LISTEN_CB => own(sk),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(ops, sk, CLIENT),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => established(ops, sk, SERVER),
        _ => {}
    }
    1
}

/// connect() and listen() run in the owner's context: the one place where `current` is the
/// socket's process for sure. Accepted sockets get their listener's owner by cloning.
fn own(sk: *mut bpf_sock) {
    let Some(state) = storage(sk, true) else {
        count_loss(LossReason::StorageFailed);
        return;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == config(&SELF_TGID) {
        state.status = IGNORED;
        return;
    }
    state.tgid = tgid;
    state.comm = bpf_get_current_comm().unwrap_or([0; 16]);
}

/// The handshake completed: both streams start here.
fn established(ops: *mut bpf_sock_ops, sk: *mut bpf_sock, role: u8) {
    let Some(state) = storage(sk, true) else {
        count_loss(LossReason::StorageFailed);
        return;
    };
    if state.status == IGNORED {
        return;
    }
    // SAFETY: fields of the sock_ops context.
    let (rcv_nxt, snd_nxt) = unsafe { ((*ops).rcv_nxt, (*ops).snd_nxt) };
    state.base = [rcv_nxt, snd_nxt];
    state.high = [0, 0];
    state.flags |= KNOWN_START | role | BASE_INGRESS | BASE_EGRESS;
}
