//! The `respwatchd` binary as a user runs it: it starts, attaches, detaches on SIGTERM/SIGINT
//! leaving no program behind, and refuses clearly when it lacks privileges, tracefs, kernel
//! features, or sane flags.
mod ports;
use ports::free_port;
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

const DAEMON: &str = env!("CARGO_BIN_EXE_respwatchd");
/// Program names as `bpftool prog` shows them (the kernel keeps 15 characters).
const OUR_PROGRAMS: &[&str] = &[
    "sys_exit_io",
    "sys_enter_close",
    "sys_exit_new_so",
    "sys_enter_conne",
];

fn daemon() -> Command {
    let mut command = Command::new(DAEMON);
    command
        .args(["--grpc-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .env("RESPWATCH_LOG", "info");
    command
}

/// Ids of the programs named like ours that are loaded right now (other daemons, e.g. another
/// test run, may load and unload theirs meanwhile: tests compare sets of ids, not counts).
fn our_program_ids() -> std::collections::BTreeSet<u32> {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| {
            line.contains("tracepoint") && OUR_PROGRAMS.iter().any(|name| line.contains(name))
        })
        .filter_map(|line| line.split(':').next()?.trim().parse().ok())
        .collect()
}

/// Tests that attach programs take turns, so one can tell its programs from the other's.
fn one_daemon_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts the daemon and waits (bounded) for its ready line; returns it with the log lines
/// printed until then.
fn start(mut command: Command) -> (Child, Vec<String>) {
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
            return (child, log);
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

/// One test for both signals: two daemons at once would confuse the program count. The SIGINT
/// run starts where tracefs is not mounted, as on a fresh machine: the daemon mounts it.
#[test]
fn detaches_everything_on_sigterm_and_sigint() {
    let _turn = one_daemon_at_a_time();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let before = our_program_ids();
        let command = if sig == libc::SIGTERM {
            daemon()
        } else {
            in_mount_namespace(
                "umount /sys/kernel/tracing && ! mountpoint -q /sys/kernel/tracing",
                "",
            )
        };
        let (child, log) = start(command);
        if sig == libc::SIGINT {
            assert!(
                log.iter()
                    .any(|l| l.contains("tracefs is not mounted; mounting it")),
                "{log:?}"
            );
        }
        let ours: Vec<u32> = our_program_ids().difference(&before).copied().collect();
        assert!(
            ours.len() >= OUR_PROGRAMS.len(),
            "programs not attached: {ours:?}"
        );
        signal(&child, sig);
        let status = wait_bounded(child);
        assert!(
            status.success(),
            "exit status after signal {sig}: {status:?}"
        );
        let left: Vec<u32> = our_program_ids()
            .into_iter()
            .filter(|id| ours.contains(id))
            .collect();
        assert!(
            left.is_empty(),
            "programs {left:?} left attached after signal {sig}"
        );
    }
}

fn run_to_failure(command: &mut Command) -> String {
    let out: Output = command.stdout(Stdio::null()).output().expect("ran");
    assert!(
        !out.status.success(),
        "respwatchd should have refused to run"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn refuses_without_privileges() {
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
    assert!(
        stderr.contains("needs root, or the capabilities CAP_BPF and CAP_PERFMON"),
        "{stderr}"
    );
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
fn explains_a_tracefs_it_cannot_mount() {
    // /sys/kernel hidden under an empty tmpfs: no tracefs, and no directory to mount it on.
    let stderr = run_to_failure(&mut in_mount_namespace(
        "umount -l /sys/kernel/tracing 2>/dev/null; mount -t tmpfs none /sys/kernel",
        "",
    ));
    assert!(
        stderr.contains("tracefs is not mounted at /sys/kernel/tracing"),
        "{stderr}"
    );
    assert!(
        stderr.contains("mount -t tracefs tracefs /sys/kernel/tracing"),
        "{stderr}"
    );
}

#[test]
fn explains_missing_syscall_tracepoints() {
    // A tracefs without syscall events: what a kernel without CONFIG_FTRACE_SYSCALLS shows.
    let stderr = run_to_failure(&mut in_mount_namespace(
        "mount -t tmpfs none /sys/kernel/tracing && mkdir /sys/kernel/tracing/events",
        "",
    ));
    assert!(stderr.contains("no syscall tracepoints"), "{stderr}");
    assert!(stderr.contains("CONFIG_FTRACE_SYSCALLS"), "{stderr}");
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
    let stderr = run_to_failure(Command::new(DAEMON).args(["--grpc-listen", "nowhere"]));
    assert!(stderr.contains("nowhere"), "{stderr}");
    let stderr = run_to_failure(daemon().args(["--no-such-flag"]));
    assert!(stderr.contains("unexpected argument"), "{stderr}");
}

/// A CA, and a server and a client certificate it signed, made with openssl in `dir`.
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
