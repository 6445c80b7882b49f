//! Aggregate stage: per (role, pod/process, peer, command) counters with Redis' own meaning, a
//! latency histogram, bytes and errors by prefix. One model behind `GetStats` and `/metrics`.
use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use foldhash::{HashMap, HashMapExt};
use respwatch_resp::correlate::{Outcome, Role};

use crate::{
    enrich::RowPeer,
    event::{CommandEvent, UNKNOWN_COMMAND},
};

/// Rows kept at most; later new rows fold into one overflow row per role, so memory stays
/// bounded however many processes, peers and commands there are.
pub const MAX_ROWS: usize = 20_000;
/// Seconds of per-second history kept for windowed queries (`redisctl top`).
pub const WINDOW_SECONDS: usize = 120;
/// The `comm` of the overflow row.
pub const OVERFLOW: &str = "(overflow)";
/// Different error prefixes counted per row at most, as Redis caps `INFO errorstats`.
pub const MAX_ERROR_PREFIXES: usize = 128;
/// The error prefix that errors past [`MAX_ERROR_PREFIXES`] count under.
pub const OVERFLOW_ERROR_PREFIX: &str = "(overflow)";

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
    /// At most [`MAX_ERROR_PREFIXES`] of them, plus [`OVERFLOW_ERROR_PREFIX`].
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
            self.count_error(&error.prefix, 1);
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
            self.count_error(prefix, *count);
        }
        self.last_seen_ns = self.last_seen_ns.max(other.last_seen_ns);
    }

    /// Counts errors by prefix; past [`MAX_ERROR_PREFIXES`] different ones (made-up prefixes,
    /// shown with `--keys full`), new ones count under [`OVERFLOW_ERROR_PREFIX`].
    fn count_error(&mut self, prefix: &str, count: u64) {
        if let Some(total) = self.errors.get_mut(prefix) {
            *total += count;
        } else if prefix == OVERFLOW_ERROR_PREFIX
            || self.errors.len() - usize::from(self.errors.contains_key(OVERFLOW_ERROR_PREFIX))
                < MAX_ERROR_PREFIXES
        {
            self.errors.insert(prefix.to_owned(), count);
        } else {
            *self
                .errors
                .entry(OVERFLOW_ERROR_PREFIX.to_owned())
                .or_default() += count;
        }
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

    /// Records a batch of events. Events of one process, peer, role, command and second share a
    /// row, so the row key (pod, process and peer strings) is built and hashed once per group
    /// rather than once per event: that lookup was the daemon's largest cost per command.
    /// `row_key` must depend on nothing else of an event.
    pub fn record_batch(
        &mut self,
        events: &[Arc<CommandEvent>],
        row_key: impl Fn(&CommandEvent) -> RowKey,
    ) {
        let mut groups: HashMap<BatchGroup<'_>, (&CommandEvent, RowStats)> = HashMap::new();
        for event in events {
            let group = BatchGroup {
                process: Arc::as_ptr(&event.conn.process) as usize,
                peer: RowPeer::of(event),
                role: event.role,
                command: stats_command(event),
                second: event.time_unix_ns / 1_000_000_000,
            };
            groups
                .entry(group)
                .or_insert_with(|| (event, RowStats::default()))
                .1
                .record(event);
        }
        // Connections of one process and peer share a group, so the row key (strings) is built
        // and the long-lived tables (cold in the cache) are looked up once per row and batch
        // rather than once per connection or event.
        let mut rows: Vec<_> = groups.into_iter().collect();
        rows.sort_unstable_by_key(|(group, _)| group.second);
        for (group, (first, stats)) in rows {
            let mut key = row_key(first);
            if key.command != group.command {
                key.command = group.command.to_owned();
            }
            self.add(key, group.second, &stats);
        }
    }

    /// Known rows (the common case) are found without cloning the key: comparing and cloning its
    /// strings was the aggregator's largest cost.
    fn add(&mut self, key: RowKey, second: u64, stats: &RowStats) {
        let key = match self.total.get_mut(&key) {
            Some(total) => {
                total.merge(stats);
                key
            }
            None => {
                let key = if self.total.len() >= MAX_ROWS {
                    RowKey {
                        role: key.role,
                        comm: OVERFLOW.to_owned(),
                        ..RowKey::empty(key.role)
                    }
                } else {
                    key
                };
                self.total.entry(key.clone()).or_default().merge(stats);
                key
            }
        };
        if let Some(rows) = self.second_mut(second) {
            match rows.get_mut(&key) {
                Some(row) => row.merge(stats),
                None => rows.entry(key).or_default().merge(stats),
            }
        }
    }

    /// The rows of `second`, created when new; `None` when it is older than the window.
    fn second_mut(&mut self, second: u64) -> Option<&mut HashMap<RowKey, RowStats>> {
        let newest = self.recent.back().map(|(newest, _)| *newest);
        if newest.is_none_or(|newest| newest < second) {
            self.recent.push_back((second, HashMap::new()));
            while self
                .recent
                .front()
                .is_some_and(|(oldest, _)| oldest + WINDOW_SECONDS as u64 <= second)
            {
                self.recent.pop_front();
            }
            return self.recent.back_mut().map(|(_, rows)| rows);
        }
        // A late event (a batch that ran behind): its own second, while still in the window.
        if newest.is_some_and(|newest| newest - second >= WINDOW_SECONDS as u64) {
            return None;
        }
        let position = match self.recent.iter().rposition(|(kept, _)| *kept <= second) {
            Some(position) if self.recent[position].0 == second => position,
            Some(position) => {
                self.recent.insert(position + 1, (second, HashMap::new()));
                position + 1
            }
            None => {
                self.recent.push_front((second, HashMap::new()));
                0
            }
        };
        self.recent.get_mut(position).map(|(_, rows)| rows)
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
    /// exited processes and deleted pods do not live forever; returns them.
    pub fn expire(
        &mut self,
        now_unix_ns: u64,
        grace_ns: u64,
        alive: impl Fn(&RowKey) -> bool,
    ) -> Vec<(RowKey, RowStats)> {
        self.total
            .extract_if(|key, stats| {
                !alive(key) && now_unix_ns.saturating_sub(stats.last_seen_ns) >= grace_ns
            })
            .collect()
    }
}

/// Events of one batch that land in the same row: everything a row key is made of (see
/// `Attributor::row_key`), the process by identity.
#[derive(PartialEq, Eq, Hash)]
struct BatchGroup<'a> {
    process: usize,
    peer: RowPeer,
    role: Role,
    command: &'a str,
    second: u64,
}

