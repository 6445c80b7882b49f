//! `redisctl --cluster` end to end, everything real but the Kubernetes API server: two real
//! `respwatchd` daemons (eBPF attached) play two nodes, each serving gRPC on its own loopback
//! "pod IP" with the same port (so the port really comes from the daemon pods' `grpc` container
//! port); the API server test double lists their DaemonSet pods to the real `redisctl`, which
//! finds them, fans `watch`, `stats` and `status` out and merges the answers. Real redis-server
//! and redis-cli processes run in kubelet-named cgroups of pods on either node.
mod http;
mod kube_support;
mod ports;
mod redisctl_bin;

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Output, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use kube_support::*;
use serde_json::Value;

/// eBPF-heavy tests take turns (2 cores, and each daemon loads its own programs).
fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn pod(node: &str, namespace: &str, name: &str, ip: &str, driver: Driver) -> Pod {
    let spec = PodSpec {
        uid: String::new(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        labels: [("app".to_owned(), name.to_owned())].into_iter().collect(),
        owner: None,
        node: node.to_owned(),
        ip: ip.to_owned(),
        containers: Vec::new(),
    };
    Pod::create(spec, "app", driver)
}

fn field<'a>(value: &'a Value, name: &str) -> &'a str {
    value[name].as_str().unwrap_or_default()
}

/// `redisctl --cluster --kubeconfig <double> ...`, with no daemon address of its own.
fn cluster_cmd(kubeconfig: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(redisctl_path());
    command
        .arg("--cluster")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RESPWATCH_SERVER")
        .env_remove("KUBERNETES_SERVICE_HOST");
    command
}

/// Runs to completion, killed after `limit` so that no wait is unbounded.
fn run_bounded(mut command: Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redisctl");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn subscribers(daemon: &Daemon) -> u64 {
    daemon
        .try_status()
        .and_then(|s| s["subscribers"].as_u64())
        .unwrap_or_default()
}

/// `stats --cluster -o json`'s array, split into rows and not-answered entries.
fn stats_json(out: &Output) -> (Vec<Value>, Vec<Value>) {
    let Value::Array(items) = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stats json ({e}): {}{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    }) else {
        panic!("not an array: {}", text(&out.stdout));
    };
    items
        .into_iter()
        .partition(|item| item.get("error").is_none())
}

