//! What the daemon's user-space stages cost per command, from ring buffer records to published
//! events, without the kernel, the ring or the scheduler in the way: the part of the daemon's
//! CPU that `benches/overhead.sh` cannot resolve on a noisy machine.
//!
//! Records shaped like `redis-benchmark -c 50 -t set,get` on one node (each command: the
//! client's write, the server's read, the server's reply, the client's read; 16-byte keys,
//! 3-byte values) go, in batches as the ring delivers them, through `Record::parse`, `Streams`,
//! the decode stage and `Shared::publish` (aggregator, history, subscribers), exactly as
//! `Pipeline::run` drives them. The baseline, measured in the same run, is `Record::parse`
//! alone: copying the records out of the ring, which no design can skip.
//! Run: `cargo bench -p respwatchd --bench pipeline`.
use std::hint::black_box;
use std::time::Duration;

#[path = "../../benches/fastest.rs"]
mod fastest;
use fastest::fastest;

use bytes::BytesMut;
use respwatch_common::{PeerAddr, RecordHeader, Syscall, record_flags, record_kind};
use respwatchd::{
    capture::Record,
    decode::DecodeStage,
    enrich::Attributor,
    pipeline::{PipelineConfig, Shared},
    streams::Streams,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CLIENTS: usize = 50;
const COMMANDS: usize = 8 * 1024;
/// Records drained per batch, about what the ring holds between two drains at this rate.
const BATCH: usize = 256;
const ROUNDS: usize = 7;

/// One record as the kernel writes it into the ring: the header, then the copied bytes.
fn raw_record(header: RecordHeader, data: &[u8]) -> Vec<u8> {
    // SAFETY: `RecordHeader` is `repr(C)` plain integers and arrays without padding (its size
    // is the sum of its fields, checked in `main`), so all of its bytes are initialised.
    let head = unsafe {
        std::slice::from_raw_parts(
            (&header as *const RecordHeader).cast::<u8>(),
            size_of::<RecordHeader>(),
        )
    };
    [head, data].concat()
}

/// The records of `COMMANDS` commands spread over `CLIENTS` connections, client and server in
/// this process (so that `/proc` has a process to attribute them to).
fn records() -> Vec<Vec<u8>> {
    let tgid = std::process::id();
    let mut out = Vec::with_capacity(COMMANDS * 4);
    let mut ts = 1_000_000u64;
    for i in 0..COMMANDS {
        let client = i % CLIENTS;
        let (request, reply): (&[u8], &[u8]) = if i % 2 == 0 {
            (
                b"*3\r\n$3\r\nSET\r\n$16\r\nkey:000000012345\r\n$3\r\nxxx\r\n",
                b"+OK\r\n",
            )
        } else {
            (
                b"*2\r\n$3\r\nGET\r\n$16\r\nkey:000000012345\r\n",
                b"$3\r\nxxx\r\n",
            )
        };
        let first = i < CLIENTS;
        let client_fd = 1000 + client as i32;
        let server_fd = 2000 + client as i32;
        for (fd, syscall, data) in [
            (client_fd, Syscall::Sendto, request),
            (server_fd, Syscall::Read, request),
            (server_fd, Syscall::Write, reply),
            (client_fd, Syscall::Recvfrom, reply),
        ] {
            ts += 1_000;
            let header = RecordHeader {
                ts_ns: ts,
                conn_start_ns: fd as u64,
                cgroup_id: 1,
                total_len: data.len() as u64,
                gap_before: 0,
                tgid,
                tid: tgid,
                fd,
                copied_len: data.len() as u32,
                kind: record_kind::DATA,
                syscall: syscall as u8,
                direction: syscall.direction() as u8,
                flags: if first { record_flags::FIRST } else { 0 },
                comm: *b"redis-benchmark\0",
                peer: PeerAddr::UNKNOWN,
            };
            out.push(raw_record(header, data));
        }
    }
    out
}

/// Every stage, batch by batch, as `Pipeline::run` drives them; returns the events published.
fn pipeline(records: &[Vec<u8>]) -> u64 {
    let config = PipelineConfig::default();
    let mut decode = DecodeStage::new(config.keys, 0);
    let shared = Shared::new(config, Attributor::new(None, Vec::new()));
    let mut streams = Streams::new();
    let (mut parsed, mut stream_events, mut events, mut out_of_scope) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut batch_bytes = BytesMut::new();
    for batch in records.chunks(BATCH) {
        batch_bytes.reserve(64 * 1024);
        for raw in batch {
            parsed.push(Record::parse(raw, &mut batch_bytes).expect("well-formed record"));
        }
        streams.accept_batch(parsed.drain(..), &mut stream_events);
        for event in stream_events.drain(..) {
            decode.accept(&event, &mut events);
        }
        shared.publish(&mut events, &mut out_of_scope);
    }
    shared
        .counters
        .events
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// The baseline: the records copied out of the ring and parsed, nothing more.
fn parse_only(records: &[Vec<u8>]) -> u64 {
    let mut batch_bytes = BytesMut::new();
    let mut total = 0;
    for batch in records.chunks(BATCH) {
        batch_bytes.reserve(64 * 1024);
        for raw in batch {
            let record = Record::parse(raw, &mut batch_bytes).expect("well-formed record");
            total += matches!(black_box(record), Record::Data(_)) as u64;
        }
    }
    total
}

fn main() {
    assert_eq!(
        size_of::<RecordHeader>(),
        5 * 8 + 4 * 4 + 4 + 16 + size_of::<PeerAddr>(),
        "RecordHeader has padding: raw_record would read uninitialised bytes"
    );
    let records = records();
    let (baseline, data_records) = fastest(ROUNDS, || parse_only(&records));
    let (elapsed, events) = fastest(ROUNDS, || pipeline(&records));
    assert_eq!(data_records, records.len() as u64);
    assert_eq!(
        events,
        2 * COMMANDS as u64,
        "every command published on both sides"
    );
    let per_command = |d: Duration| d.as_nanos() as f64 / COMMANDS as f64;
    println!("{:>14} {:>14} {:>8}", "ns/command", "baseline ns", "ratio");
    println!(
        "{:>14.1} {:>14.1} {:>8.1}",
        per_command(elapsed),
        per_command(baseline),
        elapsed.as_secs_f64() / baseline.as_secs_f64()
    );
}
