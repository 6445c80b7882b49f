//! What the daemon's user-space stages cost per command, from ring buffer records to published
//! events, without the kernel, the ring or the scheduler in the way: the part of the daemon's
//! CPU that `benches/overhead.sh` cannot resolve on a noisy machine.
//!
//! Records shaped like `redis-benchmark -c 50 -t set,get` on one node (each command: the
//! client's request packet, the server's, the server's reply and the client's; 16-byte keys,
//! 3-byte values) go, in batches as the ring delivers them, through `Record::parse`, `Streams`,
//! the decode stage and `Shared::publish` (aggregator, history, subscribers), exactly as
//! `Pipeline::run` drives them. The baseline, measured in the same run, is `Record::parse`
//! alone: reading each record's header in place, which no design can skip.
//! Run: `cargo bench -p respwatchd --bench pipeline`.
use std::hint::black_box;
use std::time::Duration;

#[path = "../../benches/fastest.rs"]
mod fastest;
use fastest::fastest;

use respwatch_common::{
    DataHeader, Direction, FAMILY_IPV4, OpenRecord, data_flags, open_flags, record_kind,
};
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

/// The bytes of a `repr(C)` record without padding (checked in `main`).
fn bytes_of<T>(record: &T) -> &[u8] {
    // SAFETY: the record types are plain integers and arrays without padding, so all of their
    // bytes are initialised.
    unsafe { std::slice::from_raw_parts((record as *const T).cast::<u8>(), size_of::<T>()) }
}

/// The records of `COMMANDS` commands spread over `CLIENTS` connections, client and server
/// sockets in this process: each connection's open record, then per command the client's
/// request packet (egress), the server's (ingress), the server's reply and the client's.
fn records() -> Vec<Vec<u8>> {
    let tgid = std::process::id();
    let mut out = Vec::with_capacity(COMMANDS * 4 + 2 * CLIENTS);
    let mut ts = 1_000_000u64;
    let client_cookie = |client: usize| 1000 + client as u64;
    let server_cookie = |client: usize| 2000 + client as u64;
    for client in 0..CLIENTS {
        for (cookie, flags, local_port, remote_port) in [
            (
                client_cookie(client),
                open_flags::CLIENT,
                40000 + client as u16,
                6379,
            ),
            (
                server_cookie(client),
                open_flags::SERVER,
                6379,
                40000 + client as u16,
            ),
        ] {
            ts += 1_000;
            let open = OpenRecord {
                kind: record_kind::OPEN,
                flags,
                family: FAMILY_IPV4,
                _pad: 0,
                tgid,
                cookie,
                ts_ns: ts,
                cgroup_id: 1,
                local_port,
                remote_port,
                _pad2: 0,
                local_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                remote_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                comm: *b"redis-benchmark\0",
            };
            out.push(bytes_of(&open).to_vec());
        }
    }
    // Stream offsets per cookie and direction.
    let mut offsets = std::collections::HashMap::<(u64, u8), u32>::new();
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
        for (cookie, direction, data) in [
            (client_cookie(client), Direction::Egress, request),
            (server_cookie(client), Direction::Ingress, request),
            (server_cookie(client), Direction::Egress, reply),
            (client_cookie(client), Direction::Ingress, reply),
        ] {
            ts += 1_000;
            let offset = offsets.entry((cookie, direction as u8)).or_default();
            let header = DataHeader {
                kind: record_kind::DATA,
                direction: direction as u8,
                flags: data_flags::PACKET_START,
                _pad: 0,
                len: data.len() as u32,
                cookie,
                ts_ns: ts,
                seq: *offset,
                copied: data.len() as u32,
            };
            *offset += data.len() as u32;
            // The record's room is a power of two of at least 64 bytes: padding follows.
            let mut record = [bytes_of(&header), data].concat();
            record.resize(
                size_of::<DataHeader>() + data.len().next_power_of_two().max(64),
                0,
            );
            out.push(record);
        }
    }
    out
}

/// Every stage, batch by batch, as `Pipeline::run` drives them; returns the events published.
fn pipeline(records: &[Vec<u8>]) -> u64 {
    let config = PipelineConfig::default();
    let mut decode = DecodeStage::new(config.keys.clone(), 0);
    let shared = Shared::new(config, Attributor::new(None, Vec::new()));
    let mut streams = Streams::new(std::env::temp_dir());
    let (mut parsed, mut stream_events, mut events, mut out_of_scope) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for batch in records.chunks(BATCH) {
        for raw in batch {
            parsed.push(Record::parse(raw).expect("well-formed record"));
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

/// The baseline: the records read and parsed in place, nothing more.
fn parse_only(records: &[Vec<u8>]) -> u64 {
    let mut total = 0;
    for batch in records.chunks(BATCH) {
        for raw in batch {
            let record = Record::parse(raw).expect("well-formed record");
            total += matches!(black_box(record), Record::Data(_)) as u64;
        }
    }
    total
}

fn main() {
    assert_eq!(
        size_of::<DataHeader>(),
        4 + 4 + 8 + 8 + 4 + 4,
        "DataHeader has padding: bytes_of would read uninitialised bytes"
    );
    assert_eq!(
        size_of::<OpenRecord>(),
        4 + 4 + 8 + 8 + 8 + 2 + 2 + 4 + 16 + 16 + 16,
        "OpenRecord has padding: bytes_of would read uninitialised bytes"
    );
    let records = records();
    let (baseline, data_records) = fastest(ROUNDS, || parse_only(&records));
    let (elapsed, events) = fastest(ROUNDS, || pipeline(&records));
    assert_eq!(data_records, 4 * COMMANDS as u64);
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
