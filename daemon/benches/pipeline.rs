//! What the daemon's user-space stages cost per command, from ring buffer records to the stats
//! (and to subscribers, when one watches), without the kernel, the ring or the scheduler in the
//! way: the part of the daemon's CPU that `benches/overhead.sh` cannot resolve on a noisy
//! machine.
//!
//! Records as the kernel writes them (see `records.rs`) go in batches through `Stages`, the
//! pipeline's own entry point for a batch of records (`Record::parse`, reassembly, decode and
//! correlate, aggregation, events for watchers). Cases, per command (both sides of a command
//! together: each is seen by the client's and the server's socket):
//! - `p1`: `redis-benchmark -c 50 -P 1 -t set,get`, nobody watching;
//! - `p1-watched`: the same with one Watch subscriber (events built and broadcast);
//! - `p1-watched-other`: the same with one Watch subscriber of another process (its filters
//!   reach the decode stage: no event of this traffic is built);
//! - `p16`: `-P 16`, nobody watching;
//! - `mixed`: errors, MULTI/EXEC, pub/sub, RESP3 and 100 KB values (`records::Mixed`);
//! - `captured-p1`, `captured-p16`: ring records of real `redis-benchmark -c 50 -t set,get`
//!   runs as the kernel delivered them (`benches/capture-records.sh` writes them to
//!   `target/bench-records`, or `$RESPWATCH_BENCH_RECORDS`), when they are there.
//!
//! The baseline, measured in the same run, is `Record::parse` alone: reading each record's
//! header in place, which no design can skip.
//! Run: `cargo bench -p respwatchd --bench pipeline` (ns per command, all cases), or count
//! instructions exactly with `benches/pipeline-instructions.sh`, which runs one case at a time
//! (`RESPWATCH_BENCH_CASE=<case>`) under callgrind.
use std::hint::black_box;
use std::time::Duration;

#[path = "../../benches/fastest.rs"]
mod fastest;
#[path = "support/records.rs"]
mod records;
use fastest::fastest;

use respwatchd::{
    capture::Record,
    decode::DecodeStage,
    enrich::Attributor,
    pipeline::{PipelineConfig, Shared, Stages},
    streams::Streams,
};

/// Who watches a case's traffic.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Watcher {
    Nobody,
    /// A subscriber with no filter.
    Everything,
    /// A subscriber whose filter names another process.
    OtherProcess,
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const COMMANDS: usize = 16 * 1024;
/// Records drained per batch, about what the ring holds between two drains at this rate.
const BATCH: usize = 256;
const ROUNDS: usize = 7;

struct Case {
    name: &'static str,
    records: Vec<Vec<u8>>,
    commands: usize,
    watcher: Watcher,
}

fn cases() -> Vec<Case> {
    let (mut mixed, mut mixed_records) = records::Mixed::new(1_000);
    // HELLO and SUBSCRIBE.
    let mut mixed_commands = 2;
    while mixed_commands < COMMANDS {
        let (round, commands) = mixed.round();
        mixed_records.extend(round);
        mixed_commands += commands;
    }
    let (p1, p1_commands) = records::benchmark(50, 1, COMMANDS);
    let (p16, p16_commands) = records::benchmark(64, 16, COMMANDS);
    let captured = ["p1", "p16"].into_iter().filter_map(|name| {
        let (records, commands) = captured(name)?;
        Some(Case {
            name: if name == "p1" {
                "captured-p1"
            } else {
                "captured-p16"
            },
            records,
            commands,
            watcher: Watcher::Nobody,
        })
    });
    let mut cases = vec![
        Case {
            name: "p1",
            records: p1.clone(),
            commands: p1_commands,
            watcher: Watcher::Nobody,
        },
        Case {
            name: "p1-watched",
            records: p1.clone(),
            commands: p1_commands,
            watcher: Watcher::Everything,
        },
        Case {
            name: "p1-watched-other",
            records: p1,
            commands: p1_commands,
            watcher: Watcher::OtherProcess,
        },
        Case {
            name: "p16",
            records: p16,
            commands: p16_commands,
            watcher: Watcher::Nobody,
        },
        Case {
            name: "mixed",
            records: mixed_records,
            commands: mixed_commands,
            watcher: Watcher::Nobody,
        },
    ];
    cases.extend(captured);
    cases
}

/// The records `benches/capture-records.sh` wrote for `name` (each a little-endian `u32`
/// length, then the record), and the commands the server ran meanwhile; `None` when absent.
fn captured(name: &str) -> Option<(Vec<Vec<u8>>, usize)> {
    let dir = std::env::var_os("RESPWATCH_BENCH_RECORDS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-records")
        });
    let bytes = std::fs::read(dir.join(format!("{name}.records"))).ok()?;
    let commands = std::fs::read_to_string(dir.join(format!("{name}.commands")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let mut records = Vec::new();
    let mut rest = &bytes[..];
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = u32::from_le_bytes(*len) as usize;
        let (record, tail) = tail.split_at_checked(len)?;
        records.push(record.to_vec());
        rest = tail;
    }
    Some((records, commands))
}

/// Every stage, batch by batch, as `Pipeline::run` drives them; returns the events counted.
#[inline(never)]
fn run_case(case: &Case, cgroup_root: &std::path::Path) -> u64 {
    let config = PipelineConfig::default();
    let mut stages = Stages::new(
        Streams::new(cgroup_root.to_path_buf()),
        DecodeStage::new(config.keys.clone(), 0),
    );
    let shared = Shared::new(config, Attributor::new(None, Vec::new()));
    // A subscriber that never reads: the broadcast keeps the newest events, as for a slow one.
    let _subscriber = (case.watcher != Watcher::Nobody).then(|| shared.events.subscribe());
    if case.watcher == Watcher::OtherProcess {
        shared.set_watch_interest(Some(std::sync::Arc::new(records::WatchesComm("other"))));
    }
    let mut parsed = Vec::with_capacity(BATCH);
    for batch in case.records.chunks(BATCH) {
        parsed.extend(
            batch
                .iter()
                .map(|raw| Record::parse(raw).expect("well-formed record")),
        );
        stages.accept_batch(parsed.drain(..), &shared, &mut |_| {});
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
    records::check_layouts();
    // No cgroup of the records exists here: nothing to find, whatever the machine has.
    let cgroup_root = std::env::temp_dir().join(format!("respwatch-bench-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup_root).expect("an empty cgroup root");
    let only = std::env::var("RESPWATCH_BENCH_CASE").ok();
    let cases = cases();
    if let Some(only) = only {
        let case = cases
            .iter()
            .find(|case| case.name == only)
            .unwrap_or_else(|| panic!("no case {only:?}"));
        let events = run_case(case, &cgroup_root);
        println!("{} commands {} events {events}", case.name, case.commands);
        return;
    }
    println!(
        "{:>18} {:>12} {:>14} {:>8}",
        "case", "ns/command", "baseline ns", "ratio"
    );
    for case in &cases {
        let (baseline, _) = fastest(ROUNDS, || parse_only(&case.records));
        let (elapsed, events) = fastest(ROUNDS, || run_case(case, &cgroup_root));
        assert_eq!(
            events,
            2 * case.commands as u64,
            "{}: every command published on both sides",
            case.name
        );
        let per_command = |d: Duration| d.as_nanos() as f64 / case.commands as f64;
        println!(
            "{:>18} {:>12.1} {:>14.1} {:>8.1}",
            case.name,
            per_command(elapsed),
            per_command(baseline),
            elapsed.as_secs_f64() / baseline.as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir(&cgroup_root);
}
