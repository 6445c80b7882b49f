//! What the packet layer must get right: whose connection it is, every address family, exact
//! accounting when the ring overflows, no packet ever dropped, replication links, and exact
//! stats under the bursts that used to overflow the ring.
use std::{
    collections::BTreeMap,
    io::{BufRead, Write},
    process::{Command, Stdio},
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use respwatch_common::{Direction, LossReason};
use respwatch_resp::correlate::Role;
use respwatchd::{capture::CaptureConfig, pipeline::monotonic_ns};

use crate::{
    commandstats::{assert_matches_redis, client_rows_of, daemon_rows, redis_stats},
    kernel,
    redis::{client_script, preexisting_client},
    support::{Harness, RedisServer, WAIT, node_modules, python},
};

fn run_to_end(command: &mut Command) -> (u32, String) {
    let child = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("client starts");
    let pid = child.id();
    let out = child.wait_with_output().expect("client ran");
    assert!(out.status.success(), "{out:?}");
    (pid, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every connection to the server is named after the process that owns it — at the packet layer
/// the task running a hook is often another one — on both ends, for every kind of client.
/// A connection belongs to the process that connected (or listened, for accepted ones): after a
/// fork, a child's commands on an inherited connection stay its parent's.
#[test]
fn each_connection_is_named_after_its_owning_process() {
    let harness = Harness::get();
    let _recording = harness.recording();
    let server = RedisServer::start(&[]);
    let port = server.port.to_string();
    let mut clients: BTreeMap<u32, &str> = BTreeMap::new();
    let (pid, _) = run_to_end(
        Command::new("redis-benchmark")
            .args(["-p", &port, "-q", "-c", "3", "-n", "300", "-t", "set,get"]),
    );
    clients.insert(pid, "redis-benchmark");
    let (pid, _) = run_to_end(Command::new("redis-cli").args(["-p", &port, "SET", "a", "b"]));
    clients.insert(pid, "redis-cli");
    let (pid, _) = run_to_end(
        Command::new(python())
            .arg(client_script("redispy_workload.py"))
            .arg(&port),
    );
    clients.insert(pid, "python");
    let (pid, _) = run_to_end(
        Command::new("node")
            .arg(client_script("ioredis_pipeline.js"))
            .arg(&port)
            .env("NODE_PATH", node_modules()),
    );
    clients.insert(pid, "node");
    let (_, pids) = run_to_end(
        Command::new(python())
            .arg(client_script("fork_after_connect.py"))
            .arg(&port),
    );
    let (parent, child): (u32, u32) = pids
        .split_whitespace()
        .map(|pid| pid.parse().expect("pid"))
        .collect::<Vec<u32>>()
        .try_into()
        .map(|[parent, child]: [u32; 2]| (parent, child))
        .expect("two pids");
    clients.insert(parent, "python");

    harness.wait_for("every client's connections", |h| {
        let owners: Vec<u32> = h
            .conns_on_port(server.port, false)
            .values()
            .map(|(pid, _)| *pid)
            .collect();
        clients.keys().all(|pid| owners.contains(pid))
    });
    for (conn, (pid, comm)) in harness.conns_on_port(server.port, false) {
        // The test's own redis-cli calls (waiting for the server, INFO) are clients too.
        let expected = clients.get(&pid).copied().unwrap_or("redis-cli");
        assert!(
            comm.starts_with(expected),
            "{conn:?} of {expected}[{pid}] named {comm}"
        );
        assert_ne!(pid, child, "the forked child owns no connection");
    }
    let server_side = harness.conns_on_port(server.port, true);
    assert!(
        server_side.len() >= 8,
        "server connections: {server_side:?}"
    );
    for (conn, (pid, comm)) in server_side {
        assert_eq!(
            (pid, comm.as_str()),
            (server.pid(), "redis-server"),
            "{conn:?}"
        );
    }
    // The child's five SETs count as the parent's.
    client_rows_of(harness, parent, &[("ping", 1), ("set", 5)]);
}

/// IPv6 and IPv4-mapped IPv6 connections are captured like IPv4 ones, with their addresses.
#[test]
fn ipv6_and_v4_mapped_connections_are_exact() {
    let harness = Harness::get();
    let _recording = harness.recording();
    let server = RedisServer::start_at("127.0.0.1 ::1", &[]);
    let (pid, _) = run_to_end(
        Command::new(python())
            .arg(client_script("ipv6_clients.py"))
            .args([server.port.to_string(), "50".to_owned()]),
    );
    assert_matches_redis(harness, &server, "IPv6 and IPv4-mapped clients");
    let peers: Vec<String> = harness
        .conns_on_port(server.port, false)
        .keys()
        .filter_map(|conn| {
            let seen = harness.seen.lock().expect("lock");
            seen.chunks
                .iter()
                .find(|c| c.conn.id == *conn && c.conn.process.pid == pid)
                .and_then(|c| c.conn.socket.map(|s| s.peer.to_string()))
        })
        .collect();
    assert!(
        peers.contains(&format!("[::1]:{}", server.port)),
        "{peers:?}"
    );
    assert!(
        peers.contains(&format!("127.0.0.1:{}", server.port)),
        "the mapped connection shows its IPv4 address: {peers:?}"
    );
    let rows = daemon_rows(harness, pid, Role::Client);
    assert_eq!(rows.get("set").map(|r| r.calls), Some(100));
}

/// A ring made small on purpose overflows under pipelined traffic. Per connection and
/// direction, the bytes delivered plus the bytes reported lost are exactly what the client
/// sent and received, on the client's side and on the server's.
#[test]
fn a_small_ring_accounts_for_every_byte_per_connection() {
    let _turn = Harness::exclusive();
    let small = Harness::start_recording(CaptureConfig {
        ring_bytes: 64 << 10,
        ..CaptureConfig::default()
    });
    let server = RedisServer::start(&[]);
    let (pid, report) = run_to_end(
        Command::new(python())
            .arg(client_script("per_connection_bytes.py"))
            .args([server.port.to_string(), "8".to_owned(), "30".to_owned()]),
    );
    let sent: Vec<(u16, u64, u64)> = report
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("json");
            let number = |key: &str| value[key].as_u64().expect("number");
            (number("port") as u16, number("sent"), number("received"))
        })
        .collect();
    assert_eq!(sent.len(), 8);
    for (port, requests, replies) in sent {
        // A connection whose every data record was lost shows only when its end is read.
        small.wait_for("both ends of the connection", |h| {
            !h.conns_on_port(port, true).is_empty() && !h.conns_on_port(port, false).is_empty()
        });
        let client = *small
            .conns_on_port(port, true)
            .keys()
            .next()
            .expect("client connection");
        let server_conn = *small
            .conns_on_port(port, false)
            .keys()
            .next()
            .expect("server connection");
        small.wait_for("both ends to close", |h| {
            h.closed(client) && h.closed(server_conn)
        });
        for (conn, out, into) in [
            (client, Direction::Egress, Direction::Ingress),
            (server_conn, Direction::Ingress, Direction::Egress),
        ] {
            assert_eq!(
                (
                    small.bytes_of_conn(conn, out),
                    small.bytes_of_conn(conn, into)
                ),
                (requests, replies),
                "port {port}: {conn:?} (pid {pid} or the server) accounted"
            );
        }
    }
    let counters = &small.shared.counters;
    wait_until("the kernel counters to be read", || {
        counters.kernel_losses[LossReason::RingFull as usize].load(Relaxed) > 0
    });
    eprintln!(
        "64 KiB ring: {} records lost in the kernel ({} bytes), {} bytes reported lost",
        counters.kernel_losses[LossReason::RingFull as usize].load(Relaxed),
        counters.kernel_lost_bytes.load(Relaxed),
        counters.lost_bytes.load(Relaxed),
    );
    assert!(
        counters.lost_bytes.load(Relaxed) > 0,
        "a 64 KiB ring kept up: the test proved nothing"
    );
}

/// A real master and replica under write load, for both snapshot formats (a length-prefixed
/// RDB, and the diskless `$EOF:<mark>` one, Redis 7's default): the replication stream is
/// recognised, nothing desyncs, and the master's stats stay exact, because what it propagates
/// is not counted as its clients' traffic.
#[test]
fn a_replication_link_keeps_the_masters_stats_exact() {
    let harness = Harness::get();
    let _turn = Harness::exclusive();
    for diskless in ["no", "yes"] {
        let desyncs_before = harness.shared.counters.desyncs.load(Relaxed);
        let replicated_before = harness.shared.counters.replicated_commands.load(Relaxed);
        let master = RedisServer::start(&[
            "--repl-diskless-sync",
            diskless,
            "--repl-diskless-sync-delay",
            "0",
        ]);
        // A snapshot with something in it, and bytes in it that look like RESP.
        master.cli(&["DEBUG", "POPULATE", "2000", "key", "64"]);
        master.cli(&[
            "SET",
            "resp-like",
            "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n",
        ]);
        let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
        wait_until("the replica to sync", || {
            replica
                .info("replication")
                .get("master_link_status")
                .map(String::as_str)
                == Some("up")
        });
        master.benchmark(&["-c", "4", "-n", "2000", "-t", "set,incr,lpush"]);
        wait_until("the replica to catch up", || {
            let offset = |server: &RedisServer, key: &str| {
                server
                    .info("replication")
                    .get(key)
                    .cloned()
                    .unwrap_or_default()
            };
            offset(&master, "master_repl_offset") == offset(&replica, "slave_repl_offset")
        });
        // The replica stops acknowledging, so that the master's counters stand still.
        replica.cli(&["REPLICAOF", "NO", "ONE"]);
        wait_until("the master to see its replica go", || {
            master
                .info("replication")
                .get("connected_slaves")
                .map(String::as_str)
                == Some("0")
        });
        assert_matches_redis(
            harness,
            &master,
            &format!("master with a replica, diskless sync {diskless}"),
        );
        let (replica_commands, _) = redis_stats(&replica);
        let replica_sets = replica_commands.get("set").map_or(0, |(c, _)| c.calls);
        assert!(replica_sets >= 2000, "the replica ran {replica_sets} SETs");
        let replicated =
            harness.shared.counters.replicated_commands.load(Relaxed) - replicated_before;
        // Each propagated command is seen twice: leaving the master, reaching the replica.
        assert!(
            replicated >= 2 * 3 * 2000,
            "{replicated} propagated commands recognised"
        );
        assert_eq!(
            harness.shared.counters.desyncs.load(Relaxed),
            desyncs_before,
            "decoder desyncs on the replication link"
        );
    }
}

/// Connections open before the daemon started — one idle, one in the middle of pipelining
/// 100 KB values — are picked up mid-stream: counted from their first whole command, attributed
/// to their processes (the kernel saw neither connect nor listen: found in /proc), and the bytes
/// before the first message start are skipped, not counted as a loss of sync.
#[test]
fn connections_open_before_the_daemon_are_picked_up_mid_stream() {
    let _turn = Harness::exclusive();
    let server = RedisServer::start(&[]);
    let python = python();
    let (mut idle, mut idle_out) = preexisting_client(&server, "idle", &[python.as_os_str()]);
    let (mut busy, busy_out) = preexisting_client(&server, "busy", &[python.as_os_str()]);
    let starting = monotonic_ns();
    let daemon = Harness::start(CaptureConfig::default());
    let ready = monotonic_ns();
    writeln!(idle.stdin.as_mut().expect("stdin"), "go").expect("go");
    let mut line = String::new();
    idle_out.read_line(&mut line).expect("done line");
    assert_eq!(line.trim(), "done");
    assert!(idle.wait().expect("idle client").success());
    std::thread::sleep(Duration::from_secs(2));
    writeln!(busy.stdin.as_mut().expect("stdin"), "stop").expect("stop");
    let busy_pid = busy.id();
    let lines: Vec<String> = busy_out.lines().map_while(Result::ok).collect();
    assert!(busy.wait().expect("busy client").success());
    let spans: Vec<(u64, u64)> = lines
        .iter()
        .filter_map(|line| {
            let (start, end) = line.split_once(' ')?;
            Some((start.parse().ok()?, end.parse().ok()?))
        })
        .collect();
    // Every batch sent after the programs were attached is counted; none sent before the
    // daemon started can be.
    let after_ready = 8 * spans.iter().filter(|(start, _)| *start > ready).count() as u64;
    let after_start = 8 * spans.iter().filter(|(_, end)| *end > starting).count() as u64;
    assert!(
        after_ready >= 8,
        "the busy client sent nothing under the daemon"
    );

    client_rows_of(&daemon, idle.id(), &[("set", 100), ("get", 100)]);
    wait_until("the busy client's SETs", || {
        daemon_rows(&daemon, busy_pid, Role::Client)
            .get("set")
            .is_some_and(|row| row.calls >= after_ready)
    });
    let busy_rows = daemon_rows(&daemon, busy_pid, Role::Client);
    let sets = busy_rows["set"].calls;
    assert!(
        sets <= after_start,
        "{sets} SETs counted, only {after_start} sent after the daemon started"
    );
    assert_eq!(
        busy_rows.keys().collect::<Vec<_>>(),
        ["set"],
        "nothing but SETs decoded from the busy connection"
    );
    let server_rows = daemon_rows(&daemon, server.pid(), Role::Server);
    let server_sets = server_rows.get("set").map_or(0, |row| row.calls);
    assert!(
        (after_ready + 100..=after_start + 100).contains(&server_sets),
        "server side: {server_sets} SETs, expected {after_ready}..={after_start} + 100; {}",
        daemon.diagnostics()
    );
    assert_eq!(server_rows.get("get").map(|row| row.calls), Some(100));
    let counters = &daemon.shared.counters;
    assert_eq!(
        counters.desyncs.load(Relaxed),
        0,
        "{}",
        daemon.diagnostics()
    );
    eprintln!(
        "busy client: {sets} SETs counted, {after_ready}..={after_start} possible; {} bytes \
         skipped joining mid-stream",
        counters.mid_stream_skipped_bytes.load(Relaxed)
    );
}

/// Which data segments the lossy link drops.
#[derive(Clone, Copy)]
enum Loss {
    /// This percentage, at random.
    Percent(u32),
    /// The first transmission of each segment that starts a large request.
    RequestHeads,
}

/// A network namespace joined to the host by a veth pair with segmentation offloads off, and
/// a tc program on the host end that drops data segments in both directions. Removed on drop.
struct LossyLink {
    namespace: String,
    host_addr: &'static str,
}

impl LossyLink {
    const HOST_ADDR: &'static str = "10.213.0.1";
    const NS_ADDR: &'static str = "10.213.0.2";

    fn new(loss: Loss) -> Self {
        let mode = match loss {
            Loss::Percent(percent) => format!("-DDROP_PERCENT={percent}"),
            Loss::RequestHeads => "-DDROP_REQUEST_HEADS".to_owned(),
        };
        let id = std::process::id() % 100_000;
        let namespace = format!("rwtest{id}");
        let (host, inside) = (format!("rwh{id}"), format!("rwn{id}"));
        let object = std::env::temp_dir().join(format!("drop-data-segments-{id}.o"));
        let source = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/lossy_link/drop_data_segments.c"
        );
        let link = Self {
            namespace: namespace.clone(),
            host_addr: Self::HOST_ADDR,
        };
        let script = format!(
            "set -e
             clang-22 -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu {mode} \
               -c {source} -o {object}
             ip netns add {namespace}
             ip link add {host} type veth peer name {inside}
             ip link set {inside} netns {namespace}
             ip addr add {host_addr}/30 dev {host}
             ip link set {host} up
             ip netns exec {namespace} ip addr add {ns_addr}/30 dev {inside}
             ip netns exec {namespace} ip link set {inside} up
             ip netns exec {namespace} ip link set lo up
             ethtool -K {host} tso off gso off gro off >/dev/null
             ip netns exec {namespace} ethtool -K {inside} tso off gso off gro off >/dev/null
             tc qdisc add dev {host} clsact
             tc filter add dev {host} ingress bpf direct-action obj {object} sec tc
             tc filter add dev {host} egress bpf direct-action obj {object} sec tc",
            object = object.display(),
            host_addr = Self::HOST_ADDR,
            ns_addr = Self::NS_ADDR,
        );
        let out = Command::new("sh")
            .args(["-c", &script])
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "setting up the lossy link: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        link
    }

    /// A command run inside the namespace.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.namespace, program]);
        command
    }

    /// TCP retransmissions in the namespace and on the host.
    fn retransmissions(&self) -> u64 {
        let inside = self
            .command("cat")
            .arg("/proc/net/snmp")
            .output()
            .expect("snmp in the namespace");
        kernel::retransmitted_segments(&String::from_utf8_lossy(&inside.stdout))
            + kernel::retransmitted_segments(
                &std::fs::read_to_string("/proc/net/snmp").expect("snmp"),
            )
    }
}

