//! Syscall tracepoints that find RESP connections and copy their bytes to user space.
//!
//! Entry programs save each syscall's arguments per thread; exit programs know how many bytes
//! really moved, classify unknown (tgid, fd) pairs by the first bytes, and emit one record per
//! buffer (per iovec for the vector calls) of tracked connections. Everything that cannot be
//! delivered is counted in `LOSSES`, and lost bytes are reported as a gap on the next record of
//! the same connection and direction, so user space knows exactly where its stream has a hole.
//!
//! Needs: syscall tracepoints, BPF ring buffers (Linux 5.8), `bpf_get_current_cgroup_id` (4.18).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns, bpf_probe_read_user, bpf_probe_read_user_buf,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use respwatch_common::{
    CLASSIFY_MISS_LIMIT, CLASSIFY_PEEK, COPY_PIECES, ConnKey, ConnState, DATA_WINDOW, Direction,
    LOSS_REASONS, LossReason, MAX_IOVECS, PeerAddr, PendingIo, RING_MAPS, RecordHeader, Syscall,
    conn_status, looks_like_resp, record_flags, record_kind,
};

/// Offsets in the `syscalls:sys_enter_*` / `sys_exit_*` tracepoint records (see their
/// `format` files): the first argument, then one u64 per argument; the return value on exit.
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;

/// The daemon's own process: its gRPC and metrics traffic must not watch itself.
#[unsafe(no_mangle)]
static SELF_TGID: u32 = 0;

/// Each CPU wakes the reader once it has written this many bytes since its last wakeup (the
/// daemon sets it from the ring size and CPU count); below that, the reader drains on a short
/// timer. A wakeup per record costs an IRQ work item and a context switch for every syscall
/// traced, the largest overhead there was. Counted per CPU rather than by asking the ring how
/// much is waiting: that query reads positions other CPUs keep writing, and a reader that fell
/// behind would be woken on every record.
#[unsafe(no_mangle)]
static WAKEUP_BYTES_PER_CPU: u64 = 0;

