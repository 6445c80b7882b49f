//! Runs the stages in one task: capture → streams → decode/correlate → enrich → aggregate and
//! broadcast. One task, so per-connection order is never lost between stages; readers (gRPC,
//! metrics) see the results through [`Shared`].
use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use respwatch_common::LOSS_REASONS;
use tokio::sync::{broadcast, watch};

use crate::{
    aggregate::{Aggregator, RowKey},
    capture::{Capture, CaptureError, Record},
    decode::{DecodeCounters, DecodeStage, Detail},
    enrich::{Attributor, Process},
    event::{CommandEvent, KeyPrivacy},
    streams::{ConnId, StreamEvent, StreamStats, Streams},
};

/// Room for a batch's command events kept between batches.
const KEPT_EVENTS: usize = 4096;
/// Batches in a row that fit in [`KEPT_EVENTS`] before more room than that is let go.
const QUIET_BATCHES: u32 = 64;

/// How often connections of exited processes are ended and kernel loss counters read.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Counters for status and metrics, updated by the pipeline task.
#[derive(Debug, Default)]
pub struct PipelineCounters {
    pub records: AtomicU64,
    pub malformed_records: AtomicU64,
    pub chunks: AtomicU64,
    pub bytes: AtomicU64,
    /// Stream bytes lost: holes given up (ring overflow in the kernel, segments never seen)
    /// and stream ends never delivered.
    pub lost_bytes: AtomicU64,
    /// Retransmitted (or twice-seen) bytes dropped because they had been delivered once.
    pub duplicate_bytes: AtomicU64,
    /// Bytes held in out-of-order windows, waiting for a hole to fill.
    pub held_bytes: AtomicU64,
    /// Records that arrived after newer ones had been handed on.
    pub late_records: AtomicU64,
    pub tracked_connections: AtomicU64,
    /// Cgroups outside `--namespaces` whose I/O the kernel no longer looks at.
    pub excluded_cgroups: AtomicU64,
    /// The kernel's loss counters by [`respwatch_common::LossReason`], refreshed periodically.
    pub kernel_losses: [AtomicU64; LOSS_REASONS as usize],
    /// Payload bytes the kernel could not put in a ring (a node total).
    pub kernel_lost_bytes: AtomicU64,
    /// Close records that waited in the kernel's overflow map.
    pub closes_deferred: AtomicU64,
    pub events: AtomicU64,
    pub desyncs: AtomicU64,
    pub desync_bytes: AtomicU64,
    pub pushes: AtomicU64,
    pub unanswered: AtomicU64,
    /// See [`DecodeCounters::overflowed`].
    pub overflowed: AtomicU64,
    pub over_budget: AtomicU64,
    pub unmatched_replies: AtomicU64,
    pub not_resp: AtomicU64,
    pub replicated_commands: AtomicU64,
    pub replicated_bytes: AtomicU64,
    pub mid_stream_skipped_bytes: AtomicU64,
    /// The oldest record's age when its batch had been handled, at most, since `/metrics` last
    /// took it (records wait up to 10 ms in the ring by design; more means the pipeline lags).
    pub lag_max_ns: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub keys: KeyPrivacy,
    /// Events kept for `Watch` requests that ask for recent ones (`--recent-events`). Off by
    /// default: keeping them means building every event, watched or not.
    pub history: usize,
    /// Capacity of each subscriber's queue before it gets a loss notice instead.
    pub subscriber_queue: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            keys: KeyPrivacy::default(),
            history: 0,
            subscriber_queue: 16_384,
        }
    }
}

/// What the pipeline publishes, for the serving side.
pub struct Shared {
    pub counters: PipelineCounters,
    pub aggregator: Mutex<Aggregator>,
    pub history: Mutex<VecDeque<Arc<CommandEvent>>>,
    pub events: broadcast::Sender<Arc<CommandEvent>>,
    pub attributor: Attributor,
    pub config: PipelineConfig,
    /// What Watch subscribers may want, per process (`None`: anything); set by the serving side.
    watch_interest: Mutex<Option<Arc<dyn WatchInterest>>>,
    /// Changes with each [`Shared::set_watch_interest`].
    watch_interest_generation: AtomicU64,
}

