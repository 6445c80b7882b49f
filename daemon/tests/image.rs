//! The DaemonSet's image and privileges, for real: `scripts/build-image.sh` builds the image
//! (FROM scratch, with buildah), and podman runs it with exactly what `deploy/daemonset.yaml`
//! grants — capabilities, mounts, read-only root, no privilege escalation, the shipped seccomp
//! profile, the host's PID namespace — in a private cgroup namespace, as Kubernetes runs it on
//! cgroup v2. Everything is checked from outside the container.
mod http;
mod kernel;
mod ports;
mod redis;
mod redisctl_bin;

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Output, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use ports::free_port;
use redis::{RedisServer, preexisting_client, python, repo_root};
use serde_json::Value;

/// Upper bound for any wait.
const WAIT: Duration = Duration::from_secs(60);

/// The name the test image is built under (not the release tag: its binaries are the test
/// build's).
const IMAGE: &str = concat!("localhost/respwatchd-test:", env!("CARGO_PKG_VERSION"));

/// Container runs take turns: one daemon's programs at a time, and two cores.
fn one_container_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// podman as this machine runs it (see scripts/build-image.sh for the storage driver; runc
/// because crun refuses hybrid cgroup layouts).
fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args([
        "--storage-driver",
        "vfs",
        "--runtime",
        "runc",
        "--cgroup-manager",
        "cgroupfs",
    ]);
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(command: &mut Command) -> Output {
    let out = command.output().expect("command runs");
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// What `scripts/build-image.sh` printed: the image's size and one `mode path` line per entry.
struct Image {
    listing: String,
}

/// The image, built once per test run from the binaries this test was built with.
fn image() -> &'static Image {
    static IMAGE_BUILT: OnceLock<Image> = OnceLock::new();
    IMAGE_BUILT.get_or_init(|| {
        let redisctl = redisctl_bin::redisctl_path();
        let bin_dir = redisctl.parent().expect("binaries' directory");
        let started = Instant::now();
        let out = run(Command::new("bash")
            .arg(repo_root().join("scripts/build-image.sh"))
            .args(["--tag", IMAGE, "--bin-dir"])
            .arg(bin_dir));
        let listing = text(&out.stdout);
        eprintln!(
            "image built in {:.1} s:\n{listing}",
            started.elapsed().as_secs_f64()
        );
        Image { listing }
    })
}

/// The container's side of `deploy/daemonset.yaml`, turned into podman options.
struct PodSpec {
    /// The capabilities the DaemonSet adds (after dropping ALL), as it spells them (`BPF`).
    capabilities: Vec<String>,
    /// Every other podman option that reproduces the pod's privileges and mounts.
    options: Vec<String>,
    /// The DaemonSet's daemon arguments, less what needs a cluster (see [`pod_spec`]).
    args: Vec<String>,
    /// Container ports by name.
    ports: BTreeMap<String, u16>,
}