/// A connection's first record wakes the reader at once: user space reads the process's
/// `/proc` entries then, and a short-lived client may be gone 10 ms later.
fn wakeup_flag(scratch: &mut Scratch, size: usize, first: bool) -> u64 {
    // SAFETY: a global the loader sets before the programs run; read-only afterwards.
    let threshold = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES_PER_CPU) };
    scratch.unwoken_bytes += size as u64;
    if first || scratch.unwoken_bytes >= threshold {
        scratch.unwoken_bytes = 0;
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Non-zero when the daemon observes only some namespaces (`--namespaces`): then I/O in the
/// cgroups of [`OUT_OF_SCOPE`] is not looked at.
#[unsafe(no_mangle)]
static SCOPED: u8 = 0;

/// Cgroups (v2 ids) that user space found to be outside `--namespaces` (host processes, pods of
/// other namespaces). Their syscalls cost one extra lookup and produce no records.
#[map]
static OUT_OF_SCOPE: HashMap<u64, u8> = HashMap::with_max_entries(16384, 0);

fn out_of_scope() -> bool {
    // SAFETY: a global the loader sets before the programs run; read-only afterwards.
    if unsafe { core::ptr::read_volatile(&SCOPED) } == 0 {
        return false;
    }
    // SAFETY: plain helper call, then a read-only map lookup.
    unsafe { OUT_OF_SCOPE.get(&bpf_get_current_cgroup_id()).is_some() }
}

/// Records to user space, in up to [`RING_MAPS`] rings. One ring that every CPU writes to
/// costs each record a contended lock and cache-line transfers: with redis-server and its
/// client on two CPUs, the exit program took 90–150 ns longer per record than with a ring
/// each. Each process writes to one ring, so a process's records (and every generation of a
/// reused fd) stay in order. The daemon sets the sizes and [`RINGS`] (how many are used) at
/// load time.
#[map]
static RECORDS_0: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
static RECORDS_1: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
static RECORDS_2: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
static RECORDS_3: RingBuf = RingBuf::with_byte_size(4096, 0);

/// How many of the rings are in use (one per CPU, up to [`RING_MAPS`]); set by the loader.
#[unsafe(no_mangle)]
static RINGS: u32 = 1;

/// Each process's ring, chosen when its first connection is classified.
#[map]
static PROCESS_RINGS: HashMap<u32, u8> = HashMap::with_max_entries(65536, 0);

/// The turn counter that hands out rings to new processes in rotation, so that two busy
/// processes started one after the other (a server and its client) do not share a ring. Not
/// atomic: two CPUs racing may hand out the same ring twice, which costs only contention.
#[map]
static RING_TURN: Array<u32> = Array::with_max_entries(1, 0);

/// The process's ring, or the next one in rotation for a process seen for the first time.
fn ring_of_process(tgid: u32) -> u8 {
    // SAFETY: read-only look at a map value.
    if let Some(ring) = unsafe { PROCESS_RINGS.get(&tgid) } {
        return *ring;
    }
    // SAFETY: a global the loader sets before the programs run; read-only afterwards.
    let rings = unsafe { core::ptr::read_volatile(&RINGS) }.clamp(1, RING_MAPS);
    let turn = match RING_TURN.get_ptr_mut(0) {
        // SAFETY: map value pointer, valid for this program run.
        Some(turn) => unsafe {
            let current = *turn;
            *turn = current.wrapping_add(1);
            current
        },
        None => tgid,
    };
    let ring = (turn % rings) as u8;
    if PROCESS_RINGS
        .insert(&tgid, &ring, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return ring;
    }
    // Another CPU chose first (use its choice), or the map is full: then a ring that depends
    // only on the process, so the process still writes to one ring.
    // SAFETY: read-only look at a map value.
    unsafe { PROCESS_RINGS.get(&tgid) }
        .copied()
        .unwrap_or((tgid % rings) as u8)
}

/// Writes a record to the connection's ring.
#[inline(always)]
fn output<T: ?Sized>(ring: u8, record: &T, flags: u64) -> bool {
    match ring {
        0 => RECORDS_0.output::<T>(record, flags),
        1 => RECORDS_1.output::<T>(record, flags),
        2 => RECORDS_2.output::<T>(record, flags),
        _ => RECORDS_3.output::<T>(record, flags),
    }
    .is_ok()
}

#[map]
static CONNS: LruHashMap<ConnKey, ConnState> = LruHashMap::with_max_entries(131072, 0);

/// Syscalls in flight on fds that are not known to be ignored, keyed by pid_tgid. A plain hash,
/// not an LRU: an LRU may evict another thread's entry mid-syscall, losing its bytes silently;
/// a full hash fails the insert, which is counted. A thread's entry is rewritten in place and
/// marked done at syscall exit rather than inserted and deleted per syscall (that allocation
/// and free was a fifth of the programs' time); it is removed when the thread exits. So the
/// table holds one entry per live thread that has touched a socket, up to 65536.
#[map]
static INFLIGHT: HashMap<u64, PendingIo> = HashMap::with_max_entries(65536, 0);

/// Saves a thread's syscall arguments in its `INFLIGHT` slot, creating the slot on first use.
fn remember(pid_tgid: u64, pending: PendingIo) {
    match INFLIGHT.get_ptr_mut(pid_tgid) {
        // SAFETY: map value pointer, valid for this program run; only this thread writes it.
        Some(slot) => unsafe { *slot = pending },
        None => {
            if INFLIGHT.insert(pid_tgid, pending, 0).is_err() {
                count_loss(LossReason::InflightFull);
            }
        }
    }
}

/// Takes the arguments the thread's syscall entry saved, leaving its slot marked done so that
/// an exit without a traced entry finds nothing.
fn take_pending(pid_tgid: u64) -> Option<PendingIo> {
    let slot = INFLIGHT.get_ptr_mut(pid_tgid)?;
    // SAFETY: map value pointer, valid for this program run; only this thread writes it.
    unsafe {
        let pending = *slot;
        if pending.syscall == PendingIo::DONE {
            return None;
        }
        (*slot).syscall = PendingIo::DONE;
        Some(pending)
    }
}

#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_REASONS, 0);

/// A record is assembled here (header, then copied bytes) and output with its exact size.
#[repr(C)]
struct Scratch {
    header: RecordHeader,
    data: [u8; DATA_WINDOW],
    /// Bytes this CPU wrote to the ring since it last woke the reader.
    unwoken_bytes: u64,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

/// The part of `struct user_msghdr` that locates its iovecs (x86_64/arm64 layout).
#[repr(C)]
#[derive(Clone, Copy)]
struct MsgHdr {
    name: u64,
    namelen: u32,
    _pad: u32,
    iov: u64,
    iovlen: u64,
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects programs that could reach a panic; none is reachable.
    unsafe { core::hint::unreachable_unchecked() }
}

fn count_loss(reason: LossReason) {
    if let Some(counter) = LOSSES.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *counter += 1 };
    }
}

