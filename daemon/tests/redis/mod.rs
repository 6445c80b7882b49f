//! Real redis-server processes on free loopback ports, and the real clients the bootstrap
//! script installs: what every integration test drives.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the support code"
)]

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, ChildStdout, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::ports::free_port;

/// Upper bound for a server to start.
const START: Duration = Duration::from_secs(30);

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The python with redis-py that the bootstrap script installs.
pub fn python() -> PathBuf {
    repo_root().join("target/test-env/venv/bin/python")
}

/// The node_modules folder with ioredis that the bootstrap script installs.
pub fn node_modules() -> PathBuf {
    repo_root().join("target/test-env/node/node_modules")
}

/// A client script of `daemon/tests/clients`.
pub fn client_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// A client of `preexisting.py` (`mode` idle or busy), run by `python` (an interpreter, after
/// a prefix such as `setpriv --reuid=…` if wanted) and waited for until it says it is ready.
pub fn preexisting_client(
    server: &RedisServer,
    mode: &str,
    python: &[&OsStr],
) -> (Child, BufReader<ChildStdout>) {
    let (program, prefix) = python.split_first().expect("an interpreter");
    let mut child = Command::new(program)
        .args(prefix)
        .arg(client_script("preexisting.py"))
        .args([&server.port.to_string(), mode])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python client");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("ready line");
    assert_eq!(line.trim(), "ready", "{mode} client");
    (child, stdout)
}

/// A real redis-server on a free loopback port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Child,
}

impl RedisServer {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_at("127.0.0.1", extra)
    }

    /// A server bound to `bind` (`::1`, `127.0.0.1 ::1`, …).
    pub fn start_at(bind: &str, extra: &[&str]) -> Self {
        let port = free_port();
        // Snapshots (a replica's full sync writes one) go to a directory of the server's own.
        let dir = std::env::temp_dir().join(format!("respwatch-redis-{port}"));
        std::fs::create_dir_all(&dir).expect("redis directory");
        let mut command = Command::new("redis-server");
        command
            .arg("--dir")
            .arg(&dir)
            .args(["--port", &port.to_string(), "--bind"])
            .args(bind.split_whitespace())
            .args(["--save", "", "--appendonly", "no"])
            .args([
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
                "--enable-debug-command",
                "local",
            ])
            .args(extra)
            .stdout(Stdio::null());
        let child = command
            .spawn()
            .expect("redis-server must be installed (run scripts/bootstrap.sh)");
        let server = Self { port, child };
        let deadline = Instant::now() + START;
        while server.cli(&["PING"]).stdout != b"PONG\n" {
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli")
    }

    /// `INFO <sections…>` as key → value.
    pub fn info(&self, sections: &str) -> BTreeMap<String, String> {
        let mut args = vec!["INFO"];
        args.extend(sections.split_whitespace());
        let out = self.cli(&args);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.trim_end().split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// `INFO commandstats` as (calls, rejected, failed) by command: what the daemon's
    /// server-role rows of this process must equal.
    pub fn command_counts(&self) -> BTreeMap<String, (u64, u64, u64)> {
        self.info("commandstats")
            .into_iter()
            .filter_map(|(key, value)| {
                let name = key.strip_prefix("cmdstat_")?.to_owned();
                let field = |wanted: &str| {
                    value
                        .split(',')
                        .find_map(|f| f.strip_prefix(wanted)?.strip_prefix('='))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                Some((
                    name,
                    (
                        field("calls"),
                        field("rejected_calls"),
                        field("failed_calls"),
                    ),
                ))
            })
            .collect()
    }

    pub fn benchmark(&self, args: &[&str]) -> Output {
        let out = Command::new("redis-benchmark")
            .args(["-p", &self.port.to_string(), "-q"])
            .args(args)
            .output()
            .expect("redis-benchmark");
        assert!(
            out.status.success(),
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
