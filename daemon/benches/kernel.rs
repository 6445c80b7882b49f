//! What the kernel programs add to a watched process's own sends: the part of the daemon's cost
//! that no spare core absorbs. At the packet layer the programs run as packets pass the socket:
//! on loopback, the sender's egress and the receiver's ingress both run inside the sender's
//! `write`.
//!
//! A child process plays client and server of one loopback TCP connection in a single thread:
//! each round trip is a request write, its read, a reply write and its read, as for one
//! unpipelined Redis command: two packets, each seen leaving one socket and reaching the other
//! (four program runs with a payload). It runs without the programs and with them attached (the
//! rings drained by this process, as the daemon does), for RESP traffic (tracked: every payload
//! is copied to a ring) and for HTTP-like traffic (classified as not RESP, then ignored). Two
//! children at once show what two processes writing records on two CPUs cost each other. Rounds
//! alternate between detached and attached; each configuration keeps its fastest round.
//! Run as root: `cargo bench -p respwatchd --bench kernel`.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use respwatchd::capture::{Capture, CaptureConfig, Record};
use tokio::sync::watch;

/// Set in the environment of a child: `<traffic>:<round trips>`.
const CHILD_ENV: &str = "RESPWATCH_KERNEL_BENCH_CHILD";
const ROUND_TRIPS: u32 = 10_000;
/// Untimed round trips first: they let the programs classify the connection.
const WARM_UP: u32 = 200;
const ROUNDS: usize = 15;
/// The request and the reply, each leaving one socket and reaching the other.
const PROGRAM_RUNS_PER_ROUND_TRIP: f64 = 4.0;

#[derive(Clone, Copy, PartialEq)]
enum Traffic {
    Resp,
    Http,
}

impl Traffic {
    fn name(self) -> &'static str {
        match self {
            Traffic::Resp => "resp",
            Traffic::Http => "http",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Traffic::Resp, Traffic::Http]
            .into_iter()
            .find(|traffic| traffic.name() == name)
    }

    fn messages(self) -> (&'static [u8], &'static [u8]) {
        match self {
            Traffic::Resp => (b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n"),
            Traffic::Http => (
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
            ),
        }
    }
}

/// The child's work: `round_trips` timed round trips; returns CPU nanoseconds per round trip.
/// On loopback each message arrives whole, so each `read_exact` is one read (the output's
/// records per round trip, 4, confirms it).
fn ping_pong(traffic: Traffic, round_trips: u32) -> std::io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut client = TcpStream::connect(listener.local_addr()?)?;
    let (mut server, _) = listener.accept()?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (request, reply) = traffic.messages();
    let mut buf = [0u8; 64];
    let mut round_trip = || -> std::io::Result<()> {
        client.write_all(request)?;
        server.read_exact(&mut buf[..request.len()])?;
        server.write_all(reply)?;
        client.read_exact(&mut buf[..reply.len()])
    };
    for _ in 0..WARM_UP {
        round_trip()?;
    }
    let start = thread_cpu_ns()?;
    for _ in 0..round_trips {
        round_trip()?;
    }
    Ok((thread_cpu_ns()? - start) as f64 / f64::from(round_trips))
}

/// CPU time of the calling thread, system calls (and the programs in them) included. Not wall
/// time: the ring's reader, sharing the two CPUs with two children, would otherwise count as
/// the children's cost.
fn thread_cpu_ns() -> std::io::Result<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64)
}

/// Runs `children` copies of the child at once; returns their mean CPU ns per round trip.
fn run_children(traffic: Traffic, children: usize) -> f64 {
    let exe = std::env::current_exe().expect("the bench binary's own path");
    let spawned: Vec<_> = (0..children)
        .map(|_| {
            Command::new(&exe)
                .env(CHILD_ENV, format!("{}:{ROUND_TRIPS}", traffic.name()))
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawning a ping-pong child")
        })
        .collect();
    let total: f64 = spawned
        .into_iter()
        .map(|child| {
            let output = child.wait_with_output().expect("waiting for a child");
            assert!(output.status.success(), "a ping-pong child failed");
            String::from_utf8_lossy(&output.stdout)
                .trim()
                .parse::<f64>()
                .expect("a child prints its ns per round trip")
        })
        .sum();
    total / children as f64
}