fn self_tgid() -> u32 {
    // SAFETY: a global the loader patches before load; volatile so it is not const-folded.
    unsafe { core::ptr::read_volatile(&SELF_TGID) }
}

/// A u64 field of the tracepoint record, loaded directly: the verifier checks the offset
/// against the record, and a probe-read helper call per field cost more than the rest of the
/// entry program.
fn record_field(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: `offset` is one of the 8-byte-aligned field offsets above, inside every record
    // these programs attach to (the verifier rejects the program otherwise).
    unsafe { core::ptr::read(ctx.as_ptr().cast::<u8>().add(offset).cast::<u64>()) }
}

fn conn_key(tgid: u32, fd: i32) -> ConnKey {
    ConnKey { tgid, fd }
}

// ---- entry: remember the arguments -------------------------------------------------------

fn on_enter(ctx: &TracePointContext, syscall: Syscall) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == self_tgid() {
        return 0;
    }
    let (fd, ptr, len) = (
        record_field(ctx, ARG0) as i32,
        record_field(ctx, ARG1),
        record_field(ctx, ARG2),
    );
    if fd < 0 {
        return 0;
    }
    // The common case on a busy node: I/O on a file, a pipe, or a socket known not to be RESP.
    // SAFETY: read-only look at a map value.
    match unsafe { CONNS.get(conn_key(tgid, fd)) } {
        Some(state) if state.status == conn_status::IGNORED => return 0,
        Some(_) => {}
        // Not a socket the daemon knows of: only the socket-only calls prove it is one.
        None if !syscall.socket_only() => return 0,
        None => {}
    }
    if out_of_scope() {
        return 0;
    }
    let pending = PendingIo {
        ptr,
        len,
        fd,
        syscall: syscall as u8,
        _pad: [0; 3],
    };
    remember(pid_tgid, pending);
    0
}

// ---- exit: classify, copy, emit ----------------------------------------------------------

fn on_exit(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(pending) = take_pending(pid_tgid) else {
        return 0;
    };
    let ret = record_field(ctx, RET) as i64;
    if ret <= 0 {
        return 0;
    }
    let Some(syscall) = Syscall::from_u8(pending.syscall) else {
        return 0;
    };
    let moved = ret as u64;
    let tgid = (pid_tgid >> 32) as u32;
    let key = conn_key(tgid, pending.fd);

    let (first_ptr, first_len, iov_ptr, iov_count) = match locate_buffers(syscall, &pending) {
        Some(found) => found,
        None => return 0,
    };

    let mut flags = 0u8;
    let state = match CONNS.get_ptr_mut(key) {
        // SAFETY: map value pointer, valid for this program run.
        Some(state) if unsafe { (*state).status } == conn_status::TRACKED => state,
        Some(state) if unsafe { (*state).status } == conn_status::IGNORED => return 0,
        known => {
            if !classify(first_ptr, first_len.min(moved)) {
                match known {
                    // SAFETY: as above.
                    Some(state) => unsafe {
                        (*state).misses = (*state).misses.saturating_add(1);
                        if (*state).misses >= CLASSIFY_MISS_LIMIT {
                            (*state).status = conn_status::IGNORED;
                        }
                    },
                    None => {
                        let _ = CONNS.insert(key, ConnState::probing(1, PeerAddr::UNKNOWN), 0);
                    }
                }
                return 0;
            }
            // SAFETY: a map value read, then a plain helper call.
            let peer = known
                .map(|state| unsafe { (*state).peer })
                .unwrap_or(PeerAddr::UNKNOWN);
            let tracked = ConnState {
                // SAFETY: plain helper call.
                start_ns: unsafe { bpf_ktime_get_ns() },
                gap: [0; 2],
                peer,
                status: conn_status::TRACKED,
                misses: 0,
                ring: ring_of_process(tgid),
                _pad: 0,
            };
            if CONNS.insert(key, tracked, 0).is_err() {
                return 0;
            }
            flags |= record_flags::FIRST;
            match CONNS.get_ptr_mut(key) {
                Some(state) => state,
                None => return 0,
            }
        }
    };

    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch slot and a map value pointer, both valid for this run.
    let (scratch, state) = unsafe { (&mut *scratch, &mut *state) };
    let direction = syscall.direction();
    fill_header(&mut scratch.header, syscall, pending.fd, state, flags);

    match iov_ptr {
        None => emit_chunk(scratch, state, direction, first_ptr, moved),
        Some(iov) => emit_iovecs(scratch, state, direction, iov, iov_count, moved),
    }
    0
}

