//! The `respwatchd` binary as a user runs it: it attaches to the cgroup v2 root with links, next
//! to other agents' programs, detaches on SIGTERM/SIGINT (and the kernel detaches it on
//! SIGKILL) leaving no program behind, and refuses clearly when it lacks privileges, cgroup v2,
//! or sane flags.
mod http;
mod kernel;
mod ports;
mod redis;
mod redisctl_bin;
use ports::free_port;
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const DAEMON: &str = env!("CARGO_BIN_EXE_respwatchd");

fn daemon() -> Command {
    daemon_at(free_port())
}

fn daemon_at(metrics_port: u16) -> Command {
    daemon_serving_at(free_port(), metrics_port)
}

fn daemon_serving_at(grpc_port: u16, metrics_port: u16) -> Command {
    let mut command = Command::new(DAEMON);
    command
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .env("RESPWATCH_LOG", "info");
    command
}

/// Tests that attach programs take turns, so one can tell its programs from the other's.
fn one_daemon_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts the daemon and waits (bounded) for its ready line; returns it with the log lines
/// printed until then.
fn start(command: Command) -> (Child, Vec<String>) {
    let (child, log, _later) = start_with_log(command);
    (child, log)
}

/// [`start`], and the log lines it prints from then on.
fn start_with_log(mut command: Command) -> (Child, Vec<String>, mpsc::Receiver<String>) {
    let mut child = command
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("respwatchd");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keeps draining after the test stops listening: a closed stderr must not be what
        // ends the daemon.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
        if line.contains("respwatchd ready") {
            return (child, log, rx);
        }
        log.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("respwatchd did not become ready: {log:?}");
}

fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
}

fn wait_bounded(mut child: Child) -> std::process::ExitStatus {
    for _ in 0..300 {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("respwatchd did not exit within 15 s of the signal");
}

/// What the kernel shows while the daemon runs: its three programs on the cgroup v2 root, each
/// through a bpf_link, and no syscall tracepoint, raw tracepoint or kprobe program of any kind
/// loaded with them. After SIGTERM, SIGINT or SIGKILL none of them is left: the links are file
/// descriptors of the daemon, never pinned, so the kernel detaches them when it dies.
#[test]
fn attaches_packet_and_socket_hooks_only_and_leaves_nothing_after_any_signal() {
    let _turn = one_daemon_at_a_time();
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGKILL] {
        let before = kernel::our_program_ids();
        let tracing_before = kernel::tracing_program_ids();
        let (child, _log) = start(daemon());
        let ours: Vec<u64> = kernel::our_program_ids()
            .difference(&before)
            .copied()
            .collect();
        assert_eq!(ours.len(), 3, "programs loaded: {ours:?}");
        let attached: Vec<String> = kernel::root_attachments()
            .into_iter()
            .filter(|(id, _)| ours.contains(id))
            .map(|(_, attach_type)| attach_type)
            .collect();
        for attach_type in [
            "cgroup_inet_ingress",
            "cgroup_inet_egress",
            "cgroup_sock_ops",
        ] {
            assert!(
                attached.iter().any(|a| a == attach_type),
                "{attach_type} not on the cgroup v2 root: {attached:?}"
            );
        }
        let links = kernel::cgroup_link_program_ids();
        assert!(
            ours.iter().all(|id| links.contains(id)),
            "attached without bpf_links: {ours:?} vs {links:?}"
        );
        let new_tracing: Vec<u64> = kernel::tracing_program_ids()
            .difference(&tracing_before)
            .copied()
            .collect();
        assert!(
            new_tracing.is_empty(),
            "tracing programs appeared: {new_tracing:?}"
        );
        signal(&child, sig);
        let status = wait_bounded(child);
        if sig != libc::SIGKILL {
            assert!(
                status.success(),
                "exit status after signal {sig}: {status:?}"
            );
        }
        let left: Vec<u64> = kernel::our_program_ids()
            .into_iter()
            .filter(|id| ours.contains(id))
            .collect();
        assert!(
            left.is_empty(),
            "programs {left:?} left loaded after signal {sig}"
        );
        assert!(
            !kernel::root_attachments()
                .iter()
                .any(|(id, _)| ours.contains(id)),
            "programs left attached after signal {sig}"
        );
    }
}