/// Whether any Watch subscriber's filters could match an event of a process (its pid, comm,
/// pod, namespace, labels; the rest of an event is judged when it exists). The decode stage
/// builds events only for connections of processes some subscriber may want.
pub trait WatchInterest: Send + Sync {
    /// False only when no subscriber can want any event of `process`.
    fn may_want(&self, process: &Process, attributor: &Attributor) -> bool;
}

impl Shared {
    pub fn new(config: PipelineConfig, attributor: Attributor) -> Self {
        let (events, _) = broadcast::channel(config.subscriber_queue);
        Self {
            counters: PipelineCounters::default(),
            aggregator: Mutex::new(Aggregator::new()),
            history: Mutex::new(VecDeque::with_capacity(config.history)),
            events,
            attributor,
            config,
            watch_interest: Mutex::new(None),
            watch_interest_generation: AtomicU64::new(0),
        }
    }

    /// What subscribers may want from now on (`None`: anything).
    pub fn set_watch_interest(&self, interest: Option<Arc<dyn WatchInterest>>) {
        if let Ok(mut current) = self.watch_interest.lock() {
            *current = interest;
        }
        self.watch_interest_generation
            .fetch_add(1, Ordering::Release);
    }

    pub fn row_key(&self, event: &CommandEvent) -> RowKey {
        self.attributor.row_key(event)
    }

    /// Whether anything reads events beyond the stats: a Watch subscriber or the recent-events
    /// history. When nothing does, events carry no key text and are never shared.
    pub fn events_wanted(&self) -> bool {
        self.config.history > 0 || self.events.receiver_count() > 0
    }

    /// Hands a batch of events to the aggregator, then those built for watchers (when any may
    /// be: `detailed`) to the history and the subscribers. Empties `events`, keeping its room.
    /// `out_of_scope` gets the cgroups of events that can never be in `--namespaces`' scope.
    pub fn publish(
        &self,
        events: &mut Vec<CommandEvent>,
        detailed: bool,
        out_of_scope: &mut Vec<u64>,
    ) {
        // `--namespaces`: out-of-scope events go no further; their cgroups are then skipped in
        // the kernel too, so their sockets cost one storage lookup per packet from then on.
        events.retain(|event| {
            let keep = self.attributor.in_scope(event);
            if !keep && self.attributor.never_in_scope(&event.conn.process) {
                out_of_scope.push(event.conn.process.cgroup_id);
            }
            keep
        });
        if events.is_empty() {
            return;
        }
        self.counters
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        if let Ok(mut aggregator) = self.aggregator.lock() {
            aggregator.record_batch(events, self.attributor.generation(), |event| {
                self.row_key(event)
            });
        }
        if !detailed {
            events.clear();
            return;
        }
        let mut history = (self.config.history > 0)
            .then(|| self.history.lock().ok())
            .flatten();
        for event in events.drain(..).filter(|event| event.detailed) {
            let event = Arc::new(event);
            if let Some(history) = history.as_mut() {
                if history.len() == self.config.history {
                    history.pop_front();
                }
                history.push_back(Arc::clone(&event));
            }
            // No subscribers is fine; slow ones see `Lagged(n)` and report the loss.
            let _ = self.events.send(event);
        }
    }
}

pub struct Pipeline {
    capture: Capture,
    stages: Stages,
    shared: Arc<Shared>,
}

/// The user-space stages a batch of ring records goes through, with the buffers they hand on
/// (kept across batches): streams → decode/correlate → publish. `Pipeline::run` drives them
/// from the rings; the pipeline bench and the allocation test from recorded records.
pub struct Stages {
    pub streams: Streams,
    pub decode: DecodeStage,
    stream_events: Vec<StreamEvent<'static>>,
    command_events: Vec<CommandEvent>,
    out_of_scope: Vec<u64>,
    /// The subscribers' interest as last taken from [`Shared`], with the generations it was
    /// taken at (the interest's and the attribution's) and the decode stage's generation.
    interest: Option<Arc<dyn WatchInterest>>,
    interest_taken: (u64, u64),
    detail_generation: u64,
    /// Batches in a row whose events fit in [`KEPT_EVENTS`].
    quiet_batches: u32,
}