impl Drop for LossyLink {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair, and with it the tc programs.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .status();
    }
}

/// Through a link that really loses 2% of data segments in both directions (100 KB replies
/// included), TCP retransmits and segments arrive out of order: the capture puts every stream
/// back together by sequence number, drops the retransmitted copies, and stays exact against
/// INFO commandstats on the server and against Redis' counts on the client.
#[test]
fn a_lossy_link_with_retransmissions_stays_exact() {
    let harness = Harness::get();
    let _turn = Harness::exclusive();
    let link = LossyLink::new(Loss::Percent(2));
    let server = RedisServer::start_at(&format!("127.0.0.1 {}", link.host_addr), &[]);
    let port = server.port.to_string();
    let duplicates_before = harness.shared.counters.duplicate_bytes.load(Relaxed);
    let retransmitted_before = link.retransmissions();
    let mut clients = Vec::new();
    for args in [
        &["-n", "20000", "-c", "10", "-P", "16", "-t", "set,get"][..],
        &["-n", "300", "-c", "4", "-d", "100000", "-t", "set,get"][..],
    ] {
        let (pid, _) = run_to_end(
            link.command("redis-benchmark")
                .args(["-h", link.host_addr, "-p", &port, "-q"])
                .args(args),
        );
        clients.push(pid);
    }
    let retransmitted = link.retransmissions() - retransmitted_before;
    assert!(
        retransmitted > 20,
        "only {retransmitted} segments retransmitted: the link lost too little to prove anything"
    );
    assert_matches_redis(
        harness,
        &server,
        "through a link losing 2% of data segments",
    );
    let (redis, _) = redis_stats(&server);
    let calls = |name: &str| redis.get(name).map_or(0, |(counts, _)| counts.calls);
    let client_sets: u64 = clients
        .iter()
        .map(|pid| {
            daemon_rows(harness, *pid, Role::Client)
                .get("set")
                .map_or(0, |row| row.calls)
        })
        .sum();
    assert_eq!(client_sets, calls("set"), "client-side SETs");
    let duplicates = harness.shared.counters.duplicate_bytes.load(Relaxed) - duplicates_before;
    eprintln!("{retransmitted} segments retransmitted, {duplicates} duplicate bytes dropped");
    assert!(duplicates > 0, "no retransmitted byte reached the capture");
}