/// Where the bytes are: the first buffer (for classification) and, for vector calls, the iovec
/// array and its length.
fn locate_buffers(syscall: Syscall, pending: &PendingIo) -> Option<(u64, u64, Option<u64>, u64)> {
    let (iov, count) = match syscall {
        Syscall::Read | Syscall::Write | Syscall::Recvfrom | Syscall::Sendto => {
            return Some((pending.ptr, pending.len, None, 0));
        }
        Syscall::Readv | Syscall::Writev => (pending.ptr, pending.len),
        Syscall::Accept => return None,
        Syscall::Recvmsg | Syscall::Sendmsg => {
            // SAFETY: reads user memory through the checked helper.
            let msg = unsafe { bpf_probe_read_user(pending.ptr as *const MsgHdr) }.ok()?;
            (msg.iov, msg.iovlen)
        }
    };
    if count == 0 {
        return None;
    }
    // SAFETY: as above.
    let first = unsafe { bpf_probe_read_user(iov as *const IoVec) }.ok()?;
    Some((first.base, first.len, Some(iov), count))
}

fn classify(ptr: u64, len: u64) -> bool {
    let mut peek = [0u8; CLASSIFY_PEEK];
    let n = if len < CLASSIFY_PEEK as u64 {
        len as usize
    } else {
        CLASSIFY_PEEK
    };
    // SAFETY: reads user memory through the checked helper.
    if unsafe { bpf_probe_read_user_buf(ptr as *const u8, &mut peek) }.is_err() {
        // A short buffer at the end of a page can fault on the full peek: retry exactly.
        let Some(exact) = peek.get_mut(..n) else {
            return false;
        };
        // SAFETY: as above.
        if unsafe { bpf_probe_read_user_buf(ptr as *const u8, exact) }.is_err() {
            return false;
        }
    }
    looks_like_resp(&peek, n)
}

fn fill_header(header: &mut RecordHeader, syscall: Syscall, fd: i32, state: &ConnState, flags: u8) {
    // SAFETY: plain helper calls.
    unsafe {
        header.ts_ns = bpf_ktime_get_ns();
        header.cgroup_id = bpf_get_current_cgroup_id();
    }
    header.conn_start_ns = state.start_ns;
    header.peer = state.peer;
    let pid_tgid = bpf_get_current_pid_tgid();
    header.tgid = (pid_tgid >> 32) as u32;
    header.tid = pid_tgid as u32;
    header.fd = fd;
    header.kind = record_kind::DATA;
    header.syscall = syscall as u8;
    header.direction = syscall.direction() as u8;
    header.flags = flags;
    header.comm = bpf_get_current_comm().unwrap_or([0; 16]);
}

fn emit_iovecs(
    scratch: &mut Scratch,
    state: &mut ConnState,
    direction: Direction,
    iov: u64,
    count: u64,
    moved: u64,
) {
    let mut remaining = moved;
    let mut index = 0u32;
    while index < MAX_IOVECS {
        if remaining == 0 || index as u64 >= count {
            return;
        }
        let entry = iov + index as u64 * core::mem::size_of::<IoVec>() as u64;
        // SAFETY: reads user memory through the checked helper.
        let Ok(vec) = (unsafe { bpf_probe_read_user(entry as *const IoVec) }) else {
            break;
        };
        let len = if vec.len < remaining {
            vec.len
        } else {
            remaining
        };
        if len > 0 {
            emit_chunk(scratch, state, direction, vec.base, len);
        }
        remaining -= len;
        index += 1;
    }
    if remaining > 0 {
        // More iovecs than are copied one by one (or an unreadable one): their bytes are real,
        // so report them, uncopied, to keep the stream's length exact.
        send(
            scratch,
            state,
            direction,
            remaining,
            0,
            record_flags::COPY_FAILED,
        );
    }
}