/// Another agent's programs on the same cgroup (here: another respwatchd, attached first) keep
/// running when ours go, whichever way ours go.
#[test]
fn another_agents_programs_keep_running_after_ours_detach() {
    let _turn = one_daemon_at_a_time();
    let server = redis::RedisServer::start(&[]);
    let other_metrics = free_port();
    let (other, _) = start(daemon_at(other_metrics));
    let others: std::collections::BTreeSet<u64> = kernel::our_program_ids();
    let records = || -> u64 {
        let text = http::http_get(&format!("127.0.0.1:{other_metrics}"), "/metrics");
        text.lines()
            .find_map(|line| line.strip_prefix("respwatch_records_total "))
            .and_then(|value| value.trim().parse().ok())
            .expect("respwatch_records_total")
    };
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let (ours, _) = start(daemon());
        signal(&ours, sig);
        wait_bounded(ours);
        let attached: Vec<u64> = kernel::root_attachments()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert!(
            others.iter().all(|id| attached.contains(id)),
            "the other agent's programs were detached with ours ({sig})"
        );
        let before = records();
        assert_eq!(server.cli(&["PING"]).stdout, b"PONG\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while records() < before + 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "the other agent stopped capturing after ours went ({sig})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    signal(&other, libc::SIGTERM);
    assert!(wait_bounded(other).success());
}

/// TCP retransmissions in the host's network namespace.
fn retransmitted_segments() -> u64 {
    kernel::retransmitted_segments(&std::fs::read_to_string("/proc/net/snmp").expect("snmp"))
}

/// With the ring as small as it gets, the programs fail to deliver most records, and still never
/// drop or delay a packet: TCP retransmits no more than in the same run without the daemon.
#[test]
fn a_full_ring_drops_no_packet() {
    let _turn = one_daemon_at_a_time();
    let server = redis::RedisServer::start(&[]);
    let workload = || {
        let before = retransmitted_segments();
        server.benchmark(&["-c", "20", "-n", "50000", "-P", "16", "-t", "set,get"]);
        server.benchmark(&["-c", "4", "-n", "200", "-d", "100000", "-t", "set,get"]);
        retransmitted_segments() - before
    };
    let without = workload();
    let metrics = free_port();
    let mut command = daemon_at(metrics);
    command.args(["--ring-bytes", "8192"]);
    let (daemon, _) = start(command);
    let with = workload();
    // The kernel counters are read every second, and `/metrics` fed every second.
    std::thread::sleep(Duration::from_millis(2500));
    let ring_full: u64 = http::http_get(&format!("127.0.0.1:{metrics}"), "/metrics")
        .lines()
        .find_map(|line| {
            line.strip_prefix(r#"respwatch_lost_total{source="ring_buffer",reason="ring_full"} "#)
        })
        .and_then(|value| value.trim().parse().ok())
        .expect("ring_full losses");
    signal(&daemon, libc::SIGTERM);
    assert!(wait_bounded(daemon).success());
    eprintln!(
        "retransmitted segments: {without} without the daemon, {with} with an 8 KiB ring \
         ({ring_full} records lost)"
    );
    assert!(
        ring_full > 0,
        "an 8 KiB ring kept up: the test proved nothing"
    );
    assert!(with <= without, "{with} retransmissions, {without} without");
}

fn run_to_failure(command: &mut Command) -> String {
    let out: Output = command.stdout(Stdio::null()).output().expect("ran");
    assert!(
        !out.status.success(),
        "respwatchd should have refused to run"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `setpriv` as root with only `caps` in the bounding set: the daemon's effective set is
/// exactly them (what a container with `capabilities: add: [...]` gives).
fn with_capabilities(caps: &[&str]) -> Command {
    with_capabilities_at(caps, free_port())
}

fn with_capabilities_at(caps: &[&str], metrics_port: u16) -> Command {
    let mut bounding = String::from("-all");
    for cap in caps {
        bounding.push_str(&format!(",+{cap}"));
    }
    let mut command = Command::new("setpriv");
    command.args(["--inh-caps=-all", &format!("--bounding-set={bounding}")]);
    command.arg(DAEMON).args([
        "--grpc-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--metrics-listen",
        &format!("127.0.0.1:{metrics_port}"),
    ]);
    command
}

#[test]
fn refuses_without_privileges_and_names_what_is_missing() {
    let mut command = Command::new("setpriv");
    command.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ]);
    command.arg(DAEMON).args([
        "--grpc-listen",
        "127.0.0.1:1",
        "--metrics-listen",
        "127.0.0.1:1",
    ]);
    let stderr = run_to_failure(&mut command);
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
        assert!(stderr.contains(cap), "{cap} not named: {stderr}");
    }
    // Each one missing from the set it needs is named alone.
    let needed = ["bpf", "perfmon", "net_admin"];
    for missing in needed {
        let others: Vec<&str> = needed.iter().copied().filter(|c| *c != missing).collect();
        let stderr = run_to_failure(&mut with_capabilities(&others));
        let named = format!("CAP_{}", missing.to_ascii_uppercase());
        assert!(stderr.contains(&named), "{named} not named: {stderr}");
    }
}

/// Exactly CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (the DaemonSet's list) are enough: the daemon
/// attaches and captures.
#[test]
fn runs_with_exactly_its_capabilities() {
    let _turn = one_daemon_at_a_time();
    let server = redis::RedisServer::start(&[]);
    let metrics = free_port();
    let (child, _) = start(with_capabilities_at(
        &["bpf", "perfmon", "net_admin"],
        metrics,
    ));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("status");
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).expect("hex"))
        .expect("CapEff");
    assert_eq!(
        effective,
        (1 << 39) | (1 << 38) | (1 << 12),
        "effective capabilities"
    );
    for _ in 0..3 {
        assert_eq!(server.cli(&["SET", "k", "v"]).stdout, b"OK\n");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = http::http_get(&format!("127.0.0.1:{metrics}"), "/metrics");
        let sets = text
            .lines()
            .filter(|line| {
                line.starts_with("respwatch_commands_total{")
                    && line.contains("role=\"server\"")
                    && line.contains("command=\"set\"")
            })
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>();
        if sets == 3.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "3 SETs not counted with exactly the DaemonSet's capabilities: {sets}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(&child, libc::SIGTERM);
    assert!(wait_bounded(child).success());
}

