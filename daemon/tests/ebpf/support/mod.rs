//! Shared pieces of the eBPF integration tests: one capture pipeline per test process, real
//! `redis-server` processes on free ports, and paths of the real clients the bootstrap installs.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the support code"
)]

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use respwatch_common::Direction;
use respwatchd::{
    capture::{Capture, CaptureConfig},
    enrich::Attributor,
    event::{KeyPolicy, KeyPrivacy},
    pipeline::{Pipeline, PipelineConfig, Shared},
    streams::{ConnId, ConnMeta, StreamChunk, StreamEvent},
};

/// A chunk the harness keeps: copied out of the ring.
pub type Chunk = StreamChunk<'static>;

/// Upper bound for any wait in these tests.
pub const WAIT: Duration = Duration::from_secs(30);

pub use crate::redis::{RedisServer, node_modules, python};

pub use crate::ports::free_port;

/// What the capture pipeline saw while a test was recording.
#[derive(Default)]
pub struct Seen {
    pub recording: bool,
    pub chunks: Vec<Chunk>,
    /// Connection, pid, bytes lost at the end of its ingress and egress streams.
    pub closed: Vec<(ConnId, u32, u64, u64)>,
    /// Every connection seen, by data or by its end (all of its data may have been lost).
    pub conns: BTreeMap<ConnId, Arc<ConnMeta>>,
}

/// Keeps chunks while alive; forgets them when dropped, so tests that only look at stats do
/// not pay for (and the consumer is not slowed by) keeping every byte.
pub struct Recording<'a> {
    harness: &'a Harness,
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// A harness other than the process-wide one stops when dropped (even when its test panics):
/// its capture is dropped and its programs detached, so later tests run against one capture.
impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        let mut seen = self.harness.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.recording = false;
        seen.chunks.clear();
        seen.closed.clear();
        seen.conns.clear();
    }
}

pub struct Harness {
    pub seen: Arc<Mutex<Seen>>,
    pub shared: Arc<Shared>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Harness {
    /// The process-wide capture (eBPF loaded and attached once per test binary).
    /// Heavy loads take turns: on two cores, concurrent benchmarks would test the machine, not
    /// the capture.
    pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
        static LOAD: Mutex<()> = Mutex::new(());
        LOAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the exclusive turn and records chunks until the returned guard is dropped.
    pub fn recording(&self) -> Recording<'_> {
        let turn = Self::exclusive();
        self.seen.lock().expect("lock").recording = true;
        Recording {
            harness: self,
            _turn: turn,
        }
    }

