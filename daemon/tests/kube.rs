//! Kubernetes attribution end to end, everything real but the API server: the real
//! `respwatchd` (eBPF attached) reads a kubeconfig pointing at an API server test double that
//! speaks the Kubernetes wire format (PodList, chunked newline-delimited watch events,
//! bookmarks, 410 Gone, outages); real redis-server and redis-cli processes run in cgroup v2
//! hierarchies named exactly as kubelet names them (systemd and cgroupfs drivers); the real
//! `redisctl` and `/metrics` read the result.
mod http;
mod kube_support;
mod ports;
mod redisctl_bin;

use std::{
    collections::{BTreeMap, BTreeSet},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use kube_support::*;
use serde_json::Value;

/// eBPF-heavy tests take turns (2 cores, and each loads its own programs).
fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one pod per call, fields in manifest order"
)]
fn pod(
    node: &str,
    namespace: &str,
    name: &str,
    container: &str,
    ip: &str,
    owner: Option<(&str, &str)>,
    pod_labels: &[(&str, &str)],
    driver: Driver,
) -> Pod {
    let spec = PodSpec {
        uid: String::new(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        labels: labels(pod_labels),
        owner: owner.map(|(k, n)| (k.to_owned(), n.to_owned())),
        node: node.to_owned(),
        ip: ip.to_owned(),
        containers: Vec::new(),
    };
    Pod::create(spec, container, driver)
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn field<'a>(value: &'a Value, name: &str) -> &'a str {
    value[name].as_str().unwrap_or_default()
}