fn daemonset() -> Value {
    let path = repo_root().join("deploy/daemonset.yaml");
    let out = run(Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(&path));
    serde_json::from_slice(&out.stdout).expect("daemonset.yaml as JSON")
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads the pod spec the DaemonSet gives its container and refuses anything this test does
/// not know how to reproduce, so that the manifest and what was tested cannot drift apart.
/// Only what needs a cluster differs: no API server (`--kubernetes=off`, `--authz=none` with
/// `--insecure-no-authz`), and no TLS Secret (plaintext gRPC).
fn pod_spec() -> PodSpec {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    let c = &containers[0];
    let security = &c["securityContext"];
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(security["privileged"], false);
    assert_eq!(security["runAsUser"], 0);
    let mut options: Vec<String> = vec!["--cap-drop=all".into(), "--user=0".into()];
    if security["allowPrivilegeEscalation"] == false {
        options.push("--security-opt=no-new-privileges".into());
    }
    if security["readOnlyRootFilesystem"] == true {
        options.push("--read-only".into());
    }
    let seccomp = &security["seccompProfile"];
    assert_eq!(seccomp["type"], "Localhost", "a shipped seccomp profile");
    let profile = seccomp["localhostProfile"]
        .as_str()
        .expect("localhostProfile");
    let file = Path::new(profile).file_name().expect("profile file name");
    let shipped = repo_root().join("deploy").join(file);
    assert!(shipped.exists(), "{} not in deploy/", shipped.display());
    options.push(format!("--security-opt=seccomp={}", shipped.display()));
    assert_eq!(pod["hostPID"], true);
    options.push("--pid=host".into());
    assert!(
        pod["hostNetwork"].is_null(),
        "the pod network, like the DaemonSet"
    );
    // Kubernetes gives containers a cgroup namespace of their own on cgroup v2.
    options.push("--cgroupns=private".into());
    if let Some(memory) = c["resources"]["limits"]["memory"].as_str() {
        let mib = memory.strip_suffix("Mi").expect("a memory limit in Mi");
        options.push(format!("--memory={mib}m"));
    }
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?, v)))
        .collect();
    for mount in c["volumeMounts"].as_array().expect("volumeMounts") {
        let name = mount["name"].as_str().expect("mount name");
        let path = mount["mountPath"].as_str().expect("mountPath");
        let volume = volumes[name];
        if let Some(host) = volume["hostPath"]["path"].as_str() {
            // Nodes mount cgroup v2 at /sys/fs/cgroup; this machine may have it elsewhere
            // (hybrid layout): the DaemonSet's hostPath means the host's cgroup v2 root.
            let host = if host == "/sys/fs/cgroup" {
                kernel::cgroup2_root()
            } else {
                PathBuf::from(host)
            };
            let ro = if mount["readOnly"] == true { ":ro" } else { "" };
            options.push(format!("--volume={}:{path}{ro}", host.display()));
        } else if volume.get("emptyDir").is_some() {
            options.push(format!("--tmpfs={path}"));
        } else if volume.get("secret").is_some() {
            assert_eq!(
                path, "/etc/respwatch/tls",
                "only the TLS Secret is left out"
            );
        } else {
            panic!("volume {name}: a kind this test does not reproduce: {volume}");
        }
    }
    let ports = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| Some((p["name"].as_str()?.to_owned(), p["containerPort"].as_u64()?)))
        .map(|(name, port)| (name, u16::try_from(port).expect("a port")))
        .collect();
    let needs_cluster = ["--tls-cert", "--tls-key", "--authz", "--kubernetes"];
    let mut args: Vec<String> = strings(&c["args"])
        .into_iter()
        .filter(|arg| {
            let flag = arg.split_once('=').map_or(arg.as_str(), |(flag, _)| flag);
            !needs_cluster.contains(&flag)
        })
        .collect();
    args.extend([
        "--kubernetes=off".into(),
        "--authz=none".into(),
        "--insecure-no-authz".into(),
    ]);
    PodSpec {
        capabilities: strings(&security["capabilities"]["add"]),
        options,
        args,
        ports,
    }
}

/// A container of the test image, removed on drop.
struct Container {
    name: String,
    /// Host ports published for the container's ports, by name.
    published: BTreeMap<String, u16>,
    /// The gRPC port inside the container.
    grpc: u16,
}

impl Container {
    /// Starts the image with the DaemonSet's privileges, less `without` (a capability), and
    /// does not wait for anything.
    fn start(spec: &PodSpec, without: Option<&str>) -> Self {
        image();
        static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "respwatch-image-test-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let published: BTreeMap<String, u16> = spec
            .ports
            .keys()
            .map(|name| (name.clone(), free_port()))
            .collect();
        let mut command = podman();
        command.args(["run", "--detach", "--name", &name]);
        command.args(&spec.options);
        for cap in spec
            .capabilities
            .iter()
            .filter(|c| Some(c.as_str()) != without)
        {
            command.arg(format!("--cap-add={cap}"));
        }
        // Limits this machine cannot raise, so podman must not try to (see TOOLCHAIN.md).
        command.args(["--ulimit=nofile=20000:20000", "--ulimit=nproc=4096:4096"]);
        for (port_name, host_port) in &published {
            command.arg(format!(
                "--publish=127.0.0.1:{host_port}:{}",
                spec.ports[port_name]
            ));
        }
        command.arg(IMAGE).args(&spec.args);
        command.args(["--node-name", "image-test"]);
        run(&mut command);
        Self {
            name,
            published,
            grpc: spec.ports["grpc"],
        }
    }

    fn logs(&self) -> String {
        let out = podman()
            .args(["logs", &self.name])
            .output()
            .expect("podman logs");
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }

    fn state(&self, field: &str) -> String {
        let out = run(podman().args([
            "inspect",
            "--format",
            &format!("{{{{.State.{field}}}}}"),
            &self.name,
        ]));
        text(&out.stdout).trim().to_owned()
    }

