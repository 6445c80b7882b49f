//! Aggregate stage: per (role, pod/process, peer, command) counters with Redis' own meaning, a
//! latency histogram, bytes and errors by prefix. One model behind `GetStats` and `/metrics`.
use std::{
    borrow::Cow,
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use foldhash::{HashMap, HashMapExt};
use respwatch_resp::correlate::{Outcome, Role};

use crate::{
    enrich::{Process, RowPeer},
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
    /// 0: what exited processes of this name counted (see [`Aggregator::expire`]), or a
    /// process not known.
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

    /// Counts at or below each of [`LATENCY_BOUNDS_NS`], in one pass.
    fn below_bounds(&self) -> [u64; LATENCY_BOUNDS_NS.len()] {
        let mut below = [0; LATENCY_BOUNDS_NS.len()];
        let mut bound = 0;
        for (index, count) in self.buckets.iter().enumerate() {
            while bound < below.len() && Self::upper(index) > LATENCY_BOUNDS_NS[bound] {
                bound += 1;
            }
            if bound == below.len() {
                break;
            }
            below[bound] += count;
        }
        for at in 1..below.len() {
            below[at] += below[at - 1];
        }
        below
    }

    /// Latencies counted in all.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// Upper bounds (nanoseconds) of the latency buckets rows report to an exporter: Prometheus'
/// `le` bounds, 10 µs to 10 s.
pub const LATENCY_BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A row's counters as an exporter sees them: sums that only grow, the histogram reduced to
/// [`LATENCY_BOUNDS_NS`]. What changed since the last export is handed out as one of these.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub calls: u64,
    pub rejected_calls: u64,
    pub failed_calls: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Sum of counted latencies.
    pub latency_ns: u64,
    /// Latencies counted in all.
    pub latencies: u64,
    /// Latencies at or below each of [`LATENCY_BOUNDS_NS`] (cumulative, as Prometheus' buckets).
    pub below: [u64; LATENCY_BOUNDS_NS.len()],
    pub errors: BTreeMap<String, u64>,
}

impl Totals {
    fn of(stats: &RowStats) -> Totals {
        Totals {
            calls: stats.calls,
            rejected_calls: stats.rejected_calls,
            failed_calls: stats.failed_calls,
            bytes_in: stats.bytes_in,
            bytes_out: stats.bytes_out,
            latency_ns: stats.latency_ns,
            latencies: stats.histogram.count(),
            below: stats.histogram.below_bounds(),
            errors: stats.errors.clone(),
        }
    }

    /// What `self` counted beyond `earlier` (a snapshot of the same row).
    fn since(&self, earlier: &Totals) -> Totals {
        let mut below = self.below;
        for (now, then) in below.iter_mut().zip(earlier.below) {
            *now -= then;
        }
        Totals {
            calls: self.calls - earlier.calls,
            rejected_calls: self.rejected_calls - earlier.rejected_calls,
            failed_calls: self.failed_calls - earlier.failed_calls,
            bytes_in: self.bytes_in - earlier.bytes_in,
            bytes_out: self.bytes_out - earlier.bytes_out,
            latency_ns: self.latency_ns - earlier.latency_ns,
            latencies: self.latencies - earlier.latencies,
            below,
            errors: self
                .errors
                .iter()
                .map(|(prefix, count)| {
                    let then = earlier.errors.get(prefix).copied().unwrap_or_default();
                    (prefix.clone(), count - then)
                })
                .filter(|(_, count)| *count > 0)
                .collect(),
        }
    }

    pub fn add(&mut self, other: &Totals) {
        self.calls += other.calls;
        self.rejected_calls += other.rejected_calls;
        self.failed_calls += other.failed_calls;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.latency_ns += other.latency_ns;
        self.latencies += other.latencies;
        for (mine, theirs) in self.below.iter_mut().zip(other.below) {
            *mine += theirs;
        }
        for (prefix, count) in &other.errors {
            *self.errors.entry(prefix.clone()).or_default() += count;
        }
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
        let (calls, failed, rejected) = calls_of(event);
        self.calls += calls;
        self.failed_calls += failed;
        self.rejected_calls += rejected;
        if let Some(latency) = counted_latency(event) {
            self.latency_ns += latency;
            self.max_ns = self.max_ns.max(latency);
            self.histogram.record(latency);
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

/// The stats tables. Rows are found on the hot path through [`Slot`]s (what a row key is made
/// of, without its strings), then updated in place: a command costs no allocation once its row
/// and slot exist.
#[derive(Default)]
pub struct Aggregator {
    /// Rows by id; `None` where an expired row's id waits to be reused.
    rows: Vec<Option<Row>>,
    free: Vec<u32>,
    by_key: HashMap<RowKey, u32>,
    slots: HashMap<Slot, SlotRow>,
    /// The attribution generation the slots were resolved under (see `Attributor::generation`).
    slots_generation: u64,
    /// Per-second stats of the last [`WINDOW_SECONDS`], oldest first.
    recent: VecDeque<Second>,
    /// Seconds that left the window, emptied for reuse.
    spare_seconds: Vec<Second>,
    /// Ids of rows that counted something since the last [`Aggregator::drain_changes`] (an id
    /// may repeat after its row expired and the id was reused: its `changed` flag decides).
    changed: Vec<u32>,
    /// Calls of [`Aggregator::expire`] that expired rows.
    expirations: u64,
}

struct Row {
    key: RowKey,
    stats: RowStats,
    /// What the exporter was last handed (see [`Aggregator::drain_changes`]).
    exported: Totals,
    /// Counted anything since then; its id is in `Aggregator::changed`.
    changed: bool,
}

/// Everything a row key is made of (see `Attributor::row_key`), the process by identity and the
/// command by its name's address in the command table.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Slot {
    process: usize,
    peer: RowPeer,
    role: Role,
    command: (usize, usize),
}

struct SlotRow {
    row: u32,
    /// Holds the process whose address is in the slot, so it cannot be reused by another.
    _process: Arc<Process>,
}

/// Slots kept at most: a cache, emptied when full.
const MAX_SLOTS: usize = 4 * MAX_ROWS;

/// One second of the window: compact stats per row id, kept (zeroed) for reuse.
struct Second {
    second: u64,
    rows: HashMap<u32, WindowStats>,
}

/// A row's stats in one second: [`RowStats`] with the histogram's used buckets only.
#[derive(Default)]
struct WindowStats {
    calls: u64,
    latency_ns: u64,
    rejected_calls: u64,
    failed_calls: u64,
    max_ns: u64,
    bytes_in: u64,
    bytes_out: u64,
    /// (bucket, count), in bucket order.
    buckets: Vec<(u16, u32)>,
    errors: Vec<(Cow<'static, str>, u64)>,
    last_seen_ns: u64,
}

impl WindowStats {
    fn record(&mut self, event: &CommandEvent) {
        let (calls, failed, rejected) = calls_of(event);
        self.calls += calls;
        self.failed_calls += failed;
        self.rejected_calls += rejected;
        let (bytes_in, bytes_out) = event.bytes_in_out();
        self.bytes_in += bytes_in;
        self.bytes_out += bytes_out;
        self.last_seen_ns = self.last_seen_ns.max(event.time_unix_ns);
        if let Some(latency) = counted_latency(event) {
            self.latency_ns += latency;
            self.max_ns = self.max_ns.max(latency);
            self.count_bucket(Histogram::index(latency) as u16, 1);
        }
        if let Some(error) = &event.error {
            self.count_error(&error.prefix, 1);
        }
    }

    fn merge(&mut self, other: &WindowStats) {
        self.calls += other.calls;
        self.latency_ns += other.latency_ns;
        self.rejected_calls += other.rejected_calls;
        self.failed_calls += other.failed_calls;
        self.max_ns = self.max_ns.max(other.max_ns);
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.last_seen_ns = self.last_seen_ns.max(other.last_seen_ns);
        for &(bucket, count) in &other.buckets {
            self.count_bucket(bucket, count);
        }
        for (prefix, count) in &other.errors {
            self.count_error(prefix, *count);
        }
    }

    /// Keeps `buckets` in bucket order.
    fn count_bucket(&mut self, bucket: u16, count: u32) {
        match self.buckets.binary_search_by_key(&bucket, |(b, _)| *b) {
            Ok(at) => self.buckets[at].1 += count,
            Err(at) => self.buckets.insert(at, (bucket, count)),
        }
    }

    /// Like `RowStats::count_error`: past [`MAX_ERROR_PREFIXES`], new prefixes count under
    /// [`OVERFLOW_ERROR_PREFIX`]. Borrowed prefixes (Redis' own) are kept without a copy.
    #[expect(
        clippy::ptr_arg,
        reason = "the Cow itself is cloned when kept, so a borrowed prefix is never copied"
    )]
    fn count_error(&mut self, prefix: &Cow<'static, str>, count: u64) {
        if let Some((_, total)) = self.errors.iter_mut().find(|(known, _)| known == prefix) {
            *total += count;
        } else if self.errors.len() < MAX_ERROR_PREFIXES {
            self.errors.push((prefix.clone(), count));
        } else if let Some((_, total)) = self
            .errors
            .iter_mut()
            .find(|(known, _)| known == OVERFLOW_ERROR_PREFIX)
        {
            *total += count;
        } else {
            self.errors
                .push((Cow::Borrowed(OVERFLOW_ERROR_PREFIX), count));
        }
    }

    fn is_empty(&self) -> bool {
        self.last_seen_ns == 0
    }

    /// Zeroed in place, keeping its room.
    fn reset(&mut self) {
        let (mut buckets, mut errors) = (
            std::mem::take(&mut self.buckets),
            std::mem::take(&mut self.errors),
        );
        buckets.clear();
        errors.clear();
        *self = WindowStats {
            buckets,
            errors,
            ..WindowStats::default()
        };
    }

    fn add_to(&self, stats: &mut RowStats) {
        stats.calls += self.calls;
        stats.latency_ns += self.latency_ns;
        stats.rejected_calls += self.rejected_calls;
        stats.failed_calls += self.failed_calls;
        stats.max_ns = stats.max_ns.max(self.max_ns);
        stats.bytes_in += self.bytes_in;
        stats.bytes_out += self.bytes_out;
        for (bucket, count) in &self.buckets {
            stats.histogram.buckets[usize::from(*bucket)] += u64::from(*count);
        }
        for (prefix, count) in &self.errors {
            stats.count_error(prefix, *count);
        }
        stats.last_seen_ns = stats.last_seen_ns.max(self.last_seen_ns);
    }
}

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn rows(&self) -> usize {
        self.by_key.len()
    }

    /// Records a batch of events. `row_key` (built only for a row not seen before) must depend
    /// on nothing of an event but what a [`Slot`] holds; `generation` is the attribution's:
    /// when it changes, rows are looked up by their names again.
    pub fn record_batch(
        &mut self,
        events: &[CommandEvent],
        generation: u64,
        row_key: impl Fn(&CommandEvent) -> RowKey,
    ) {
        if generation != self.slots_generation {
            self.slots.clear();
            self.slots_generation = generation;
        }
        for event in events {
            let row = self.row_of(event, &row_key);
            if let Some(Some(kept)) = self.rows.get_mut(row as usize) {
                kept.stats.record(event);
                if !kept.changed {
                    kept.changed = true;
                    self.changed.push(row);
                }
            }
            if let Some(second) = self.second_mut(event.time_unix_ns / 1_000_000_000) {
                second.entry(row).or_default().record(event);
            }
        }
    }

    /// The row of an event: through its slot, else by its key (made and kept once).
    fn row_of(&mut self, event: &CommandEvent, row_key: &impl Fn(&CommandEvent) -> RowKey) -> u32 {
        let command = stats_command(event);
        let slot = command.map(|name| Slot {
            process: Arc::as_ptr(&event.conn.process) as usize,
            peer: RowPeer::of(event),
            role: event.role,
            command: (name.as_ptr() as usize, name.len()),
        });
        if let Some(found) = slot.and_then(|slot| self.slots.get(&slot)) {
            return found.row;
        }
        let mut key = row_key(event);
        let name = command.unwrap_or(&event.command);
        if key.command != name {
            key.command = name.to_owned();
        }
        let row = self.row_by_key(key);
        if let Some(slot) = slot {
            if self.slots.len() >= MAX_SLOTS {
                self.slots.clear();
            }
            self.slots.insert(
                slot,
                SlotRow {
                    row,
                    _process: Arc::clone(&event.conn.process),
                },
            );
        }
        row
    }

    /// The id of the row of `key`, made when new (the overflow row past [`MAX_ROWS`]).
    fn row_by_key(&mut self, key: RowKey) -> u32 {
        if let Some(row) = self.by_key.get(&key) {
            return *row;
        }
        let key = if self.by_key.len() >= MAX_ROWS {
            let overflow = RowKey {
                comm: OVERFLOW.to_owned(),
                ..RowKey::empty(key.role)
            };
            if let Some(row) = self.by_key.get(&overflow) {
                return *row;
            }
            overflow
        } else {
            key
        };
        let row = Row {
            key: key.clone(),
            stats: RowStats::default(),
            exported: Totals::default(),
            changed: false,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.rows[id as usize] = Some(row);
                id
            }
            None => {
                self.rows.push(Some(row));
                (self.rows.len() - 1) as u32
            }
        };
        self.by_key.insert(key, id);
        id
    }

    /// The rows of `second`, made (from a recycled second) when new; `None` when it is older
    /// than the window.
    fn second_mut(&mut self, second: u64) -> Option<&mut HashMap<u32, WindowStats>> {
        let newest = self.recent.back().map(|kept| kept.second);
        if newest.is_none_or(|newest| newest < second) {
            while self
                .recent
                .front()
                .is_some_and(|oldest| oldest.second + WINDOW_SECONDS as u64 <= second)
            {
                if let Some(gone) = self.recent.pop_front() {
                    self.spare_seconds.push(gone);
                }
            }
            let fresh = self.fresh_second(second);
            self.recent.push_back(fresh);
            return self.recent.back_mut().map(|kept| &mut kept.rows);
        }
        // A late event (a batch that ran behind): its own second, while still in the window.
        if newest.is_some_and(|newest| newest - second >= WINDOW_SECONDS as u64) {
            return None;
        }
        let position = match self.recent.iter().rposition(|kept| kept.second <= second) {
            Some(position) if self.recent[position].second == second => position,
            Some(position) => {
                let fresh = self.fresh_second(second);
                self.recent.insert(position + 1, fresh);
                position + 1
            }
            None => {
                let fresh = self.fresh_second(second);
                self.recent.push_front(fresh);
                0
            }
        };
        self.recent.get_mut(position).map(|kept| &mut kept.rows)
    }

    /// A second for the window: a recycled one, its rows zeroed in place (rows that stay
    /// quiet keep an empty entry, bounded by the rows that exist).
    fn fresh_second(&mut self, second: u64) -> Second {
        match self.spare_seconds.pop() {
            Some(mut spare) => {
                spare.second = second;
                spare.rows.values_mut().for_each(WindowStats::reset);
                spare
            }
            None => Second {
                second,
                rows: HashMap::new(),
            },
        }
    }

    /// Hands every row that counted something since the last call its key and what it counted
    /// since then: an exporter's work grows with the rows that are busy, not with all rows.
    pub fn drain_changes(&mut self, mut changed: impl FnMut(&RowKey, &Totals)) {
        for id in self.changed.drain(..) {
            if let Some(Some(row)) = self.rows.get_mut(id as usize)
                && row.changed
            {
                row.changed = false;
                let now = Totals::of(&row.stats);
                changed(&row.key, &now.since(&row.exported));
                row.exported = now;
            }
        }
    }

    /// The keys of all rows.
    pub fn keys(&self) -> impl Iterator<Item = &RowKey> {
        self.rows.iter().flatten().map(|row| &row.key)
    }

    /// Rows matching `filter`, summed over everything not in `group_by`, cumulative or over the
    /// last `window_seconds` (counted back from `now_unix_s`), in one piece (the API copies in
    /// pieces: see [`Aggregator::copy_rows`]).
    pub fn query(
        &self,
        filter: impl Fn(&RowKey) -> bool,
        group_by: &[GroupBy],
        window: Option<(u64, u64)>,
    ) -> Vec<(RowKey, RowStats)> {
        let mut rows = Vec::new();
        self.copy_rows(0, usize::MAX, window, &mut rows);
        group(rows.iter().filter(|(key, _)| filter(key)), group_by)
    }

    /// Copies rows with ids from `from` on, as they stand (cumulative, or over the last
    /// `seconds` counted back from `now_unix_s`), until `max` are copied; returns the id to go
    /// on from, `None` when every row is copied. A reader copies in such pieces, letting go of
    /// the lock the pipeline needs in between, and groups and filters afterwards; it starts
    /// again when [`Aggregator::expirations`] moved meanwhile (a row may have folded into
    /// another it copied or has yet to copy).
    pub fn copy_rows(
        &self,
        from: usize,
        max: usize,
        window: Option<(u64, u64)>,
        out: &mut Vec<(RowKey, RowStats)>,
    ) -> Option<usize> {
        let end = from.saturating_add(max).min(self.rows.len());
        let rows = self.rows.get(from..end).unwrap_or_default();
        match window {
            None => out.extend(
                rows.iter()
                    .flatten()
                    .map(|row| (row.key.clone(), row.stats.clone())),
            ),
            Some((now_unix_s, seconds)) => {
                let since = now_unix_s.saturating_sub(seconds);
                for (id, row) in (from..end).zip(rows) {
                    let Some(row) = row else { continue };
                    let mut stats: Option<RowStats> = None;
                    for kept in self.recent.iter().filter(|kept| kept.second > since) {
                        if let Some(counted) = kept.rows.get(&(id as u32))
                            && !counted.is_empty()
                        {
                            counted.add_to(stats.get_or_insert_with(RowStats::default));
                        }
                    }
                    if let Some(stats) = stats {
                        out.push((row.key.clone(), stats));
                    }
                }
            }
        }
        (end < self.rows.len()).then_some(end)
    }

    /// How many times rows expired so far (see [`Aggregator::copy_rows`]).
    pub fn expirations(&self) -> u64 {
        self.expirations
    }

    /// Forgets rows that saw nothing for `grace_ns` and can count no more; returns how many.
    /// A row of an exited process folds into its key's process-less row (pid 0, same name),
    /// so sums over anything but the pid never go down (`rate()` would read that as a
    /// reset); process-less rows stay while their pod does. Rows of a pod gone for good
    /// (`pod_gone`) go with everything they counted, as their series leave `/metrics`.
    pub fn expire(
        &mut self,
        now_unix_ns: u64,
        grace_ns: u64,
        process_alive: impl Fn(u32) -> bool,
        pod_gone: impl Fn(&RowKey) -> bool,
    ) -> usize {
        let mut expired = 0;
        for id in 0..self.rows.len() {
            let fold = match &self.rows[id] {
                Some(row) if now_unix_ns.saturating_sub(row.stats.last_seen_ns) >= grace_ns => {
                    if pod_gone(&row.key) {
                        false
                    } else if row.key.pid != 0 && !process_alive(row.key.pid) {
                        true
                    } else {
                        continue;
                    }
                }
                _ => continue,
            };
            let Some(row) = self.rows[id].take() else {
                continue;
            };
            let id = id as u32;
            self.by_key.remove(&row.key);
            let into = fold.then(|| self.fold(row));
            for kept in self.recent.iter_mut().chain(&mut self.spare_seconds) {
                if let Some(stats) = kept.rows.remove(&id)
                    && let Some(into) = into
                {
                    kept.rows.entry(into).or_default().merge(&stats);
                }
            }
            // Freed only now: the process-less row must not take this id while the window
            // still holds the expired row's seconds under it.
            self.free.push(id);
            expired += 1;
        }
        if expired > 0 {
            // Slots may point at freed ids, which new rows will reuse.
            self.slots.clear();
            self.expirations += 1;
        }
        expired
    }

    /// Adds an expired row to its process-less row (made when new); returns that row's id.
    /// What the expired row had not handed to the exporter yet is handed out from there.
    fn fold(&mut self, row: Row) -> u32 {
        let key = RowKey { pid: 0, ..row.key };
        let into = self.row_by_key(key);
        let Some(Some(kept)) = self.rows.get_mut(into as usize) else {
            return into;
        };
        kept.stats.merge(&row.stats);
        // Prefixes the kept row had no room for count under the overflow prefix there, so
        // what was exported of them is counted there too.
        let mut exported = row.exported;
        exported.errors = std::mem::take(&mut exported.errors)
            .into_iter()
            .map(|(prefix, count)| {
                if kept.stats.errors.contains_key(&prefix) {
                    (prefix, count)
                } else {
                    (OVERFLOW_ERROR_PREFIX.to_owned(), count)
                }
            })
            .fold(BTreeMap::new(), |mut errors, (prefix, count)| {
                *errors.entry(prefix).or_default() += count;
                errors
            });
        kept.exported.add(&exported);
        if row.changed && !kept.changed {
            kept.changed = true;
            self.changed.push(into);
        }
        into
    }
}