/// Keeps polling GetStatus and records each distinct `kubernetes_sync` value in order.
struct SyncRecorder {
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SyncRecorder {
    fn start(grpc: &str) -> SyncRecorder {
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2, grpc) = (Arc::clone(&seen), Arc::clone(&stop), grpc.to_owned());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let out = Command::new(redisctl_path())
                    .args(["--server", &grpc, "status", "-o", "json"])
                    .output();
                if let Ok(out) = out
                    && let Ok(status) = serde_json::from_slice::<Value>(&out.stdout)
                {
                    let state = field(&status, "kubernetes_sync").to_owned();
                    let mut seen = seen2.lock().expect("seen");
                    if seen.last() != Some(&state) {
                        seen.push(state);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        SyncRecorder {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn states(&self) -> Vec<String> {
        self.seen.lock().expect("seen").clone()
    }

    fn wait_for(&self, what: &str, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(&self.states()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; sync states seen: {:?}",
                self.states()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SyncRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A `respwatch_commands_total` series' labels, for series of `pod`.
fn command_series(metrics: &str, pod: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("respwatch_commands_total{"))
        .filter(|l| l.contains(&format!("pod=\"{pod}\"")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn pods_namespaces_labels_and_workloads_from_the_pod_watcher() {
    let _turn = exclusive();
    let node = "node-a";
    let api = ApiServer::start();
    // The Redis server: a StatefulSet pod (systemd driver), on its own loopback "pod IP".
    let mut redis = pod(
        node,
        "data",
        "redis-0",
        "redis",
        "127.0.0.2",
        Some(("StatefulSet", "redis")),
        &[("app", "redis")],
        Driver::Systemd,
    );
    let mut prod = pod(
        node,
        "prod",
        "web-5d8f7c9b6-x2x9k",
        "app",
        "10.244.1.10",
        Some(("ReplicaSet", "web-5d8f7c9b6")),
        &[
            ("app", "web"),
            ("tier", "fe"),
            ("pod-template-hash", "5d8f7c9b6"),
        ],
        Driver::Systemd,
    );
    let mut staging = pod(
        node,
        "staging",
        "web-7f6d5c4b3-q8w7e",
        "app",
        "10.244.1.11",
        Some(("ReplicaSet", "web-7f6d5c4b3")),
        &[
            ("app", "web"),
            ("tier", "canary"),
            ("pod-template-hash", "7f6d5c4b3"),
        ],
        Driver::Cgroupfs,
    );
    // A pod on another node: the field selector keeps it away from this daemon.
    let elsewhere = pod(
        "node-b",
        "prod",
        "web-5d8f7c9b6-other",
        "app",
        "10.244.2.10",
        None,
        &[],
        Driver::Cgroupfs,
    );
    for p in [&redis, &prod, &staging, &elsewhere] {
        api.add(&p.spec);
    }
    let kubeconfig = api.kubeconfig();
    let daemon = Daemon::start(
        &[
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8"),
            "--expire-seconds",
            "2",
            "--pod-grace-seconds",
            "2",
            "--metrics-labels",
            "namespace,pod,container,role,command,workload",
        ],
        node,
    );
    daemon.wait_synced();
    let requests = api.request_log();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "the daemon lists this node's pods only: {requests:?}"
    );
    // The watch starts right after the list is in (the sync state can be ahead of it).
    wait_for("a watch with bookmarks", || {
        api.request_log()
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true"))
    });
    let port = redis_server(&mut redis.cgroup, "127.0.0.2").to_string();

    let before = daemon.try_status().expect("status")["subscribers"]
        .as_u64()
        .unwrap_or_default();
    let watch = |args: &[&str]| {
        daemon
            .redisctl()
            .arg("watch")
            .args(args)
            .args(["-o", "json", "--duration", "5s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("redisctl watch")
    };
    let prod_watch = watch(&["--namespace", "prod"]);
    let label_watch = watch(&["-l", "app=web,tier=fe"]);
    wait_for("two watch subscribers", || {
        daemon
            .try_status()
            .and_then(|s| s["subscribers"].as_u64())
            .unwrap_or_default()
            >= before + 2
    });
    // The apps: real redis-py clients that SET once and stay (long-running app pods), one
    // per namespace, and one on the host.
    for (cgroup, key) in [
        (&mut prod.cgroup, "prodkey"),
        (&mut staging.cgroup, "stagingkey"),
    ] {
        let (program, args) = python_app(&port, "127.0.0.2", key);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cgroup.spawn(&program, &args);
        wait_for_key("127.0.0.2", &port, key);
    }
    let (program, args) = python_app(&port, "127.0.0.2", "hostkey");
    let mut host_command = Command::new(program);
    host_command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    die_with_parent(&mut host_command);
    let host = KillOnDrop(host_command.spawn().expect("host app"));
    wait_for_key("127.0.0.2", &port, "hostkey");

    let outputs: Vec<String> = [prod_watch, label_watch]
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().expect("watch output");
            assert!(
                out.status.success(),
                "redisctl watch: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect();
    for (name, output) in ["--namespace prod", "-l app=web,tier=fe"]
        .iter()
        .zip(&outputs)
    {
        let lines = json_lines(output);
        // A busy shared machine can make a subscriber lag: that is reported (never silent),
        // and only then may prod's own events be missing.
        let lost = lines.iter().any(|l| l.get("lost_events").is_some());
        let events: Vec<&Value> = lines
            .iter()
            .filter(|l| l.get("command").is_some())
            .collect();
        let keys: BTreeSet<&str> = events
            .iter()
            .map(|e| field(e, "key"))
            .filter(|k| !k.is_empty())
            .collect();
        assert!(
            keys == BTreeSet::from(["prodkey"]) || (lost && keys.is_empty()),
            "watch {name} shows prod's commands and nothing else: {output}"
        );
        for event in events {
            assert_eq!(field(event, "namespace"), "prod", "{event}");
            assert_eq!(field(event, "pod"), "web-5d8f7c9b6-x2x9k", "{event}");
            assert_eq!(field(event, "container"), "app", "{event}");
            assert_eq!(field(event, "workload"), "web", "{event}");
            assert_eq!(field(event, "workload_kind"), "Deployment", "{event}");
            assert_eq!(field(event, "role"), "client", "{event}");
            assert_eq!(field(event, "peer_pod"), "data/redis-0", "{event}");
        }
    }

    // GetStats (through redisctl) carries the same names.
    let rows = daemon.stats(&["-A"]);
    let find = |ns: &str, role: &str| -> Vec<&Value> {
        rows.iter()
            .filter(|r| field(r, "namespace") == ns && field(r, "role") == role)
            .filter(|r| field(r, "command") == "set")
            .collect()
    };
    let prod_rows = find("prod", "client");
    assert_eq!(prod_rows.len(), 1, "{rows:?}");
    let row = prod_rows[0];
    assert_eq!(field(row, "pod"), "web-5d8f7c9b6-x2x9k");
    assert_eq!(field(row, "container"), "app");
    assert_eq!(field(row, "workload"), "web");
    assert_eq!(field(row, "workload_kind"), "Deployment");
    assert_eq!(row["calls"], 1);
    let server_rows = find("data", "server");
    assert_eq!(server_rows.len(), 1, "{rows:?}");
    assert_eq!(field(server_rows[0], "pod"), "redis-0");
    assert_eq!(field(server_rows[0], "container"), "redis");
    assert_eq!(field(server_rows[0], "workload"), "redis");
    assert_eq!(field(server_rows[0], "workload_kind"), "StatefulSet");
    assert_eq!(
        server_rows[0]["calls"], 3,
        "prod, staging and the host each SET once"
    );
    // Host processes keep namespace "" (and no pod).
    assert!(
        rows.iter().any(|r| field(r, "namespace").is_empty()
            && field(r, "pod").is_empty()
            && r["pid"] == host.0.id()),
        "{rows:?}"
    );
    // Label selectors act on GetStats too.
    let selected = daemon.stats(&["-l", "app=web,tier!=fe"]);
    assert!(!selected.is_empty());
    assert!(
        selected.iter().all(|r| field(r, "namespace") == "staging"),
        "{selected:?}"
    );

    // /metrics: namespace, pod, container and workload on the command series (fed once a
    // second).
    wait_for("the prod pod's series", || {
        !command_series(&daemon.metrics(), "web-5d8f7c9b6-x2x9k").is_empty()
    });
    let metrics = daemon.metrics();
    let series = command_series(&metrics, "web-5d8f7c9b6-x2x9k");
    assert!(
        series.contains(
            &"respwatch_commands_total{namespace=\"prod\",pod=\"web-5d8f7c9b6-x2x9k\",container=\"app\",role=\"client\",command=\"set\",workload=\"web\"} 1"
                .to_owned()
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("respwatch_kubernetes_synced 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "respwatch_pod_info{namespace=\"data\",pod=\"redis-0\",workload=\"redis\",workload_kind=\"StatefulSet\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        !metrics.contains("web-5d8f7c9b6-other"),
        "pods of other nodes are not watched"
    );

    // The prod pod is deleted (its app still runs: the pod's deletion, not the process' exit,
    // ends the series): the series stays for the 2s grace period, then goes.
    api.delete(&prod.spec);
    let deleted_at = Instant::now();
    wait_for("the deleted pod's series to go", || {
        command_series(&daemon.metrics(), "web-5d8f7c9b6-x2x9k").is_empty()
    });
    assert!(
        deleted_at.elapsed() >= Duration::from_millis(1500),
        "the series outlived the 2s pod grace period (went after {:?})",
        deleted_at.elapsed()
    );
    assert!(
        !command_series(&daemon.metrics(), "redis-0").is_empty(),
        "live pods keep their series"
    );
    drop(elsewhere);
}

#[test]
fn api_server_outage_and_410_gone_lose_nothing() {
    let _turn = exclusive();
    let node = "node-o";
    let api = ApiServer::start();
    let mut redis = pod(
        node,
        "data",
        "redis-0",
        "redis",
        "127.0.0.3",
        Some(("StatefulSet", "redis")),
        &[],
        Driver::Cgroupfs,
    );
    api.add(&redis.spec);
    let kubeconfig = api.kubeconfig();
    let daemon = Daemon::start(
        &[
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8"),
            "--kubernetes",
            "on",
            "--kubernetes-retry-max-seconds",
            "1",
        ],
        node,
    );
    daemon.wait_synced();
    let port = redis_server(&mut redis.cgroup, "127.0.0.3").to_string();
    let recorder = SyncRecorder::start(&daemon.grpc);
    recorder.wait_for("synced", |s| s.last().is_some_and(|l| l == "synced"));

    // The API server goes away.
    api.go_away();
    recorder.wait_for("unreachable", |s| {
        s.last().is_some_and(|l| l.starts_with("unreachable: "))
    });
    // Meanwhile a pod starts and sends 20 commands: capture goes on.
    let mut late = pod(
        node,
        "prod",
        "late-0",
        "worker",
        "10.244.3.3",
        Some(("Job", "late")),
        &[("app", "late")],
        Driver::Systemd,
    );
    api.add(&late.spec);
    late.cgroup.run(
        "redis-cli",
        &["-h", "127.0.0.3", "-p", &port, "-r", "20", "INCR", "late"],
    );
    let short = &late.spec.containers[0].1[..12];
    wait_for("the outage's commands to be counted", || {
        daemon
            .stats(&["--role", "client", "--command", "incr"])
            .iter()
            .any(|r| field(r, "container") == short && r["calls"] == 20)
    });
    assert!(
        daemon.sync_state().starts_with("unreachable: "),
        "{}",
        daemon.sync_state()
    );

    // It comes back: the watcher re-lists and the rows catch up with the pod's names.
    api.come_back();
    recorder.wait_for("synced again", |s| {
        s.iter()
            .position(|x| x.starts_with("unreachable"))
            .is_some_and(|i| s[i..].iter().any(|x| x == "synced"))
    });
    let rows = daemon.stats(&["-n", "prod", "--role", "client", "--command", "incr"]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(field(&rows[0], "pod"), "late-0");
    assert_eq!(field(&rows[0], "container"), "worker");
    assert_eq!(field(&rows[0], "workload"), "late");
    assert_eq!(field(&rows[0], "workload_kind"), "Job");
    assert_eq!(rows[0]["calls"], 20, "no command lost during the outage");
    let server = Command::new("redis-cli")
        .args(["-h", "127.0.0.3", "-p", &port, "GET", "late"])
        .output()
        .expect("GET");
    assert_eq!(String::from_utf8_lossy(&server.stdout).trim(), "20");

    // 410 Gone: history is compacted (a pod's ADDED event is lost with it) and the open watch
    // is told so; the watcher re-lists and finds the pod.
    let (lists_before, _) = api.requests();
    let compacted = pod(
        node,
        "prod",
        "compacted-0",
        "c",
        "10.244.3.4",
        None,
        &[],
        Driver::Cgroupfs,
    );
    api.add_unlogged(&compacted.spec);
    api.expire_history();
    wait_for("a re-list after 410 Gone", || {
        api.requests().0 > lists_before
    });
    recorder.wait_for("synced after 410", |s| {
        s.last().is_some_and(|l| l == "synced")
    });
    wait_for("the compacted pod to be known", || {
        daemon
            .metrics()
            .contains("respwatch_pod_info{namespace=\"prod\",pod=\"compacted-0\"")
    });
    let states = recorder.states();
    assert!(
        states.iter().any(|s| s.starts_with("resyncing: 410 Gone"))
            || api.requests().0 > lists_before,
        "{states:?}"
    );
    assert!(daemon.log_text().contains("410"), "the 410 is logged");
}

#[test]
fn without_kubernetes_the_daemon_says_disabled_and_namespaces_need_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_respwatchd"))
        .args(["--namespaces", "prod", "--grpc-listen", "127.0.0.1:0"])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("RESPWATCH_KUBECONFIG")
        .env_remove("KUBECONFIG")
        .output()
        .expect("respwatchd");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--namespaces needs Kubernetes"), "{stderr}");
}

/// Like kubectl and `redisctl --cluster`, the daemon finds its cluster through `$KUBECONFIG`
/// when no `--kubeconfig` is given.
#[test]
fn the_kubeconfig_environment_variable_is_honoured() {
    let _turn = exclusive();
    let node = "node-env";
    let api = ApiServer::start();
    let kubeconfig = api.kubeconfig();
    let grpc = format!("127.0.0.1:{}", free_port());
    let daemon =
        Daemon::start_with_env(&[], node, &grpc, &[("KUBECONFIG", kubeconfig.as_os_str())]);
    daemon.wait_synced();
    assert!(
        api.request_log()
            .iter()
            .any(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-env")),
        "the daemon listed this node's pods through $KUBECONFIG"
    );
}

#[test]
fn namespace_scope_drops_other_namespaces_in_the_daemon() {
    let _turn = exclusive();
    let node = "node-s";
    let api = ApiServer::start();
    let mut redis = pod(
        node,
        "data",
        "redis-0",
        "redis",
        "127.0.0.4",
        None,
        &[],
        Driver::Systemd,
    );
    let mut prod = pod(
        node,
        "prod",
        "p-0",
        "app",
        "10.244.4.1",
        None,
        &[],
        Driver::Cgroupfs,
    );
    let mut staging = pod(
        node,
        "staging",
        "s-0",
        "app",
        "10.244.4.2",
        None,
        &[],
        Driver::Systemd,
    );
    for p in [&redis, &prod, &staging] {
        api.add(&p.spec);
    }
    let kubeconfig = api.kubeconfig();
    let daemon = Daemon::start(
        &[
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8"),
            "--namespaces",
            "prod",
        ],
        node,
    );
    daemon.wait_synced();
    let port = redis_server(&mut redis.cgroup, "127.0.0.4").to_string();
    for (p, key) in [(&mut prod, "pk"), (&mut staging, "sk")] {
        p.cgroup.run(
            "redis-cli",
            &["-h", "127.0.0.4", "-p", &port, "SET", key, "v"],
        );
    }
    wait_for("prod's SET", || {
        daemon
            .stats(&["-A"])
            .iter()
            .any(|r| field(r, "namespace") == "prod" && field(r, "command") == "set")
    });
    let rows = daemon.stats(&["-A"]);
    let namespaces: BTreeSet<&str> = rows.iter().map(|r| field(r, "namespace")).collect();
    assert_eq!(namespaces, BTreeSet::from(["prod"]), "{rows:?}");

    // Staging's client and data's server are out of scope for good: their cgroups are then
    // skipped in the kernel, so 500 more staging commands produce no records at all, while
    // prod's client is still seen.
    // Also the host's cgroup, when the readiness check's redis-cli was seen.
    wait_for(
        "staging's and data's cgroups excluded in the kernel",
        || metric(&daemon.metrics(), "respwatch_kernel_excluded_cgroups") >= 2,
    );
    let records_before = metric(&daemon.metrics(), "respwatch_records_total");
    staging.cgroup.run(
        "redis-cli",
        &[
            "-h",
            "127.0.0.4",
            "-p",
            &port,
            "-r",
            "500",
            "SET",
            "sk",
            "v",
        ],
    );
    prod.cgroup.run(
        "redis-cli",
        &["-h", "127.0.0.4", "-p", &port, "SET", "pk", "w"],
    );
    wait_for("prod's second SET", || {
        let calls: u64 = daemon
            .stats(&["-A"])
            .iter()
            .filter(|r| field(r, "namespace") == "prod" && field(r, "command") == "set")
            .filter_map(|r| r["calls"].as_u64())
            .sum();
        calls == 2
    });
    // `/metrics` is fed once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let records = metric(&daemon.metrics(), "respwatch_records_total") - records_before;
    // Prod's one SET: a write and a read on the client side (a few more if split). Without the
    // kernel filter, staging alone would add 2 records per command on each side (2000).
    assert!(
        (2..50).contains(&records),
        "{records} records for 500 out-of-scope commands and 1 in scope"
    );
}

/// The value of an unlabelled Prometheus series.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
        .unwrap_or_else(|| panic!("no series {name} in:\n{text}"))
}

/// Every manifest in deploy/ validates offline against the Kubernetes schemas
/// (kubernetes-validate, strict: unknown fields fail); the ServiceMonitor and PrometheusRule,
/// CRDs the validator has no schema for, and the kustomization are checked for structure; the
/// kustomization lists every manifest.
#[test]
fn deploy_manifests_validate_and_kustomization_lists_them_all() {
    let deploy = repo_root().join("deploy");
    let venv = repo_root().join("target/test-env/venv/bin");
    let validator = venv.join("kubernetes-validate");
    assert!(
        validator.exists(),
        "kubernetes-validate missing: run scripts/bootstrap.sh"
    );
    let mut manifests: Vec<String> = std::fs::read_dir(&deploy)
        .expect("deploy/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .filter(|name| name != "kustomization.yaml")
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 6, "{manifests:?}");
    assert!(deploy.join("Containerfile").exists());
    // Prometheus Operator CRDs, which the validator has no schema for.
    let crds = ["servicemonitor.yaml", "prometheusrule.yaml"];
    let core: Vec<&String> = manifests
        .iter()
        .filter(|m| !crds.contains(&m.as_str()))
        .collect();
    let out = Command::new(&validator)
        .args(["--strict", "-k", "1.33.0"])
        .args(core.iter().map(|m| deploy.join(m)))
        .output()
        .expect("kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for manifest in &core {
        assert!(
            text.contains(&format!("{manifest} passed")),
            "{manifest} not validated: {text}"
        );
    }
    // Structure the schemas cannot check (PyYAML comes with kubernetes-validate).
    let script = r#"
import sys, yaml, os
d = sys.argv[1]
docs = {f: yaml.safe_load(open(os.path.join(d, f))) for f in os.listdir(d) if f.endswith('.yaml')}
k = docs.pop('kustomization.yaml')
assert k['kind'] == 'Kustomization', k
assert sorted(k['resources']) == sorted(docs), (k['resources'], sorted(docs))
rules = docs['prometheusrule.yaml']
assert (rules['apiVersion'], rules['kind']) == ('monitoring.coreos.com/v1', 'PrometheusRule'), rules
sm = docs['servicemonitor.yaml']
assert (sm['apiVersion'], sm['kind']) == ('monitoring.coreos.com/v1', 'ServiceMonitor'), sm
svc = docs['service.yaml']
labels = svc['metadata']['labels']
for key, value in sm['spec']['selector']['matchLabels'].items():
    assert labels.get(key) == value, (key, labels)
ports = {p['name'] for p in svc['spec']['ports']}
for endpoint in sm['spec']['endpoints']:
    assert endpoint['port'] in ports, (endpoint, ports)
assert svc['metadata']['namespace'] in sm['spec']['namespaceSelector']['matchNames']
ds = docs['daemonset.yaml']
pod = ds['spec']['template']['spec']
c = pod['containers'][0]
assert pod['hostPID'] is True
assert c['securityContext']['capabilities']['drop'] == ['ALL']
assert sorted(c['securityContext']['capabilities']['add']) == ['BPF', 'DAC_READ_SEARCH', 'NET_ADMIN', 'PERFMON', 'SYS_PTRACE']
assert c['securityContext'].get('privileged') is False
env = {e['name']: e for e in c['env']}
assert env['NODE_NAME']['valueFrom']['fieldRef']['fieldPath'] == 'spec.nodeName'
# TLS on the API, certificates from a Secret mounted as a directory (so rotations arrive), and
# probes on the plaintext health-only port.
args = c['args']
assert '--tls-cert=/etc/respwatch/tls/tls.crt' in args and '--tls-key=/etc/respwatch/tls/tls.key' in args, args
tls_mount = [m for m in c['volumeMounts'] if m['mountPath'] == '/etc/respwatch/tls']
assert len(tls_mount) == 1 and 'subPath' not in tls_mount[0], tls_mount
volumes = {v['name']: v for v in pod['volumes']}
assert volumes[tls_mount[0]['name']]['secret']['secretName'] == 'respwatch-tls'
health_port = {p['name']: p['containerPort'] for p in c['ports']}['health']
assert f'--health-listen=0.0.0.0:{health_port}' in args, args
assert c['livenessProbe']['grpc']['port'] == health_port and c['readinessProbe']['grpc']['port'] == health_port
mounts = {m['mountPath'] for m in c['volumeMounts']}
assert '/host/sys/fs/cgroup' in mounts, mounts
assert '--cgroup-root=/host/sys/fs/cgroup' in c['args'], c['args']
# Beyond loopback only with authorization: the daemon refuses to start otherwise.
assert '--authz=kubernetes' in c['args'], c['args']
assert svc['spec']['selector'].items() <= ds['spec']['template']['metadata']['labels'].items()
# The NetworkPolicy selects the daemon's pods and admits exactly its two ports: gRPC from
# labelled namespaces, metrics from the monitoring namespace.
policy = docs['networkpolicy.yaml']
assert policy['metadata']['namespace'] == ds['metadata']['namespace']
assert policy['spec']['podSelector']['matchLabels'].items() <= ds['spec']['template']['metadata']['labels'].items()
assert policy['spec']['policyTypes'] == ['Ingress']
container_ports = {p['name']: p['containerPort'] for p in c['ports']}
rules = {}
for rule in policy['spec']['ingress']:
    (source,) = rule['from']
    (port,) = rule['ports']
    assert port['port'] in container_ports, (port, container_ports)
    rules[port['port']] = source['namespaceSelector']['matchLabels']
assert rules == {
    'grpc': {'respwatch.io/api-access': 'true'},
    'metrics': {'kubernetes.io/metadata.name': 'monitoring'},
}, rules
role = docs['clusterrole.yaml']
assert role['rules'] == [
    {'apiGroups': [''], 'resources': ['pods', 'services'], 'verbs': ['list', 'watch']},
    {'apiGroups': ['discovery.k8s.io'], 'resources': ['endpointslices'], 'verbs': ['list', 'watch']},
    {'apiGroups': ['authentication.k8s.io'], 'resources': ['tokenreviews'], 'verbs': ['create']},
    {'apiGroups': ['authorization.k8s.io'], 'resources': ['subjectaccessreviews'], 'verbs': ['create']},
], role
binding = docs['clusterrolebinding.yaml']
sa = docs['serviceaccount.yaml']
assert binding['subjects'][0]['name'] == sa['metadata']['name'] == pod['serviceAccountName']
print('ok')
"#;
    let out = Command::new(venv.join("python"))
        .args(["-c", script])
        .arg(&deploy)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "deploy/ structure: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Remote peers are named from the cluster-wide Service and EndpointSlice watches: a client
/// connecting to a Service's cluster IP (as behind kube-proxy) sees the Service; one connecting
/// to the endpoint of a pod on another node sees that pod and its Service.
#[test]
fn peers_are_named_from_services_and_endpoint_slices() {
    let _turn = exclusive();
    let node = "node-p";
    let api = ApiServer::start();
    // The Redis behind Service data/redis: cluster IP 127.0.0.5, and one endpoint, pod
    // data/redis-1 of another node, at 127.0.0.6 (one real server listening on both).
    let mut server = pod(
        "node-other",
        "data",
        "redis-1",
        "redis",
        "127.0.0.6",
        None,
        &[],
        Driver::Systemd,
    );
    let port = free_port().to_string();
    server.cgroup.spawn(
        "redis-server",
        &[
            "--port",
            &port,
            "--bind",
            "127.0.0.5",
            "127.0.0.6",
            "--save",
            "",
            "--protected-mode",
            "no",
        ],
    );
    wait_for("redis-server on both addresses", || {
        ["127.0.0.5", "127.0.0.6"].iter().all(|ip| {
            Command::new("redis-cli")
                .args(["-h", ip, "-p", &port, "PING"])
                .output()
                .is_ok_and(|o| o.stdout == b"PONG\n")
        })
    });
    api.set_collection(
        "/api/v1/services",
        vec![serde_json::json!({
            "metadata": {"name": "redis", "namespace": "data", "uid": pod_uid(),
                         "resourceVersion": "7"},
            "spec": {"type": "ClusterIP", "clusterIP": "127.0.0.5", "clusterIPs": ["127.0.0.5"],
                     "ports": [{"name": "redis", "port": 6379, "protocol": "TCP",
                                "targetPort": port.parse::<u16>().expect("port")}]}
        })],
    );
    api.set_collection(
        "/apis/discovery.k8s.io/v1/endpointslices",
        vec![serde_json::json!({
            "metadata": {"name": "redis-x7k2p", "namespace": "data", "uid": pod_uid(),
                         "resourceVersion": "8",
                         "labels": {"kubernetes.io/service-name": "redis"}},
            "addressType": "IPv4",
            "endpoints": [{
                "addresses": ["127.0.0.6"],
                "conditions": {"ready": true},
                "nodeName": "node-other",
                "targetRef": {"kind": "Pod", "namespace": "data", "name": "redis-1",
                              "uid": server.spec.uid}
            }],
            "ports": [{"name": "redis", "port": port.parse::<u16>().expect("port"),
                       "protocol": "TCP"}]
        })],
    );
    let mut app = pod(
        node,
        "prod",
        "app-0",
        "app",
        "10.244.9.1",
        None,
        &[],
        Driver::Cgroupfs,
    );
    api.add(&app.spec);
    let kubeconfig = api.kubeconfig();
    let daemon = Daemon::start(&["--kubeconfig", kubeconfig.to_str().expect("utf-8")], node);
    daemon.wait_synced();
    wait_for("both peer watches synced", || {
        daemon.log_text().matches("peer names synced").count() >= 2
    });
    for (ip, key) in [("127.0.0.5", "via-service"), ("127.0.0.6", "via-endpoint")] {
        app.cgroup
            .run("redis-cli", &["-h", ip, "-p", &port, "SET", key, "v"]);
    }
    let peers = || {
        daemon.stats(&[
            "-n",
            "prod",
            "--role",
            "client",
            "--group-by",
            "peer,command",
        ])
    };
    wait_for("both SETs", || {
        peers()
            .iter()
            .filter(|r| field(r, "command") == "set")
            .count()
            == 2
    });
    let rows = peers();
    let by_peer = |peer: &str| {
        rows.iter()
            .find(|r| field(r, "command") == "set" && field(r, "peer") == peer)
            .unwrap_or_else(|| panic!("no row for {peer}: {rows:?}"))
    };
    let via_service = by_peer(&format!("127.0.0.5:{port}"));
    assert_eq!(field(via_service, "peer_service"), "data/redis");
    assert_eq!(field(via_service, "peer_pod"), "");
    let via_endpoint = by_peer(&format!("127.0.0.6:{port}"));
    assert_eq!(field(via_endpoint, "peer_service"), "data/redis");
    assert_eq!(field(via_endpoint, "peer_pod"), "data/redis-1");
    let requests = api.request_log();
    for path in [
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
    ] {
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with(path) && r.contains("watch=true")),
            "{path} is watched: {requests:?}"
        );
    }
}

/// `redisctl` for `daemon` sending `token` (none: no token at all), and its output.
fn as_caller(daemon: &Daemon, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut command = daemon.redisctl();
    command.env_remove("RESPWATCH_TOKEN");
    if let Some(token) = token {
        command.args(["--token", token]);
    }
    command.args(args).output().expect("redisctl")
}

/// The namespaces of `redisctl stats -A` rows as `token`'s caller sees them ("" for host
/// processes); the command must succeed.
fn visible_namespaces(daemon: &Daemon, token: &str) -> BTreeSet<String> {
    let out = as_caller(daemon, Some(token), &["stats", "-A", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("stats json");
    rows.iter()
        .map(|r| field(r, "namespace").to_owned())
        .collect()
}

/// `--authz kubernetes`: every call needs a token the API server accepts (TokenReview), and a
/// caller sees the namespaces where it may `get pods` (SubjectAccessReview), granted to its user
/// or to one of its groups; host processes only with that permission cluster-wide. Asking for
/// more is PERMISSION_DENIED, revoking a permission ends an open Watch within the cache
/// lifetime, and an expired token is refused. The double checks what it was asked: verb, resource, namespace, user and groups.
#[test]
fn rbac_decides_which_namespaces_each_caller_sees() {
    let _turn = exclusive();
    let node = "node-rbac";
    let api = ApiServer::start();
    let mut redis = pod(
        node,
        "prod",
        "redis-0",
        "redis",
        "127.0.0.7",
        None,
        &[],
        Driver::Systemd,
    );
    let mut staging = pod(
        node,
        "staging",
        "s-0",
        "app",
        "10.244.7.2",
        None,
        &[],
        Driver::Cgroupfs,
    );
    for p in [&redis, &staging] {
        api.add(&p.spec);
    }
    api.add_token("t-alice", "alice", &[]);
    api.add_token("t-bob", "bob", &["staging-readers"]);
    api.add_token("t-admin", "admin", &[]);
    api.grant("alice", "prod");
    api.grant("group:staging-readers", "staging");
    api.grant("admin", "");
    let kubeconfig = api.kubeconfig();
    let daemon = Daemon::start_authorized(
        &[
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8"),
            "--authz",
            "kubernetes",
            "--authz-cache-seconds",
            "1",
        ],
        node,
        "t-admin",
    );
    daemon.wait_synced();
    let port = redis_server(&mut redis.cgroup, "127.0.0.7").to_string();
    let traffic = |staging: &mut Pod| {
        staging.cgroup.run(
            "redis-cli",
            &["-h", "127.0.0.7", "-p", &port, "SET", "sk", "v"],
        );
        let host = Command::new("redis-cli")
            .args(["-h", "127.0.0.7", "-p", &port, "SET", "hk", "v"])
            .output()
            .expect("redis-cli");
        assert!(host.status.success());
    };
    traffic(&mut staging);
    wait_for("staging's and the host's SETs", || {
        let namespaces = visible_namespaces(&daemon, "t-admin");
        ["prod", "staging", ""]
            .iter()
            .all(|ns| namespaces.contains(*ns))
    });

    // No token, or one the API server does not accept: UNAUTHENTICATED, for every call.
    for token in [None, Some("t-made-up")] {
        for args in [
            &["stats", "-A"][..],
            &["status"],
            &["watch", "-A", "--count", "1"],
        ] {
            let out = as_caller(&daemon, token, args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && stderr.contains("Unauthenticated"),
                "{token:?} {args:?}: {stderr}"
            );
        }
    }
    // Users see their namespaces; a group's grant counts; the host needs cluster-wide access.
    assert_eq!(
        visible_namespaces(&daemon, "t-alice"),
        BTreeSet::from(["prod".to_owned()])
    );
    assert_eq!(
        visible_namespaces(&daemon, "t-bob"),
        BTreeSet::from(["staging".to_owned()])
    );
    for (token, namespace) in [("t-alice", "staging"), ("t-bob", "prod")] {
        let out = as_caller(&daemon, Some(token), &["stats", "-n", namespace]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("PermissionDenied"),
            "{token} -n {namespace}: {stderr}"
        );
    }
    // Watch: alice's stream shows prod's commands only, whoever else is busy.
    let watch = as_caller_spawn(
        &daemon,
        "t-alice",
        &["watch", "-A", "-o", "json", "--duration", "5s"],
    );
    wait_for("alice's watch", || {
        daemon
            .try_status()
            .is_some_and(|s| s["subscribers"].as_u64() == Some(1))
    });
    traffic(&mut staging);
    let out = watch.wait_with_output().expect("watch");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert!(!events.is_empty(), "alice saw nothing of prod");
    assert!(
        events.iter().all(|e| field(e, "namespace") == "prod"),
        "{events:?}"
    );
    wait_for("alice's first watch to end", || {
        daemon
            .try_status()
            .is_some_and(|s| s["subscribers"].as_u64() == Some(0))
    });
    // Revoked while watching: the stream ends with PERMISSION_DENIED within the cache lifetime.
    let watch = as_caller_spawn(&daemon, "t-alice", &["watch", "-A", "--duration", "30s"]);
    wait_for("alice's second watch", || {
        daemon
            .try_status()
            .is_some_and(|s| s["subscribers"].as_u64() == Some(1))
    });
    let revoked = Instant::now();
    api.revoke("alice", "prod");
    let out = watch.wait_with_output().expect("watch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("PermissionDenied"),
        "{stderr}"
    );
    assert!(
        revoked.elapsed() < Duration::from_secs(10),
        "{:?}",
        revoked.elapsed()
    );

    // A token that expires is refused once its review is older than the cache lifetime.
    assert!(
        as_caller(&daemon, Some("t-bob"), &["status"])
            .status
            .success()
    );
    api.expire_token("t-bob");
    wait_for("bob's expired token refused", || {
        let out = as_caller(&daemon, Some("t-bob"), &["stats", "-A"]);
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Unauthenticated")
    });

    // What the API server was asked: alice's TokenReview, and reviews of `get pods` in prod
    // for alice (with the groups her TokenReview gave) and of staging for bob's group.
    let reviews = api.reviews();
    assert!(
        reviews
            .iter()
            .any(|r| r["kind"] == "TokenReview" && r["spec"]["token"] == "t-alice"),
        "{reviews:?}"
    );
    let asked = |user: &str, namespace: &str, group: &str| {
        reviews.iter().any(|r| {
            let spec = &r["spec"];
            let attributes = &spec["resourceAttributes"];
            r["kind"] == "SubjectAccessReview"
                && spec["user"] == user
                && spec["groups"]
                    .as_array()
                    .is_some_and(|g| g.iter().any(|g| g == group))
                && attributes["verb"] == "get"
                && attributes["resource"] == "pods"
                && attributes["namespace"] == namespace
        })
    };
    assert!(
        asked("alice", "prod", "system:authenticated"),
        "{reviews:?}"
    );
    assert!(asked("bob", "staging", "staging-readers"), "{reviews:?}");
}

fn as_caller_spawn(daemon: &Daemon, token: &str, args: &[&str]) -> std::process::Child {
    daemon
        .redisctl()
        .args(["--token", token])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redisctl")
}