    /// Waits for the daemon's ready line; panics with the log if it exits first.
    fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let logs = self.logs();
            if logs.contains("respwatchd ready") {
                return;
            }
            assert!(
                self.state("Running") == "true",
                "respwatchd exited in the container: {logs}"
            );
            assert!(Instant::now() < deadline, "not ready in time: {logs}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for the container to end; returns its exit code and log.
    fn wait_exit(&self) -> (i64, String) {
        let out = run(podman().args(["wait", &self.name]));
        let code = text(&out.stdout).trim().parse().expect("exit code");
        (code, self.logs())
    }

    fn host_pid(&self) -> u32 {
        self.state("Pid").parse().expect("pid")
    }

    fn redisctl(&self, args: &[&str]) -> String {
        let grpc = format!("127.0.0.1:{}", self.grpc);
        let out = run(podman()
            .args([
                "exec",
                &self.name,
                "/usr/local/bin/redisctl",
                "--server",
                &grpc,
            ])
            .args(args));
        text(&out.stdout)
    }

    fn metrics(&self) -> String {
        http::http_get(
            &format!("127.0.0.1:{}", self.published["metrics"]),
            "/metrics",
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time", "0", &self.name])
            .output();
    }
}

/// Capability bit numbers (`linux/capability.h`) of the names the DaemonSet may use.
fn capability_bit(name: &str) -> u32 {
    match name {
        "DAC_READ_SEARCH" => 2,
        "NET_ADMIN" => 12,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other}: add its bit number here"),
    }
}

/// A `Cap…:` line of /proc/<pid>/status.
fn status_mask(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or_else(|| panic!("{field} in {status}"))
}

/// A client of another user (nobody, so that reading its `/proc/<pid>/fd` takes privileges)
/// connected before the container starts; it sends nothing more until [`OlderClient::owners`].
struct OlderClient {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl OlderClient {
    fn connect(server: &RedisServer) -> Self {
        let runner = [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            // The system's python3 (the standard search path), which nobody may run.
            "env",
            "-i",
            "python3",
        ]
        .map(OsStr::new);
        let (child, stdout) = preexisting_client(server, "idle", &runner);
        Self { child, stdout }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets the client send its 100 SETs and 100 GETs, waits until the daemon has counted
    /// them on the client side, and returns (pid, comm) of the rows that hold them.
    fn owners(&mut self, container: &Container) -> BTreeSet<(u32, String)> {
        writeln!(self.child.stdin.as_mut().expect("stdin"), "go").expect("go");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("done line");
        assert_eq!(line.trim(), "done");
        let deadline = Instant::now() + WAIT;
        let owners = loop {
            let out = container.redisctl(&[
                "stats",
                "-o",
                "json",
                "--role",
                "client",
                "--command",
                "set",
            ]);
            let rows: Value = serde_json::from_str(&out).expect("stats JSON");
            let owners: BTreeSet<(u32, String)> = rows
                .as_array()
                .into_iter()
                .flatten()
                .filter(|row| row["calls"] == 100)
                .map(|row| {
                    (
                        u32::try_from(row["pid"].as_u64().unwrap_or_default()).unwrap_or(0),
                        row["comm"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            if !owners.is_empty() {
                break owners;
            }
            assert!(
                Instant::now() < deadline,
                "the older connection's 100 SETs were not counted: {rows}\n{}",
                container.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(self.child.wait().expect("older client").success());
        owners
    }
}

/// `redisctl stats -o json` rows as command → (calls, rejected, failed).
fn counts(rows: &Value) -> BTreeMap<String, (u64, u64, u64)> {
    rows.as_array()
        .expect("a JSON array")
        .iter()
        .map(|row| {
            let n = |field: &str| row[field].as_u64().unwrap_or_default();
            (
                row["command"].as_str().unwrap_or_default().to_owned(),
                (n("calls"), n("rejected_calls"), n("failed_calls")),
            )
        })
        .collect()
}

/// The image holds the two binaries, the libraries they load and the loader: no shell, no
/// package manager, nothing else.
#[test]
fn the_image_holds_only_the_binaries_and_their_libraries() {
    let listing = &image().listing;
    let files: Vec<&str> = listing
        .lines()
        .skip(1)
        .filter(|line| !line.starts_with('d'))
        .filter_map(|line| line.split_whitespace().nth(2))
        .collect();
    for binary in ["usr/local/bin/respwatchd", "usr/local/bin/redisctl"] {
        assert!(files.contains(&binary), "{binary} missing: {listing}");
    }
    for file in &files {
        let name = Path::new(file)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(
            file.starts_with("usr/local/bin/") || name.contains(".so"),
            "{file} is neither one of the binaries nor a shared library: {listing}"
        );
    }
    let out = run(podman().args([
        "image",
        "inspect",
        "--format",
        "{{index .Labels \"org.opencontainers.image.version\"}} {{.Config.User}}",
        IMAGE,
    ]));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("{} 0", env!("CARGO_PKG_VERSION"))
    );
}

/// The daemon in the DaemonSet's container, checked from outside: its capabilities are exactly
/// the DaemonSet's (none ambient) under seccomp; redis-benchmark against a host redis-server
/// shows up in the image's `redisctl stats` exactly as `INFO commandstats` counts it; a
/// connection a non-root process opened before the container started is attributed to that
/// process; `/metrics` answers with the series the alert rules and the dashboard use; SIGTERM
/// (`podman stop`) detaches every program.
#[test]
fn the_daemonset_container_captures_exactly_with_its_privileges() {
    let _turn = one_container_at_a_time();
    let spec = pod_spec();
    let old_server = RedisServer::start(&[]);
    let mut old_client = OlderClient::connect(&old_server);
    let before = kernel::our_program_ids();
    let container = Container::start(&spec, None);
    container.wait_ready();
    let ours: BTreeSet<u64> = kernel::our_program_ids()
        .difference(&before)
        .copied()
        .collect();
    assert_eq!(ours.len(), 3, "programs loaded: {ours:?}");

    // Capabilities from outside: exactly the DaemonSet's, none ambient, no new privileges,
    // a seccomp filter.
    let pid = container.host_pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let expected = spec
        .capabilities
        .iter()
        .fold(0u64, |mask, cap| mask | 1 << capability_bit(cap));
    assert_eq!(status_mask(&status, "CapEff"), expected, "CapEff");
    assert_eq!(status_mask(&status, "CapBnd"), expected, "CapBnd");
    assert_eq!(status_mask(&status, "CapAmb"), 0, "CapAmb");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(field("Uid").split_whitespace().next(), Some("0"));
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2", "a seccomp filter");

    // The connection opened before the container, used now: its process is found.
    let owners = old_client.owners(&container);
    assert!(
        owners.contains(&(old_client.pid(), "python3".to_owned())),
        "the connection opened before the container is not attributed to its process {}: \
         {owners:?}\n{}",
        old_client.pid(),
        container.logs()
    );

    // redis-benchmark against a host redis-server: the image's redisctl shows exactly what
    // INFO commandstats counts.
    let server = RedisServer::start(&[]);
    server.benchmark(&[
        "-n",
        "20000",
        "-c",
        "20",
        "-P",
        "16",
        "-t",
        "set,get,incr,lpush,hset",
    ]);
    // Large values too, kept few: this test is about privileges, not ring capacity.
    server.benchmark(&["-n", "100", "-c", "2", "-d", "100000", "-t", "set,get"]);
    // A failed call too, so that the error series exist.
    server.cli(&["SET", "string", "v"]);
    assert!(text(&server.cli(&["LPUSH", "string", "x"]).stdout).starts_with("WRONGTYPE"));
    let mut redis = server.command_counts();
    // The INFO call just made: Redis counts it after answering, the daemon sees it.
    redis.entry("info".to_owned()).or_default().0 += 1;
    let server_pid = server.pid().to_string();
    let deadline = Instant::now() + WAIT;
    loop {
        let out = container.redisctl(&[
            "stats",
            "-o",
            "json",
            "--role",
            "server",
            "--group-by",
            "command",
            "--pid",
            &server_pid,
        ]);
        let ours = counts(&serde_json::from_str(&out).expect("stats JSON"));
        if ours == redis {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "redisctl stats differs from INFO commandstats\nredis {redis:?}\nours  {ours:?}\n\
             losses: {:?}",
            container
                .metrics()
                .lines()
                .filter(|line| line.starts_with("respwatch_lost_total") && !line.ends_with(" 0"))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // /metrics from outside, through the published port.
    // It is fed from the rows once a second: wait for the error just made.
    let deadline = Instant::now() + WAIT;
    let exposition = loop {
        let exposition = container.metrics();
        if exposition.contains("respwatch_errors_total{") {
            break exposition;
        }
        assert!(Instant::now() < deadline, "no error series: {exposition}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        exposition.contains("respwatch_commands_total{"),
        "{exposition}"
    );
    assert_rules_and_dashboard_name_exported_metrics(&exposition);

    // SIGTERM (what the kubelet sends): a clean exit, every program gone.
    let started = Instant::now();
    run(podman().args(["stop", "--time", "15", &container.name]));
    let (code, logs) = container.wait_exit();
    assert_eq!(code, 0, "exit code after SIGTERM: {logs}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "respwatchd ignored SIGTERM until SIGKILL: {logs}"
    );
    let left: Vec<u64> = kernel::our_program_ids()
        .intersection(&ours)
        .copied()
        .collect();
    assert!(left.is_empty(), "programs {left:?} left after SIGTERM");
    assert!(
        !kernel::root_attachments()
            .iter()
            .any(|(id, _)| ours.contains(id)),
        "programs left attached after SIGTERM"
    );
}

/// Capabilities that only the owners of connections older than the daemon need: without them
/// the daemon runs, warns, and leaves those connections without a process.
const FOR_OLDER_CONNECTIONS: [&str; 2] = ["SYS_PTRACE", "DAC_READ_SEARCH"];

/// The same container with one of the DaemonSet's capabilities fewer, once per capability:
/// the daemon refuses to run and names the capability it lacks, or, for those only older
/// connections need, warns naming it and attributes such a connection to no process.
#[test]
fn each_capability_dropped_fails_naming_it() {
    let _turn = one_container_at_a_time();
    let spec = pod_spec();
    for cap in &spec.capabilities {
        let named = format!("CAP_{cap}");
        if FOR_OLDER_CONNECTIONS.contains(&cap.as_str()) {
            let server = RedisServer::start(&[]);
            let mut client = OlderClient::connect(&server);
            let container = Container::start(&spec, Some(cap));
            container.wait_ready();
            let logs = container.logs();
            let warning = logs
                .lines()
                .find(|line| line.contains("WARN") && line.contains(&named))
                .unwrap_or_else(|| panic!("no warning names {named}: {logs}"));
            let owners = client.owners(&container);
            assert!(
                owners.iter().all(|(pid, _)| *pid == 0),
                "without {cap}, the older connection was attributed anyway: {owners:?}"
            );
            eprintln!("without {cap}: {warning}");
        } else {
            let container = Container::start(&spec, Some(cap));
            let (code, logs) = container.wait_exit();
            assert_ne!(code, 0, "ran without {cap}: {logs}");
            assert!(logs.contains(&named), "{named} not named: {logs}");
            eprintln!("without {cap}: {}", logs.lines().last().unwrap_or_default());
        }
    }
}

/// Metric names in a PromQL expression: `respwatch_…` identifiers, with a histogram's
/// `_bucket`/`_sum`/`_count` suffix taken off.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("respwatch_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name)
            .to_owned();
        names.insert(family);
    }
    names
}

/// Every `expr` of the alert rules (deploy/prometheusrule.yaml) and of the dashboard's panels
/// (deploy/grafana-dashboard.json) names only metric families a running daemon exports.
fn assert_rules_and_dashboard_name_exported_metrics(exposition: &str) {
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let rules = prometheus_rules();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/grafana-dashboard.json"))
            .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut exprs: Vec<(String, String)> = rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().into_iter().flatten())
        .map(|rule| {
            (
                format!("alert {}", rule["alert"].as_str().unwrap_or_default()),
                rule["expr"].as_str().expect("expr").to_owned(),
            )
        })
        .collect();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push((
                format!("panel {}", panel["title"].as_str().unwrap_or_default()),
                target["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            exprs.push(("dashboard variable".to_owned(), query.to_owned()));
        }
    }
    let mut used = BTreeSet::new();
    for (what, expr) in &exprs {
        let names = metric_names(expr);
        for name in &names {
            assert!(
                exported.contains(name),
                "{what}: {name} is not exported by respwatchd ({expr})"
            );
        }
        used.extend(names);
    }
    eprintln!("alert rules and dashboard use {used:?}");
    // Each of the alerts has a rule.
    for metric in [
        "respwatch_lost_total",
        "respwatch_pipeline_lag_seconds",
        "respwatch_closes_deferred_total",
    ] {
        assert!(
            exprs
                .iter()
                .any(|(what, expr)| what.starts_with("alert") && expr.contains(metric)),
            "no alert on {metric}"
        );
    }
}

/// The `spec` of deploy/prometheusrule.yaml: a Prometheus rule file.
fn prometheus_rules() -> Value {
    let out = run(Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))['spec']))",
        ])
        .arg(repo_root().join("deploy/prometheusrule.yaml")));
    serde_json::from_slice(&out.stdout).expect("rules as JSON")
}

/// promtool accepts the alert rules (syntax, PromQL, templates).
#[test]
fn promtool_checks_the_alert_rules() {
    let dir = std::env::temp_dir().join(format!("respwatch-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("rules.json");
    std::fs::write(&file, prometheus_rules().to_string()).expect("rules file");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .expect("promtool (the prometheus package; scripts/bootstrap.sh installs it)");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("SUCCESS: 5 rules found"),
        "{}",
        text(&out.stdout)
    );
}