/// Copies a buffer in up to [`COPY_PIECES`] records of [`DATA_WINDOW`] bytes; the last record
/// also counts the bytes past the copied ones.
fn emit_chunk(
    scratch: &mut Scratch,
    state: &mut ConnState,
    direction: Direction,
    ptr: u64,
    len: u64,
) {
    let mut offset = 0u64;
    let mut piece = 0usize;
    while piece < COPY_PIECES {
        let rest = len - offset;
        let window = if rest < DATA_WINDOW as u64 {
            rest as usize
        } else {
            DATA_WINDOW
        };
        let last = piece + 1 == COPY_PIECES || rest <= DATA_WINDOW as u64;
        let total = if last { rest } else { window as u64 };
        let copied = match scratch.data.get_mut(..window) {
            // SAFETY: reads user memory through the checked helper.
            Some(dst) => {
                unsafe { bpf_probe_read_user_buf((ptr + offset) as *const u8, dst) }.is_ok()
            }
            None => false,
        };
        if copied {
            send(scratch, state, direction, total, window, 0);
        } else {
            count_loss(LossReason::CopyFailed);
            send(
                scratch,
                state,
                direction,
                total,
                0,
                record_flags::COPY_FAILED,
            );
        }
        scratch.header.flags &= !record_flags::FIRST;
        if last {
            return;
        }
        offset += total;
        piece += 1;
    }
}

/// Inlined: six arguments are more than a BPF call can pass.
#[inline(always)]
fn send(
    scratch: &mut Scratch,
    state: &mut ConnState,
    direction: Direction,
    total: u64,
    copied: usize,
    extra_flags: u8,
) {
    let dir = direction as usize & 1;
    scratch.header.total_len = total;
    scratch.header.copied_len = copied as u32;
    scratch.header.gap_before = state.gap[dir];
    let saved_flags = scratch.header.flags;
    scratch.header.flags |= extra_flags;
    let size = core::mem::size_of::<RecordHeader>() + copied;
    let wakeup = wakeup_flag(scratch, size, saved_flags & record_flags::FIRST != 0);
    // SAFETY: `Scratch` is `repr(C)` plain data; viewed as bytes up to its own size.
    let bytes = unsafe {
        core::slice::from_raw_parts(
            (scratch as *const Scratch).cast::<u8>(),
            core::mem::size_of::<Scratch>(),
        )
    };
    let delivered = match bytes.get(..size) {
        Some(record) => output::<[u8]>(state.ring, record, wakeup),
        None => false,
    };
    scratch.header.flags = saved_flags;
    if delivered {
        state.gap[dir] = 0;
    } else {
        state.gap[dir] += total;
        count_loss(LossReason::RingFull);
    }
}

// ---- close and fd reuse ------------------------------------------------------------------

