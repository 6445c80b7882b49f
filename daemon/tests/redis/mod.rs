//! Real redis-server processes on free loopback ports, and the real clients the bootstrap
//! script installs: what every integration test drives.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the support code"
)]

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
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
