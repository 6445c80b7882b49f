//! The API tests' daemon: one real `respwatchd` per test binary on free ports, plus small
//! clients (HTTP, gRPC, grpcurl, redisctl) to talk to it.
#![allow(dead_code, reason = "each test uses a different part")]

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, OnceLock, mpsc},
    time::{Duration, Instant},
};

use respwatch_proto::v1::{self, observer_client::ObserverClient};
use tonic::transport::{Channel, Endpoint};

/// Upper bound for any wait.
pub const WAIT: Duration = Duration::from_secs(30);
/// Events each Watch subscriber may have queued in the test daemon.
pub const WATCH_QUEUE: usize = 1000;

/// Watch streams the test daemon takes at once.
pub const MAX_SUBSCRIBERS: u32 = 12;

pub struct Daemon {
    pub grpc: String,
    pub metrics: String,
    pub pid: u32,
    pub log: PathBuf,
}

/// The shared daemon, started on first use. It is started from a thread that lives as long as
/// the test process, with `PR_SET_PDEATHSIG`, so it dies with the test binary whatever
/// happens (panics included); no test thread's end can kill it early.
pub fn daemon() -> &'static Daemon {
    static DAEMON: OnceLock<Daemon> = OnceLock::new();
    DAEMON.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let grpc = format!("127.0.0.1:{}", free_port());
            let metrics = format!("127.0.0.1:{}", free_port());
            let log =
                std::env::temp_dir().join(format!("respwatchd-api-{}.log", std::process::id()));
            let log_file = std::fs::File::create(&log).expect("log file");
            let mut command = Command::new(env!("CARGO_BIN_EXE_respwatchd"));
            command
                .args([
                    "--grpc-listen",
                    &grpc,
                    "--metrics-listen",
                    &metrics,
                    "--node-name",
                    "api-test",
                ])
                // Our own logs at their most detailed: a value must not reach them either.
                .args(["--watch-queue", &WATCH_QUEUE.to_string()])
                .args(["--log", "respwatchd=trace,warn"])
                .args(["--max-subscribers", &MAX_SUBSCRIBERS.to_string()])
                // The grpcurl examples list and describe the API through reflection.
                .arg("--reflection")
                // `redisctl watch --last` needs recent events kept.
                .args(["--recent-events", "10000"])
                .args([
                    "--metrics-labels",
                    "namespace,pod,container,pid,comm,role,command",
                ])
                .stdout(Stdio::null())
                .stderr(log_file);
            // SAFETY: prctl in the child before exec; async-signal-safe.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child: Child = command.spawn().expect("respwatchd starts");
            let pid = child.id();
            tx.send(Daemon {
                grpc,
                metrics,
                pid,
                log,
            })
            .expect("send");
            // Keep the parent thread (and so the death signal's trigger) alive until exit.
            let _keep = child;
            loop {
                std::thread::park();
            }
        });
        let daemon = rx.recv_timeout(WAIT).expect("daemon spawned");
        let deadline = Instant::now() + WAIT;
        let runtime = runtime();
        while runtime
            .block_on(async {
                client(&daemon.grpc)
                    .await
                    .ok()?
                    .get_status(v1::GetStatusRequest {})
                    .await
                    .ok()
            })
            .is_none()
        {
            let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "respwatchd did not become ready; log:\n{log}"
            );
            assert!(
                std::path::Path::new(&format!("/proc/{}", daemon.pid)).exists(),
                "respwatchd exited; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    })
}

/// Heavy or counting tests take turns (2 cores).
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

pub async fn client(addr: &str) -> Result<ObserverClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    Ok(ObserverClient::new(channel))
}

/// A client whose HTTP/2 receive windows are small, so a stream it does not read backs up
/// into the daemon quickly.
pub async fn narrow_client(addr: &str) -> ObserverClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await
        .expect("connect");
    ObserverClient::new(channel)
}

pub fn status() -> v1::GetStatusResponse {
    runtime().block_on(status_of(&daemon().grpc))
}

/// `GetStatus` of the daemon at `addr`, from async code.
pub async fn status_of(addr: &str) -> v1::GetStatusResponse {
    client(addr)
        .await
        .expect("connect")
        .get_status(v1::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

pub fn stats(request: v1::GetStatsRequest) -> Vec<v1::StatsRow> {
    runtime().block_on(async {
        client(&daemon().grpc)
            .await
            .expect("connect")
            .get_stats(request)
            .await
            .expect("stats")
            .into_inner()
            .rows
    })
}

/// Server-role calls of one process, by command.
pub fn server_calls(pid: u32) -> std::collections::BTreeMap<String, u64> {
    server_rows(pid)
        .into_iter()
        .map(|row| (row.command, row.calls))
        .collect()
}

/// The server-role rows of process `pid`, one per command.
pub fn server_rows(pid: u32) -> Vec<v1::StatsRow> {
    stats(v1::GetStatsRequest {
        allow: vec![v1::Filter {
            pid,
            role: v1::Role::Server as i32,
            ..Default::default()
        }],
        group_by: vec![v1::GroupBy::Command as i32],
        ..Default::default()
    })
}

/// Waits until `done` holds, for at most [`WAIT`].
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the server side of process `pid` has at least these calls per command: a total
/// would also count calls nobody listed (the PING that checks a server is up).
pub fn wait_for_server_calls(pid: u32, expected: &[(&str, u64)]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let calls = server_calls(pid);
        if expected
            .iter()
            .all(|(command, n)| calls.get(*command).copied().unwrap_or(0) >= *n)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for server calls {expected:?}; seen {calls:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until at least `n` Watch streams are open on the daemon.
pub fn wait_for_subscribers(n: u32) {
    wait_for(&format!("{n} watch subscribers"), || {
        status().subscribers >= n
    });
}

pub use crate::redisctl_bin::redisctl_path;

pub fn redisctl() -> Command {
    let path = redisctl_path();
    let mut command = Command::new(path);
    command
        .env("RESPWATCH_SERVER", &daemon().grpc)
        .env("NO_COLOR", "1");
    command
}

pub fn grpcurl_path() -> PathBuf {
    let path = repo_root().join("target/test-env/venv/bin/grpcurl");
    assert!(path.exists(), "grpcurl missing: run scripts/bootstrap.sh");
    path
}

pub fn grpcurl(args: &[&str]) -> Output {
    let out = Command::new(grpcurl_path())
        .arg("-plaintext")
        .args(args)
        .output()
        .expect("grpcurl");
    assert!(
        out.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub use crate::http::http_get;
pub use crate::ports::free_port;
pub use crate::redis::{RedisServer, repo_root};
