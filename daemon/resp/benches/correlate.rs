//! What decoding and pairing cost per command, without the kernel, the ring buffer or the
//! scheduler in the way (the end-to-end `benches/overhead.sh` cannot resolve a change of a few
//! percent on a noisy machine; this can).
//!
//! Streams shaped like `redis-benchmark -t set,get` (16-byte keys, 3-byte values), one packet
//! per command (`-P 1`) or per 16 (`-P 16`), are fed through a server-side and a client-side
//! [`Correlator`], as the daemon does for a client and a server on one node. The baseline,
//! measured in the same run, is one pass over the same bytes looking for line ends: the least
//! any RESP decoder has to do. Run: `cargo bench -p respwatch-resp`.
use std::hint::black_box;
use std::time::Duration;

#[path = "../../../benches/fastest.rs"]
mod fastest;
use fastest::fastest;

use respwatch_resp::correlate::{Correlator, Direction, Output};

const COMMANDS: usize = 16 * 1024;
const ROUNDS: usize = 15;

/// Requests and replies cut into the chunks the kernel would deliver.
struct Workload {
    name: &'static str,
    requests: Vec<Vec<u8>>,
    replies: Vec<Vec<u8>>,
}

fn workload(name: &'static str, pipeline: usize) -> Workload {
    let key = b"key:000000012345";
    let mut requests = Vec::new();
    let mut replies = Vec::new();
    let (mut request, mut reply) = (Vec::new(), Vec::new());
    for i in 0..COMMANDS {
        if i % 2 == 0 {
            request.extend_from_slice(b"*3\r\n$3\r\nSET\r\n$16\r\n");
            request.extend_from_slice(key);
            request.extend_from_slice(b"\r\n$3\r\nxxx\r\n");
            reply.extend_from_slice(b"+OK\r\n");
        } else {
            request.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$16\r\n");
            request.extend_from_slice(key);
            request.extend_from_slice(b"\r\n");
            reply.extend_from_slice(b"$3\r\nxxx\r\n");
        }
        if (i + 1) % pipeline == 0 {
            requests.push(std::mem::take(&mut request));
            replies.push(std::mem::take(&mut reply));
        }
    }
    Workload {
        name,
        requests,
        replies,
    }
}

/// Both sides of every exchange, as the daemon sees a client and a server on one node.
fn correlate(work: &Workload) -> usize {
    let mut server = Correlator::new();
    let mut client = Correlator::new();
    let mut out = Vec::with_capacity(64);
    let mut events = 0;
    for (ts, (request, reply)) in work.requests.iter().zip(&work.replies).enumerate() {
        let ts = ts as u64 * 1000;
        client.feed(Direction::Egress, ts, request, 0, &mut out);
        server.feed(Direction::Ingress, ts + 1, request, 0, &mut out);
        server.feed(Direction::Egress, ts + 2, reply, 0, &mut out);
        client.feed(Direction::Ingress, ts + 3, reply, 0, &mut out);
        events += out
            .drain(..)
            .filter(|output| matches!(output, Output::Exchange(_)))
            .count();
    }
    events
}

/// The baseline: every byte of both directions, twice (once per side), scanned for `\n`.
fn scan(work: &Workload) -> usize {
    let mut lines = 0;
    for chunk in work.requests.iter().chain(&work.replies) {
        for _side in 0..2 {
            lines += black_box(chunk).iter().filter(|&&b| b == b'\n').count();
        }
    }
    lines
}

fn main() {
    println!(
        "{:<8} {:>14} {:>14} {:>8}",
        "workload", "ns/command", "baseline ns", "ratio"
    );
    for work in [workload("-P 1", 1), workload("-P 16", 16)] {
        let (baseline, _) = fastest(ROUNDS, || scan(&work));
        let (elapsed, events) = fastest(ROUNDS, || correlate(&work));
        assert_eq!(events, 2 * COMMANDS, "every command paired on both sides");
        let per_command = |d: Duration| d.as_nanos() as f64 / COMMANDS as f64;
        println!(
            "{:<8} {:>14.1} {:>14.1} {:>8.1}",
            work.name,
            per_command(elapsed),
            per_command(baseline),
            elapsed.as_secs_f64() / baseline.as_secs_f64()
        );
    }
}