#[test]
fn cluster_watch_and_stats_merge_every_nodes_daemon() {
    let _turn = exclusive();
    let api = ApiServer::start();
    let port = free_port();
    // The DaemonSet's pods: node-a's daemon at 127.0.0.2:P, node-b's at 127.0.0.3:P.
    api.add_json(daemon_pod_json(
        "respwatch",
        "respwatch-aaaaa",
        "node-a",
        "127.0.0.2",
        port,
    ));
    api.add_json(daemon_pod_json(
        "respwatch",
        "respwatch-bbbbb",
        "node-b",
        "127.0.0.3",
        port,
    ));
    // Decoys discovery must leave alone: the daemon's labels in another namespace, and another
    // app in the daemon's namespace. Nothing listens there: asking them would be reported.
    api.add_json(daemon_pod_json(
        "elsewhere",
        "respwatch-zzzzz",
        "node-a",
        "127.0.0.10",
        port,
    ));
    let mut decoy = daemon_pod_json("respwatch", "other-0", "node-b", "127.0.0.11", port);
    decoy["metadata"]["labels"]["app.kubernetes.io/name"] = Value::from("other");
    api.add_json(decoy);
    // Redis in a data pod on node-a; the apps: prod on both nodes, staging on node-a.
    let mut redis = pod("node-a", "data", "redis-0", "127.0.0.5", Driver::Systemd);
    let mut prod_a = pod("node-a", "prod", "web-a", "10.244.1.10", Driver::Systemd);
    let mut prod_b = pod("node-b", "prod", "web-b", "10.244.2.10", Driver::Cgroupfs);
    let mut staging = pod(
        "node-a",
        "staging",
        "web-s",
        "10.244.1.11",
        Driver::Cgroupfs,
    );
    for p in [&redis, &prod_a, &prod_b, &staging] {
        api.add(&p.spec);
    }
    let kubeconfig = api.kubeconfig();
    let kc = kubeconfig.to_str().expect("utf-8");
    let node_a = Daemon::start_at(
        &["--kubeconfig", kc],
        "node-a",
        &format!("127.0.0.2:{port}"),
    );
    let node_b = Daemon::start_at(
        &["--kubeconfig", kc],
        "node-b",
        &format!("127.0.0.3:{port}"),
    );
    node_a.wait_synced();
    node_b.wait_synced();
    let redis_port = redis_server(&mut redis.cgroup, "127.0.0.5").to_string();

    // watch --cluster: 3 SETs from prod on node-a and 5 from prod on node-b are expected.
    let watch = cluster_cmd(
        &kubeconfig,
        &[
            "watch",
            "--namespace",
            "prod",
            "-o",
            "json",
            "--count",
            "8",
            "--duration",
            "20s",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("redisctl --cluster watch");
    wait_for("a Watch subscriber on both daemons", || {
        subscribers(&node_a) >= 1 && subscribers(&node_b) >= 1
    });
    let set = |p: &mut Pod, key: &str, times: &str| {
        p.cgroup.run(
            "redis-cli",
            &[
                "-h",
                "127.0.0.5",
                "-p",
                &redis_port,
                "-r",
                times,
                "SET",
                key,
                "v",
            ],
        );
    };
    set(&mut prod_a, "key-from-a", "3");
    set(&mut prod_b, "key-from-b", "5");
    set(&mut staging, "key-from-staging", "2");
    let out = watch.wait_with_output().expect("watch output");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "watch --cluster: {stderr}");
    assert!(stderr.is_empty(), "nothing to report: {stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let events: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("command").is_some())
        .collect();
    assert_eq!(events.len(), 8, "{stdout}");
    for event in &events {
        assert_eq!(field(event, "namespace"), "prod", "{event}");
        let expected = match field(event, "key") {
            "key-from-a" => ("node-a", "web-a"),
            "key-from-b" => ("node-b", "web-b"),
            other => panic!("unexpected key {other:?}: {event}"),
        };
        assert_eq!(
            (field(event, "node"), field(event, "pod")),
            expected,
            "{event}"
        );
        assert_eq!(field(event, "command"), "set", "{event}");
    }
    let nodes: BTreeSet<&str> = events.iter().map(|e| field(e, "node")).collect();
    assert_eq!(nodes, BTreeSet::from(["node-a", "node-b"]), "{stdout}");
    assert!(!stdout.contains("staging"), "{stdout}");

    // stats --cluster: one row per node's prod pod, with the exact counts sent.
    let expected = BTreeSet::from([
        ("node-a".to_owned(), "web-a".to_owned(), 3),
        ("node-b".to_owned(), "web-b".to_owned(), 5),
    ]);
    let deadline = Instant::now() + WAIT;
    loop {
        let out = run_bounded(
            cluster_cmd(&kubeconfig, &["stats", "--namespace", "prod", "-o", "json"]),
            WAIT,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
        let (rows, failed) = stats_json(&out);
        assert!(failed.is_empty(), "{failed:?}");
        let seen: BTreeSet<(String, String, u64)> = rows
            .iter()
            .map(|r| {
                assert_eq!(field(r, "namespace"), "prod", "{r}");
                assert_eq!(field(r, "role"), "client", "{r}");
                assert_eq!(field(r, "command"), "set", "{r}");
                (
                    field(r, "node").to_owned(),
                    field(r, "pod").to_owned(),
                    r["calls"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        if seen == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stats --cluster: {}",
            text(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The table has a NODE column; sorted by calls, node-b's 5 first.
    let out = run_bounded(
        cluster_cmd(&kubeconfig, &["stats", "-n", "prod", "--group-by", "pod"]),
        WAIT,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("NODE"), "{table}");
    assert!(
        rows[1].starts_with("node-b") && rows[1].contains("prod/web-b"),
        "{table}"
    );
    assert!(
        rows[2].starts_with("node-a") && rows[2].contains("prod/web-a"),
        "{table}"
    );
    // status --cluster: one entry per node.
    let out = run_bounded(cluster_cmd(&kubeconfig, &["status", "-o", "json"]), WAIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).expect("status json");
    let nodes: Vec<(&str, &str)> = status
        .as_array()
        .expect("array")
        .iter()
        .map(|s| (field(s, "node"), field(s, "address")))
        .collect();
    let (a, b) = (format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}"));
    assert_eq!(nodes, vec![("node-a", a.as_str()), ("node-b", b.as_str())]);
    // The discovery asked for the daemon namespace's pods by label.
    assert!(
        api.request_log()
            .iter()
            .any(|r| r.starts_with("/api/v1/namespaces/respwatch/pods?")
                && r.contains("labelSelector=app.kubernetes.io%2Fname%3Drespwatch")),
        "{:?}",
        api.request_log()
    );
}

#[test]
fn cluster_reports_unreachable_daemons_and_keeps_the_others() {
    let _turn = exclusive();
    let api = ApiServer::start();
    let port = free_port();
    let live = daemon_pod_json("respwatch", "respwatch-aaaaa", "node-a", "127.0.0.2", port);
    api.add_json(live.clone());
    // node-c's daemon pod has an IP where nothing listens; node-d's is not running yet.
    api.add_json(daemon_pod_json(
        "respwatch",
        "respwatch-ccccc",
        "node-c",
        "127.0.0.9",
        port,
    ));
    let mut pending = daemon_pod_json("respwatch", "respwatch-ddddd", "node-d", "", port);
    pending["status"]["phase"] = Value::from("Pending");
    api.add_json(pending);
    let mut redis = pod("node-a", "data", "redis-0", "127.0.0.6", Driver::Cgroupfs);
    let mut app = pod("node-a", "prod", "web-a", "10.244.1.20", Driver::Systemd);
    for p in [&redis, &app] {
        api.add(&p.spec);
    }
    let kubeconfig = api.kubeconfig();
    let node_a = Daemon::start_at(
        &["--kubeconfig", kubeconfig.to_str().expect("utf-8")],
        "node-a",
        &format!("127.0.0.2:{port}"),
    );
    node_a.wait_synced();
    let redis_port = redis_server(&mut redis.cgroup, "127.0.0.6").to_string();
    let dead = format!("127.0.0.9:{port}");

    // watch: node-c is named on stderr right away, node-a's events still come out.
    let watch = cluster_cmd(
        &kubeconfig,
        &["watch", "-n", "prod", "--count", "2", "--duration", "20s"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("redisctl --cluster watch");
    wait_for("node-a's Watch subscriber", || subscribers(&node_a) >= 1);
    app.cgroup.run(
        "redis-cli",
        &[
            "-h",
            "127.0.0.6",
            "-p",
            &redis_port,
            "-r",
            "2",
            "SET",
            "k",
            "v",
        ],
    );
    let out = watch.wait_with_output().expect("watch output");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let compact: Vec<&str> = stdout.lines().collect();
    assert_eq!(compact.len(), 2, "{stdout}");
    for line in &compact {
        // time  node  who ...: the NODE column is padded to the longest node name.
        let columns: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            columns.get(1..3),
            Some(&["node-a", "prod/web-a"][..]),
            "{line}"
        );
    }
    let c_line = stderr
        .lines()
        .find(|l| l.contains("node-c"))
        .unwrap_or_else(|| panic!("node-c reported: {stderr}"));
    assert!(
        c_line.contains(&dead) && c_line.contains("cannot reach respwatchd"),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("node-d") && l.contains("Pending")),
        "{stderr}"
    );

    // stats: node-a's rows, node-c and node-d named on stderr and in the JSON; exit 0.
    let out = run_bounded(
        cluster_cmd(&kubeconfig, &["stats", "-n", "prod", "-o", "json"]),
        WAIT,
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (rows, failed) = stats_json(&out);
    assert!(
        rows.iter()
            .any(|r| field(r, "node") == "node-a" && field(r, "pod") == "web-a" && r["calls"] == 2),
        "{rows:?}"
    );
    let failed: Vec<(&str, &str)> = failed
        .iter()
        .map(|f| (field(f, "node"), field(f, "address")))
        .collect();
    assert_eq!(failed, vec![("node-d", ""), ("node-c", dead.as_str())]);
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("node-c") && l.contains(&dead)),
        "{stderr}"
    );
    // The table says so under the rows.
    let out = run_bounded(cluster_cmd(&kubeconfig, &["stats", "-n", "prod"]), WAIT);
    assert!(
        text(&out.stdout).contains("1 of 3 nodes answered; not answered: node-d, node-c"),
        "{}",
        text(&out.stdout)
    );

    // Only unreachable daemons left: a non-zero exit that says why.
    api.delete_json(live);
    let out = run_bounded(cluster_cmd(&kubeconfig, &["stats"]), WAIT);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stats failed on all 2 node(s)") && stderr.contains(&dead),
        "{stderr}"
    );
    let out = run_bounded(
        cluster_cmd(&kubeconfig, &["watch", "--duration", "10s"]),
        WAIT,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("watch failed on all 2 node(s)"), "{stderr}");
}

/// No daemon pods, no API server, no kubeconfig: one clear line each, exit 1. (No daemon
/// runs here, so no eBPF: no turn needed.)
#[test]
fn cluster_discovery_failures_say_what_was_tried() {
    let api = ApiServer::start();
    let app = PodSpec {
        uid: pod_uid(),
        namespace: "prod".to_owned(),
        name: "web-0".to_owned(),
        labels: Default::default(),
        owner: None,
        node: "node-a".to_owned(),
        ip: "10.244.1.30".to_owned(),
        containers: vec![("app".to_owned(), container_id())],
    };
    api.add(&app);
    let kubeconfig = api.kubeconfig();
    for sub in [&["stats"][..], &["watch"], &["status"]] {
        let out = run_bounded(cluster_cmd(&kubeconfig, sub), WAIT);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{sub:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains("no respwatchd pods in namespace \"respwatch\"")
                && stderr.contains("app.kubernetes.io/name=respwatch"),
            "{stderr}"
        );
    }
    // Other flags, other names in the message.
    let out = run_bounded(
        cluster_cmd(
            &kubeconfig,
            &[
                "--daemon-namespace",
                "obs",
                "--daemon-selector",
                "app=rw",
                "stats",
            ],
        ),
        WAIT,
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("namespace \"obs\" match \"app=rw\""),
        "{stderr}"
    );
    // The API server is gone: the message names it and the kubeconfig.
    let server = format!("http://127.0.0.1:{}", api.port);
    api.go_away();
    let out = run_bounded(cluster_cmd(&kubeconfig, &["stats"]), WAIT);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("cannot list respwatchd pods")
            && stderr.contains(&server)
            && stderr.contains(&kubeconfig.display().to_string()),
        "{stderr}"
    );
    // No kubeconfig anywhere and not in a cluster.
    let out = run_bounded(
        {
            let mut command = Command::new(redisctl_path());
            command
                .args(["--cluster", "stats"])
                .env_remove("KUBECONFIG")
                .env_remove("KUBERNETES_SERVICE_HOST")
                .env("HOME", "/nonexistent");
            command
        },
        WAIT,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("no Kubernetes configuration") && stderr.contains("--kubeconfig"),
        "{stderr}"
    );
    // top stays single-node and says so.
    let out = run_bounded(cluster_cmd(&kubeconfig, &["top", "--once"]), WAIT);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("top shows one daemon"));
}