impl Stages {
    pub fn new(streams: Streams, decode: DecodeStage) -> Self {
        Self {
            streams,
            decode,
            stream_events: Vec::with_capacity(4096),
            command_events: Vec::with_capacity(KEPT_EVENTS),
            out_of_scope: Vec::new(),
            interest: None,
            interest_taken: (u64::MAX, u64::MAX),
            detail_generation: 0,
            quiet_batches: 0,
        }
    }

    /// Which connections' events the decode stage builds for watchers this batch.
    fn detail(&mut self, shared: &Shared) -> Detail {
        if !shared.events_wanted() {
            return Detail::Off;
        }
        if shared.config.history > 0 {
            return Detail::All;
        }
        let now = (
            shared.watch_interest_generation.load(Ordering::Acquire),
            shared.attributor.generation(),
        );
        if now != self.interest_taken {
            if now.0 != self.interest_taken.0 {
                self.interest = shared
                    .watch_interest
                    .lock()
                    .map(|interest| interest.clone())
                    .unwrap_or_default();
            }
            self.interest_taken = now;
            self.detail_generation += 1;
        }
        match self.interest {
            None => Detail::All,
            Some(_) => Detail::Filtered {
                generation: self.detail_generation,
            },
        }
    }

    /// One batch of records, oldest first; events are built for watchers only when `shared`
    /// has any. `observe` sees every stream event first. Returns the batch's stream counts.
    pub fn accept_batch<'r>(
        &mut self,
        records: impl IntoIterator<Item = Record<'r>>,
        shared: &Shared,
        observe: &mut impl FnMut(&StreamEvent<'_>),
    ) -> StreamTally {
        let mut events = recycle_events(std::mem::take(&mut self.stream_events));
        self.streams.accept_batch(records, &mut events);
        let tally = self.accept_events(&mut events, shared, observe);
        self.stream_events = recycle_events(events);
        tally
    }