/// Forgets (tgid, fd) and tells user space when it was a tracked connection.
fn forget(ctx: &TracePointContext, fd: i32) {
    let tgid = ctx.tgid();
    let key = conn_key(tgid, fd);
    // SAFETY: value copied out before removal.
    let Some(state) = (unsafe { CONNS.get(key) }).copied() else {
        return;
    };
    let _ = CONNS.remove(key);
    if state.status != conn_status::TRACKED {
        return;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch slot, valid for this run.
    let scratch = unsafe { &mut *scratch };
    fill_header(&mut scratch.header, Syscall::Read, fd, &state, 0);
    scratch.header.kind = record_kind::CLOSE;
    scratch.header.gap_before = state.gap[Direction::Ingress as usize];
    scratch.header.total_len = state.gap[Direction::Egress as usize];
    scratch.header.copied_len = 0;
    let wakeup = wakeup_flag(scratch, core::mem::size_of::<RecordHeader>(), false);
    if !output::<RecordHeader>(state.ring, &scratch.header, wakeup) {
        count_loss(LossReason::CloseLost);
    }
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    if ctx.tgid() == self_tgid() {
        return 0;
    }
    // SAFETY: offset from the tracepoint's format.
    if let Ok(fd) = unsafe { ctx.read_at::<u64>(ARG0) } {
        forget(&ctx, fd as i32);
    }
    0
}

/// A new socket from socket/accept/accept4: whatever was tracked under that fd number is gone,
/// even if its close was never seen (close_range, dup2 over it), and the fd is now a socket to
/// classify. Plain `read`/`write` are only looked at on fds known to be sockets this way (or
/// from the daemon's scan of sockets that existed before it started), so files and pipes cost
/// one map lookup. For accept, the peer address the kernel filled in is kept.
#[tracepoint]
pub fn sys_exit_new_socket(ctx: TracePointContext) -> u32 {
    if ctx.tgid() == self_tgid() {
        return 0;
    }
    // Where accept wrote the peer's address, or 0: a plain integer, because an `Option` kept
    // across the calls below compiles to a register the verifier sees read uninitialised.
    let sockaddr_ptr = match take_pending(bpf_get_current_pid_tgid()) {
        Some(pending) if pending.syscall == Syscall::Accept as u8 => pending.ptr,
        _ => 0,
    };
    // SAFETY: `ret` is the exit record's first field.
    let Ok(fd) = (unsafe { ctx.read_at::<i64>(RET) }) else {
        return 0;
    };
    if fd < 0 {
        return 0;
    }
    forget(&ctx, fd as i32);
    let peer = match sockaddr_ptr {
        0 => PeerAddr::UNKNOWN,
        ptr => read_sockaddr(ptr),
    };
    let _ = CONNS.insert(
        conn_key(ctx.tgid(), fd as i32),
        ConnState::probing(0, peer),
        0,
    );
    0
}

fn read_sockaddr(ptr: u64) -> PeerAddr {
    // SAFETY: reads user memory through the checked helper.
    match unsafe { bpf_probe_read_user(ptr as *const [u8; 24]) } {
        Ok(raw) => PeerAddr::from_sockaddr(&raw),
        Err(_) => PeerAddr::UNKNOWN,
    }
}

/// Remembers where accept will write the peer's address.
#[tracepoint]
pub fn sys_enter_accept(ctx: TracePointContext) -> u32 {
    if ctx.tgid() == self_tgid() {
        return 0;
    }
    // SAFETY: offset from the tracepoint's format (`upeer_sockaddr`).
    let ptr = unsafe { ctx.read_at::<u64>(ARG1) }.unwrap_or(0);
    let pending = PendingIo {
        ptr,
        len: 0,
        fd: -1,
        syscall: Syscall::Accept as u8,
        _pad: [0; 3],
    };
    remember(bpf_get_current_pid_tgid(), pending);
    0
}

/// A thread is gone: its `INFLIGHT` slot is freed (`sched:sched_process_exit` fires per thread),
/// and with the main thread its process's ring choice.
#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let _ = INFLIGHT.remove(pid_tgid);
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == pid_tgid as u32 {
        let _ = PROCESS_RINGS.remove(&tgid);
    }
    0
}

/// A client's connect names its peer: keep it for the socket's records.
#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let tgid = ctx.tgid();
    if tgid == self_tgid() {
        return 0;
    }
    // SAFETY: offsets from the tracepoint's format (`fd`, `uservaddr`).
    let (fd, ptr) = unsafe {
        (
            ctx.read_at::<u64>(ARG0).unwrap_or(u64::MAX) as i32,
            ctx.read_at::<u64>(ARG1).unwrap_or(0),
        )
    };
    if fd < 0 || ptr == 0 {
        return 0;
    }
    let peer = read_sockaddr(ptr);
    match CONNS.get_ptr_mut(conn_key(tgid, fd)) {
        // SAFETY: map value pointer, valid for this program run.
        Some(state) => unsafe { (*state).peer = peer },
        None => {
            let _ = CONNS.insert(conn_key(tgid, fd), ConnState::probing(0, peer), 0);
        }
    }
    0
}

macro_rules! io_tracepoints {
    ($($enter:ident, $syscall:expr;)*) => {
        $(
            #[tracepoint]
            pub fn $enter(ctx: TracePointContext) -> u32 {
                on_enter(&ctx, $syscall)
            }
        )*
    };
}

io_tracepoints! {
    sys_enter_read, Syscall::Read;
    sys_enter_readv, Syscall::Readv;
    sys_enter_recvfrom, Syscall::Recvfrom;
    sys_enter_recvmsg, Syscall::Recvmsg;
    sys_enter_write, Syscall::Write;
    sys_enter_writev, Syscall::Writev;
    sys_enter_sendto, Syscall::Sendto;
    sys_enter_sendmsg, Syscall::Sendmsg;
}

/// One exit program serves every I/O syscall: the entry saved which one it was.
#[tracepoint]
pub fn sys_exit_io(ctx: TracePointContext) -> u32 {
    on_exit(&ctx)
}