/// Runs the daemon in a private mount namespace after `setup` (a shell snippet) changed it.
fn in_mount_namespace(setup: &str, extra: &str) -> Command {
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "sh", "-c"]).arg(format!(
        "{setup} && exec {DAEMON} --grpc-listen 127.0.0.1:{} --metrics-listen 127.0.0.1:{} {extra}",
        free_port(),
        free_port()
    ));
    command
}

#[test]
fn explains_a_missing_cgroup_v2_hierarchy() {
    // Every cgroup2 mount hidden, as on a host with cgroup v1 only.
    let root = kernel::cgroup2_root();
    let stderr = run_to_failure(&mut in_mount_namespace(
        &format!(
            "umount -l {} && ! grep -q ' - cgroup2 ' /proc/self/mountinfo",
            root.display()
        ),
        "",
    ));
    assert!(
        stderr.contains("no cgroup v2 file system is mounted"),
        "{stderr}"
    );
    assert!(stderr.contains("--cgroup-root"), "{stderr}");
}

#[test]
fn explains_a_cgroup_root_that_is_no_cgroup() {
    let stderr = run_to_failure(daemon().args(["--cgroup-root", "/proc"]));
    assert!(stderr.contains("attaching"), "{stderr}");
    assert!(stderr.contains("/proc"), "{stderr}");
    let stderr = run_to_failure(daemon().args(["--cgroup-root", "/no/such/dir"]));
    assert!(stderr.contains("cgroup root /no/such/dir"), "{stderr}");
}

#[test]
fn rejects_bad_flags_before_touching_the_kernel() {
    let stderr = run_to_failure(daemon().args(["--ring-bytes", "1000"]));
    assert!(
        stderr.contains("ring buffer size 1000 must be a power of two"),
        "{stderr}"
    );
    let stderr = run_to_failure(daemon().args(["--keys", "everything"]));
    assert!(stderr.contains("invalid key policy"), "{stderr}");
    // An unkeyed hash of a key could be matched against a dictionary of likely keys.
    let stderr = run_to_failure(daemon().args(["--keys", "hash"]));
    assert!(stderr.contains("--keys hash needs a secret"), "{stderr}");
    let secret = std::env::temp_dir().join(format!("respwatch-short-{}", std::process::id()));
    std::fs::write(&secret, "short\n").expect("secret file");
    let stderr = run_to_failure(
        daemon()
            .args(["--keys", "hash", "--key-hash-secret-file"])
            .arg(&secret),
    );
    assert!(
        stderr.contains("has 5 bytes; it needs at least 16"),
        "{stderr}"
    );
    let _ = std::fs::remove_file(&secret);
    let stderr = run_to_failure(daemon().args([
        "--keys",
        "hash",
        "--key-hash-secret-file",
        "/nonexistent/secret",
    ]));
    assert!(
        stderr.contains("reading the key-hash secret /nonexistent/secret"),
        "{stderr}"
    );
    let stderr = run_to_failure(Command::new(DAEMON).args(["--grpc-listen", "nowhere"]));
    assert!(stderr.contains("nowhere"), "{stderr}");
    // Beyond loopback, an API without authorization shows every namespace to anyone.
    let stderr = run_to_failure(
        Command::new(DAEMON)
            .args(["--grpc-listen", &format!("0.0.0.0:{}", free_port())])
            .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())]),
    );
    assert!(
        stderr.contains("beyond loopback and --authz is none"),
        "{stderr}"
    );
    let stderr = run_to_failure(
        daemon()
            .args(["--authz", "kubernetes", "--kubernetes", "off"])
            .env_remove("KUBECONFIG"),
    );
    assert!(
        stderr.contains("--authz kubernetes needs the Kubernetes API"),
        "{stderr}"
    );
    let stderr = run_to_failure(daemon().args(["--no-such-flag"]));
    assert!(stderr.contains("unexpected argument"), "{stderr}");
}

