//! The daemon's server-role stats for a real redis-server, command by command, against what
//! Redis itself counts in `INFO commandstats` and `INFO errorstats`.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use respwatch_resp::correlate::Role;
use respwatchd::{
    aggregate::{GroupBy, RowStats},
    event::UNKNOWN_COMMAND,
};

use crate::support::{Harness, RedisServer, WAIT, node_modules, python};

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) calls: u64,
    pub(crate) rejected_calls: u64,
    pub(crate) failed_calls: u64,
}

fn parse_fields(text: &str) -> BTreeMap<&str, &str> {
    text.split(',')
        .filter_map(|field| field.split_once('='))
        .collect()
}

/// `INFO commandstats errorstats` in one call, so both describe the same moment.
pub(crate) fn redis_stats(
    server: &RedisServer,
) -> (BTreeMap<String, (Counts, u64)>, BTreeMap<String, u64>) {
    let mut commands = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for (key, value) in server.info("commandstats errorstats") {
        let fields = parse_fields(&value);
        let number = |name: &str| {
            fields
                .get(name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if let Some(command) = key.strip_prefix("cmdstat_") {
            let counts = Counts {
                calls: number("calls"),
                rejected_calls: number("rejected_calls"),
                failed_calls: number("failed_calls"),
            };
            commands.insert(command.to_owned(), (counts, number("usec")));
        } else if let Some(prefix) = key.strip_prefix("errorstat_") {
            errors.insert(prefix.to_owned(), number("count"));
        }
    }
    (commands, errors)
}

pub(crate) fn daemon_rows(harness: &Harness, pid: u32, role: Role) -> BTreeMap<String, RowStats> {
    let aggregator = harness.shared.aggregator.lock().expect("lock");
    aggregator
        .query(
            |key| key.pid == pid && key.role == role,
            &[GroupBy::Command],
            None,
        )
        .into_iter()
        .map(|(key, stats)| (key.command, stats))
        .collect()
}

/// Compares the daemon's server-role rows for `server` with Redis' own counters; returns the
/// comparison table. The INFO call made here is counted by the daemon but not yet by Redis.
pub(crate) fn assert_matches_redis(harness: &Harness, server: &RedisServer, case: &str) -> String {
    let (redis, redis_errors) = redis_stats(server);
    let expected_info = redis.get("info").map(|(c, _)| c.calls).unwrap_or(0) + 1;
    let deadline = Instant::now() + WAIT;
    let ours = loop {
        let rows = daemon_rows(harness, server.pid(), Role::Server);
        if rows.get("info").map(|r| r.calls) == Some(expected_info) {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "{case}: the daemon never saw the INFO call; rows: {:?}; {}",
            rows.keys(),
            harness.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(20));
    };

    let mut table = format!(
        "{case}\n{:<16} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6} {:>11} {:>11}\n",
        "command", "calls", "ours", "rej", "ours", "fail", "ours", "usec", "ours usec"
    );
    let names: BTreeSet<&String> = redis.keys().chain(ours.keys()).collect();
    let mut mismatches = Vec::new();
    let none = Counts::default();
    for name in names {
        if name == UNKNOWN_COMMAND {
            continue;
        }
        let (theirs, usec) = redis.get(name).map(|(c, u)| (c, *u)).unwrap_or((&none, 0));
        let mine = ours.get(name).cloned().unwrap_or_default();
        let mut mine_counts = Counts {
            calls: mine.calls,
            rejected_calls: mine.rejected_calls,
            failed_calls: mine.failed_calls,
        };
        if name == "info" {
            mine_counts.calls -= 1; // the INFO above
        }
        let _ = writeln!(
            table,
            "{name:<16} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6} {:>11} {:>11}",
            theirs.calls,
            mine_counts.calls,
            theirs.rejected_calls,
            mine_counts.rejected_calls,
            theirs.failed_calls,
            mine_counts.failed_calls,
            usec,
            mine.usec()
        );
        if &mine_counts != theirs {
            mismatches.push(format!("{name}: redis {theirs:?}, ours {mine_counts:?}"));
        }
        // Ours is wire latency (request read → reply written), which contains Redis' own
        // execution time; allow 1 µs per call for Redis rounding each call's usec. PSYNC writes
        // `+FULLRESYNC` before its work (forking the snapshot) is done, and a replica's
        // `REPLCONF ACK` gets no reply at all (no latency).
        if !matches!(name.as_str(), "info" | "psync" | "sync" | "replconf") && mine.calls > 0 {
            assert!(
                mine.usec() + mine.calls >= usec,
                "{case}: {name} usec {} below Redis' {usec}",
                mine.usec()
            );
        }
    }
    let mut our_errors: BTreeMap<String, u64> = BTreeMap::new();
    for stats in ours.values() {
        for (prefix, count) in &stats.errors {
            *our_errors.entry(prefix.clone()).or_default() += count;
        }
    }
    let _ = writeln!(
        table,
        "errorstats redis {redis_errors:?} ours {our_errors:?}"
    );
    eprintln!("{table}");
    assert!(
        mismatches.is_empty(),
        "{case}: commandstats differ:\n{}\n{table}\n{}",
        mismatches.join("\n"),
        harness.diagnostics()
    );
    assert_eq!(
        our_errors, redis_errors,
        "{case}: errorstats differ\n{table}"
    );
    table
}

pub(crate) fn client_rows_of(harness: &Harness, pid: u32, expect: &[(&str, u64)]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let rows = daemon_rows(harness, pid, Role::Client);
        let calls: BTreeMap<&str, u64> = expect
            .iter()
            .map(|(name, _)| (*name, rows.get(*name).map(|r| r.calls).unwrap_or(0)))
            .collect();
        if expect.iter().all(|(name, n)| calls[name] == *n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "client-role calls {calls:?}, expected {expect:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn redis_benchmark_default_tests_match_commandstats() {
    let harness = Harness::get();
    let _turn = Harness::exclusive();
    for (case, args) in [
        ("default tests, -P 1", &["-c", "10", "-n", "2000"][..]),
        (
            "default tests, -P 16",
            &["-c", "10", "-n", "2000", "-P", "16"][..],
        ),
        (
            "-d 100000",
            &[
                "-c",
                "2",
                "-n",
                "200",
                "-d",
                "100000",
                "-t",
                "set,get,lpush,lpop",
            ][..],
        ),
    ] {
        let server = RedisServer::start(&[]);
        server.benchmark(args);
        assert_matches_redis(harness, &server, case);
    }
}

/// redis-benchmark's own client connections, seen from its side, count exactly what Redis
/// executed. Without pipelining that is exactly `-n` per test; with `-P 16` redis-benchmark
/// really sends up to one extra pipeline per client past `-n` (Redis counts those too).
#[test]
fn redis_benchmark_client_role_counts_what_it_sent() {
    let harness = Harness::get();
    let _turn = Harness::exclusive();
    let commands = ["set", "get", "incr", "lpush"];
    for pipeline in ["1", "16"] {
        let server = RedisServer::start(&[]);
        let child = Command::new("redis-benchmark")
            .args([
                "-p",
                &server.port.to_string(),
                "-q",
                "-c",
                "8",
                "-n",
                "5000",
                "-P",
                pipeline,
            ])
            .args(["-t", &commands.join(",")])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-benchmark");
        let pid = child.id();
        assert!(child.wait_with_output().expect("ran").status.success());
        let (redis, _) = redis_stats(&server);
        let executed: Vec<(&str, u64)> = commands
            .iter()
            .map(|name| (*name, redis.get(*name).map(|(c, _)| c.calls).unwrap_or(0)))
            .collect();
        if pipeline == "1" {
            assert!(
                executed.iter().all(|(_, calls)| *calls == 5000),
                "redis executed {executed:?}"
            );
        }
        eprintln!("redis-benchmark -n 5000 -P {pipeline}: redis executed {executed:?}");
        client_rows_of(harness, pid, &executed);
    }
}

#[test]
fn redis_py_and_ioredis_protocol_states_match_commandstats() {
    let harness = Harness::get();
    let _turn = Harness::exclusive();
    let server = RedisServer::start(&[]);
    let py = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/redispy_semantics.py"
        ))
        .arg(server.port.to_string())
        .output()
        .expect("python");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let node = Command::new("node")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/ioredis_semantics.js"
        ))
        .arg(server.port.to_string())
        .env("NODE_PATH", node_modules())
        .output()
        .expect("node");
    assert!(
        node.status.success(),
        "{}",
        String::from_utf8_lossy(&node.stderr)
    );
    assert_matches_redis(
        harness,
        &server,
        "redis-py + ioredis: MULTI/EXEC, WATCH, pipelines, pub/sub, BLPOP, RESP3",
    );
}

#[test]
fn errors_match_errorstats() {
    let harness = Harness::get();
    let _turn = Harness::exclusive();
    let server = RedisServer::start(&[]);
    let script = "SET s text\nLPUSH s x\nGET\nSET onlykey\nFOOBAR 1 2\nCONFIG FOO\nCONFIG\nINCR s\n\
                  MULTI\nSET a 1\nGET\nEXEC\nEXEC\nDISCARD\nSET big 1\nCONFIG SET maxmemory 1\n\
                  SET other 2\nGET s\nCONFIG SET maxmemory 0\nSET after 1\n";
    let mut child = Command::new("redis-cli")
        .args(["-p", &server.port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), script.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("redis-cli ran");
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "WRONGTYPE",
        "wrong number of arguments",
        "unknown command",
        "OOM command not allowed",
        "EXECABORT",
    ] {
        assert!(
            text.contains(expected),
            "redis-cli output lacks {expected}: {text}"
        );
    }
    assert_matches_redis(
        harness,
        &server,
        "errors: WRONGTYPE, arity, unknown command/subcommand, EXECABORT, OOM",
    );
}