/// The command's row name: unknown commands and subcommands have no commandstats row in Redis,
/// so they fold into one row here (their errors still count, like `INFO errorstats`).
fn stats_command(event: &CommandEvent) -> &str {
    if !event.counted && event.outcome != Outcome::Discarded {
        UNKNOWN_COMMAND
    } else {
        &event.command
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        streams::ConnMeta,
        test_support::{conn, event},
    };

    /// The row key the pipeline would build: process and command (peer, pod left out).
    fn key_of(event: &CommandEvent) -> RowKey {
        RowKey {
            pid: event.conn.process.pid,
            comm: event.conn.process.comm.clone(),
            command: event.command.to_string(),
            ..RowKey::empty(event.role)
        }
    }

    fn calls(rows: &[(RowKey, RowStats)], pid: u32, command: &str) -> u64 {
        rows.iter()
            .filter(|(key, _)| key.pid == pid && key.command == command)
            .map(|(_, stats)| stats.calls)
            .sum()
    }

    #[test]
    fn a_batch_sums_like_event_by_event() {
        let (a, b, a_again) = (conn(1, 10), conn(2, 20), conn(3, 10));
        let events = vec![
            event(&a, "get", 100, 1_000),
            event(&b, "get", 100, 2_000),
            event(&a, "get", 100, 3_000),
            event(&a, "set", 101, 4_000),
            // Another connection of the same process: the same row.
            event(&a_again, "get", 101, 5_000),
            // No commandstats row in Redis: folded into `unknown`.
            event(&b, "nosuch", 101, 6_000),
        ];
        let mut aggregator = Aggregator::new();
        aggregator.record_batch(&events, key_of);
        let rows = aggregator.query(|_| true, &[GroupBy::Process, GroupBy::Command], None);
        assert_eq!(calls(&rows, 10, "get"), 3);
        assert_eq!(calls(&rows, 10, "set"), 1);
        assert_eq!(calls(&rows, 20, "get"), 1);
        assert_eq!(calls(&rows, 20, UNKNOWN_COMMAND), 1);
        assert_eq!(calls(&rows, 20, "nosuch"), 0);
        let get_10 = rows
            .iter()
            .find(|(key, _)| key.pid == 10 && key.command == "get")
            .map(|(_, stats)| stats.clone())
            .unwrap();
        assert_eq!(get_10.latency_ns, 9_000);
        assert_eq!(get_10.max_ns, 5_000);
        assert_eq!((get_10.bytes_in, get_10.bytes_out), (30, 15));
    }

    /// Prefixes made up by scripts (shown with `--keys full`) cannot grow a row without bound.
    #[test]
    fn error_prefixes_past_the_cap_count_under_one_overflow_prefix() {
        let a = conn(1, 10);
        let failing = |prefix: String| {
            let mut failed = (*event(&a, "eval", 100, 1)).clone();
            failed.outcome = Outcome::Failed;
            failed.error = Some(crate::event::EventError {
                prefix,
                template: None,
            });
            Arc::new(failed)
        };
        let events: Vec<_> = (0..MAX_ERROR_PREFIXES + 10)
            .map(|i| failing(format!("E{i}")))
            .chain([failing("E0".into()), failing("E999".into())])
            .collect();
        let mut aggregator = Aggregator::new();
        aggregator.record_batch(&events, key_of);
        let rows = aggregator.query(|_| true, &[GroupBy::Command], None);
        let errors = &rows[0].1.errors;
        assert_eq!(errors.len(), MAX_ERROR_PREFIXES + 1);
        assert_eq!(errors["E0"], 2, "a known prefix still counts");
        assert_eq!(errors[OVERFLOW_ERROR_PREFIX], 11);
        assert_eq!(
            errors.values().sum::<u64>(),
            events.len() as u64,
            "none lost"
        );
    }

    #[test]
    fn late_events_land_in_their_own_second() {
        let a = conn(1, 10);
        let mut aggregator = Aggregator::new();
        aggregator.record_batch(&[event(&a, "get", 100, 1)], key_of);
        aggregator.record_batch(&[event(&a, "get", 103, 1)], key_of);
        // A batch that ran behind: seconds 101 and 99 are older than the newest kept.
        aggregator.record_batch(&[event(&a, "get", 101, 1), event(&a, "get", 99, 1)], key_of);
        let window = |now, seconds| {
            calls(
                &aggregator.query(|_| true, &[GroupBy::Command], Some((now, seconds))),
                0,
                "get",
            )
        };
        assert_eq!(window(103, 1), 1, "second 103 alone");
        assert_eq!(window(103, 3), 2, "seconds 101..=103");
        assert_eq!(window(103, 4), 3, "seconds 100..=103");
        assert_eq!(window(103, 5), 4, "seconds 99..=103");
        let seconds: Vec<u64> = aggregator
            .recent
            .iter()
            .map(|(second, _)| *second)
            .collect();
        assert_eq!(seconds, [99, 100, 101, 103]);
    }

    #[test]
    fn rows_past_the_limit_fold_into_one_overflow_row_and_known_rows_still_count() {
        let mut aggregator = Aggregator::new();
        let processes: Vec<Arc<ConnMeta>> = (0..MAX_ROWS as u32 + 2)
            .map(|pid| conn(u64::from(pid), pid))
            .collect();
        let fill: Vec<_> = processes[..MAX_ROWS]
            .iter()
            .map(|process| event(process, "get", 100, 1))
            .collect();
        aggregator.record_batch(&fill, key_of);
        assert_eq!(aggregator.rows(), MAX_ROWS);
        // Two new processes past the limit, and one already known.
        let late = [
            event(&processes[MAX_ROWS], "get", 101, 1),
            event(&processes[MAX_ROWS + 1], "get", 101, 1),
            event(&processes[7], "get", 101, 1),
        ];
        aggregator.record_batch(&late, key_of);
        assert_eq!(aggregator.rows(), MAX_ROWS + 1, "one overflow row");
        for window in [None, Some((101, 1))] {
            let rows = aggregator.query(|_| true, &[GroupBy::Process, GroupBy::Command], window);
            let overflow: Vec<_> = rows
                .iter()
                .filter(|(key, _)| key.comm == OVERFLOW)
                .collect();
            assert_eq!(overflow.len(), 1, "{window:?}");
            assert_eq!(overflow[0].1.calls, 2, "{window:?}");
            assert_eq!(calls(&rows, 7, "get"), if window.is_none() { 2 } else { 1 });
            assert_eq!(calls(&rows, MAX_ROWS as u32, "get"), 0, "{window:?}");
        }
    }
}
