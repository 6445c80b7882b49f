//! Aggregate stage: per (role, pod/process, peer, command) counters with Redis' own meaning, a
//! latency histogram, bytes and errors by prefix. One model behind `GetStats` and `/metrics`.
use std::collections::{BTreeMap, HashMap, VecDeque};

use respwatch_resp::correlate::{Outcome, Role};

use crate::event::{CommandEvent, UNKNOWN_COMMAND};

/// Rows kept at most; later new rows fold into one overflow row per role, so memory stays
/// bounded however many processes, peers and commands there are.
pub const MAX_ROWS: usize = 20_000;
/// Seconds of per-second history kept for windowed queries (`redisctl top`).
pub const WINDOW_SECONDS: usize = 120;
/// The `comm` of the overflow row.
pub const OVERFLOW: &str = "(overflow)";

/// What a row is counted for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RowKey {
    pub role: Role,
    /// Kubernetes namespace; empty for host processes.
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub pid: u32,
    pub comm: String,
    /// Client role: the server's `ip:port`; server role: the client's IP.
    pub peer: String,
    pub command: String,
}

/// Latency histogram: 4 log-spaced buckets per power of two of nanoseconds (about ±10%).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    buckets: Box<[u64; Histogram::BUCKETS]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: Box::new([0; Self::BUCKETS]),
        }
    }
}

impl Histogram {
    const SUB: usize = 4;
    const BUCKETS: usize = 64 * Self::SUB;

    fn index(ns: u64) -> usize {
        if ns < Self::SUB as u64 {
            return ns as usize;
        }
        let log = 63 - ns.leading_zeros() as usize;
        let sub = ((ns >> (log - 2)) & 0b11) as usize;
        (log * Self::SUB + sub).min(Self::BUCKETS - 1)
    }

    /// The upper bound of a bucket, in nanoseconds.
    fn upper(index: usize) -> u64 {
        if index < Self::SUB {
            return index as u64;
        }
        let (log, sub) = (index / Self::SUB, index % Self::SUB);
        let base = 1u64 << log;
        base + (base >> 2) * (sub as u64 + 1) - 1
    }

    pub fn record(&mut self, ns: u64) {
        self.buckets[Self::index(ns)] += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *mine += theirs;
        }
    }

    /// The latency below which `q` (0..=1) of the calls fall, as a bucket's upper bound.
    pub fn quantile(&self, q: f64) -> u64 {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (index, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::upper(index);
            }
        }
        Self::upper(Self::BUCKETS - 1)
    }

    /// Cumulative counts at the given upper bounds (nanoseconds), for Prometheus buckets.
    pub fn cumulative(&self, bounds_ns: &[u64]) -> Vec<u64> {
        bounds_ns
            .iter()
            .map(|bound| {
                self.buckets
                    .iter()
                    .enumerate()
                    .take_while(|(index, _)| Self::upper(*index) <= *bound)
                    .map(|(_, count)| count)
                    .sum()
            })
            .collect()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowStats {
    /// Executed calls, failed ones included (Redis' `calls`).
    pub calls: u64,
    /// Sum of latencies in nanoseconds (shown as `usec`).
    pub latency_ns: u64,
    pub rejected_calls: u64,
    pub failed_calls: u64,
    pub max_ns: u64,
    pub histogram: Histogram,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Error replies by `INFO errorstats` prefix.
    pub errors: BTreeMap<String, u64>,
    /// Unix nanoseconds of the last event.
    pub last_seen_ns: u64,
}

impl RowStats {
    fn record(&mut self, event: &CommandEvent) {
        match event.outcome {
            Outcome::Ok | Outcome::Unknown => self.calls += 1,
            Outcome::Failed => {
                self.calls += 1;
                self.failed_calls += 1;
            }
            Outcome::Rejected if event.counted => self.rejected_calls += 1,
            Outcome::Rejected | Outcome::Discarded => {}
        }
        if event.counted && event.outcome != Outcome::Rejected {
            self.latency_ns += event.latency_ns;
            self.max_ns = self.max_ns.max(event.latency_ns);
            self.histogram.record(event.latency_ns);
        }
        let (bytes_in, bytes_out) = event.bytes_in_out();
        self.bytes_in += bytes_in;
        self.bytes_out += bytes_out;
        if let Some(error) = &event.error {
            *self.errors.entry(error.prefix.clone()).or_default() += 1;
        }
        self.last_seen_ns = self.last_seen_ns.max(event.time_unix_ns);
    }

    pub fn merge(&mut self, other: &RowStats) {
        self.calls += other.calls;
        self.latency_ns += other.latency_ns;
        self.rejected_calls += other.rejected_calls;
        self.failed_calls += other.failed_calls;
        self.max_ns = self.max_ns.max(other.max_ns);
        self.histogram.merge(&other.histogram);
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        for (prefix, count) in &other.errors {
            *self.errors.entry(prefix.clone()).or_default() += count;
        }
        self.last_seen_ns = self.last_seen_ns.max(other.last_seen_ns);
    }

    pub fn usec(&self) -> u64 {
        self.latency_ns / 1000
    }

    pub fn usec_per_call(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.latency_ns as f64 / 1000.0 / self.calls as f64
        }
    }
}