/// What an event adds to `calls`, `failed_calls` and `rejected_calls`, as Redis counts.
fn calls_of(event: &CommandEvent) -> (u64, u64, u64) {
    match event.outcome {
        Outcome::Ok | Outcome::Unknown => (1, 0, 0),
        Outcome::Failed => (1, 1, 0),
        Outcome::Rejected if event.counted => (0, 0, 1),
        Outcome::Rejected | Outcome::Discarded => (0, 0, 0),
    }
}

/// The latency an event adds to `usec` and the histogram, if it counts there.
fn counted_latency(event: &CommandEvent) -> Option<u64> {
    (event.counted && event.outcome != Outcome::Rejected).then_some(event.latency_ns)
}

/// The command's row name: unknown commands and subcommands have no commandstats row in Redis,
/// so they fold into one row here (their errors still count, like `INFO errorstats`).
/// `None`: a name the command table does not have, which only the event holds.
fn stats_command(event: &CommandEvent) -> Option<&'static str> {
    if !event.counted && event.outcome != Outcome::Discarded {
        return Some(UNKNOWN_COMMAND);
    }
    match event.command {
        Cow::Borrowed(name) => Some(name),
        Cow::Owned(_) => None,
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

/// Rows summed over everything not in `group_by`.
pub fn group<'a>(
    rows: impl Iterator<Item = &'a (RowKey, RowStats)>,
    group_by: &[GroupBy],
) -> Vec<(RowKey, RowStats)> {
    let mut grouped: HashMap<RowKey, RowStats> = HashMap::new();
    for (key, stats) in rows {
        grouped
            .entry(project(key, group_by))
            .or_default()
            .merge(stats);
    }
    grouped.into_iter().collect()
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
        aggregator.record_batch(&events, 0, key_of);
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
            let mut failed = event(&a, "eval", 100, 1);
            failed.outcome = Outcome::Failed;
            failed.error = Some(crate::event::EventError {
                prefix: prefix.into(),
                template: None,
            });
            failed
        };
        let events: Vec<_> = (0..MAX_ERROR_PREFIXES + 10)
            .map(|i| failing(format!("E{i}")))
            .chain([failing("E0".into()), failing("E999".into())])
            .collect();
        let mut aggregator = Aggregator::new();
        aggregator.record_batch(&events, 0, key_of);
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

    /// When a process's rows expire, sums over anything but the pid stay what they were,
    /// cumulative and over the window: its name's process-less row (pid 0) keeps them. Rows
    /// of a pod gone for good go with what they counted.
    #[test]
    fn rows_of_exited_processes_fold_into_their_process_less_rows() {
        let (gone, also_gone, staying) = (conn(1, 10), conn(2, 11), conn(3, 12));
        let mut aggregator = Aggregator::new();
        aggregator.record_batch(
            &[
                event(&gone, "get", 100, 1_000),
                event(&gone, "set", 100, 2_000),
                event(&also_gone, "get", 101, 3_000_000),
                event(&staying, "get", 101, 1_000),
            ],
            0,
            key_of,
        );
        let sums = |aggregator: &Aggregator| {
            let sorted = |mut rows: Vec<(RowKey, RowStats)>| {
                rows.sort_by(|a, b| a.0.command.cmp(&b.0.command));
                rows
            };
            (
                sorted(aggregator.query(|_| true, &[GroupBy::Command], None)),
                sorted(aggregator.query(|_| true, &[GroupBy::Command], Some((101, 10)))),
            )
        };
        let before = sums(&aggregator);
        let expired = aggregator.expire(110_000_000_000, 5_000_000_000, |pid| pid == 12, |_| false);
        assert_eq!(expired, 3, "10's get and set, 11's get");
        assert_eq!(sums(&aggregator), before);
        let by_process = aggregator.query(|_| true, &[GroupBy::Process, GroupBy::Command], None);
        assert_eq!(calls(&by_process, 0, "get"), 2);
        assert_eq!(calls(&by_process, 0, "set"), 1);
        assert_eq!(calls(&by_process, 12, "get"), 1);
        assert!(by_process.iter().all(|(key, _)| key.comm == "app"));
        assert_eq!(aggregator.rows(), 3);
        // Process-less rows stay while their pod does, and go with it.
        assert_eq!(
            aggregator.expire(200_000_000_000, 5_000_000_000, |_| false, |_| false),
            1
        );
        assert_eq!(aggregator.rows(), 2);
        assert_eq!(
            aggregator.expire(200_000_000_000, 5_000_000_000, |_| false, |_| true),
            2
        );
        assert_eq!(aggregator.rows(), 0);
    }

    /// Rows copied in pieces are the rows copied at once, cumulative and over a window, and an
    /// expiry between pieces shows in `expirations`.
    #[test]
    fn rows_copied_in_pieces_are_the_rows_copied_at_once() {
        let mut aggregator = Aggregator::new();
        for pid in 1..=50 {
            let process = conn(u64::from(pid), pid);
            aggregator.record_batch(
                &[
                    event(&process, "get", 100 + u64::from(pid % 7), 1_000),
                    event(&process, "set", 90, 2_000),
                ],
                0,
                key_of,
            );
        }
        for window in [None, Some((106, 10))] {
            let mut whole = Vec::new();
            assert_eq!(
                aggregator.copy_rows(0, usize::MAX, window, &mut whole),
                None
            );
            let (mut pieces, mut from) = (Vec::new(), Some(0));
            while let Some(at) = from {
                from = aggregator.copy_rows(at, 7, window, &mut pieces);
            }
            assert_eq!(pieces, whole, "window {window:?}");
            assert_eq!(whole.len(), if window.is_some() { 50 } else { 100 });
        }
        let before = aggregator.expirations();
        aggregator.expire(200_000_000_000, 1, |_| true, |_| false);
        assert_eq!(aggregator.expirations(), before, "nothing expired");
        aggregator.expire(200_000_000_000, 1, |pid| pid != 3, |_| false);
        assert_eq!(aggregator.expirations(), before + 1);
    }

    /// What an expired row counted is handed to the exporter once: through its own row before
    /// it expired, the rest through the row it folded into.
    #[test]
    fn an_expired_rows_counts_are_handed_out_once() {
        let (gone, later) = (conn(1, 10), conn(2, 11));
        let mut aggregator = Aggregator::new();
        let handed = |aggregator: &mut Aggregator| {
            let mut calls = 0;
            aggregator.drain_changes(|_, totals| calls += totals.calls);
            calls
        };
        aggregator.record_batch(&[event(&gone, "get", 100, 1_000)], 0, key_of);
        assert_eq!(handed(&mut aggregator), 1);
        aggregator.record_batch(&[event(&gone, "get", 100, 1_000)], 0, key_of);
        aggregator.record_batch(&[event(&later, "get", 100, 1_000)], 0, key_of);
        aggregator.expire(110_000_000_000, 1, |pid| pid == 11, |_| false);
        assert_eq!(handed(&mut aggregator), 2, "10's undrained get and 11's");
        assert_eq!(handed(&mut aggregator), 0);
    }

    #[test]
    fn late_events_land_in_their_own_second() {
        let a = conn(1, 10);
        let mut aggregator = Aggregator::new();
        aggregator.record_batch(&[event(&a, "get", 100, 1)], 0, key_of);
        aggregator.record_batch(&[event(&a, "get", 103, 1)], 0, key_of);
        // A batch that ran behind: seconds 101 and 99 are older than the newest kept.
        aggregator.record_batch(
            &[event(&a, "get", 101, 1), event(&a, "get", 99, 1)],
            0,
            key_of,
        );
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
        let seconds: Vec<u64> = aggregator.recent.iter().map(|kept| kept.second).collect();
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
        aggregator.record_batch(&fill, 0, key_of);
        assert_eq!(aggregator.rows(), MAX_ROWS);
        // Two new processes past the limit, and one already known.
        let late = [
            event(&processes[MAX_ROWS], "get", 101, 1),
            event(&processes[MAX_ROWS + 1], "get", 101, 1),
            event(&processes[7], "get", 101, 1),
        ];
        aggregator.record_batch(&late, 0, key_of);
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