/// The first segment of every large request is lost once, so the receiving socket gets the rest
/// of the request before its start — for a connection's first request, before the kernel has
/// seen a byte that says it is Redis. What passed the socket ahead of the start is sent ahead
/// and joins it: every request is counted, on a fresh connection as on a busy one.
#[test]
fn requests_whose_start_arrives_last_stay_exact() {
    let harness = Harness::get();
    let _turn = Harness::exclusive();
    let link = LossyLink::new(Loss::RequestHeads);
    let server = RedisServer::start_at(&format!("127.0.0.1 {}", link.host_addr), &[]);
    let retransmitted_before = link.retransmissions();
    let (client, _) = run_to_end(
        link.command("redis-benchmark")
            .args(["-h", link.host_addr, "-p", &server.port.to_string(), "-q"])
            .args(["-n", "100", "-c", "4", "-d", "100000", "-t", "set"]),
    );
    let retransmitted = link.retransmissions() - retransmitted_before;
    assert!(
        retransmitted >= 100,
        "{retransmitted} segments retransmitted: not every request start was lost"
    );
    assert_matches_redis(harness, &server, "request starts arriving last");
    let client_sets = daemon_rows(harness, client, Role::Client)
        .get("set")
        .map_or(0, |row| row.calls);
    assert_eq!(client_sets, 100, "client-side SETs");
}