/// The programs, attached until [`Attached::stop`], with the ring drained in the background.
struct Attached {
    stop: watch::Sender<bool>,
    records: Arc<AtomicU64>,
    drainer: tokio::task::JoinHandle<()>,
}

impl Attached {
    fn start(runtime: &tokio::runtime::Runtime) -> Self {
        let mut capture = runtime
            .block_on(async { Capture::start(&CaptureConfig::default()) })
            .expect("loading the eBPF programs (the bench needs root)");
        let records = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&records);
        let (stop, mut stopped) = watch::channel(false);
        let drainer = runtime.spawn(async move {
            let (mut starts, mut malformed) = (Vec::new(), Vec::new());
            loop {
                tokio::select! {
                    _ = stopped.changed() => return,
                    woken = capture.wait() => {
                        woken.expect("waiting on the rings");
                        let mut batch = Vec::new();
                        let _release = capture.read_batch(&mut batch, &mut starts, &mut malformed);
                        assert!(malformed.is_empty(), "malformed ring records");
                        let data = batch
                            .iter()
                            .filter(|record| matches!(record, Record::Data(_)))
                            .count();
                        counted.fetch_add(data as u64, Ordering::Relaxed);
                    }
                }
            }
        });
        Self {
            stop,
            records,
            drainer,
        }
    }

    /// Runs the children and returns their ns per round trip and the records they produced
    /// per round trip (read once the drainer has caught up).
    fn run(&self, traffic: Traffic, children: usize) -> (f64, f64) {
        let before = self.records.load(Ordering::Relaxed);
        let ns = run_children(traffic, children);
        let records = self.settled_records() - before;
        let round_trips = children as f64 * f64::from(ROUND_TRIPS + WARM_UP);
        (ns, records as f64 / round_trips)
    }

    /// The record count once the drainer has read everything the children wrote: it has not
    /// moved for two drain intervals (bounded, so a stuck drainer fails the check instead).
    fn settled_records(&self) -> u64 {
        let mut last = self.records.load(Ordering::Relaxed);
        for _ in 0..100 {
            std::thread::sleep(2 * respwatchd::capture::DRAIN_INTERVAL);
            let now = self.records.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        last
    }

    fn stop(self, runtime: &tokio::runtime::Runtime) {
        let _ = self.stop.send(true);
        runtime
            .block_on(self.drainer)
            .expect("the drainer finished");
    }
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        let (traffic, round_trips) = spec
            .split_once(':')
            .and_then(|(name, n)| Some((Traffic::parse(name)?, n.parse().ok()?)))
            .expect("child spec <traffic>:<round trips>");
        let ns = ping_pong(traffic, round_trips).expect("loopback ping-pong");
        println!("{ns:.1}");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let configs = [(Traffic::Resp, 1), (Traffic::Http, 1), (Traffic::Resp, 2)];
    let mut without = [f64::MAX; 3];
    let mut with = [f64::MAX; 3];
    let mut records = [0f64; 3];
    for _ in 0..ROUNDS {
        for (i, &(traffic, children)) in configs.iter().enumerate() {
            without[i] = without[i].min(run_children(traffic, children));
        }
        let attached = Attached::start(&runtime);
        for (i, &(traffic, children)) in configs.iter().enumerate() {
            let (ns, per_round_trip) = attached.run(traffic, children);
            with[i] = with[i].min(ns);
            records[i] = per_round_trip;
        }
        attached.stop(&runtime);
    }
    // Without these, a broken attach would show as "costs nothing".
    assert!(
        records[0] >= 4.0 && records[2] >= 4.0,
        "RESP round trips were not captured"
    );
    assert!(records[1] < 0.01, "HTTP round trips were captured");
    println!(
        "{:<10} {:>12} {:>12} {:>10} {:>14} {:>8} {:>14}",
        "traffic", "without ns", "with ns", "added ns", "per run", "ratio", "records/trip"
    );
    for (i, &(traffic, children)) in configs.iter().enumerate() {
        let added = with[i] - without[i];
        println!(
            "{:<10} {:>12.0} {:>12.0} {:>10.0} {:>14.0} {:>8.2} {:>14.2}",
            format!("{} x{children}", traffic.name()),
            without[i],
            with[i],
            added,
            added / PROGRAM_RUNS_PER_ROUND_TRIP,
            with[i] / without[i],
            records[i]
        );
    }
}
