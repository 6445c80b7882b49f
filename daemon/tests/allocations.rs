//! Nobody watching, a command costs no heap allocation from ring records to the stats: the
//! daemon's steady state allocates nothing per command, whatever the traffic. Counted with a
//! counting global allocator on the thread that runs the stages (needs no root).
use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::{Arc, atomic::Ordering},
};

#[path = "../benches/support/records.rs"]
mod records;

use respwatch_resp::correlate::Role;
use respwatchd::{
    aggregate::{GroupBy, RowStats},
    capture::Record,
    decode::DecodeStage,
    enrich::Attributor,
    pipeline::{PipelineConfig, Shared, Stages},
    streams::Streams,
};

/// Counts allocations (and reallocations) made on a thread while it has counting on.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: the thread's locals may be gone while it exits.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The stages as the daemon runs them, nobody watching, fed batch by batch.
struct Node {
    stages: Stages,
    shared: Shared,
    _cgroup_root: CgroupRoot,
}

/// An empty directory as the cgroup root: the records' cgroup is found nowhere.
struct CgroupRoot(std::path::PathBuf);

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

impl Node {
    fn new(name: &str) -> Node {
        let root = std::env::temp_dir().join(format!(
            "respwatch-allocations-{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&root).expect("an empty cgroup root");
        let config = PipelineConfig::default();
        Node {
            stages: Stages::new(
                Streams::new(root.clone()),
                DecodeStage::new(config.keys.clone(), 0),
            ),
            shared: Shared::new(config, Attributor::new(None, Vec::new())),
            _cgroup_root: CgroupRoot(root),
        }
    }

    /// Runs one batch; returns the allocations it made when `counted`.
    fn run(&mut self, batch: &[Vec<u8>], counted: bool) -> u64 {
        let records: Vec<Record> = batch
            .iter()
            .map(|raw| Record::parse(raw).expect("well-formed record"))
            .collect();
        ALLOCATIONS.with(|n| n.set(0));
        COUNTING.with(|on| on.set(counted));
        self.stages.accept_batch(records, &self.shared, &mut |_| {});
        COUNTING.with(|on| on.set(false));
        ALLOCATIONS.with(Cell::get)
    }

    fn events(&self) -> u64 {
        self.shared.counters.events.load(Ordering::Relaxed)
    }

    /// The server side's stats of `command`.
    fn server_stats(&self, command: &str) -> RowStats {
        let rows = self.shared.aggregator.lock().expect("aggregator").query(
            |_| true,
            &[GroupBy::Role, GroupBy::Command],
            None,
        );
        rows.into_iter()
            .find(|(key, _)| key.role == Role::Server && key.command == command)
            .map(|(_, stats)| stats)
            .unwrap_or_default()
    }
}

/// Errors, MULTI/EXEC and DISCARD, pub/sub, RESP3 and 100 KB values: from the 100,000th to the
/// 200,000th command, not one allocation. Records are 500 µs apart, so the per-second window
/// has turned over (every second of it reused) long before the counting starts.
#[test]
fn no_allocation_per_command_of_a_mixed_workload_when_nobody_watches() {
    let mut node = Node::new("mixed");
    let (mut mixed, setup) = records::Mixed::new(500_000);
    node.run(&setup, false);
    let (mut commands, mut allocations, mut rounds) = (2, 0, 0);
    while commands < 200_000 {
        let (round, in_round) = mixed.round();
        allocations += node.run(&round, commands >= 100_000);
        commands += in_round;
        rounds += 1;
    }
    assert_eq!(
        allocations, 0,
        "heap allocations between the 100,000th and the 200,000th command"
    );
    // What was counted is right: each command once per side, Redis' own way.
    assert_eq!(node.events(), 2 * commands as u64);
    let lpush = node.server_stats("lpush");
    assert_eq!((lpush.calls, lpush.failed_calls), (rounds, rounds));
    assert_eq!(lpush.errors.get("WRONGTYPE"), Some(&rounds));
    let incr = node.server_stats("incr");
    assert_eq!((incr.calls, incr.failed_calls), (2 * rounds, rounds));
    // An unknown command: no call anywhere, its error still counted (as errorstats does).
    let unknown = node.server_stats("unknown");
    assert_eq!(
        (unknown.calls, unknown.errors.get("ERR")),
        (0, Some(&rounds))
    );
    // MULTI's SETs: the executed ones count, the discarded ones do not.
    let set = node.server_stats("set");
    assert_eq!(set.calls, 2 * rounds + rounds.div_ceil(8));
    assert_eq!(node.server_stats("hgetall").calls, rounds);
}

/// `redis-benchmark -P 16`: the same from the first batches on, once connections and rows exist.
#[test]
fn no_allocation_per_command_of_a_pipelined_benchmark_when_nobody_watches() {
    records::check_layouts();
    let mut node = Node::new("benchmark");
    let (records, commands) = records::benchmark(64, 16, 64 * 1024);
    let batches: Vec<&[Vec<u8>]> = records.chunks(256).collect();
    let (warm, measured) = batches.split_at(batches.len() / 2);
    for batch in warm {
        node.run(batch, false);
    }
    let allocations: u64 = measured.iter().map(|batch| node.run(batch, true)).sum();
    assert_eq!(allocations, 0, "heap allocations in the second half");
    assert_eq!(node.events(), 2 * commands as u64);
}

/// A subscriber watching another process (`redisctl watch --comm other`) costs this traffic
/// nothing: its filters reach the decode stage, so no event of these connections is built or
/// shared, and the second half allocates nothing. Watching these processes instead, the events
/// are built and reach the subscriber, every one of them.
#[test]
fn a_subscriber_watching_other_processes_costs_no_allocation() {
    let (records, commands) = records::benchmark(64, 16, 64 * 1024);
    let batches: Vec<&[Vec<u8>]> = records.chunks(256).collect();
    let (warm, measured) = batches.split_at(batches.len() / 2);
    for (comm, watched) in [("other", false), ("redis-benchmark", true)] {
        let mut node = Node::new(comm);
        let mut subscriber = node.shared.events.subscribe();
        node.shared
            .set_watch_interest(Some(Arc::new(records::WatchesComm(comm))));
        let mut received = 0;
        let mut drain = |subscriber: &mut tokio::sync::broadcast::Receiver<_>| {
            while subscriber.try_recv().is_ok() {
                received += 1;
            }
        };
        for batch in warm {
            node.run(batch, false);
            drain(&mut subscriber);
        }
        let allocations: u64 = measured
            .iter()
            .map(|batch| {
                let made = node.run(batch, true);
                drain(&mut subscriber);
                made
            })
            .sum();
        assert_eq!(node.events(), 2 * commands as u64);
        if watched {
            assert!(allocations > 0, "watched events are built");
            assert_eq!(received, 2 * commands, "every watched event is shared");
        } else {
            assert_eq!(allocations, 0, "heap allocations in the second half");
            assert_eq!(received, 0, "events of processes nobody watches");
        }
    }
}