/// The dimensions a query can group by; the others are summed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupBy {
    Namespace,
    Pod,
    Container,
    Process,
    Role,
    Command,
    Peer,
}

#[derive(Default)]
pub struct Aggregator {
    total: HashMap<RowKey, RowStats>,
    /// Per-second rows of the last [`WINDOW_SECONDS`], newest last.
    recent: VecDeque<(u64, HashMap<RowKey, RowStats>)>,
}

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn rows(&self) -> usize {
        self.total.len()
    }

    pub fn record(&mut self, mut key: RowKey, event: &CommandEvent) {
        if !event.counted && event.outcome != Outcome::Discarded {
            // Unknown commands and subcommands: no commandstats row in Redis, so one folded
            // row here (their errors still count, like INFO errorstats).
            key.command = UNKNOWN_COMMAND.to_owned();
        }
        if !self.total.contains_key(&key) && self.total.len() >= MAX_ROWS {
            key = RowKey {
                role: key.role,
                comm: OVERFLOW.to_owned(),
                ..RowKey::empty(key.role)
            };
        }
        let second = event.time_unix_ns / 1_000_000_000;
        if self
            .recent
            .back()
            .is_none_or(|(newest, _)| *newest < second)
        {
            self.recent.push_back((second, HashMap::new()));
            while self.recent.len() > WINDOW_SECONDS {
                self.recent.pop_front();
            }
        }
        if let Some((_, rows)) = self.recent.back_mut() {
            rows.entry(key.clone()).or_default().record(event);
        }
        self.total.entry(key).or_default().record(event);
    }

    /// Rows matching `filter`, summed over everything not in `group_by`, cumulative or over the
    /// last `window_seconds` (counted back from `now_unix_s`).
    pub fn query(
        &self,
        filter: impl Fn(&RowKey) -> bool,
        group_by: &[GroupBy],
        window: Option<(u64, u64)>,
    ) -> Vec<(RowKey, RowStats)> {
        let mut grouped: HashMap<RowKey, RowStats> = HashMap::new();
        let mut add = |key: &RowKey, stats: &RowStats| {
            if filter(key) {
                grouped
                    .entry(project(key, group_by))
                    .or_default()
                    .merge(stats);
            }
        };
        match window {
            None => self.total.iter().for_each(|(key, stats)| add(key, stats)),
            Some((now_unix_s, seconds)) => {
                let since = now_unix_s.saturating_sub(seconds);
                for (second, rows) in &self.recent {
                    if *second > since {
                        rows.iter().for_each(|(key, stats)| add(key, stats));
                    }
                }
            }
        }
        grouped.into_iter().collect()
    }

    /// Forgets rows whose process is gone and that saw nothing for `grace_ns`, so series of
    /// exited processes and deleted pods do not live forever.
    pub fn expire(&mut self, now_unix_ns: u64, grace_ns: u64, alive: impl Fn(&RowKey) -> bool) {
        self.total.retain(|key, stats| {
            alive(key) || now_unix_ns.saturating_sub(stats.last_seen_ns) < grace_ns
        });
    }
}

impl RowKey {
    fn empty(role: Role) -> Self {
        RowKey {
            role,
            namespace: String::new(),
            pod: String::new(),
            container: String::new(),
            pid: 0,
            comm: String::new(),
            peer: String::new(),
            command: String::new(),
        }
    }
}

/// Keeps the fields named in `group_by` and blanks the rest.
fn project(key: &RowKey, group_by: &[GroupBy]) -> RowKey {
    let has = |field| group_by.contains(&field);
    // Role always stays: summing client and server views would count each call twice.
    let mut out = RowKey::empty(key.role);
    if has(GroupBy::Namespace) || has(GroupBy::Pod) {
        out.namespace = key.namespace.clone();
    }
    if has(GroupBy::Pod) {
        out.pod = key.pod.clone();
    }
    if has(GroupBy::Container) {
        out.container = key.container.clone();
    }
    if has(GroupBy::Process) {
        out.pid = key.pid;
        out.comm = key.comm.clone();
    }
    if has(GroupBy::Peer) {
        out.peer = key.peer.clone();
    }
    if has(GroupBy::Command) {
        out.command = key.command.clone();
    }
    out
}