    /// Stream events (of records, or of sweeps and late closes) through decoding to `shared`.
    fn accept_events(
        &mut self,
        events: &mut Vec<StreamEvent<'_>>,
        shared: &Shared,
        observe: &mut impl FnMut(&StreamEvent<'_>),
    ) -> StreamTally {
        let detail = self.detail(shared);
        self.decode.set_detail(detail);
        let interest = &self.interest;
        let wanted = |process: &Process| {
            interest
                .as_ref()
                .is_none_or(|interest| interest.may_want(process, &shared.attributor))
        };
        let mut tally = StreamTally::default();
        for event in events.drain(..) {
            tally.count(&event);
            observe(&event);
            self.decode
                .accept(&event, &mut self.command_events, &wanted);
        }
        let used = self.command_events.len();
        shared.publish(
            &mut self.command_events,
            detail != Detail::Off,
            &mut self.out_of_scope,
        );
        // A burst's room is not kept for good, but a steady high rate keeps it: given up and
        // grown again every batch, it cost more than it saved.
        self.quiet_batches = if used > KEPT_EVENTS {
            0
        } else {
            self.quiet_batches.saturating_add(1)
        };
        if self.command_events.capacity() > KEPT_EVENTS && self.quiet_batches >= QUIET_BATCHES {
            self.command_events = Vec::with_capacity(KEPT_EVENTS);
        }
        tally
    }
}

impl Pipeline {
    pub fn new(capture: Capture, config: PipelineConfig, attributor: Attributor) -> Self {
        let cgroup_root = capture.cgroup_root().to_path_buf();
        Self {
            capture,
            stages: Stages::new(
                Streams::new(cgroup_root),
                DecodeStage::new(config.keys.clone(), realtime_offset_ns()),
            ),
            shared: Arc::new(Shared::new(config, attributor)),
        }
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    pub fn attached(&self) -> Vec<String> {
        self.capture.attached().to_vec()
    }

    /// Runs until `shutdown` turns true. `observe` sees every stream event before the later
    /// stages do (the capture tests use it; the daemon passes a no-op).
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        mut observe: impl FnMut(&StreamEvent<'_>),
    ) -> Result<(), CaptureError> {
        // The record buffer borrows each batch's ring memory: emptied and handed on to the next
        // batch on the same allocation.
        let mut records: Vec<Record<'static>> = Vec::with_capacity(4096);
        let mut swept_events: Vec<StreamEvent<'static>> = Vec::new();
        let mut starts = Vec::with_capacity(4096);
        let mut malformed = Vec::new();
        let mut late_closes = Vec::new();
        let mut not_resp = Vec::new();
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            let mut swept = false;
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return Ok(());
                    }
                }
                _ = sweep.tick() => swept = true,
                woken = self.capture.wait() => woken?,
            }
            let shared = Arc::clone(&self.shared);
            let counters = &shared.counters;
            if swept {
                give_back_free_memory();
                self.capture.check_attached()?;
                self.capture.take_late_closes(&mut late_closes);
                self.stages
                    .streams
                    .accept_closes(late_closes.drain(..), &mut swept_events);
                self.stages.streams.sweep(&mut swept_events);
                self.stages
                    .accept_events(&mut swept_events, &shared, &mut observe)
                    .add_to(counters);
                self.refresh_kernel_counters();
            }
            {
                let mut batch_records = recycle_records(std::mem::take(&mut records));
                let batch =
                    self.capture
                        .read_batch(&mut batch_records, &mut starts, &mut malformed);
                counters
                    .records
                    .fetch_add(batch_records.len() as u64, Ordering::Relaxed);
                let oldest = batch_records.iter().map(Record::ts_ns).min();
                self.stages
                    .accept_batch(batch_records.drain(..), &shared, &mut observe)
                    .add_to(counters);
                if let Some(oldest) = oldest {
                    counters
                        .lag_max_ns
                        .fetch_max(monotonic_ns().saturating_sub(oldest), Ordering::Relaxed);
                }
                // Done with every record: their ring space goes back to the kernel.
                drop(batch);
                records = recycle_records(batch_records);
            }
            for error in malformed.drain(..) {
                counters.malformed_records.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "dropped a ring buffer record");
            }
            self.untrack_not_resp(&mut not_resp);
            self.exclude_in_kernel();
            let streams = &self.stages.streams;
            counters
                .tracked_connections
                .store(streams.tracked() as u64, Ordering::Relaxed);
            let stream_stats = streams.stats();
            counters
                .lost_bytes
                .store(stream_stats.lost_bytes, Ordering::Relaxed);
            counters
                .duplicate_bytes
                .store(stream_stats.duplicate_bytes, Ordering::Relaxed);
            counters
                .held_bytes
                .store(streams.held_bytes(), Ordering::Relaxed);
            counters
                .late_records
                .store(self.capture.late_records(), Ordering::Relaxed);
            store_decode_counters(counters, self.stages.decode.counters(), &stream_stats);
        }
    }

    /// Connections joined mid-stream that the decoder found not to be RESP: forgotten here, and
    /// no longer sent by the kernel.
    fn untrack_not_resp(&mut self, ids: &mut Vec<ConnId>) {
        self.stages.decode.take_not_resp(ids);
        for id in ids.drain(..) {
            self.stages.streams.forget(id);
            if let Err(error) = self.capture.untrack(id.0) {
                tracing::warn!(%error, cookie = id.0, "untracking a connection that is not RESP");
            }
        }
    }

    /// Cgroups the last batches found out of `--namespaces`' scope for good.
    fn exclude_in_kernel(&mut self) {
        for cgroup_id in self.stages.out_of_scope.drain(..) {
            match self.capture.exclude_cgroup(cgroup_id) {
                Ok(excluded) => self
                    .shared
                    .counters
                    .excluded_cgroups
                    .store(excluded as u64, Ordering::Relaxed),
                // Full map: the events are still dropped in user space, only costlier. Each
                // cgroup is tried once, so this is logged once per cgroup.
                Err(error) => tracing::warn!(%error, cgroup_id, "excluding a cgroup in the kernel"),
            }
        }
    }

    fn refresh_kernel_counters(&self) {
        match self.capture.kernel_counters() {
            Ok(kernel) => {
                let counters = &self.shared.counters;
                for (counter, value) in counters.kernel_losses.iter().zip(kernel.losses) {
                    counter.store(value, Ordering::Relaxed);
                }
                counters
                    .kernel_lost_bytes
                    .store(kernel.lost_bytes, Ordering::Relaxed);
                counters
                    .closes_deferred
                    .store(kernel.closes_deferred, Ordering::Relaxed);
            }
            Err(error) => tracing::warn!(%error, "reading the kernel's counters"),
        }
    }
}