/// A CA, and two server certificates (CN server and rotated) and a client certificate it
/// signed, made with openssl in `dir`.
fn make_certificates(dir: &std::path::Path) {
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    sh(&format!(
        "openssl req -x509 {key} -keyout ca.key -out ca.pem -days 2 -subj /CN=test-ca"
    ));
    for (name, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1"),
        // The server's next certificate, for rotation.
        ("rotated", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        sh(&format!(
            "openssl req {key} -keyout {name}.key -out {name}.csr -subj /CN={name} && \
             printf '{ext}\\n' > {name}.ext && \
             openssl x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
             -out {name}.pem -days 2 -extfile {name}.ext"
        ));
    }
}

fn grpcurl(args: &[&str]) -> Output {
    let grpcurl = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/test-env/venv/bin/grpcurl"
    );
    Command::new(grpcurl)
        .args(args)
        .output()
        .expect("grpcurl (installed by scripts/bootstrap.sh)")
}

/// TLS on the gRPC port: TLS clients that trust the CA get the API, plaintext ones do not, and
/// with `--tls-client-ca` only clients with a certificate from that CA get in.
#[test]
fn serves_the_api_over_tls_with_optional_client_certificates() {
    let _turn = one_daemon_at_a_time();
    let dir = std::env::temp_dir().join(format!("respwatch-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    make_certificates(&dir);
    let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
    for require_client_cert in [false, true] {
        let port = free_port();
        let address = format!("127.0.0.1:{port}");
        let mut command = Command::new(DAEMON);
        command
            .args([
                "--grpc-listen",
                &address,
                "--metrics-listen",
                &format!("127.0.0.1:{}", free_port()),
                // `grpcurl list` below asks reflection.
                "--reflection",
            ])
            .args([
                "--tls-cert",
                &file("server.pem"),
                "--tls-key",
                &file("server.key"),
            ]);
        if require_client_cert {
            command.args(["--tls-client-ca", &file("ca.pem")]);
        }
        let (child, _log) = start(command);
        let with_client_cert = grpcurl(&[
            "-cacert",
            &file("ca.pem"),
            "-cert",
            &file("client.pem"),
            "-key",
            &file("client.key"),
            &address,
            "list",
        ]);
        let without_client_cert = grpcurl(&["-cacert", &file("ca.pem"), &address, "list"]);
        let plaintext = grpcurl(&["-plaintext", &address, "list"]);
        signal(&child, libc::SIGTERM);
        assert!(wait_bounded(child).success());
        let listed = |out: &Output| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("respwatch.v1.Observer")
        };
        assert!(
            listed(&with_client_cert),
            "{}",
            String::from_utf8_lossy(&with_client_cert.stderr)
        );
        assert_eq!(
            listed(&without_client_cert),
            !require_client_cert,
            "client certificate required: {require_client_cert}"
        );
        assert!(!listed(&plaintext), "plaintext client got in");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Reflection tells anyone who connects the whole API: served only with `--reflection`.
#[test]
fn reflection_is_served_only_when_asked_for() {
    let _turn = one_daemon_at_a_time();
    for asked in [false, true] {
        let port = free_port();
        let mut command = daemon_serving_at(port, free_port());
        if asked {
            command.arg("--reflection");
        }
        let (child, _) = start(command);
        let daemon = Reaped(child);
        let listed = grpcurl(&["-plaintext", &format!("127.0.0.1:{port}"), "list"]);
        let text = String::from_utf8_lossy(&listed.stdout);
        assert_eq!(
            listed.status.success() && text.contains("respwatch.v1.Observer"),
            asked,
            "--reflection {asked}: {text}{}",
            String::from_utf8_lossy(&listed.stderr)
        );
        drop(daemon);
    }
}

/// The subject of the certificate the daemon serves to a new connection.
fn served_subject(address: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {address} </dev/null 2>/dev/null | openssl x509 -noout -subject"
        ))
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Kubernetes updates a mounted Secret in place: the new files go to a new directory, then the
/// `..data` symlink is swapped to it. New connections then get the new certificate, without a
/// restart; an update that does not load (half-written) is skipped and the last good one stays.
/// Health probes get a plaintext listener of their own (`--health-listen`).
#[test]
fn certificates_rotated_like_a_mounted_secret_are_served_without_a_restart() {
    let _turn = one_daemon_at_a_time();
    let dir = std::env::temp_dir().join(format!("respwatch-rotate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    make_certificates(&dir);
    let secret = dir.join("secret");
    let version = |name: &str, cert: &[u8], key: &[u8]| {
        let at = secret.join(name);
        std::fs::create_dir_all(&at).expect("version dir");
        std::fs::write(at.join("tls.crt"), cert).expect("cert");
        std::fs::write(at.join("tls.key"), key).expect("key");
        // The atomic swap kubelet makes.
        let next = secret.join("..data_tmp");
        let _ = std::fs::remove_file(&next);
        std::os::unix::fs::symlink(name, &next).expect("symlink");
        std::fs::rename(&next, secret.join("..data")).expect("swap ..data");
    };
    let read = |name: &str| std::fs::read(dir.join(name)).expect("certificate file");
    version("..v1", &read("server.pem"), &read("server.key"));
    for file in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(format!("..data/{file}"), secret.join(file)).expect("symlink");
    }
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let health_port = free_port();
    let mut command = daemon_serving_at(port, free_port());
    command
        .arg("--reflection")
        .args(["--health-listen", &format!("127.0.0.1:{health_port}")])
        .arg("--tls-cert")
        .arg(secret.join("tls.crt"))
        .arg("--tls-key")
        .arg(secret.join("tls.key"));
    let (child, _) = start(command);
    let daemon = Reaped(child);
    let ca = dir.join("ca.pem").to_string_lossy().into_owned();
    let healthy = || {
        grpcurl(&["-cacert", &ca, &address, "grpc.health.v1.Health/Check"])
            .status
            .success()
    };
    assert!(
        served_subject(&address).contains("CN = server"),
        "{}",
        served_subject(&address)
    );
    assert!(healthy());
    // kubelet's gRPC probes speak no TLS: a plaintext listener answers health, and only that.
    assert_eq!(health(health_port), Some(ServingStatus::Serving));
    assert_eq!(health(port), None, "plaintext on the TLS port");
    let observer = grpcurl(&[
        "-plaintext",
        "-import-path",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../proto"),
        "-proto",
        "respwatch/v1/respwatch.proto",
        &format!("127.0.0.1:{health_port}"),
        "respwatch.v1.Observer/GetStatus",
    ]);
    assert!(
        String::from_utf8_lossy(&observer.stderr).contains("Unimplemented"),
        "the health listener serves more than health: {}",
        String::from_utf8_lossy(&observer.stderr)
    );

    version("..v2", &read("rotated.pem"), &read("rotated.key"));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !served_subject(&address).contains("CN = rotated") {
        assert!(
            std::time::Instant::now() < deadline,
            "still {}",
            served_subject(&address)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(healthy(), "the rotated certificate serves the API");

    version(
        "..v3",
        b"-----BEGIN CERTIFICATE-----\nhalf",
        &read("server.key"),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        served_subject(&address).contains("CN = rotated"),
        "{}",
        served_subject(&address)
    );
    assert!(healthy(), "a broken update is skipped");
    drop(daemon);
    let _ = std::fs::remove_dir_all(dir);
}

/// What the daemon's health service answers for the server as a whole (what probes ask).
fn health(grpc_port: u16) -> Option<ServingStatus> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc_port}"))
                .ok()?
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await
                .ok()?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .ok()?;
        ServingStatus::try_from(reply.into_inner().status).ok()
    })
}

/// A daemon whose pipeline stopped: its health answers NOT_SERVING, then it exits non-zero
/// with a log line that says why (each of `why` in it).
fn assert_not_serving_then_exit(
    daemon: &mut Child,
    grpc_port: u16,
    log: &mpsc::Receiver<String>,
    why: &[&str],
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while health(grpc_port) != Some(ServingStatus::NotServing) {
        assert!(
            daemon.try_wait().expect("wait").is_none(),
            "exited before answering NOT_SERVING"
        );
        assert!(std::time::Instant::now() < deadline, "never NOT_SERVING");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = loop {
        if let Some(status) = daemon.try_wait().expect("wait") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "exit status {status:?}");
    let lines: Vec<String> = log.iter().collect();
    let stopped = lines
        .iter()
        .find(|line| line.contains("the capture pipeline stopped"))
        .unwrap_or_else(|| panic!("no log line says the pipeline stopped: {lines:#?}"));
    for part in why {
        assert!(
            lines.iter().any(|line| line.contains(part)),
            "{part:?} not in the log: {lines:#?}"
        );
    }
    assert!(stopped.contains("ERROR"), "{stopped}");
}

/// A panic anywhere in the pipeline (here, injected in the decode stage) must not leave a
/// daemon that answers SERVING with nothing captured.
#[test]
fn a_pipeline_panic_turns_health_not_serving_and_the_daemon_exits_non_zero() {
    let _turn = one_daemon_at_a_time();
    let grpc_port = free_port();
    let mut command = daemon_serving_at(grpc_port, free_port());
    command.env("RESPWATCH_FAULT_PANIC_KEY", "respwatch-crash-key");
    let (child, _, log) = start_with_log(command);
    let mut daemon = Reaped(child);
    assert_eq!(health(grpc_port), Some(ServingStatus::Serving));
    let server = redis::RedisServer::start(&[]);
    assert!(
        server
            .cli(&["SET", "an-ordinary-key", "v"])
            .status
            .success()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        health(grpc_port),
        Some(ServingStatus::Serving),
        "before the trigger"
    );
    assert!(
        server
            .cli(&["SET", "respwatch-crash-key", "v"])
            .status
            .success()
    );
    assert_not_serving_then_exit(
        &mut daemon.0,
        grpc_port,
        &log,
        &["panicked", "fault injection"],
    );
}

/// Our programs hang off bpf_links, so `bpftool cgroup detach` cannot take them away; a link
/// can still be detached by anyone with the privileges (`bpftool link detach`). The daemon
/// notices within its sweep interval instead of serving on blind.
#[test]
fn programs_detached_from_outside_turn_health_not_serving_and_the_daemon_exits_non_zero() {
    let _turn = one_daemon_at_a_time();
    let before = kernel::our_program_ids();
    let grpc_port = free_port();
    let (child, _, log) = start_with_log(daemon_serving_at(grpc_port, free_port()));
    let mut daemon = Reaped(child);
    let ours: Vec<u64> = kernel::our_program_ids()
        .difference(&before)
        .copied()
        .collect();
    let (link, program) = kernel::cgroup_links()
        .into_iter()
        .find(|(_, program)| ours.contains(program))
        .expect("a cgroup link of ours");
    let root = kernel::cgroup2_root();
    let by_program = Command::new("bpftool")
        .args(["cgroup", "detach"])
        .arg(&root)
        .args(["ingress", "id", &program.to_string()])
        .output()
        .expect("bpftool");
    assert!(
        !by_program.status.success(),
        "bpftool cgroup detach took a link's program"
    );
    assert_eq!(health(grpc_port), Some(ServingStatus::Serving));
    let by_link = Command::new("bpftool")
        .args(["link", "detach", "id", &link.to_string()])
        .output()
        .expect("bpftool");
    assert!(
        by_link.status.success(),
        "{}",
        String::from_utf8_lossy(&by_link.stderr)
    );
    assert_not_serving_then_exit(&mut daemon.0, grpc_port, &log, &["detached from outside"]);
}

/// A child process killed (and reaped) when the test ends, also when it fails half-way.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The value of the `/metrics` sample `series` (name and labels exactly as exposed), if present.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A series sums the rows of several processes. When they exit and their rows expire, what they
/// counted folds into their name's process-less row (pid 0): a Prometheus counter never goes
/// down while its series lives (`rate()` would read it as a reset), and GetStats, summed the
/// same way, still agrees with it.
#[test]
fn counters_never_go_down_when_process_rows_expire() {
    let _turn = one_daemon_at_a_time();
    let server = redis::RedisServer::start(&[]);
    let port = server.port.to_string();
    // Our clients under a name of their own, so no other process on the node joins the series.
    let dir = std::env::temp_dir().join(format!("respwatch-expiry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cli = dir.join("rw-expiry-cli");
    std::fs::copy(
        String::from_utf8_lossy(
            &Command::new("sh")
                .args(["-c", "command -v redis-cli"])
                .output()
                .expect("sh")
                .stdout,
        )
        .trim(),
        &cli,
    )
    .expect("copy redis-cli");
    let (grpc_port, metrics_port) = (free_port(), free_port());
    let mut command = daemon_serving_at(grpc_port, metrics_port);
    command.args([
        "--expire-seconds",
        "1",
        "--metrics-labels",
        "comm,role,command",
    ]);
    let (daemon, _) = start(command);
    let mut daemon = Reaped(daemon);
    // One client stays (one SET, then it waits a minute before the next); three exit.
    let staying = Command::new(&cli)
        .args(["-p", &port, "-r", "100", "-i", "60", "SET", "b", "1"])
        .stdout(Stdio::null())
        .spawn()
        .expect("staying client");
    let staying = Reaped(staying);
    for _ in 0..3 {
        let out = Command::new(&cli)
            .args(["-p", &port, "SET", "a", "1"])
            .output()
            .expect("client");
        assert!(out.status.success());
    }
    let series = r#"respwatch_commands_total{comm="rw-expiry-cli",role="client",command="set"}"#;
    let scrape = || http::http_get(&format!("127.0.0.1:{metrics_port}"), "/metrics");
    // GetStats' rows of our clients' SETs: (pid, calls), sorted.
    let stats_rows = || {
        let out = grpcurl(&[
            "-plaintext",
            "-import-path",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../proto"),
            "-proto",
            "respwatch/v1/respwatch.proto",
            "-d",
            r#"{"allow": [{"comm": "rw-expiry-cli", "role": "ROLE_CLIENT", "command": "set"}]}"#,
            &format!("127.0.0.1:{grpc_port}"),
            "respwatch.v1.Observer/GetStats",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let number = |value: &serde_json::Value| -> u64 {
            match value {
                serde_json::Value::String(text) => text.parse().expect("number"),
                other => other.as_u64().unwrap_or_default(),
            }
        };
        let mut rows: Vec<(u64, u64)> = reply["rows"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|row| (number(&row["pid"]), number(&row["calls"])))
                    .collect()
            })
            .unwrap_or_default();
        rows.sort_unstable();
        rows
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape();
        if sample(&text, series) == Some(4.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "4 SETs never showed: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The three exited clients' rows expire (1 s idle) into one; the series must not move.
    let staying_pid = u64::from(staying.0.id());
    loop {
        let text = scrape();
        assert_eq!(sample(&text, series), Some(4.0), "while rows expire");
        let rows = stats_rows();
        assert_eq!(
            rows.iter().map(|(_, calls)| calls).sum::<u64>(),
            4,
            "{rows:?}"
        );
        if rows == [(0, 3), (staying_pid, 1)] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no row expired: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The last process goes too: its series stays, and GetStats keeps all four under pid 0.
    drop(staying);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stats_rows() != [(0, 4)] {
        assert!(
            std::time::Instant::now() < deadline,
            "the last row did not fold: {:?}",
            stats_rows()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Past the recorder's idle timeout (5 s): the series is still fed.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        sample(&scrape(), series),
        Some(4.0),
        "after every process went"
    );
    assert_eq!(stats_rows(), [(0, 4)]);
    signal(&daemon.0, libc::SIGTERM);
    let _ = daemon.0.wait();
    let _ = std::fs::remove_dir_all(dir);
}

/// The daemon closes gRPC connections at their maximum age; `redisctl watch` opens its stream
/// again by itself, says so in its output, and goes on showing commands.
#[test]
fn watch_reconnects_when_the_daemon_closes_its_connection_at_its_maximum_age() {
    let _turn = one_daemon_at_a_time();
    let server = redis::RedisServer::start(&[]);
    let grpc_port = free_port();
    let mut command = daemon_serving_at(grpc_port, free_port());
    command.args([
        "--max-connection-age-seconds",
        "2",
        "--max-connection-age-grace-seconds",
        "1",
    ]);
    let (daemon, _) = start(command);
    let _daemon = Reaped(daemon);
    // One connection, a PING every 50 ms, for longer than the watch.
    let client = Command::new("redis-cli")
        .args([
            "-p",
            &server.port.to_string(),
            "-r",
            "400",
            "-i",
            "0.05",
            "PING",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-cli");
    let client = Reaped(client);
    let watched = Command::new(redisctl_bin::redisctl_path())
        .args(["--server", &format!("127.0.0.1:{grpc_port}"), "watch"])
        .args(["--pid", &client.0.id().to_string(), "-o", "json"])
        .args(["--duration", "9s"])
        .output()
        .expect("redisctl");
    assert!(
        watched.status.success(),
        "{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    let reconnects: Vec<usize> = (0..lines.len())
        .filter(|at| lines[*at].get("reconnected").is_some())
        .collect();
    // Connections live 2 s, then 1 s of grace: a 9 s watch is cut at least twice.
    assert!(reconnects.len() >= 2, "{lines:?}");
    let pings_after = |at: usize| {
        lines[at + 1..]
            .iter()
            .take_while(|line| line.get("reconnected").is_none())
            .filter(|line| line["command"] == "ping")
            .count()
    };
    assert!(
        lines[..reconnects[0]]
            .iter()
            .any(|line| line["command"] == "ping"),
        "no command before the first reconnect"
    );
    for at in &reconnects {
        assert!(
            lines[*at]["reconnected"]["gap_ms"].as_u64().expect("gap") < 1000,
            "{}",
            lines[*at]
        );
        assert!(pings_after(*at) > 0, "no command after {}", lines[*at]);
    }
}

/// The daemon's resident anonymous memory (its heap and stacks), in MiB: the rings' mappings,
/// resident from the start and sized by `--ring-bytes`, are left out.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

/// What a peer sends cannot grow the daemon: rounds of streams built to make it hold state
/// (MULTI with 80,000 queued commands and no EXEC on three connections of a real redis-server,
/// 200,000 requests at a server that never answers, POP3-like text that opens with `+OK`), all
/// open at once, hit the limits of pending requests every round. The drops are counted as
/// losses, no queued command is counted as a call (there is no EXEC), and the daemon's heap
/// stays within 64 MiB of where it was before the first round and does not grow from round to
/// round: it plateaus.
#[test]
fn memory_stays_bounded_under_hostile_streams() {
    let _turn = one_daemon_at_a_time();
    let server = redis::RedisServer::start(&[]);
    let metrics_port = free_port();
    let mut command = daemon_at(metrics_port);
    command.args(["--metrics-labels", "comm,role,command"]);
    let (daemon, _) = start(command);
    let daemon = Reaped(daemon);
    let idle = rss_mib(daemon.0.id());
    let scrape = || http::http_get(&format!("127.0.0.1:{metrics_port}"), "/metrics");
    let lost = |text: &str, reason: &str| {
        let series =
            format!(r#"respwatch_lost_total{{source="pending_requests",reason="{reason}"}}"#);
        sample(text, &series).expect("pending-requests losses")
    };
    let (mut dropped, mut rss) = (Vec::new(), Vec::new());
    for round in 1..=4 {
        let mut streams = Reaped(
            Command::new(redis::python())
                .arg(redis::client_script("hostile_streams.py"))
                .arg(server.port.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("hostile streams"),
        );
        let mut held = String::new();
        BufReader::new(streams.0.stdout.take().expect("stdout"))
            .read_line(&mut held)
            .expect("held");
        assert_eq!(held.trim(), "held", "round {round}");
        // While every stream is open: what the daemon holds for them is at its largest.
        let before = dropped.last().copied().unwrap_or(0.0);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while lost(&scrape(), "memory_budget") <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: no request dropped for the memory budget"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(1));
        rss.push(rss_mib(daemon.0.id()));
        dropped.push(lost(&scrape(), "memory_budget"));
        drop(streams.0.stdin.take());
        let _ = streams.0.wait();
    }
    let text = scrape();
    for role in ["client", "server"] {
        let sets = format!(
            r#"respwatch_commands_total{{comm="redis-server",role="{role}",command="set"}}"#
        );
        assert_eq!(sample(&text, &sets), None, "queued SETs counted as calls");
        let sets =
            format!(r#"respwatch_commands_total{{comm="python",role="{role}",command="set"}}"#);
        assert_eq!(sample(&text, &sets), None, "queued SETs counted as calls");
    }
    eprintln!("heap per round {rss:?} MiB, {idle:.0} MiB before the first; dropped {dropped:?}");
    // Unbounded, the transaction queues alone would hold 480,000 requests of 200 bytes (three
    // queues of 80,000, seen from both ends), and grow with whatever clients queue.
    assert!(
        rss.iter().all(|mib| *mib <= idle + 64.0),
        "heap per round {rss:?} MiB, {idle:.0} MiB before the first"
    );
    // No growth from round to round beyond the allocator's noise (±20 MiB measured here).
    assert!(
        rss[3] <= rss[0] + 32.0,
        "heap per round {rss:?} MiB: it kept growing"
    );
}

/// A Watch that asks for recent events gets them only from a daemon that keeps them
/// (`--recent-events`); any other says why it cannot, instead of streaming none.
#[test]
fn recent_events_are_refused_unless_the_daemon_keeps_them() {
    let _turn = one_daemon_at_a_time();
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    for kept in [false, true] {
        let port = free_port();
        let mut command = daemon_serving_at(port, free_port());
        if kept {
            command.args(["--recent-events", "100"]);
        }
        let (child, _) = start(command);
        let daemon = Reaped(child);
        let watched = grpcurl(&[
            "-plaintext",
            "-import-path",
            proto,
            "-proto",
            "respwatch/v1/respwatch.proto",
            "-max-time",
            "2",
            "-d",
            r#"{"last": 5}"#,
            &format!("127.0.0.1:{port}"),
            "respwatch.v1.Observer/Watch",
        ]);
        let stderr = String::from_utf8_lossy(&watched.stderr);
        assert_eq!(
            stderr.contains("FailedPrecondition") && stderr.contains("--recent-events"),
            !kept,
            "--recent-events kept {kept}: {stderr}"
        );
        drop(daemon);
    }
}