    pub fn get() -> &'static Harness {
        static HARNESS: OnceLock<Harness> = OnceLock::new();
        // Twice the daemon's default ring: unlike the daemon, the harness keeps every chunk.
        HARNESS.get_or_init(|| {
            Harness::start(CaptureConfig {
                ring_bytes: 128 << 20,
                ..CaptureConfig::default()
            })
        })
    }

    /// A capture of its own that records from the start: for a ring unlike the process-wide one.
    pub fn start_recording(config: CaptureConfig) -> Harness {
        let harness = Self::start(config);
        harness.seen.lock().expect("lock").recording = true;
        harness
    }

    pub fn start(config: CaptureConfig) -> Harness {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        // Reserved up front: growing a vector of millions of chunks would stall the consumer
        // and overflow the ring, which is the test harness's cost, not the daemon's.
        let seen = Arc::new(Mutex::new(Seen {
            recording: false,
            chunks: Vec::with_capacity(4 << 20),
            closed: Vec::new(),
            conns: BTreeMap::new(),
        }));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&seen);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let capture = Capture::start(&config).expect("capture starts (tests run as root)");
                // Keys in full: errors then keep the prefixes scripts make up, as Redis'
                // errorstats does, so that they compare.
                let pipeline_config = PipelineConfig {
                    keys: KeyPrivacy::new(KeyPolicy::Full, None).expect("no secret needed"),
                    ..PipelineConfig::default()
                };
                let pipeline = Pipeline::new(capture, pipeline_config, Attributor::default());
                ready_tx.send(pipeline.shared()).expect("ready");
                pipeline
                    .run(stopped, move |event| {
                        let mut seen = sink.lock().expect("lock");
                        if !seen.recording {
                            return;
                        }
                        let conn = match event {
                            StreamEvent::Data(chunk) => &chunk.conn,
                            StreamEvent::Closed { conn, .. } => conn,
                        };
                        seen.conns
                            .entry(conn.id)
                            .or_insert_with(|| Arc::clone(conn));
                        match event {
                            StreamEvent::Data(chunk) => {
                                seen.chunks.push(chunk.clone().into_owned())
                            }
                            StreamEvent::Closed {
                                conn,
                                lost_ingress,
                                lost_egress,
                                ..
                            } => seen.closed.push((
                                conn.id,
                                conn.process.pid,
                                *lost_ingress,
                                *lost_egress,
                            )),
                        }
                    })
                    .await
                    .expect("pipeline");
            });
        });
        let shared = ready_rx.recv_timeout(WAIT).expect("capture started");
        Harness { seen, shared, stop }
    }

    /// Chunks of processes `pid`, grouped into per-connection, per-direction streams.
    pub fn streams_of(&self, pid: u32) -> BTreeMap<(ConnId, u8), Vec<Chunk>> {
        let seen = self.seen.lock().expect("lock");
        let mut streams: BTreeMap<(ConnId, u8), Vec<Chunk>> = BTreeMap::new();
        for chunk in seen.chunks.iter().filter(|c| c.conn.process.pid == pid) {
            streams
                .entry((chunk.conn.id, chunk.direction as u8))
                .or_default()
                .push(chunk.clone());
        }
        streams
    }

    /// The connection of process `pid` whose first chunk came last (cookies are not allocated
    /// in order).
    pub fn newest_connection(&self, pid: u32) -> ConnId {
        let seen = self.seen.lock().expect("lock");
        let mut first_seen: BTreeMap<ConnId, u64> = BTreeMap::new();
        for chunk in seen.chunks.iter().filter(|c| c.conn.process.pid == pid) {
            first_seen.entry(chunk.conn.id).or_insert(chunk.ts_ns);
        }
        first_seen
            .into_iter()
            .max_by_key(|(_, ts_ns)| *ts_ns)
            .map(|(conn, _)| conn)
            .expect("connections")
    }

    pub fn chunks_of(&self, pid: u32) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .chunks
            .iter()
            .filter(|c| c.conn.process.pid == pid)
            .count()
    }

    /// Bytes of process `pid` in `direction` accounted for: delivered (copied or not) plus
    /// every loss the pipeline reported (before a chunk, or at a connection's close).
    pub fn bytes_of(&self, pid: u32, direction: Direction) -> u64 {
        let seen = self.seen.lock().expect("lock");
        let delivered: u64 = seen
            .chunks
            .iter()
            .filter(|c| c.conn.process.pid == pid && c.direction == direction)
            .map(|c| c.total_len() + c.gap_before)
            .sum();
        let lost_at_close: u64 = seen
            .closed
            .iter()
            .filter(|(_, owner, _, _)| *owner == pid)
            .map(|(_, _, ingress, egress)| {
                if direction == Direction::Ingress {
                    ingress
                } else {
                    egress
                }
            })
            .sum();
        delivered + lost_at_close
    }

    /// Bytes of connection `conn` in `direction` accounted for: delivered (copied or not) plus
    /// every loss reported (holes, and the stream's end at its close).
    pub fn bytes_of_conn(&self, conn: ConnId, direction: Direction) -> u64 {
        let seen = self.seen.lock().expect("lock");
        let delivered: u64 = seen
            .chunks
            .iter()
            .filter(|c| c.conn.id == conn && c.direction == direction)
            .map(|c| c.total_len() + c.gap_before)
            .sum();
        let lost_at_close: u64 = seen
            .closed
            .iter()
            .filter(|(id, _, _, _)| *id == conn)
            .map(|(_, _, ingress, egress)| match direction {
                Direction::Ingress => ingress,
                Direction::Egress => egress,
            })
            .sum();
        delivered + lost_at_close
    }

    /// Whether connection `conn` has closed.
    pub fn closed(&self, conn: ConnId) -> bool {
        let seen = self.seen.lock().expect("lock");
        seen.closed.iter().any(|(id, _, _, _)| *id == conn)
    }

    /// Connections seen (with their owner) whose local port, or else whose peer port, is `port`.
    pub fn conns_on_port(&self, port: u16, local: bool) -> BTreeMap<ConnId, (u32, String)> {
        let seen = self.seen.lock().expect("lock");
        seen.conns
            .values()
            .filter(|conn| {
                conn.socket.as_ref().is_some_and(|s| {
                    if local {
                        s.local.port() == port
                    } else {
                        s.peer.port() == port
                    }
                })
            })
            .map(|conn| (conn.id, (conn.process.pid, conn.process.comm.clone())))
            .collect()
    }

    /// The pipeline's counters, for failure messages.
    pub fn diagnostics(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.shared.counters;
        let kernel: Vec<u64> = c.kernel_losses.iter().map(|l| l.load(Relaxed)).collect();
        format!(
            "records {} events {} kernel losses {kernel:?} lost bytes {} duplicate bytes {} held {} \
             late records {} desyncs {} unanswered {} unmatched replies {} not RESP {} tracked {}",
            c.records.load(Relaxed),
            c.events.load(Relaxed),
            c.lost_bytes.load(Relaxed),
            c.duplicate_bytes.load(Relaxed),
            c.held_bytes.load(Relaxed),
            c.late_records.load(Relaxed),
            c.desyncs.load(Relaxed),
            c.unanswered.load(Relaxed),
            c.unmatched_replies.load(Relaxed),
            c.not_resp.load(Relaxed),
            c.tracked_connections.load(Relaxed),
        )
    }

    /// Bytes lost anywhere so far (kernel ring full), as reported by the pipeline.
    pub fn lost_bytes(&self) -> u64 {
        self.shared
            .counters
            .lost_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `done` holds, for at most [`WAIT`].
    pub fn wait_for(&self, what: &str, mut done: impl FnMut(&Harness) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Checks that the copied parts of `chunks`, at their stream offsets, equal `expected`, and
/// that the lengths add up to exactly `expected.len()`.
pub fn assert_stream_matches(chunks: &[Chunk], expected: &[u8], what: &str) {
    let mut offset = 0usize;
    let mut last_ts = 0;
    for chunk in chunks {
        assert!(chunk.ts_ns >= last_ts, "{what}: chunks out of order");
        last_ts = chunk.ts_ns;
        assert_eq!(chunk.gap_before, 0, "{what}: unexpected loss");
        let copied = chunk.bytes.len();
        let end = offset + copied;
        assert!(
            end <= expected.len(),
            "{what}: stream longer than expected ({end} > {})",
            expected.len()
        );
        assert!(
            chunk.bytes[..] == expected[offset..end],
            "{what}: bytes differ at offset {offset}"
        );
        offset += chunk.total_len() as usize;
    }
    assert_eq!(
        offset,
        expected.len(),
        "{what}: captured length differs from what crossed the socket"
    );
}

/// Runs a Python script that prints its own pid last; returns that pid once it has exited.
pub fn run_python(script: &str) -> u32 {
    let out = std::process::Command::new(python())
        .args(["-c", script])
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|line| line.trim().parse().ok())
        .expect("the script's pid")
}