/// A batch's stream counts, added to the shared atomics once per batch rather than per chunk.
#[derive(Default)]
pub struct StreamTally {
    chunks: u64,
    bytes: u64,
}

impl StreamTally {
    fn count(&mut self, event: &StreamEvent) {
        if let StreamEvent::Data(chunk) = event {
            self.chunks += 1;
            self.bytes += chunk.total_len();
        }
    }

    pub fn add_to(&self, counters: &PipelineCounters) {
        counters.chunks.fetch_add(self.chunks, Ordering::Relaxed);
        counters.bytes.fetch_add(self.bytes, Ordering::Relaxed);
    }
}

fn store_decode_counters(
    counters: &PipelineCounters,
    decode: &DecodeCounters,
    streams: &StreamStats,
) {
    counters.desyncs.store(decode.desyncs, Ordering::Relaxed);
    counters
        .desync_bytes
        .store(decode.desync_bytes, Ordering::Relaxed);
    counters.pushes.store(decode.pushes, Ordering::Relaxed);
    counters
        .unanswered
        .store(decode.unanswered, Ordering::Relaxed);
    counters
        .overflowed
        .store(decode.overflowed, Ordering::Relaxed);
    counters
        .over_budget
        .store(decode.over_budget, Ordering::Relaxed);
    counters
        .unmatched_replies
        .store(decode.unmatched_replies, Ordering::Relaxed);
    counters
        .not_resp
        .store(decode.not_resp + streams.not_resp, Ordering::Relaxed);
    counters
        .replicated_commands
        .store(decode.replicated_commands, Ordering::Relaxed);
    counters
        .replicated_bytes
        .store(decode.replicated_bytes, Ordering::Relaxed);
    counters
        .mid_stream_skipped_bytes
        .store(decode.mid_stream_skipped_bytes, Ordering::Relaxed);
}

/// An emptied batch buffer, on the same allocation, for records of another batch (in-place
/// collection keeps the allocation: the element types differ only in lifetime).
#[expect(
    clippy::unnecessary_filter_map,
    reason = "the closure changes the element type's lifetime, which a filter cannot"
)]
fn recycle_records<'b>(mut records: Vec<Record<'_>>) -> Vec<Record<'b>> {
    records.clear();
    records.into_iter().filter_map(|_| None).collect()
}

/// Like [`recycle_records`], for stream events.
#[expect(
    clippy::unnecessary_filter_map,
    reason = "the closure changes the element type's lifetime, which a filter cannot"
)]
fn recycle_events<'b>(mut events: Vec<StreamEvent<'_>>) -> Vec<StreamEvent<'b>> {
    events.clear();
    events.into_iter().filter_map(|_| None).collect()
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Wall clock minus monotonic clock, to date kernel timestamps.
fn realtime_offset_ns() -> i128 {
    clock_ns(libc::CLOCK_REALTIME) as i128 - monotonic_ns() as i128
}

// Links mimalloc into every binary of this crate (tests and benches too), which defines mi_collect.
use mimalloc as _;

unsafe extern "C" {
    /// mimalloc's own: frees what this thread's heap holds unused and returns it to the OS as
    /// its purge policy says.
    fn mi_collect(force: bool);
}

/// Memory a burst left freed goes back to the kernel once a sweep (each second) instead of
/// staying with the pipeline thread's heap: its large message buffers are freed and made again
/// per burst, not per message.
fn give_back_free_memory() {
    // SAFETY: mi_collect takes no pointer and only touches mimalloc's heap of the calling
    // thread (the global allocator's in the daemon; an empty one where a test binary uses
    // another allocator).
    unsafe { mi_collect(false) }
}
